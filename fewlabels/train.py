"""The training loop every method shares, and dvclive logging.

A method builds a `Step` (its data path and its loss) and hands it to `fit_steps` with a
`Loop` (how long, how fast, what to average) and the stage's `Run` (device, sampler,
validation images, hooks). Trainers take tensors and return results; they never touch
paths. Per-epoch statistics go to `run.on_epoch(stats)` (the stage connects it to dvclive)
and the complete training state to `run.on_checkpoint(state)` (the stage saves it);
passing that state back as `run.resume` continues the run exactly where it stopped, RNG
streams included.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from dvclive import Live
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel

from .config import PipelineError, TrainingConfig
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


@dataclass(frozen=True)
class Loop:
    """How `fit_steps` runs: Adam for `epochs` x `steps_per_epoch` steps at `lr` (decayed
    to 0 by a cosine with `lr_schedule: cosine`); with `ema_decay` > 0 a moving average of
    the weights is what is validated and returned; with `patience` > 0 training stops once
    that many epochs pass without a better validation accuracy."""

    epochs: int
    steps_per_epoch: int
    lr: float
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    ema_decay: float = 0.0
    patience: int = 0


def loop_of(cfg: TrainingConfig, **extra: Any) -> Loop:
    """The `Loop` of a method whose config has the shared training keys."""
    shared = ("epochs", "steps_per_epoch", "lr", "lr_schedule", "weight_decay")
    return Loop(**{key: getattr(cfg, key) for key in shared}, **extra)


@dataclass(frozen=True)
class SplitData:
    """A method's training images, on the run's device: the labeled ones and their labels,
    and the unlabeled ones (the split's; never the validation images)."""

    x_labeled: torch.Tensor
    y_labeled: torch.Tensor
    x_unlabeled: torch.Tensor


@dataclass(frozen=True)
class Run:
    """What a stage hands every trainer besides its config: where to train, the sampler
    every random draw comes from, the validation images (held-out training images, never
    the test set) and the hooks `fit_resumable` fills in."""

    device: torch.device
    generator: torch.Generator
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None
    on_epoch: EpochCallback | None = None
    on_checkpoint: CheckpointCallback | None = None
    resume: dict[str, Any] | None = None

    def with_hooks(self, **hooks: Any) -> Run:
        return dataclasses.replace(self, **hooks)


@dataclass
class Step:
    """A training step in two parts, so that the benchmark can time the model alone:
    `draw()` is the data path (draw indices, gather, convert and augment on the device),
    `loss(*batch)` the model's part (forward passes and losses). `images` is how many
    images one step touches (labeled + unlabeled + generated); `state`, tensors the step
    updates in place and a resumed run must get back (e.g. FlexMatch's per-image memory).
    `on_epoch_start(epoch)` runs before an epoch's first step; `on_epoch_end(epoch, stats)`
    sees the epoch's statistics before they are checkpointed (it may raise to stop the
    run) and may add entries: numbers go into the history, anything else (images) only to
    `run.on_epoch`."""

    draw: Callable[[], tuple[torch.Tensor, ...]]
    loss: Callable[..., tuple[torch.Tensor, dict[str, float]]]
    images: int
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    on_epoch_start: Callable[[int], None] | None = None
    on_epoch_end: Callable[[int, dict[str, float]], dict[str, Any]] | None = None

    def __call__(self) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss(*self.draw())


def _cpu_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A snapshot on the CPU (a model's state dict, a step's state): training goes on
    changing the originals in place."""
    return {k: v.detach().cpu().clone() for k, v in tensors.items()}


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


def lr_factor(schedule: str, total_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier of step `k` (0-based): 1, or a cosine from 1 to 0 over
    all steps. A function of the step alone, so resuming is exact."""
    if schedule == "cosine":
        return lambda k: 0.5 * (1 + math.cos(math.pi * (k / total_steps)))
    return lambda k: 1.0


def moving_average(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of `model`'s weights and buffers, starting at its
    current weights. Every floating-point tensor is averaged, batch-norm statistics
    included (copying the statistics instead measured 3 points worse for the consistency
    CNN); integer buffers are copied. Written as `decay * avg + (1 - decay) * new` rather
    than `get_ema_multi_avg_fn`'s lerp, which rounds differently and would change every
    trained model, and which blends integer buffers as floats."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], _: Any) -> None:
        for avg, new in zip(averaged, current, strict=True):
            if avg.dtype.is_floating_point:
                avg.mul_(decay).add_(new, alpha=1 - decay)
            else:
                avg.copy_(new)

    ema = AveragedModel(model, multi_avg_fn=update, use_buffers=True)
    ema.update_parameters(model)  # the first update copies: the average starts here
    return ema


def fit_steps(
    model: nn.Module,
    step: Step,
    loop: Loop,
    run: Run,
    *,
    ema: AveragedModel | None = None,
    param_groups: list[dict[str, Any]] | None = None,
) -> TrainResult:
    """The loop every trainer shares: Adam steps, LR schedule, EMA, validation, checkpoints.

    `step()` draws its own batch and returns the loss to minimise and a dict of per-step
    statistics (averaged over the epoch for logging). With `loop.ema_decay` > 0 a moving
    average of the weights is kept (`ema`, when the caller already made it to use as a
    teacher) and it is the model that is validated and returned; the raw weights only
    train. With validation images the best epoch by validation accuracy is kept; the
    test set never enters here. `param_groups` (Adam groups, each with its own "lr")
    replace the single group of `model.parameters()` at `loop.lr`.
    """
    # The stage put the model on run.device. channels_last: PyTorch's CPU convolutions run
    # about 1.5-2x faster in this layout (training the Waterloo CNN on one core: 1,080 ->
    # 2,010 images/s); neutral on CUDA.
    model.to(memory_format=torch.channels_last).train()
    groups = param_groups or [{"params": model.parameters(), "lr": loop.lr}]
    optimizer = torch.optim.Adam(
        groups, lr=loop.lr, weight_decay=loop.weight_decay, betas=loop.betas
    )
    total_steps = loop.epochs * loop.steps_per_epoch
    scheduler = LambdaLR(optimizer, lr_factor(loop.lr_schedule, total_steps))
    if ema is None and loop.ema_decay > 0:
        ema = moving_average(model, loop.ema_decay)
    if ema is not None:
        ema.to(memory_format=torch.channels_last).eval()
    scored = ema.module if ema is not None else model
    best_acc, best_epoch, best_state = -1.0, loop.epochs, None
    history: list[dict[str, float]] = []
    first_epoch = 1
    if run.resume is not None:
        resume = run.resume
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if ema is not None:
            ema.load_state_dict(resume["ema"])
        set_rng_state(run.generator, resume["rng"])
        for name, tensor in step.state.items():
            tensor.copy_(resume["step_state"][name])
        history = list(resume["history"])
        best_acc, best_epoch, best_state = resume["best"]
        first_epoch = resume["epoch"] + 1
    start = time.perf_counter()
    for epoch in range(first_epoch, loop.epochs + 1):
        if step.on_epoch_start is not None:
            step.on_epoch_start(epoch)
        sums: dict[str, float] = {}
        for step_number in range(1, loop.steps_per_epoch + 1):
            loss, step_stats = step()
            check_finite(loss, epoch, step_number)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            for name, value in step_stats.items():
                sums[name] = sums.get(name, 0.0) + value
        stats = {"epoch": float(epoch), **{k: v / loop.steps_per_epoch for k, v in sums.items()}}
        if run.x_val is not None and run.y_val is not None and len(run.x_val):
            logits = predict_logits(scored, run.x_val, 1000, run.device)
            val = classification_metrics(logits, run.y_val)
            stats["val/accuracy"], stats["val/loss"] = val["accuracy"], val["loss"]
            if val["accuracy"] > best_acc:
                best_state = _cpu_copy(scored.state_dict())
                best_acc, best_epoch = val["accuracy"], epoch
        extras = step.on_epoch_end(epoch, stats) if step.on_epoch_end is not None else {}
        stats.update({k: v for k, v in extras.items() if isinstance(v, float)})
        history.append(stats)
        stop = loop.patience > 0 and epoch - best_epoch >= loop.patience and best_state is not None
        if run.on_checkpoint is not None:
            state = {
                "epoch": epoch,
                "model": _cpu_copy(model.state_dict()),
                # Copies: the optimizer's tensors and the history change in place later.
                "optimizer": copy.deepcopy(optimizer.state_dict()),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(run.generator),
                "history": list(history),
                "best": (best_acc, best_epoch, best_state),
                "step_state": _cpu_copy(step.state),
            }
            if ema is not None:
                state["ema"] = _cpu_copy(ema.state_dict())
            run.on_checkpoint(state)
        if run.on_epoch is not None:
            run.on_epoch({**stats, **extras})
        if stop:
            print(
                f"early stop at epoch {epoch}: the best validation accuracy was epoch {best_epoch}"
            )
            break
    last_state = _cpu_copy(scored.state_dict())
    return TrainResult(
        best_state=best_state if best_state is not None else last_state,
        last_state=last_state,
        best_epoch=best_epoch,
        history=history,
        seconds=time.perf_counter() - start,
        images_seen=(len(history) - first_epoch + 1) * loop.steps_per_epoch * step.images,
    )


def open_live(directory: Path | str, history: list[dict[str, float]] = ()) -> Live:
    """A dvclive logger for one trainer: one step per epoch, plots declared in dvc.yaml.

    `dvcyaml=None` because dvc.yaml declares the metrics and plots itself (once), and
    `save_dvc_exp=False` because `dvc exp run` already records the experiment; no params
    are logged, as DVC records them (a params file here would be read as metrics).
    A resumed run passes the checkpoint's `history`: the logs are rebuilt from it rather
    than continued with dvclive's `resume=True`, so they match the checkpoint exactly even
    when the killed run died between saving the checkpoint and logging that epoch.
    """
    live = Live(dir=str(directory), save_dvc_exp=False, dvcyaml=None)
    log = live_epoch_logger(live)
    for stats in history:
        log(stats)
    return live


def live_epoch_logger(live: Live) -> EpochCallback:
    """Numbers become dvclive metrics; anything else is an image (a numpy array or a PIL
    image) saved as `<name>.png`."""

    def log(stats: dict[str, Any]) -> None:
        for name, value in stats.items():
            if isinstance(value, float | int):
                if name != "epoch":
                    live.log_metric(name, value)
            else:
                live.log_image(f"{name}.png", value)
        live.next_step()

    return log
