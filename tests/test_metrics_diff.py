"""`dvc metrics diff` between two commits shows a changed accuracy (what a PR comment posts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def sh(cwd: Path, *args: str) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{args}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


def commit_metrics(repo: Path, accuracy: float, message: str) -> None:
    metrics = {"baseline": {"test_accuracy": accuracy, "n_labeled": 100}}
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "metrics/evaluate.json").write_text(json.dumps(metrics))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    sh(tmp_path, "git", "init", "-q", "-b", "main")
    sh(tmp_path, sys.executable, "-m", "dvc", "init", "-q")
    sh(tmp_path, sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    (tmp_path / "dvc.yaml").write_text("metrics:\n  - metrics/evaluate.json\n")
    commit_metrics(tmp_path, 0.9, "first")
    return tmp_path


def test_metrics_diff_between_commits_shows_the_changed_accuracy(repo):
    commit_metrics(repo, 0.95, "better")
    table = sh(repo, sys.executable, "-m", "dvc", "metrics", "diff", "HEAD~1", "HEAD", "--md")
    row = next(line for line in table.splitlines() if "baseline.test_accuracy" in line)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells == ["metrics/evaluate.json", "baseline.test_accuracy", "0.9", "0.95", "0.05"]
    assert "n_labeled" not in table  # unchanged metrics are left out


def test_pull_request_workflow_runs_smoke_pipeline_and_posts_both_diffs():
    workflow_file = Path(__file__).parent.parent / ".github/workflows/pr-metrics.yml"
    workflow = yaml.safe_load(workflow_file.read_text())
    assert "pull_request" in workflow[True]  # YAML 1.1 reads the key `on` as True
    steps = workflow["jobs"]["smoke"]["steps"]
    assert steps[0]["with"]["fetch-depth"] == 0
    script = "\n".join(step.get("run", "") for step in steps)
    for command in (
        "python -m tools.profile smoke",
        "dvc repro",
        "dvc metrics diff origin/main --md",
        "dvc params diff origin/main --md",
        "gh pr comment",
    ):
        assert command in script
