"""Score trained models on the test set as `evaluate` does, without the other models.

For runs that train one method on another split seed (the three-seed figures in docs/):
`evaluate` needs every model, this needs only the ones named. Prints one JSON line per
model and writes nothing.

    python -m tools.score vat              # models/vat/model.pt on params.yaml's dataset
"""

from __future__ import annotations

import argparse
import json

from fewlabels.checkpoint import load_trained
from fewlabels.config import load_params, resolve_device, run_stage
from fewlabels.evaluation import classification_metrics, predict_logits
from fewlabels.paths import load_raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model names, e.g. vat sgan_last")
    args = parser.parse_args()
    params = load_params()
    device = resolve_device(params["device"])
    data = load_raw(params["dataset"])
    size = params["evaluate"]["test_size"] or len(data["y_test"])
    x_test, y_test = data["x_test"][:size], data["y_test"][:size]
    for name in args.models:
        model, meta = load_trained(name, params["dataset"])
        logits = predict_logits(model.to(device), x_test, params["evaluate"]["batch_size"], device)
        metrics = classification_metrics(logits, y_test)
        row = {
            "model": name,
            "seed": params["seed"],
            "labels_used": meta["n_labeled"] + meta["n_val"],
        }
        print(json.dumps({**row, "test_accuracy": metrics["accuracy"], "n_test": len(y_test)}))


if __name__ == "__main__":
    run_stage(main)
