"""Every public function and class has a docstring, and the docs pages named in mkdocs.yml exist."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import qloc_tl

# every module of the package, found by walking it (a new module is checked without being listed here)
MODULES = ["qloc_tl"] + sorted(m.name for m in pkgutil.walk_packages(qloc_tl.__path__, "qloc_tl.") if not m.name.endswith("__main__"))
ROOT = Path(__file__).resolve().parents[2]


def _public(modname):
    mod = importlib.import_module(modname)
    for name in getattr(mod, "__all__", []):
        obj = getattr(mod, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            yield f"{modname}.{name}", obj


@pytest.mark.parametrize("modname", MODULES)
def test_public_api_has_docstrings(modname):
    mod = importlib.import_module(modname)
    assert (mod.__doc__ or "").strip(), f"module {modname} has no docstring"
    missing = [qual for qual, obj in _public(modname) if not (inspect.getdoc(obj) or "").strip()]
    assert not missing, f"no docstring: {missing}"


def test_mkdocs_nav_pages_exist():
    import re

    nav = re.findall(r":\s*([\w/]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
    assert nav
    missing = [p for p in nav if not (ROOT / "docs" / p).is_file()]
    assert not missing, missing
