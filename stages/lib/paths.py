"""Where stages read and write. One place, so stage scripts and dvc.yaml agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .io import load_arrays

RAW_DIR = Path("data/raw")
SPLIT_FILE = Path("data/split/split.npz")
MODELS_DIR = Path("models")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")


def raw_file(dataset: str) -> Path:
    return RAW_DIR / f"{dataset}.npz"


def model_file(name: str) -> Path:
    return MODELS_DIR / name / "model.pt"


def load_raw(dataset: str) -> dict[str, torch.Tensor]:
    """x_train, y_train, x_test, y_test of a downloaded dataset as CPU tensors (uint8/int64)."""
    arrays = load_arrays(raw_file(dataset), producer="download")
    return {
        key: torch.from_numpy(value if key.startswith("x") else value.astype(np.int64))
        for key, value in arrays.items()
    }


def load_split() -> dict[str, torch.Tensor]:
    """labeled_idx, val_idx, unlabeled_idx into the training set."""
    return {k: torch.from_numpy(v) for k, v in load_arrays(SPLIT_FILE, producer="split").items()}
