"""dvc.yaml lists, for every stage, exactly the project code its command runs: the stage's
script and every project module it imports, directly or through other modules. A module
left out means an edit to it does not re-run the stage (stale outputs); one listed but never
imported re-runs it for nothing.

Methods are imported by name (`fewlabels.methods.load_method`), which no import statement
shows: the train@<method> template lists `fewlabels/methods/${key}.py` and the union of
what its methods import (so an edit to one method's module re-runs that method alone), and
evaluate, which scores every method's models, lists the whole methods folder.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

DVC_YAML = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]
PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
PACKAGES = ("fewlabels", "stages")


def _module_file(root: Path, dotted: str) -> set[Path]:
    base = root / dotted.replace(".", "/")
    return {p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()}


def imported_modules(path: Path, root: Path = REPO_ROOT) -> set[Path]:
    """The project files that `path` imports: relative imports and absolute ones of the
    project's packages (`from fewlabels.x import y`: x.py or x/__init__.py, and x/y.py
    when y is a module), with the packages' `__init__.py` files on the way."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level > 0:
                package = path.parent
                for _ in range(node.level - 1):
                    package = package.parent
                dotted = ".".join(package.relative_to(root).parts)
                dotted = f"{dotted}.{node.module}" if node.module else dotted
            elif node.module and node.module.split(".")[0] in PACKAGES:
                dotted = node.module
            else:
                continue
            parts = dotted.split(".")
            for i in range(1, len(parts) + 1):
                found |= _module_file(root, ".".join(parts[:i]))
            for alias in node.names:
                found |= _module_file(root, f"{dotted}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    found |= _module_file(root, alias.name)
    return {p for p in found if p != path}


def code_of(*scripts: Path) -> set[str]:
    """`scripts` and every project module they import, transitively, relative to the repo;
    package `__init__.py` files that are empty or docstrings only are left out."""
    seen: set[Path] = set()
    todo = list(scripts)
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += imported_modules(path)
    return {str(p.relative_to(REPO_ROOT)) for p in seen if not _trivial_init(p)}


def _trivial_init(path: Path) -> bool:
    if path.name != "__init__.py":
        return False
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def method_file(name: str) -> Path:
    return REPO_ROOT / "fewlabels" / "methods" / f"{name}.py"


def test_imported_modules_follows_relative_and_project_imports(tmp_path):
    (tmp_path / "fewlabels" / "sub").mkdir(parents=True)
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "stage.py").write_text(
        "import os\nfrom fewlabels.a import f\nfrom fewlabels.sub import b\n"
    )
    (tmp_path / "fewlabels" / "a.py").write_text("from . import c\nfrom .sub.b import g\n")
    for name in ("__init__", "c", "unused", "sub/__init__", "sub/b"):
        (tmp_path / "fewlabels" / f"{name}.py").write_text("")
    pkg = tmp_path / "fewlabels"
    assert imported_modules(tmp_path / "stages" / "stage.py", tmp_path) == {
        pkg / "__init__.py",
        pkg / "a.py",
        pkg / "sub" / "__init__.py",
        pkg / "sub" / "b.py",
    }
    assert imported_modules(pkg / "a.py", tmp_path) == {
        pkg / "__init__.py",
        pkg / "c.py",
        pkg / "sub" / "__init__.py",
        pkg / "sub" / "b.py",
    }


def expected_code(name: str, stage: dict) -> set[str]:
    module = re.search(r"python -m stages\.(\w+)", stage["cmd"]).group(1)
    script = REPO_ROOT / "stages" / f"{module}.py"
    if name == "train":
        code = set().union(*(code_of(script, method_file(m)) for m in PARAMS["train"]))
        return code - {f"fewlabels/methods/{m}.py" for m in PARAMS["train"]}
    if name == "evaluate":
        methods = [p for p in (REPO_ROOT / "fewlabels" / "methods").glob("*.py")]
        code = code_of(script, *methods)
        return {c for c in code if not c.startswith("fewlabels/methods/")}
    return code_of(script)


@pytest.mark.parametrize("name", list(STAGES))
def test_each_stage_depends_on_exactly_the_code_it_imports(name):
    stage = STAGES[name].get("do", STAGES[name])  # foreach/matrix stages: the template
    listed = {dep for dep in stage["deps"] if dep.endswith(".py")}
    if name == "train":
        assert "fewlabels/methods/${key}.py" in listed
        listed.discard("fewlabels/methods/${key}.py")
    if name == "evaluate":
        assert "fewlabels/methods" in stage["deps"]
    assert listed == expected_code(name, stage)


def test_every_method_of_train_is_a_module_with_the_method_interface():
    from fewlabels.methods import load_method

    for name in PARAMS["train"]:
        method = load_method(name)
        for attribute in ("Config", "build", "train", "DESCRIPTION"):
            assert hasattr(method, attribute), f"{name} lacks {attribute}"
