"""The sweep collector: which experiments belong on the labels curve, and the table."""

from __future__ import annotations

import copy

import pytest
from stages.lib.config import PipelineError
from stages.sweep_report import accuracy_by_labels, collect_runs, plot_sweep, sweep_markdown

PARAMS = {"seed": 0, "labels": 100, "dataset": "mnist", "train_baseline": {"epochs": 30}}


def record(name, accuracy, **changes):
    params = copy.deepcopy(PARAMS)
    for key, value in changes.items():
        if key == "epochs":
            params["train_baseline"]["epochs"] = value
        else:
            params[key] = value
    metrics = {"baseline": {"test_accuracy": accuracy}}
    rev = "workspace" if name == "workspace" else f"{name}-rev"  # as dvc names them
    return {
        "rev": rev,
        "name": name,
        "data": {
            "rev": rev,
            "params": {"params.yaml": {"data": params}},
            "metrics": {"metrics/evaluate.json": {"data": metrics}},
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
        {"rev": "queued", "name": "queued", "data": {}},  # not finished yet
    )
    runs, skipped = collect_runs(shown)
    assert [r.name for r in runs] == ["main", "s1", "l250"]
    assert skipped == ["longer"]
    table = accuracy_by_labels(runs)
    assert table["baseline"] == {100: {0: 0.95, 1: 0.91}, 250: {0: 0.96}}
    text = sweep_markdown(table, skipped)
    assert "| baseline | 100 | 2 | 93.00% | [0: 95.00%, 1: 91.00%] |" in text
    assert "Skipped (other params changed too): longer" in text


def test_plot_is_written(tmp_path):
    runs, _ = collect_runs(exp_show(record("l250", 0.96, labels=250)))
    plot_sweep(accuracy_by_labels(runs), tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_commit_is_a_clear_error():
    with pytest.raises(PipelineError, match="found no commit"):
        collect_runs([record("workspace", 0.5)])
