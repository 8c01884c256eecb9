"""Stage train_sgan: semi-supervised GAN (K+1 discriminator, feature-matching generator).

Salimans et al. (2016) as the SGAN report describes it, with the paper's recipe as
options (see params.yaml). Writes models/sgan/{discriminator,generator}.pt (the
best-on-validation epoch; the last one without a validation split) and
{discriminator,generator}_last.pt, dvclive metrics and one generated grid per epoch
under metrics/train_sgan, and the final grid as plots/sgan/generated.png. Resumable like
every trainer (models/sgan/checkpoint.pt).
"""

from __future__ import annotations

from functools import partial

import torch
from PIL import Image

from .lib.config import DATASET_CLASSES, load_params, resolve_device, run_stage, seed_everything
from .lib.io import atomic_open, run_fingerprint, save_checkpoint
from .lib.paths import METRICS_DIR, PLOTS_DIR, SGAN_DIR, load_raw, load_split
from .lib.resume import fit_resumable
from .lib.sgan import (
    STEP_KEYS,
    build_sgan,
    generated_grid,
    sample_z,
    train_sgan,
    unlabeled_indices,
)
from .lib.train import TrainResult

GRID_FILE = PLOTS_DIR / "sgan" / "generated.png"


def main() -> None:
    params = load_params()
    cfg = params["train_sgan"]
    device = resolve_device(params["device"])
    generator = seed_everything(params["seed"])

    data, split = load_raw(params["dataset"]), load_split()
    labeled, val = split["labeled_idx"], split["val_idx"]
    unlabeled = unlabeled_indices(split, cfg["unlabeled_includes_labeled"])
    n_classes = DATASET_CLASSES[params["dataset"]]
    model, discriminator_config, generator_config = build_sgan(cfg, n_classes)
    grid_z = sample_z(
        cfg["grid_size"], cfg["z_size"], torch.Generator().manual_seed(params["seed"])
    )
    meta = {"dataset": params["dataset"], "n_labeled": len(labeled), "n_val": len(val)}

    def save_final(result: TrainResult) -> None:
        for suffix, state in (("", result.best_state), ("_last", result.last_state)):
            model.load_state_dict(state)
            epoch = result.best_epoch if suffix == "" else len(result.history)
            for part, config in (
                ("discriminator", discriminator_config),
                ("generator", generator_config),
            ):
                save_checkpoint(
                    SGAN_DIR / f"{part}{suffix}.pt",
                    getattr(model, part),
                    f"sgan_{cfg['arch']}_{part}",
                    config,
                    {**meta, "epoch": epoch},
                )
        model.load_state_dict(result.best_state)
        with atomic_open(GRID_FILE) as handle:
            Image.fromarray(generated_grid(model, grid_z)).save(handle, format="png")

    train = partial(
        train_sgan,
        model,
        data["x_train"][labeled],
        data["y_train"][labeled],
        data["x_train"][unlabeled],
        epochs=cfg["epochs"],
        steps_per_epoch=cfg["steps_per_epoch"],
        lr=cfg["lr"],
        generator_lr=cfg["generator_lr"],
        beta1=cfg["beta1"],
        lr_schedule=cfg["lr_schedule"],
        ema_decay=cfg["ema_decay"],
        patience=cfg["patience"],
        collapse_std=cfg["collapse_std"],
        teacher=cfg["teacher"],
        **{key: cfg[key] for key in STEP_KEYS},
        grid_z=grid_z,
        device=device,
        generator=generator,
        x_val=data["x_train"][val],
        y_val=data["y_train"][val],
    )
    run_config = {"train": cfg, "seed": params["seed"], "dataset": params["dataset"]}
    fit_resumable(
        train,
        checkpoint=SGAN_DIR / "checkpoint.pt",
        fingerprint=run_fingerprint(run_config, [labeled, val, unlabeled], code_files=[__file__]),
        live_dir=METRICS_DIR / "train_sgan",
        live_params={**cfg, "labels": len(labeled)},
        save_final=save_final,
    )
    print(f"sgan ({cfg['arch']}): {len(labeled)} labels (+{len(val)} validation) on {device}")


if __name__ == "__main__":
    run_stage(main)
