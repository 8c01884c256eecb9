"""Stage evaluate: test-set accuracy and confusion matrix of every trained model.

Writes metrics/evaluate.json as {model: {"test_accuracy": ..., ...}} (fractions in 0..1),
plots/confusion/<model>.csv (one row per test image) for DVC's confusion template, and the
results table metrics/summary.md.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from .lib import sgan  # noqa: F401  (registers the SGAN's architectures with load_model)
from .lib.config import load_params, resolve_device, run_stage
from .lib.evaluation import (
    classification_metrics,
    predict_logits,
    results_markdown,
    robustness_figure,
    robustness_markdown,
)
from .lib.io import save_figure, write_json, write_text
from .lib.paths import METRICS_DIR, PLOTS_DIR, load_raw, load_trained
from .lib.pseudo import robustness_sets
from .lib.svm import load_vae_svm

# What each model is, for the results table.
METHODS = {
    "baseline": "supervised CNN, labeled images only",
    "sgan": "SGAN: K+1 discriminator, feature-matching generator (best validation epoch)",
    "sgan_last": "SGAN: the same run's last epoch (= sgan without a validation split)",
    "consistency": "Waterloo CNN + unlabeled losses (thresholded pseudo-labels, EMA)",
    "retrain": "CNN retrained on labeled + k-means pseudo-labeled images",
    "ceiling_linear": "fully supervised ceiling: linear softmax",
    "ceiling_fc256": "fully supervised ceiling: fully connected, 256 ReLU",
    "ceiling_cnn4": "fully supervised ceiling: 4-layer CNN",
    "ceiling_cnn5": "fully supervised ceiling: 5-layer CNN",
    **{
        f"vae_svm@{n}": "M1: VAE latent means (all images, no labels) + RBF SVM"
        for n in (100, 600, 1000, 3000)
    },
}
# Headline figures of the seed reports (floors to beat), by (dataset, labels used).
REPORTED = {
    "baseline": {("mnist", 100): ("SGAN report", 0.8273)},
    "sgan": {("mnist", 100): ("SGAN report", 0.9782)},
    # The Waterloo report gives 98.28% at 6000 labels and "95% plus" below 1% of labels.
    "consistency": {("mnist", 6000): ("Waterloo report", 0.9828)},
    # The k-means report: about 90% with 10% of the labels (6000).
    "retrain": {("mnist", 6000): ("k-means report", 0.90)},
    "ceiling_linear": {("mnist", 60000): ("CS229 report", 0.919)},
    "ceiling_fc256": {("mnist", 60000): ("CS229 report", 0.978)},
    "ceiling_cnn4": {("mnist", 60000): ("CS229 report", 0.986)},
    "ceiling_cnn5": {("mnist", 60000): ("CS229 report", 0.994)},
    # VAE report (Fashion-MNIST); MNIST 100: Kingma et al.'s M1 + TSVM, 11.82% error.
    "vae_svm@100": {
        ("fashion-mnist", 100): ("VAE report", 0.6482),
        ("mnist", 100): ("Kingma et al. M1+TSVM", 0.8818),
    },
    "vae_svm@600": {("fashion-mnist", 600): ("VAE report", 0.7632)},
    "vae_svm@1000": {("fashion-mnist", 1000): ("VAE report", 0.7647)},
    "vae_svm@3000": {("fashion-mnist", 3000): ("VAE report", 0.7990)},
}

Scorer = Callable[[torch.Tensor], torch.Tensor]


def model_dataset(name: str, params: dict[str, Any]) -> str:
    """The dataset model `name` is trained and tested on: VAE + SVM models have their own."""
    return params["vae_svm"]["dataset"] if name.startswith("vae_svm@") else params["dataset"]


def load_scorer(
    name: str, dataset: str, batch_size: int, device: torch.device
) -> tuple[Scorer, dict[str, Any]]:
    """Model `name` as a function from uint8 images to class scores, and its meta."""
    if name.startswith("vae_svm@"):
        return load_vae_svm(int(name.split("@")[1]), dataset, batch_size, device)
    model, meta = load_trained(name, dataset)
    return partial(predict_logits, model.to(device), batch_size=batch_size, device=device), meta


def load_test_set(dataset: str, test_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_raw(dataset)
    if test_size:
        return data["x_test"][:test_size], data["y_test"][:test_size]
    return data["x_test"], data["y_test"]


def main() -> None:
    params = load_params()
    cfg = params["evaluate"]
    device = resolve_device(params["device"])

    datasets = {name: model_dataset(name, params) for name in cfg["models"]}
    test_sets = {d: load_test_set(d, cfg["test_size"]) for d in datasets.values()}
    # Load every model first: a missing one stops the stage before anything is written.
    models = {
        name: load_scorer(name, dataset, cfg["batch_size"], device)
        for name, dataset in datasets.items()
    }
    results = {}
    for name, (scorer, meta) in models.items():
        dataset = datasets[name]
        x_test, y_test = test_sets[dataset]
        logits = scorer(x_test)
        metrics = classification_metrics(logits, y_test)
        test_loss = metrics.pop("loss")
        results[name] = {
            "dataset": dataset,
            "test_accuracy": metrics.pop("accuracy"),
            # Only real logits have a cross-entropy; SVM decision values do not.
            **({} if name.startswith("vae_svm@") else {"test_loss": test_loss}),
            "n_labeled": meta["n_labeled"],
            "n_val": meta["n_val"],
            # Labels the method saw in all: training labels plus validation labels.
            "labels_used": meta["n_labeled"] + meta["n_val"],
            "n_test": len(y_test),
            "per_class_accuracy": {k.split("_")[1]: v for k, v in metrics.items()},
        }
        rows = "\n".join(
            f"{a},{p}" for a, p in zip(y_test.tolist(), logits.argmax(1).tolist(), strict=True)
        )
        write_text(PLOTS_DIR / "confusion" / f"{name}.csv", f"actual,predicted\n{rows}\n")
        print(f"{name}: test accuracy {results[name]['test_accuracy']:.4f} on {len(y_test)} images")
    # Corrupted copies of each test set, made once; the same images for every model.
    corrupted = {
        dataset: robustness_sets(x, **cfg["robustness"], seed=0)
        for dataset, (x, _) in test_sets.items()
    }
    for name, (scorer, _) in models.items():
        y_test = test_sets[datasets[name]][1]
        results[name]["robustness_accuracy"] = {
            kind: classification_metrics(scorer(images), y_test)["accuracy"]
            for kind, images in corrupted[datasets[name]].items()
        }
    write_json(METRICS_DIR / "evaluate.json", results)
    summary = results_markdown(results, METHODS, REPORTED)
    summary += robustness_markdown(results, cfg["robustness"])
    write_text(METRICS_DIR / "summary.md", summary)
    save_figure(PLOTS_DIR / "robustness.png", robustness_figure(results))


if __name__ == "__main__":
    run_stage(main)
