"""Stage train_ceilings@<name>: a fully supervised ceiling trained on every training label.

The CS229 report's four classifiers: `linear` (softmax regression), `fc256` (one ReLU
layer of 256), `cnn4` (5x5 conv 32, max-pool, 128) and `cnn5` (adds 5x5 conv 64). They
use all 60,000 training labels and no validation split (fixed epochs, last weights), and
mark how far the few-label methods are from full supervision.

    python -m stages.train_ceiling cnn5
"""

from __future__ import annotations

import sys
from functools import partial

import torch

from .lib.config import (
    CEILINGS,
    DATASET_CLASSES,
    PipelineError,
    load_params,
    resolve_device,
    run_stage,
    seed_everything,
)
from .lib.data import NO_AUGMENT
from .lib.nets import build_model
from .lib.paths import METRICS_DIR, load_raw, model_file
from .lib.resume import fit_and_save
from .lib.train import train_classifier


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in CEILINGS:
        raise PipelineError(f"usage: python -m stages.train_ceiling {{{','.join(CEILINGS)}}}")
    name = sys.argv[1]
    params = load_params()
    cfg, model_cfg = params["train_ceilings"], params["train_ceilings"]["models"][name]
    device = resolve_device(params["device"])
    generator = seed_everything(params["seed"])

    data = load_raw(params["dataset"])
    arch, arch_config = CEILINGS[name]
    arch_config = {"n_classes": DATASET_CLASSES[params["dataset"]], **arch_config}
    model = build_model(arch, **arch_config)
    model_name = f"ceiling_{name}"
    n_train = len(data["y_train"])

    fit_and_save(
        partial(
            train_classifier,
            model,
            data["x_train"],
            data["y_train"],
            epochs=model_cfg["epochs"],
            # 0: one pass over the training set per epoch.
            steps_per_epoch=cfg["steps_per_epoch"] or -(-n_train // cfg["batch_size"]),
            batch_size=cfg["batch_size"],
            lr=cfg["lr"],
            lr_schedule=cfg["lr_schedule"],
            weight_decay=0.0,
            augment=cfg["augment"] if model_cfg["augment"] else NO_AUGMENT,
            device=device,
            generator=generator,
        ),
        model=model,
        model_path=model_file(model_name),
        arch=arch,
        arch_config=arch_config,
        meta={
            "dataset": params["dataset"],
            "n_labeled": n_train,
            "n_val": 0,
            "epochs": model_cfg["epochs"],
        },
        run_config={
            "train": cfg,
            "name": name,
            "seed": params["seed"],
            "dataset": params["dataset"],
        },
        data=[torch.tensor(n_train)],
        code_file=__file__,
        live_dir=METRICS_DIR / "train_ceilings" / name,
        live_params={**cfg["models"][name], "lr": cfg["lr"], "batch_size": cfg["batch_size"]},
    )
    print(f"{model_name}: {n_train} labels on {device}")


if __name__ == "__main__":
    run_stage(main)
