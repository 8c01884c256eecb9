"""Semi-supervised GAN (Salimans et al., 2016, "Improved Techniques for Training GANs").

The discriminator is a K+1 classifier: K digit classes plus "generated". It learns from
cross-entropy on the labeled images and a real-vs-generated loss on unlabeled and
generated images; the generator learns only by feature matching (the mean of a
discriminator layer on generated images pulled towards its mean on real ones).

The "generated" class is either an explicit (K+1)-th logit (the SGAN report) or a logit
fixed at 0 (the paper: K outputs, which removes a redundant degree of freedom). Both give
the same real-vs-generated logit, `lse(class logits) - fake logit`, which is all the
unsupervised loss needs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from .config import PipelineError
from .data import random_affine, to_input
from .evaluation import eval_mode, module_mode
from .nets import ARCHITECTURES
from .semi import PseudoLabelLoss
from .train import (
    CheckpointCallback,
    EpochCallback,
    Step,
    TrainingDiverged,
    TrainResult,
    fit_steps,
)


class GaussianNoise(nn.Module):
    """Adds N(0, std^2) noise in training mode only (the paper's regulariser of D)."""

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = std

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.std > 0:
            # Not randn_like: it keeps a channels_last input's layout, and filling that
            # layout takes torch's scalar path, 6x slower (40% of an SGAN step on a CPU).
            return x + self.std * torch.randn(x.shape, dtype=x.dtype, device=x.device)
        return x


class Discriminator(nn.Module):
    """What both discriminators share: a stack of blocks (noise, layer, activation), then
    the output layer (noise, linear).

    `features(x)` is block `feature_layer`'s output (1-based; -1 = the last hidden
    layer), the layer the generator's feature matching reads; `head_k1(features)`
    continues from it to the K+1 logits (the fixed zero column appended for
    `fake_logit="zero"`); `forward(x)` returns the K class logits alone, so evaluation
    treats the discriminator like any classifier.
    """

    def __init__(
        self,
        blocks: list[nn.Module],
        width: int,
        n_classes: int,
        hidden_noise: float,
        fake_logit: str,
        feature_layer: int,
    ) -> None:
        super().__init__()
        if not (1 <= feature_layer <= len(blocks) or feature_layer == -1):
            raise PipelineError(
                f"feature_layer={feature_layer} but the discriminator has {len(blocks)} hidden "
                f"layers; use 1..{len(blocks)} or -1 (the last)"
            )
        self.n_classes, self.fake_logit = n_classes, fake_logit
        self.split_at = len(blocks) if feature_layer == -1 else feature_layer
        self.blocks = nn.ModuleList(blocks)
        self.output = nn.Sequential(
            GaussianNoise(hidden_noise), nn.Linear(width, n_classes + (fake_logit == "explicit"))
        )

    def features(self, x: Tensor) -> Tensor:
        for block in self.blocks[: self.split_at]:
            x = block(x)
        return x

    def head_k1(self, features: Tensor) -> Tensor:
        x = features
        for block in self.blocks[self.split_at :]:
            x = block(x)
        logits = self.output(x)
        return F.pad(logits, (0, 1)) if self.fake_logit == "zero" else logits

    def embedding(self, layer: str) -> nn.Module:
        """The network up to the last hidden layer (`penultimate`) or to the last conv
        block's flattened output (`conv`), for feature extraction."""
        if layer == "penultimate":
            return nn.Sequential(*self.blocks)
        convs = [b for b in self.blocks if any(isinstance(m, nn.Conv2d) for m in b.modules())]
        if not convs:
            raise PipelineError(f"{type(self).__name__} has no conv layers; use layer: penultimate")
        return nn.Sequential(*convs, nn.Flatten())

    def logits_k1(self, x: Tensor) -> Tensor:
        return self.head_k1(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits_k1(x)[:, : self.n_classes]


class ConvDiscriminator(Discriminator):
    """The SGAN report's discriminator: (conv 3x3 + max-pool + LeakyReLU) per entry of
    `channels`, Linear(hidden) + LeakyReLU, Linear(K+1 or K). Gaussian noise on the input
    and before every later layer in training (0 = none, as in the report)."""

    def __init__(
        self,
        n_classes: int = 10,
        channels: list[int] = (64, 128),
        hidden: int = 256,
        input_noise: float = 0.0,
        hidden_noise: float = 0.0,
        fake_logit: str = "explicit",
        feature_layer: int = -1,
        image_size: int = 28,
    ) -> None:
        blocks: list[nn.Module] = []
        in_channels, side = 1, image_size
        for i, out_channels in enumerate(channels):
            blocks.append(
                nn.Sequential(
                    GaussianNoise(input_noise if i == 0 else hidden_noise),
                    nn.Conv2d(in_channels, out_channels, 3, padding=1),
                    # Pooling first gives the same values and gradients (LeakyReLU is
                    # increasing) and runs the activation on a quarter of the elements.
                    nn.MaxPool2d(2),
                    nn.LeakyReLU(0.2),
                )
            )
            in_channels, side = out_channels, side // 2
        blocks.append(
            nn.Sequential(
                GaussianNoise(hidden_noise),
                nn.Flatten(),
                nn.Linear(in_channels * side * side, hidden),
                nn.LeakyReLU(0.2),
            )
        )
        super().__init__(blocks, hidden, n_classes, hidden_noise, fake_logit, feature_layer)


class MLPDiscriminator(Discriminator):
    """The paper's permutation-invariant MNIST discriminator: weight-normalised dense
    layers (1000-500-250-250-250, ReLU), Gaussian noise on the input and after every
    hidden layer in training."""

    def __init__(
        self,
        n_classes: int = 10,
        hidden: list[int] = (1000, 500, 250, 250, 250),
        input_noise: float = 0.3,
        hidden_noise: float = 0.5,
        fake_logit: str = "zero",
        feature_layer: int = -1,
        image_size: int = 28,
    ) -> None:
        blocks: list[nn.Module] = []
        width = image_size * image_size
        for i, units in enumerate(hidden):
            blocks.append(
                nn.Sequential(
                    nn.Flatten(),
                    GaussianNoise(input_noise if i == 0 else hidden_noise),
                    weight_norm(nn.Linear(width, units)),
                    nn.ReLU(),
                )
            )
            width = units
        super().__init__(blocks, width, n_classes, hidden_noise, fake_logit, feature_layer)
        self.output[1] = weight_norm(self.output[1])


class ConvGenerator(nn.Module):
    """The SGAN report's generator: Linear(z -> C x 7 x 7) + BN + ReLU, transposed convs
    (4x4, stride 2) up to 1 x 28 x 28 with a sigmoid, i.e. images in [0, 1] like the data
    (the report's tanh is the same up to scale)."""

    def __init__(self, z_size: int = 100, channels: list[int] = (128, 64)) -> None:
        super().__init__()
        if len(channels) != 2:
            raise PipelineError("the conv generator takes exactly two channel counts (7->14->28)")
        self.z_size = z_size
        first = channels[0]
        layers: list[nn.Module] = [
            nn.Linear(z_size, first * 7 * 7),
            nn.BatchNorm1d(first * 7 * 7),
            nn.ReLU(),
            nn.Unflatten(1, (first, 7, 7)),
        ]
        in_channels = first
        for out_channels in channels[1:]:
            layers += [
                nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
            ]
            in_channels = out_channels
        # The last transposed conv makes 28 x 28 from 14 x 14 (two doublings from 7 x 7).
        layers += [nn.ConvTranspose2d(in_channels, 1, 4, stride=2, padding=1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class MLPGenerator(nn.Module):
    """The paper's generator: z -> 500 -> 500 (softplus + batch norm) -> 784 sigmoid."""

    def __init__(self, z_size: int = 100, hidden: list[int] = (500, 500), image_size: int = 28):
        super().__init__()
        self.z_size = z_size
        layers: list[nn.Module] = []
        width = z_size
        for units in hidden:
            layers += [nn.Linear(width, units), nn.BatchNorm1d(units), nn.Softplus()]
            width = units
        layers += [
            weight_norm(nn.Linear(width, image_size * image_size)),
            nn.Sigmoid(),
            nn.Unflatten(1, (1, image_size, image_size)),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


DISCRIMINATORS = {"conv": ConvDiscriminator, "mlp": MLPDiscriminator}
GENERATORS = {"conv": ConvGenerator, "mlp": MLPGenerator}


class SemiSupervisedGAN(nn.Module):
    """Discriminator and generator trained together; `forward` classifies (K logits), so
    the shared training loop validates and averages (EMA) it like any classifier."""

    def __init__(self, arch: str, discriminator: dict[str, Any], generator: dict[str, Any]):
        super().__init__()
        self.discriminator = DISCRIMINATORS[arch](**discriminator)
        self.generator = GENERATORS[arch](**generator)

    def forward(self, x: Tensor) -> Tensor:
        return self.discriminator(x)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """`n` generated images in [0, 1]; z ~ U(0, 1)^z_size as in the paper."""
        return self.generator(sample_z(n, self.generator.z_size, generator).to(self.device))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def sample_z(n: int, z_size: int, generator: torch.Generator | None = None) -> Tensor:
    return torch.rand(n, z_size, generator=generator)


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
    """The generator's images for fixed noise `z`, in eval mode, as one uint8 grid."""
    with eval_mode(model):
        return image_grid(model.generator(z.to(model.device)), columns)


# The train_sgan params that shape one step (`sgan_step`'s options).
STEP_KEYS = (
    "batch_size",
    "unlabeled_batch_size",
    "unsupervised_weight",
    "augment",
    "augment_unlabeled",
    "pseudo_label_weight",
    "threshold",
    "strong_augment",
    "adaptive_threshold",
)


def build_sgan(
    cfg: dict[str, Any], n_classes: int, sizes: dict[str, Any] | None = None
) -> tuple[SemiSupervisedGAN, dict[str, Any], dict[str, Any]]:
    """The SGAN of params' `train_sgan` section (`sizes`: other layer sizes for its
    architecture), with the discriminator's and the generator's configs as saved."""
    arch = cfg["arch"]
    sizes = cfg[arch] if sizes is None else sizes
    discriminator = {
        "n_classes": n_classes,
        **sizes["discriminator"],
        **{k: cfg[k] for k in ("input_noise", "hidden_noise", "fake_logit", "feature_layer")},
    }
    generator = {"z_size": cfg["z_size"], **sizes["generator"]}
    return SemiSupervisedGAN(arch, discriminator, generator), discriminator, generator


def unlabeled_indices(split: dict[str, Tensor], includes_labeled: bool) -> Tensor:
    """The SGAN's unlabeled set: the split's unlabeled images, plus the labeled ones when
    `includes_labeled` (the paper: every training image). Never the validation images:
    their labels only score."""
    if includes_labeled:
        return torch.cat([split["labeled_idx"], split["unlabeled_idx"]])
    return split["unlabeled_idx"]


# `load_model` rebuilds checkpoints through nets.ARCHITECTURES (see vae.py).
ARCHITECTURES.update(
    sgan_conv_discriminator=ConvDiscriminator,
    sgan_mlp_discriminator=MLPDiscriminator,
    sgan_conv_generator=ConvGenerator,
    sgan_mlp_generator=MLPGenerator,
)


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


def sgan_step(
    model: SemiSupervisedGAN,
    x_labeled: Tensor,
    y_labeled: Tensor,
    x_unlabeled: Tensor,
    *,
    batch_size: int,
    unlabeled_batch_size: int,
    unsupervised_weight: float,
    augment: dict[str, float],
    augment_unlabeled: bool,
    generator: torch.Generator,
    pseudo_label_weight: float = 0.0,
    threshold: float = 0.95,
    strong_augment: dict[str, float] | None = None,
    adaptive_threshold: bool = False,
    teacher: nn.Module | None = None,
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
    `Step.state`). The plain view's class comes from the discriminator's own pass, or from
    `teacher`'s (a moving average of the discriminator: a mean teacher) when given."""
    disc = model.discriminator
    device = model.device
    x_labeled, y_labeled = x_labeled.to(device), y_labeled.long().to(device)
    x_unlabeled = x_unlabeled.to(device)
    n_fake = unlabeled_batch_size
    pseudo_labels = pseudo_label_weight > 0
    loss_pseudo_label = PseudoLabelLoss(
        threshold, adaptive=adaptive_threshold, n_unlabeled=len(x_unlabeled), device=device
    )

    def draw() -> tuple[Tensor, ...]:
        idx = torch.randint(len(x_labeled), (batch_size,), generator=generator).to(device)
        uidx = torch.randint(len(x_unlabeled), (unlabeled_batch_size,), generator=generator)
        uidx = uidx.to(device)
        x_l = random_affine(to_input(x_labeled[idx]), **augment, generator=generator)
        x_u = to_input(x_unlabeled[uidx])
        if augment_unlabeled:
            x_u = random_affine(x_u, **augment, generator=generator)
        z = sample_z(n_fake, model.generator.z_size, generator).to(device)
        if not pseudo_labels:
            return x_l, y_labeled[idx], x_u, z
        return (
            x_l,
            y_labeled[idx],
            x_u,
            z,
            random_affine(x_u, **strong_augment, generator=generator),
            uidx,
        )

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
        features_u = features[batch_size : batch_size + unlabeled_batch_size]
        loss_gen = feature_matching_loss(features_u, features_fake)
        total = loss_lab + unsupervised_weight * loss_unl + loss_gen
        extra = {}
        if pseudo_labels:
            logits_weak = logits_u[:, :-1] if teacher is None else noisy_logits(teacher, x_u)
            loss_pl, confident = loss_pseudo_label(logits_weak, logits_strong[0][:, :-1], uidx)
            total = total + pseudo_label_weight * loss_pl
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

    images = batch_size + unlabeled_batch_size + n_fake
    return Step(draw, loss, images=images, state=loss_pseudo_label.state)


def train_sgan(
    model: SemiSupervisedGAN,
    x_labeled: Tensor,
    y_labeled: Tensor,
    x_unlabeled: Tensor,
    *,
    epochs: int,
    steps_per_epoch: int,
    batch_size: int,
    unlabeled_batch_size: int,
    lr: float,
    generator_lr: float,
    beta1: float,
    lr_schedule: str,
    unsupervised_weight: float,
    augment: dict[str, float],
    augment_unlabeled: bool,
    ema_decay: float,
    patience: int,
    collapse_std: float,
    pseudo_label_weight: float = 0.0,
    threshold: float = 0.95,
    strong_augment: dict[str, float] | None = None,
    adaptive_threshold: bool = False,
    teacher: str = "student",
    grid_z: Tensor | None = None,
    device: torch.device,
    generator: torch.Generator,
    x_val: Tensor | None = None,
    y_val: Tensor | None = None,
    on_epoch: EpochCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    resume: dict[str, Any] | None = None,
) -> TrainResult:
    """Train the K+1 discriminator and the feature-matching generator together
    (`sgan_step`), with one Adam optimiser holding both networks at their own learning
    rates. Weight-normalised layers get the paper's data-dependent initialisation.
    With `grid_z`, every epoch also logs `generated/<epoch>` (dvclive's image-slider
    pattern): the generator's images for that fixed noise, as one grid. A NaN/inf loss or
    a generator whose samples stop varying (mean per-pixel std over an epoch below
    `collapse_std`) stops the run; the last epoch's checkpoint is kept. `teacher`: where
    the pseudo-labels come from, the discriminator itself (`student`) or the moving
    average of its weights (`ema`, which needs `ema_decay` > 0).
    """
    model.to(device)
    if resume is None and any(hasattr(m, "parametrizations") for m in model.modules()):
        init_idx = torch.randint(len(x_unlabeled), (500,), generator=generator)
        data_dependent_init(model.discriminator, to_input(x_unlabeled[init_idx].to(device)))
    if teacher == "ema" and ema_decay == 0:
        raise PipelineError("teacher: ema needs a moving average; set ema_decay > 0")
    # The teacher is the average `fit_steps` keeps (it makes its own copy otherwise).
    ema = copy.deepcopy(model) if teacher == "ema" else None
    step = sgan_step(
        model, x_labeled, y_labeled, x_unlabeled,
        batch_size=batch_size, unlabeled_batch_size=unlabeled_batch_size,
        unsupervised_weight=unsupervised_weight, augment=augment,
        augment_unlabeled=augment_unlabeled, generator=generator,
        pseudo_label_weight=pseudo_label_weight, threshold=threshold,
        strong_augment=strong_augment, adaptive_threshold=adaptive_threshold,
        teacher=ema.discriminator if ema is not None else None,
    )  # fmt: skip

    def end_of_epoch(epoch: int, stats: dict[str, float]) -> dict[str, Any]:
        if stats["train/sample_std"] < collapse_std:
            raise GeneratorCollapsed(
                f"the generator collapsed: its samples' mean per-pixel std over epoch "
                f"{epoch} is {stats['train/sample_std']:.4f} (< collapse_std {collapse_std}); "
                f"lower generator_lr or raise the noise (the last epoch's checkpoint is kept)"
            )
        return {} if grid_z is None else {f"generated/{epoch}": generated_grid(model, grid_z)}

    return fit_steps(
        model,
        step,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        lr=lr,
        weight_decay=0.0,
        device=device,
        generator=generator,
        lr_schedule=lr_schedule,
        param_groups=[
            {"params": list(model.discriminator.parameters()), "lr": lr},
            {"params": list(model.generator.parameters()), "lr": generator_lr},
        ],
        betas=(beta1, 0.999),
        ema_decay=ema_decay,
        ema=ema,
        patience=patience,
        x_val=x_val,
        y_val=y_val,
        on_epoch_end=end_of_epoch,
        on_epoch=on_epoch,
        on_checkpoint=on_checkpoint,
        resume=resume,
    )


class GeneratorCollapsed(TrainingDiverged):
    """The generator's samples stopped varying; the last saved training state is kept."""


@torch.no_grad()
def classify_samples(
    images: Tensor, classifier: nn.Module, n_classes: int, batch_size: int = 500
) -> dict[str, Any]:
    """What a (supervised) classifier makes of generated images (N, 1, H, W) in [0, 1]:
    the predicted class and confidence (top softmax probability) of each, how many land
    in each class, the mean confidence overall and per predicted class, and how many
    classes occur."""
    with eval_mode(classifier):
        probs = torch.cat(
            [
                classifier(images[i : i + batch_size]).softmax(1)
                for i in range(0, len(images), batch_size)
            ]
        )
    confidence, predicted = probs.max(1)
    counts = torch.bincount(predicted, minlength=n_classes)
    per_class_confidence = {
        str(c): float(confidence[predicted == c].mean()) if counts[c] else None
        for c in range(n_classes)
    }
    return {
        "n_samples": len(images),
        "predicted": predicted,
        "confidence": confidence,
        "class_counts": {str(c): int(n) for c, n in enumerate(counts)},
        "classes_covered": int((counts > 0).sum()),
        "mean_confidence": float(confidence.mean()),
        "per_class_confidence": per_class_confidence,
        # 1 = every class equally often; log(K) nats of entropy normalised to 1.
        "class_balance": float(
            -(counts / len(images) * (counts / len(images)).clamp_min(1e-12).log()).sum()
            / torch.log(torch.tensor(float(n_classes)))
        ),
    }
