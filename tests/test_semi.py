"""The consistency method's losses, augmentation and training loop
(fewlabels/methods/consistency.py, fewlabels/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch

from fewlabels.config import PipelineError, parse_config
from fewlabels.data import to_input
from fewlabels.losses import (
    PseudoLabelLoss,
    entropy_loss,
    flexmatch_thresholds,
    pseudo_label_loss,
)
from fewlabels.methods import consistency
from fewlabels.methods.consistency import class_centroids, cluster_loss, consistency_loss
from fewlabels.models import build_model
from fewlabels.train import Run, SplitData, TrainingDiverged
from tests.conftest import AUGMENT, synthetic_digits


def test_waterloo_cnn_has_576_features_and_ten_logits():
    model = build_model("waterloo_cnn")
    x = to_input(synthetic_digits(3)[0])
    assert model.features(x).shape == (3, 576)
    assert model(x).shape == (3, 10)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_waterloo_cnn_pooling_before_relu_computes_the_reports_relu_then_pool(batch_norm):
    # The blocks pool before the ReLU (cheaper); values and gradients must be those of the
    # report's conv -> ReLU -> max-pool, bit for bit (saved models and runs stay the same).
    model = build_model("waterloo_cnn", channels=[4, 8, 8], hidden=16, batch_norm=batch_norm)
    layers = list(model.features)
    pools = [i for i, layer in enumerate(layers) if isinstance(layer, torch.nn.MaxPool2d)]
    assert len(pools) == 2 and all(isinstance(layers[i + 1], torch.nn.ReLU) for i in pools)
    for i in pools:
        layers[i], layers[i + 1] = layers[i + 1], layers[i]
    reports_order = torch.nn.Sequential(*layers)
    x = to_input(synthetic_digits(16)[0])
    outputs, grads = [], []
    for features in (model.features, reports_order):
        model.zero_grad()
        out = model.classifier(features(x))
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert torch.equal(*outputs)
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_cluster_loss_is_the_mean_distance_to_the_nearest_centroid():
    centroids = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    features = torch.tensor([[3.0, 4.0], [10.0, 1.0]], requires_grad=True)
    loss = cluster_loss(features, centroids)
    assert loss.item() == pytest.approx((5.0 + 1.0) / 2)
    loss.backward()
    # The gradient pulls each point straight towards its own centroid.
    assert torch.allclose(features.grad, torch.tensor([[0.3, 0.4], [0.0, 0.5]]))


def test_consistency_loss_is_zero_for_equal_predictions_and_pulls_both_views():
    logits = torch.randn(4, 10)
    assert consistency_loss(logits, logits.clone()).item() == 0.0
    a = torch.randn(4, 10, requires_grad=True)
    b = torch.randn(4, 10, requires_grad=True)
    consistency_loss(a, b).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_entropy_loss_is_the_entropy_and_descending_it_sharpens_predictions():
    assert entropy_loss(torch.zeros(2, 10)).item() == pytest.approx(math.log(10))
    assert entropy_loss(torch.tensor([[50.0, 0.0, 0.0]])).item() == pytest.approx(0, abs=1e-6)
    # The sign the report got wrong: a gradient step must make predictions more confident.
    logits = torch.tensor([[1.0, 0.5, 0.0]], requires_grad=True)
    entropy_loss(logits).backward()
    stepped = logits - 0.5 * logits.grad
    assert stepped.softmax(1).max() > logits.softmax(1).max()


def test_pseudo_label_loss_uses_only_confident_weak_predictions_as_fixed_targets():
    weak = torch.tensor([[10.0, 0.0], [0.1, 0.0]], requires_grad=True)  # confident, unsure
    strong = torch.tensor([[0.0, 0.0], [0.0, 5.0]], requires_grad=True)
    loss, confident = pseudo_label_loss(weak, strong, threshold=0.95)
    assert confident.item() == 0.5
    # Only the first image counts: CE of uniform logits against class 0, over a batch of 2.
    assert loss.item() == pytest.approx(math.log(2) / 2)
    loss.backward()
    assert weak.grad is None or weak.grad.abs().sum() == 0
    assert strong.grad[1].abs().sum() == 0 and strong.grad[0].abs().sum() > 0


def test_pseudo_label_loss_takes_one_threshold_per_image():
    weak = torch.tensor([[2.0, 0.0], [2.0, 0.0]])  # both 88% sure of class 0
    strong = torch.zeros(2, 2)
    _, confident = pseudo_label_loss(weak, strong, threshold=torch.tensor([0.95, 0.5]))
    assert confident.item() == 0.5


def test_flexmatch_thresholds_lower_the_bar_for_classes_rarely_predicted_confidently():
    # Six images confidently class 0, two class 1, none class 2, two never confident.
    confident_class = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, -1, -1])
    bars = flexmatch_thresholds(0.9, confident_class, torch.tensor([0, 1, 2]), n_classes=3)
    # Learning effects 6/6, 2/6, 0/6, mapped through x / (2 - x): 1, 0.2, 0.
    assert bars.tolist() == pytest.approx([0.9, 0.18, 0.0])
    # Warm-up: while most images were never confident, every class's bar stays low.
    early = torch.tensor([0, 1, -1, -1, -1, -1, -1, -1, -1, -1])
    assert flexmatch_thresholds(0.9, early, torch.tensor([0, 1]), n_classes=3).max() < 0.1


def test_fixmatch_pseudo_label_loss_keeps_no_memory():
    loss = PseudoLabelLoss(0.95, adaptive=False, n_unlabeled=10, device=torch.device("cpu"))
    assert loss.state == {}
    weak = torch.tensor([[10.0, 0.0], [0.1, 0.0]])
    strong = torch.tensor([[0.0, 0.0], [0.0, 5.0]])
    value, confident = loss(weak, strong, torch.tensor([3, 4]))
    expected, expected_confident = pseudo_label_loss(weak, strong, 0.95)
    assert value == expected and confident == expected_confident


def test_flexmatch_pseudo_label_loss_remembers_confident_images_and_lowers_slow_bars():
    loss = PseudoLabelLoss(0.95, adaptive=True, n_unlabeled=6, device=torch.device("cpu"))
    memory = loss.state["confident_class"]
    assert memory.tolist() == [-1] * 6
    # Images 0, 1 and 2 confidently class 0; image 5 drawn twice, unsure both times.
    weak = torch.tensor([[9.0, 0.0], [9.0, 0.0], [9.0, 0.0], [0.0, 0.5], [0.0, 0.5]])
    strong = torch.zeros(5, 2)
    _, confident = loss(weak, strong, torch.tensor([0, 1, 2, 5, 5]))
    assert memory.tolist() == [0, 0, 0, -1, -1, -1]
    assert confident.item() == 1.0  # nothing was confident before: every bar was 0
    # Now class 1 has no confident image: its bar is 0, so a 62%-sure class-1 image counts;
    # class 0's bar is 0.95 * 1 (3 of 3), so a 62%-sure class-0 image does not.
    _, confident = loss(
        torch.tensor([[0.5, 0.0], [0.0, 0.5]]), torch.zeros(2, 2), torch.tensor([3, 4])
    )
    assert confident.item() == 0.5


def test_class_centroids_are_per_class_feature_means():
    model = build_model("waterloo_cnn", channels=[4, 8, 8], hidden=16)
    x, y = synthetic_digits(20)
    centroids = class_centroids(model, x, y, n_classes=10, batch_size=7)
    feats = model.features(to_input(x))
    assert centroids.shape == (10, feats.shape[1])
    assert torch.allclose(centroids[3], feats[y == 3].mean(0), atol=1e-6)


WEIGHTS = {"cluster": 0.1, "consistency": 0.5, "entropy": 0.05, "pseudo_label": 1.0}
RUN_HOOKS = ("on_epoch", "on_checkpoint", "resume")


def consistency_config(**overrides) -> consistency.Config:
    """A tiny train.consistency section, checked like the stage checks params.yaml's."""
    section = {
        "epochs": 3, "steps_per_epoch": 6, "batch_size": 8, "lr": 0.003,
        "lr_schedule": "cosine", "weight_decay": 0.0, "unlabeled_ratio": 2,
        "channels": [8, 16, 16], "hidden": 32, "batch_norm": False, "weights": WEIGHTS,
        "threshold": 0.5, "adaptive_threshold": False, "ema_decay": 0.9, "teacher": "student",
        "weak_augment": AUGMENT, "strong_augment": AUGMENT, "cutout": 6, "labeled_thicken": 0.0,
        **overrides,
    }  # fmt: skip
    return parse_config(consistency.Config, section, "train.consistency")


def _data() -> SplitData:
    x, y = synthetic_digits(20)
    return SplitData(x, y, synthetic_digits(60, seed=2)[0])


def _train(seed: int = 0, *, model=None, **kw):
    """consistency.train on synthetic digits; the hooks and `resume` go to the `Run`, every
    other keyword to the config."""
    torch.manual_seed(seed)
    hooks = {k: kw.pop(k) for k in RUN_HOOKS if k in kw}
    cfg = consistency_config(**kw)
    model = model or consistency.build(cfg, n_classes=10)[0]
    x_val, y_val = synthetic_digits(20, seed=1)
    run = Run(torch.device("cpu"), torch.Generator().manual_seed(seed), x_val, y_val, **hooks)
    result = consistency.train(model, _data(), cfg, run)
    return model, result


def test_build_gives_the_configs_waterloo_cnn_as_the_saved_model():
    cfg = consistency_config(batch_norm=True)
    model, parts = consistency.build(cfg, n_classes=10)
    assert parts["model"].module is model and parts["model"].arch == "waterloo_cnn"
    assert parts["model"].config == {"n_classes": 10, "channels": [8, 16, 16], "hidden": 32,
                                     "batch_norm": True}  # fmt: skip
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model(to_input(synthetic_digits(3)[0])).shape == (3, 10)


def test_training_lowers_the_supervised_loss_and_logs_every_active_loss():
    _, result = _train(epochs=4)
    first, last = result.history[0], result.history[-1]
    assert last["train/ce"] < first["train/ce"]
    for name in ("cluster", "consistency", "entropy", "pseudo_label", "confident_fraction"):
        assert f"train/{name}" in last
    # 8 labeled + 2 x 16 unlabeled views per step.
    assert result.images_seen == 4 * 6 * (8 + 2 * 16)


def test_a_zero_weight_switches_its_loss_off():
    off = {**WEIGHTS, "cluster": 0.0, "entropy": 0.0}
    _, result = _train(weights=off, epochs=1)
    assert "train/cluster" not in result.history[0] and "train/entropy" not in result.history[0]
    assert "train/consistency" in result.history[0]


def test_ema_weights_are_what_is_returned_and_differ_from_the_trained_ones():
    model, result = _train(epochs=2)
    trained = model.state_dict()
    assert any(not torch.equal(result.last_state[k], trained[k]) for k in trained)
    model, plain = _train(epochs=2, ema_decay=0.0)
    assert all(torch.equal(plain.last_state[k], v) for k, v in model.state_dict().items())


class Interrupt(Exception):
    pass


def _stop_after_epoch_1(stats):
    if stats["epoch"] == 1:
        raise Interrupt


FIXMATCH_ONLY = {**WEIGHTS, "cluster": 0, "consistency": 0, "entropy": 0}


# A mean teacher of decay 0.5: its average moves fast enough for confident pseudo-labels
# after the first epoch (where the resumed runs start).
MEAN_TEACHER = {"teacher": "ema", "ema_decay": 0.5}


@pytest.mark.parametrize(
    ("weights", "options"),
    [
        (WEIGHTS, {}),
        (FIXMATCH_ONLY, {}),
        (FIXMATCH_ONLY, {"adaptive_threshold": True}),
        (FIXMATCH_ONLY, MEAN_TEACHER),  # the teacher's average must come back too
    ],
)
def test_training_is_deterministic_and_resumes_exactly(weights, options):
    # A low threshold, so that some images are confident after the first epoch.
    kw = {"weights": weights, "threshold": 0.12, **options}
    _, reference = _train(seed=1, **kw)
    if weights is FIXMATCH_ONLY:  # the pseudo-labels are what a resumed run must restore
        assert any(h["train/confident_fraction"] > 0 for h in reference.history[1:])
    _, again = _train(seed=1, **kw)
    assert again.history == reference.history
    saved = []

    with pytest.raises(Interrupt):
        _train(seed=1, **kw, on_checkpoint=saved.append, on_epoch=_stop_after_epoch_1)
    assert "ema" in saved[-1] and "scheduler" in saved[-1]
    _, resumed = _train(seed=7, **kw, resume=saved[-1])
    assert resumed.history == reference.history
    for key, value in reference.last_state.items():
        assert torch.equal(resumed.last_state[key], value)
        assert torch.equal(again.last_state[key], value)


def test_a_mean_teacher_gives_other_pseudo_labels_than_the_student():
    kw = {"weights": FIXMATCH_ONLY, "threshold": 0.12, "ema_decay": 0.5}
    _, student = _train(seed=1, **kw)
    _, teacher = _train(seed=1, **kw, teacher="ema")
    assert student.history[0]["train/ce"] == teacher.history[0]["train/ce"]  # same first step
    confident = [[h["train/confident_fraction"] for h in r.history] for r in (student, teacher)]
    assert confident[0] != confident[1]


def test_flexmatch_memory_is_part_of_the_training_state():
    kw = {"weights": FIXMATCH_ONLY, "adaptive_threshold": True, "threshold": 0.12}
    _, reference = _train(seed=1, **kw)
    saved = []
    with pytest.raises(Interrupt):
        _train(seed=1, **kw, on_checkpoint=saved.append, on_epoch=_stop_after_epoch_1)
    memory = saved[-1]["step_state"]["confident_class"]
    assert (memory >= 0).any() and (memory == -1).any() and len(memory) == 60
    _, resumed = _train(seed=7, **kw, resume=saved[-1])
    assert resumed.history == reference.history
    # Without it the thresholds differ, and so does the run.
    forgotten = {**saved[-1], "step_state": {"confident_class": torch.full_like(memory, -1)}}
    _, wrong = _train(seed=7, **kw, resume=forgotten)
    assert wrong.history != reference.history


def test_adaptive_thresholds_admit_more_pseudo_labels_early_on():
    _, fixed = _train(weights=FIXMATCH_ONLY, epochs=1)
    _, adaptive = _train(weights=FIXMATCH_ONLY, epochs=1, adaptive_threshold=True)
    assert (
        adaptive.history[0]["train/confident_fraction"]
        > fixed.history[0]["train/confident_fraction"]
    )


def test_a_nan_loss_stops_training_with_a_message():
    model = build_model("waterloo_cnn", channels=[8, 16, 16], hidden=32)
    with torch.no_grad():
        model.classifier[-1].bias.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="loss is nan at epoch 1, step 1"):
        _train(model=model, epochs=1)


def test_no_augmentation_and_no_cutout_leave_the_weak_and_strong_views_equal():
    # With identical views the consistency loss is exactly zero throughout.
    torch.manual_seed(0)
    off = {"rotate_deg": 0, "translate": 0, "scale": 0}
    cfg = consistency_config(
        epochs=1, steps_per_epoch=3, batch_size=4, lr=0.001, lr_schedule="constant",
        weights={"cluster": 0, "consistency": 1.0, "entropy": 0, "pseudo_label": 0},
        threshold=0.95, weak_augment=off, strong_augment=off, cutout=0, ema_decay=0.0,
    )  # fmt: skip
    model, _ = consistency.build(cfg, n_classes=10)
    x, y = synthetic_digits(20)
    data = SplitData(x, y, synthetic_digits(40, seed=3)[0])
    result = consistency.train(model, data, cfg, Run(torch.device("cpu"), torch.Generator()))
    assert result.history[0]["train/consistency"] == 0.0


def test_a_step_draws_labeled_and_two_views_of_the_unlabeled_images():
    cfg = consistency_config(labeled_thicken=0.5)
    model, _ = consistency.build(cfg, n_classes=10)
    step = consistency.train_step(model, _data(), cfg, Run(torch.device("cpu"), torch.Generator()))
    x_l, y_l, x_weak, x_strong, uidx = step.draw()
    assert x_l.shape == (8, 1, 28, 28) and y_l.shape == (8,)
    assert x_weak.shape == x_strong.shape == (16, 1, 28, 28) and uidx.max() < 60
    assert step.images == 8 + 2 * 16 and step.state == {}  # FixMatch keeps no memory


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"teacher": "ema", "ema_decay": 0.0},
            "train.consistency.teacher is ema but ema_decay is 0",
        ),
        ({"threshold": 1.5}, "train.consistency.threshold must be a number >= 0 and <= 1"),
        ({"channels": [8, 16]}, "train.consistency.channels must be a list of at least 3"),
        ({"weights": {"cluster": 0}}, "missing key train.consistency.weights.consistency"),
        ({"strong_augment": {**AUGMENT, "elastic": 3}}, "unknown key train.consistency.strong_"),
    ],
)
def test_a_bad_consistency_section_is_refused_in_one_line_naming_the_key(change, message):
    with pytest.raises(PipelineError, match=message) as error:
        consistency_config(**change)
    assert "\n" not in str(error.value)
