"""The package layout the README states: each top-level package is this checkout's, and imports
flow one way (simulator, memory -> agents -> graph | training | evaluation -> alignuser)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("simulator", "memory", "agents", "graph", "training", "evaluation", "alignuser")
# What each package may import from the project (itself included).
ALLOWED = {
    "simulator": {"simulator"},
    "memory": {"memory", "simulator"},
    "agents": {"agents", "memory", "simulator"},
    "graph": {"graph", "agents", "memory", "simulator"},
    "training": {"training", "agents", "memory", "simulator"},
    "evaluation": {"evaluation", "agents", "memory", "simulator"},
    "alignuser": set(PACKAGES),
}


def _project_imports(path: Path) -> set[str]:
    """Top-level project packages a module imports, lazily or not."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out |= {n.split(".")[0] for n in names} & set(PACKAGES)
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_come_from_this_checkout(package: str) -> None:
    module = importlib.import_module(package)
    assert Path(module.__file__).resolve().parent == ROOT / package


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_flow_one_way(package: str) -> None:
    wrong = {str(path.relative_to(ROOT)): sorted(_project_imports(path) - ALLOWED[package])
             for path in sorted((ROOT / package).rglob("*.py"))}
    assert {k: v for k, v in wrong.items() if v} == {}


def test_the_check_sees_a_wrong_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from training.rollout import class_balance\n")
    assert _project_imports(module) - ALLOWED["evaluation"] == {"training"}
