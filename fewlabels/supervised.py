"""Supervised training on labeled images: the step the baseline, the ceilings and the
retrain share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Affine
from .data import random_affine, to_input
from .train import Loop, Run, Step, TrainResult, fit_steps


def classifier_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, augment: Affine, run: Run
) -> Step:
    """One supervised step: `batch_size` labeled images drawn with replacement (so a
    100-image budget and a 6000-image budget run the same number of steps), randomly
    augmented on the device, and their cross-entropy."""
    device, generator = run.device, run.generator

    def draw() -> tuple[torch.Tensor, ...]:
        idx = torch.randint(len(x), (batch_size,), generator=generator).to(device)
        return random_affine(to_input(x[idx]), augment, generator), y[idx]

    def loss(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(xb)
        ce = F.cross_entropy(logits, yb)
        accuracy = (logits.argmax(1) == yb).float().mean().item()
        return ce, {"train/loss": ce.item(), "train/accuracy": accuracy}

    return Step(draw, loss, images=batch_size)


def train_supervised(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loop: Loop,
    batch_size: int,
    augment: Affine,
    run: Run,
) -> TrainResult:
    """Adam steps on the cross-entropy of `classifier_step`'s batches of uint8 images `x`
    (on the run's device) and their labels `y`."""
    step = classifier_step(model, x, y.long(), batch_size, augment, run)
    return fit_steps(model, step, loop, run)
