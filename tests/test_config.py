"""params.yaml validation: every bad value gives one message naming the key.

The shared keys and the non-training sections are checked by `validate_params` (what every
stage's `load_params` runs); each method's section by its typed config
(`parse_method_config`, or all of them at once by `validate_methods`).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fewlabels import config
from fewlabels.config import (
    Affine,
    ElasticAffine,
    PipelineError,
    integer,
    knob,
    load_params,
    number,
    parse_config,
    resolve_device,
    validate_params,
)
from fewlabels.methods import (
    OWN_STAGE_SECTIONS,
    load_method,
    method_names,
    parse_method_config,
    validate_methods,
)
from tests.conftest import REPO_ROOT
from tools import profile
from tools.profile import apply_overrides

DEFAULTS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
SMOKE = yaml.safe_load((REPO_ROOT / "profiles/smoke.yaml").read_text())


def with_value(dotted: str, value):
    params = copy.deepcopy(DEFAULTS)
    *parents, leaf = dotted.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[leaf] = value
    return params


def without(dotted: str):
    params = copy.deepcopy(DEFAULTS)
    *parents, leaf = dotted.split(".")
    node = params
    for part in parents:
        node = node[part]
    del node[leaf]
    return params


def one_line_error(check, *args) -> str:
    """The message of the PipelineError `check(*args)` raises: one line, about params.yaml."""
    with pytest.raises(PipelineError) as caught:
        check(*args)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- the committed params and profiles ---------------------------------------------------


def test_repository_params_and_profiles_are_valid():
    validate_params(copy.deepcopy(DEFAULTS))
    validate_methods(copy.deepcopy(DEFAULTS))
    for path in (REPO_ROOT / "profiles").glob("*.yaml"):
        apply_overrides(DEFAULTS, yaml.safe_load(path.read_text()))


def test_every_method_config_of_the_committed_params_parses(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    params = load_params()
    validate_methods(params)
    # Every section of `train` is a method module (stage train@<method>).
    assert set(params["train"]) <= set(method_names())
    for name in [*params["train"], *OWN_STAGE_SECTIONS]:
        cfg = parse_method_config(name, params)
        assert isinstance(cfg, load_method(name).Config)
        assert dataclasses.is_dataclass(cfg)
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.lr = 1.0  # every method's config is read-only
    baseline = parse_method_config("baseline", params)
    assert isinstance(baseline.augment, ElasticAffine)
    assert baseline.epochs == params["train"]["baseline"]["epochs"]
    sgan = parse_method_config("sgan", params)
    sizes = params["train"]["sgan"]["conv"]["discriminator"]
    assert sgan.conv.discriminator.channels == sizes["channels"]
    assert type(sgan.augment) is Affine and type(sgan.strong_augment) is Affine
    consistency = parse_method_config("consistency", params)
    assert (
        consistency.weights.pseudo_label
        == params["train"]["consistency"]["weights"]["pseudo_label"]
    )
    ceilings = parse_method_config("ceilings", params)
    assert ceilings.models.cnn5.epochs == params["train_ceilings"]["models"]["cnn5"]["epochs"]
    assert parse_method_config("vae", params).budgets == params["vae_svm"]["budgets"]


# --- the shared keys and the non-training sections: validate_params ----------------------


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
        ("download.datasets", [], "download.datasets must be a list of at least 1"),
        ("download.timeout_s", "1e-3", "download.timeout_s must be a number \\(write 0.001"),
        ("pseudo_label.rule", "vote", "pseudo_label.rule must be one of knn, majority"),
        ("features.layer", "logits", "features.layer must be one of penultimate, conv, prob"),
        ("evaluate.robustness.blur_sigma", 0, "evaluate.robustness.blur_sigma must be a num"),
        ("attention.methods", ["saliency", "lime"], "attention.methods\\[1\\] must be one of"),
        ("train", [1, 2], "train must be a non-empty mapping"),
        ("train", {}, "train must be a non-empty mapping"),
        ("train_ceilings", None, "train_ceilings must be a non-empty mapping"),
        ("vae_svm", "fashion-mnist", "vae_svm must be a non-empty mapping"),
    ],
)
def test_bad_shared_values_are_named(key, value, message):
    found = one_line_error(validate_params, with_value(key, value))
    assert found.startswith(("params.yaml: ", f"{key}="))
    with pytest.raises(PipelineError, match=message):
        validate_params(with_value(key, value))


def test_unknown_and_missing_shared_keys_are_named():
    assert "unknown key split.pool" in one_line_error(validate_params, with_value("split.pool", 0))
    assert "unknown key evaluate.models" in one_line_error(  # removed: every model is scored
        validate_params, with_value("evaluate.models", ["baseline"])
    )
    assert "missing key evaluate.robustness.noise_std" in one_line_error(
        validate_params, without("evaluate.robustness.noise_std")
    )
    message = one_line_error(validate_params, without("retrain"))
    assert message == "params.yaml: retrain must be a non-empty mapping"


def test_features_backbone_must_be_a_method_of_train():
    for backbone in DEFAULTS["train"]:
        validate_params(with_value("features.backbone", backbone))
    for backbone in ("ceiling_cnn5", "retrain", "vae", "magic"):
        message = one_line_error(validate_params, with_value("features.backbone", backbone))
        assert f"features.backbone is '{backbone}'; use a method of train: " in message
    # A method added to `train` is a backbone at once.
    params = with_value("train.baseline2", copy.deepcopy(DEFAULTS["train"]["baseline"]))
    params["features"]["backbone"] = "baseline2"
    validate_params(params)


def test_check_generated_classifier_must_be_a_ceiling_of_train_ceilings_models():
    for name in DEFAULTS["train_ceilings"]["models"]:
        validate_params(with_value("check_generated.classifier", f"ceiling_{name}"))
    for classifier in ("cnn5", "ceiling_cnn6", "baseline"):
        message = one_line_error(
            validate_params, with_value("check_generated.classifier", classifier)
        )
        assert "check_generated.classifier must be one of ceiling_linear" in message
        assert repr(classifier) in message
    # A ceiling taken out of train_ceilings.models is no classifier any more.
    params = without("train_ceilings.models.cnn5")
    assert "check_generated.classifier must be one of" in one_line_error(validate_params, params)


def test_method_sections_are_left_to_their_typed_configs():
    """A stage checks the shared keys and its own method's section only: a bad value in
    another method's section does not stop it."""
    params = with_value("train.sgan.lr", 0)
    validate_params(params)
    parse_method_config("baseline", params)
    with pytest.raises(PipelineError, match="train.sgan.lr must be a number > 0"):
        parse_method_config("sgan", params)


# --- the methods' sections: typed configs --------------------------------------------------


@pytest.mark.parametrize(
    ("method", "key", "value", "message"),
    [
        ("baseline", "train.baseline.lr", "1e-3", "train.baseline.lr must be a number \\(write"),
        ("baseline", "train.baseline.lr", 0, "train.baseline.lr must be a number > 0"),
        ("baseline", "train.baseline.epochs", 2.5, "train.baseline.epochs must be an integer"),
        ("baseline", "train.baseline.lr_schedule", "step", "lr_schedule must be one of constant"),
        ("baseline", "train.baseline.dropout", 1.5, "dropout must be a number >= 0 and <= 1"),
        ("baseline", "train.baseline.channels", [32], "train.baseline.channels must be a list"),
        ("baseline", "train.baseline.augment.translate", 0.9, "augment.translate must be a num"),
        ("baseline", "train.baseline.augment.elastic", -1, "augment.elastic must be a number >="),
        ("baseline", "train.baseline.augment.elastic_sigma", 0, "elastic_sigma must be a num.* >"),
        ("baseline", "train.baseline", [1, 2], "params.yaml: train.baseline must be a mapping"),
        ("baseline", "train.baseline.augment", None, "train.baseline.augment must be a mapping"),
        ("consistency", "train.consistency.weights.entropy", -1, "weights.entropy must be a n"),
        ("consistency", "train.consistency.threshold", 1.5, "threshold must be a number >= 0"),
        ("consistency", "train.consistency.teacher", "oracle", "teacher must be one of student"),
        ("consistency", "train.consistency.channels", [32, 64], "channels must be a list of at"),
        ("consistency", "train.consistency.weak_augment.rotate_deg", 270, "rotate_deg must be a"),
        ("sgan", "train.sgan.teacher", "ema_ish", "train.sgan.teacher must be one of student"),
        ("sgan", "train.sgan.lr", True, "train.sgan.lr must be a number"),
        ("sgan", "train.sgan.conv.discriminator.channels", [], "discriminator.channels must be"),
        ("sgan", "train.sgan.conv.discriminator.hidden", 0, "discriminator.hidden must be an i"),
        ("sgan", "train.sgan.mlp.generator.hidden", [500, 0], "generator.hidden\\[1\\] must be"),
        ("sgan", "train.sgan.conv.generator.channels", [32], "needs exactly 2 entries"),
        ("sgan", "train.sgan.feature_layer", 0, "train.sgan.feature_layer is 0; layers count"),
        ("sgan", "train.sgan.fake_logit", "implicit", "fake_logit must be one of explicit, zero"),
        ("vat", "train.vat.xi", 0, "train.vat.xi must be a number > 0"),
        ("vat", "train.vat.eps", "2", "train.vat.eps must be a number"),
        ("vat", "train.vat.ema_decay", 1.5, "train.vat.ema_decay must be a number >= 0 and <= 1"),
        ("ceilings", "train_ceilings.steps_per_epoch", -1, "steps_per_epoch must be an integer"),
        ("ceilings", "train_ceilings.models.cnn5.epochs", 0, "models.cnn5.epochs must be an int"),
        ("ceilings", "train_ceilings.models.linear.augment", "no", "linear.augment must be true"),
        ("retrain", "retrain.batch_norm", "yes", "retrain.batch_norm must be true or false"),
        ("retrain", "retrain.min_confidence", 2, "retrain.min_confidence must be a number >= 0"),
        ("vae", "vae_svm.kl_weight", 0, "vae_svm.kl_weight must be a number > 0"),
        ("vae", "vae_svm.budgets", [], "vae_svm.budgets must be a list of at least 1"),
        ("vae", "vae_svm.budgets", [100, 100], "vae_svm.budgets must be a list without repeated"),
        ("vae", "vae_svm.cv_folds", 1, "vae_svm.cv_folds must be an integer >= 2"),
        ("vae", "vae_svm.dataset", "cifar10", "vae_svm.dataset must be one of mnist"),
    ],
)
def test_bad_method_values_are_named(method, key, value, message):
    params = with_value(key, value)
    found = one_line_error(parse_method_config, method, params)
    assert found.startswith(f"params.yaml: {key}")
    with pytest.raises(PipelineError, match=message):
        parse_method_config(method, params)
    assert one_line_error(validate_methods, params) == found


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("baseline", with_value("train.baseline.lrr", 0.1), "unknown key train.baseline.lrr;"),
        ("baseline", without("train.baseline.epochs"), "missing key train.baseline.epochs"),
        ("baseline", without("train.baseline.augment.elastic"), "missing key train.baseline.aug"),
        ("sgan", with_value("train.sgan.conv.discriminator.width", 8), "unknown key train.sgan."),
        ("sgan", without("train.sgan.mlp.generator"), "missing key train.sgan.mlp.generator"),
        ("consistency", without("train.consistency.weights.entropy"), "missing key train.cons"),
        ("consistency", with_value("train.consistency.weights.vat", 1.0), "unknown key train.c"),
        ("vat", with_value("train.vat.augment.elastic", 34), "unknown key train.vat.augment.el"),
        ("ceilings", with_value("train_ceilings.models.cnn6", {}), "unknown key train_ceil"),
        ("ceilings", without("train_ceilings.models.linear"), "missing key train_ceilings.mo"),
        ("retrain", with_value("retrain.dropout", 0.5), "unknown key retrain.dropout"),
        ("vae", without("vae_svm.budgets"), "missing key vae_svm.budgets"),
    ],
)
def test_unknown_and_missing_method_keys_are_named(method, params, message):
    found = one_line_error(parse_method_config, method, params)
    assert found.startswith("params.yaml: ") and message in found
    assert one_line_error(validate_methods, params) == found


def test_an_unknown_key_lists_the_known_ones():
    message = one_line_error(
        parse_method_config, "consistency", with_value("train.consistency.weights.vat", 1.0)
    )
    assert message.startswith("params.yaml: unknown key train.consistency.weights.vat; ")
    assert message.endswith("known keys here: cluster, consistency, entropy, pseudo_label")


def test_a_train_section_without_a_method_module_is_refused():
    params = with_value("train.magic", copy.deepcopy(DEFAULTS["train"]["baseline"]))
    validate_params(params)  # the shared keys: a section is a section
    assert "train.magic is not a method trained on the split" in one_line_error(
        validate_methods, params
    )
    message = one_line_error(parse_method_config, "vat", without("train.vat"))
    assert "train has no section 'vat'" in message


@pytest.mark.parametrize("method", ["consistency", "sgan"])
def test_an_ema_teacher_needs_a_moving_average(method):
    params = with_value(f"train.{method}.teacher", "ema")
    params["train"][method]["ema_decay"] = 0
    message = one_line_error(parse_method_config, method, params)
    assert f"params.yaml: train.{method}.teacher is ema but ema_decay is 0" in message
    assert one_line_error(validate_methods, params) == message
    params["train"][method]["teacher"] = "student"  # FixMatch needs no moving average
    assert parse_method_config(method, params).ema_decay == 0


# --- parse_config on a tiny config of its own ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Inner:
    size: int = knob(integer(minimum=1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outer:
    rate: float = knob(number(0, 1))
    inner: Inner
    checked: list[str] = dataclasses.field(default_factory=list, init=False)

    def check(self, key: str) -> None:
        if self.rate == 1 and self.inner.size > 1:
            raise PipelineError(f"params.yaml: {key}.rate 1 needs {key}.inner.size 1")


def test_parse_config_builds_nested_frozen_configs_and_names_every_bad_key():
    cfg = parse_config(Outer, {"rate": 0.5, "inner": {"size": 3}}, "a.b")
    assert cfg == Outer(rate=0.5, inner=Inner(3))
    for section, message in [
        ({"rate": 0.5, "inner": {"size": 3}, "more": 1}, "unknown key a.b.more; known keys h"),
        ({"rate": 0.5, "inner": {"size": 3, "x": 1}}, "unknown key a.b.inner.x; known keys"),
        ({"rate": 0.5}, "missing key a.b.inner"),
        ({"rate": 0.5, "inner": {}}, "missing key a.b.inner.size"),
        ({"rate": 0.5, "inner": {"size": 0}}, "a.b.inner.size must be an integer >= 1"),
        ({"rate": 2, "inner": {"size": 3}}, "a.b.rate must be a number >= 0 and <= 1"),
        ({"rate": 0.5, "inner": 3}, "a.b.inner must be a mapping"),
        ({"rate": 1, "inner": {"size": 3}}, "a.b.rate 1 needs a.b.inner.size 1"),  # its check
        ({"rate": 0.5, "inner": {"size": 3}, "checked": []}, "unknown key a.b.checked"),
    ]:
        found = one_line_error(parse_config, Outer, section, "a.b")
        assert found.startswith("params.yaml: ") and message in found, section
    with pytest.raises(PipelineError, match="params.yaml: a.b must be a mapping"):
        parse_config(Outer, [0.5], "a.b")


# --- profiles ----------------------------------------------------------------------------


def test_the_smoke_profile_applies_with_the_new_keys():
    merged = apply_overrides(DEFAULTS, SMOKE)
    assert merged["train"]["baseline"]["epochs"] == 2 != DEFAULTS["train"]["baseline"]["epochs"]
    assert merged["train"]["sgan"]["batch_size"] == 16
    assert merged["vae_svm"]["hidden"] == [64, 64]
    # What the profile leaves alone is the default's, and the defaults are untouched.
    assert merged["train"]["sgan"]["conv"] == DEFAULTS["train"]["sgan"]["conv"]
    assert yaml.safe_load((REPO_ROOT / "params.yaml").read_text()) == DEFAULTS
    assert parse_method_config("vat", merged).steps_per_epoch == 5


def test_profile_may_only_override_existing_keys():
    with pytest.raises(PipelineError, match="profile key train.baseline.nope is not in params"):
        apply_overrides(DEFAULTS, {"train": {"baseline": {"nope": 1}}})
    with pytest.raises(PipelineError, match="profile key train_baseline.epochs is not in par"):
        apply_overrides(DEFAULTS, {"train_baseline": {"epochs": 3}})  # the old layout
    with pytest.raises(PipelineError, match="profile key train.magic.epochs is not in params"):
        apply_overrides(DEFAULTS, {"train": {"magic": {"epochs": 3}}})
    merged = apply_overrides(DEFAULTS, {"train": {"baseline": {"epochs": 3}}})
    assert merged["train"]["baseline"]["epochs"] == 3
    assert DEFAULTS["train"]["baseline"]["epochs"] != 3


def test_a_profile_value_is_checked_by_its_methods_config():
    with pytest.raises(PipelineError, match="train.sgan.lr must be a number > 0"):
        apply_overrides(DEFAULTS, {"train": {"sgan": {"lr": 0}}})
    with pytest.raises(PipelineError, match="train.consistency.teacher is ema but ema_decay"):
        apply_overrides(DEFAULTS, {"train": {"consistency": {"teacher": "ema", "ema_decay": 0}}})


def test_set_args_are_the_profiles_dotted_keys(monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(sys, "argv", ["tools/profile.py", "smoke", "--set-args"])
    profile.main()
    words = capsys.readouterr().out.split()
    args = dict(word.split("=", 1) for word in words if word != "-S")
    assert words.count("-S") == len(args) == len(profile.flatten(SMOKE))
    assert args["train.baseline.epochs"] == "2"
    assert args["train.sgan.unlabeled_batch_size"] == "16"
    assert args["vae_svm.hidden"] == "[64,64]"  # one shell word
    assert not any(key.startswith("train_baseline") for key in args)


def test_an_unknown_profile_names_the_known_ones(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(PipelineError, match="unknown profile 'huge'; known profiles: smoke"):
        profile.load_profile("huge")


# --- the rest of config ------------------------------------------------------------------


def test_load_params_reports_bad_yaml_and_missing_file(tmp_path: Path):
    bad = tmp_path / "params.yaml"
    bad.write_text("labels: [100\n")
    with pytest.raises(PipelineError, match="is not valid YAML"):
        load_params(bad)
    with pytest.raises(PipelineError, match="not found"):
        load_params(tmp_path / "absent.yaml")


def test_auto_device_is_cpu_without_cuda():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


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


def test_run_stage_turns_a_pipeline_error_into_one_line_and_exit_1(monkeypatch, capsys):
    monkeypatch.setattr(config, "keep_freed_memory", lambda: True)

    def main():
        parse_method_config("sgan", with_value("train.sgan.lr", 0))

    with pytest.raises(SystemExit) as exited:
        config.run_stage(main)
    assert exited.value.code == 1
    assert capsys.readouterr().err == (
        "error: params.yaml: train.sgan.lr must be a number > 0, got 0 (int); "
        "fix it in params.yaml\n"
    )


def test_stage_argument_names_the_choices(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(REPO_ROOT / "stages/train.py"), "vat"])
    assert config.stage_argument(list(DEFAULTS["train"]), "a method") == "vat"
    monkeypatch.setattr(sys, "argv", [str(REPO_ROOT / "stages/train.py"), "ceilings"])
    message = one_line_error(config.stage_argument, list(DEFAULTS["train"]), "a method")
    assert message == "usage: python -m stages.train {baseline,sgan,consistency,vat} (a method)"
