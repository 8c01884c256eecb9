"""Stage train@<method>: one method of params.yaml's `train` section, trained on the split.

The method (its module in fewlabels/methods/) gets the labeled images, the unlabeled ones
and, when `split.val_size` > 0, held-out labeled images to choose its best epoch on (never
the test set). Writes models/<method>/model.pt (the best epoch on validation, the last one
without validation images) and model_last.pt (and any other network of the method, e.g.
the SGAN's generator.pt), and dvclive logs under metrics/train/<method>/. Resumable: the
training state is saved after every epoch to models/<method>/checkpoint.pt, so a killed
run started again continues where it stopped and ends with the same model.

    python -m stages.train consistency
"""

from __future__ import annotations

from dataclasses import asdict

from fewlabels.config import DATASET_CLASSES, load_params, run_stage, stage_argument
from fewlabels.io import save_image
from fewlabels.methods import load_method, parse_method_config
from fewlabels.paths import METRICS_DIR, MODELS_DIR, load_raw, load_split
from fewlabels.resume import RunRecord, fit_and_save, start_run
from fewlabels.train import SplitData


def main() -> None:
    params = load_params()
    name = stage_argument(list(params["train"]), "a method of params.yaml's train section")
    method, cfg = load_method(name), parse_method_config(name, params)
    raw, split = load_raw(params["dataset"]), load_split()
    labeled, val, unlabeled = split["labeled_idx"], split["val_idx"], split["unlabeled_idx"]
    x, y = raw["x_train"], raw["y_train"]
    run = start_run(params, x_val=x[val], y_val=y[val])
    device = run.device
    data = SplitData(x[labeled].to(device), y[labeled].to(device), x[unlabeled].to(device))
    model, parts = method.build(cfg, DATASET_CLASSES[params["dataset"]])
    model.to(device)
    record = RunRecord(
        config={
            "seed": params["seed"],
            "dataset": params["dataset"],
            name: asdict(cfg),
        },
        indices=[labeled, val, unlabeled],
        meta={"dataset": params["dataset"], "n_labeled": len(labeled), "n_val": len(val)},
        model_dir=MODELS_DIR / name,
        live_dir=METRICS_DIR / "train" / name,
    )
    print(
        f"train@{name}: {len(labeled)} labels (+{len(val)} validation), {len(unlabeled)} "
        f"unlabeled {params['dataset']} images, {cfg.epochs} epochs on {device}"
    )
    fit_and_save(lambda run: method.train(model, data, cfg, run), run, model, parts, record)
    extra_images = method.images(model, cfg, run) if hasattr(method, "images") else {}
    for image, array in extra_images.items():
        save_image(record.live_dir / "plots" / "images" / f"{image}.png", array)


if __name__ == "__main__":
    run_stage(main)
