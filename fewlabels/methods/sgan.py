"""Semi-supervised GAN (Salimans et al., 2016, "Improved Techniques for Training GANs").

The discriminator is a K+1 classifier: K classes plus "generated". It learns from
cross-entropy on the labeled images and a real-vs-generated loss on unlabeled and
generated images; the generator learns only by feature matching (the mean of a
discriminator layer on generated images pulled towards its mean on real ones).

The "generated" class is either an explicit (K+1)-th logit (the SGAN report) or a logit
fixed at 0 (the paper: K outputs, which removes a redundant degree of freedom). Both give
the same real-vs-generated logit, `lse(class logits) - fake logit`, which is all the
unsupervised loss needs. Beyond the paper, FixMatch pseudo-labels for the discriminator,
taught by the moving average of its weights (a mean teacher). The networks are in
`fewlabels.models.sgan`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from ..config import (
    LR_SCHEDULES,
    Affine,
    PipelineError,
    boolean,
    check_teacher,
    choice,
    integer,
    knob,
    list_of,
    number,
)
from ..data import random_affine, to_input
from ..evaluation import eval_mode, module_mode
from ..losses import PseudoLabelLoss
from ..models import Network
from ..models.sgan import SemiSupervisedGAN, sample_z
from ..train import (
    Loop,
    Run,
    SplitData,
    Step,
    TrainingDiverged,
    TrainResult,
    fit_steps,
    moving_average,
)

DESCRIPTION = "SGAN: K+1 discriminator, feature-matching generator"
# The models evaluate scores (files by `fewlabels.paths.model_file`): name -> description.
EVALUATED = {
    "sgan": f"{DESCRIPTION} (best validation epoch)",
    "sgan_last": "SGAN: the same run's last epoch (= sgan without validation)",
}
REPORTED = {("mnist", 100): ("SGAN report", 0.9782)}
ARCHS = ("conv", "mlp")  # the SGAN report's CNN | the paper's permutation-invariant MLP
FAKE_LOGITS = ("explicit", "zero")
TEACHERS = ("student", "ema")
GRID_SEED = 0  # the fixed noise of the generated grids: the same digits' noise in every run


@dataclass(frozen=True)
class ConvDiscriminatorSizes:
    channels: list[int] = knob(list_of(integer(minimum=1), min_len=1))
    hidden: int = knob(integer(minimum=1))


@dataclass(frozen=True)
class ConvGeneratorSizes:
    channels: list[int] = knob(list_of(integer(minimum=1), min_len=1))


@dataclass(frozen=True)
class ConvSizes:
    discriminator: ConvDiscriminatorSizes
    generator: ConvGeneratorSizes


@dataclass(frozen=True)
class MLPLayers:
    hidden: list[int] = knob(list_of(integer(minimum=1), min_len=1))


@dataclass(frozen=True)
class MLPSizes:
    discriminator: MLPLayers
    generator: MLPLayers


@dataclass(frozen=True, kw_only=True)
class Config:
    arch: str = knob(choice(ARCHS))
    conv: ConvSizes
    mlp: MLPSizes
    epochs: int = knob(integer(minimum=1))
    steps_per_epoch: int = knob(integer(minimum=1))
    batch_size: int = knob(integer(minimum=1))
    unlabeled_batch_size: int = knob(integer(minimum=1))
    unlabeled_includes_labeled: bool = knob(boolean)
    lr: float = knob(number(0, open_low=True))
    generator_lr: float = knob(number(0, open_low=True))
    beta1: float = knob(number(0, 1))
    lr_schedule: str = knob(choice(LR_SCHEDULES))
    unsupervised_weight: float = knob(number(0))
    fake_logit: str = knob(choice(FAKE_LOGITS))
    feature_layer: int = knob(integer(minimum=-1))
    z_size: int = knob(integer(minimum=1))
    input_noise: float = knob(number(0))
    hidden_noise: float = knob(number(0))
    augment: Affine
    augment_unlabeled: bool = knob(boolean)
    pseudo_label_weight: float = knob(number(0))
    threshold: float = knob(number(0, 1))
    adaptive_threshold: bool = knob(boolean)
    strong_augment: Affine
    ema_decay: float = knob(number(0, 1))
    teacher: str = knob(choice(TEACHERS))
    patience: int = knob(integer(minimum=0))
    collapse_std: float = knob(number(0))
    grid_size: int = knob(integer(minimum=1))

    def check(self, key: str) -> None:
        if self.feature_layer == 0:
            raise PipelineError(
                f"params.yaml: {key}.feature_layer is 0; layers count from 1 (-1 = the last "
                "hidden layer)"
            )
        if self.arch == "conv" and len(self.conv.generator.channels) != 2:
            raise PipelineError(
                f"params.yaml: {key}.conv.generator.channels needs exactly 2 entries (7x7 -> "
                "14x14 -> 28x28)"
            )
        check_teacher(self.teacher, self.ema_decay, key)


def build(cfg: Config, n_classes: int) -> tuple[nn.Module, dict[str, Network]]:
    """The SGAN of `cfg.arch`, and its two saved parts: the discriminator is the
    classifier (`model`), the generator is kept for `check_generated`."""
    sizes = getattr(cfg, cfg.arch)
    discriminator = {
        "n_classes": n_classes,
        **dataclasses.asdict(sizes.discriminator),
        "input_noise": cfg.input_noise,
        "hidden_noise": cfg.hidden_noise,
        "fake_logit": cfg.fake_logit,
        "feature_layer": cfg.feature_layer,
    }
    generator = {"z_size": cfg.z_size, **dataclasses.asdict(sizes.generator)}
    model = SemiSupervisedGAN(cfg.arch, discriminator, generator)
    return model, {
        "model": Network(model.discriminator, f"sgan_{cfg.arch}_discriminator", discriminator),
        "generator": Network(model.generator, f"sgan_{cfg.arch}_generator", generator),
    }


@torch.no_grad()
def image_grid(images: Tensor, columns: int = 10) -> np.ndarray:
    """Images (N, 1, H, W) in [0, 1] tiled row by row into one uint8 array, 1-pixel gaps."""
    n, _, h, w = images.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    grid = torch.ones(rows * (h + 1) - 1, columns * (w + 1) - 1)
    for i, image in enumerate(images.float().cpu()):
        r, c = divmod(i, columns)
        grid[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = image[0]
    return (grid * 255).round().to(torch.uint8).numpy()


@torch.no_grad()
def generated_grid(model: SemiSupervisedGAN, z: Tensor, columns: int = 10) -> np.ndarray:
    """The generator's images for fixed noise `z` (on the model's device), in eval mode,
    as one uint8 grid."""
    with eval_mode(model):
        return image_grid(model.generator(z), columns)


def real_logit(logits_k1: Tensor) -> Tensor:
    """log D(x) / (1 - D(x)) from K+1 logits: `lse(class logits) - fake logit`."""
    return torch.logsumexp(logits_k1[:, :-1], dim=1) - logits_k1[:, -1]


def unsupervised_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """The discriminator's real-vs-generated loss (the paper's, halved per side):
    -log D(real) - log(1 - D(generated)), with D(x) = sigmoid(real_logit(x))."""
    return 0.5 * (
        F.softplus(-real_logit(logits_real)).mean() + F.softplus(real_logit(logits_fake)).mean()
    )


def supervised_loss(logits_k1: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the class logits: the "generated" logit is excluded, as the
    labeled images are real (the paper's `-l_lab + lse(l_lab)`)."""
    return F.cross_entropy(logits_k1[:, :-1], labels)


def feature_matching_loss(features_real: Tensor, features_fake: Tensor) -> Tensor:
    """Mean absolute difference of the batch means (the paper's released code; the real
    side is a fixed target, so only the generator learns from it)."""
    return (features_real.detach().mean(0) - features_fake.mean(0)).abs().mean()


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Forward passes inside record no gradient path to `module`'s weights (inputs still
    get theirs): how the generator's loss treats the discriminator as a fixed function."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


@torch.no_grad()
def data_dependent_init(model: nn.Module, x: Tensor) -> None:
    """Salimans & Kingma's initialisation of weight-normalised layers: scale and bias each
    so that its pre-activations on the batch `x` have mean 0 and unit variance."""
    handles = []

    def rescale(layer: nn.Linear, inputs: tuple[Tensor], output: Tensor) -> Tensor:
        mean, std = output.mean(0), output.std(0) + 1e-6
        layer.parametrizations.weight.original0.div_(std.view(-1, 1))
        layer.bias.sub_(mean).div_(std)
        return (output - mean) / std

    for module in model.modules():
        if isinstance(module, nn.Linear) and hasattr(module, "parametrizations"):
            handles.append(module.register_forward_hook(rescale))
    try:
        with eval_mode(model):  # no noise while measuring
            model(x)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def noisy_logits(model: nn.Module, x: Tensor) -> Tensor:
    """`model`'s class logits for `x` in training mode, without gradient. A teacher keeps
    its Gaussian noise on: the same pass without noise, a cleaner target, measured worse
    (its confident mistakes spread; README)."""
    with module_mode(model, True):
        return model(x)


def train_step(
    model: SemiSupervisedGAN,
    data: SplitData,
    cfg: Config,
    run: Run,
    ema: AveragedModel | None = None,
) -> Step:
    """One SGAN step: `batch_size` labeled images (randomly augmented), and
    `unlabeled_batch_size` unlabeled images and as many generated ones. Its loss is the
    discriminator's and the generator's together; each network gets only its own
    gradient: the discriminator's loss sees the generated images detached, and the
    generator's feature-matching loss sees the discriminator's weights `frozen`.
    With `pseudo_label_weight` > 0 the discriminator also learns FixMatch's pseudo-labels
    (beyond the paper): a `strong_augment` view of each unlabeled image is classified as
    the plain view's class where that is predicted with probability >= `threshold`, or
    FlexMatch's per-class bar with `adaptive_threshold` (`PseudoLabelLoss`; its memory:
    `Step.state`). The plain view's class comes from the discriminator's own pass, or with
    `teacher: ema` from the moving average `ema`'s discriminator (a mean teacher)."""
    disc = model.discriminator
    teacher = ema.module.discriminator if ema is not None and cfg.teacher == "ema" else None
    device, generator = run.device, run.generator
    x_labeled, y_labeled, x_unlabeled = data.x_labeled, data.y_labeled.long(), data.x_unlabeled
    batch_size, n_unlabeled = cfg.batch_size, cfg.unlabeled_batch_size
    n_fake = n_unlabeled
    pseudo_labels = cfg.pseudo_label_weight > 0
    loss_pseudo_label = PseudoLabelLoss(
        cfg.threshold, adaptive=cfg.adaptive_threshold, n_unlabeled=len(x_unlabeled), device=device
    )
    z_size = model.generator.z_size

    def draw() -> tuple[Tensor, ...]:
        idx = torch.randint(len(x_labeled), (batch_size,), generator=generator).to(device)
        uidx = torch.randint(len(x_unlabeled), (n_unlabeled,), generator=generator).to(device)
        x_l = random_affine(to_input(x_labeled[idx]), cfg.augment, generator)
        x_u = to_input(x_unlabeled[uidx])
        if cfg.augment_unlabeled:
            x_u = random_affine(x_u, cfg.augment, generator)
        z = sample_z(n_fake, z_size, generator).to(device)
        if not pseudo_labels:
            return x_l, y_labeled[idx], x_u, z
        return x_l, y_labeled[idx], x_u, z, random_affine(x_u, cfg.strong_augment, generator), uidx

    def loss(
        x_l: Tensor,
        y_l: Tensor,
        x_u: Tensor,
        z: Tensor,
        x_strong: Tensor | None = None,
        uidx: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        fake = model.generator(z)
        inputs = [x_l, x_u, fake.detach()] + ([x_strong] if pseudo_labels else [])
        features = disc.features(torch.cat(inputs))
        logits_l, logits_u, logits_fake, *logits_strong = disc.head_k1(features).split(
            [len(x) for x in inputs]
        )
        loss_lab = supervised_loss(logits_l, y_l)
        loss_unl = unsupervised_loss(logits_u, logits_fake)
        with frozen(disc):
            features_fake = disc.features(fake)
        features_u = features[batch_size : batch_size + n_unlabeled]
        loss_gen = feature_matching_loss(features_u, features_fake)
        total = loss_lab + cfg.unsupervised_weight * loss_unl + loss_gen
        extra = {}
        if pseudo_labels:
            logits_weak = logits_u[:, :-1] if teacher is None else noisy_logits(teacher, x_u)
            loss_pl, confident = loss_pseudo_label(logits_weak, logits_strong[0][:, :-1], uidx)
            total = total + cfg.pseudo_label_weight * loss_pl
            extra = {
                "train/pseudo_label": loss_pl.item(),
                "train/confident_fraction": confident.item(),
            }
        with torch.no_grad():
            return total, {
                **extra,
                "train/loss_supervised": loss_lab.item(),
                "train/loss_unsupervised": loss_unl.item(),
                "train/loss_feature_matching": loss_gen.item(),
                "train/accuracy": (logits_l[:, :-1].argmax(1) == y_l).float().mean().item(),
                "train/d_real": torch.sigmoid(real_logit(logits_u)).mean().item(),
                "train/d_fake": torch.sigmoid(real_logit(logits_fake)).mean().item(),
                "train/sample_std": fake.std(0).mean().item(),
            }

    return Step(draw, loss, images=batch_size + n_unlabeled + n_fake, state=loss_pseudo_label.state)


class GeneratorCollapsed(TrainingDiverged):
    """The generator's samples stopped varying; the last saved training state is kept."""


def grid_noise(cfg: Config, device: torch.device) -> Tensor:
    """The fixed noise of the generated grids (`grid_size` digits)."""
    return sample_z(cfg.grid_size, cfg.z_size, torch.Generator().manual_seed(GRID_SEED)).to(device)


def train(model: SemiSupervisedGAN, data: SplitData, cfg: Config, run: Run) -> TrainResult:
    """Train the K+1 discriminator and the feature-matching generator together
    (`train_step`), with one Adam optimiser holding both networks at their own learning
    rates. Weight-normalised layers get the paper's data-dependent initialisation. The
    unlabeled set is the split's unlabeled images, plus the labeled ones with
    `unlabeled_includes_labeled` (the paper: every training image; never the validation
    images). Every epoch also logs `generated/<epoch>` (dvclive's image-slider pattern):
    the generator's images for fixed noise, as one grid. A NaN/inf loss or a generator
    whose samples stop varying (mean per-pixel std over an epoch below `collapse_std`)
    stops the run; the last epoch's checkpoint is kept.
    """
    if cfg.unlabeled_includes_labeled:
        data = dataclasses.replace(data, x_unlabeled=torch.cat([data.x_labeled, data.x_unlabeled]))
    x_unlabeled = data.x_unlabeled
    if run.resume is None and any(hasattr(m, "parametrizations") for m in model.modules()):
        init_idx = torch.randint(len(x_unlabeled), (500,), generator=run.generator)
        data_dependent_init(model.discriminator, to_input(x_unlabeled[init_idx.to(run.device)]))
    # The teacher is the average `fit_steps` keeps (it makes its own otherwise).
    ema = moving_average(model, cfg.ema_decay) if cfg.teacher == "ema" else None
    step = train_step(model, data, cfg, run, ema)
    grid_z = grid_noise(cfg, run.device)

    def end_of_epoch(epoch: int, stats: dict[str, float]) -> dict[str, Any]:
        if stats["train/sample_std"] < cfg.collapse_std:
            raise GeneratorCollapsed(
                f"the generator collapsed: its samples' mean per-pixel std over epoch "
                f"{epoch} is {stats['train/sample_std']:.4f} (< collapse_std "
                f"{cfg.collapse_std}); lower generator_lr or raise the noise (the last "
                "epoch's checkpoint is kept)"
            )
        return {f"generated/{epoch}": generated_grid(model, grid_z)}

    step.on_epoch_end = end_of_epoch
    loop = Loop(
        epochs=cfg.epochs,
        steps_per_epoch=cfg.steps_per_epoch,
        lr=cfg.lr,
        lr_schedule=cfg.lr_schedule,
        betas=(cfg.beta1, 0.999),
        ema_decay=cfg.ema_decay,
        patience=cfg.patience,
    )
    groups = [
        {"params": list(model.discriminator.parameters()), "lr": cfg.lr},
        {"params": list(model.generator.parameters()), "lr": cfg.generator_lr},
    ]
    return fit_steps(model, step, loop, run, ema=ema, param_groups=groups)


def images(model: SemiSupervisedGAN, cfg: Config, run: Run) -> dict[str, np.ndarray]:
    """The trained generator's grid, for the stage to save beside the per-epoch ones."""
    return {"generated": generated_grid(model, grid_noise(cfg, run.device))}
