"""Resumable stage runs: the checkpoint file and dvclive folder around a trainer.

A stage hands over a trainer call (a `functools.partial` of e.g. `train_classifier`
missing only the three hooks); `fit_resumable` resumes it from the checkpoint when the
fingerprint matches, logs every epoch to dvclive, saves the training state after every
epoch, and removes the checkpoint only once `save_final` has written the finished model.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .io import load_training_state, run_fingerprint, save_checkpoint, save_training_state
from .train import TrainResult, live_epoch_logger, open_live


def fit_resumable(
    train: Callable[..., TrainResult],
    *,
    checkpoint: Path,
    fingerprint: str,
    live_dir: Path,
    live_params: dict[str, Any],
    save_final: Callable[[TrainResult], None],
) -> TrainResult:
    resume = load_training_state(checkpoint, fingerprint)
    history = resume["history"] if resume else []
    with open_live(live_dir, live_params, history) as live:
        result = train(
            on_epoch=live_epoch_logger(live),
            on_checkpoint=partial(save_training_state, checkpoint, fingerprint=fingerprint),
            resume=resume,
        )
        live.summary["best_epoch"] = result.best_epoch
    save_final(result)
    checkpoint.unlink(missing_ok=True)
    rate = result.images_seen / max(result.seconds, 1e-9)
    print(f"{len(result.history)} epochs; this run {result.seconds:.1f}s, {rate:.0f} images/s")
    return result


def fit_and_save(
    train: Callable[..., TrainResult],
    *,
    model: nn.Module,
    model_path: Path,
    arch: str,
    arch_config: dict[str, Any],
    meta: dict[str, Any],
    run_config: dict[str, Any],
    data: list[torch.Tensor],
    code_file: Path | str,
    live_dir: Path,
    live_params: dict[str, Any],
) -> TrainResult:
    """What every trainer stage does around its trainer call: resume from the checkpoint
    beside `model_path` if it belongs to this run (same `run_config`, `data` and code),
    log to `live_dir`, and save the best-on-validation weights (the last epoch's when there
    is no validation set) as a self-describing checkpoint with `meta`.
    """

    def save_final(result: TrainResult) -> None:
        model.load_state_dict(result.best_state)
        final_meta = {**meta, "best_epoch": result.best_epoch}
        save_checkpoint(model_path, model, arch, arch_config, final_meta)

    return fit_resumable(
        train,
        checkpoint=model_path.with_name("checkpoint.pt"),
        fingerprint=run_fingerprint(run_config, data, code_files=[code_file]),
        live_dir=live_dir,
        live_params=live_params,
        save_final=save_final,
    )
