"""The package's shape: layers imported only downward, no private name used across modules, one definition per
public name, modules small enough to read. The oracle is the source itself, read with ``ast``."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "qloc_tl"
MODULES = sorted(p for p in PKG.rglob("*.py"))
MAX_LINES = 700


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, str, int]]:
    """``(module, name, line)`` of every ``from qloc_tl... import name`` in ``path``, lazy ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qloc_tl"):
            out += [(node.module, a.name, node.lineno) for a in node.names]
    return out


def test_the_scan_sees_every_layer():
    names = {_module_name(p).split(".")[1] for p in MODULES if _module_name(p) != "qloc_tl"}
    assert {"core", "data", "zoo", "methods", "experiments", "reporting", "cli"} <= names
    assert sum(len(_imports(p)) for p in MODULES) > 100  # the scan finds the package's imports


def test_no_private_name_is_imported_across_modules():
    bad = [
        f"{_module_name(p)}:{line} imports {name} from {mod}"
        for p in MODULES
        for mod, name, line in _imports(p)
        if name.startswith("_") and mod != _module_name(p)
    ]
    assert bad == []


def test_each_public_function_and_class_is_defined_once():
    where: dict[str, list[str]] = defaultdict(list)
    for p in MODULES:
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                if any(getattr(d, "id", getattr(d, "attr", None)) == "overload" for d in node.decorator_list):
                    continue  # typing.overload signatures of one function
                where[node.name].append(_module_name(p))
    dup = {k: v for k, v in where.items() if len(v) > 1}
    assert dup == {}


def test_modules_fit_in_a_readers_head():
    big = {_module_name(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert big == {}


def test_layers_are_imported_only_downward():
    """The import-linter contract of pyproject.toml (core -> zoo -> data -> methods -> experiments -> reporting
    -> cli) is kept; a lazy import inside a function counts."""
    exe = Path(sys.executable).parent / "lint-imports"
    if importlib.util.find_spec("importlinter") is None or not exe.exists():
        pytest.skip("import-linter is not installed (the dev extra has it)")
    run = subprocess.run([str(exe), "--no-cache"], cwd=PKG.parent, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:]
