"""Every network of the pipeline, by the name its checkpoints carry.

`build_model(arch, **config)` rebuilds a saved model from its checkpoint without knowing
the stage that trained it; the networks hold no training code and no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import PipelineError
from .cnn import CS229CNN, MLP, BaselineCNN, WaterlooCNN
from .sgan import ConvDiscriminator, ConvGenerator, MLPDiscriminator, MLPGenerator
from .vae import VAE

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "baseline_cnn": BaselineCNN,
    "mlp": MLP,
    "cs229_cnn": CS229CNN,
    "waterloo_cnn": WaterlooCNN,
    "sgan_conv_discriminator": ConvDiscriminator,
    "sgan_mlp_discriminator": MLPDiscriminator,
    "sgan_conv_generator": ConvGenerator,
    "sgan_mlp_generator": MLPGenerator,
    "vae": VAE,
}


def build_model(arch: str, **config: Any) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise PipelineError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**config)


@dataclass(frozen=True)
class Network:
    """A network and what rebuilds it from a checkpoint: `build_model(arch, **config)`."""

    module: nn.Module
    arch: str
    config: dict[str, Any]


def network(arch: str, **config: Any) -> Network:
    return Network(build_model(arch, **config), arch, config)


def classifier(
    arch: str, n_classes: int, sizes: Any, keys: tuple[str, ...]
) -> tuple[nn.Module, dict[str, Network]]:
    """A classifier of `arch` sized by the `keys` of a typed config `sizes`, as a method's
    `build` returns it: the module to train and its one saved part, `model`."""
    net = network(arch, n_classes=n_classes, **{key: getattr(sizes, key) for key in keys})
    return net.module, {"model": net}


# The keys of a method's config that size the Waterloo report's CNN.
WATERLOO_SIZES = ("channels", "hidden", "batch_norm")
