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

from .io import load_training_state, save_training_state
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
