"""Stage evaluate: test-set accuracy and confusion matrix of every trained model.

The models are every method's (`fewlabels.methods.evaluated_models`): the methods of
params.yaml's `train`, the retrain, the ceilings and the VAE + SVM at each budget.

Writes metrics/evaluate.json as {model: {"test_accuracy": ..., ...}} (fractions in 0..1),
plots/confusion/<model>.csv (one row per test image) for DVC's confusion template, and the
results table metrics/summary.md.

With `split.val_size` > 0 the split holds labeled training images out of every training
set; each model trained on that split is also scored on them as `holdout_accuracy`, the
development metric to choose settings on (test_accuracy is for reporting only).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from fewlabels.checkpoint import load_trained
from fewlabels.config import load_params, resolve_device, run_stage
from fewlabels.evaluation import (
    classification_metrics,
    predict_logits,
    results_markdown,
    robustness_figure,
    robustness_markdown,
)
from fewlabels.io import save_figure, write_json, write_text
from fewlabels.methods import evaluated_models
from fewlabels.paths import METRICS_DIR, PLOTS_DIR, load_raw, load_split
from fewlabels.pseudo import robustness_sets
from fewlabels.svm import load_vae_svm

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


def load_holdout_set(dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's held-out labeled training images (`split.val_size` of them; may be 0)."""
    data, val_idx = load_raw(dataset), load_split()["val_idx"]
    return data["x_train"][val_idx], data["y_train"][val_idx]


def holdout_markdown(results: dict[str, dict]) -> str:
    """Held-out accuracy of the models that have one; empty when the split holds none out."""
    scored = {name: r for name, r in results.items() if "holdout_accuracy" in r}
    if not scored:
        return ""
    n_val = next(iter(scored.values()))["n_val"]
    lines = [
        "",
        f"## Held-out accuracy (development metric, {n_val:,} labeled training images)",
        "",
        "Choose settings on this, never on test accuracy.",
        "",
        "| model | held-out accuracy |",
        "|---|---:|",
        *(f"| {name} | {r['holdout_accuracy']:.2%} |" for name, r in scored.items()),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    params = load_params()
    cfg = params["evaluate"]
    device = resolve_device(params["device"])

    registry = evaluated_models(params)
    datasets = {name: model_dataset(name, params) for name in registry}
    test_sets = {d: load_test_set(d, cfg["test_size"]) for d in datasets.values()}
    x_holdout, y_holdout = load_holdout_set(params["dataset"])
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
        # Only models trained on the split never saw its held-out images (a ceiling trains
        # on every label, a VAE + SVM on its own dataset): they record n_val > 0.
        if meta["n_val"] and len(y_holdout):
            holdout = classification_metrics(scorer(x_holdout), y_holdout)["accuracy"]
            results[name]["holdout_accuracy"] = holdout
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
    descriptions = {name: entry["description"] for name, entry in registry.items()}
    reported = {name: entry["reported"] for name, entry in registry.items()}
    summary = results_markdown(results, descriptions, reported)
    summary += robustness_markdown(results, cfg["robustness"])
    summary += holdout_markdown(results)
    write_text(METRICS_DIR / "summary.md", summary)
    save_figure(PLOTS_DIR / "robustness.png", robustness_figure(results))


if __name__ == "__main__":
    run_stage(main)
