"""Attention maps: saliency and Grad-CAM on tiny models whose answers are known."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from fewlabels.attention import (
    attention_figure,
    attention_maps,
    cam_layer,
    feature_grid,
    fixed_digits,
    last_conv,
    to_input_grid,
)
from fewlabels.checkpoint import save_checkpoint
from fewlabels.config import PipelineError
from fewlabels.io import save_arrays, save_figure
from fewlabels.models import build_model, network
from fewlabels.paths import model_file
from stages import attention as attention_stage
from tests.conftest import REPO_ROOT, make_tiny_dataset

DEFAULTS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


class Mask(nn.Module):
    """Multiplies the input by a fixed 0/1 mask: the model cannot see pixels outside it."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


def tiny_cnn(seed: int = 0, mask: torch.Tensor | None = None) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        Mask(torch.ones(28, 28) if mask is None else mask),
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(6 * 14 * 14, 10),
    )


def images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_saliency_has_the_input_shape_and_is_zero_where_the_model_is_blind():
    mask = torch.zeros(28, 28)
    mask[6:20, 4:16] = 1
    x = images()
    maps = attention_maps(tiny_cnn(mask=mask), x)
    assert maps.saliency.shape == x.shape
    assert (maps.saliency >= 0).all()
    assert (maps.saliency[..., mask == 0] == 0).all()
    assert (maps.saliency[..., mask == 1] > 0).float().mean() > 0.5  # it does see inside


def test_saliency_is_the_absolute_weight_of_the_predicted_class_for_a_linear_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    x = images()
    maps = attention_maps(model, x, cam=False)
    expected = model[1].weight[maps.predicted].abs().reshape(x.shape)
    assert torch.allclose(maps.saliency, expected)
    assert maps.cam is None


def test_grad_cam_reads_the_activation_after_the_last_conv():
    model = tiny_cnn()
    assert last_conv(model) is model[4]
    assert cam_layer(model) is model[5]
    # A conv not followed by an activation: the conv's own output.
    bare = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 26 * 26, 10))
    assert cam_layer(bare) is bare[0]


def test_grad_cam_matches_the_definition():
    model = tiny_cnn().eval()
    x = images()
    maps = attention_maps(model, x)
    features = model[:6](x).detach().requires_grad_(True)  # after the last conv's ReLU
    logits = model[6:](features)
    score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    (grad,) = torch.autograd.grad(score, features)
    cam = F.relu((grad.mean((2, 3), keepdim=True) * features).sum(1)).detach()
    cam = F.interpolate(cam[:, None], scale_factor=2, mode="bilinear", align_corners=False)
    cam = cam[:, 0]  # 14 -> 28
    cam = cam / cam.amax((1, 2), keepdim=True)
    assert maps.cam.shape == (len(x), 28, 28)
    assert torch.allclose(maps.cam, cam, atol=1e-6)
    assert maps.cam.min() >= 0 and torch.allclose(maps.cam.amax((1, 2)), torch.ones(len(x)))


class FunctionalReLU(nn.Module):
    """An in-place ReLU that is not a torch.nn activation: Grad-CAM reads the conv before it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu_(x)


def test_grad_cam_reads_the_conv_output_even_when_a_later_layer_overwrites_it():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 5), FunctionalReLU(), nn.Flatten(), nn.Linear(3 * 24 * 24, 10)
    )
    assert cam_layer(model) is model[0]
    x = images()
    features = model[0](x).detach().requires_grad_(True)
    logits = model[1:](features.clone())
    score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    (grad,) = torch.autograd.grad(score, features)
    cam = F.relu((grad.mean((2, 3), keepdim=True) * features).sum(1)).detach()
    cam = F.pad(cam / cam.amax((1, 2), keepdim=True), (2, 2, 2, 2))  # 24 -> 28, centred
    assert torch.allclose(attention_maps(model, x).cam, cam, atol=1e-6)


def test_grad_cam_is_zero_where_the_features_see_nothing():
    mask = torch.zeros(28, 28)
    mask[:, :10] = 1  # the model sees the left 10 columns only
    model = tiny_cnn(mask=mask)
    with torch.no_grad():  # no bias: features far from the visible part are exactly zero
        model[1].bias.zero_()
        model[4].bias.zero_()
    cam = attention_maps(model, images()).cam
    # Visible columns 0-9 reach conv1 column 10, pooled column 5, conv2 column 6 of 14,
    # which upsampling spreads up to input column 14.
    assert (cam[:, :, 15:] == 0).all()
    assert (cam[:, :, :10].amax((1, 2)) == 1).all()


def test_a_model_without_convolutions_has_no_grad_cam():
    model = build_model("mlp", hidden=[16])
    with pytest.raises(PipelineError, match="MLP has no convolutional layer.*attention.methods"):
        attention_maps(model, images())
    assert attention_maps(model, images(), cam=False).saliency.shape == (6, 1, 28, 28)


def test_maps_are_deterministic_per_image_and_leave_the_model_as_it_was():
    model = tiny_cnn().train()
    x = images(8)
    first, second = attention_maps(model, x), attention_maps(model, x)
    assert torch.equal(first.saliency, second.saliency) and torch.equal(first.cam, second.cam)
    # Dropout is off and images do not interact: one batch = image by image.
    alone = attention_maps(model, x[3:4])
    assert torch.allclose(alone.saliency, first.saliency[3:4], atol=1e-6)
    assert torch.allclose(alone.cam, first.cam[3:4], atol=1e-6)
    assert model.training and not any(m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def waterloo_like() -> nn.Sequential:
    """Three valid 3x3 convs, pools after the first two: a 3x3 map at the input's centre."""
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2, 2, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 10),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (build_model("baseline_cnn"), (0.5, 2, 14)),  # padded convs: cells of 2x2 pixels
        (build_model("cs229_cnn", channels=[32, 64]), (4.0, 1, 20)),  # two valid 5x5 convs
        (waterloo_like(), (8.5, 4, 3)),
    ],
)
def test_feature_grid_is_where_the_last_conv_outputs_sit_on_the_input(model, expected):
    layer = cam_layer(model)
    grid = feature_grid(model, layer, torch.Size([28, 28]))
    assert grid == [expected, expected]
    outputs = []
    layer.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    model(images(1))
    assert outputs[0].shape[-2:] == (expected[2], expected[2])


def test_maps_are_placed_on_their_receptive_fields_not_stretched():
    one_hot = torch.zeros(1, 20, 20)
    one_hot[0, 0, 0] = 1  # the first output of two valid 5x5 convs is centred on pixel 4
    placed = to_input_grid(one_hot, torch.Size([28, 28]), [(4.0, 1, 20)] * 2)
    assert placed.shape == (1, 28, 28) and placed[0].argmax() == 4 * 28 + 4
    assert (placed[0, :4] == 0).all() and (placed[0, :, 24:] == 0).all()

    centre = torch.zeros(1, 3, 3)
    centre[0, 1, 1] = 1  # centred on pixel 12.5; the map covers pixels 6.5 to 18.5
    placed = to_input_grid(centre, torch.Size([28, 28]), [(8.5, 4, 3)] * 2)[0]
    assert placed[12, 12] == placed[13, 13] == placed.max() > 0
    assert torch.allclose(placed[:26, :26], placed[:26, :26].flip(0, 1))  # about 12.5
    assert (placed[:7] == 0).all() and (placed[19:] == 0).all()


def test_maps_of_layers_the_arithmetic_does_not_know_are_stretched():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(5), nn.Flatten(), nn.Linear(50, 10)
    )
    grid = feature_grid(model, model[0], torch.Size([28, 28]))
    cam = torch.rand(2, 5, 5)  # the grid predicts 26x26: it cannot be this layer's map
    stretched = F.interpolate(cam[:, None], size=(28, 28), mode="bilinear")[:, 0]
    assert torch.equal(to_input_grid(cam, torch.Size([28, 28]), grid), stretched)


def test_fixed_digits_are_the_first_of_each_class():
    labels = torch.tensor([3, 1, 0, 1, 2, 0, 3, 2, 1])
    assert fixed_digits(labels, 1).tolist() == [2, 1, 4, 0]
    assert fixed_digits(labels, 2).tolist() == [2, 5, 1, 3, 4, 7, 0, 6]
    with pytest.raises(PipelineError, match="only 2 images of class 0"):
        fixed_digits(labels, 3)


def test_figure_has_a_row_per_digit_and_a_column_per_method(tmp_path):
    x = images(4)
    maps = attention_maps(tiny_cnn(), x)
    fig = attention_figure(x[:, 0], torch.arange(4), maps, ["saliency", "grad_cam"], "tiny")
    assert len(fig.axes) == 4 * 3
    assert [ax.get_title() for ax in fig.axes[:3]] == [
        "input",
        "gradient saliency",
        "Grad-CAM (last conv)",
    ]
    save_figure(tmp_path / "tiny.png", fig)
    assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.png"]  # no temporary file left


# --- the stage, on a tiny dataset and untrained models -----------------------------


@pytest.fixture
def stage_dir(tmp_path, monkeypatch):
    arrays = make_tiny_dataset()
    save_arrays(tmp_path / "data/raw/mnist.npz", **arrays)
    meta = {"dataset": "mnist", "n_labeled": 100, "n_val": 0}
    for name, arch, config in [
        ("baseline", "baseline_cnn", {}),
        ("ceiling_linear", "mlp", {"hidden": []}),
    ]:
        save_checkpoint(tmp_path / model_file(name), network(arch, **config), meta)
    assert (tmp_path / "models/baseline/model.pt").is_file()  # models/<name>/model.pt
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_attention(stage_dir, name: str, **attention) -> None:
    params = copy.deepcopy(DEFAULTS)
    params["attention"].update(attention)
    (stage_dir / "params.yaml").write_text(yaml.safe_dump(params))
    # As `python -m stages.attention <name>` sets it: argv[0] is the module's file.
    argv = [str(REPO_ROOT / "stages/attention.py"), name]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", argv)
        attention_stage.main()


def test_stage_writes_one_figure_per_model(stage_dir):
    run_attention(stage_dir, "baseline", models=["baseline"], n_per_class=2)
    png = stage_dir / "plots/attention/baseline.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    run_attention(stage_dir, "ceiling_linear", models=["ceiling_linear"], methods=["saliency"])
    assert (stage_dir / "plots/attention/ceiling_linear.png").is_file()


def test_stage_refuses_grad_cam_of_a_model_without_convolutions_before_writing(stage_dir):
    with pytest.raises(PipelineError, match="has no convolutional layer"):
        run_attention(stage_dir, "ceiling_linear", models=["ceiling_linear"])
    with pytest.raises(PipelineError, match="usage: python -m stages.attention"):
        run_attention(stage_dir, "ceiling_linear", models=["baseline"])
    assert not (stage_dir / "plots").exists()
