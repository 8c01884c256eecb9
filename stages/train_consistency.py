"""Stage train_consistency: the Waterloo report's CNN with unlabeled-image losses.

Cross-entropy on the labeled images plus, on unlabeled images, the report's cluster,
consistency and entropy losses and FixMatch's confidence-thresholded pseudo-labels (each
weighted in params.yaml; weight 0 switches it off). The evaluated and saved weights are an
exponential moving average of the trained ones when `ema_decay` > 0. Resumable like every
trainer (models/consistency/checkpoint.pt).
"""

from __future__ import annotations

from functools import partial

from .lib.config import DATASET_CLASSES, load_params, resolve_device, run_stage, seed_everything
from .lib.nets import build_model, waterloo_config
from .lib.paths import METRICS_DIR, load_raw, load_split, model_file
from .lib.resume import fit_and_save
from .lib.semi import STEP_KEYS, train_consistency


def main() -> None:
    params = load_params()
    cfg = params["train_consistency"]
    device = resolve_device(params["device"])
    generator = seed_everything(params["seed"])

    data, split = load_raw(params["dataset"]), load_split()
    labeled, val, unlabeled = split["labeled_idx"], split["val_idx"], split["unlabeled_idx"]
    arch_config = waterloo_config(cfg, DATASET_CLASSES[params["dataset"]])
    model = build_model("waterloo_cnn", **arch_config)
    fit_and_save(
        partial(
            train_consistency,
            model,
            data["x_train"][labeled],
            data["y_train"][labeled],
            data["x_train"][unlabeled],
            epochs=cfg["epochs"],
            steps_per_epoch=cfg["steps_per_epoch"],
            lr=cfg["lr"],
            lr_schedule=cfg["lr_schedule"],
            weight_decay=cfg["weight_decay"],
            ema_decay=cfg["ema_decay"],
            teacher=cfg["teacher"],
            **{key: cfg[key] for key in STEP_KEYS},
            device=device,
            generator=generator,
            x_val=data["x_train"][val],
            y_val=data["y_train"][val],
        ),
        model=model,
        model_path=model_file("consistency"),
        arch="waterloo_cnn",
        arch_config=arch_config,
        meta={
            "dataset": params["dataset"],
            "n_labeled": len(labeled),
            "n_val": len(val),
            "epochs": cfg["epochs"],
        },
        run_config={"train": cfg, "seed": params["seed"], "dataset": params["dataset"]},
        data=[labeled, val, unlabeled],
        code_file=__file__,
        live_dir=METRICS_DIR / "train_consistency",
        live_params={**cfg, "labels": len(labeled)},
    )
    print(f"consistency: {len(labeled)} labels (+{len(val)} validation) on {device}")


if __name__ == "__main__":
    run_stage(main)
