"""Where stages read and write. One place, so stage scripts and dvc.yaml agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .io import load_arrays

RAW_DIR = Path("data/raw")
SPLIT_FILE = Path("data/split/split.npz")
FEATURES_FILE = Path("data/features/features.npz")
PSEUDO_FILE = Path("data/pseudo/pseudo_labels.npz")
MODELS_DIR = Path("models")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")


def raw_file(dataset: str) -> Path:
    return RAW_DIR / f"{dataset}.npz"


OWN_STAGES = {"retrain": "retrain", "vae": "train_vae"}


def model_file(name: str, part: str = "model") -> Path:
    """Model `name`'s checkpoint: models/<name>/<part>.pt; `<method>_last` names the
    last epoch of a method whose `<method>` is its best epoch on validation."""
    if name.endswith("_last"):
        return MODELS_DIR / name.removesuffix("_last") / f"{part}_last.pt"
    return MODELS_DIR / name / f"{part}.pt"


def producer(name: str) -> str:
    """The stage that writes model `name`."""
    name = name.removesuffix("_last")
    if name.startswith("ceiling_"):
        return f"train_ceilings@{name.removeprefix('ceiling_')}"
    return OWN_STAGES.get(name, f"train@{name}")


def svm_file(labels: int) -> Path:
    """The SVM of model vae_svm@<labels> (DVC stage names may hold '@', paths here do not)."""
    return MODELS_DIR / f"vae_svm_{labels}" / "model.pkl"


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
