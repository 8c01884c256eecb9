"""Compare the methods over label budgets and split seeds, from `dvc exp` runs.

    dvc exp run --queue -S seed=1 -n mnist-l100-s1     # docs/results.md: the whole queue
    dvc queue start -j 1
    python -m tools.compare                            # print the table; writes nothing
    python -m tools.compare --out results              # results/runs.json, .md, .png
    python -m tools.compare --profile smoke            # a sweep made with a profile
    python -m tools.compare --keep results/runs.json --out results --readme

Collects the experiments of a commit (`--rev`, default HEAD) from `dvc exp show`. A run
belongs to the comparison when its params equal the reference (the commit's params.yaml
plus the `--profile` overrides) in everything but `seed`, `labels` and `dataset`, and all
runs ran the same code; an experiment made otherwise stops the tool with one line naming
it and the key, instead of landing silently on the curve. `--keep results/runs.json` adds
the runs a previous collection saved (same reference and code only); `--readme` rewrites
README.md's headline table (100 labels) from the collected runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from fewlabels.config import PipelineError, run_stage
from fewlabels.io import save_figure, write_json, write_text
from fewlabels.methods import evaluated_models
from tools.profile import apply_overrides, flatten, load_profile

SWEPT = ("seed", "labels", "dataset")
CODE_PREFIXES = ("stages/", "fewlabels/")
EVALUATE = "metrics/evaluate.json"
README = Path("README.md")
README_BEGIN, README_END = "<!-- comparison:begin -->", "<!-- comparison:end -->"
HEADLINE_LABELS = 100

# Published figures at the same setting (test accuracy) that no method module carries.
PAPERS: dict[str, dict[tuple[str, int], tuple[str, float]]] = {
    # Salimans et al. 2016, Table 1: 221 +- 136 and 93 +- 6.5 test errors of 10,000.
    "sgan": {("mnist", 50): ("Salimans 2016", 0.9779), ("mnist", 100): ("Salimans 2016", 0.9907)},
}


@dataclass(frozen=True)
class Run:
    """One finished pipeline run: its swept params and every model's scores."""

    name: str
    dataset: str
    labels: int
    seed: int
    code: str  # fingerprint of the stage and library code the run executed
    models: dict[str, dict[str, Any]]  # model -> dataset, labels_used, test_accuracy


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def config_of(params: dict[str, Any]) -> dict[str, Any]:
    """Every param but the swept ones, flattened to dotted keys."""
    return {k: v for k, v in flatten(params).items() if k not in SWEPT}


def run_of(record: dict[str, Any]) -> tuple[Run, dict[str, Any]] | None:
    """A record of `dvc exp show --json` as a Run and its params; None if unfinished."""
    data = record.get("data") or {}
    params = data.get("params", {}).get("params.yaml", {}).get("data")
    scores = data.get("metrics", {}).get(EVALUATE, {}).get("data")
    if record.get("error") or not params or not scores:
        return None
    code = {
        p: d.get("hash") for p, d in data.get("deps", {}).items() if p.startswith(CODE_PREFIXES)
    }
    models = {
        model: {k: s[k] for k in ("dataset", "labels_used", "test_accuracy")}
        for model, s in scores.items()
    }
    name = record.get("name") or data.get("rev", "?")[:7]
    run = Run(name, params["dataset"], params["labels"], params["seed"], fingerprint(code), models)
    return run, params


def exp_show(rev: str, num: int) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json", "--rev", rev, "--num", str(num)]
    shown = subprocess.run(cmd, capture_output=True, text=True)
    if shown.returncode != 0:
        raise PipelineError(f"`dvc exp show` failed: {shown.stderr.strip().splitlines()[-1:]}")
    return json.loads(shown.stdout)


def collect(
    shown: list[dict[str, Any]], profile: dict[str, Any]
) -> tuple[list[Run], dict[str, Any]]:
    """The experiments of the shown commits, and the reference params they must match.

    Stops at the first experiment made with other params. A commit's own metrics are not a
    run: nothing proves they were made with its params (queue the default as an experiment
    too; DVC restores it from the cache).
    """
    commits = [record for record in shown if record.get("rev") != "workspace"]
    if not commits:
        raise PipelineError("dvc exp show found no commit: commit the project first")
    first = commits[0].get("data", {}).get("params", {}).get("params.yaml", {}).get("data")
    if not first:
        raise PipelineError(f"commit {commits[0]['rev'][:7]} has no params.yaml")
    reference = apply_overrides(first, profile)
    wanted = config_of(reference)
    runs, unfinished = [], 0
    for commit in commits:
        for experiment in commit.get("experiments") or []:
            # A queued or running experiment shows its params beside its baseline's metrics.
            state = (experiment.get("executor") or {}).get("state", "success")
            found = run_of(experiment["revs"][0]) if state == "success" else None
            if found is None:
                unfinished += 1
                continue
            run, params = found
            differs = {k: v for k, v in config_of(params).items() if wanted.get(k) != v}
            differs |= {k: None for k in wanted.keys() - config_of(params).keys()}
            if differs:
                key, value = next(iter(sorted(differs.items())))
                more = f" and {len(differs) - 1} other key(s)" if len(differs) > 1 else ""
                raise PipelineError(
                    f"run {run.name} differs from the reference in {key} ({value!r}, reference "
                    f"{wanted.get(key)!r}){more}; pass the --profile it was made with, or "
                    f"`dvc exp remove {run.name}`"
                )
            runs.append(run)
    if unfinished:
        print(f"left out {unfinished} queued, running or failed experiment(s)", file=sys.stderr)
    return runs, reference


def merge(runs: list[Run], kept: list[Run]) -> list[Run]:
    """One run per (dataset, labels, seed), the collected ones first; one code version."""
    merged: dict[tuple[str, int, int], Run] = {}
    for run in [*runs, *kept]:
        merged.setdefault((run.dataset, run.labels, run.seed), run)
    codes = defaultdict(list)
    for run in merged.values():
        codes[run.code].append(run.name)
    if len(codes) > 1:
        groups = "; ".join(", ".join(names) for names in codes.values())
        raise PipelineError(
            f"runs from different code cannot be compared ({groups}); rerun them on one commit"
        )
    return sorted(merged.values(), key=lambda r: (r.dataset, r.labels, r.seed))


def method_of(model: str) -> str:
    """vae_svm@100 -> vae_svm: one method over budgets."""
    return model.split("@")[0]


def scores_by_setting(runs: list[Run]) -> dict[tuple[str, str, int], dict[int, float]]:
    """(dataset, method, labels used) -> seed -> test accuracy.

    Models that do not depend on `labels` (ceilings, VAE + SVM) appear in every run of a
    seed; one seed is one sample, so they count once.
    """
    table: dict[tuple[str, str, int], dict[int, float]] = defaultdict(dict)
    for run in runs:
        for model, s in run.models.items():
            key = (s["dataset"], method_of(model), s["labels_used"])
            table[key].setdefault(run.seed, s["test_accuracy"])
    return table


def percent(seeds: dict[int, float]) -> str:
    values = [100 * a for a in seeds.values()]
    spread = f" ± {stdev(values):.2f}" if len(values) > 1 else ""
    return f"{mean(values):.2f}{spread}"


def comparison_markdown(
    runs: list[Run], reported: dict[str, dict], command: str, only_labels: int | None = None
) -> str:
    """Mean ± standard deviation over seeds of every method at every budget, beside the
    seed report's figure (the floor to beat) and the paper's."""
    table = scores_by_setting(runs)
    order = list(dict.fromkeys(method_of(m) for run in runs for m in run.models))
    lines = [
        f"Test accuracy (%), mean ± standard deviation over split seeds. Made by `{command}`.",
        "",
        "| dataset | method | labels | seeds | test accuracy | seed report | paper |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    datasets = list(dict.fromkeys(k[0] for k in table))
    rows = sorted(table, key=lambda k: (datasets.index(k[0]), order.index(k[1]), k[2]))
    for dataset, method, labels in rows:
        if only_labels is not None and labels != only_labels and not method.startswith("ceiling"):
            continue
        seeds = table[dataset, method, labels]
        # A method module's figure is a seed report's ("... report") or else a paper's.
        found = reported.get(method, {}).get((dataset, labels))
        seed_report = found if found and found[0].endswith("report") else None
        paper = PAPERS.get(method, {}).get((dataset, labels)) or (
            found if not seed_report else None
        )
        anchors = [f"{100 * a[1]:.2f} ({a[0]})" if a else "-" for a in (seed_report, paper)]
        lines.append(
            f"| {dataset} | {method} | {labels:,} | {len(seeds)} | {percent(seeds)} | "
            f"{anchors[0]} | {anchors[1]} |"
        )
    return "\n".join(lines) + "\n"


def comparison_figure(runs: list[Run]) -> Any:
    """Test accuracy against labels per dataset: every method over budgets with error bars
    over seeds, the fully supervised ceilings as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = scores_by_setting(runs)
    datasets = list(dict.fromkeys(k[0] for k in table))
    methods = list(dict.fromkeys(method_of(m) for run in runs for m in run.models))
    ceilings = [m for m in methods if m.startswith("ceiling_")]
    curves = [m for m in methods if m not in ceilings]
    colours = dict(zip(curves, plt.get_cmap("tab10").colors, strict=False))
    dashes = dict(zip(ceilings, ["--", ":", "-.", (0, (5, 1, 1, 1))] * 3, strict=False))
    fig, axes = plt.subplots(1, len(datasets), figsize=(8 * len(datasets), 4.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for method in methods:
            points = sorted(
                (n, s) for (d, m, n), s in table.items() if d == dataset and m == method
            )
            if not points:
                continue
            values = [[100 * a for a in s.values()] for _, s in points]
            if method in ceilings:
                ax.axhline(mean(values[0]), color="0.45", ls=dashes[method], lw=1,
                           label=f"{method} ({points[0][0]:,} labels)")  # fmt: skip
                continue
            ax.errorbar(
                [n for n, _ in points],
                [mean(v) for v in values],
                yerr=[stdev(v) if len(v) > 1 else 0 for v in values],
                color=colours[method], marker="o", capsize=3, label=method,
            )  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("labeled training images (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{dataset}: mean over split seeds, bars ± 1 std")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def anchors_of(params: dict[str, Any]) -> dict[str, dict]:
    """method -> (dataset, labels) -> the seed report's or paper's (source, accuracy)."""
    reported: dict[str, dict] = defaultdict(dict)
    for model, entry in evaluated_models(params).items():
        reported[method_of(model)].update(entry["reported"])
    return reported


def with_readme_table(readme: str, table: str) -> str:
    """README text with the block between the comparison markers replaced by `table`."""
    if README_BEGIN not in readme or README_END not in readme:
        raise PipelineError(f"README.md lacks the lines {README_BEGIN} and {README_END}")
    head, rest = readme.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_BEGIN}\n{table}{README_END}{tail}"


def load_runs(path: Path) -> tuple[list[Run], str]:
    if not path.exists():
        raise PipelineError(f"{path} does not exist; drop --keep or collect the runs first")
    saved = json.loads(path.read_text())
    return [Run(**run) for run in saved["runs"]], saved["reference"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD", help="commit whose experiments to collect")
    parser.add_argument("--num", type=int, default=1, help="... and of the commits before it")
    parser.add_argument("--profile", help="the profile the sweep was made with (profiles/)")
    parser.add_argument("--keep", type=Path, help="runs.json of an earlier collection to add")
    parser.add_argument("--readme", action="store_true", help="rewrite README.md's table")
    parser.add_argument("--out", type=Path, help="folder to write runs.json, comparison.md "
                        "and comparison.png into (default: print the table only)")  # fmt: skip
    args = parser.parse_args()
    profile = load_profile(args.profile) if args.profile else {}
    runs, reference = collect(exp_show(args.rev, args.num), profile)
    wanted = fingerprint(config_of(reference))
    kept: list[Run] = []
    if args.keep:
        kept, saved_reference = load_runs(args.keep)
        if saved_reference != wanted:
            raise PipelineError(f"{args.keep} was collected with other params; drop --keep")
    runs = merge(runs, kept)
    if not runs:
        raise PipelineError("no finished run matches the reference; run the sweep first")
    command = "python -m tools.compare" + (f" --profile {args.profile}" if args.profile else "")
    reported = anchors_of(reference)
    text = "# Comparison\n\n" + comparison_markdown(runs, reported, command)
    print(text)
    if args.out:
        runs_file = {"reference": wanted, "runs": [asdict(run) for run in runs]}
        write_json(args.out / "runs.json", runs_file)
        write_text(args.out / "comparison.md", text)
        save_figure(args.out / "comparison.png", comparison_figure(runs))
        print(f"wrote {args.out}/runs.json, comparison.md, comparison.png")
    if args.readme:
        table = comparison_markdown(runs, reported, command, only_labels=HEADLINE_LABELS)
        write_text(README, with_readme_table(README.read_text(), table))
        print(f"wrote the table of {README}")


if __name__ == "__main__":
    run_stage(main)
