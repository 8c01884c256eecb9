"""Augmentation, the baseline network, the supervised trainer and the metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from stages.lib.config import CEILINGS
from stages.lib.data import (
    NO_AUGMENT,
    elastic_displacement,
    random_affine,
    random_cutout,
    random_thicken,
    to_input,
)
from stages.lib.evaluation import (
    classification_metrics,
    confusion_matrix,
    eval_mode,
    module_mode,
    results_markdown,
)
from stages.lib.io import load_training_state, run_fingerprint, save_training_state
from stages.lib.nets import build_model
from stages.lib.train import TrainingDiverged, train_classifier
from torch import nn

from tests.conftest import AUGMENT, synthetic_digits


def test_to_input_scales_and_adds_channel():
    x = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    out = to_input(x)
    assert out.shape == (1, 1, 1, 2) and out.dtype == torch.float32
    assert out.min() == 0 and out.max() == 1


def test_random_affine_keeps_shape_and_varies_per_image():
    x = to_input(synthetic_digits(8)[0][:1].repeat(8, 1, 1))  # 8 copies of one image
    out = random_affine(x, **AUGMENT, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    # Every copy got its own transform: no two outputs are equal.
    flat = out.flatten(1)
    assert torch.cdist(flat, flat).fill_diagonal_(1.0).min() > 1e-3


def test_random_affine_is_identity_at_zero_strength_and_seeded():
    x = to_input(synthetic_digits(4)[0])
    assert torch.equal(random_affine(x, **NO_AUGMENT), x)
    a = random_affine(x, **AUGMENT, generator=torch.Generator().manual_seed(1))
    b = random_affine(x, **AUGMENT, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_elastic_distortion_is_off_by_default_and_draws_nothing_then():
    # Off (elastic 0) must leave the random stream and so every earlier result unchanged.
    x = to_input(synthetic_digits(4)[0])
    g_plain, g_off = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    plain = random_affine(x, **AUGMENT, generator=g_plain)
    off = random_affine(x, **AUGMENT, generator=g_off, elastic=0.0)
    assert torch.equal(plain, off)
    assert torch.equal(g_plain.get_state(), g_off.get_state())


def test_elastic_distortion_alone_moves_strokes_smoothly_and_is_seeded():
    x = to_input(synthetic_digits(8)[0])
    a = random_affine(x, **NO_AUGMENT, generator=torch.Generator().manual_seed(3), elastic=34)
    b = random_affine(x, **NO_AUGMENT, generator=torch.Generator().manual_seed(3), elastic=34)
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


def _train(seed: int, *, epochs: int = 3, steps: int = 10, dropout: float = 0.0, **kwargs):
    """Train a small baseline CNN on synthetic digits; kwargs go to train_classifier."""
    torch.manual_seed(seed)
    model = build_model("baseline_cnn", n_classes=10, channels=[8, 16], hidden=32, dropout=dropout)
    x, y = synthetic_digits()
    x_val, y_val = synthetic_digits(20, seed=1)
    result = train_classifier(
        model, x, y,
        epochs=epochs, steps_per_epoch=steps, batch_size=16, lr=0.003, weight_decay=0.0,
        augment=AUGMENT, device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(seed), x_val=x_val, y_val=y_val, **kwargs,
    )  # fmt: skip
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


class Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_result():
    _, reference = _train(seed=3, **RESUME_SETUP)

    saved = []

    def stop_after_epoch_2(stats):
        if stats["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        _train(seed=3, **RESUME_SETUP, on_checkpoint=saved.append, on_epoch=stop_after_epoch_2)
    assert [s["epoch"] for s in saved] == [1, 2]

    # Other seed on purpose: everything that matters must come from the checkpoint.
    _, resumed = _train(seed=99, **RESUME_SETUP, resume=saved[-1])
    assert resumed.history == reference.history
    assert resumed.best_epoch == reference.best_epoch
    for key, value in reference.last_state.items():
        assert torch.equal(resumed.last_state[key], value)
        assert torch.equal(resumed.best_state[key], reference.best_state[key])


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
    with pytest.raises(TrainingDiverged, match="loss is nan at epoch 2, step 3"):
        train_classifier(
            model, x, y,
            epochs=4, steps_per_epoch=5, batch_size=16, lr=0.003, weight_decay=0.0,
            augment=NO_AUGMENT, device=torch.device("cpu"),
            generator=torch.Generator().manual_seed(0), on_checkpoint=saved.append,
        )  # fmt: skip
    assert [s["epoch"] for s in saved] == [1]
    assert all(torch.isfinite(v).all() for v in saved[0]["model"].values())


def test_training_state_is_resumed_only_with_the_same_fingerprint(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    code = [Path(__file__)]
    fingerprint = run_fingerprint({"lr": 0.1}, [torch.arange(5)], code)
    assert fingerprint == run_fingerprint({"lr": 0.1}, [torch.arange(5)], code)
    save_training_state(path, {"epoch": 3, "history": []}, fingerprint)
    assert load_training_state(path, fingerprint)["epoch"] == 3
    assert "resuming from" in capsys.readouterr().out

    for other in (
        run_fingerprint({"lr": 0.2}, [torch.arange(5)], code),  # other params
        run_fingerprint({"lr": 0.1}, [torch.arange(6)], code),  # other split
    ):
        assert load_training_state(path, other) is None
        assert "starting fresh" in capsys.readouterr().out
    assert load_training_state(tmp_path / "absent.pt", fingerprint) is None


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


@pytest.mark.parametrize("name", list(CEILINGS))
def test_ceiling_architectures_give_ten_logits(name):
    arch, config = CEILINGS[name]
    model = build_model(arch, n_classes=10, **config)
    assert model(to_input(synthetic_digits(3)[0])).shape == (3, 10)


def test_cosine_schedule_decays_to_zero_and_resumes_on_the_same_curve():
    saved = []
    _, reference = _train(seed=4, **RESUME_SETUP, lr_schedule="cosine", on_checkpoint=saved.append)
    optimizer_lr = saved[-1]["optimizer"]["param_groups"][0]["lr"]
    assert 0 < optimizer_lr < 0.003 * 0.05  # last step of 20: almost fully decayed
    _, resumed = _train(seed=0, **RESUME_SETUP, lr_schedule="cosine", resume=saved[1])
    assert resumed.history == reference.history
