"""The M1 VAE (fewlabels/models/vae.py), its trainer (fewlabels/methods/vae.py), and the SVM
fitted on its latent means (fewlabels/svm.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from fewlabels.checkpoint import load_model, save_checkpoint
from fewlabels.config import PipelineError, parse_config
from fewlabels.data import to_input
from fewlabels.methods import parse_method_config, vae
from fewlabels.methods.vae import kl_to_standard_normal, vae_loss, vae_step
from fewlabels.models import Network
from fewlabels.models.vae import VAE
from fewlabels.svm import cv_folds, encode_means, fit_rbf_svm, load_svm, save_svm
from fewlabels.train import Run, TrainingDiverged
from tests.conftest import synthetic_digits

TINY = {"latent": 3, "hidden": [32, 16]}
RUN_HOOKS = ("on_epoch", "on_checkpoint", "resume")


class Interrupt(Exception):
    pass


def vae_config(**overrides) -> vae.Config:
    """A tiny vae_svm section, checked like the stages check params.yaml's."""
    section = {
        "dataset": "mnist", "budgets": [100], **TINY, "epochs": 3, "batch_size": 16,
        "lr": 0.003, "lr_schedule": "constant", "kl_weight": 1.0, "kl_warmup_epochs": 0,
        "pool_size": 0, "standardize": False, "svm_c": [1, 10], "svm_gamma": [1],
        "cv_folds": 5, **overrides,
    }  # fmt: skip
    return parse_config(vae.Config, section, "vae_svm")


def _train(seed: int, model: VAE | None = None, **kw):
    """Train a tiny VAE on 40 synthetic digits; the hooks and `resume` go to the `Run`,
    every other keyword to the config."""
    torch.manual_seed(seed)
    hooks = {k: kw.pop(k) for k in RUN_HOOKS if k in kw}
    cfg = vae_config(**kw)
    model = model if model is not None else vae.build(cfg, n_classes=10)[0]
    run = Run(torch.device("cpu"), torch.Generator().manual_seed(seed), **hooks)
    result = vae.train(model, synthetic_digits()[0], cfg, run)
    return model, result


def test_vae_shapes_and_every_parameter_gets_a_gradient():
    model = VAE(**TINY)
    x = to_input(synthetic_digits(6)[0])
    logits, mean, logvar = model(x)
    assert logits.shape == x.shape and mean.shape == logvar.shape == (6, 3)
    vae_loss(logits, x, mean, logvar)[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert encode_means(model, synthetic_digits(6)[0], 4, torch.device("cpu")).shape == (6, 3)


def test_latent_means_are_the_encoder_means_whatever_the_batch_size():
    model = VAE(**TINY)
    images = synthetic_digits(10)[0]
    expected = model.encode(to_input(images))[0]
    assert torch.allclose(encode_means(model, images, 3, torch.device("cpu")), expected)


def test_kl_term_matches_the_closed_form_and_torch_distributions():
    mean = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    logvar = torch.tensor([[0.0, 0.0], [math.log(4.0), 0.0]])
    kl = kl_to_standard_normal(mean, logvar)
    assert kl[0] == 0  # the prior itself
    # 0.5 * (mu^2 + var - 1 - log var), summed over dimensions.
    assert kl[1].item() == pytest.approx(0.5 * (1 + 4 - 1 - math.log(4)) + 0.5 * (4 + 1 - 1))
    reference = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1)
    assert torch.allclose(kl, reference)


def test_kl_weight_scales_only_the_kl_part_of_the_loss():
    x = torch.full((2, 1, 2, 2), 0.5)
    logits, mean, logvar = torch.zeros(2, 1, 2, 2), torch.ones(2, 3), torch.zeros(2, 3)
    full, bce, kl = vae_loss(logits, x, mean, logvar)
    half, _, _ = vae_loss(logits, x, mean, logvar, kl_weight=0.5)
    assert bce.item() == pytest.approx(4 * math.log(2))  # BCE(0.5, 0.5) = log 2 per pixel
    assert kl.item() == pytest.approx(1.5)
    assert half.item() == pytest.approx(bce.item() + 0.75) and full.item() == pytest.approx(
        bce.item() + 1.5
    )


def test_training_lowers_the_loss_and_warms_the_kl_weight_up():
    _, result = _train(seed=0, epochs=6, kl_warmup_epochs=2)
    losses = [h["train/loss"] for h in result.history]
    assert losses[-1] < losses[0]
    weights = [h["train/kl_weight"] for h in result.history]
    assert 0 < weights[0] < weights[1] < 1 and weights[2:] == [1.0] * 4


def test_the_kl_weight_caps_the_warm_up_and_weights_the_kl_in_the_loss():
    _, result = _train(seed=0, epochs=4, kl_warmup_epochs=2, kl_weight=0.25)
    weights = [h["train/kl_weight"] for h in result.history]
    assert 0 < weights[0] < weights[1] < 0.25 and weights[2:] == [0.25] * 2
    last = result.history[-1]
    assert last["train/loss"] == pytest.approx(last["train/bce"] + 0.25 * last["train/kl"])


def test_a_lower_kl_weight_keeps_more_information_in_the_code():
    # beta < 1 trades KL for reconstruction: the same run with beta 0.1 ends with a lower
    # BCE and a larger KL (more information about each image in its latent code).
    _, elbo = _train(seed=0, epochs=6)
    _, beta = _train(seed=0, epochs=6, kl_weight=0.1)
    assert beta.history[-1]["train/bce"] < elbo.history[-1]["train/bce"]
    assert beta.history[-1]["train/kl"] > elbo.history[-1]["train/kl"]


def test_training_is_deterministic_for_a_seed():
    _, a = _train(seed=5)
    _, b = _train(seed=5)
    _, c = _train(seed=6)
    assert a.history == b.history and a.history != c.history
    for key in a.last_state:
        assert torch.equal(a.last_state[key], b.last_state[key])


# The KL warm-up and the cosine learning rate are functions of the step: a resumed run
# must pick both curves up where it stopped.
@pytest.mark.parametrize("curves", [{}, {"kl_warmup_epochs": 3, "lr_schedule": "cosine"}])
def test_an_interrupted_run_resumes_to_the_same_result(curves):
    _, reference = _train(seed=3, epochs=4, **curves)
    saved = []

    def stop_after_epoch_2(stats):
        if stats["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        _train(seed=3, epochs=4, **curves, on_checkpoint=saved.append, on_epoch=stop_after_epoch_2)
    assert saved[-1]["scheduler"]["last_epoch"] == 2 * 3  # 40 images, batches of 16
    # Other seed on purpose: everything that matters must come from the checkpoint.
    _, resumed = _train(seed=99, epochs=4, **curves, resume=saved[-1])
    assert resumed.history == reference.history
    for key, value in reference.last_state.items():
        assert torch.equal(resumed.last_state[key], value)


class NaNAfterVAE(VAE):
    """Its decoder output turns NaN from the `n`-th call on."""

    def __init__(self, n: int) -> None:
        super().__init__(**TINY)
        self.n, self.calls = n, 0

    def decode(self, z):
        self.calls += 1
        out = super().decode(z)
        return out * float("nan") if self.calls >= self.n else out


def test_a_nan_loss_stops_training_with_a_message_and_keeps_the_last_checkpoint():
    saved = []
    # 40 images in batches of 16: 3 steps an epoch, so call 5 is epoch 2, step 2.
    with pytest.raises(TrainingDiverged, match="loss is nan at epoch 2, step 2"):
        _train(seed=0, model=NaNAfterVAE(n=5), on_checkpoint=saved.append)
    assert [s["epoch"] for s in saved] == [1]
    assert all(torch.isfinite(v).all() for v in saved[0]["model"].values())


def test_a_saved_vae_loads_back_through_load_model(tmp_path):
    model, parts = vae.build(vae_config(), n_classes=10)
    assert parts["model"] == Network(model, "vae", TINY)
    save_checkpoint(tmp_path / "model.pt", parts["model"], {"dataset": "mnist"})
    loaded, meta = load_model(tmp_path / "model.pt", "train_vae")
    assert meta == {"dataset": "mnist"}
    x = synthetic_digits(4)[0]
    cpu = torch.device("cpu")
    assert torch.equal(encode_means(loaded, x, 4, cpu), encode_means(model, x, 4, cpu))


def test_a_step_takes_the_next_batch_of_one_random_pass_per_epoch():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1).expand(40, 28, 28).contiguous()
    model = VAE(**TINY)
    step = vae_step(model, images, vae_config(), Run(torch.device("cpu"), torch.Generator()), 0)
    epoch = [step.draw() for _ in range(3)]
    assert [len(xb) for xb, _ in epoch] == [16, 16, 8]  # the last batch shorter
    assert all(noise.shape == (len(xb), 3) for xb, noise in epoch)
    seen = torch.cat([xb[:, 0, 0, 0] for xb, _ in epoch]) * 255
    assert sorted(seen.round().long().tolist()) == list(range(40))  # every image once
    assert step.images == 16


def test_the_config_says_which_keys_shape_the_vae():
    cfg = vae_config(budgets=[100, 600], kl_weight=0.05)
    assert cfg.training() == {
        "latent": 3, "hidden": [32, 16], "epochs": 3, "batch_size": 16, "lr": 0.003,
        "lr_schedule": "constant", "kl_weight": 0.05, "kl_warmup_epochs": 0,
    }  # fmt: skip
    section = {**TINY, **{k: v for k, v in vars(cfg).items() if k not in TINY}}
    assert parse_method_config("vae", {"train": {}, "vae_svm": section}) == cfg


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kl_weight": 0}, "vae_svm.kl_weight must be a number > 0"),
        ({"budgets": [100, 100]}, "vae_svm.budgets must be a list without repeated items"),
        ({"cv_folds": 1}, "vae_svm.cv_folds must be an integer >= 2"),
        ({"dataset": "cifar"}, "vae_svm.dataset must be one of mnist, fashion-mnist"),
        ({"beta": 0.1}, "unknown key vae_svm.beta"),
    ],
)
def test_a_bad_vae_section_is_refused_in_one_line_naming_the_key(change, message):
    with pytest.raises(PipelineError, match=message) as error:
        vae_config(**change)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("per_class", "max_folds", "expected"),
    [
        ([10] * 10, 5, 5),  # 100 labels: 5 folds
        ([3] * 10, 5, 3),  # every fold needs one image of every class
        ([4, 2, 4], 5, 2),  # the rarest class decides
        ([1] * 10, 5, 0),  # one image a class: no cross-validation at all
        ([300] * 10, 3, 3),
    ],
)
def test_cv_folds_never_exceed_the_rarest_class(per_class, max_folds, expected):
    labels = np.repeat(np.arange(len(per_class)), per_class)
    assert cv_folds(labels, max_folds) == expected


def _blobs(per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well separated Gaussian blobs in 4-D."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), per_class)
    return rng.normal(size=(len(y), 4)) * 0.3 + 3 * np.eye(4)[y], y


@pytest.mark.parametrize("standardize", [True, False])
def test_svm_picks_c_and_gamma_by_cv_on_the_labeled_set_and_separates_blobs(standardize):
    x, y = _blobs(per_class=6)
    svm, chosen = fit_rbf_svm(
        x, y, c_grid=[0.1, 10], gamma_grid=[0.5, 2], standardize=standardize, max_folds=5, seed=0
    )
    assert chosen["cv_folds"] == 5 and chosen["C"] in (0.1, 10)
    assert chosen["gamma_multiple"] in (0.5, 2) and 0 <= chosen["cv_accuracy"] <= 1
    x_new, y_new = _blobs(per_class=20, seed=1)
    assert (svm.predict(x_new) == y_new).mean() > 0.95
    # One-vs-rest decision values: one score per class, the argmax is the prediction.
    scores = svm.decision_function(x_new)
    assert scores.shape == (60, 3) and (scores.argmax(1) == svm.predict(x_new)).all()


def test_svm_with_one_label_a_class_fits_the_first_grid_point():
    x, y = _blobs(per_class=1)
    _, chosen = fit_rbf_svm(
        x, y, c_grid=[10, 100], gamma_grid=[1, 2], standardize=False, max_folds=5, seed=0
    )
    assert chosen == {"C": 10, "gamma_multiple": 1, "cv_folds": 0}


def test_svm_round_trips_and_a_missing_one_names_its_stage(tmp_path):
    x, y = _blobs(per_class=4)
    svm, _ = fit_rbf_svm(x, y, c_grid=[1], gamma_grid=[1], standardize=True, max_folds=2, seed=0)
    save_svm(tmp_path / "model.pkl", svm, {"dataset": "fashion-mnist"})
    loaded, meta = load_svm(tmp_path / "model.pkl", "vae_svm@100")
    assert meta == {"dataset": "fashion-mnist"}
    assert np.array_equal(loaded.decision_function(x), svm.decision_function(x))
    with pytest.raises(PipelineError, match=r"run `dvc repro vae_svm@100` first"):
        load_svm(tmp_path / "absent.pkl", "vae_svm@100")
