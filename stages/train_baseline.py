"""Stage train_baseline: the SGAN report's compact CNN trained on the labeled images only.

Resumable: the training state is saved after every epoch to models/baseline/checkpoint.pt
(a persist output), so a killed run started again continues where it stopped and ends with
the same model; the checkpoint is removed once the final model is written.
"""

from __future__ import annotations

from functools import partial

from .lib.config import DATASET_CLASSES, load_params, resolve_device, run_stage, seed_everything
from .lib.nets import build_model
from .lib.paths import METRICS_DIR, load_raw, load_split, model_file
from .lib.resume import fit_and_save
from .lib.train import train_classifier


def main() -> None:
    params = load_params()
    cfg = params["train_baseline"]
    device = resolve_device(params["device"])
    generator = seed_everything(params["seed"])

    data, split = load_raw(params["dataset"]), load_split()
    labeled, val = split["labeled_idx"], split["val_idx"]
    arch_config = {
        "n_classes": DATASET_CLASSES[params["dataset"]],
        "channels": cfg["channels"],
        "hidden": cfg["hidden"],
        "dropout": cfg["dropout"],
    }
    model = build_model("baseline_cnn", **arch_config)

    fit_and_save(
        partial(
            train_classifier,
            model,
            data["x_train"][labeled],
            data["y_train"][labeled],
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
        model_path=model_file("baseline"),
        arch="baseline_cnn",
        arch_config=arch_config,
        meta={
            "dataset": params["dataset"],
            "n_labeled": len(labeled),
            "n_val": len(val),
            "epochs": cfg["epochs"],
        },
        run_config={"train": cfg, "seed": params["seed"], "dataset": params["dataset"]},
        data=[labeled, val],
        code_file=__file__,
        live_dir=METRICS_DIR / "train_baseline",
        live_params={**cfg, "labels": len(labeled)},
    )
    print(f"baseline: {len(labeled)} labels (+{len(val)} validation) on {device}")


if __name__ == "__main__":
    run_stage(main)
