"""Atomic file writes and model checkpoints.

Every output is written to a temporary file in the same folder and renamed into place,
so an interrupted stage leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from .config import PipelineError
from .nets import build_model


@contextmanager
def atomic_open(path: Path | str, mode: str = "wb") -> Iterator[IO[Any]]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path | str, obj: Any) -> None:
    with atomic_open(path, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=False)
        handle.write("\n")


def write_text(path: Path | str, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def save_arrays(path: Path | str, **arrays: np.ndarray) -> None:
    with atomic_open(path) as handle:
        np.savez(handle, **arrays)


def load_arrays(path: Path | str, producer: str) -> dict[str, np.ndarray]:
    """Read an .npz output of an upstream stage, naming that stage if it is missing."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"missing input {path}: run `dvc repro {producer}` first")
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def save_checkpoint(
    path: Path | str, model: nn.Module, arch: str, config: dict[str, Any], meta: dict[str, Any]
) -> None:
    """Save a self-describing checkpoint: `load_model` rebuilds it without knowing the stage."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_open(path) as handle:
        torch.save({"arch": arch, "config": config, "state_dict": state, "meta": meta}, handle)


def load_model(path: Path | str, producer: str) -> tuple[nn.Module, dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"missing input {path}: run `dvc repro {producer}` first")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(checkpoint["arch"], **checkpoint["config"])
    model.load_state_dict(checkpoint["state_dict"])
    return model, checkpoint["meta"]
