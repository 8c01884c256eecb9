"""Training methods: one module each, found here by name.

A method module holds what makes the method: a typed `Config` (its params.yaml section,
checked once by `parse_config`), `build(cfg, n_classes)` (its networks), its losses and
its training step, and `train(model, data, cfg, run)`. Beside them, for the results
table: `DESCRIPTION` (one line), `REPORTED` (the seed report's or paper's figure by
(dataset, labels)) and `EVALUATED` (the models `evaluate` scores: name -> description;
by default the method's own model). Nothing registers itself on import: a stage imports
the one method it runs (`load_method`), so it depends on that method's code alone.

The methods trained on the split (params.yaml's `train` section, stage train@<method>)
are the keys of `train`: adding a module here and its section there adds the stage, its
row in `evaluate` and its benchmark. `ceilings`, `retrain` and `vae` train on other data
and have stages of their own.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any

from ..config import PipelineError, parse_config

# The methods with stages of their own, and the params section each reads.
OWN_STAGE_SECTIONS = {"ceilings": "train_ceilings", "retrain": "retrain", "vae": "vae_svm"}


def method_names() -> list[str]:
    """Every method module of this package, without importing any."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def load_method(name: str) -> ModuleType:
    if name not in method_names():
        raise PipelineError(f"unknown method {name!r}; known: {', '.join(method_names())}")
    return importlib.import_module(f"{__name__}.{name}")


def parse_method_config(name: str, params: dict[str, Any]) -> Any:
    """Method `name`'s typed config from its params.yaml section."""
    if name in OWN_STAGE_SECTIONS and name in params["train"]:
        raise PipelineError(
            f"params.yaml: train.{name}: {name} has a stage and a section of its own "
            f"({OWN_STAGE_SECTIONS[name]}); remove train.{name}"
        )
    if name in OWN_STAGE_SECTIONS:
        section = OWN_STAGE_SECTIONS[name]
        return parse_config(load_method(name).Config, params[section], section)
    if name not in params["train"]:
        raise PipelineError(
            f"params.yaml: train has no section {name!r}; its methods: {', '.join(params['train'])}"
        )
    split_methods = [m for m in method_names() if m not in OWN_STAGE_SECTIONS]
    if name not in split_methods:
        raise PipelineError(
            f"params.yaml: train.{name} is not a method trained on the split (no module "
            f"fewlabels/methods/{name}.py with train_step); known: {', '.join(split_methods)}"
        )
    return parse_config(load_method(name).Config, params["train"][name], f"train.{name}")


def validate_methods(params: dict[str, Any]) -> None:
    """Check every method's section (the stages check only their own)."""
    for name in [*params["train"], *OWN_STAGE_SECTIONS]:
        parse_method_config(name, params)


def evaluated_models(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every model `evaluate` scores: name -> its description and the reported figures
    it is compared with."""
    models = {}
    for name in params["train"]:
        method = load_method(name)
        reported = getattr(method, "REPORTED", {})
        for model, description in getattr(method, "EVALUATED", {name: method.DESCRIPTION}).items():
            models[model] = {"description": description, "reported": reported}
    retrain = load_method("retrain")
    models["retrain"] = {"description": retrain.DESCRIPTION, "reported": retrain.REPORTED}
    ceilings = load_method("ceilings")
    for name in params["train_ceilings"]["models"]:
        models[f"ceiling_{name}"] = {
            "description": f"{ceilings.DESCRIPTION}: {name}",
            "reported": ceilings.REPORTED.get(name, {}),
        }
    vae = load_method("vae")
    for labels in params["vae_svm"]["budgets"]:
        models[f"vae_svm@{labels}"] = {
            "description": vae.DESCRIPTION,
            "reported": vae.REPORTED.get(labels, {}),
        }
    return models
