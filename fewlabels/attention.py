"""Where a classifier looks: vanilla gradient saliency and Grad-CAM, and their figure.

Both maps explain the model's own prediction (not the true label), for a whole batch in
one forward and one backward pass. The models are in eval mode, so every image's logits
depend on that image alone and the gradient of the summed predicted logits is, image by
image, the gradient of each image's own logit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from .config import PipelineError
from .evaluation import eval_mode


def fixed_digits(labels: Tensor, n_per_class: int) -> Tensor:
    """Indices of the first `n_per_class` images of every class, class by class.

    The same test images for every model and run, so the figures can be compared.
    """
    picked = []
    for c in range(int(labels.max()) + 1):
        members = torch.nonzero(labels == c).flatten()[:n_per_class]
        if len(members) < n_per_class:
            raise PipelineError(
                f"attention.n_per_class={n_per_class} but the test set has only "
                f"{len(members)} images of class {c}; lower attention.n_per_class"
            )
        picked.append(members)
    return torch.cat(picked)


def last_conv(model: nn.Module) -> nn.Conv2d:
    """The model's last nn.Conv2d in registration order (= forward order for these nets)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise PipelineError(
            f"{type(model).__name__} has no convolutional layer, so it has no class "
            f"activation map; remove grad_cam from attention.methods or this model from "
            f"attention.models"
        )
    return convs[-1]


def cam_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM reads: the activation module right after the last conv, else the conv.

    Grad-CAM weighs rectified feature maps. On the raw conv output, negative responses
    times negative weights light up the background, and for the 5-layer ceiling the map
    collapses onto a few pixels.
    """
    conv = last_conv(model)
    modules = list(model.modules())
    following = modules[modules.index(conv) + 1 :]
    if following and following[0].__module__ == nn.ReLU.__module__:  # torch.nn activations
        return following[0]
    return conv


@dataclass
class AttentionMaps:
    logits: Tensor  # (N, classes)
    saliency: Tensor  # (N, C, H, W): |d logit_pred / d input|, the input's shape
    cam: Tensor | None  # (N, H, W) in [0, 1], each map scaled to its maximum; None: not asked

    @property
    def predicted(self) -> Tensor:
        return self.logits.argmax(1)

    @property
    def confidence(self) -> Tensor:
        return self.logits.softmax(1).max(1).values


def attention_maps(model: nn.Module, x: Tensor, *, cam: bool = True) -> AttentionMaps:
    """Saliency (and Grad-CAM on the last conv layer) of each image's predicted class.

    One forward and one backward pass for the batch `x` (N, C, H, W) on its device; results
    are detached on that device. Grad-CAM weights each channel of the last conv layer's
    feature maps (`cam_layer`) by its spatially averaged gradient, sums the channels and
    keeps the positive part (Selvaraju et al., 2017).
    """
    outputs: list[Tensor] = []

    def keep_output(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
        outputs.append(output)
        # A later layer may work in place (F.relu_ after a conv): hand it a copy, so the
        # kept tensor keeps this layer's values and is the one autograd differentiates.
        return output.clone()

    layer = cam_layer(model) if cam else None
    hook = layer.register_forward_hook(keep_output) if layer is not None else None
    x = x.detach().clone().requires_grad_(True)
    try:
        # Eval mode: dropout off, so the maps are deterministic and the images independent.
        with eval_mode(model), torch.enable_grad():
            logits = model(x)
            score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
            # A ReLU module shared by every layer runs once per layer: the last call with
            # (N, C, H, W) output is the one after the last conv.
            feature_maps = [out for out in outputs if out.dim() == 4][-1:] if cam else []
            grads = torch.autograd.grad(score, [x, *feature_maps])
    finally:
        if hook is not None:
            hook.remove()
    cam_map = None
    if cam:
        activation, grad = feature_maps[0].detach(), grads[1]
        weights = grad.mean(dim=(2, 3), keepdim=True)
        grid = feature_grid(model, layer, x.shape[-2:])
        cam_map = to_input_grid(F.relu((weights * activation).sum(1)), x.shape[-2:], grid)
        peak = cam_map.amax(dim=(1, 2), keepdim=True)
        cam_map = torch.where(peak > 0, cam_map / peak.clamp_min(1e-12), 0.0)
    return AttentionMaps(logits.detach(), grads[0].abs(), cam_map)


# Layers that move or shrink the pixel grid; every other layer of these nets is pointwise.
GRID_LAYERS = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def feature_grid(
    model: nn.Module, layer: nn.Module, size: torch.Size
) -> list[tuple[float, float, int]] | None:
    """Where `layer`'s output positions sit on the input: per axis (first centre, step, count).

    Receptive-field arithmetic over the conv and pool layers up to `layer`, in registration
    order (the forward order of these nets). None where a layer's padding is symbolic.
    """
    modules = list(model.modules())
    axes = []
    for axis, length in enumerate(size):
        centre, step, count = 0.0, 1.0, int(length)
        for module in modules[: modules.index(layer) + 1]:
            if not isinstance(module, GRID_LAYERS):
                continue
            k, s, p, d = (
                _pair(getattr(module, name, 1))[axis]
                for name in ("kernel_size", "stride", "padding", "dilation")
            )
            if isinstance(p, str):  # padding="same"/"valid": not worth the cases
                return None
            centre += ((k - 1) * d / 2 - p) * step
            step *= s
            count = (count + 2 * p - d * (k - 1) - 1) // s + 1
        axes.append((centre, step, count))
    return axes


def _pair(value: int | tuple[int, ...] | str) -> tuple:
    return value if isinstance(value, tuple) else (value, value)


def to_input_grid(
    cam: Tensor, size: torch.Size, grid: list[tuple[float, float, int]] | None
) -> Tensor:
    """Place (N, h, w) maps on the input's (H, W) pixel grid.

    Each map value belongs at the centre of its position's receptive field (`grid`), and
    pixels between centres interpolate. Stretching the map over the whole image instead
    would shift it: the 3x3 maps of three valid convs with two pools sit on pixels 8.5 to
    16.5 of 28. Pixels more than half a step outside the centres get 0. If `grid` does
    not predict the map's size (a layer the arithmetic does not know), stretch after all.
    """
    n_rows, n_cols = cam.shape[-2:]
    if grid is None or (grid[0][2], grid[1][2]) != (n_rows, n_cols):
        stretched = F.interpolate(cam[:, None], size=tuple(size), mode="bilinear")
        return stretched[:, 0]
    coords, inside = [], []
    for (centre, step, count), length in zip(grid, size, strict=True):
        u = (torch.arange(length, dtype=cam.dtype, device=cam.device) - centre) / step
        inside.append((u >= -0.5) & (u <= count - 0.5))
        # grid_sample's align_corners=True coordinates: -1 and 1 are the first and last centre.
        coords.append(u.clamp(0, count - 1) * 2 / max(count - 1, 1) - 1)
    rows, cols = torch.meshgrid(coords[0], coords[1], indexing="ij")
    sample_at = torch.stack([cols, rows], -1).expand(len(cam), -1, -1, -1)
    placed = F.grid_sample(cam[:, None], sample_at, mode="bilinear", align_corners=True)[:, 0]
    return placed * (inside[0][:, None] & inside[1][None, :])


# Column titles of the figure, by attention.methods entry.
METHOD_TITLES = {"saliency": "gradient saliency", "grad_cam": "Grad-CAM (last conv)"}


def attention_figure(
    images: Tensor, labels: Tensor, maps: AttentionMaps, methods: list[str], title: str
) -> Figure:
    """Grid figure: one row per image; columns the input, then an overlay per method.

    `images` (N, H, W) in [0, 1]. Each map is scaled to its own maximum, so colours
    compare places within an image, not images or models.
    """
    pixels, labels = images.cpu().numpy(), labels.cpu().tolist()
    saliency = maps.saliency.cpu().amax(1)  # over colour channels: (N, H, W)
    heats = {
        "saliency": saliency / saliency.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12),
        "grad_cam": maps.cam,
    }
    columns = [("input", None)] + [
        (METHOD_TITLES[m], heats[m].cpu().numpy() if heats[m] is not None else None)
        for m in methods
    ]
    n = len(pixels)
    fig = Figure(figsize=(1.9 * len(columns) + 1.2, 1.75 * n + 1.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg, whatever matplotlib's default backend is
    axes = fig.subplots(n, len(columns), squeeze=False)
    predicted, confidence = maps.predicted.tolist(), maps.confidence.tolist()
    for row in range(n):
        wrong = predicted[row] != labels[row]
        axes[row, 0].set_ylabel(
            f"true {labels[row]}\npred {predicted[row]} ({confidence[row]:.0%})"
            + ("  WRONG" if wrong else ""),
            rotation=0, ha="right", va="center", fontsize=9,
            color="tab:red" if wrong else "black",
        )  # fmt: skip
        for col, (name, heat) in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(pixels[row], cmap="gray", vmin=0, vmax=1)
            if heat is not None:
                ax.imshow(heat[row], cmap="inferno", vmin=0, vmax=1, alpha=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
    fig.suptitle(
        f"{title}\nbright: saliency = pixels that move the predicted class's score most;\n"
        "Grad-CAM = regions whose features raise it",
        fontsize=9,
    )
    return fig
