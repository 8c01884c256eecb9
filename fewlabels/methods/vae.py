"""Kingma et al.'s M1, as in the VAE report: a variational autoencoder trained on every
training image without labels (this module), then an RBF SVM on the latent means of the
labeled images alone (`fewlabels.svm`, stage vae_svm@<labels>). The network is in
`fewlabels.models.vae`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import (
    DATASET_CLASSES,
    LR_SCHEDULES,
    boolean,
    check_budget,
    choice,
    integer,
    knob,
    list_of,
    number,
)
from ..data import to_input
from ..models import Network, network
from ..models.vae import VAE
from ..train import Loop, Run, Step, TrainResult, fit_steps

DESCRIPTION = "M1: VAE latent means (all images, no labels) + RBF SVM"
# By label budget: VAE report (Fashion-MNIST); MNIST 100: Kingma et al.'s M1 + TSVM.
REPORTED = {
    100: {
        ("fashion-mnist", 100): ("VAE report", 0.6482),
        ("mnist", 100): ("Kingma et al. M1+TSVM", 0.8818),
    },
    600: {("fashion-mnist", 600): ("VAE report", 0.7632)},
    1000: {("fashion-mnist", 1000): ("VAE report", 0.7647)},
    3000: {("fashion-mnist", 3000): ("VAE report", 0.7990)},
}


@dataclass(frozen=True, kw_only=True)
class Config:
    dataset: str = knob(choice(tuple(DATASET_CLASSES)))
    budgets: list[int] = knob(list_of(integer(minimum=1), min_len=1, unique=True))
    latent: int = knob(integer(minimum=1))
    hidden: list[int] = knob(list_of(integer(minimum=1), min_len=1))
    epochs: int = knob(integer(minimum=1))
    batch_size: int = knob(integer(minimum=1))
    lr: float = knob(number(0, open_low=True))
    lr_schedule: str = knob(choice(LR_SCHEDULES))
    kl_weight: float = knob(number(0, open_low=True))
    kl_warmup_epochs: float = knob(number(0))
    pool_size: int = knob(integer(minimum=0))
    standardize: bool = knob(boolean)
    svm_c: list[float] = knob(list_of(number(0, open_low=True), min_len=1, unique=True))
    svm_gamma: list[float] = knob(list_of(number(0, open_low=True), min_len=1, unique=True))
    cv_folds: int = knob(integer(minimum=2))

    def check(self, key: str) -> None:
        for labels in self.budgets:
            check_budget(f"{key}.budgets", labels, DATASET_CLASSES[self.dataset])

    def training(self) -> dict[str, object]:
        """The keys that shape the VAE itself (the SVM's do not retrain it)."""
        keys = ("latent", "hidden", "epochs", "batch_size", "lr", "lr_schedule", "kl_weight",
                "kl_warmup_epochs")  # fmt: skip
        return {key: getattr(self, key) for key in keys}


def build(cfg: Config, n_classes: int) -> tuple[nn.Module, dict[str, Network]]:
    net = network("vae", latent=cfg.latent, hidden=cfg.hidden)
    return net.module, {"model": net}


def kl_to_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) of each row, summed over the latent axis."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(1)


def vae_loss(
    logits: Tensor, x: Tensor, mean: Tensor, logvar: Tensor, kl_weight: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Negative ELBO per image (BCE summed over pixels + weighted KL), with its two parts."""
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    kl = kl_to_standard_normal(mean, logvar)
    return (bce + kl_weight * kl).mean(), bce.mean(), kl.mean()


def vae_step(model: VAE, images: Tensor, cfg: Config, run: Run, first_step: int) -> Step:
    """One VAE step: the next `batch_size` images of a random order of `images` (drawn
    from the run's generator whenever the last one is used up: one pass per epoch, its
    last batch shorter), with fresh Gaussian noise from the generator, and the loss
    BCE + weighted KL.

    The KL weight rises linearly from 0 to `kl_weight` over the first `kl_warmup_epochs`
    (0 = `kl_weight` from the start; 1 is the plain ELBO); the loss counts its calls
    from `first_step` (the steps done before a resumed run), so it is a function of the step.
    """
    device, generator, batch_size = run.device, run.generator, cfg.batch_size
    warmup_steps = cfg.kl_warmup_epochs * -(-len(images) // batch_size)
    latent = model.to_stats.out_features // 2
    order = torch.empty(0, dtype=torch.long)
    position, done = 0, first_step

    def draw() -> tuple[Tensor, ...]:
        nonlocal order, position
        if position >= len(order):
            order, position = torch.randperm(len(images), generator=generator).to(device), 0
        xb = to_input(images[order[position : position + batch_size]])
        position += batch_size
        noise = torch.randn(len(xb), latent, generator=generator).to(device)
        return xb, noise

    def loss(xb: Tensor, noise: Tensor) -> tuple[Tensor, dict[str, float]]:
        nonlocal done
        weight = cfg.kl_weight * (min(1.0, done / warmup_steps) if warmup_steps else 1.0)
        done += 1
        logits, mean, logvar = model(xb, noise)
        elbo, bce, kl = vae_loss(logits, xb, mean, logvar, weight)
        stats = {"train/loss": elbo.item(), "train/bce": bce.item(), "train/kl": kl.item()}
        return elbo, {**stats, "train/kl_weight": weight}

    return Step(draw, loss, images=batch_size)


def train(model: VAE, images: Tensor, cfg: Config, run: Run) -> TrainResult:
    """Unsupervised Adam training on uint8 images (N, H, W) on the run's device; no labels
    enter here. Each epoch is one pass over the images in a seeded random order
    (`vae_step`). The loss is BCE + `kl_weight` x KL (1 = the negative ELBO; below 1,
    Higgins et al.'s beta-VAE with beta < 1: fewer latent units collapse onto the prior),
    the KL weight rising from 0 over the first `kl_warmup_epochs`: early on, the full KL
    pulls posteriors onto the prior before the decoder has learned to use the code. The
    weight and the learning rate are functions of the step, so a resumed run follows the
    same curves. There is no validation set: the last epoch is kept.
    """
    steps_per_epoch = -(-len(images) // cfg.batch_size)
    done = run.resume["epoch"] * steps_per_epoch if run.resume is not None else 0
    step = vae_step(model, images, cfg, run, first_step=done)
    return fit_steps(model, step, Loop(cfg.epochs, steps_per_epoch, cfg.lr, cfg.lr_schedule), run)
