"""Virtual adversarial training (fewlabels/methods/vat.py) on tiny synthetic digits."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from fewlabels.config import PipelineError, parse_config
from fewlabels.data import to_input
from fewlabels.evaluation import classification_metrics, predict_logits
from fewlabels.methods import vat
from fewlabels.methods.vat import _kl, _unit, virtual_adversarial_loss
from fewlabels.train import Run, SplitData, TrainingDiverged
from tests.conftest import AUGMENT, synthetic_digits

CPU = torch.device("cpu")
RUN_HOOKS = ("on_epoch", "on_checkpoint", "resume")

SECTION = {
    "epochs": 3, "steps_per_epoch": 10, "batch_size": 10, "unlabeled_ratio": 2, "lr": 0.003,
    "lr_schedule": "cosine", "weight_decay": 0.0, "channels": [8, 16, 16], "hidden": 32,
    "batch_norm": True, "augment": AUGMENT, "xi": 0.1, "eps": 1.0, "vat_weight": 1.0,
    "entropy_weight": 0.1, "ema_decay": 0.9,
}  # fmt: skip


def vat_config(**overrides) -> vat.Config:
    """A tiny train.vat section, checked like the stage checks params.yaml's."""
    return parse_config(vat.Config, {**SECTION, **overrides}, "train.vat")


def small_cnn(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return vat.build(vat_config(**overrides), n_classes=10)[0]


class Recorder(nn.Module):
    """Wraps a model; keeps a copy of every input it is called on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.model(x)


def _images(n: int = 12, seed: int = 0) -> torch.Tensor:
    return to_input(synthetic_digits(n, seed=seed)[0])


def test_build_gives_the_configs_waterloo_cnn_as_the_saved_model():
    model, parts = vat.build(vat_config(), n_classes=10)
    assert parts["model"].module is model and parts["model"].arch == "waterloo_cnn"
    assert parts["model"].config == {"n_classes": 10, "channels": [8, 16, 16], "hidden": 32,
                                     "batch_norm": True}  # fmt: skip
    assert model(_images(3)).shape == (3, 10)


def test_unit_scales_each_image_to_norm_one_and_leaves_zero_at_zero():
    d = torch.randn(5, 1, 28, 28) * torch.tensor([1e-3, 1.0, 10.0, 1e3, 0.0]).view(-1, 1, 1, 1)
    norms = _unit(d).flatten(1).norm(dim=1)
    assert torch.allclose(norms[:4], torch.ones(4), atol=1e-6)
    assert norms[4] == 0 and torch.isfinite(_unit(d)).all()


# 1e-6 is the paper's: its power-iteration gradient is ~1e-15 per image, below float32's
# resolution of a norm unless `_unit` scales by the largest entry first.
@pytest.mark.parametrize("xi", [1.0, 0.1, 0.01, 1e-6])
def test_the_adversarial_perturbation_has_norm_eps_per_image(xi):
    model = small_cnn().eval()
    recorder = Recorder(model)
    x = _images()
    with torch.no_grad():
        logits = model(x)
    virtual_adversarial_loss(recorder, x, logits, xi=xi, eps=2.0)
    assert len(recorder.inputs) == 2  # the power iteration's probe, then the attack
    probe, attacked = (inputs - x for inputs in recorder.inputs)
    assert torch.allclose(attacked.flatten(1).norm(dim=1), torch.full((12,), 2.0), rtol=1e-4)
    if xi >= 1e-3:  # a smaller step is partly lost to rounding when added to the pixels
        assert torch.allclose(probe.flatten(1).norm(dim=1), torch.full((12,), xi), rtol=1e-3)


def test_the_adversarial_direction_changes_the_prediction_more_than_a_random_one():
    model = small_cnn().eval()
    x = _images(20)
    with torch.no_grad():
        logits = model(x)
        random_kl = [_kl(logits, model(x + 2.0 * _unit(torch.randn(x.shape)))) for _ in range(5)]
    adversarial = virtual_adversarial_loss(model, x, logits, xi=0.1, eps=2.0)
    assert adversarial > 5 * max(random_kl)


def test_the_loss_is_non_negative_and_zero_for_a_constant_model():
    model = small_cnn().eval()
    for seed in range(3):
        x = _images(seed=seed)
        with torch.no_grad():
            logits = model(x)
        assert virtual_adversarial_loss(model, x, logits, xi=0.1, eps=2.0) >= 0
    # Logits that ignore the image: no direction changes them, so the loss is zero.
    constant = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with torch.no_grad():
        constant[1].weight.zero_()
        constant[1].bias.copy_(torch.linspace(-2, 2, 10))
    x = _images()
    loss = virtual_adversarial_loss(constant, x, constant(x), xi=0.1, eps=2.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_gradients_reach_every_weight_and_not_the_fixed_target():
    model = small_cnn().train()
    x = _images()
    logits = model(x)
    target = logits.detach().requires_grad_()
    virtual_adversarial_loss(model, x, target, xi=0.1, eps=2.0).backward()
    assert target.grad is None  # p(x) is a fixed distribution
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_a_step_draws_the_labeled_batch_and_unlabeled_ratio_times_as_many_unlabeled():
    cfg = vat_config(batch_size=6, unlabeled_ratio=3)
    model = small_cnn()
    x, y = synthetic_digits(20)
    data = SplitData(x, y, synthetic_digits(50, seed=2)[0])
    step = vat.train_step(model, data, cfg, Run(CPU, torch.Generator().manual_seed(0)))
    x_l, y_l, x_u = step.draw()
    assert x_l.shape == (6, 1, 28, 28) and y_l.shape == (6,) and x_u.shape == (18, 1, 28, 28)
    assert step.images == 6 + 3 * 6
    loss, stats = step.loss(x_l, y_l, x_u)
    expected = stats["train/ce"] + stats["train/vat"] + 0.1 * stats["train/entropy"]
    assert loss.item() == pytest.approx(expected, rel=1e-5) and stats["train/vat"] > 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def _train(seed: int = 0, **kw):
    """vat.train on 20 labeled and 60 unlabeled synthetic digits (20 more for validation);
    the hooks and `resume` go to the `Run`, every other keyword to the config."""
    hooks = {k: kw.pop(k) for k in RUN_HOOKS if k in kw}
    # `unchecked`: values params.yaml would refuse, set past the check to test the loop.
    unchecked = kw.pop("unchecked", {})
    cfg = dataclasses.replace(vat_config(**kw), **unchecked)
    torch.manual_seed(seed)
    model, _ = vat.build(cfg, n_classes=10)
    x, y = synthetic_digits(20)
    data = SplitData(x, y, synthetic_digits(60, seed=2)[0])
    x_val, y_val = synthetic_digits(20, seed=1)
    run = Run(CPU, torch.Generator().manual_seed(seed), x_val, y_val, **hooks)
    return model, vat.train(model, data, cfg, run)


def test_training_is_deterministic_for_a_seed():
    model_a, a = _train(seed=3, epochs=2, steps_per_epoch=5)
    model_b, b = _train(seed=3, epochs=2, steps_per_epoch=5)
    assert a.history == b.history
    for key, value in a.last_state.items():
        assert torch.equal(b.last_state[key], value)
    for key, value in model_a.state_dict().items():
        assert torch.equal(model_b.state_dict()[key], value)
    _, c = _train(seed=4, epochs=2, steps_per_epoch=5)
    assert c.history != a.history


def test_a_short_run_learns_the_synthetic_digits():
    # A milder augmentation than AUGMENT, whose shifts move one class's bar onto the next.
    mild = {"rotate_deg": 5.0, "translate": 0.02, "scale": 0.05}
    model, result = _train(seed=0, augment=mild, lr=0.01, ema_decay=0.8)
    assert result.images_seen == 3 * 10 * (10 + 2 * 10)
    model.load_state_dict(result.last_state)  # the moving average, as the stage saves it
    x_test, y_test = synthetic_digits(100, seed=7)
    accuracy = classification_metrics(predict_logits(model, x_test, 50, CPU), y_test)["accuracy"]
    assert accuracy > 0.7  # chance is 0.1
    last = result.history[-1]
    assert last["train/ce"] < result.history[0]["train/ce"] and last["train/vat"] > 0


class Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_result():
    # The random directions come from torch's global RNG: the checkpoint must restore it.
    _, reference = _train(seed=1, epochs=3, steps_per_epoch=4)
    saved = []

    def stop_after_epoch_1(stats):
        if stats["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        _train(seed=1, epochs=3, steps_per_epoch=4, on_checkpoint=saved.append,
               on_epoch=stop_after_epoch_1)  # fmt: skip
    assert {"ema", "scheduler", "rng"} <= saved[-1].keys()
    _, resumed = _train(seed=9, epochs=3, steps_per_epoch=4, resume=saved[-1])
    assert resumed.history == reference.history
    for key, value in reference.last_state.items():
        assert torch.equal(resumed.last_state[key], value)


def test_a_nan_loss_stops_training_with_a_message():
    with pytest.raises(PipelineError, match=r"train\.vat\.vat_weight must be a finite number"):
        vat_config(vat_weight=float("nan"))
    with pytest.raises(TrainingDiverged, match="loss is nan at epoch 1, step 1"):
        _train(epochs=1, unchecked={"vat_weight": float("nan")})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"eps": 0}, r"train\.vat\.eps must be a number > 0, got 0"),
        ({"eps": -1.0}, r"train\.vat\.eps must be a number > 0, got -1\.0"),
        ({"eps": "2e-1"}, r"train\.vat\.eps must be a number \(write 0\.001, not 1e-3\)"),
        ({"xi": 0.0}, r"train\.vat\.xi must be a number > 0"),
        ({"vat_weight": -0.5}, r"train\.vat\.vat_weight must be a number >= 0"),
        ({"ema_decay": 1.5}, r"train\.vat\.ema_decay must be a number >= 0 and <= 1"),
        ({"augment": {"rotate_deg": 10}}, r"missing key train\.vat\.augment\.translate"),
        ({"epsilon": 2.0}, r"unknown key train\.vat\.epsilon; known keys here: .*eps"),
    ],
)
def test_a_bad_vat_section_is_refused_in_one_line_naming_the_key(change, message):
    with pytest.raises(PipelineError, match=message) as error:
        vat_config(**change)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("key", ["eps", "xi", "unlabeled_ratio", "entropy_weight"])
def test_a_missing_vat_key_is_refused_by_name(key):
    section = {k: v for k, v in SECTION.items() if k != key}
    with pytest.raises(PipelineError, match=rf"^params\.yaml: missing key train\.vat\.{key}$"):
        parse_config(vat.Config, section, "train.vat")
