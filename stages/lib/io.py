"""Atomic file writes and model checkpoints.

Every output is written to a temporary file in the same folder and renamed into place,
so an interrupted stage leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from .config import PipelineError
from .nets import build_model

# The shared library's sources: part of every run fingerprint, so a code change never
# resumes a checkpoint written by different code.
LIB_SOURCES = sorted(Path(__file__).parent.glob("*.py"))


@contextmanager
def atomic_open(path: Path | str, mode: str = "wb") -> Iterator[IO[Any]]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A process killed mid-write (SIGKILL skips `finally`) leaves its temporary file:
    # clear those first so they do not end up inside a DVC output.
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)
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


def save_figure(path: Path | str, fig: Any) -> None:
    """Write a matplotlib figure atomically, in the format its suffix names (.png, .svg)."""
    path = Path(path)
    with atomic_open(path) as handle:
        fig.savefig(handle, format=path.suffix.lstrip("."))


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


def run_fingerprint(
    config: dict[str, Any], tensors: Iterable[torch.Tensor], code_files: Iterable[Path | str]
) -> str:
    """Hash of what determines a training run: its params, its data indices, its code."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for tensor in tensors:
        digest.update(tensor.cpu().contiguous().numpy().tobytes())
    for path in [*map(Path, code_files), *LIB_SOURCES]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def save_training_state(path: Path | str, state: dict[str, Any], fingerprint: str) -> None:
    with atomic_open(path) as handle:
        torch.save({"fingerprint": fingerprint, **state}, handle)


def load_training_state(path: Path | str, fingerprint: str) -> dict[str, Any] | None:
    """The saved state of an interrupted run with the same fingerprint, else None.

    A state from other params, data or code is never resumed silently: say so, start fresh.
    """
    path = Path(path)
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.pop("fingerprint", None) != fingerprint:
        print(f"{path} was written with other params, data or code: ignoring it, starting fresh")
        return None
    print(f"resuming from {path} after epoch {state['epoch']}")
    return state
