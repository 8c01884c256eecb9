"""RBF-kernel SVM on latent features, its hyper-parameters chosen on the labeled set alone.

With 10 labels a class, a held-out validation set would cost half the labels; instead C
and gamma come from stratified k-fold cross-validation on the labeled images, with as
many folds as the rarest class allows (each fold needs one image of every class).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from .checkpoint import check_dataset, load_trained
from .config import PipelineError
from .evaluation import eval_mode, map_batches
from .io import atomic_open
from .models.vae import VAE
from .paths import svm_file


def encode_means(
    model: VAE, images: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Latent means of uint8 images (N, H, W), on CPU: the features the SVM sees."""
    with eval_mode(model):
        return map_batches(lambda x: model.encode(x)[0], images, batch_size, device).cpu()


def cv_folds(labels: np.ndarray, max_folds: int) -> int:
    """Folds for stratified CV: at most `max_folds`, at most the rarest class's count.

    0 means too few labels to cross-validate (a class with a single image); the caller
    then fits the first grid point.
    """
    rarest = int(np.bincount(labels).min()) if len(labels) else 0
    folds = min(max_folds, rarest)
    return folds if folds >= 2 else 0


def fit_rbf_svm(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    c_grid: list[float],
    gamma_grid: list[float],
    standardize: bool,
    max_folds: int,
    seed: int,
) -> tuple[Pipeline, dict[str, Any]]:
    """Fit (optionally standardized) features -> one-vs-rest RBF SVM, C and gamma by CV.

    `gamma_grid` holds multiples of sklearn's `gamma="scale"`, 1 / (dims * feature
    variance), so one grid fits any latent size. Returns the refitted pipeline and what
    the search chose.
    """
    dims = features.shape[1]
    variance = 1.0 if standardize else float(features.var())
    gammas = [m / (dims * max(variance, 1e-12)) for m in gamma_grid]
    steps = [StandardScaler()] if standardize else []
    pipeline = make_pipeline(*steps, SVC(kernel="rbf", decision_function_shape="ovr"))
    folds = cv_folds(labels, max_folds)
    if not folds:
        pipeline.set_params(svc__C=c_grid[0], svc__gamma=gammas[0]).fit(features, labels)
        return pipeline, {"C": c_grid[0], "gamma_multiple": gamma_grid[0], "cv_folds": 0}
    search = GridSearchCV(
        pipeline,
        {"svc__C": c_grid, "svc__gamma": gammas},
        cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
        n_jobs=1,  # the stage runs beside other trainers: one core, deterministic order
    )
    search.fit(features, labels)
    best = search.best_params_
    return search.best_estimator_, {
        "C": best["svc__C"],
        "gamma_multiple": gamma_grid[gammas.index(best["svc__gamma"])],
        "cv_folds": folds,
        "cv_accuracy": float(search.best_score_),
    }


def save_svm(path: Path | str, pipeline: Pipeline, meta: dict[str, Any]) -> None:
    with atomic_open(path) as handle:
        pickle.dump({"pipeline": pipeline, "meta": meta}, handle)


def load_svm(path: Path | str, producer: str) -> tuple[Pipeline, dict[str, Any]]:
    """A pickled SVM written by `save_svm` (a file this pipeline wrote, not outside input)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"missing input {path}: run `dvc repro {producer}` first")
    with open(path, "rb") as handle:
        saved = pickle.load(handle)
    return saved["pipeline"], saved["meta"]


def load_vae_svm(
    labels: int, dataset: str, batch_size: int, device: torch.device
) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """Model vae_svm@<labels> as a function from uint8 images to class scores, and its meta.

    The scores are the one-vs-rest SVM's decision values: their argmax is the prediction,
    but they are not logits (no softmax or cross-entropy means anything on them).
    """
    vae, _ = load_trained("vae", dataset)
    vae.to(device)
    svm, meta = load_svm(svm_file(labels), producer=f"vae_svm@{labels}")
    check_dataset(svm_file(labels), meta, dataset)

    def scores(images: torch.Tensor) -> torch.Tensor:
        features = encode_means(vae, images, batch_size, device).numpy()
        return torch.from_numpy(svm.decision_function(features)).float()

    return scores, meta
