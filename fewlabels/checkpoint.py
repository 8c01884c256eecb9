"""Model checkpoints and resumable training states.

A model is saved self-describing (architecture name, its config, weights, meta), so
`load_model` rebuilds it without knowing the stage that trained it. A training state is
saved with a fingerprint of the run (params, data, code) and resumed only by that run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import PipelineError
from .io import atomic_open
from .models import Network, build_model
from .paths import model_file, producer

# The project's code (library and stage scripts): part of every run fingerprint, so a
# code change never resumes a checkpoint written by different code.
CODE_FILES = sorted(
    [*Path(__file__).parent.rglob("*.py"), *(Path(__file__).parents[1] / "stages").glob("*.py")]
)


def save_checkpoint(path: Path | str, net: Network, meta: dict[str, Any]) -> None:
    """Save a self-describing checkpoint: `load_model` rebuilds it without knowing the stage."""
    state = {k: v.detach().cpu() for k, v in net.module.state_dict().items()}
    checkpoint = {"arch": net.arch, "config": net.config, "state_dict": state, "meta": meta}
    with atomic_open(path) as handle:
        torch.save(checkpoint, handle)


def load_model(path: Path | str, producer: str) -> tuple[nn.Module, dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"missing input {path}: run `dvc repro {producer}` first")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(checkpoint["arch"], **checkpoint["config"])
    model.load_state_dict(checkpoint["state_dict"])
    return model, checkpoint["meta"]


def run_fingerprint(config: dict[str, Any], tensors: Iterable[torch.Tensor]) -> str:
    """Hash of what determines a training run: its params, its data indices, its code."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for tensor in tensors:
        digest.update(tensor.cpu().contiguous().numpy().tobytes())
    for path in CODE_FILES:
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


def check_dataset(path: Path, meta: dict, dataset: str) -> None:
    """Stop when the model at `path` was trained on another dataset than `dataset`."""
    if meta["dataset"] != dataset:
        raise PipelineError(
            f"{path} was trained on {meta['dataset']}, but dataset is "
            f"{dataset}; run `dvc repro` to retrain it"
        )


def load_trained(name: str, dataset: str, part: str = "model") -> tuple[nn.Module, dict]:
    """Network `part` of model `name` and its meta; stop if it was trained on another
    dataset."""
    path = model_file(name, part)
    model, meta = load_model(path, producer(name))
    check_dataset(path, meta, dataset)
    return model, meta
