"""Stage evaluate: test-set accuracy and confusion matrix of every trained model.

Writes metrics/evaluate.json as {model: {"test_accuracy": ..., ...}} (fractions in 0..1),
plots/confusion/<model>.csv (one row per test image) for DVC's confusion template, and the
results table metrics/summary.md.
"""

from __future__ import annotations

from .lib.config import MODEL_PRODUCERS, PipelineError, load_params, resolve_device, run_stage
from .lib.evaluation import classification_metrics, predict_logits, results_markdown
from .lib.io import load_model, write_json, write_text
from .lib.paths import METRICS_DIR, PLOTS_DIR, load_raw, model_file

# What each model is, for the results table.
METHODS = {
    "baseline": "supervised CNN, labeled images only",
    "ceiling_linear": "fully supervised ceiling: linear softmax",
    "ceiling_fc256": "fully supervised ceiling: fully connected, 256 ReLU",
    "ceiling_cnn4": "fully supervised ceiling: 4-layer CNN",
    "ceiling_cnn5": "fully supervised ceiling: 5-layer CNN",
}
# Headline figures of the seed reports (floors to beat), by (dataset, labels used).
REPORTED = {
    "baseline": {("mnist", 100): ("SGAN report", 0.8273)},
    "ceiling_linear": {("mnist", 60000): ("CS229 report", 0.919)},
    "ceiling_fc256": {("mnist", 60000): ("CS229 report", 0.978)},
    "ceiling_cnn4": {("mnist", 60000): ("CS229 report", 0.986)},
    "ceiling_cnn5": {("mnist", 60000): ("CS229 report", 0.994)},
}


def main() -> None:
    params = load_params()
    cfg = params["evaluate"]
    device = resolve_device(params["device"])
    data = load_raw(params["dataset"])
    x_test, y_test = data["x_test"], data["y_test"]
    if cfg["test_size"]:
        x_test, y_test = x_test[: cfg["test_size"]], y_test[: cfg["test_size"]]

    # Load every model first: a missing one stops the stage before anything is written.
    models = {name: load_model(model_file(name), MODEL_PRODUCERS[name]) for name in cfg["models"]}
    for name, (_, meta) in models.items():
        if meta["dataset"] != params["dataset"]:
            raise PipelineError(
                f"{model_file(name)} was trained on {meta['dataset']}, but dataset is "
                f"{params['dataset']}; run `dvc repro` to retrain it"
            )
    results = {}
    for name, (model, meta) in models.items():
        logits = predict_logits(model.to(device), x_test, cfg["batch_size"], device)
        metrics = classification_metrics(logits, y_test)
        results[name] = {
            "test_accuracy": metrics.pop("accuracy"),
            "test_loss": metrics.pop("loss"),
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
    write_json(METRICS_DIR / "evaluate.json", results)
    write_text(
        METRICS_DIR / "summary.md", results_markdown(results, params["dataset"], METHODS, REPORTED)
    )


if __name__ == "__main__":
    run_stage(main)
