"""dvc.yaml lists, for every stage, exactly the project code its command runs: the stage's
script and every `stages/` module it imports, directly or through other modules. A module
left out means an edit to it does not re-run the stage (stale outputs); one listed but never
imported re-runs it for nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def imported_modules(path: Path) -> set[Path]:
    """The project files that `path`'s relative imports name (`from .x import y`: x.py, or
    x/y.py when y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = path.parents[node.level - 1]
            if node.module:
                base = base / node.module.replace(".", "/")
                found.add(base.with_suffix(".py"))
            found |= {base / f"{alias.name}.py" for alias in node.names}
    return {p for p in found if p.is_file()}


def code_of(script: Path) -> set[str]:
    """`script` and every project module it imports, transitively, relative to the repo."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += imported_modules(path)
    return {str(p.relative_to(REPO_ROOT)) for p in seen}


def test_imported_modules_follows_relative_imports(tmp_path):
    (tmp_path / "pkg" / "lib").mkdir(parents=True)
    (tmp_path / "pkg" / "stage.py").write_text("from .lib import a\nfrom .lib.b import f\n")
    (tmp_path / "pkg" / "lib" / "a.py").write_text("from . import c\nimport os\n")
    for name in ("b", "c", "unused"):
        (tmp_path / "pkg" / "lib" / f"{name}.py").write_text("")
    lib = tmp_path / "pkg" / "lib"
    assert imported_modules(tmp_path / "pkg" / "stage.py") == {lib / "a.py", lib / "b.py"}
    assert imported_modules(lib / "a.py") == {lib / "c.py"}


@pytest.mark.parametrize("name", list(STAGES))
def test_each_stage_depends_on_exactly_the_code_it_imports(name):
    stage = STAGES[name].get("do", STAGES[name])  # foreach/matrix stages: the template
    module = re.search(r"python -m stages\.(\w+)", stage["cmd"]).group(1)
    listed = {dep for dep in stage["deps"] if dep.endswith(".py")}
    assert listed == code_of(REPO_ROOT / "stages" / f"{module}.py")
