"""Stage train_baseline: the SGAN report's compact CNN trained on the labeled images only."""

from __future__ import annotations

from .lib.config import (
    DATASET_CLASSES,
    load_params,
    resolve_device,
    run_stage,
    seed_everything,
)
from .lib.io import save_checkpoint
from .lib.nets import build_model
from .lib.paths import METRICS_DIR, load_raw, load_split, model_file
from .lib.train import live_epoch_logger, open_live, train_classifier


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

    with open_live(METRICS_DIR / "train_baseline", params={**cfg, "labels": len(labeled)}) as live:
        result = train_classifier(
            model,
            data["x_train"][labeled],
            data["y_train"][labeled],
            epochs=cfg["epochs"],
            steps_per_epoch=cfg["steps_per_epoch"],
            batch_size=cfg["batch_size"],
            lr=cfg["lr"],
            weight_decay=cfg["weight_decay"],
            augment=cfg["augment"],
            device=device,
            generator=generator,
            x_val=data["x_train"][val],
            y_val=data["y_train"][val],
            on_epoch=live_epoch_logger(live),
        )
        live.summary["best_epoch"] = result.best_epoch

    # Evaluate the best-on-validation weights (the last epoch when there is no validation set).
    model.load_state_dict(result.best_state)
    meta = {
        "dataset": params["dataset"],
        "n_labeled": len(labeled),
        "n_val": len(val),
        "best_epoch": result.best_epoch,
        "epochs": cfg["epochs"],
    }
    save_checkpoint(model_file("baseline"), model, "baseline_cnn", arch_config, meta)
    print(
        f"trained on {len(labeled)} labels (+{len(val)} validation) for {cfg['epochs']} epochs "
        f"in {result.seconds:.1f}s ({result.images_seen / result.seconds:.0f} images/s on {device})"
    )


if __name__ == "__main__":
    run_stage(main)
