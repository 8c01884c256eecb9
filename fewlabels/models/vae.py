"""The M1 variational autoencoder's network (Kingma et al., 2014). Its loss and trainer:
`fewlabels.methods.vae`."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn


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
