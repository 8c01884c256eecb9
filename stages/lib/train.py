"""Training loops, resumable training state, and dvclive logging.

Trainers take tensors and return results; they never touch paths. Per-epoch statistics
go to an `on_epoch(stats)` callback (the stage connects it to dvclive) and the complete
training state to `on_checkpoint(state)` (the stage saves it); passing that state back as
`resume` continues the run exactly where it stopped, RNG streams included.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from dvclive import Live
from torch import nn

from .config import PipelineError
from .data import random_affine, to_input
from .evaluation import classification_metrics, predict_logits

EpochCallback = Callable[[dict[str, float]], None]
CheckpointCallback = Callable[[dict[str, Any]], None]


class TrainingDiverged(PipelineError):
    """A loss became NaN or infinite; the last saved training state is left in place."""


@dataclass
class TrainResult:
    best_state: dict[str, torch.Tensor]
    last_state: dict[str, torch.Tensor]
    best_epoch: int  # 1-based; the last epoch when there is no validation set
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    images_seen: int = 0


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random stream a trainer draws from: its sampler and torch's global RNGs."""
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(generator: torch.Generator, state: dict[str, Any]) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_finite(loss: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(loss):
        raise TrainingDiverged(
            f"training diverged: loss is {loss.item()} at epoch {epoch}, step {step}; lower the "
            f"learning rate or check the data (the last epoch's checkpoint is kept)"
        )


def train_classifier(
    model: nn.Module,
    x_labeled: torch.Tensor,
    y_labeled: torch.Tensor,
    *,
    epochs: int,
    steps_per_epoch: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    augment: dict[str, float],
    device: torch.device,
    generator: torch.Generator,
    x_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
    on_epoch: EpochCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    resume: dict[str, Any] | None = None,
    lr_schedule: str = "constant",
) -> TrainResult:
    """Supervised training on labeled uint8 images with random affine augmentation.

    Each step draws `batch_size` labeled images with replacement (so a 100-image budget and
    a 6000-image budget run the same number of steps), augments them on `device`, and takes
    an Adam step on the cross-entropy. With a validation set the best epoch by validation
    accuracy is kept; the test set never enters here. `lr_schedule="cosine"` decays the
    learning rate from `lr` to 0 over all steps; it is a function of the step alone, so a
    resumed run follows the same schedule.
    """
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    x_labeled, y_labeled = x_labeled.to(device), y_labeled.long().to(device)
    n = len(x_labeled)
    best_acc, best_epoch, best_state = -1.0, epochs, None
    history: list[dict[str, float]] = []
    first_epoch = 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        set_rng_state(generator, resume["rng"])
        history = list(resume["history"])
        best_acc, best_epoch, best_state = resume["best"]
        first_epoch = resume["epoch"] + 1
    start = time.perf_counter()
    for epoch in range(first_epoch, epochs + 1):
        loss_sum = correct = 0.0
        for step in range(1, steps_per_epoch + 1):
            if lr_schedule == "cosine":
                progress = ((epoch - 1) * steps_per_epoch + step - 1) / (epochs * steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * progress))
            idx = torch.randint(n, (batch_size,), generator=generator).to(device)
            xb = random_affine(to_input(x_labeled[idx]), **augment, generator=generator)
            logits = model(xb)
            loss = F.cross_entropy(logits, y_labeled[idx])
            check_finite(loss, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            correct += (logits.argmax(1) == y_labeled[idx]).sum().item()
        stats = {
            "epoch": float(epoch),
            "train/loss": loss_sum / steps_per_epoch,
            "train/accuracy": correct / (steps_per_epoch * batch_size),
        }
        if x_val is not None and y_val is not None and len(x_val):
            val = classification_metrics(predict_logits(model, x_val, 1000, device), y_val)
            stats["val/accuracy"], stats["val/loss"] = val["accuracy"], val["loss"]
            if val["accuracy"] > best_acc:
                best_acc, best_epoch, best_state = val["accuracy"], epoch, _state_copy(model)
        history.append(stats)
        if on_checkpoint is not None:
            on_checkpoint(
                {
                    "epoch": epoch,
                    "model": _state_copy(model),
                    # Copies: the optimizer's tensors and the history change in place later.
                    "optimizer": copy.deepcopy(optimizer.state_dict()),
                    "rng": rng_state(generator),
                    "history": list(history),
                    "best": (best_acc, best_epoch, best_state),
                }
            )
        if on_epoch is not None:
            on_epoch(stats)
    last_state = _state_copy(model)
    return TrainResult(
        best_state=best_state if best_state is not None else last_state,
        last_state=last_state,
        best_epoch=best_epoch,
        history=history,
        seconds=time.perf_counter() - start,
        images_seen=(epochs - first_epoch + 1) * steps_per_epoch * batch_size,
    )


def open_live(
    directory: Path | str, params: dict[str, Any], history: list[dict[str, float]] = ()
) -> Live:
    """A dvclive logger for one trainer: one step per epoch, plots declared in dvc.yaml.

    `dvcyaml=None` because dvc.yaml declares the metrics and plots itself (once), and
    `save_dvc_exp=False` because `dvc exp run` already records the experiment.
    A resumed run passes the checkpoint's `history`: the logs are rebuilt from it rather
    than continued with dvclive's `resume=True`, so they match the checkpoint exactly even
    when the killed run died between saving the checkpoint and logging that epoch.
    """
    live = Live(dir=str(directory), save_dvc_exp=False, dvcyaml=None)
    live.log_params(params)
    log = live_epoch_logger(live)
    for stats in history:
        log(stats)
    return live


def live_epoch_logger(live: Live) -> EpochCallback:
    def log(stats: dict[str, float]) -> None:
        for name, value in stats.items():
            if name != "epoch":
                live.log_metric(name, value)
        live.next_step()

    return log
