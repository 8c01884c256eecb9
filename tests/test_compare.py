"""The comparison tool: which runs belong together, the statistics, what it writes."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from fewlabels.config import PipelineError
from tests.conftest import REPO_ROOT
from tools import compare
from tools.compare import Run, collect, comparison_markdown, merge, with_readme_table

PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
CODE_DEPS = {"stages/train.py": {"hash": "aa"}, "fewlabels/train.py": {"hash": "bb"}}


def record(name, labels=100, seed=0, accuracy=0.9, ceiling=0.99, code=CODE_DEPS, **params):
    """One run as `dvc exp show --json` shows it; `params` sets dotted keys."""
    p = copy.deepcopy(PARAMS) | {"labels": labels, "seed": seed}
    for dotted, value in params.items():
        *parents, leaf = dotted.split("__")
        node = p
        for part in parents:
            node = node[part]
        node[leaf] = value
    scores = {
        "baseline": {"dataset": "mnist", "labels_used": labels, "test_accuracy": accuracy},
        "ceiling_cnn5": {"dataset": "mnist", "labels_used": 60000, "test_accuracy": ceiling},
    }
    return {
        "rev": f"{name}-rev",
        "name": name,
        "data": {
            "rev": f"{name}-rev",
            "params": {"params.yaml": {"data": p}},
            "metrics": {"metrics/evaluate.json": {"data": scores}},
            "deps": {**code, "data/split": {"hash": f"{labels}-{seed}.dir"}},
        },
    }


def exp_show(commit, *experiments, state="success"):
    """The shape of `dvc exp show --json`: workspace, then the commit with its experiments."""
    commit = copy.deepcopy(commit)
    commit["experiments"] = [
        {"name": e["name"], "revs": [e], "executor": {"state": state}} for e in experiments
    ]
    workspace = record("workspace", accuracy=0.1) | {"rev": "workspace"}
    return [workspace, commit]


def test_seeds_and_budgets_are_grouped_with_mean_std_and_count():
    shown = exp_show(
        record("main", accuracy=0.5),  # the commit's metrics: not a run
        record("s0", accuracy=0.90),
        record("s1", seed=1, accuracy=0.92, ceiling=0.98),
        record("l250", labels=250, accuracy=0.95),
    )
    runs, _ = collect(shown, profile={})
    assert sorted((r.labels, r.seed) for r in runs) == [(100, 0), (100, 1), (250, 0)]
    table = comparison_markdown(runs, reported={}, command="cmd")
    assert "| mnist | baseline | 100 | 2 | 91.00 ± 1.41 | - | - |" in table
    assert "| mnist | baseline | 250 | 1 | 95.00 | - | - |" in table
    # The ceiling is in every run of a seed; a seed counts once, not once per budget.
    assert "| mnist | ceiling_cnn5 | 60,000 | 2 | 98.50 ± 0.71 | - | - |" in table


def test_headline_keeps_one_budget_and_the_ceilings():
    shown = exp_show(record("main"), record("s0"), record("l250", labels=250))
    runs, _ = collect(shown, profile={})
    table = comparison_markdown(runs, reported={}, command="cmd", only_labels=250)
    assert "| baseline | 250 |" in table and "| baseline | 100 |" not in table
    assert "ceiling_cnn5" in table


def test_an_experiment_with_other_params_is_refused_by_name_and_key():
    shown = exp_show(record("main"), record("longer", seed=1, train__baseline__epochs=99))
    with pytest.raises(PipelineError, match=r"run longer differs .* train\.baseline\.epochs \(99"):
        collect(shown, profile={})


def test_a_profile_sweep_is_collected_with_its_profile_and_refused_without():
    smoke = yaml.safe_load((REPO_ROOT / "profiles/smoke.yaml").read_text())
    small = {"split__pool_size": smoke["split"]["pool_size"]}
    rest = {f"train__baseline__{k}": v for k, v in smoke["train"]["baseline"].items()}
    shown = exp_show(record("main"), record("a", seed=1, **small, **rest))
    with pytest.raises(PipelineError, match="run a differs"):
        collect(shown, profile={})
    only = {"split": smoke["split"], "train": {"baseline": smoke["train"]["baseline"]}}
    runs, _ = collect(shown, profile=only)
    assert [r.name for r in runs] == ["a"]


def test_runs_of_other_code_are_refused():
    other = {**CODE_DEPS, "stages/train.py": {"hash": "changed"}}
    shown = exp_show(record("main"), record("s0"), record("s1", seed=1, code=other))
    runs, _ = collect(shown, profile={})
    with pytest.raises(PipelineError, match="different code"):
        merge(runs, [])


def test_queued_and_failed_experiments_are_left_out(capsys):
    queued = {"rev": "q-rev", "name": "q", "data": {"rev": "q-rev", "params": {}}}
    failed = record("f", seed=2) | {"error": {"type": "ReproductionError"}}
    runs, _ = collect(exp_show(record("main"), record("s0"), queued, failed), profile={})
    assert [r.name for r in runs] == ["s0"]
    assert "left out 2" in capsys.readouterr().err
    # A running experiment shows its own params beside its baseline's metrics.
    running = exp_show(record("main"), record("s1", seed=1), state="running")
    assert collect(running, profile={})[0] == []


def test_merge_keeps_one_run_per_setting_collected_first():
    a = Run("new", "mnist", 100, 0, "c", {})
    b = Run("saved", "mnist", 100, 0, "c", {})
    c = Run("saved2", "mnist", 250, 0, "c", {})
    assert [r.name for r in merge([a], [b, c])] == ["new", "saved2"]


def test_readme_block_is_replaced_between_the_markers():
    readme = "# T\n<!-- comparison:begin -->\nold\n<!-- comparison:end -->\nrest\n"
    new = with_readme_table(readme, "| new |\n")
    assert new == "# T\n<!-- comparison:begin -->\n| new |\n<!-- comparison:end -->\nrest\n"
    with pytest.raises(PipelineError, match="lacks"):
        with_readme_table("# T\n", "x")


def run_main(monkeypatch, tmp_path, shown, *args):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compare, "exp_show", lambda rev, num: shown)
    monkeypatch.setattr("sys.argv", ["compare", *args])
    compare.main()


def test_main_writes_nothing_unless_given_a_folder(tmp_path, monkeypatch, capsys):
    shown = exp_show(record("main"), record("s0"), record("s1", seed=1))
    run_main(monkeypatch, tmp_path, shown)
    assert "| mnist | baseline | 100 | 2 |" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    run_main(monkeypatch, tmp_path, shown, "--out", "results")
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
        "comparison.md",
        "comparison.png",
        "runs.json",
    ]


def test_saved_runs_are_added_only_when_made_with_the_same_params(tmp_path, monkeypatch, capsys):
    run_main(monkeypatch, tmp_path, exp_show(record("main"), record("s0")), "--out", "results")
    saved = tmp_path / "results/runs.json"
    capsys.readouterr()
    shown = exp_show(record("main"), record("s1", seed=1))
    run_main(monkeypatch, tmp_path, shown, "--keep", str(saved))
    assert "| mnist | baseline | 100 | 2 |" in capsys.readouterr().out
    runs = json.loads(saved.read_text())
    runs["reference"] = "other"
    saved.write_text(json.dumps(runs))
    with pytest.raises(PipelineError, match="other params"):
        run_main(monkeypatch, tmp_path, shown, "--keep", str(saved))


def test_readme_and_results_agree_with_the_saved_runs():
    saved = REPO_ROOT / "results/runs.json"
    runs, reference = compare.load_runs(saved)
    # The committed comparison describes the committed defaults.
    assert reference == compare.fingerprint(compare.config_of(PARAMS))
    reported = compare.anchors_of(PARAMS)
    command = "python -m tools.compare"
    headline = comparison_markdown(runs, reported, command, only_labels=compare.HEADLINE_LABELS)
    readme = (REPO_ROOT / "README.md").read_text()
    assert with_readme_table(readme, headline) == readme, "rerun tools.compare --readme"
    full = "# Comparison\n\n" + comparison_markdown(runs, reported, command)
    assert (REPO_ROOT / "results/comparison.md").read_text() == full
