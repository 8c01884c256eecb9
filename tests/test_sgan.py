"""The semi-supervised GAN: architectures (fewlabels/models/sgan.py), losses and its trainer
(fewlabels/methods/sgan.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from fewlabels.config import PipelineError, parse_config
from fewlabels.data import to_input
from fewlabels.evaluation import classify_samples
from fewlabels.methods import sgan
from fewlabels.methods.sgan import (
    GeneratorCollapsed,
    data_dependent_init,
    feature_matching_loss,
    frozen,
    image_grid,
    real_logit,
    supervised_loss,
    unsupervised_loss,
)
from fewlabels.models import build_model
from fewlabels.models.sgan import GaussianNoise, MLPDiscriminator, SemiSupervisedGAN, sample_z
from fewlabels.pseudo import embedding_network
from fewlabels.train import Run, SplitData, TrainingDiverged, moving_average
from tests.conftest import AUGMENT, synthetic_digits

SMALL = {
    "conv": ({"channels": [4, 8], "hidden": 16}, {"channels": [8, 4], "z_size": 8}),
    "mlp": ({"hidden": [32, 16]}, {"hidden": [16], "z_size": 8}),
}


def small_gan(arch: str, **discriminator) -> SemiSupervisedGAN:
    disc, gen = SMALL[arch]
    return SemiSupervisedGAN(arch, {**disc, **discriminator}, gen)


@pytest.mark.parametrize("arch", ["conv", "mlp"])
@pytest.mark.parametrize("fake_logit", ["explicit", "zero"])
def test_discriminator_gives_k_class_logits_and_k_plus_one_for_training(arch, fake_logit):
    model = small_gan(arch, fake_logit=fake_logit).eval()
    x = to_input(synthetic_digits(3)[0])
    logits_k1 = model.discriminator.logits_k1(x)
    assert model(x).shape == (3, 10) and logits_k1.shape == (3, 11)
    assert torch.equal(model(x), logits_k1[:, :10])
    if fake_logit == "zero":
        assert torch.equal(logits_k1[:, 10], torch.zeros(3))
    images = model.generator(sample_z(5, 8))
    assert images.shape == (5, 1, 28, 28) and images.min() >= 0 and images.max() <= 1


def test_the_report_sized_conv_discriminator_has_6272_conv_features():
    model = SemiSupervisedGAN("conv", {"feature_layer": 2}, {})
    assert model.discriminator.features(torch.zeros(2, 1, 28, 28)).flatten(1).shape == (2, 6272)
    assert model.discriminator.logits_k1(torch.zeros(2, 1, 28, 28)).shape == (2, 11)


def test_feature_layer_out_of_range_is_a_clear_error():
    with pytest.raises(PipelineError, match="feature_layer=4 but the discriminator has 3"):
        small_gan("conv", feature_layer=4)


def test_gaussian_noise_has_its_std_keeps_the_layout_and_is_off_in_eval():
    torch.manual_seed(0)
    x = torch.ones(64, 8, 14, 14).to(memory_format=torch.channels_last)
    noise = GaussianNoise(0.5)
    y = noise(x)
    assert y.is_contiguous(memory_format=torch.channels_last)  # the next conv's fast layout
    assert abs((y - 1).mean().item()) < 0.01 and abs((y - 1).std().item() - 0.5) < 0.01
    assert torch.equal(noise.eval()(x), x)


def test_conv_blocks_compute_the_reports_conv_leaky_relu_pool_order():
    # The blocks pool before the activation (cheaper); values and gradients must be those
    # of the report's conv -> LeakyReLU -> max-pool.
    disc = small_gan("conv").discriminator.eval()
    reordered = torch.nn.Sequential(
        *[torch.nn.Sequential(b[0], b[1], b[3], b[2]) for b in disc.blocks[:-1]]
    )
    ours = torch.nn.Sequential(*disc.blocks[:-1])
    x = torch.rand(4, 1, 28, 28)
    assert isinstance(disc.blocks[0][2], torch.nn.MaxPool2d)
    assert torch.equal(ours(x), reordered(x))
    grads = []
    for net in (ours, reordered):
        disc.zero_grad()
        net(x).square().sum().backward()
        grads.append(disc.blocks[1][1].weight.grad.clone())
    assert torch.equal(*grads)


def test_real_logit_is_the_log_odds_of_not_generated():
    logits = torch.tensor([[1.0, 2.0, 0.5]])  # two classes + the generated logit
    p_fake = logits.softmax(1)[0, 2]
    assert real_logit(logits).item() == pytest.approx(math.log((1 - p_fake) / p_fake), abs=1e-6)


def test_unsupervised_loss_matches_the_papers_formula_and_descends_the_right_way():
    class_logits_real, class_logits_fake = torch.randn(6, 10), torch.randn(6, 10)
    pad = lambda t: F.pad(t, (0, 1))  # noqa: E731  (fake logit fixed at 0)
    l_unl = torch.logsumexp(class_logits_real, 1)
    l_gen = torch.logsumexp(class_logits_fake, 1)
    paper = -0.5 * l_unl.mean() + 0.5 * F.softplus(l_unl).mean() + 0.5 * F.softplus(l_gen).mean()
    ours = unsupervised_loss(pad(class_logits_real), pad(class_logits_fake))
    assert ours.item() == pytest.approx(paper.item(), abs=1e-5)
    # A gradient step makes real images look more real and generated ones less.
    real = pad(class_logits_real).requires_grad_()
    fake = pad(class_logits_fake).requires_grad_()
    unsupervised_loss(real, fake).backward()
    assert (real_logit(real - real.grad) > real_logit(real)).all()
    assert (real_logit(fake - fake.grad) < real_logit(fake)).all()


def test_supervised_loss_ignores_the_generated_logit():
    logits = torch.randn(4, 11)
    labels = torch.tensor([0, 3, 9, 5])
    changed = logits.clone()
    changed[:, 10] += 100
    assert supervised_loss(changed, labels) == supervised_loss(logits, labels)
    assert supervised_loss(logits, labels) == F.cross_entropy(logits[:, :10], labels)


def test_feature_matching_trains_only_the_generator():
    model = small_gan("conv")
    real = to_input(synthetic_digits(8)[0])
    fake = model.generator(sample_z(8, 8))
    with frozen(model.discriminator):
        features_fake = model.discriminator.features(fake)
    loss = feature_matching_loss(model.discriminator.features(real), features_fake)
    loss.backward()
    assert all(p.grad is None for p in model.discriminator.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generator.parameters())
    assert all(p.requires_grad for p in model.discriminator.parameters())  # restored
    assert feature_matching_loss(features_fake, features_fake).item() == 0.0


def test_data_dependent_init_standardises_pre_activations():
    disc = MLPDiscriminator(hidden=[64, 32], input_noise=0.3, hidden_noise=0.5)
    x = to_input(synthetic_digits(200)[0])
    data_dependent_init(disc, x)
    first = disc.blocks[0][2]  # the weight-normalised Linear of the first block
    out = first(x.flatten(1))
    assert out.mean(0).abs().max() < 1e-4
    assert (out.std(0) - 1).abs().max() < 1e-3


def test_image_grid_tiles_rows_with_gaps():
    images = torch.zeros(12, 1, 28, 28)
    images[11] = 1.0
    grid = image_grid(images, columns=5)
    assert grid.shape == (3 * 29 - 1, 5 * 29 - 1) and grid.dtype.name == "uint8"
    assert grid[58:86, 29:57].min() == 255  # image 11: row 2, column 1
    assert grid[:28, :28].max() == 0


SECTION = {
    "arch": "mlp",
    "conv": {"discriminator": {"channels": [4, 8], "hidden": 16},
             "generator": {"channels": [8, 4]}},
    "mlp": {"discriminator": {"hidden": [32, 16]}, "generator": {"hidden": [16]}},
    "epochs": 3, "steps_per_epoch": 4, "batch_size": 10, "unlabeled_batch_size": 12,
    "unlabeled_includes_labeled": True, "lr": 0.003, "generator_lr": 0.003, "beta1": 0.5,
    "lr_schedule": "cosine", "unsupervised_weight": 1.0, "fake_logit": "zero",
    "feature_layer": -1, "z_size": 8, "input_noise": 0.1, "hidden_noise": 0.1,
    "augment": AUGMENT, "augment_unlabeled": True, "pseudo_label_weight": 0.0,
    "threshold": 0.95, "adaptive_threshold": False, "strong_augment": AUGMENT,
    "ema_decay": 0.9, "teacher": "student", "patience": 0, "collapse_std": 0.0,
    "grid_size": 6,
}  # fmt: skip
RUN_HOOKS = ("on_epoch", "on_checkpoint", "resume")


def sgan_config(arch: str = "mlp", **overrides) -> sgan.Config:
    """A tiny train.sgan section (each architecture with its default fake logit)."""
    fake_logit = {"conv": "explicit", "mlp": "zero"}[arch]
    section = {**SECTION, "arch": arch, "fake_logit": fake_logit, **overrides}
    return parse_config(sgan.Config, section, "train.sgan")


def _data(n: int = 60, labeled: int = 20) -> SplitData:
    """The first `labeled` images labeled, the others unlabeled (with
    `unlabeled_includes_labeled` the unlabeled set is all `n`)."""
    x, y = synthetic_digits(n)
    return SplitData(x[:labeled], y[:labeled], x[labeled:])


def _train(arch: str = "mlp", seed: int = 0, **kw):
    """sgan.train on 60 synthetic digits (20 labeled, 40 validation); the hooks and
    `resume` go to the `Run`, every other keyword to the config."""
    torch.manual_seed(seed)
    hooks = {k: kw.pop(k) for k in RUN_HOOKS if k in kw}
    cfg = sgan_config(arch, **kw)
    model, _ = sgan.build(cfg, n_classes=10)
    x, y = synthetic_digits(60)
    run = Run(torch.device("cpu"), torch.Generator().manual_seed(seed), x[20:], y[20:], **hooks)
    return model, sgan.train(model, _data(), cfg, run)


@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_build_saves_the_discriminator_as_the_model_and_the_generator_beside_it(arch):
    model, parts = sgan.build(sgan_config(arch), n_classes=10)
    assert parts["model"].module is model.discriminator
    assert parts["generator"].module is model.generator
    assert parts["model"].arch == f"sgan_{arch}_discriminator"
    assert parts["generator"].arch == f"sgan_{arch}_generator"
    # Each part rebuilds from its record alone, as a checkpoint does.
    for net in parts.values():
        rebuilt = build_model(net.arch, **net.config)
        rebuilt.load_state_dict(net.module.state_dict())
    assert parts["model"].config["hidden_noise"] == 0.1 and parts["generator"].config["z_size"] == 8


@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_training_logs_losses_and_is_deterministic(arch):
    _, first = _train(arch)
    _, second = _train(arch)
    assert first.history == second.history
    for key, value in first.last_state.items():
        assert torch.equal(second.last_state[key], value)
    logged = first.history[-1]
    for name in ("loss_supervised", "loss_unsupervised", "loss_feature_matching", "d_real"):
        assert math.isfinite(logged[f"train/{name}"])
    assert 0 <= logged["val/accuracy"] <= 1
    assert first.images_seen == 3 * 4 * (10 + 12 + 12)
    # Both networks changed.
    _, untouched = _train(arch, epochs=1, steps_per_epoch=1, lr=1e-12, generator_lr=1e-12)
    for part in ("discriminator.", "generator."):
        assert any(
            not torch.equal(v, untouched.last_state[k])
            for k, v in first.last_state.items()
            if k.startswith(part) and v.dtype.is_floating_point
        )


@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_each_network_gets_only_its_own_gradient(arch):
    # Without noise the passes are deterministic: the step's gradient on the generator must
    # be the feature-matching loss's alone, and on the discriminator that of its own losses
    # (generated images detached, the discriminator frozen under feature matching).
    torch.manual_seed(0)
    cfg = sgan_config(arch, input_noise=0.0, hidden_noise=0.0, unsupervised_weight=0.7)
    model, _ = sgan.build(cfg, n_classes=10)
    disc, gen = model.discriminator, model.generator
    step = sgan.train_step(model, _data(), cfg, Run(torch.device("cpu"), torch.Generator()))
    x_l, y_l, x_u, z = step.draw()

    def gradients(loss: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad for p in model.parameters()]

    step_grads = gradients(step.loss(x_l, y_l, x_u, z)[0])
    fake = gen(z)
    own = supervised_loss(disc.logits_k1(x_l), y_l) + 0.7 * unsupervised_loss(
        disc.logits_k1(x_u), disc.logits_k1(fake.detach())
    )
    disc_grads = gradients(own)
    generator_grads = gradients(feature_matching_loss(disc.features(x_u), disc.features(gen(z))))
    n_disc = len(list(disc.parameters()))
    assert all(g is None for g in disc_grads[n_disc:])  # nothing reached the generator
    for got, want in zip(step_grads[:n_disc], disc_grads[:n_disc], strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    for got, want in zip(step_grads[n_disc:], generator_grads[n_disc:], strict=True):
        assert want is not None and want.abs().sum() > 0
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_every_epoch_logs_a_grid_of_the_fixed_noise_samples():
    logged = []
    model, _ = _train(epochs=2, on_epoch=logged.append)
    grids = [stats[f"generated/{n}"] for n, stats in enumerate(logged, 1)]
    assert len(grids) == 2 and grids[0].shape == (28, 6 * 29 - 1)  # one row of six
    # The fixed noise: the trained generator's grid is the last epoch's.
    final = sgan.images(model, sgan_config(epochs=2), Run(torch.device("cpu"), torch.Generator()))
    assert (final["generated"] == grids[-1]).all()


def test_a_collapsed_generator_stops_training_with_a_message():
    saved = []
    with pytest.raises(GeneratorCollapsed, match="generator collapsed.*epoch 1"):
        _train(collapse_std=10.0, on_checkpoint=saved.append)
    assert saved == []  # stopped before a checkpoint of the collapsed epoch


def test_a_nan_loss_stops_gan_training():
    torch.manual_seed(0)
    cfg = dataclasses.replace(sgan_config(), unsupervised_weight=float("nan"))
    model, _ = sgan.build(cfg, n_classes=10)
    with pytest.raises(TrainingDiverged, match="loss is nan"):
        sgan.train(model, _data(), cfg, Run(torch.device("cpu"), torch.Generator()))


def test_early_stopping_waits_patience_epochs_after_the_best_validation_epoch():
    _, result = _train(epochs=30, patience=2, lr=1e-12, generator_lr=1e-12, ema_decay=0.0)
    # Nothing learns, so the first epoch stays the best and training stops two epochs later.
    assert result.best_epoch == 1 and len(result.history) == 3


# FlexMatch pseudo-labels, with a low threshold so that its memory fills within the run.
FLEXMATCH = {
    "pseudo_label_weight": 1.0, "threshold": 0.12, "strong_augment": AUGMENT,
    "adaptive_threshold": True,
}  # fmt: skip


# Pseudo-labels from the moving average (a mean teacher), which a resumed run must restore.
MEAN_TEACHER = {
    "pseudo_label_weight": 1.0, "threshold": 0.12, "strong_augment": AUGMENT, "teacher": "ema",
}  # fmt: skip


@pytest.mark.parametrize("options", [{}, FLEXMATCH, MEAN_TEACHER])
def test_an_interrupted_gan_run_resumes_to_the_same_result(options):
    _, reference = _train(epochs=3, **options)
    saved = []
    with pytest.raises(RuntimeError):
        _train(epochs=3, **options, on_checkpoint=saved.append, on_epoch=_stop_at(2))
    assert {"ema", "scheduler"} <= saved[-1].keys()
    if options.get("adaptive_threshold"):
        memory = saved[-1]["step_state"]["confident_class"]
        assert (memory >= 0).any() and len(memory) == 60
    _, resumed = _train(seed=7, epochs=3, **options, resume=saved[-1])
    assert resumed.history == reference.history
    for key, value in reference.last_state.items():
        assert torch.equal(resumed.last_state[key], value)


class ConstantTeacher(torch.nn.Module):
    """Class logits that ignore the image; records the mode it was called in."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits))
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.logits.expand(len(x), -1)


@pytest.mark.parametrize(
    ("teacher_logits", "confident"), [([0.0] * 10, 0.0), ([0.0] * 3 + [20.0] + [0.0] * 6, 1.0)]
)
def test_a_teacher_gives_the_pseudo_labels_from_a_noisy_pass_without_gradient(
    teacher_logits, confident
):
    torch.manual_seed(0)
    cfg = sgan_config(
        "conv", batch_size=10, unlabeled_batch_size=12, unlabeled_includes_labeled=False,
        pseudo_label_weight=1.0, threshold=0.95, teacher="ema",
    )  # fmt: skip
    model, _ = sgan.build(cfg, n_classes=10)
    # The mean teacher's discriminator, swapped for one whose answer is known.
    ema = moving_average(model, cfg.ema_decay)
    teacher = ConstantTeacher(teacher_logits).eval()
    ema.module.discriminator = teacher
    x, y = synthetic_digits(30)
    run = Run(torch.device("cpu"), torch.Generator().manual_seed(0))
    step = sgan.train_step(model, SplitData(x[:10], y[:10], x), cfg, run, ema)
    loss, stats = step()
    # Uniform teacher logits are never confident (no pseudo-label loss); a sure teacher
    # labels every image class 3, whatever the discriminator itself predicts.
    assert stats["train/confident_fraction"] == confident
    assert (stats["train/pseudo_label"] > 0) == bool(confident)
    assert teacher.modes == [True] and not teacher.training  # noise on, mode restored
    loss.backward()
    assert teacher.logits.grad is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ema_decay": 0, "teacher": "ema"}, "train.sgan.teacher is ema but ema_decay is 0"),
        ({"feature_layer": 0}, "train.sgan.feature_layer is 0; layers count from 1"),
        ({"arch": "conv", "conv": {**SECTION["conv"], "generator": {"channels": [8, 4, 2]}}},
         "train.sgan.conv.generator.channels needs exactly 2 entries"),
        ({"arch": "gru"}, "train.sgan.arch must be one of conv, mlp"),
        ({"mlp": {"discriminator": {"hidden": [32]}}}, "missing key train.sgan.mlp.generator"),
    ],
)  # fmt: skip
def test_a_bad_sgan_section_is_refused_in_one_line_naming_the_key(change, message):
    section = {**SECTION, **change}
    with pytest.raises(PipelineError, match=message) as error:
        parse_config(sgan.Config, section, "train.sgan")
    assert "\n" not in str(error.value)


def _stop_at(epoch: int):
    def stop(stats):
        if stats["epoch"] == epoch:
            raise RuntimeError("interrupted")

    return stop


def test_classify_samples_counts_classes_and_confidence():
    class Fixed(torch.nn.Module):
        """Predicts class 2 for bright images (confidently), class 7 for dark ones."""

        def forward(self, x):
            bright = (x.mean((1, 2, 3)) > 0.5).float()[:, None]
            return 10 * bright * F.one_hot(torch.tensor(2), 10) + (1 - bright) * F.one_hot(
                torch.tensor(7), 10
            )

    images = torch.cat([torch.ones(3, 1, 28, 28), torch.zeros(5, 1, 28, 28)])
    report = classify_samples(images, Fixed(), n_classes=10, batch_size=3)
    assert report["class_counts"]["2"] == 3 and report["class_counts"]["7"] == 5
    assert report["classes_covered"] == 2 and report["per_class_confidence"]["0"] is None
    assert report["per_class_confidence"]["2"] == pytest.approx(1.0, abs=1e-3)
    low = math.e / (math.e + 9)  # softmax of a single logit 1 among ten
    assert report["per_class_confidence"]["7"] == pytest.approx(low, abs=1e-5)
    assert report["predicted"].tolist() == [2, 2, 2, 7, 7, 7, 7, 7]
    assert 0 < report["class_balance"] < 1
    uniform = classify_samples(images[:1].repeat(10, 1, 1, 1), Fixed(), 10)
    assert uniform["classes_covered"] == 1 and uniform["class_balance"] == pytest.approx(0)


def test_discriminator_features_for_extraction():
    conv, mlp = small_gan("conv").discriminator.eval(), small_gan("mlp").discriminator.eval()
    x = to_input(synthetic_digits(3)[0])
    assert embedding_network(conv, "penultimate")(x).shape == (3, 16)
    assert embedding_network(conv, "conv")(x).shape == (3, 8 * 7 * 7)
    assert embedding_network(mlp, "penultimate")(x).shape == (3, 16)
    # Class probabilities cover the K digits only; "generated" is not a class.
    for disc in (conv, mlp):
        probabilities = embedding_network(disc, "probabilities")(x)
        assert probabilities.shape == (3, 10)
        assert torch.allclose(probabilities.sum(1), torch.ones(3))
        assert torch.equal(probabilities.argmax(1), disc(x).argmax(1))
    with pytest.raises(PipelineError, match="no conv layers"):
        embedding_network(mlp, "conv")
