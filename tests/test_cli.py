"""Stage scripts stop on user errors with exactly one line on stderr and exit code 1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT


def run_stage(cwd: Path, stage: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), DVC_NO_ANALYTICS="1")
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def set_param(workdir: Path, key: str, value) -> None:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params[key] = value
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))


MISSING_RAW = "error: missing input data/raw/mnist.npz: run `dvc repro download` first"


@pytest.mark.parametrize(
    "command",
    [("split",), ("train", "baseline"), ("train", "vat"), ("evaluate",)],
)
def test_missing_upstream_output_is_one_line(workdir, command):
    proc = run_stage(workdir, *command)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [MISSING_RAW]


def test_an_unknown_method_is_refused_with_the_methods_of_the_train_section(workdir):
    proc = run_stage(workdir, "train", "nope")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: usage: python -m stages.train {baseline,sgan,consistency,vat} (a method of "
        "params.yaml's train section)"
    ]


def test_params_of_the_wrong_type_stop_before_any_work(workdir):
    set_param(workdir, "seed", "zero")
    proc = run_stage(workdir, "download")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: params.yaml: seed must be an integer, got 'zero' (str); fix it in params.yaml"
    ]
    assert not (workdir / "data").exists()
