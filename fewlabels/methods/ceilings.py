"""The CS229 report's fully supervised ceilings: `linear` (softmax regression), `fc256`
(one ReLU layer of 256), `cnn4` (5x5 conv 32, max-pool, 128) and `cnn5` (adds 5x5 conv
64), trained on every training label with fixed epochs (last weights): how far the
few-label methods are from full supervision. Stage train_ceilings@<name>."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import (
    LR_SCHEDULES,
    NO_AUGMENT,
    Affine,
    boolean,
    choice,
    integer,
    knob,
    number,
)
from ..models import Network, network
from ..supervised import train_supervised
from ..train import Loop, Run, TrainResult

DESCRIPTION = "fully supervised ceiling"
# name -> (architecture, its layer sizes)
ARCHITECTURES = {
    "linear": ("mlp", {"hidden": []}),
    "fc256": ("mlp", {"hidden": [256]}),
    "cnn4": ("cs229_cnn", {"channels": [32]}),
    "cnn5": ("cs229_cnn", {"channels": [32, 64]}),
}
REPORTED = {
    name: {("mnist", 60000): ("CS229 report", accuracy)}
    for name, accuracy in {"linear": 0.919, "fc256": 0.978, "cnn4": 0.986, "cnn5": 0.994}.items()
}


@dataclass(frozen=True)
class CeilingModel:
    epochs: int = knob(integer(minimum=1))
    augment: bool = knob(boolean)  # a linear model cannot absorb shifts: no augmentation


@dataclass(frozen=True)
class Models:
    linear: CeilingModel
    fc256: CeilingModel
    cnn4: CeilingModel
    cnn5: CeilingModel


@dataclass(frozen=True, kw_only=True)
class Config:
    batch_size: int = knob(integer(minimum=1))
    steps_per_epoch: int = knob(integer(minimum=0))  # 0 = one pass over the training set
    lr: float = knob(number(0, open_low=True))
    lr_schedule: str = knob(choice(LR_SCHEDULES))
    augment: Affine  # for the models with augment: true
    models: Models


def build(name: str, n_classes: int) -> tuple[nn.Module, dict[str, Network]]:
    arch, sizes = ARCHITECTURES[name]
    net = network(arch, n_classes=n_classes, **sizes)
    return net.module, {"model": net}


def train(model: nn.Module, data: tuple, cfg: Config, run: Run, name: str) -> TrainResult:
    """Ceiling `name` on every training image `data` = (x, y), on the run's device."""
    x, y = data
    settings: CeilingModel = getattr(cfg.models, name)
    steps = cfg.steps_per_epoch or -(-len(y) // cfg.batch_size)
    loop = Loop(settings.epochs, steps, cfg.lr, cfg.lr_schedule)
    augment = cfg.augment if settings.augment else NO_AUGMENT
    return train_supervised(model, x, y, loop, cfg.batch_size, augment, run)
