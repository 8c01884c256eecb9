"""End to end: `dvc repro` of the smoke profile in a scratch copy of the repository.

Runs the real stages on a small real subset (the vendored MNIST, 3,000 training images,
1,000 test images), then checks that DVC sees the pipeline the way a user relies on it:
a second repro does nothing, `dvc exp run -S labels=250` re-runs split and what follows
but not download, and bad data or params stop with one line and change nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tools.bench_lib import copy_repository, subprocess_env

# The foreach stages come from params.yaml, as DVC makes them.
PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
METHODS = tuple(PARAMS["train"])  # the methods trained on the split: train@<method> each
CEILING_STAGES = tuple(f"train_ceilings@{n}" for n in PARAMS["train_ceilings"]["models"])
ATTENTION_MODELS = PARAMS["attention"]["models"]
ATTENTION_STAGES = tuple(f"attention@{m}" for m in ATTENTION_MODELS)
# Stages downstream of `split`: a labels change re-runs them.
SPLIT_STAGES = (*(f"train@{m}" for m in METHODS), "extract_features", "pseudo_label", "retrain")
VAE_SVM_STAGES = tuple(f"vae_svm@{n}" for n in PARAMS["vae_svm"]["budgets"])
STAGES = (
    "download",
    "split",
    *SPLIT_STAGES,
    *CEILING_STAGES,
    "train_vae",
    *VAE_SVM_STAGES,
    "evaluate",
    "check_generated",
    *ATTENTION_STAGES,
)
OUTPUTS = ("models/baseline/model.pt", "metrics/train/baseline/metrics.json")
CHECKPOINT = "models/baseline/checkpoint.pt"


def run(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = subprocess_env()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(cwd, sys.executable, "-m", "dvc", *args, check=check)


def ran_stages(proc: subprocess.CompletedProcess) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in proc.stdout}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("smoke") / "repo"
    copy_repository(REPO_ROOT, root)
    run(root, "git", "init", "-q", "-b", "main")
    run(root, sys.executable, "-m", "tools.profile", "smoke")
    run(root, "git", "add", "-A")
    run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "smoke")
    return root


@pytest.fixture(scope="module")
def first_repro(repo: Path) -> subprocess.CompletedProcess:
    return dvc(repo, "repro")


def test_first_repro_runs_every_stage_and_writes_outputs(repo, first_repro):
    assert ran_stages(first_repro) == set(STAGES)
    split = json.loads((repo / "metrics/split.json").read_text())
    assert split["n_labeled"] == 100 and set(split["labeled_per_class"].values()) == {10}
    assert split["n_labeled"] + split["n_val"] + split["n_unlabeled"] == 3000
    evaluated = json.loads((repo / "metrics/evaluate.json").read_text())
    baseline = evaluated["baseline"]
    assert 0.0 <= baseline["test_accuracy"] <= 1.0 and baseline["n_test"] == 1000
    assert baseline["labels_used"] == 100
    for name in ("linear", "fc256", "cnn4", "cnn5"):
        assert evaluated[f"ceiling_{name}"]["labels_used"] == 60000
    summary = (repo / "metrics/summary.md").read_text()
    assert "| ceiling_cnn5 | fully supervised ceiling: cnn5 | mnist | 60,000 |" in summary
    # VAE + SVM: scored on its own dataset (fashion-mnist), no loss for SVM decision values.
    for stage in VAE_SVM_STAGES:
        vae_svm = evaluated[stage]
        assert vae_svm["dataset"] == "fashion-mnist" and "test_loss" not in vae_svm
        assert vae_svm["labels_used"] == int(stage.split("@")[1])
    assert "| vae_svm@100 | M1: VAE latent means" in summary
    for name in ("reconstructions", "latent_pca"):
        assert (repo / f"plots/vae/{name}.png").read_bytes()[:4] == b"\x89PNG"
    # Every method of the train section, and the semi-supervised chain: SGAN features ->
    # k-means pseudo-labels -> retrain.
    for name in (*METHODS, "sgan_last", "retrain"):
        assert evaluated[name]["labels_used"] == 100
    for method in METHODS:
        for part in ("model", "model_last"):
            assert (repo / f"models/{method}/{part}.pt").is_file()
        live = json.loads((repo / f"metrics/train/{method}/metrics.json").read_text())
        assert live["step"] == 1  # two epochs, one dvclive step each
    # SGAN: its generator too (best and last epoch), one generated grid per epoch and the
    # final one, and the ceiling's verdict on a fixed batch of generated digits.
    for part in ("generator", "generator_last"):
        assert (repo / f"models/sgan/{part}.pt").is_file()
    for name in (
        "metrics/train/sgan/plots/images/generated/1.png",
        "metrics/train/sgan/plots/images/generated/2.png",
        "metrics/train/sgan/plots/images/generated.png",
        "plots/generated_classes.png",
    ):
        assert (repo / name).read_bytes()[:4] == b"\x89PNG"
    generated = json.loads((repo / "metrics/check_generated.json").read_text())
    assert sum(generated["class_counts"].values()) == generated["n_samples"] == 1000
    assert 1 <= generated["classes_covered"] <= 10
    pseudo = json.loads((repo / "metrics/pseudo_label.json").read_text())
    assert pseudo["n_pseudo_labeled"] == 3000 - 100  # the smoke pool minus the labeled set
    assert 0 <= pseudo["hidden_label_accuracy"] <= 1
    # Robustness sets: every model scored on each corrupted copy, as a table and a plot.
    for result in evaluated.values():
        assert set(result["robustness_accuracy"]) == {"noise", "rotation", "blur"}
    assert "## Robustness" in summary
    assert (repo / "plots/robustness.png").read_bytes()[:4] == b"\x89PNG"
    confusion = (repo / "plots/confusion/baseline.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == 1001
    for name in ATTENTION_MODELS:
        assert (repo / f"plots/attention/{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_metrics_and_plots_commands_read_the_outputs(repo, first_repro):
    shown = dvc(repo, "metrics", "show", "--json").stdout
    assert "test_accuracy" in shown and "labeled_per_class" in shown
    dvc(repo, "plots", "show", "-o", "rendered")
    page = (repo / "rendered/index.html").read_text()
    for method in METHODS:
        assert f"plots_confusion_{method}_csv" in page
        assert f"metrics_train_{method}_plots_metrics_train_accuracy_tsv" in page
    shown_images = [
        repo / "rendered" / src for src in re.findall(r'<img src="(static/[^"]+)">', page)
    ]  # dvc copies every image beside the page
    for name in ATTENTION_MODELS:
        assert any(
            path.name.endswith(f"plots_attention_{name}.png") and path.is_file()
            for path in shown_images
        )
    # .dvc/config's page template inlines vega: nothing is loaded from the network.
    assert not re.search(r"<script\b[^>]*\bsrc\s*=", page, re.IGNORECASE)
    assert "vegaEmbed(" in page


def test_second_repro_does_nothing(repo, first_repro):
    again = dvc(repo, "repro")
    assert ran_stages(again) == set()
    assert "up to date" in dvc(repo, "status").stdout


def test_same_params_and_seed_give_identical_outputs(repo, first_repro):
    model = repo / "models/baseline/model.pt"
    before = {p: sha256(repo / p) for p in OUTPUTS}
    forced = dvc(repo, "repro", "-f", "-s", "train@baseline")
    assert ran_stages(forced) == {"train@baseline"}
    assert {p: sha256(repo / p) for p in OUTPUTS} == before
    # Bit-identical model: DVC sees nothing to do downstream.
    assert model.is_file() and ran_stages(dvc(repo, "repro")) == set()


def test_exp_run_with_250_labels_reruns_split_and_downstream_only(repo, first_repro):
    dvc(repo, "status")  # settle DVC's state before timing-sensitive comparisons
    exp = dvc(repo, "exp", "run", "-S", "labels=250")
    # Attention maps of the models trained on the split (not of the ceilings).
    attention = {f"attention@{m}" for m in ATTENTION_MODELS if not m.startswith("ceiling_")}
    assert ran_stages(exp) == {
        "split",
        *SPLIT_STAGES,
        "evaluate",
        "check_generated",
        *attention,
    }
    split = json.loads((repo / "metrics/split.json").read_text())
    assert split["labeled_per_class"] == {str(c): 25 for c in range(10)}
    assert json.loads((repo / "metrics/evaluate.json").read_text())["baseline"]["n_labeled"] == 250


def test_corrupt_data_stops_with_one_line_and_keeps_raw_arrays(repo, first_repro):
    raw = repo / "data/raw/mnist.npz"
    before = sha256(raw)
    labels_gz = repo / "data/external/mnist/train-labels-idx1-ubyte.gz"
    original = labels_gz.read_bytes()
    try:
        labels_gz.write_bytes(original[:1000])  # a truncated download
        failed = dvc(repo, "repro", check=False)
        assert failed.returncode != 0
        assert "error: data/external/mnist/train-labels-idx1-ubyte.gz: corrupt or truncated" in (
            failed.stderr + failed.stdout
        )
        assert "Traceback" not in failed.stderr + failed.stdout
        assert sha256(raw) == before
    finally:
        labels_gz.write_bytes(original)


def test_bad_budget_stops_before_any_work(repo, first_repro):
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    split_before = sha256(repo / "data/split/split.npz")
    try:
        params = yaml.safe_load(original)
        params["labels"] = 105
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        failed = run(repo, sys.executable, "-m", "stages.split", check=False)
        assert failed.returncode == 1
        assert failed.stderr.strip().splitlines() == [
            "error: labels=105 must be a positive multiple of the 10 classes so every class "
            "gets the same count (e.g. 100); fix it in params.yaml"
        ]
        assert sha256(repo / "data/split/split.npz") == split_before
    finally:
        params_file.write_text(original)


def set_params(repo: Path, section: str, **values) -> None:
    """Set keys of a params section, given by its dotted path (train.baseline)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    node = params
    for key in section.split("."):
        node = node[key]
    node.update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


TRAIN_BASELINE = (sys.executable, "-m", "stages.train", "baseline")


def start_and_kill_after_first_checkpoint(repo: Path) -> None:
    """Start train@baseline, SIGKILL it as soon as a per-epoch checkpoint exists."""
    cmd = list(TRAIN_BASELINE)
    proc = subprocess.Popen(cmd, cwd=repo, env=subprocess_env(), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (repo / CHECKPOINT).exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert (repo / CHECKPOINT).exists(), "the run finished before it could be killed"


def loss_curve(repo: Path) -> list[tuple[str, str]]:
    rows = (repo / "metrics/train/baseline/plots/metrics/train/loss.tsv").read_text().splitlines()
    return [tuple(row.split("\t")[1:]) for row in rows]  # drop the timestamp column


def test_killed_training_resumes_to_the_same_model(repo, first_repro):
    original = (repo / "params.yaml").read_text()
    stage = TRAIN_BASELINE
    try:
        set_params(repo, "train.baseline", epochs=25)
        run(repo, *stage)
        reference = {p: sha256(repo / p) for p in OUTPUTS}
        reference_curve = loss_curve(repo)
        assert not (repo / CHECKPOINT).exists()

        start_and_kill_after_first_checkpoint(repo)
        # The interrupted run left the previous model as it was.
        assert sha256(repo / OUTPUTS[0]) == reference[OUTPUTS[0]]

        resumed = run(repo, *stage)
        assert "resuming from models/baseline/checkpoint.pt after epoch" in resumed.stdout
        assert {p: sha256(repo / p) for p in OUTPUTS} == reference
        assert loss_curve(repo) == reference_curve
        assert sorted(p.name for p in (repo / "models/baseline").iterdir()) == [
            "model.pt",
            "model_last.pt",
        ]

        start_and_kill_after_first_checkpoint(repo)
        set_params(repo, "train.baseline", epochs=26)
        fresh = run(repo, *stage)
        assert "written with other params, data or code: ignoring it, starting fresh" in (
            fresh.stdout
        )
        assert "resuming" not in fresh.stdout
    finally:
        (repo / "params.yaml").write_text(original)
        (repo / CHECKPOINT).unlink(missing_ok=True)


def test_metrics_and_plots_read_without_errors(repo, first_repro):
    # Every declared metrics file is a metrics file (not a dvclive .tsv or image under a
    # declared folder), and every plot file renders: a user sees no "failed to load".
    metrics = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    failed = [name for name, entry in metrics[""]["data"].items() if "error" in entry]
    assert failed == []
    plots = json.loads(dvc(repo, "plots", "show", "--json").stdout)
    assert [error["name"] for error in plots.get("errors", [])] == []


def test_compare_collects_a_sweep_of_two_budgets_and_two_seeds(repo, first_repro, tmp_path):
    for labels in (100, 250):
        for seed in (0, 1):
            dvc(repo, "exp", "run", "-S", f"labels={labels}", "-S", f"seed={seed}",
                "-n", f"l{labels}-s{seed}")  # fmt: skip
    status = run(repo, "git", "status", "--porcelain").stdout
    compare = [sys.executable, "-m", "tools.compare"]
    shown = run(repo, *compare).stdout
    for labels in ("100", "250"):
        assert re.search(
            rf"\| mnist \| baseline \| {labels} \| 2 \| \d+\.\d\d ± \d+\.\d\d \|", shown
        )
    # Each ceiling once per seed, however many budgets the sweep has.
    assert re.search(r"\| mnist \| ceiling_cnn5 \| 60,000 \| 2 \|", shown)
    run(repo, *compare, "--out", str(tmp_path / "results"))
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
        "comparison.md",
        "comparison.png",
        "runs.json",
    ]
    assert run(repo, "git", "status", "--porcelain").stdout == status  # tracked files untouched

    dvc(repo, "exp", "run", "-S", "train.baseline.epochs=3", "-n", "longer")
    refused = run(repo, *compare, check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "error: run longer differs from the reference in train.baseline.epochs (3, reference 2); "
        "pass the --profile it was made with, or `dvc exp remove longer`"
    ]
