"""DVC reruns exactly what a change affects: each stage's code deps are its import closure.

The closure is derived from the source (ast), not from running it: every module of the project's
packages that `python -m stages.<name>` would import, with the `__init__.py` of every package on
the way. A dvc.yaml that misses a file, or lists code the stage does not import, fails here.
"""

import ast
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT

PACKAGES = {"dfkd", "stages", "pipeline", "serving"}
DVC_FILES = ["dvc.yaml", "amalgamation/dvc.yaml"]


def module_file(name: str) -> Path | None:
    path = PROJECT.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imported_names(path: Path) -> set[str]:
    """Absolute imports of a file; for `from a import b`, both `a` and `a.b` (b may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_closure(module: str) -> set[str]:
    """Repository-relative paths of every project file that importing `module` executes."""
    seen: set[Path] = set()
    pending = [module]
    while pending:
        parts = pending.pop().split(".")
        if parts[0] not in PACKAGES:
            continue
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py
            path = module_file(".".join(parts[:depth]))
            if path and path not in seen:
                seen.add(path)
                pending.extend(imported_names(path))
    return {str(path.relative_to(PROJECT)) for path in seen}


def is_code(dep: str) -> bool:
    return dep.endswith(".py") or (PROJECT / dep).is_dir() and any((PROJECT / dep).rglob("*.py"))


def stages():
    for dvc_file in DVC_FILES:
        for name, stage in yaml.safe_load((PROJECT / dvc_file).read_text())["stages"].items():
            yield pytest.param(stage, id=f"{dvc_file}:{name}")


@pytest.mark.parametrize("stage", stages())
def test_stage_deps_are_the_import_closure_of_its_command(stage):
    command = stage["cmd"].split()
    assert command[:2] == ["python", "-m"], f"not a python module command: {stage['cmd']}"
    expected = import_closure(command[2])
    listed = {dep for dep in stage["deps"] if is_code(dep)}
    assert not {dep for dep in listed if (PROJECT / dep).is_dir()}, "list code files, not folders (exact deps)"
    assert sorted(expected - listed) == [], "imported but not a dependency"
    assert sorted(listed - expected) == [], "a dependency the stage does not import"


def test_the_closure_follows_package_inits_and_from_imports():
    closure = import_closure("stages.distill")
    assert {"stages/__init__.py", "dfkd/__init__.py", "dfkd/synthesis/__init__.py", "dfkd/synthesis/methods.py"} <= closure
    assert "dfkd/data.py" in import_closure("stages.train_teacher")  # reached through stages.common
    assert not any(path.startswith(("pipeline/", "serving/")) for path in closure)
