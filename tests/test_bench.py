"""The benchmark (tools/bench.py): its trainer cases, built from the methods' own steps, and
its building blocks (tools/bench_lib.py).

No speed is asserted here: the targets are checked by `python -m tools.bench` itself.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

import tools.bench as bench
import tools.bench_lib as bench_lib
from fewlabels.config import Affine, PipelineError, load_params
from fewlabels.methods import load_method, parse_method_config, sgan, vae
from fewlabels.models import build_model
from fewlabels.supervised import classifier_step
from fewlabels.train import Run, SplitData
from tests.conftest import REPO_ROOT, synthetic_digits
from tools.bench import OTHER_TRAINERS, Setup, main, repro, trainers
from tools.bench_lib import (
    PerSampleImages,
    adam_update,
    copy_repository,
    measure,
    parse_dot,
    prepare,
    run_measured,
    sgan_reference_step,
    summarize,
    time_stages,
    topological_order,
    update_json,
)

CPU = torch.device("cpu")
AUGMENT = Affine(rotate_deg=12.0, translate=0.1, scale=0.1)
PARAMS = load_params(REPO_ROOT / "params.yaml")


def tiny(key: str, value):
    """A params value made small: batches of 4, a few channels and hidden units."""
    if isinstance(value, dict):
        return {k: tiny(k, v) for k, v in value.items()}
    if key in ("batch_size", "unlabeled_batch_size"):
        return 4
    if key == "channels":
        return [4 * (i + 1) for i in range(len(value))]
    if key == "hidden":
        return [16] * len(value) if isinstance(value, list) else 16
    return value


def tiny_params() -> dict:
    """params.yaml with every trainer's sizes made tiny and 20 labels."""
    params = copy.deepcopy(PARAMS)
    for section in ("train", "train_ceilings", "retrain", "vae_svm"):
        params[section] = tiny(section, params[section])
    params["labels"] = 20
    params["split"] = {"val_size": 0, "pool_size": 0}
    return params


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A bench setup on 200 synthetic digits (every dataset), away from any split file."""
    monkeypatch.chdir(tmp_path)
    x, y = synthetic_digits(200)
    arrays = {"x_train": x, "y_train": y}
    return Setup(tiny_params(), CPU, torch.Generator().manual_seed(0), load=lambda _: arrays)


def small_classifier_step(seed: int = 0):
    torch.manual_seed(seed)
    model = prepare(build_model("baseline_cnn", channels=[4, 8], hidden=16, dropout=0.0), CPU)
    x, y = synthetic_digits()
    run = Run(CPU, torch.Generator().manual_seed(seed))
    return model, classifier_step(model, x, y, 8, AUGMENT, run)


def small_sgan_step():
    """An SGAN step without pseudo-labels (8 labeled, 6 unlabeled, 6 generated images), and
    the reference step on a model of its own."""
    section = {
        **PARAMS["train"]["sgan"],
        "arch": "conv",
        "conv": {
            "discriminator": {"channels": [4, 8], "hidden": 16},
            "generator": {"channels": [8, 4]},
        },
        "batch_size": 8,
        "unlabeled_batch_size": 6,
        "augment_unlabeled": False,
        "pseudo_label_weight": 0.0,
        "teacher": "student",
    }
    cfg = parse_method_config("sgan", {**PARAMS, "train": {"sgan": section}})
    model = prepare(sgan.build(cfg, 10)[0], CPU)
    x, y = synthetic_digits()
    x_unlabeled, _ = synthetic_digits(30, seed=2)
    run = Run(CPU, torch.Generator().manual_seed(0))
    step = sgan.train_step(model, SplitData(x, y, x_unlabeled), cfg, run)
    reference_model = sgan.build(cfg, 10)[0]
    reference = sgan_reference_step(reference_model, x, y, x_unlabeled, cfg, CPU)
    return model, step, (reference, reference_model)


# --- the trainer cases -----------------------------------------------------------------


def test_every_method_of_the_train_section_is_a_trainer_without_an_edit_to_the_bench():
    assert list(trainers(PARAMS)) == [*PARAMS["train"], *OTHER_TRAINERS]
    assert {"baseline", "sgan", "consistency", "vat"} <= set(PARAMS["train"])
    assert set(OTHER_TRAINERS) == {"ceiling_cnn5", "retrain", "sgan_conv_report", "vae"}
    without_vat = {**PARAMS, "train": {k: v for k, v in PARAMS["train"].items() if k != "vat"}}
    assert "vat" not in trainers(without_vat) and "baseline" in trainers(without_vat)


@pytest.mark.parametrize("name", list(trainers(PARAMS)))
def test_each_trainer_case_times_its_step_and_trains_every_parameter(setup, name):
    case = trainers(setup.params)[name](setup)
    assert isinstance(case.about, str) and case.about
    before = [p.detach().clone() for p in case.model.parameters()]
    timings = measure(
        case.step, case.update, steps=1, warmup=0, rounds=1, device=CPU, reference=case.reference
    )
    assert set(timings) == {"data_path", "model_only"} | (
        {"reference"} if case.reference else set()
    )
    assert timings["data_path"].images == case.step.images
    # Adam over every parameter: each network of the trainer learns (the SGAN's generator too).
    after = list(case.model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_a_split_method_gets_the_split_and_its_configs_optimizer_and_teacher(setup, monkeypatch):
    setup.params["train"]["consistency"]["teacher"] = "ema"
    adam_calls, step_calls = [], []

    def spy_adam(params, **kwargs):
        adam_calls.append((list(params), kwargs))
        return adam_update(adam_calls[-1][0], **kwargs)

    monkeypatch.setattr(bench, "adam_update", spy_adam)
    for name in ("baseline", "consistency"):
        method = load_method(name)
        original = method.train_step

        def spy_step(model, data, cfg, run, ema, original=original):
            step_calls.append((model, data, cfg, ema))
            return original(model, data, cfg, run, ema)

        monkeypatch.setattr(method, "train_step", spy_step)
    for name in ("baseline", "consistency"):
        trainers(setup.params)[name](setup)

    for (model, data, cfg, _), (params, kwargs) in zip(step_calls, adam_calls, strict=True):
        assert len(data.x_labeled) == len(data.y_labeled) == 20
        assert torch.bincount(data.y_labeled).tolist() == [2] * 10
        assert len(data.x_unlabeled) == 180  # the rest of the 200 images, as the split draws
        assert params == list(model.parameters())
        assert kwargs == {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    (_, _, _, no_teacher), (model, _, _, ema) = step_calls
    assert no_teacher is None
    # The mean teacher as fit_steps keeps it: the model's weights, averaged, in eval mode.
    assert isinstance(ema, AveragedModel) and not ema.module.training
    for a, b in zip(ema.module.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_the_step_builders_draw_as_many_images_as_they_declare(setup):
    setup.params["train"]["consistency"]["weights"] = dict.fromkeys(
        ("cluster", "consistency", "entropy", "pseudo_label"), 0.1
    )
    cases = {name: trainers(setup.params)[name](setup) for name in trainers(setup.params)}
    baseline = cases["baseline"].step
    assert baseline.draw()[0].shape == (4, 1, 28, 28) and baseline.images == 4

    consistency = cases["consistency"].step
    consistency.on_epoch_start(1)  # the class centroids of the cluster loss
    x_l, _, x_weak, x_strong, unlabeled_idx = consistency.draw()
    assert len(x_l) + len(x_weak) + len(x_strong) == consistency.images == 4 + 2 * 3 * 4
    assert len(unlabeled_idx) == len(x_weak)

    sgan_step = cases["sgan"].step  # with pseudo-labels: a strong view of the unlabeled batch
    x_l, _, x_u, z, x_strong, unlabeled_idx = sgan_step.draw()
    assert len(x_l) + len(x_u) + len(z) == sgan_step.images == 4 + 4 + 4
    assert x_strong.shape == x_u.shape and len(unlabeled_idx) == len(x_u)
    report = cases["sgan_conv_report"]
    assert len(report.step.draw()) == 4  # the report's recipe: no pseudo-labels
    assert "channels [64, 128], hidden 256" in report.about and report.reference is not None

    vat = cases["vat"].step
    x_l, _, x_u = vat.draw()
    assert len(x_l) + len(x_u) == vat.images == 4 + 3 * 4

    vae_images = cases["vae"].step
    assert [len(vae_images.draw()[0]) for _ in range(2)] == [4, 4] and vae_images.images == 4
    for case in cases.values():
        loss, stats = case.step.loss(*case.step.draw())
        assert loss.ndim == 0 and torch.isfinite(loss) and stats


def test_a_step_is_its_loss_on_its_draw():
    _, a = small_classifier_step(seed=3)
    _, b = small_classifier_step(seed=3)
    loss_a, stats_a = a()
    loss_b, stats_b = b.loss(*b.draw())
    assert torch.equal(loss_a, loss_b) and stats_a == stats_b


def test_vae_passes_over_its_images_and_warms_the_kl_weight_up_from_the_first_step():
    section = {**PARAMS["vae_svm"], "hidden": [16], "latent": 3, "batch_size": 8}
    cfg = parse_method_config("vae", {**PARAMS, "vae_svm": {**section, "kl_warmup_epochs": 1}})
    model = prepare(vae.build(cfg, 10)[0], CPU)
    images, run = synthetic_digits(20)[0], Run(CPU, torch.Generator().manual_seed(0))
    # One pass over 20 images: batches of 8, 8, 4, then a new order.
    step = vae.vae_step(model, images, cfg, run, first_step=0)
    assert [len(step.draw()[0]) for _ in range(4)] == [8, 8, 4, 8] and step.images == 8
    # Warm-up over one epoch of 32 images: 4 steps.
    cfg = parse_method_config(
        "vae", {**PARAMS, "vae_svm": {**section, "kl_weight": 1, "kl_warmup_epochs": 1}}
    )
    images = synthetic_digits(32)[0]
    step = vae.vae_step(model, images, cfg, run, first_step=0)
    assert [step()[1]["train/kl_weight"] for _ in range(6)] == [0, 0.25, 0.5, 0.75, 1, 1]
    resumed = vae.vae_step(model, images, cfg, run, first_step=2)
    assert resumed()[1]["train/kl_weight"] == 0.5


# --- measuring -------------------------------------------------------------------------


def test_measure_times_every_mode_with_the_step_image_count():
    model, step, (reference, _) = small_sgan_step()
    update = adam_update(model.parameters(), lr=0.001)
    timings = measure(step, update, steps=2, warmup=1, rounds=2, device=CPU, reference=reference)
    assert set(timings) == {"data_path", "model_only", "reference"}
    for timing in timings.values():
        assert timing.steps == 2 and timing.images == 2 * step.images == 40
        assert timing.seconds > 0 and timing.images_per_s > 0
    summary = summarize(timings, max_cost_pct=10, min_speedup=3)
    assert summary["images_per_step"] == 20
    assert summary["ratio"] == pytest.approx(
        timings["data_path"].images_per_s / timings["model_only"].images_per_s, abs=1e-4
    )
    assert summary["data_path_cost_pct"] == pytest.approx(100 * (1 - summary["ratio"]), abs=0.01)
    assert {"reference_images_per_s", "speedup_vs_reference", "speedup_ok"} <= set(summary)


def test_measure_trains_the_model():
    model, step = small_classifier_step()
    before = [p.detach().clone() for p in model.parameters()]
    measure(step, adam_update(model.parameters(), lr=0.01), steps=1, warmup=0, rounds=1, device=CPU)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_the_reference_step_trains_both_networks_in_the_default_layout():
    _, _, (reference, model) = small_sgan_step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(6):  # more batches than one pass over the 40 labeled images holds
        reference()
    for part in ("discriminator.", "generator."):
        assert any(
            not torch.equal(v, before[k])
            for k, v in model.state_dict().items()
            if k.startswith(part) and v.dtype.is_floating_point
        )
    conv = model.discriminator.blocks[1][1].weight  # 4 input channels: the layouts differ
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)


def test_per_sample_dataset_items_are_single_float_images():
    x, y = synthetic_digits(5)
    plain = PerSampleImages(x, y)
    image, label = plain[2]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label == y[2]
    assert torch.equal(image, x[2].float().unsqueeze(0) / 255)
    augmented = PerSampleImages(x, augment=AUGMENT)
    assert augmented[2][0].shape == (1, 28, 28) and augmented[2][1] == -1
    assert not torch.equal(augmented[2][0], image)


def test_bench_json_sections_merge(tmp_path):
    path = tmp_path / "metrics" / "bench.json"
    update_json(path, ("throughput",), {"trainers": {"baseline": {"ratio": 0.95}}})
    update_json(path, ("repro", "smoke"), {"total_seconds": 60.0})
    update_json(path, ("repro", "default"), {"total_seconds": 2700.0})
    update_json(path, ("repro", "smoke"), {"total_seconds": 55.0})
    assert json.loads(path.read_text()) == {
        "throughput": {"trainers": {"baseline": {"ratio": 0.95}}},
        "repro": {"smoke": {"total_seconds": 55.0}, "default": {"total_seconds": 2700.0}},
    }
    update_json(path, ("throughput",), {"trainers": {}})  # a new run replaces the section
    assert json.loads(path.read_text())["throughput"] == {"trainers": {}}


# --- timing dvc repro --------------------------------------------------------------------

DOT = """strict digraph {
"download";
"split";
"train_ceilings@cnn5";
"evaluate";
"train@baseline";
"attention@ceiling_cnn5";
"download" -> "split";
"download" -> "train@baseline";
"download" -> "train_ceilings@cnn5";
"split" -> "train@baseline";
"train@baseline" -> "evaluate";
"train_ceilings@cnn5" -> "evaluate";
"train_ceilings@cnn5" -> "attention@ceiling_cnn5";
}
"""


def test_stage_order_from_the_dag_is_topological_and_keeps_the_file_order():
    nodes, edges = parse_dot(DOT)
    assert nodes[2] == "train_ceilings@cnn5" and len(nodes) == 6 and len(edges) == 7
    order = topological_order(nodes, edges)
    assert sorted(order) == sorted(nodes)
    assert all(order.index(a) < order.index(b) for a, b in edges)
    assert order == [
        "download",
        "split",
        "train_ceilings@cnn5",
        "train@baseline",
        "evaluate",
        "attention@ceiling_cnn5",
    ]
    with pytest.raises(PipelineError, match="cycle"):
        topological_order(["a", "b"], [("a", "b"), ("b", "a")])


def test_the_scratch_copy_leaves_out_built_outputs_and_local_state(tmp_path):
    source = tmp_path / "repo"
    kept = [
        "params.yaml",
        "fewlabels/models/cnn.py",  # code, though named like the models folder
        "data/external/mnist/train.gz",
        "metrics/evaluate.json",
        ".dvc/config",
    ]
    left_out = [
        ".git/HEAD",
        ".venv/bin/python",
        "fewlabels/__pycache__/data.pyc",
        "models/baseline/model.pt",
        "data/raw/mnist.npz",
        "data/split/split.npz",
        "data/features/features.npz",
        "data/pseudo/pseudo_labels.npz",
        ".dvc/cache/files/md5",
        ".dvc/tmp/lock",
    ]
    for name in kept + left_out:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(name)
    copy = copy_repository(source, tmp_path / "copy")
    files = {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()}
    assert files == set(kept)


def test_run_measured_reports_time_exit_status_and_the_peak_memory_of_descendants():
    big = "s = 'x' * (120 * 2**20)"  # 120 MiB, every page written
    grandchild = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {big!r}])"
    seconds, rss_mib, code, _ = run_measured([sys.executable, "-c", grandchild], cwd=".")
    assert seconds > 0 and code == 0 and rss_mib >= 120
    _, _, code, output = run_measured([sys.executable, "-c", "print('hi'); exit(3)"], cwd=".")
    assert code == 3 and output.strip() == "hi"


def test_time_stages_forces_every_stage_and_refuses_one_that_did_not_run(monkeypatch):
    # A stage whose outputs git tracks is skipped as up to date when the stages before it
    # reproduced bit for bit; timing that would report DVC's start-up as the stage's time.
    calls = []

    def fake_run(args, cwd):
        calls.append(args)
        ran = args[-1] == "train@baseline"
        return (
            2.0,
            50.0,
            0,
            ("Running stage 'train@baseline':" if ran else "Stage 'evaluate' didn't change"),
        )

    monkeypatch.setattr(bench_lib, "run_measured", fake_run)
    runs = []
    with pytest.raises(PipelineError, match="stage evaluate did not run"):
        time_stages(Path("."), ["train@baseline", "evaluate"], runs.append)
    assert [run.stage for run in runs] == ["train@baseline"]
    assert all(args[-3:-1] == ["--force", "--single-item"] for args in calls)


def test_repro_refuses_to_keep_its_repository_in_an_existing_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the tool runs from the repository root
    (tmp_path / "smoke").mkdir()
    with pytest.raises(PipelineError, match="already exists"):
        repro("smoke", keep=tmp_path)
    # It stops before copying or timing anything.
    assert list((tmp_path / "smoke").iterdir()) == []
    assert "stage by stage" not in capsys.readouterr().out


def test_keep_without_repro_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(sys, "argv", ["bench", "--keep", str(tmp_path / "timed")])
    with pytest.raises(PipelineError, match="--keep only applies to --repro"):
        main()


def test_an_unknown_trainer_is_refused(monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(sys, "argv", ["bench", "--trainers", "nope"])
    with pytest.raises(SystemExit):
        main()
    assert "invalid choice: 'nope'" in capsys.readouterr().err
