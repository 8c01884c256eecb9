"""Stage pseudo_label: k-means on the unlabeled features, every cluster named with a class.

Writes data/pseudo/pseudo_labels.npz (unlabeled index, pseudo-label, confidence) and
metrics/pseudo_label.json. The metric `hidden_label_accuracy` compares the pseudo-labels
with the true labels of the unlabeled images, which the method never sees: it is a
diagnostic for this report only, never used by any stage.
"""

from __future__ import annotations

import numpy as np

from fewlabels.config import load_params, number, run_stage
from fewlabels.io import load_arrays, save_arrays, write_json
from fewlabels.paths import FEATURES_FILE, METRICS_DIR, PSEUDO_FILE, load_raw, load_split
from fewlabels.pseudo import kmeans_pseudo_labels


def main() -> None:
    params = load_params()
    cfg = params["pseudo_label"]
    # retrain's knob, read here only to report how many pseudo-labels it keeps.
    min_confidence = params["retrain"].get("min_confidence")
    number(0, 1)(min_confidence, "retrain.min_confidence")
    features = load_arrays(FEATURES_FILE, producer="extract_features")["train"].astype(np.float32)
    split = {k: v.numpy() for k, v in load_split().items()}
    y_train = load_raw(params["dataset"])["y_train"].numpy()
    labeled, unlabeled = split["labeled_idx"], split["unlabeled_idx"]
    result = kmeans_pseudo_labels(
        features[labeled],
        y_train[labeled],
        features[unlabeled],
        rule=cfg["rule"],
        n_clusters=cfg["n_clusters"],
        n_init=cfg["n_init"],
        n_neighbors=cfg["n_neighbors"],
        seed=params["seed"],
    )
    save_arrays(
        PSEUDO_FILE,
        unlabeled_idx=unlabeled,
        label=result["label"],
        confidence=result["confidence"],
    )
    right = result["label"] == y_train[unlabeled]
    kept = result["confidence"] >= min_confidence
    metrics = {
        "n_pseudo_labeled": len(unlabeled),
        "hidden_label_accuracy": float(right.mean()),
        "n_kept_for_retrain": int(kept.sum()),
        "hidden_label_accuracy_of_kept": float(right[kept].mean()) if kept.any() else 0.0,
        "hidden_label_accuracy_per_class": {
            str(c): float(right[y_train[unlabeled] == c].mean()) for c in np.unique(y_train)
        },
    }
    write_json(METRICS_DIR / "pseudo_label.json", metrics)
    print(
        f"pseudo-labels ({cfg['rule']}, {cfg['n_clusters']} clusters): accuracy against the "
        f"hidden labels {metrics['hidden_label_accuracy']:.4f}; {metrics['n_kept_for_retrain']} "
        f"kept for retrain"
    )


if __name__ == "__main__":
    run_stage(main)
