"""The benchmark's building blocks (stages/lib/bench.py) and the trainers' Step builders.

No speed is asserted here: the targets are checked by `python -m stages.bench` itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import stages.lib.bench as bench_lib
import torch
from stages.bench import main, repro
from stages.lib.bench import (
    NOT_COPIED,
    PerSampleImages,
    adam_update,
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
from stages.lib.config import PipelineError
from stages.lib.nets import build_model
from stages.lib.semi import consistency_step
from stages.lib.sgan import SemiSupervisedGAN, sgan_step
from stages.lib.train import classifier_step
from stages.lib.vae import VAE, vae_step

from tests.conftest import AUGMENT, synthetic_digits

CPU = torch.device("cpu")
WEIGHTS = {"cluster": 0.1, "consistency": 0.5, "entropy": 0.05, "pseudo_label": 1.0}


def small_classifier_step(seed: int = 0):
    torch.manual_seed(seed)
    model = prepare(build_model("baseline_cnn", channels=[4, 8], hidden=16, dropout=0.0), CPU)
    x, y = synthetic_digits()
    generator = torch.Generator().manual_seed(seed)
    return model, classifier_step(model, x, y, batch_size=8, augment=AUGMENT, generator=generator)


def small_sgan_step():
    model = prepare(
        SemiSupervisedGAN("conv", {"channels": [4, 8], "hidden": 16}, {"channels": [8, 4]}), CPU
    )
    x, y = synthetic_digits()
    x_unlabeled, _ = synthetic_digits(30, seed=2)
    batches = {"batch_size": 8, "unlabeled_batch_size": 6, "augment": AUGMENT}
    step = sgan_step(
        model, x, y, x_unlabeled, **batches, augment_unlabeled=False, unsupervised_weight=1.0,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    reference_model = SemiSupervisedGAN(
        "conv", {"channels": [4, 8], "hidden": 16}, {"channels": [8, 4]}
    )
    reference = sgan_reference_step(
        reference_model, x, y, x_unlabeled, **batches, augment_unlabeled=False, lr=0.001,
        generator_lr=0.001, beta1=0.5, device=CPU,
    )  # fmt: skip
    return model, step, (reference, reference_model)


def test_every_step_builder_draws_as_many_images_as_it_declares():
    _, classifier = small_classifier_step()
    assert classifier.draw()[0].shape == (8, 1, 28, 28) and classifier.images == 8

    waterloo = prepare(build_model("waterloo_cnn", channels=[4, 8, 8], hidden=16), CPU)
    x, y = synthetic_digits(20)
    consistency = consistency_step(
        waterloo, x, y, synthetic_digits(30, seed=2)[0],
        batch_size=4, unlabeled_ratio=2, weights=WEIGHTS, threshold=0.5, weak_augment=AUGMENT,
        strong_augment=AUGMENT, cutout=4, generator=torch.Generator().manual_seed(0),
        centroids=[torch.zeros(10, 72)],
    )  # fmt: skip
    x_l, _, x_weak, x_strong, unlabeled_idx = consistency.draw()
    assert len(x_l) + len(x_weak) + len(x_strong) == consistency.images == 4 + 2 * 8
    assert len(unlabeled_idx) == len(x_weak)

    _, sgan, _ = small_sgan_step()
    x_l, _, x_u, z = sgan.draw()
    assert len(x_l) + len(x_u) + len(z) == sgan.images == 8 + 6 + 6

    vae = vae_step(
        prepare(VAE(latent=3, hidden=[16]), CPU), synthetic_digits(20)[0], batch_size=8,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    # One pass over 20 images: batches of 8, 8, 4, then a new order.
    assert [len(vae.draw()[0]) for _ in range(4)] == [8, 8, 4, 8] and vae.images == 8
    for step in (classifier, consistency, sgan, vae):
        loss, stats = step.loss(*step.draw())
        assert loss.ndim == 0 and torch.isfinite(loss) and stats


def test_a_step_is_its_loss_on_its_draw():
    _, a = small_classifier_step(seed=3)
    _, b = small_classifier_step(seed=3)
    loss_a, stats_a = a()
    loss_b, stats_b = b.loss(*b.draw())
    assert torch.equal(loss_a, loss_b) and stats_a == stats_b


def test_vae_kl_weight_warms_up_from_the_first_step():
    model, images = prepare(VAE(latent=3, hidden=[16]), CPU), synthetic_digits(20)[0]
    generator = torch.Generator().manual_seed(0)
    step = vae_step(model, images, batch_size=8, generator=generator, kl_warmup_steps=4)
    assert [step()[1]["train/kl_weight"] for _ in range(6)] == [0, 0.25, 0.5, 0.75, 1, 1]
    resumed = vae_step(
        model, images, batch_size=8, generator=generator, kl_warmup_steps=4, first_step=2
    )
    assert resumed()[1]["train/kl_weight"] == 0.5


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
        summary["data_path_images_per_s"] / summary["model_only_images_per_s"], rel=1e-3
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


DOT = """strict digraph {
"download";
"split";
"train_ceilings@cnn5";
"evaluate";
"train_baseline";
"attention@ceiling_cnn5";
"download" -> "split";
"download" -> "train_baseline";
"download" -> "train_ceilings@cnn5";
"split" -> "train_baseline";
"train_baseline" -> "evaluate";
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
        "train_baseline",
        "evaluate",
        "attention@ceiling_cnn5",
    ]
    with pytest.raises(PipelineError, match="cycle"):
        topological_order(["a", "b"], [("a", "b"), ("b", "a")])


def test_the_scratch_copy_leaves_out_built_outputs_and_local_state():
    names = [".git", "venv", "stages", "models", "raw", "external", "cache", "tmp", "params.yaml"]
    assert NOT_COPIED(".", names) == {".git", "venv", "models", "raw", "cache", "tmp"}


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
        ran = args[-1] == "train"
        return 2.0, 50.0, 0, "Running stage 'train':" if ran else "Stage 'evaluate' didn't change"

    monkeypatch.setattr(bench_lib, "run_measured", fake_run)
    runs = []
    with pytest.raises(PipelineError, match="stage evaluate did not run"):
        time_stages(Path("."), ["train", "evaluate"], runs.append)
    assert [run.stage for run in runs] == ["train"]
    assert all(args[-3:-1] == ["--force", "--single-item"] for args in calls)


def test_repro_refuses_to_keep_its_repository_in_an_existing_folder(tmp_path, capsys):
    (tmp_path / "smoke").mkdir()
    with pytest.raises(PipelineError, match="already exists"):
        repro("smoke", keep=tmp_path)
    # It stops before copying or timing anything.
    assert list((tmp_path / "smoke").iterdir()) == []
    assert "stage by stage" not in capsys.readouterr().out


def test_keep_without_repro_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench", "--keep", str(tmp_path / "timed")])
    with pytest.raises(PipelineError, match="--keep only applies to --repro"):
        main()
