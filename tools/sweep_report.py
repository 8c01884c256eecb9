"""Collect a label-budget sweep into plots/accuracy_vs_labels.png and a markdown table.

    dvc exp run --queue -S 'labels=50,100,250,500,1000,2000,6000' -S 'seed=0,1,2'
    dvc queue start -j 1
    python -m tools.sweep_report            # experiments of HEAD (or --rev REV)

Reads `dvc exp show --json`, takes the baseline commit and its experiments, and keeps
only runs whose params differ from the commit's in `labels` and `seed` alone. A run with
any other change (e.g. more epochs) would not belong on the same curve, so it is listed as
skipped instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from statistics import mean
from typing import Any

from fewlabels.config import PipelineError, run_stage
from fewlabels.io import save_figure, write_text
from fewlabels.paths import METRICS_DIR, PLOTS_DIR

SWEPT = ("labels", "seed")


@dataclass
class Run:
    name: str
    params: dict[str, Any]
    accuracy: dict[str, float]  # model -> test accuracy


def _run_of(record: dict[str, Any]) -> Run | None:
    data = record.get("data") or {}
    params = data.get("params", {}).get("params.yaml", {}).get("data")
    metrics = data.get("metrics", {}).get("metrics/evaluate.json", {}).get("data")
    if not params or not metrics:
        return None  # failed or still queued
    accuracy = {model: m["test_accuracy"] for model, m in metrics.items()}
    return Run(record.get("name") or data.get("rev", "?")[:7], params, accuracy)


def collect_runs(exp_show: list[dict[str, Any]]) -> tuple[list[Run], list[str]]:
    """Runs of one baseline commit comparable on a labels curve, and the names skipped."""
    commits = [record for record in exp_show if record.get("rev") != "workspace"]
    if not commits:
        raise PipelineError("dvc exp show found no commit: commit the project first")
    base_record = commits[0]
    base = _run_of(base_record)
    runs, skipped = ([base] if base else []), []
    for experiment in base_record.get("experiments") or []:
        for record in experiment.get("revs", []):
            run = _run_of(record)
            if run is None:
                continue
            if base and _without_swept(run.params) != _without_swept(base.params):
                skipped.append(run.name)
            else:
                runs.append(run)
    return runs, skipped


def _without_swept(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in SWEPT}


def accuracy_by_labels(runs: list[Run]) -> dict[str, dict[int, dict[int, float]]]:
    """model -> labels -> seed -> test accuracy (one value per seed; duplicates collapse)."""
    table: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for run in runs:
        for model, acc in run.accuracy.items():
            table[model][run.params["labels"]][run.params["seed"]] = acc
    return table


def sweep_markdown(table: dict[str, dict[int, dict[int, float]]], skipped: list[str]) -> str:
    lines = [
        "# Test accuracy versus number of labels",
        "",
        "Mean over split seeds; each seed's figure in brackets. Made by "
        "`python -m tools.sweep_report` from `dvc exp show`.",
        "",
        "| model | labels | seeds | mean test accuracy | per seed |",
        "|---|---:|---:|---:|---|",
    ]
    for model, by_labels in table.items():
        for labels in sorted(by_labels):
            seeds = by_labels[labels]
            per_seed = ", ".join(f"{s}: {a:.2%}" for s, a in sorted(seeds.items()))
            lines.append(
                f"| {model} | {labels:,} | {len(seeds)} | {mean(seeds.values()):.2%} "
                f"| [{per_seed}] |"
            )
    if skipped:
        lines += ["", f"Skipped (other params changed too): {', '.join(skipped)}"]
    return "\n".join(lines) + "\n"


def plot_sweep(table: dict[str, dict[int, dict[int, float]]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for model, by_labels in table.items():
        labels = sorted(by_labels)
        ax.plot(labels, [100 * mean(by_labels[n].values()) for n in labels], "o-", label=model)
        for n in labels:
            ax.scatter([n] * len(by_labels[n]), [100 * a for a in by_labels[n].values()],
                       s=10, color="grey", alpha=0.6, zorder=3)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("labeled training images (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy versus labels (line: mean over seeds; dots: each seed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(path, fig)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD", help="baseline commit of the sweep")
    args = parser.parse_args()
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json", "--rev", args.rev]
    shown = subprocess.run(cmd, capture_output=True, text=True)
    if shown.returncode != 0:
        raise PipelineError(f"`dvc exp show` failed: {shown.stderr.strip()}")
    runs, skipped = collect_runs(json.loads(shown.stdout))
    if not runs:
        raise PipelineError(f"no finished experiments for {args.rev}; run the sweep first")
    table = accuracy_by_labels(runs)
    plot_sweep(table, PLOTS_DIR / "accuracy_vs_labels.png")
    text = sweep_markdown(table, skipped)
    write_text(METRICS_DIR / "accuracy_vs_labels.md", text)
    print(text)


if __name__ == "__main__":
    run_stage(main)
