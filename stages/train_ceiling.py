"""Stage train_ceilings@<name>: a fully supervised ceiling trained on every training label
(fewlabels/methods/ceilings.py): no split, no validation (fixed epochs, last weights), so
a labels sweep never retrains it. Writes models/ceiling_<name>/ and
metrics/train_ceilings/<name>/, resumable like every trainer.

    python -m stages.train_ceiling cnn5
"""

from __future__ import annotations

import dataclasses

import torch

from fewlabels.config import DATASET_CLASSES, load_params, run_stage, stage_argument
from fewlabels.methods import ceilings, parse_method_config
from fewlabels.paths import METRICS_DIR, load_raw, model_file
from fewlabels.resume import RunRecord, fit_and_save, start_run


def main() -> None:
    params = load_params()
    name = stage_argument(list(ceilings.ARCHITECTURES), "a fully supervised ceiling")
    cfg = parse_method_config("ceilings", params)
    run = start_run(params)
    raw = load_raw(params["dataset"])
    x, y = raw["x_train"].to(run.device), raw["y_train"].to(run.device)
    model, parts = ceilings.build(name, DATASET_CLASSES[params["dataset"]])
    model.to(run.device)
    record = RunRecord(
        config={
            "seed": params["seed"],
            "dataset": params["dataset"],
            "name": name,
            "train_ceilings": dataclasses.asdict(cfg),
        },
        indices=[torch.tensor(len(y))],
        meta={"dataset": params["dataset"], "n_labeled": len(y), "n_val": 0},
        model_dir=model_file(f"ceiling_{name}").parent,
        live_dir=METRICS_DIR / "train_ceilings" / name,
    )
    epochs = getattr(cfg.models, name).epochs
    print(f"ceiling_{name}: {len(y)} labels, {epochs} epochs on {run.device}")
    train = lambda run: ceilings.train(model, (x, y), cfg, run, name)  # noqa: E731
    fit_and_save(train, run, model, parts, record)


if __name__ == "__main__":
    run_stage(main)
