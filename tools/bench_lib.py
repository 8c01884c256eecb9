"""Benchmark helpers: training throughput of a `Step` and wall time / peak memory of stages.

Throughput is measured the way `fit_steps` trains (model in `channels_last` on the device,
an Adam step per loss; no LR schedule, EMA update or validation), in three modes that
share the model's part of the step (`step.loss`) and differ only in where the batch comes
from:

- data path: `step.draw()`, the trainer's own sampler and on-device augmentation;
- model only: one batch drawn in advance, fed again at every step;
- reference (the SGAN): a straightforward training step, as it is usually written: a
  per-sample `Dataset` + `DataLoader`, the default memory layout, and separate
  discriminator and generator updates (`sgan_reference_step`).

Each mode runs `rounds` times `steps` steps (alternating modes, after a warm-up) and the
fastest round counts, which is the least disturbed by other work on the machine. On CUDA
the clock is read after a synchronisation.
"""

from __future__ import annotations

import graphlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset

from fewlabels.config import Affine, PipelineError
from fewlabels.data import random_affine
from fewlabels.io import write_json
from fewlabels.methods import sgan
from fewlabels.methods.sgan import feature_matching_loss, supervised_loss, unsupervised_loss
from fewlabels.models.sgan import SemiSupervisedGAN, sample_z
from fewlabels.train import Step, moving_average

# --- throughput ----------------------------------------------------------------------

Update = Callable[[Tensor], None]


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and how many cores this process may use."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
        if line.startswith("model name")
    ]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    name = names[0] if names else platform.processor() or platform.machine()
    return f"cpu: {name}, {cores} core{'s' if cores != 1 else ''}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(model: nn.Module, device: torch.device) -> nn.Module:
    """The model as `fit_steps` trains it: on `device`, `channels_last`, training mode.
    Build the model's Step after this: step builders put their data on the model's device."""
    return model.to(device, memory_format=torch.channels_last).train()


def ema_teacher(model: nn.Module, decay: float, device: torch.device) -> AveragedModel:
    """`model`'s moving average as `fit_steps` keeps it (`channels_last`, eval mode): the
    pseudo-label teacher of `teacher: ema`. The benchmark never updates it."""
    return prepare(moving_average(model, decay), device).eval()


def adam_update(
    params: list[dict[str, Any]] | Any,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
) -> Update:
    """`fit_steps`' update of a loss: zero the gradients, backward, one Adam step.
    `params` are parameters or Adam groups (each with its own "lr")."""
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, betas=betas)

    def update(loss: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return update


@dataclass
class Timing:
    steps: int
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def time_steps(one_step: Callable[[], Any], images_per_step: int, *, steps: int,
               device: torch.device) -> Timing:  # fmt: skip
    """Wall time of `steps` calls of `one_step` (a whole training step)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    sync(device)
    return Timing(steps, steps * images_per_step, time.perf_counter() - start)


def measure(
    step: Step,
    update: Update,
    *,
    steps: int,
    warmup: int,
    rounds: int,
    device: torch.device,
    reference: Callable[[], Any] | None = None,
) -> dict[str, Timing]:
    """The fastest of `rounds` timings of each mode: "data_path" (`step.draw`),
    "model_only" (one pre-drawn batch, repeated) and, given a `reference` training step
    (the same images per step), "reference". Every mode first runs `warmup` untimed steps.
    The step's `on_epoch_start` runs once first, as `fit_steps` runs it before an epoch."""
    if step.on_epoch_start is not None:
        step.on_epoch_start(1)
    fixed = step.draw()
    modes: dict[str, Callable[[], Any]] = {
        "data_path": lambda: update(step.loss(*step.draw())[0]),
        "model_only": lambda: update(step.loss(*fixed)[0]),
    }
    if reference is not None:
        modes["reference"] = reference
    for one_step in modes.values():
        time_steps(one_step, step.images, steps=warmup, device=device)
    best: dict[str, Timing] = {}
    for _ in range(rounds):
        for mode, one_step in modes.items():
            timing = time_steps(one_step, step.images, steps=steps, device=device)
            if mode not in best or timing.seconds < best[mode].seconds:
                best[mode] = timing
    return best


def summarize(timings: dict[str, Timing], max_cost_pct: float, min_speedup: float) -> dict:
    """Images per second of each mode, the data path's throughput as a fraction of the
    model alone (`ratio`), its cost (1 - ratio, in %), and against the reference."""
    data_path, model_only = timings["data_path"], timings["model_only"]
    ratio = data_path.images_per_s / model_only.images_per_s
    result = {
        "images_per_step": data_path.images // data_path.steps,
        "data_path_images_per_s": round(data_path.images_per_s, 1),
        "model_only_images_per_s": round(model_only.images_per_s, 1),
        "ratio": round(ratio, 4),
        "data_path_cost_pct": round(100 * (1 - ratio), 2),
        "data_path_cost_ok": 100 * (1 - ratio) < max_cost_pct,
    }
    if "reference" in timings:
        speedup = data_path.images_per_s / timings["reference"].images_per_s
        result |= {
            "reference_images_per_s": round(timings["reference"].images_per_s, 1),
            "speedup_vs_reference": round(speedup, 3),
            "speedup_ok": speedup >= min_speedup,
        }
    return result


# --- the reference: a per-sample Dataset + DataLoader --------------------------------


class PerSampleImages(Dataset):
    """The straightforward data path: item i is image i as a float tensor (1, H, W) in
    [0, 1], given its own random affine when `augment` is set, and its label (-1 when
    there are none). The DataLoader stacks the items into batches."""

    def __init__(
        self, images: Tensor, labels: Tensor | None = None, augment: Affine | None = None
    ) -> None:
        self.images, self.augment = images, augment
        self.labels = labels.long() if labels is not None else torch.full((len(images),), -1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.images[i].float().div(255).unsqueeze(0)
        if self.augment is not None:
            x = random_affine(x.unsqueeze(0), self.augment)[0]
        return x, self.labels[i]


def endless(loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of `loader`, epoch after epoch (a new shuffle each time)."""
    while True:
        yield from loader


def sgan_reference_step(
    model: SemiSupervisedGAN,
    x_labeled: Tensor,
    y_labeled: Tensor,
    x_unlabeled: Tensor,
    cfg: sgan.Config,
    device: torch.device,
) -> Callable[[], None]:
    """One step of the SGAN as it is usually written: batches from two shuffling
    DataLoaders over `PerSampleImages` (in the main process), the model in the default
    memory layout, then a discriminator update (labeled, unlabeled and generated images)
    and a separate generator update (new samples; feature matching against the unlabeled
    batch, whose features are computed again). The same images per step as the SGAN's
    `train_step`, with the sizes, augmentation and optimizer settings of `cfg`."""
    model = model.to(device, memory_format=torch.contiguous_format).train()
    augment, unlabeled_batch_size = cfg.augment, cfg.unlabeled_batch_size
    disc, gen = model.discriminator, model.generator
    labeled = endless(
        DataLoader(PerSampleImages(x_labeled, y_labeled, augment), cfg.batch_size, shuffle=True)
    )
    unlabeled_set = PerSampleImages(x_unlabeled, augment=augment if cfg.augment_unlabeled else None)
    unlabeled = endless(DataLoader(unlabeled_set, unlabeled_batch_size, shuffle=True))
    betas = (cfg.beta1, 0.999)

    def sample(n: int) -> Tensor:
        return gen(sample_z(n, gen.z_size).to(device))

    optimizer_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=betas)
    optimizer_g = torch.optim.Adam(gen.parameters(), lr=cfg.generator_lr, betas=betas)

    def one_step() -> None:
        x_l, y_l = (t.to(device) for t in next(labeled))
        x_u = next(unlabeled)[0].to(device)
        fake = sample(unlabeled_batch_size)
        loss_d = supervised_loss(disc.logits_k1(x_l), y_l) + unsupervised_loss(
            disc.logits_k1(x_u), disc.logits_k1(fake.detach())
        )
        optimizer_d.zero_grad()
        loss_d.backward()
        optimizer_d.step()
        fake = sample(unlabeled_batch_size)
        loss_g = feature_matching_loss(disc.features(x_u), disc.features(fake))
        optimizer_g.zero_grad()
        loss_g.backward()
        optimizer_g.step()

    return one_step


# --- metrics/bench.json ----------------------------------------------------------------


def update_json(path: Path | str, keys: tuple[str, ...], value: Any) -> dict[str, Any]:
    """Set `value` at the nested `keys` of the JSON file at `path` (created if missing),
    keeping everything else in it; written atomically. Returns the new content."""
    path = Path(path)
    content = json.loads(path.read_text()) if path.exists() else {}
    node = content
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    write_json(path, content)
    return content


# --- timing `dvc repro`, stage by stage ----------------------------------------------

# What a fresh clone would not have (tests/test_pipeline.py copies the repository so too):
# local state, by name anywhere in the tree, and the pipeline's built outputs, by path from
# the repository root (fewlabels/models is code, models/ is the trained models).
LOCAL_STATE = {
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "dvc_plots",
}
BUILT_OUTPUTS = {
    ".dvc/cache",
    ".dvc/tmp",
    "data/raw",
    "data/split",
    "data/features",
    "data/pseudo",
    "models",
}


def not_copied(root: Path | str) -> Callable[[str, list[str]], set[str]]:
    """`shutil.copytree`'s `ignore` for a fresh-clone-like copy of the repository at `root`."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        here = Path(os.path.relpath(directory, root))
        return {
            name
            for name in names
            if name in LOCAL_STATE or (here / name).as_posix() in BUILT_OUTPUTS
        }

    return ignore


def copy_repository(source: Path, destination: Path) -> Path:
    """The repository at `source` copied to `destination` as a fresh clone has it."""
    shutil.copytree(source, destination, ignore=not_copied(source))
    return destination


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    # Stage commands call `python`: make it this interpreter, whatever PATH says.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_checked(cwd: Path, *args: str) -> str:
    proc = subprocess.run(args, cwd=cwd, env=subprocess_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise PipelineError(f"{' '.join(args)} failed in {cwd}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def scratch_repo(source: Path, destination: Path, profile: str | None) -> Path:
    """A fresh-clone-like copy of the repository at `destination` (a new git repository,
    one commit), with `profile` applied to its params.yaml (None: the defaults)."""
    copy_repository(source, destination)
    run_checked(destination, "git", "init", "-q", "-b", "main")
    if profile is not None:
        run_checked(destination, sys.executable, "-m", "tools.profile", profile)
    run_checked(destination, "git", "add", "-A")
    run_checked(
        destination, "git", "-c", "user.name=bench", "-c", "user.email=bench@localhost",
        "commit", "-qm", f"bench: {profile or 'default'} profile",
    )  # fmt: skip
    return destination


def parse_dot(dot: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Nodes (in file order) and edges (upstream, downstream) of `dvc dag --dot`."""
    nodes, edges = [], []
    for line in dot.splitlines():
        parts = [p.strip().strip('";') for p in line.strip().rstrip(";").split("->")]
        if len(parts) == 2:
            edges.append((parts[0], parts[1]))
        elif line.strip().startswith('"'):
            nodes.append(parts[0])
    return nodes, edges


def topological_order(nodes: list[str], edges: list[tuple[str, str]]) -> list[str]:
    """Every stage after the stages it depends on; otherwise in the order given (dvc.yaml's)."""
    sorter = graphlib.TopologicalSorter(
        {node: {a for a, b in edges if b == node} for node in nodes}
    )
    try:
        sorter.prepare()
    except graphlib.CycleError as err:
        raise PipelineError(f"the stage graph has a cycle among {set(err.args[1])}") from None
    rank = {node: i for i, node in enumerate(nodes)}
    ready: set[str] = set()
    order: list[str] = []
    while sorter.is_active():
        ready.update(sorter.get_ready())
        first = min(ready, key=rank.__getitem__)
        ready.remove(first)
        order.append(first)
        sorter.done(first)
    return order


def stage_order(repo: Path) -> list[str]:
    return topological_order(
        *parse_dot(run_checked(repo, sys.executable, "-m", "dvc", "dag", "--dot"))
    )


@dataclass
class StageRun:
    stage: str
    seconds: float
    peak_rss_mib: float


def run_measured(args: list[str], cwd: Path) -> tuple[float, float, int, str]:
    """Run a command; its wall time (s), peak RSS (MiB: the largest of the process and its
    descendants, from `wait4`), exit status and output."""
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(
            args, cwd=cwd, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped: tell Popen
        log.seek(0)
        return seconds, usage.ru_maxrss / 1024, proc.returncode, log.read()


# What `dvc repro` prints before it runs a stage's command (absent when it skips the stage).
RUNNING_STAGE = "Running stage"


def time_stages(repo: Path, stages: list[str], on_stage: Callable[[StageRun], None]) -> None:
    """`dvc repro --force --single-item` each stage in turn, reporting each to `on_stage`.
    Forced: a stage whose outputs git tracks (evaluate's metrics, the plots) is otherwise
    skipped as up to date when everything before it reproduced bit for bit, and timed at
    DVC's start-up alone."""
    for stage in stages:
        args = [sys.executable, "-m", "dvc", "repro", "--force", "--single-item", stage]
        seconds, rss, code, output = run_measured(args, repo)
        if code != 0:
            raise PipelineError(f"stage {stage} failed ({code}) in {repo}:\n{output[-3000:]}")
        if RUNNING_STAGE not in output:
            raise PipelineError(f"stage {stage} did not run in {repo}:\n{output[-3000:]}")
        on_stage(StageRun(stage, round(seconds, 2), round(rss, 1)))


def time_noop_repro(repo: Path) -> float:
    """Wall time of a `dvc repro` that finds every stage up to date: DVC's own cost of
    checking the pipeline, part of every stage's time above."""
    seconds, _, code, output = run_measured([sys.executable, "-m", "dvc", "repro"], repo)
    if code != 0 or RUNNING_STAGE in output:
        raise PipelineError(f"the second dvc repro in {repo} was not a no-op:\n{output[-3000:]}")
    return seconds


def repro_summary(runs: list[StageRun], noop_seconds: float) -> dict[str, Any]:
    return {
        "stages": [asdict(run) for run in runs],
        "total_seconds": round(sum(run.seconds for run in runs), 2),
        "peak_rss_mib": max((run.peak_rss_mib for run in runs), default=0.0),
        "noop_repro_seconds": round(noop_seconds, 2),
    }
