"""Stage attention@<model>: where a trained model looks, on a fixed set of test digits.

Writes plots/attention/<model>.png: one row per digit (the first `attention.n_per_class`
test images of each class), columns the input, its gradient saliency and its Grad-CAM,
each explaining the model's own prediction. One stage per entry of `attention.models`,
so each depends on exactly its own model.

    python -m stages.attention ceiling_cnn5
"""

from __future__ import annotations

import torch

from fewlabels.attention import attention_figure, attention_maps, fixed_digits, last_conv
from fewlabels.checkpoint import load_trained
from fewlabels.config import load_params, resolve_device, run_stage, stage_argument
from fewlabels.data import to_input
from fewlabels.io import save_figure
from fewlabels.paths import PLOTS_DIR, load_raw


def main() -> None:
    params = load_params()
    cfg = params["attention"]
    name = stage_argument(cfg["models"], "a model of attention.models")
    device = resolve_device(params["device"])
    model, meta = load_trained(name, params["dataset"])
    grad_cam = "grad_cam" in cfg["methods"]
    if grad_cam:
        last_conv(model)  # a model without one stops here, before anything is written

    data = load_raw(params["dataset"])
    picked = fixed_digits(data["y_test"], cfg["n_per_class"])
    images, labels = to_input(data["x_test"][picked]), data["y_test"][picked]
    # cuDNN may pick non-deterministic kernels for the backward pass: the figure must not
    # change between runs of the same model.
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        maps = attention_maps(model.to(device), images.to(device), cam=grad_cam)
    correct = int((maps.predicted.cpu() == labels).sum())
    title = (
        f"{name} on {params['dataset']} ({meta['n_labeled'] + meta['n_val']:,} labels used): "
        f"{correct}/{len(labels)} of these test digits right"
    )
    fig = attention_figure(images[:, 0], labels, maps, cfg["methods"], title)
    path = PLOTS_DIR / "attention" / f"{name}.png"
    save_figure(path, fig)
    print(f"{name}: attention maps of {len(labels)} test digits on {device} -> {path}")


if __name__ == "__main__":
    run_stage(main)
