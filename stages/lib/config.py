"""Load and validate params.yaml once, before any stage does work.

Every stage calls `load_params()`; a bad value stops the stage with one line naming the
key and the fix (see `run_stage`), instead of a traceback from deep inside a trainer.
"""

from __future__ import annotations

import ctypes
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

PARAMS_FILE = Path("params.yaml")

# Class count of each supported dataset: budgets are checked against it before any data
# is read, so `labels: 105` fails at once rather than after the download stage.
DATASET_CLASSES = {"mnist": 10, "fashion-mnist": 10}

# The CS229 report's fully supervised classifiers: name -> (architecture, its settings).
CEILINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "linear": ("mlp", {"hidden": []}),
    "fc256": ("mlp", {"hidden": [256]}),
    "cnn4": ("cs229_cnn", {"channels": [32]}),
    "cnn5": ("cs229_cnn", {"channels": [32, 64]}),
}

# Models `evaluate` can score (models/<name>/model.pt) and the stage that trains each.
MODEL_PRODUCERS = {
    "baseline": "train_baseline",
    "consistency": "train_consistency",
    "sgan": "train_sgan",
    "sgan_last": "train_sgan",
    "retrain": "retrain",
    # The VAE report's label budgets (dvc.yaml's vae_svm matrix runs each of them).
    **{f"vae_svm@{n}": f"vae_svm@{n}" for n in (100, 600, 1000, 3000)},
    **{f"ceiling_{name}": f"train_ceilings@{name}" for name in CEILINGS},
}


class PipelineError(Exception):
    """A problem the user can fix (bad params, bad data, missing inputs).

    Stages print its message as one line and exit non-zero; anything else is a bug and
    keeps its traceback.
    """


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

# The SGAN's architectures and its two parameterisations of the "generated" class.
SGAN_ARCHS = ("conv", "mlp")
FAKE_LOGITS = ("explicit", "zero")
# Where pseudo-labels come from: the trained weights (FixMatch) or their moving average.
TEACHERS = ("student", "ema")

AUGMENT = {
    "rotate_deg": number(0, 180),
    "translate": number(0, 0.5),
    "scale": number(0, 0.5),
}
# The baseline's augmentation may add an elastic distortion (alpha and sigma in pixels).
# Only the baseline offers it: the SGAN lost accuracy with it, and the other trainers were
# not measured with it (README).
AUGMENT_ELASTIC = {**AUGMENT, "elastic": number(0), "elastic_sigma": number(0, open_low=True)}

# The keys every step-based supervised or semi-supervised trainer shares.
TRAINING = {
    "epochs": integer(minimum=1),
    "steps_per_epoch": integer(minimum=1),
    "batch_size": integer(minimum=1),
    "lr": number(0, open_low=True),
    "lr_schedule": choice(LR_SCHEDULES),
    "weight_decay": number(0),
}

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
    "train_baseline": {
        **TRAINING,
        "channels": list_of(integer(minimum=1), min_len=2),
        "hidden": integer(minimum=1),
        "dropout": number(0, 1),
        "augment": AUGMENT_ELASTIC,
    },
    "train_ceilings": {
        "batch_size": integer(minimum=1),
        "steps_per_epoch": integer(minimum=0),  # 0 = one pass over the training set
        "lr": number(0, open_low=True),
        "lr_schedule": choice(LR_SCHEDULES),
        "augment": AUGMENT,
        "models": {name: {"epochs": integer(minimum=1), "augment": boolean} for name in CEILINGS},
    },
    "train_sgan": {
        "arch": choice(SGAN_ARCHS),
        "conv": {
            "discriminator": {
                "channels": list_of(integer(minimum=1), min_len=1),
                "hidden": integer(minimum=1),
            },
            "generator": {"channels": list_of(integer(minimum=1), min_len=2)},
        },
        "mlp": {
            "discriminator": {"hidden": list_of(integer(minimum=1), min_len=1)},
            "generator": {"hidden": list_of(integer(minimum=1), min_len=1)},
        },
        **{key: rule for key, rule in TRAINING.items() if key != "weight_decay"},
        "unlabeled_batch_size": integer(minimum=1),
        "unlabeled_includes_labeled": boolean,
        "generator_lr": number(0, open_low=True),
        "beta1": number(0, 1),
        "unsupervised_weight": number(0),
        "fake_logit": choice(FAKE_LOGITS),
        "feature_layer": integer(minimum=-1),
        "z_size": integer(minimum=1),
        "input_noise": number(0),
        "hidden_noise": number(0),
        "augment": AUGMENT,
        "augment_unlabeled": boolean,
        "pseudo_label_weight": number(0),
        "threshold": number(0, 1),
        "adaptive_threshold": boolean,
        "strong_augment": AUGMENT,
        "ema_decay": number(0, 1),
        "teacher": choice(TEACHERS),
        "patience": integer(minimum=0),
        "collapse_std": number(0),
        "grid_size": integer(minimum=1),
    },
    "train_consistency": {
        **TRAINING,
        "unlabeled_ratio": integer(minimum=1),
        "channels": list_of(integer(minimum=1), min_len=3),
        "hidden": integer(minimum=1),
        "batch_norm": boolean,
        "weights": {
            "cluster": number(0),
            "consistency": number(0),
            "entropy": number(0),
            "pseudo_label": number(0),
        },
        "threshold": number(0, 1),
        "adaptive_threshold": boolean,
        "ema_decay": number(0, 1),
        "teacher": choice(TEACHERS),
        "weak_augment": AUGMENT,
        "strong_augment": AUGMENT,
        "cutout": integer(minimum=0),
        "labeled_thicken": number(0, 1),
    },
    "features": {
        "backbone": choice(("baseline", "sgan", "consistency")),
        "layer": choice(FEATURE_LAYERS),
        "batch_size": integer(minimum=1),
    },
    "pseudo_label": {
        "rule": choice(PSEUDO_LABEL_RULES),
        "n_clusters": integer(minimum=1),
        "n_init": integer(minimum=1),
        "n_neighbors": integer(minimum=1),
    },
    "retrain": {
        "min_confidence": number(0, 1),
        **TRAINING,
        "channels": list_of(integer(minimum=1), min_len=3),
        "hidden": integer(minimum=1),
        "batch_norm": boolean,
        "augment": AUGMENT,
    },
    "vae_svm": {
        "dataset": choice(tuple(DATASET_CLASSES)),
        "latent": integer(minimum=1),
        "hidden": list_of(integer(minimum=1), min_len=1),
        "epochs": integer(minimum=1),
        "batch_size": integer(minimum=1),
        "lr": number(0, open_low=True),
        "lr_schedule": choice(LR_SCHEDULES),
        "kl_weight": number(0, open_low=True),
        "kl_warmup_epochs": number(0),
        "pool_size": integer(minimum=0),
        "standardize": boolean,
        "svm_c": list_of(number(0, open_low=True), min_len=1, unique=True),
        "svm_gamma": list_of(number(0, open_low=True), min_len=1, unique=True),
        "cv_folds": integer(minimum=2),
    },
    "evaluate": {
        "models": list_of(choice(tuple(MODEL_PRODUCERS)), min_len=1, unique=True),
        "batch_size": integer(minimum=1),
        "test_size": integer(minimum=0),
        "robustness": {
            "noise_std": number(0),
            "rotate_deg": number(0, 180),
            "blur_sigma": number(0, open_low=True),
        },
    },
    "check_generated": {
        "classifier": choice(tuple(f"ceiling_{name}" for name in CEILINGS)),
        "n_samples": integer(minimum=1),
    },
    "attention": {
        # Gradients need a torch model: not the VAE + SVM ones.
        "models": list_of(
            choice(tuple(m for m in MODEL_PRODUCERS if not m.startswith("vae_svm@"))),
            min_len=1,
            unique=True,
        ),
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
    """Rules that tie two keys together."""
    sgan = params["train_sgan"]
    if sgan["feature_layer"] == 0:
        raise PipelineError(
            "params.yaml: train_sgan.feature_layer is 0; layers count from 1 (-1 = the last "
            "hidden layer)"
        )
    if sgan["arch"] == "conv" and len(sgan["conv"]["generator"]["channels"]) != 2:
        raise PipelineError(
            "params.yaml: train_sgan.conv.generator.channels needs exactly 2 entries (7x7 -> "
            "14x14 -> 28x28)"
        )
    for section in ("train_consistency", "train_sgan"):
        if params[section]["teacher"] == "ema" and params[section]["ema_decay"] == 0:
            raise PipelineError(
                f"params.yaml: {section}.teacher is ema but ema_decay is 0 (no moving "
                "average to teach with); set ema_decay > 0 (e.g. 0.99) or teacher: student"
            )


def validate_params(params: Any) -> dict[str, Any]:
    """Check every key of params.yaml; raise PipelineError naming the first bad one."""
    _validate(params, SCHEMA)
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
