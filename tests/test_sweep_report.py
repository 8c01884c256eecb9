"""The sweep collector: which experiments belong on the labels curve, and the table."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from fewlabels.config import PipelineError
from tools import sweep_report
from tools.sweep_report import accuracy_by_labels, collect_runs, plot_sweep, sweep_markdown

PARAMS = {
    "seed": 0,
    "labels": 100,
    "dataset": "mnist",
    "train": {"baseline": {"epochs": 30}, "sgan": {"conv": {"discriminator": {"hidden": 256}}}},
}


def record(name, accuracy, **changes):
    params = copy.deepcopy(PARAMS)
    for key, value in changes.items():
        if key == "epochs":
            params["train"]["baseline"]["epochs"] = value
        elif key == "sgan_hidden":
            params["train"]["sgan"]["conv"]["discriminator"]["hidden"] = value
        else:
            params[key] = value
    evaluated = {"baseline": {"dataset": "mnist", "test_accuracy": accuracy, "n_labeled": 100}}
    rev = "workspace" if name == "workspace" else f"{name}-rev"  # as dvc names them
    return {
        "rev": rev,
        "name": name,
        "data": {
            "rev": rev,
            "params": {"params.yaml": {"data": params}},
            # Every metrics file of dvc.yaml; the curve reads evaluate.json alone.
            "metrics": {
                "metrics/train/baseline/metrics.json": {"data": {"val_accuracy": 0.5}},
                "metrics/train/sgan/metrics.json": {"data": {"test_accuracy": 0.1}},
                "metrics/evaluate.json": {"data": evaluated},
            },
        },
    }


def exp_show(*experiments):
    """The shape of `dvc exp show --json`: workspace, then the commit with its experiments."""
    commit = record("main", 0.95)
    commit["experiments"] = [{"name": e["name"], "revs": [e]} for e in experiments]
    return [record("workspace", 0.95), commit]


def test_runs_differing_only_in_labels_and_seed_make_the_curve():
    shown = exp_show(
        record("s1", 0.91, seed=1),
        record("l250", 0.96, labels=250),
        record("longer", 0.99, epochs=60),  # another change: not on the same curve
        record("wider", 0.98, sgan_hidden=512),  # a nested change of another method, too
        {"rev": "queued", "name": "queued", "data": {}},  # not finished yet
    )
    runs, skipped = collect_runs(shown)
    assert [r.name for r in runs] == ["main", "s1", "l250"]
    assert skipped == ["longer", "wider"]
    table = accuracy_by_labels(runs)
    assert table["baseline"] == {100: {0: 0.95, 1: 0.91}, 250: {0: 0.96}}
    text = sweep_markdown(table, skipped)
    assert "| baseline | 100 | 2 | 93.00% | [0: 95.00%, 1: 91.00%] |" in text
    assert "Skipped (other params changed too): longer, wider" in text


def test_plot_is_written(tmp_path):
    runs, _ = collect_runs(exp_show(record("l250", 0.96, labels=250)))
    plot_sweep(accuracy_by_labels(runs), tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_commit_is_a_clear_error():
    with pytest.raises(PipelineError, match="found no commit"):
        collect_runs([record("workspace", 0.5)])


def test_main_writes_the_plot_and_the_table_from_dvc_exp_show(tmp_path, monkeypatch, capsys):
    shown = exp_show(record("s1", 0.91, seed=1), record("longer", 0.99, epochs=60))
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(shown), stderr="")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep_report.subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["tools/sweep_report.py", "--rev", "main"])
    sweep_report.main()
    assert calls == [[sys.executable, "-m", "dvc", "exp", "show", "--json", "--rev", "main"]]
    table = (tmp_path / "metrics/accuracy_vs_labels.md").read_text()
    assert "| baseline | 100 | 2 | 93.00% |" in table and table in capsys.readouterr().out
    assert (tmp_path / "plots/accuracy_vs_labels.png").read_bytes()[:4] == b"\x89PNG"


def test_main_stops_when_dvc_exp_show_fails(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 255, stdout="", stderr="ERROR: not a dvc repo")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep_report.subprocess, "run", failing_run)
    monkeypatch.setattr(sys, "argv", ["tools/sweep_report.py"])
    with pytest.raises(PipelineError, match="`dvc exp show` failed: ERROR: not a dvc repo"):
        sweep_report.main()
    assert not (tmp_path / "metrics").exists()
