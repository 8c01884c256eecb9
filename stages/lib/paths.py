"""Where stages read and write. One place, so stage scripts and dvc.yaml agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import MODEL_PRODUCERS, PipelineError
from .io import load_arrays, load_model

RAW_DIR = Path("data/raw")
SPLIT_FILE = Path("data/split/split.npz")
FEATURES_FILE = Path("data/features/features.npz")
PSEUDO_FILE = Path("data/pseudo/pseudo_labels.npz")
MODELS_DIR = Path("models")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")


def raw_file(dataset: str) -> Path:
    return RAW_DIR / f"{dataset}.npz"


# The SGAN's discriminators (best and last epoch) are its classifiers.
SGAN_DIR = MODELS_DIR / "sgan"
CLASSIFIER_FILES = {
    "sgan": SGAN_DIR / "discriminator.pt",
    "sgan_last": SGAN_DIR / "discriminator_last.pt",
}


def model_file(name: str) -> Path:
    return CLASSIFIER_FILES.get(name, MODELS_DIR / name / "model.pt")


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


def check_dataset(path: Path, meta: dict, dataset: str) -> None:
    """Stop when the model at `path` was trained on another dataset than `dataset`."""
    if meta["dataset"] != dataset:
        raise PipelineError(
            f"{path} was trained on {meta['dataset']}, but dataset is "
            f"{dataset}; run `dvc repro` to retrain it"
        )


def load_trained(name: str, dataset: str, producer: str | None = None) -> tuple[nn.Module, dict]:
    """Model `name` (made by `producer`, by default its MODEL_PRODUCERS stage) and its meta;
    stop if it was trained on another dataset."""
    model, meta = load_model(model_file(name), producer or MODEL_PRODUCERS[name])
    check_dataset(model_file(name), meta, dataset)
    return model, meta
