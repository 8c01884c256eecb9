"""Resumable training runs: the checkpoint file and the dvclive folder around a trainer.

A stage hands over its trainer as a function of the `Run` (whose hooks are filled in
here); `fit_and_save` resumes it from the checkpoint when the run's fingerprint matches,
logs every epoch to dvclive, saves the training state after every epoch, writes the
finished networks, and removes the checkpoint only once they are written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_training_state, run_fingerprint, save_checkpoint, save_training_state
from .config import resolve_device, seed_everything
from .models import Network
from .train import Run, TrainResult, live_epoch_logger, open_live


def start_run(params: dict[str, Any], **validation: torch.Tensor) -> Run:
    """A trainer stage's run: the device (resolved once, here) and the sampler, with every
    random stream seeded from `seed` (before the networks are built, so their initial
    weights are the seed's too); `validation`: x_val and y_val."""
    return Run(resolve_device(params["device"]), seed_everything(params["seed"]), **validation)


@dataclass(frozen=True)
class RunRecord:
    """What identifies a training run and where it writes. `config` (the params it read)
    and `indices` (its data) are fingerprinted with the code, so a checkpoint of another
    run is never resumed; `meta` is saved with every network; `model_dir` receives
    `<part>.pt` (the best epoch on validation, the last without validation images),
    `<part>_last.pt` and the checkpoint; `live_dir` the dvclive logs."""

    config: dict[str, Any]
    indices: list[torch.Tensor]
    meta: dict[str, Any]
    model_dir: Path
    live_dir: Path


def fit_and_save(
    train: Callable[[Run], TrainResult],
    run: Run,
    model: torch.nn.Module,
    parts: dict[str, Network],
    record: RunRecord,
) -> TrainResult:
    """Train `model` (resuming when the checkpoint is this run's), then save each of its
    `parts` (networks inside `model`) at the best and at the last epoch; `model` is left
    holding the best weights."""
    checkpoint = record.model_dir / "checkpoint.pt"
    fingerprint = run_fingerprint(record.config, record.indices)
    resume = load_training_state(checkpoint, fingerprint)
    with open_live(record.live_dir, resume["history"] if resume else []) as live:
        result = train(
            run.with_hooks(
                on_epoch=live_epoch_logger(live),
                on_checkpoint=partial(save_training_state, checkpoint, fingerprint=fingerprint),
                resume=resume,
            )
        )
        live.summary["best_epoch"] = result.best_epoch
    saved = (
        ("_last", result.last_state, len(result.history)),
        ("", result.best_state, result.best_epoch),
    )
    for suffix, state, epoch in saved:
        model.load_state_dict(state)
        for part, net in parts.items():
            meta = {**record.meta, "epoch": epoch}
            save_checkpoint(record.model_dir / f"{part}{suffix}.pt", net, meta)
    checkpoint.unlink(missing_ok=True)
    rate = result.images_seen / max(result.seconds, 1e-9)
    print(f"{len(result.history)} epochs; this run {result.seconds:.1f}s, {rate:.0f} images/s")
    return result
