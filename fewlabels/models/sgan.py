"""The semi-supervised GAN's networks (Salimans et al., 2016): a K+1 discriminator and a
generator, for the conv (SGAN report) and the MLP (the paper's) architectures.

Pure nn.Modules: the losses and the training step are in `fewlabels.methods.sgan`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from ..errors import PipelineError


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


def sample_z(n: int, z_size: int, generator: torch.Generator | None = None) -> Tensor:
    """The generator's input noise, z ~ U(0, 1)^z_size as in the paper (drawn on the CPU
    generator, so a run does not depend on the device)."""
    return torch.rand(n, z_size, generator=generator)
