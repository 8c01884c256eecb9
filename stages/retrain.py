"""Stage retrain: the Waterloo CNN trained on the labeled images plus the k-means
pseudo-labeled ones (fewlabels/methods/retrain.py). Pseudo-labels below
`retrain.min_confidence` are left out; labeled images keep their true labels. Resumable
like every trainer (models/retrain/checkpoint.pt).
"""

from __future__ import annotations

import dataclasses

import torch

from fewlabels.config import (
    DATASET_CLASSES,
    load_params,
    run_stage,
)
from fewlabels.io import load_arrays
from fewlabels.methods import parse_method_config, retrain
from fewlabels.paths import METRICS_DIR, PSEUDO_FILE, load_raw, load_split, model_file
from fewlabels.resume import RunRecord, fit_and_save, start_run


def main() -> None:
    params = load_params()
    cfg = parse_method_config("retrain", params)
    raw, split = load_raw(params["dataset"]), load_split()
    labeled, val = split["labeled_idx"], split["val_idx"]
    run = start_run(params, x_val=raw["x_train"][val], y_val=raw["y_train"][val])
    device = run.device
    pseudo = {k: torch.from_numpy(v) for k, v in load_arrays(PSEUDO_FILE, "pseudo_label").items()}
    kept = pseudo["confidence"] >= cfg.min_confidence
    pseudo_idx, pseudo_label = pseudo["unlabeled_idx"][kept], pseudo["label"][kept].long()
    x = torch.cat([raw["x_train"][labeled], raw["x_train"][pseudo_idx]]).to(device)
    y = torch.cat([raw["y_train"][labeled], pseudo_label]).to(device)
    model, parts = retrain.build(cfg, DATASET_CLASSES[params["dataset"]])
    model.to(device)
    record = RunRecord(
        config={
            "seed": params["seed"],
            "dataset": params["dataset"],
            "retrain": dataclasses.asdict(cfg),
        },
        indices=[labeled, val, pseudo_idx, pseudo_label],
        meta={
            "dataset": params["dataset"],
            "n_labeled": len(labeled),
            "n_val": len(val),
            "n_pseudo_labeled": len(pseudo_idx),
        },
        model_dir=model_file("retrain").parent,
        live_dir=METRICS_DIR / "retrain",
    )
    print(f"retrain: {len(labeled)} labels + {len(pseudo_idx)} pseudo-labels on {device}")
    fit_and_save(lambda run: retrain.train(model, (x, y), cfg, run), run, model, parts, record)


if __name__ == "__main__":
    run_stage(main)
