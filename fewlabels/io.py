"""Atomic file writes.

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

from .config import PipelineError


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


def save_image(path: Path | str, image: np.ndarray) -> None:
    """Write a uint8 image array (H, W) atomically as a PNG."""
    from PIL import Image  # matplotlib's dependency; only the stages that draw need it

    with atomic_open(path) as handle:
        Image.fromarray(image).save(handle, format="png")


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
