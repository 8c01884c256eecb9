"""params.yaml validation: every bad value gives one message naming the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from stages.lib import config
from stages.lib.config import PipelineError, load_params, resolve_device, validate_params
from stages.profile import apply_overrides

from tests.conftest import REPO_ROOT

DEFAULTS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def with_value(dotted: str, value):
    params = copy.deepcopy(DEFAULTS)
    *parents, leaf = dotted.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[leaf] = value
    return params


def test_repository_params_and_profiles_are_valid():
    validate_params(copy.deepcopy(DEFAULTS))
    for profile in (REPO_ROOT / "profiles").glob("*.yaml"):
        apply_overrides(DEFAULTS, yaml.safe_load(profile.read_text()))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("labels", 0, "labels=0 must be a positive multiple of the 10 classes"),
        ("labels", -20, "labels=-20 must be a positive multiple"),
        ("labels", 105, "labels=105 must be a positive multiple .* \\(e.g. 100\\)"),
        ("labels", "100", "labels must be an integer, got '100' \\(str\\)"),
        ("labels", True, "labels must be an integer"),
        ("split.val_size", 5, "split.val_size=5 must be a non-negative multiple"),
        ("dataset", "cifar10", "dataset must be one of mnist, fashion-mnist"),
        ("device", "tpu", "device must be auto, cpu, cuda or cuda:N"),
        ("device", "cuda:x", "device must be auto, cpu, cuda or cuda:N"),
        ("train_baseline.lr", "1e-3", "train_baseline.lr must be a number \\(write 0.001"),
        ("train_baseline.lr", 0, "train_baseline.lr must be a number > 0"),
        ("train_baseline.dropout", 1.5, "train_baseline.dropout must be a number >= 0 and <= 1"),
        ("train_baseline.augment.translate", 0.9, "augment.translate must be a number"),
        ("train_baseline.augment.elastic", -1, "augment.elastic must be a number >= 0"),
        ("train_baseline.augment.elastic_sigma", 0, "augment.elastic_sigma must be a number > 0"),
        ("evaluate.models", ["baseline", "magic"], "evaluate.models\\[1\\] must be one of"),
        ("download.datasets", [], "download.datasets must be a list of at least 1"),
        ("train_baseline", [1, 2], "train_baseline must be a mapping"),
        ("train_consistency.weights.entropy", -1, "weights.entropy must be a number >= 0"),
        ("train_consistency.threshold", 1.5, "threshold must be a number >= 0 and <= 1"),
        ("train_consistency.teacher", "oracle", "teacher must be one of student, ema"),
        ("train_sgan.teacher", "ema_ish", "train_sgan.teacher must be one of student, ema"),
        ("pseudo_label.rule", "vote", "pseudo_label.rule must be one of knn, majority"),
        ("features.backbone", "ceiling_cnn5", "features.backbone must be one of"),
        ("features.layer", "logits", "features.layer must be one of penultimate, conv, prob"),
        ("retrain.batch_norm", "yes", "retrain.batch_norm must be"),
        ("vae_svm.kl_weight", 0, "vae_svm.kl_weight must be a number > 0"),
    ],
)
def test_bad_values_are_named(key, value, message):
    with pytest.raises(PipelineError, match=message):
        validate_params(with_value(key, value))


def test_unknown_and_missing_keys_are_named():
    params = with_value("train_baseline.lrr", 0.1)
    with pytest.raises(PipelineError, match="unknown key train_baseline.lrr"):
        validate_params(params)
    del params["train_baseline"]["lrr"], params["train_baseline"]["epochs"]
    with pytest.raises(PipelineError, match="missing key train_baseline.epochs"):
        validate_params(params)


def test_load_params_reports_bad_yaml_and_missing_file(tmp_path: Path):
    bad = tmp_path / "params.yaml"
    bad.write_text("labels: [100\n")
    with pytest.raises(PipelineError, match="is not valid YAML"):
        load_params(bad)
    with pytest.raises(PipelineError, match="not found"):
        load_params(tmp_path / "absent.yaml")


def test_profile_may_only_override_existing_keys():
    with pytest.raises(PipelineError, match="profile key train_baseline.nope is not in params"):
        apply_overrides(DEFAULTS, {"train_baseline": {"nope": 1}})
    merged = apply_overrides(DEFAULTS, {"train_baseline": {"epochs": 3}})
    assert merged["train_baseline"]["epochs"] == 3 and DEFAULTS["train_baseline"]["epochs"] != 3


def test_auto_device_is_cpu_without_cuda():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("section", ["train_consistency", "train_sgan"])
def test_an_ema_teacher_needs_a_moving_average(section):
    params = with_value(f"{section}.teacher", "ema")
    params[section]["ema_decay"] = 0
    with pytest.raises(PipelineError, match=f"{section}.teacher is ema but ema_decay is 0"):
        validate_params(params)


class FakeLibc:
    """Stands in for the C library: records mallopt calls, answers `accept`."""

    def __init__(self, accept: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.accept = accept

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.accept


def test_keep_freed_memory_raises_glibcs_thresholds(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(config.ctypes, "CDLL", lambda name: libc)
    assert config.keep_freed_memory() is True
    # M_MMAP_THRESHOLD (-3) at glibc's 32 MiB maximum, M_TRIM_THRESHOLD (-1) at 1 GiB
    assert libc.calls == [(-3, 32 << 20), (-1, 1 << 30)]
    rejected = FakeLibc(accept=0)
    monkeypatch.setattr(config.ctypes, "CDLL", lambda name: rejected)
    assert config.keep_freed_memory() is False
    assert rejected.calls == [(-3, 32 << 20)]  # no trim threshold without the mmap one


def test_keep_freed_memory_is_a_no_op_without_mallopt(monkeypatch):
    monkeypatch.setattr(config.ctypes, "CDLL", lambda name: object())  # no mallopt (not glibc)
    assert config.keep_freed_memory() is False

    def no_library(name):
        raise OSError("no C library")

    monkeypatch.setattr(config.ctypes, "CDLL", no_library)
    assert config.keep_freed_memory() is False


def test_run_stage_keeps_freed_memory_before_the_stage_runs(monkeypatch):
    order: list[str] = []
    monkeypatch.setattr(config, "keep_freed_memory", lambda: order.append("malloc") or True)
    config.run_stage(lambda: order.append("main"))
    assert order == ["malloc", "main"]
