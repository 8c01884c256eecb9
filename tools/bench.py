"""Benchmark: training throughput of every trainer, and stage timings of a full `dvc repro`.

    python -m stages.bench                      # throughput -> metrics/bench.json "throughput"
    python -m stages.bench --trainers sgan vae  # some trainers only
    python -m stages.bench --repro smoke        # time each stage -> metrics/bench.json "repro"

Throughput: each trainer at its default architecture and batch size (params.yaml), on real
MNIST, on params' `device`. Images per second (labeled + unlabeled + generated images of a
step) with the trainer's own data path and with the model alone on one pre-drawn batch;
their ratio and the data path's cost. The SGAN with the report's conv architecture is also
fed by a straightforward per-sample Dataset + DataLoader, the reference. Not a pipeline
stage: the figures depend on the machine.

Repro: a copy of the repository as a fresh clone has it (a new git repository, profile
applied), each stage run in pipeline order with `dvc repro --force --single-item`; wall time and
peak memory per stage.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from .lib.bench import (
    StageRun,
    Update,
    adam_update,
    device_name,
    ema_copy,
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
from .lib.config import (
    CEILINGS,
    DATASET_CLASSES,
    PipelineError,
    load_params,
    resolve_device,
    run_stage,
    seed_everything,
)
from .lib.data import NO_AUGMENT, class_balanced_split
from .lib.nets import build_model, waterloo_config
from .lib.paths import METRICS_DIR, SPLIT_FILE, load_raw, load_split
from .lib.semi import STEP_KEYS as CONSISTENCY_STEP_KEYS
from .lib.semi import class_centroids, consistency_step
from .lib.sgan import STEP_KEYS as SGAN_STEP_KEYS
from .lib.sgan import build_sgan, sgan_step, unlabeled_indices
from .lib.train import Step, classifier_step
from .lib.vae import VAE, vae_step

BENCH_FILE = METRICS_DIR / "bench.json"
MAX_COST_PCT = 10.0  # target: the data path costs under 10% of the model-only throughput
MIN_SPEEDUP = 3.0  # target: SGAN (report conv) >= 3x the per-sample DataLoader reference
# The SGAN report's conv architecture (params.yaml's default is narrower, for speed).
SGAN_REPORT_CONV = {
    "discriminator": {"channels": [64, 128], "hidden": 256},
    "generator": {"channels": [128, 64]},
}
PROFILES = ("smoke", "default")


@dataclass
class Case:
    """A trainer ready to time: its step, its optimizer update, what it trains."""

    step: Step
    update: Update
    about: str
    reference: Callable[[], None] | None = None  # one step of the reference loop


@dataclass
class Setup:
    params: dict[str, Any]
    device: torch.device
    generator: torch.Generator

    @staticmethod
    @cache
    def raw(dataset: str) -> dict[str, torch.Tensor]:
        return load_raw(dataset)

    def train_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.raw(self.params["dataset"])
        return data["x_train"], data["y_train"]

    def split(self) -> dict[str, torch.Tensor]:
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

    @property
    def n_classes(self) -> int:
        return DATASET_CLASSES[self.params["dataset"]]


def baseline(s: Setup) -> Case:
    cfg = s.params["train_baseline"]
    arch_config = {key: cfg[key] for key in ("channels", "hidden", "dropout")}
    model = prepare(build_model("baseline_cnn", n_classes=s.n_classes, **arch_config), s.device)
    x, y = s.train_set()
    labeled = s.split()["labeled_idx"]
    step = classifier_step(
        model,
        x[labeled],
        y[labeled],
        batch_size=cfg["batch_size"],
        augment=cfg["augment"],
        generator=s.generator,
    )
    update = adam_update(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    return Case(step, update, f"baseline_cnn {cfg['channels']}; {len(labeled)} labeled images")


def ceiling_cnn5(s: Setup) -> Case:
    cfg = s.params["train_ceilings"]
    arch, arch_config = CEILINGS["cnn5"]
    model = prepare(build_model(arch, n_classes=s.n_classes, **arch_config), s.device)
    augment = cfg["augment"] if cfg["models"]["cnn5"]["augment"] else NO_AUGMENT
    x, y = s.train_set()
    step = classifier_step(
        model, x, y, batch_size=cfg["batch_size"], augment=augment, generator=s.generator
    )
    update = adam_update(model.parameters(), lr=cfg["lr"])
    return Case(step, update, f"{arch} {arch_config['channels']}; all {len(x)} training images")


def consistency(s: Setup) -> Case:
    cfg = s.params["train_consistency"]
    model = prepare(build_model("waterloo_cnn", **waterloo_config(cfg, s.n_classes)), s.device)
    x, y = s.train_set()
    split = s.split()
    x_l, y_l = x[split["labeled_idx"]], y[split["labeled_idx"]]
    teacher = ema_copy(model, s.device) if cfg["teacher"] == "ema" else None
    centroids = []
    if cfg["weights"]["cluster"] > 0:  # the trainer refreshes them once an epoch
        centroids = [class_centroids(model, x_l.to(s.device), y_l.to(s.device), s.n_classes)]
    step = consistency_step(
        model,
        x_l,
        y_l,
        x[split["unlabeled_idx"]],
        generator=s.generator,
        teacher=teacher,
        centroids=centroids,
        **{key: cfg[key] for key in CONSISTENCY_STEP_KEYS},
    )
    update = adam_update(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    n_unlabeled = len(split["unlabeled_idx"])
    about = f"waterloo_cnn {cfg['channels']}; {len(x_l)} labeled, {n_unlabeled} unlabeled images"
    return Case(step, update, about)


def retrain(s: Setup) -> Case:
    cfg = s.params["retrain"]
    model = prepare(build_model("waterloo_cnn", **waterloo_config(cfg, s.n_classes)), s.device)
    # The training images with their own labels stand in for labeled + pseudo-labeled ones
    # (at most as many): the step's cost does not depend on the labels' values.
    x, y = s.train_set()
    step = classifier_step(
        model, x, y, batch_size=cfg["batch_size"], augment=cfg["augment"], generator=s.generator
    )
    update = adam_update(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    return Case(step, update, f"waterloo_cnn {cfg['channels']}; {len(x)} (pseudo-)labeled images")


def sgan(s: Setup, arch_cfg: dict[str, Any] | None = None, reference: bool = False) -> Case:
    """The SGAN at `arch_cfg` (default: params' own architecture), with the reference
    DataLoader batch source when `reference`. Given `arch_cfg` (the report's conv sizes),
    it is the report's recipe: no pseudo-labels, which the reference cannot draw."""
    cfg = s.params["train_sgan"]
    if arch_cfg is not None:
        cfg = {**cfg, "arch": "conv", "pseudo_label_weight": 0.0}
    model, _, _ = build_sgan(cfg, s.n_classes, arch_cfg)
    model = prepare(model, s.device)
    x, y = s.train_set()
    split = s.split()
    labeled = split["labeled_idx"]
    unlabeled = unlabeled_indices(split, cfg["unlabeled_includes_labeled"])
    step = sgan_step(
        model,
        x[labeled],
        y[labeled],
        x[unlabeled],
        **{key: cfg[key] for key in SGAN_STEP_KEYS},
        generator=s.generator,
        teacher=ema_copy(model, s.device).discriminator if cfg["teacher"] == "ema" else None,
    )
    update = adam_update(
        [
            {"params": list(model.discriminator.parameters()), "lr": cfg["lr"]},
            {"params": list(model.generator.parameters()), "lr": cfg["generator_lr"]},
        ],
        lr=cfg["lr"],
        betas=(cfg["beta1"], 0.999),
    )
    ref = None
    if reference:  # on its own copy of the model, so the two do not share weights
        reference_model, _, _ = build_sgan(cfg, s.n_classes, arch_cfg)
        ref = sgan_reference_step(
            reference_model,
            x[labeled],
            y[labeled],
            x[unlabeled],
            **{
                k: cfg[k]
                for k in ("batch_size", "unlabeled_batch_size", "augment", "augment_unlabeled")
            },
            **{k: cfg[k] for k in ("lr", "generator_lr", "beta1")},
            device=s.device,
        )
    shape = "; ".join(
        f"{part} " + ", ".join(f"{key} {value}" for key, value in sizes.items())
        for part, sizes in (arch_cfg or cfg[cfg["arch"]]).items()
    )
    return Case(step, update, f"sgan {cfg['arch']}: {shape}", ref)


def vae(s: Setup) -> Case:
    cfg = s.params["vae_svm"]
    model = prepare(VAE(latent=cfg["latent"], hidden=cfg["hidden"]), s.device)
    images = s.raw(cfg["dataset"])["x_train"]
    if cfg["pool_size"]:
        images = images[: cfg["pool_size"]]  # the stage's seeded pool has this many
    steps_per_epoch = -(-len(images) // cfg["batch_size"])
    step = vae_step(
        model,
        images,
        batch_size=cfg["batch_size"],
        generator=s.generator,
        kl_weight=cfg["kl_weight"],
        kl_warmup_steps=cfg["kl_warmup_epochs"] * steps_per_epoch,
    )
    update = adam_update(model.parameters(), lr=cfg["lr"])
    return Case(step, update, f"vae {cfg['hidden']} -> {cfg['latent']}; {len(images)} images")


TRAINERS: dict[str, Callable[[Setup], Case]] = {
    "baseline": baseline,
    "ceiling_cnn5": ceiling_cnn5,
    "consistency": consistency,
    "retrain": retrain,
    "sgan": sgan,
    "sgan_conv_report": lambda s: sgan(s, SGAN_REPORT_CONV, reference=True),
    "vae": vae,
}


def throughput(args: argparse.Namespace) -> None:
    params = load_params()
    setup = Setup(params, resolve_device(params["device"]), seed_everything(params["seed"]))
    print(f"images/s on {device_name(setup.device)}, fastest of {args.rounds} x {args.steps} steps")
    print(
        f"{'trainer':<18} {'img/step':>8} {'data path':>10} {'model only':>10} {'ratio':>6} "
        f"{'cost':>7}"
    )
    results = {}
    for name in args.trainers:
        case = TRAINERS[name](setup)
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round (30)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (2)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the fastest counts (2)")
    parser.add_argument(
        "--trainers",
        nargs="+",
        choices=TRAINERS,
        default=list(TRAINERS),
        metavar="NAME",
        help=f"trainers to time (default all: {', '.join(TRAINERS)})",
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
        throughput(args)
    for profile in args.repro or ():
        repro(profile, args.keep)


if __name__ == "__main__":
    run_stage(main)
