"""The k-means report's last step: the Waterloo CNN trained on the labeled images plus
the k-means pseudo-labeled ones (stage retrain, after extract_features and pseudo_label).
Pseudo-labels below `min_confidence` are left out; labeled images keep their labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import Affine, TrainingConfig, boolean, integer, knob, list_of, number
from ..models import WATERLOO_SIZES, Network, classifier
from ..supervised import train_supervised
from ..train import Run, TrainResult, loop_of

DESCRIPTION = "CNN retrained on labeled + k-means pseudo-labeled images"
# The k-means report: about 90% with 10% of the labels (6000).
REPORTED = {("mnist", 6000): ("k-means report", 0.90)}


@dataclass(frozen=True, kw_only=True)
class Config(TrainingConfig):
    min_confidence: float = knob(number(0, 1))
    channels: list[int] = knob(list_of(integer(minimum=1), min_len=3))
    hidden: int = knob(integer(minimum=1))
    batch_norm: bool = knob(boolean)  # after each conv, as in the consistency CNN
    augment: Affine


def build(cfg: Config, n_classes: int) -> tuple[nn.Module, dict[str, Network]]:
    return classifier("waterloo_cnn", n_classes, cfg, WATERLOO_SIZES)


def train(
    model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], cfg: Config, run: Run
) -> TrainResult:
    """Supervised training on `data` = (images, labels): the labeled images and the kept
    pseudo-labeled ones, on the run's device."""
    x, y = data
    return train_supervised(model, x, y, loop_of(cfg), cfg.batch_size, cfg.augment, run)
