"""Load and validate params.yaml before any stage does work.

`load_params()` checks the shared keys and the sections of the non-training stages (the
declarative `SCHEMA`); a training method's section is a typed config (a dataclass of
`knob`s, beside the method in `fewlabels.methods`) that its stage reads with
`parse_config`, so a stage imports, and depends on, only its own method's code. A bad value
stops the stage with one line naming the key and the fix (see `run_stage`), never a
traceback from deep inside a trainer.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import random
import re
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import yaml

from .errors import PipelineError

PARAMS_FILE = Path("params.yaml")

# Class count of each supported dataset: budgets are checked against it before any data
# is read, so `labels: 105` fails at once rather than after the download stage.
DATASET_CLASSES = {"mnist": 10, "fashion-mnist": 10}

# Sections whose content a training method's typed config checks (`parse_config`):
# `train` holds one section per method trained on the split (stage train@<method>).
METHOD_SECTIONS = ("train", "train_ceilings", "retrain", "vae_svm")


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back.

    A training step frees and re-allocates the same few to tens of MB of activations.
    By default glibc serves such blocks with mmap, or trims them off the heap once
    freed, so every step page-faults them in again: a fifth of the consistency CNN's
    training time on a 2-core CPU (README, Benchmark). Blocks up to 32 MiB (glibc's
    largest mmap threshold) now come from the heap, which is not trimmed below 1 GiB.
    The process keeps its peak heap; computed values are untouched. Returns False where
    the C library has no `mallopt` (not glibc) or refuses the settings.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):  # no mallopt; Windows has no CDLL(None)
        return False
    # The trim threshold only after the mmap one is accepted: setting either one fixes the
    # other at its default, and a fixed 128 KiB mmap threshold alone made steps slower.
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def stage_argument(choices: list[str] | tuple[str, ...], what: str) -> str:
    """The one command-line argument of a foreach or matrix stage: one of `choices`."""
    if len(sys.argv) != 2 or sys.argv[1] not in choices:
        module = Path(sys.argv[0]).stem
        raise PipelineError(f"usage: python -m stages.{module} {{{','.join(choices)}}} ({what})")
    return sys.argv[1]


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's `main` (after `keep_freed_memory`), turning a PipelineError into one
    line on stderr and exit 1."""
    keep_freed_memory()
    try:
        main()
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


# --- schema -------------------------------------------------------------------------
# A schema is a dict of key -> checker; a checker takes (value, dotted_key) and raises
# PipelineError. Nested dicts are sections. Keep it declarative so one glance shows
# every knob and its allowed values.


def _fail(key: str, value: Any, expected: str) -> None:
    shown = repr(value) if not isinstance(value, str) else f"'{value}'"
    raise PipelineError(
        f"params.yaml: {key} must be {expected}, got {shown} ({type(value).__name__}); "
        f"fix it in params.yaml"
    )


def integer(minimum: int | None = None) -> Callable[[Any, str], None]:
    def check(value: Any, key: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, value, "an integer")
        if minimum is not None and value < minimum:
            _fail(key, value, f"an integer >= {minimum}")

    return check


def number(low: float | None = None, high: float | None = None, *, open_low: bool = False):
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if open_low else '>='} {low}")
    if high is not None:
        bounds.append(f"<= {high}")
    expected = " ".join(["a number", " and ".join(bounds)]).strip()

    def check(value: Any, key: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 (PyYAML) reads `1e-3` as a string: say how to write it.
            _fail(key, value, "a number (write 0.001, not 1e-3)")
        if not math.isfinite(value):
            _fail(key, value, f"a finite number{expected.removeprefix('a number')}")
        too_low = low is not None and (value <= low if open_low else value < low)
        if too_low or (high is not None and value > high):
            _fail(key, value, expected)

    return check


def choice(options: tuple[str, ...] | list[str]) -> Callable[[Any, str], None]:
    def check(value: Any, key: str) -> None:
        if value not in options:
            _fail(key, value, "one of " + ", ".join(options))

    return check


def string() -> Callable[[Any, str], None]:
    def check(value: Any, key: str) -> None:
        if not isinstance(value, str) or not value:
            _fail(key, value, "a non-empty string")

    return check


def list_of(item: Callable[[Any, str], None], *, min_len: int = 0, unique: bool = False):
    def check(value: Any, key: str) -> None:
        if not isinstance(value, list) or len(value) < min_len:
            _fail(key, value, f"a list of at least {min_len} item(s)")
        for i, element in enumerate(value):
            item(element, f"{key}[{i}]")
        if unique and len(set(map(str, value))) != len(value):
            _fail(key, value, "a list without repeated items")

    return check


def boolean(value: Any, key: str) -> None:
    if not isinstance(value, bool):
        _fail(key, value, "true or false")


def device(value: Any, key: str) -> None:
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        _fail(key, value, "auto, cpu, cuda or cuda:N")


LR_SCHEDULES = ("constant", "cosine")
# Where extract_features cuts a backbone, and how pseudo_label names k-means clusters.
FEATURE_LAYERS = ("penultimate", "conv", "probabilities")
PSEUDO_LABEL_RULES = ("knn", "majority", "nearest_centroid")
# Attention maps the `attention` stage can draw (grad_cam needs a conv layer).
ATTENTION_METHODS = ("saliency", "grad_cam")


# --- typed configs ---------------------------------------------------------------------
# A method's section of params.yaml is a frozen dataclass whose fields are `knob`s (a
# checker each) or nested configs. `parse_config` checks every key once, then builds it.

Config = TypeVar("Config")


def knob(check: Callable[[Any, str], None], **kwargs: Any) -> Any:
    """A dataclass field read from params.yaml and checked by `check(value, key)`."""
    return dataclasses.field(metadata={"check": check}, **kwargs)


def parse_config(cls: type[Config], section: Any, key: str) -> Config:
    """The typed config `cls` of params.yaml's `section` (at dotted `key`), every value
    checked; an unknown, missing or bad key stops with one line naming it."""
    if not isinstance(section, dict):
        raise PipelineError(f"params.yaml: {key} must be a mapping")
    known = [f for f in dataclasses.fields(cls) if f.init]
    for name in section:
        if name not in {f.name for f in known}:
            raise PipelineError(
                f"params.yaml: unknown key {key}.{name}; known keys here: "
                f"{', '.join(f.name for f in known)}"
            )
    hints = typing.get_type_hints(cls)
    values = {}
    for field in known:
        if field.name not in section:
            raise PipelineError(f"params.yaml: missing key {key}.{field.name}")
        value, sub_key = section[field.name], f"{key}.{field.name}"
        if dataclasses.is_dataclass(hints[field.name]):
            values[field.name] = parse_config(hints[field.name], value, sub_key)
        else:
            field.metadata["check"](value, sub_key)
            values[field.name] = value
    config = cls(**values)
    if hasattr(config, "check"):
        config.check(key)
    return config


@dataclasses.dataclass(frozen=True)
class Affine:
    """A random affine augmentation (`data.random_affine`), and optionally an elastic
    distortion (Simard et al. 2003; alpha in pixels, 0 = off; sigma: its smoothing)."""

    rotate_deg: float = knob(number(0, 180))
    translate: float = knob(number(0, 0.5))
    scale: float = knob(number(0, 0.5))


@dataclasses.dataclass(frozen=True)
class ElasticAffine(Affine):
    """The baseline's augmentation: the affine plus Simard's elastic distortion. Only the
    baseline offers it: the SGAN lost accuracy with it, and the other trainers were not
    measured with it (docs)."""

    elastic: float = knob(number(0))
    elastic_sigma: float = knob(number(0, open_low=True))


NO_AUGMENT = Affine(0.0, 0.0, 0.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """The keys every step-based trainer shares (Adam, `steps_per_epoch` steps of
    `batch_size` labeled images per epoch)."""

    epochs: int = knob(integer(minimum=1))
    steps_per_epoch: int = knob(integer(minimum=1))
    batch_size: int = knob(integer(minimum=1))
    lr: float = knob(number(0, open_low=True))
    lr_schedule: str = knob(choice(LR_SCHEDULES))
    weight_decay: float = knob(number(0))


def check_teacher(teacher: str, ema_decay: float, key: str) -> None:
    """A mean teacher needs a moving average to teach with."""
    if teacher == "ema" and ema_decay == 0:
        raise PipelineError(
            f"params.yaml: {key}.teacher is ema but ema_decay is 0 (no moving average to "
            "teach with); set ema_decay > 0 (e.g. 0.99) or teacher: student"
        )


# --- the shared keys and the non-training stages' sections -------------------------------

SCHEMA: dict[str, Any] = {
    "seed": integer(minimum=0),
    "labels": integer(),  # budget rules need the class count: see _check_budget
    "dataset": choice(tuple(DATASET_CLASSES)),
    "device": device,
    "download": {
        "datasets": list_of(choice(tuple(DATASET_CLASSES)), min_len=1, unique=True),
        "sources": {name: list_of(string(), min_len=1) for name in DATASET_CLASSES},
        "timeout_s": number(0, open_low=True),
    },
    "split": {
        "val_size": integer(minimum=0),
        "pool_size": integer(minimum=0),
    },
    "features": {
        "backbone": string(),  # a method of `train` (checked in _check_combinations)
        "layer": choice(FEATURE_LAYERS),
        "batch_size": integer(minimum=1),
    },
    "pseudo_label": {
        "rule": choice(PSEUDO_LABEL_RULES),
        "n_clusters": integer(minimum=1),
        "n_init": integer(minimum=1),
        "n_neighbors": integer(minimum=1),
    },
    "evaluate": {
        "batch_size": integer(minimum=1),
        "test_size": integer(minimum=0),
        "robustness": {
            "noise_std": number(0),
            "rotate_deg": number(0, 180),
            "blur_sigma": number(0, open_low=True),
        },
    },
    "check_generated": {
        "classifier": string(),  # ceiling_<a model of train_ceilings.models>
        "n_samples": integer(minimum=1),
    },
    "attention": {
        # Gradients need a torch model: any model but the VAE + SVM ones.
        "models": list_of(string(), min_len=1, unique=True),
        "methods": list_of(choice(ATTENTION_METHODS), min_len=1, unique=True),
        "n_per_class": integer(minimum=1),
    },
}


def _validate(section: Any, schema: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(section, dict):
        raise PipelineError(f"params.yaml: {prefix.rstrip('.') or 'the file'} must be a mapping")
    for key in section:
        if key not in schema:
            raise PipelineError(
                f"params.yaml: unknown key {prefix}{key}; known keys here: {', '.join(schema)}"
            )
    for key, rule in schema.items():
        if key not in section:
            raise PipelineError(f"params.yaml: missing key {prefix}{key}")
        if isinstance(rule, dict):
            _validate(section[key], rule, f"{prefix}{key}.")
        else:
            rule(section[key], f"{prefix}{key}")


def check_budget(key: str, value: int, n_classes: int, *, allow_zero: bool = False) -> None:
    """A labeled budget must give every class the same, non-zero (or zero) count."""
    if value < 0 or (value == 0 and not allow_zero) or value % n_classes:
        kind = "non-negative" if allow_zero else "positive"
        example = max(n_classes, value - value % n_classes)
        raise PipelineError(
            f"{key}={value} must be a {kind} multiple of the {n_classes} classes so every "
            f"class gets the same count (e.g. {example}); fix it in params.yaml"
        )


def _check_budgets(params: dict[str, Any]) -> None:
    n_classes = DATASET_CLASSES[params["dataset"]]
    check_budget("labels", params["labels"], n_classes)
    check_budget("split.val_size", params["split"]["val_size"], n_classes, allow_zero=True)


def _check_combinations(params: dict[str, Any]) -> None:
    """Rules that tie two sections together."""
    methods = params["train"]
    if params["features"]["backbone"] not in methods:
        raise PipelineError(
            f"params.yaml: features.backbone is {params['features']['backbone']!r}; use a "
            f"method of train: {', '.join(methods)}"
        )
    models = params["train_ceilings"].get("models")
    ceilings = [f"ceiling_{name}" for name in models] if isinstance(models, dict) else []
    if ceilings and params["check_generated"]["classifier"] not in ceilings:
        raise PipelineError(
            f"params.yaml: check_generated.classifier must be one of {', '.join(ceilings)}, "
            f"got {params['check_generated']['classifier']!r}"
        )
    # Gradients need a torch model: any model but the VAE + SVM ones.
    torch_models = [*methods, *(f"{m}_last" for m in methods), "retrain", *ceilings]
    for name in params["attention"]["models"]:
        if name not in torch_models:
            raise PipelineError(
                f"params.yaml: attention.models has {name!r}; use models of "
                f"{', '.join(torch_models)}"
            )


def validate_params(params: Any) -> dict[str, Any]:
    """Check the shared keys and the non-training sections; raise PipelineError naming the
    first bad one. Each method's section is checked by its stage (`parse_config`), or all
    of them at once by `fewlabels.methods.validate_methods`."""
    if not isinstance(params, dict):
        raise PipelineError("params.yaml: the file must be a mapping")
    shared = {k: v for k, v in params.items() if k not in METHOD_SECTIONS}
    _validate(shared, SCHEMA)
    for section in METHOD_SECTIONS:
        if not isinstance(params.get(section), dict) or not params[section]:
            raise PipelineError(f"params.yaml: {section} must be a non-empty mapping")
    _check_budgets(params)
    _check_combinations(params)
    return params


def load_params(path: Path | str = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path} not found: run the stage from the repository root")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PipelineError(f"{path} is not valid YAML: {err}".replace("\n", " ")) from None
    return validate_params(params)


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; an explicit CUDA request must be satisfiable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"device={name} but CUDA is not available; set device: auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for explicit sampling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
