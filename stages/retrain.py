"""Stage retrain: a CNN trained on the labeled images plus the pseudo-labeled ones.

Pseudo-labels below `retrain.min_confidence` are left out. Labeled images keep their true
labels. Resumable like every trainer (models/retrain/checkpoint.pt).
"""

from __future__ import annotations

from functools import partial

import torch

from .lib.config import DATASET_CLASSES, load_params, resolve_device, run_stage, seed_everything
from .lib.io import load_arrays
from .lib.nets import build_model, waterloo_config
from .lib.paths import METRICS_DIR, PSEUDO_FILE, load_raw, load_split, model_file
from .lib.resume import fit_and_save
from .lib.train import train_classifier


def main() -> None:
    params = load_params()
    cfg = params["retrain"]
    device = resolve_device(params["device"])
    generator = seed_everything(params["seed"])

    data, split = load_raw(params["dataset"]), load_split()
    labeled, val = split["labeled_idx"], split["val_idx"]
    pseudo = {k: torch.from_numpy(v) for k, v in load_arrays(PSEUDO_FILE, "pseudo_label").items()}
    kept = pseudo["confidence"] >= cfg["min_confidence"]
    pseudo_idx, pseudo_label = pseudo["unlabeled_idx"][kept], pseudo["label"][kept].long()
    arch_config = waterloo_config(cfg, DATASET_CLASSES[params["dataset"]])
    model = build_model("waterloo_cnn", **arch_config)
    fit_and_save(
        partial(
            train_classifier,
            model,
            torch.cat([data["x_train"][labeled], data["x_train"][pseudo_idx]]),
            torch.cat([data["y_train"][labeled], pseudo_label]),
            epochs=cfg["epochs"],
            steps_per_epoch=cfg["steps_per_epoch"],
            batch_size=cfg["batch_size"],
            lr=cfg["lr"],
            lr_schedule=cfg["lr_schedule"],
            weight_decay=cfg["weight_decay"],
            augment=cfg["augment"],
            device=device,
            generator=generator,
            x_val=data["x_train"][val],
            y_val=data["y_train"][val],
        ),
        model=model,
        model_path=model_file("retrain"),
        arch="waterloo_cnn",
        arch_config=arch_config,
        meta={
            "dataset": params["dataset"],
            "n_labeled": len(labeled),
            "n_val": len(val),
            "n_pseudo_labeled": len(pseudo_idx),
            "epochs": cfg["epochs"],
        },
        run_config={"train": cfg, "seed": params["seed"], "dataset": params["dataset"]},
        data=[labeled, val, pseudo_idx, pseudo_label],
        code_file=__file__,
        live_dir=METRICS_DIR / "retrain",
        live_params={**cfg, "labels": len(labeled), "pseudo_labeled": len(pseudo_idx)},
    )
    print(f"retrain: {len(labeled)} labels + {len(pseudo_idx)} pseudo-labels on {device}")


if __name__ == "__main__":
    run_stage(main)
