"""Augmentation, the baseline network, the shared training loop (fewlabels/train.py), the
supervised trainer and the metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewlabels import checkpoint as checkpoint_lib
from fewlabels.checkpoint import load_training_state, run_fingerprint, save_training_state
from fewlabels.config import NO_AUGMENT, Affine, ElasticAffine, PipelineError, parse_config
from fewlabels.data import (
    elastic_displacement,
    random_affine,
    random_cutout,
    random_thicken,
    to_input,
)
from fewlabels.evaluation import (
    classification_metrics,
    confusion_matrix,
    eval_mode,
    module_mode,
    results_markdown,
)
from fewlabels.methods import baseline, ceilings
from fewlabels.models import build_model
from fewlabels.supervised import train_supervised
from fewlabels.train import (
    Loop,
    Run,
    SplitData,
    Step,
    TrainingDiverged,
    fit_steps,
    loop_of,
    lr_factor,
    moving_average,
)
from tests.conftest import AUGMENT, synthetic_digits

CPU = torch.device("cpu")


class Interrupt(Exception):
    pass


def test_to_input_scales_and_adds_channel():
    x = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    out = to_input(x)
    assert out.shape == (1, 1, 1, 2) and out.dtype == torch.float32
    assert out.min() == 0 and out.max() == 1


def test_random_affine_keeps_shape_and_varies_per_image():
    x = to_input(synthetic_digits(8)[0][:1].repeat(8, 1, 1))  # 8 copies of one image
    out = random_affine(x, Affine(**AUGMENT), torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    # Every copy got its own transform: no two outputs are equal.
    flat = out.flatten(1)
    assert torch.cdist(flat, flat).fill_diagonal_(1.0).min() > 1e-3


def test_random_affine_is_identity_at_zero_strength_and_seeded():
    x = to_input(synthetic_digits(4)[0])
    assert torch.equal(random_affine(x, NO_AUGMENT), x)
    a = random_affine(x, Affine(**AUGMENT), torch.Generator().manual_seed(1))
    b = random_affine(x, Affine(**AUGMENT), torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_elastic_distortion_is_off_by_default_and_draws_nothing_then():
    # Off (elastic 0) must leave the random stream and so every earlier result unchanged.
    x = to_input(synthetic_digits(4)[0])
    g_plain, g_off = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    plain = random_affine(x, Affine(**AUGMENT), g_plain)
    off = random_affine(x, ElasticAffine(**AUGMENT, elastic=0.0, elastic_sigma=4.0), g_off)
    assert torch.equal(plain, off)
    assert torch.equal(g_plain.get_state(), g_off.get_state())


def test_elastic_distortion_alone_moves_strokes_smoothly_and_is_seeded():
    x = to_input(synthetic_digits(8)[0])
    elastic = ElasticAffine(0.0, 0.0, 0.0, elastic=34.0, elastic_sigma=4.0)
    a = random_affine(x, elastic, torch.Generator().manual_seed(3))
    b = random_affine(x, elastic, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    assert (a - x).abs().amax(dim=(1, 2, 3)).min() > 0.05  # every image is distorted
    # Ink is moved, not made: the total stays within a few percent.
    assert torch.allclose(a.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)), rtol=0.1)


def test_elastic_displacement_scales_with_alpha_and_is_smooth():
    def field(alpha: float, sigma: float) -> torch.Tensor:
        return elastic_displacement(256, 28, 28, alpha, sigma, torch.Generator().manual_seed(4))

    small, large = field(10, 4), field(40, 4)
    assert small.shape == (256, 28, 28, 2)
    assert torch.allclose(large, 4 * small, atol=1e-6)  # same draw, alpha only scales

    # Neighbouring pixels move almost alike (smoothed), unlike raw per-pixel noise,
    # and a wider Gaussian gives a smoother field.
    def neighbour_correlation(d: torch.Tensor) -> float:
        left, right = d[:, :, :-1].flatten(), d[:, :, 1:].flatten()
        return float(torch.corrcoef(torch.stack([left, right]))[0, 1])

    assert neighbour_correlation(field(10, 2)) > 0.8
    assert neighbour_correlation(field(10, 4)) > neighbour_correlation(field(10, 2))
    assert neighbour_correlation(field(10, 0.3)) < 0.5


def test_random_cutout_zeroes_one_square_per_image_and_is_seeded():
    x = torch.ones(64, 1, 28, 28)
    out = random_cutout(x, 10, torch.Generator().manual_seed(0))
    zeros = (out == 0).sum(dim=(1, 2, 3))
    assert zeros.max() == 100 and zeros.min() > 0  # full square inside, clipped at edges
    assert len(set(zeros.tolist())) > 1  # squares land in different places
    again = random_cutout(x, 10, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(random_cutout(x, 0, torch.Generator()), x)


def test_random_thicken_dilates_strokes_of_the_chosen_fraction_only():
    x = torch.zeros(400, 1, 28, 28)
    x[:, 0, 5:20, 14] = 1.0  # a one-pixel-wide vertical stroke
    out = random_thicken(x, 0.5, torch.Generator().manual_seed(0))
    ink = out.sum(dim=(1, 2, 3))
    thick = ink > x[0].sum()
    # A thickened stroke is 3 pixels wide and 2 pixels longer; the others are untouched.
    assert torch.all(ink[thick] == 3 * 17) and torch.equal(out[~thick], x[~thick])
    assert 0.4 < thick.float().mean() < 0.6
    assert torch.equal(out, random_thicken(x, 0.5, torch.Generator().manual_seed(0)))
    assert torch.equal(random_thicken(x, 0.0, torch.Generator()), x)
    assert torch.all(random_thicken(x, 1.0, torch.Generator()).sum(dim=(1, 2, 3)) == 51)


def test_baseline_cnn_shapes_and_gradients():
    model = build_model("baseline_cnn", n_classes=10, channels=[8, 16], hidden=32, dropout=0.3)
    x, y = synthetic_digits(6)
    logits = model(to_input(x))
    assert logits.shape == (6, 10)
    F.cross_entropy(logits, y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def baseline_config(**overrides) -> baseline.Config:
    """A tiny baseline config, read like the stage reads params.yaml's train.baseline."""
    section = {
        "epochs": 3, "steps_per_epoch": 10, "batch_size": 16, "lr": 0.003,
        "lr_schedule": "constant", "weight_decay": 0.0, "channels": [8, 16], "hidden": 32,
        "dropout": 0.0, "augment": {**AUGMENT, "elastic": 0.0, "elastic_sigma": 4.0},
        **overrides,
    }  # fmt: skip
    return parse_config(baseline.Config, section, "train.baseline")


def _train(seed: int, *, epochs: int = 3, steps: int = 10, dropout: float = 0.0, **hooks):
    """Train a small baseline CNN on synthetic digits with the baseline method's `train`;
    `lr_schedule` goes to the config, the rest (hooks, resume) to the `Run`."""
    torch.manual_seed(seed)
    schedule = hooks.pop("lr_schedule", "constant")
    cfg = baseline_config(epochs=epochs, steps_per_epoch=steps, dropout=dropout,
                          lr_schedule=schedule)  # fmt: skip
    model, parts = baseline.build(cfg, n_classes=10)
    assert parts["model"].module is model and parts["model"].arch == "baseline_cnn"
    x, y = synthetic_digits()
    x_val, y_val = synthetic_digits(20, seed=1)
    run = Run(CPU, torch.Generator().manual_seed(seed), x_val=x_val, y_val=y_val, **hooks)
    empty = torch.empty(0, 28, 28, dtype=torch.uint8)
    result = baseline.train(model, SplitData(x, y, empty), cfg, run)
    return model, result


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    model = build_model("baseline_cnn", n_classes=10, channels=[8, 16], hidden=32, dropout=0.0)
    x, y = synthetic_digits()
    before = F.cross_entropy(model(to_input(x)), y).item()
    model, result = _train(seed=0)
    model.eval()
    after = F.cross_entropy(model(to_input(x)), y).item()
    assert after < 0.5 * before
    assert result.history[-1]["train/loss"] < result.history[0]["train/loss"]
    assert result.images_seen == 3 * 10 * 16


def test_training_is_deterministic_for_a_seed_and_keeps_the_best_epoch():
    _, a = _train(seed=5)
    _, b = _train(seed=5)
    assert a.history == b.history
    for key in a.last_state:
        assert torch.equal(a.last_state[key], b.last_state[key])
    val_acc = [h["val/accuracy"] for h in a.history]
    assert a.best_epoch == 1 + val_acc.index(max(val_acc))


@pytest.mark.parametrize("start", [True, False])
def test_module_mode_sets_every_submodule_and_restores_the_callers_mode_on_error(start):
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train(start)
    for training, context in [(True, module_mode(model, True)), (False, eval_mode(model))]:
        with pytest.raises(RuntimeError), context as inside:
            assert inside is model
            assert all(m.training == training for m in model.modules())
            raise RuntimeError("the block fails")
        assert all(m.training == start for m in model.modules())


def test_metrics_and_confusion_matrix():
    y_true = torch.tensor([0, 0, 1, 2])
    logits = F.one_hot(torch.tensor([0, 1, 1, 2]), 3).float()
    m = classification_metrics(logits, y_true)
    assert m["accuracy"] == 0.75
    assert m["class_0_accuracy"] == 0.5 and m["class_1_accuracy"] == 1.0
    matrix = confusion_matrix(y_true, logits.argmax(1), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


# The resume tests: dropout on, so torch's global RNG must be restored too.
RESUME_SETUP = {"epochs": 4, "steps": 5, "dropout": 0.3}


def _stop_after_epoch(epoch: int):
    def stop(stats):
        if stats["epoch"] == epoch:
            raise Interrupt

    return stop


def test_an_interrupted_run_resumes_to_the_same_result():
    _, reference = _train(seed=3, **RESUME_SETUP)

    saved = []
    with pytest.raises(Interrupt):
        _train(seed=3, **RESUME_SETUP, on_checkpoint=saved.append, on_epoch=_stop_after_epoch(2))
    assert [s["epoch"] for s in saved] == [1, 2]

    # Other seed on purpose: everything that matters must come from the checkpoint.
    _, resumed = _train(seed=99, **RESUME_SETUP, resume=saved[-1])
    assert resumed.history == reference.history
    assert resumed.best_epoch == reference.best_epoch
    for key, value in reference.last_state.items():
        assert torch.equal(resumed.last_state[key], value)
        assert torch.equal(resumed.best_state[key], reference.best_state[key])
    assert resumed.images_seen == 2 * 5 * 16  # the two epochs it ran itself


class NaNAfter(torch.nn.Module):
    """Wraps a model; its output turns NaN from the `n`-th forward pass in training."""

    def __init__(self, model: torch.nn.Module, n: int) -> None:
        super().__init__()
        self.model, self.n, self.calls = model, n, 0

    def forward(self, x):
        out = self.model(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.n:
                out = out * float("nan")
        return out


def test_a_nan_loss_stops_training_with_a_message_and_keeps_the_last_checkpoint():
    model = NaNAfter(build_model("baseline_cnn", channels=[8, 16], hidden=32), n=8)
    x, y = synthetic_digits()
    saved = []
    run = Run(CPU, torch.Generator().manual_seed(0), on_checkpoint=saved.append)
    with pytest.raises(TrainingDiverged, match="loss is nan at epoch 2, step 3"):
        train_supervised(model, x, y, Loop(4, 5, lr=0.003), 16, NO_AUGMENT, run)
    assert [s["epoch"] for s in saved] == [1]
    assert all(torch.isfinite(v).all() for v in saved[0]["model"].values())


def test_training_state_is_resumed_only_with_the_same_fingerprint(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    fingerprint = run_fingerprint({"lr": 0.1}, [torch.arange(5)])
    assert fingerprint == run_fingerprint({"lr": 0.1}, [torch.arange(5)])
    save_training_state(path, {"epoch": 3, "history": []}, fingerprint)
    assert load_training_state(path, fingerprint)["epoch"] == 3
    assert "resuming from" in capsys.readouterr().out

    for other in (
        run_fingerprint({"lr": 0.2}, [torch.arange(5)]),  # other params
        run_fingerprint({"lr": 0.1}, [torch.arange(6)]),  # other split
    ):
        assert load_training_state(path, other) is None
        assert "starting fresh" in capsys.readouterr().out
    assert load_training_state(tmp_path / "absent.pt", fingerprint) is None


def test_the_fingerprint_covers_the_project_code_without_being_told(tmp_path, monkeypatch):
    # The library and the stage scripts are hashed: an edit to either starts a run fresh.
    files = {Path(p).resolve() for p in checkpoint_lib.CODE_FILES}
    root = Path(checkpoint_lib.__file__).resolve().parents[1]
    for module in ("fewlabels/train.py", "fewlabels/methods/vat.py", "stages/train.py"):
        assert root / module in files
    code = tmp_path / "code.py"
    code.write_text("x = 1\n")
    monkeypatch.setattr(checkpoint_lib, "CODE_FILES", [code])
    before = run_fingerprint({"lr": 0.1}, [torch.arange(5)])
    code.write_text("x = 2\n")
    assert run_fingerprint({"lr": 0.1}, [torch.arange(5)]) != before


def test_results_table_puts_the_report_figure_beside_ours_for_the_same_setting():
    result = {
        "dataset": "mnist",
        "test_accuracy": 0.9502,
        "labels_used": 100,
        "n_val": 0,
        "n_test": 10000,
        "per_class_accuracy": {str(c): 0.9 for c in range(10)},
    }
    results = {
        "baseline": result,
        "other": {**result, "labels_used": 250},
        "fashion": {**result, "dataset": "fashion-mnist"},
    }
    reported = {"baseline": {("mnist", 100): ("SGAN report", 0.8273)},
                "other": {("mnist", 100): ("Some report", 0.5)},
                "fashion": {("mnist", 100): ("Some report", 0.5),
                            ("fashion-mnist", 100): ("VAE report", 0.6482)}}  # fmt: skip
    methods = {"baseline": "supervised CNN", "other": "x", "fashion": "y"}
    table = results_markdown(results, methods, reported)
    assert "| baseline | supervised CNN | mnist | 100 | 95.02% | 82.73% (SGAN report) |" in table
    assert "| other | x | mnist | 250 | 95.02% | - |" in table  # another label count: no figure
    # Each model beside the figure for its own dataset.
    assert "| fashion | y | fashion-mnist | 100 | 95.02% | 64.82% (VAE report) |" in table
    assert "| baseline | " + " | ".join(["90.0%"] * 10) + " |" in table


@pytest.mark.parametrize("name", list(ceilings.ARCHITECTURES))
def test_ceiling_architectures_give_ten_logits(name):
    arch, config = ceilings.ARCHITECTURES[name]
    model = build_model(arch, n_classes=10, **config)
    assert model(to_input(synthetic_digits(3)[0])).shape == (3, 10)
    built, parts = ceilings.build(name, n_classes=10)
    assert parts["model"].arch == arch and parts["model"].config == {"n_classes": 10, **config}
    assert built(to_input(synthetic_digits(3)[0])).shape == (3, 10)


def test_cosine_schedule_decays_to_zero_and_resumes_on_the_same_curve():
    saved = []
    _, reference = _train(seed=4, **RESUME_SETUP, lr_schedule="cosine", on_checkpoint=saved.append)
    total = RESUME_SETUP["epochs"] * RESUME_SETUP["steps"]
    for epoch, state in enumerate(saved, 1):
        done = epoch * RESUME_SETUP["steps"]
        # The checkpoint holds the schedule's place and the rate of the next step.
        assert state["scheduler"]["last_epoch"] == done
        lr = state["optimizer"]["param_groups"][0]["lr"]
        assert lr == 0.003 * 0.5 * (1 + math.cos(math.pi * (done / total)))
    assert saved[-1]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0, abs=1e-12)
    _, resumed = _train(seed=0, **RESUME_SETUP, lr_schedule="cosine", resume=saved[1])
    assert resumed.history == reference.history
    for key, value in reference.last_state.items():
        assert torch.equal(resumed.last_state[key], value)


# --- the shared loop's pieces ------------------------------------------------------------


@pytest.mark.parametrize("total", [7, 20, 4500])
def test_cosine_lr_factor_is_the_half_cosine_of_the_step_exactly(total):
    # pi * (k / total), the progress first, as the hand-written schedule it replaced
    # computed it (pi * k / total rounds differently for some steps).
    factor = lr_factor("cosine", total)
    for k in range(0, total + 1, max(1, total // 50)):
        assert factor(k) == 0.5 * (1 + math.cos(math.pi * (k / total)))
    assert factor(0) == 1.0 and factor(total) == 0.0
    assert all(lr_factor("constant", total)(k) == 1.0 for k in (0, 1, total))


def test_the_optimizer_steps_at_base_lr_times_the_cosine_factor_bit_for_bit():
    # What the loop's LambdaLR gives each parameter group: its own base rate times the
    # factor of the step, as the hand-written schedule it replaced set them.
    weights = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.Adam([{"params": weights[:1], "lr": 0.003},
                                  {"params": weights[1:], "lr": 0.0007}])  # fmt: skip
    total = 13
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor("cosine", total))
    for k in range(total + 1):
        for group, base in zip(optimizer.param_groups, (0.003, 0.0007), strict=True):
            assert group["lr"] == base * 0.5 * (1 + math.cos(math.pi * (k / total)))
        optimizer.step()
        scheduler.step()


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


@torch.no_grad()
def hand_written_ema(avg: dict[str, torch.Tensor], model: nn.Module, decay: float) -> None:
    """The loop's moving average before AveragedModel: every floating-point tensor of the
    state dict as `decay * avg + (1 - decay) * new`, integer buffers copied."""
    for key, new in model.state_dict().items():
        if avg[key].dtype.is_floating_point:
            avg[key].mul_(decay).add_(new, alpha=1 - decay)
        else:
            avg[key].copy_(new)


def test_moving_average_equals_the_hand_written_ema_bit_for_bit():
    torch.manual_seed(0)
    model = BatchNormNet()
    decay = 0.9
    ema = moving_average(model, decay)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(ema.module.state_dict()[k], v) for k, v in reference.items())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(5):
        loss = model(torch.randn(8, 1, 6, 6)).square().mean()  # moves the BN statistics
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update_parameters(model)
        hand_written_ema(reference, model, decay)
    averaged, current = ema.module.state_dict(), model.state_dict()
    assert averaged.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(averaged[key], value), key
    # The statistics were averaged, not copied; the batch counter was copied, as an integer.
    assert not torch.equal(averaged["bn.running_mean"], current["bn.running_mean"])
    assert not torch.equal(averaged["bn.running_var"], current["bn.running_var"])
    assert averaged["bn.num_batches_tracked"].dtype == torch.long
    assert averaged["bn.num_batches_tracked"].item() == 5
    # A copy, not a view: the average never writes into the trained weights.
    assert ema.module.conv.weight.data_ptr() != model.conv.weight.data_ptr()


def test_fit_steps_validates_and_returns_the_moving_average_and_resumes_it():
    def train(**hooks):
        torch.manual_seed(0)
        model = BatchNormNet()
        x = torch.randn(32, 1, 6, 6)
        y = torch.arange(32) % 4
        generator = torch.Generator().manual_seed(0)

        def draw():
            idx = torch.randint(32, (8,), generator=generator)
            return x[idx], y[idx]

        def loss(xb, yb):
            ce = F.cross_entropy(model(xb), yb)
            return ce, {"train/loss": ce.item()}

        loop = Loop(3, 4, lr=0.01, lr_schedule="cosine", ema_decay=0.8)
        result = fit_steps(model, Step(draw, loss, images=8), loop, Run(CPU, generator, **hooks))
        return model, result

    model, result = train()
    raw = model.state_dict()
    assert any(not torch.equal(result.last_state[k], v) for k, v in raw.items())
    assert result.last_state["bn.num_batches_tracked"] == raw["bn.num_batches_tracked"]
    saved = []
    with pytest.raises(Interrupt):
        train(on_checkpoint=saved.append, on_epoch=_stop_after_epoch(1))
    assert {"ema", "scheduler", "optimizer", "rng", "model"} <= saved[-1].keys()
    _, resumed = train(resume=saved[-1])
    assert resumed.history == result.history
    for key, value in result.last_state.items():
        assert torch.equal(resumed.last_state[key], value)


def test_loop_of_reads_the_shared_keys_and_run_with_hooks_keeps_the_rest():
    cfg = baseline_config(lr_schedule="cosine", weight_decay=0.01)
    assert loop_of(cfg, ema_decay=0.5) == Loop(3, 10, 0.003, "cosine", 0.01, ema_decay=0.5)
    run = Run(CPU, torch.Generator())
    hooked = run.with_hooks(on_epoch=print, resume={"epoch": 1})
    assert hooked.on_epoch is print and hooked.resume == {"epoch": 1}
    assert hooked.device == run.device and hooked.generator is run.generator
    assert run.on_epoch is None and run.resume is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lr": 0}, "train.baseline.lr must be a number > 0"),
        ({"lr_schedule": "linear"}, "train.baseline.lr_schedule must be one of constant, cosine"),
        ({"augment": {**AUGMENT, "elastic": 0}}, "missing key train.baseline.augment.elastic_"),
        ({"dropout_rate": 0.1}, "unknown key train.baseline.dropout_rate"),
    ],
)
def test_a_bad_baseline_section_is_refused_in_one_line_naming_the_key(change, message):
    with pytest.raises(PipelineError, match=message) as error:
        baseline_config(**change)
    assert "\n" not in str(error.value)
