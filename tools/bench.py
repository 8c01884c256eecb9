"""Benchmark: training throughput of every trainer, and stage timings of a full `dvc repro`.

    python -m tools.bench                      # throughput -> metrics/bench.json "throughput"
    python -m tools.bench --trainers sgan vae  # some trainers only
    python -m tools.bench --repro smoke        # time each stage -> metrics/bench.json "repro"

Throughput: every method of params.yaml's `train` section (its own `train_step` on the
split, as stage train@<method> trains it), then the trainers that are not split methods
(the cnn5 ceiling, the retrain, the VAE, and the SGAN at the report's conv architecture),
each at params.yaml's sizes, on real MNIST, on params' `device`. Images per second
(labeled + unlabeled + generated images of a step) with the trainer's own data path and
with the model alone on one pre-drawn batch; their ratio and the data path's cost. The
SGAN with the report's conv architecture is also fed by a straightforward per-sample
Dataset + DataLoader, the reference. Not a pipeline stage: the figures depend on the
machine.

Repro: a copy of the repository as a fresh clone has it (a new git repository, profile
applied), each stage run in pipeline order with `dvc repro --force --single-item`; wall time and
peak memory per stage.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewlabels.config import (
    DATASET_CLASSES,
    NO_AUGMENT,
    PipelineError,
    load_params,
    parse_config,
    resolve_device,
    run_stage,
    seed_everything,
)
from fewlabels.data import class_balanced_split
from fewlabels.methods import ceilings, load_method, parse_method_config, retrain, sgan, vae
from fewlabels.models import Network
from fewlabels.paths import METRICS_DIR, SPLIT_FILE, load_raw, load_split
from fewlabels.supervised import classifier_step
from fewlabels.train import Run, SplitData, Step

from .bench_lib import (
    StageRun,
    Update,
    adam_update,
    device_name,
    ema_teacher,
    measure,
    prepare,
    repro_summary,
    scratch_repo,
    sgan_reference_step,
    stage_order,
    summarize,
    time_noop_repro,
    time_stages,
    update_json,
)

BENCH_FILE = METRICS_DIR / "bench.json"
MAX_COST_PCT = 10.0  # target: the data path costs under 10% of the model-only throughput
MIN_SPEEDUP = 3.0  # target: SGAN (report conv) >= 3x the per-sample DataLoader reference
# The SGAN report's conv architecture (params.yaml's default is narrower, for speed).
SGAN_REPORT_CONV = {
    "discriminator": {"channels": [64, 128], "hidden": 256},
    "generator": {"channels": [128, 64]},
}
PROFILES = ("smoke", "default")
SIZE_KEYS = ("channels", "hidden", "latent")  # what `describe` shows of a network's config


@dataclass
class Case:
    """A trainer ready to time: what it trains, its step, its optimizer update."""

    model: nn.Module
    step: Step
    update: Update
    about: str
    reference: Callable[[], None] | None = None  # one step of the reference loop


@dataclass
class Setup:
    params: dict[str, Any]
    device: torch.device
    generator: torch.Generator
    load: Callable[[str], dict[str, Tensor]] = load_raw  # a dataset's arrays, on the CPU
    loaded: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False)

    def raw(self, dataset: str) -> dict[str, Tensor]:
        if dataset not in self.loaded:
            self.loaded[dataset] = self.load(dataset)
        return self.loaded[dataset]

    @property
    def run(self) -> Run:
        return Run(self.device, self.generator)

    def train_set(self) -> tuple[Tensor, Tensor]:
        data = self.raw(self.params["dataset"])
        return data["x_train"], data["y_train"]

    def split(self) -> dict[str, Tensor]:
        """The split stage's sets: its file when present, else drawn as it draws them."""
        if SPLIT_FILE.exists():
            return load_split()
        p = self.params
        drawn = class_balanced_split(
            self.train_set()[1].numpy(),
            p["labels"],
            p["split"]["val_size"],
            p["seed"],
            p["split"]["pool_size"],
        )
        return {key: torch.from_numpy(value) for key, value in drawn.items()}

    def split_data(self, unlabeled_includes_labeled: bool = False) -> SplitData:
        """The split's images on the device, as stage train@<method> hands them over."""
        (x, y), split = self.train_set(), self.split()
        labeled, unlabeled = split["labeled_idx"], split["unlabeled_idx"]
        if unlabeled_includes_labeled:
            unlabeled = torch.cat([labeled, unlabeled])
        return SplitData(*(t.to(self.device) for t in (x[labeled], y[labeled], x[unlabeled])))

    @property
    def n_classes(self) -> int:
        return DATASET_CLASSES[self.params["dataset"]]


def describe(parts: dict[str, Network]) -> str:
    """Each saved network of a trainer: its architecture and sizes."""
    return "; ".join(
        f"{net.arch} " + ", ".join(f"{k} {net.config[k]}" for k in SIZE_KEYS if k in net.config)
        for net in parts.values()
    )


def split_method(name: str, s: Setup) -> Case:
    """Method `name` of params.yaml's `train` section, as stage train@<method> trains it:
    its `build` and `train_step` on the split, with the moving-average teacher when its
    config has `teacher: ema`; Adam over all its parameters at `lr`."""
    method, cfg = load_method(name), parse_method_config(name, s.params)
    model, parts = method.build(cfg, s.n_classes)
    model = prepare(model, s.device)
    data = s.split_data()
    teacher = getattr(cfg, "teacher", None) == "ema"
    ema = ema_teacher(model, cfg.ema_decay, s.device) if teacher else None
    step = method.train_step(model, data, cfg, s.run, ema)
    weight_decay = getattr(cfg, "weight_decay", 0.0)
    update = adam_update(model.parameters(), lr=cfg.lr, weight_decay=weight_decay)
    images = f"{len(data.x_labeled)} labeled, {len(data.x_unlabeled)} unlabeled images"
    return Case(model, step, update, f"{describe(parts)}; {images}")


def ceiling_cnn5(s: Setup) -> Case:
    cfg = parse_method_config("ceilings", s.params)
    model, parts = ceilings.build("cnn5", s.n_classes)
    model = prepare(model, s.device)
    augment = cfg.augment if cfg.models.cnn5.augment else NO_AUGMENT
    x, y = (t.to(s.device) for t in s.train_set())
    step = classifier_step(model, x, y, cfg.batch_size, augment, s.run)
    update = adam_update(model.parameters(), lr=cfg.lr)
    return Case(model, step, update, f"{describe(parts)}; all {len(x)} training images")


def retrain_cnn(s: Setup) -> Case:
    cfg = parse_method_config("retrain", s.params)
    model, parts = retrain.build(cfg, s.n_classes)
    model = prepare(model, s.device)
    # The training images with their own labels stand in for labeled + pseudo-labeled ones
    # (at most as many): the step's cost does not depend on the labels' values.
    x, y = (t.to(s.device) for t in s.train_set())
    step = classifier_step(model, x, y, cfg.batch_size, cfg.augment, s.run)
    update = adam_update(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return Case(model, step, update, f"{describe(parts)}; {len(x)} (pseudo-)labeled images")


def sgan_conv_report(s: Setup) -> Case:
    """The SGAN at the report's conv sizes and recipe (no pseudo-labels, which the
    reference cannot draw), trained as its stage trains it (one Adam with the
    discriminator's and the generator's learning rates, `beta1`), and the reference loop
    on its own copy of the model, so the two do not share weights."""
    section = {
        **s.params["train"]["sgan"],
        "arch": "conv",
        "conv": SGAN_REPORT_CONV,
        "pseudo_label_weight": 0.0,
    }
    cfg = parse_config(sgan.Config, section, "train.sgan")
    model, parts = sgan.build(cfg, s.n_classes)
    model = prepare(model, s.device)
    data = s.split_data(cfg.unlabeled_includes_labeled)
    ema = ema_teacher(model, cfg.ema_decay, s.device) if cfg.teacher == "ema" else None
    step = sgan.train_step(model, data, cfg, s.run, ema)
    update = adam_update(
        [
            {"params": list(model.discriminator.parameters()), "lr": cfg.lr},
            {"params": list(model.generator.parameters()), "lr": cfg.generator_lr},
        ],
        lr=cfg.lr,
        betas=(cfg.beta1, 0.999),
    )
    reference = sgan_reference_step(
        sgan.build(cfg, s.n_classes)[0],
        *(t.cpu() for t in (data.x_labeled, data.y_labeled, data.x_unlabeled)),
        cfg,
        s.device,
    )
    return Case(model, step, update, describe(parts), reference)


def vae_m1(s: Setup) -> Case:
    cfg = parse_method_config("vae", s.params)
    model, parts = vae.build(cfg, DATASET_CLASSES[cfg.dataset])
    model = prepare(model, s.device)
    images = s.raw(cfg.dataset)["x_train"]
    if cfg.pool_size:
        images = images[: cfg.pool_size]  # the stage's seeded pool has this many
    step = vae.vae_step(model, images.to(s.device), cfg, s.run, first_step=0)
    update = adam_update(model.parameters(), lr=cfg.lr)
    return Case(model, step, update, f"{describe(parts)}; {len(images)} images")


# The trainers that are not methods of params.yaml's `train` section.
OTHER_TRAINERS: dict[str, Callable[[Setup], Case]] = {
    "ceiling_cnn5": ceiling_cnn5,
    "retrain": retrain_cnn,
    "sgan_conv_report": sgan_conv_report,
    "vae": vae_m1,
}


def trainers(params: dict[str, Any]) -> dict[str, Callable[[Setup], Case]]:
    """Every trainer to time: each method of params.yaml's `train` section, then the others."""
    return {**{name: partial(split_method, name) for name in params["train"]}, **OTHER_TRAINERS}


def throughput(args: argparse.Namespace, params: dict[str, Any]) -> None:
    available = trainers(params)
    setup = Setup(params, resolve_device(params["device"]), seed_everything(params["seed"]))
    print(f"images/s on {device_name(setup.device)}, fastest of {args.rounds} x {args.steps} steps")
    print(
        f"{'trainer':<18} {'img/step':>8} {'data path':>10} {'model only':>10} {'ratio':>6} "
        f"{'cost':>7}"
    )
    results = {}
    for name in args.trainers:
        case = available[name](setup)
        timings = measure(
            case.step,
            case.update,
            steps=args.steps,
            warmup=args.warmup,
            rounds=args.rounds,
            device=setup.device,
            reference=case.reference,
        )
        r = results[name] = {"model": case.about, **summarize(timings, MAX_COST_PCT, MIN_SPEEDUP)}
        print(
            f"{name:<18} {r['images_per_step']:>8} {r['data_path_images_per_s']:>10,.0f} "
            f"{r['model_only_images_per_s']:>10,.0f} {r['ratio']:>6.3f} "
            f"{r['data_path_cost_pct']:>6.1f}%",
            flush=True,
        )
    print()
    for name, r in results.items():
        if "reference_images_per_s" in r:
            print(
                f"{name}: straightforward loop (per-sample DataLoader, separate D/G updates) "
                f"{r['reference_images_per_s']:,.0f} images/s; the data path is "
                f"{r['speedup_vs_reference']:.2f}x that (target >= {MIN_SPEEDUP:g}x: "
                f"{'met' if r['speedup_ok'] else 'NOT met'})"
            )
    slow = [name for name, r in results.items() if not r["data_path_cost_ok"]]
    print(
        f"data path cost < {MAX_COST_PCT:g}% of the model-only throughput: "
        + (f"NOT met by {', '.join(slow)}" if slow else "met by every trainer")
    )
    section = {
        "device": device_name(setup.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "trainers": results,
    }
    update_json(BENCH_FILE, ("throughput",), section)
    print(f"wrote {BENCH_FILE} (throughput)")


def repro(profile: str, keep: Path | None = None) -> None:
    if not Path("dvc.yaml").exists():
        raise PipelineError("dvc.yaml not found: run the benchmark from the repository root")
    if keep is not None and (keep / profile).exists():
        raise PipelineError(f"--keep: {keep / profile} already exists; name a new folder")
    print(f"\ndvc repro, {profile} profile, stage by stage (wall time, peak RSS):", flush=True)
    runs: list[StageRun] = []

    def report(run: StageRun) -> None:
        runs.append(run)
        print(f"  {run.stage:<26} {run.seconds:8.1f} s {run.peak_rss_mib:8.0f} MiB", flush=True)

    with tempfile.TemporaryDirectory(prefix=f"bench-repro-{profile}-") as tmp:
        folder = keep / profile if keep is not None else Path(tmp) / "repo"
        repo = scratch_repo(Path.cwd(), folder, None if profile == "default" else profile)
        time_stages(repo, stage_order(repo), report)
        summary = repro_summary(runs, time_noop_repro(repo))
    if keep is not None:
        print(f"  the timed repository (outputs, dvc.lock, cache) is kept in {folder}")
    print(f"  {'total':<26} {summary['total_seconds']:8.1f} s {summary['peak_rss_mib']:8.0f} MiB")
    print(f"  (a second dvc repro, every stage up to date: {summary['noop_repro_seconds']:.1f} s)")
    update_json(
        BENCH_FILE, ("repro", profile), {"device": device_name(torch.device("cpu")), **summary}
    )
    print(f"wrote {BENCH_FILE} (repro.{profile})")


def main() -> None:
    params = load_params()
    available = trainers(params)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round (30)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (2)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the fastest counts (2)")
    parser.add_argument(
        "--trainers",
        nargs="+",
        choices=available,
        default=list(available),
        metavar="NAME",
        help=f"trainers to time (default all: {', '.join(available)})",
    )
    parser.add_argument(
        "--repro",
        nargs="+",
        choices=PROFILES,
        action="extend",
        metavar="PROFILE",
        help="time a full dvc repro of these profiles (smoke, default) instead",
    )
    parser.add_argument(
        "--throughput", action="store_true", help="with --repro: measure throughput as well"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="with --repro: keep each timed repository in DIR/<profile> (a new folder)",
    )
    args = parser.parse_args()
    if min(args.steps, args.rounds) < 1 or args.warmup < 0:
        raise PipelineError("--steps and --rounds must be >= 1 and --warmup >= 0")
    if args.keep is not None and not args.repro:
        raise PipelineError("--keep only applies to --repro: add --repro smoke or default")
    if not args.repro or args.throughput:
        throughput(args, params)
    for profile in args.repro or ():
        repro(profile, args.keep)


if __name__ == "__main__":
    run_stage(main)
