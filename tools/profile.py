"""Apply a parameter profile (profiles/<name>.yaml) on top of params.yaml.

    python -m tools.profile smoke              # rewrite params.yaml with the overrides
    python -m tools.profile smoke --set-args   # print `-S key=value` for `dvc exp run`

A profile may only override keys that params.yaml already has (as `dvc exp run -S`),
and the result is validated before params.yaml is touched.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import yaml

from fewlabels.config import PARAMS_FILE, PipelineError, load_params, run_stage, validate_params
from fewlabels.io import write_text
from fewlabels.methods import validate_methods

PROFILES_DIR = Path("profiles")


def flatten(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def apply_overrides(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(params)
    for dotted, value in flatten(overrides).items():
        *parents, leaf = dotted.split(".")
        node = merged
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise PipelineError(f"profile key {dotted} is not in params.yaml")
        node[leaf] = value
    validate_params(merged)
    validate_methods(merged)
    return merged


def load_profile(name: str) -> dict[str, Any]:
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise PipelineError(f"unknown profile {name!r}; known profiles: {known}")
    return yaml.safe_load(path.read_text()) or {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="profile name, e.g. smoke")
    parser.add_argument("--set-args", action="store_true", help="print dvc exp run -S args")
    args = parser.parse_args()
    overrides = load_profile(args.name)
    merged = apply_overrides(load_params(), overrides)
    if args.set_args:
        # Compact JSON keeps list values one shell word: -S download.datasets=["mnist"]
        compact = {k: json.dumps(v, separators=(",", ":")) for k, v in flatten(overrides).items()}
        print(" ".join(f"-S {k}={v}" for k, v in compact.items()))
        return
    # Rewrites params.yaml without its comments: meant for scratch copies and CI.
    write_text(PARAMS_FILE, yaml.safe_dump(merged, sort_keys=False))
    print(f"applied profile {args.name} to {PARAMS_FILE}")


if __name__ == "__main__":
    run_stage(main)
