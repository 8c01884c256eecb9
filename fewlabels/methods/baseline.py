"""The SGAN report's supervised baseline: a compact CNN trained on the labeled images
alone, with random affine (and optionally elastic) augmentation."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import ElasticAffine, TrainingConfig, integer, knob, list_of, number
from ..models import Network, classifier
from ..supervised import classifier_step
from ..train import Run, SplitData, Step, TrainResult, fit_steps, loop_of

DESCRIPTION = "supervised CNN, labeled images only"
REPORTED = {("mnist", 100): ("SGAN report", 0.8273)}


@dataclass(frozen=True, kw_only=True)
class Config(TrainingConfig):
    channels: list[int] = knob(list_of(integer(minimum=1), min_len=2))
    hidden: int = knob(integer(minimum=1))
    dropout: float = knob(number(0, 1))
    augment: ElasticAffine


def build(cfg: Config, n_classes: int) -> tuple[nn.Module, dict[str, Network]]:
    return classifier("baseline_cnn", n_classes, cfg, ("channels", "hidden", "dropout"))


def train_step(model: nn.Module, data: SplitData, cfg: Config, run: Run, ema: None = None) -> Step:
    return classifier_step(model, data.x_labeled, data.y_labeled, cfg.batch_size, cfg.augment, run)


def train(model: nn.Module, data: SplitData, cfg: Config, run: Run) -> TrainResult:
    return fit_steps(model, train_step(model, data, cfg, run), loop_of(cfg), run)
