"""The M1 variational autoencoder (Kingma et al., 2014) and its unsupervised trainer.

The VAE learns a latent code from every training image without labels; `vae_svm` then
fits an RBF SVM on the latent means of the labeled images alone. Like `train_classifier`,
the trainer takes tensors, reports each epoch to `on_epoch`, hands its complete state to
`on_checkpoint`, and continues exactly from a `resume` state (RNG streams included).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import to_input
from .evaluation import eval_mode, map_batches
from .nets import ARCHITECTURES
from .train import CheckpointCallback, EpochCallback, Step, TrainResult, fit_steps


def _mlp(sizes: list[int]) -> list[nn.Module]:
    """Linear layers of `sizes`, each followed by Softplus (the report's activation)."""
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(sizes):
        layers += [nn.Linear(n_in, n_out), nn.Softplus()]
    return layers


class VAE(nn.Module):
    """Fully connected VAE: encoder x -> (mean, log-variance), decoder z -> pixel logits.

    The encoder has the `hidden` Softplus layers, the decoder the same ones reversed. The
    decoder returns logits; its sigmoid is the reconstruction, and the BCE is taken on the
    logits (`binary_cross_entropy_with_logits`), which is the same loss without the
    overflow of log(sigmoid) at saturated pixels.
    """

    def __init__(
        self, latent: int = 10, hidden: list[int] = (500, 500), image_size: int = 28
    ) -> None:
        super().__init__()
        pixels = image_size * image_size
        self.image_size = image_size
        self.encoder = nn.Sequential(*_mlp([pixels, *hidden]))
        self.to_stats = nn.Linear(hidden[-1] if hidden else pixels, 2 * latent)
        self.decoder = nn.Sequential(
            *_mlp([latent, *reversed(hidden)]), nn.Linear(hidden[0] if hidden else latent, pixels)
        )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images (N, 1, H, W) in [0, 1] -> latent mean and log-variance, each (N, latent)."""
        mean, logvar = self.to_stats(self.encoder(x.flatten(1))).chunk(2, dim=1)
        return mean, logvar

    def decode(self, z: Tensor) -> Tensor:
        """Latent codes (N, latent) -> pixel logits (N, 1, H, W)."""
        return self.decoder(z).view(-1, 1, self.image_size, self.image_size)

    def forward(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Reparameterised pass: z = mean + exp(logvar / 2) * noise.

        `noise` is standard normal (N, latent); the trainer draws it from its own generator
        so a run does not depend on torch's global RNG or on the device.
        """
        mean, logvar = self.encode(x)
        if noise is None:
            noise = torch.randn_like(mean)
        z = mean + torch.exp(0.5 * logvar) * noise
        return self.decode(z), mean, logvar


# `load_model` rebuilds checkpoints through nets.ARCHITECTURES. Registered here, not in
# nets.py, so that the CNN stages do not import (and depend on) this module.
ARCHITECTURES["vae"] = VAE


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


def vae_step(
    model: VAE,
    images: Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
    kl_weight: float = 1.0,
    kl_warmup_steps: float = 0.0,
    first_step: int = 0,
) -> Step:
    """One VAE step: the next `batch_size` images of a random order of `images` (drawn
    from `generator` whenever the last one is used up: one pass per epoch, its last batch
    shorter), with fresh Gaussian noise from `generator`, and the loss BCE + weighted KL.

    The KL weight rises linearly from 0 to `kl_weight` over the first `kl_warmup_steps`
    steps (0 = `kl_weight` from the start; 1 is the plain ELBO); the loss counts its calls
    from `first_step` (the steps done before a resumed run), so it is a function of the step.
    """
    device = next(model.parameters()).device
    images = images.to(device)
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
        weight = kl_weight * (min(1.0, done / kl_warmup_steps) if kl_warmup_steps else 1.0)
        done += 1
        logits, mean, logvar = model(xb, noise)
        elbo, bce, kl = vae_loss(logits, xb, mean, logvar, weight)
        stats = {"train/loss": elbo.item(), "train/bce": bce.item(), "train/kl": kl.item()}
        return elbo, {**stats, "train/kl_weight": weight}

    return Step(draw, loss, images=batch_size)


def train_vae(
    model: VAE,
    images: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    device: torch.device,
    generator: torch.Generator,
    kl_weight: float = 1.0,
    kl_warmup_epochs: float = 0.0,
    lr_schedule: str = "constant",
    on_epoch: EpochCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    resume: dict[str, Any] | None = None,
) -> TrainResult:
    """Unsupervised Adam training on uint8 images (N, H, W); no labels enter here.

    Each epoch is one pass over the images in a seeded random order (`vae_step`). The loss
    is BCE + `kl_weight` x KL (1 = the negative ELBO; below 1, Higgins et al.'s beta-VAE
    with beta < 1: fewer latent units collapse onto the prior). The KL weight rises
    linearly from 0 to `kl_weight` over the first `kl_warmup_epochs` (0 = no warm-up):
    early on, the full KL pulls posteriors onto the prior before the decoder has learned
    to use the code, which leaves latent units inactive. The weight and the learning rate
    are functions of the step, so a resumed run follows the same curves.
    There is no validation set: the last epoch is kept.
    """
    model.to(device)
    steps_per_epoch = -(-len(images) // batch_size)
    step = vae_step(
        model,
        images,
        batch_size=batch_size,
        generator=generator,
        kl_weight=kl_weight,
        kl_warmup_steps=kl_warmup_epochs * steps_per_epoch,
        first_step=resume["epoch"] * steps_per_epoch if resume is not None else 0,
    )
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
        on_epoch=on_epoch,
        on_checkpoint=on_checkpoint,
        resume=resume,
    )


def encode_means(model: VAE, images: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """Latent means of uint8 images (N, H, W), on CPU: the features the SVM sees."""
    with eval_mode(model):
        return map_batches(lambda x: model.encode(x)[0], images, batch_size, device).cpu()
