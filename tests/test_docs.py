"""Every public function and class has a docstring, and the docs pages named in mkdocs.yml exist."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

MODULES = [
    "qloc_tl", "qloc_tl.identities", "qloc_tl.hooks", "qloc_tl.model", "qloc_tl.facts", "qloc_tl.attribution",
    "qloc_tl.attribution.quadrature", "qloc_tl.attribution.selection", "qloc_tl.attribution.unembed",
    "qloc_tl.attribution.fused", "qloc_tl.attribution.layout",
    "qloc_tl.consistency", "qloc_tl.mapping", "qloc_tl.synapses", "qloc_tl.dynamic", "qloc_tl.tracing",
    "qloc_tl.views", "qloc_tl.query_localization", "qloc_tl.editing", "qloc_tl.zoo", "qloc_tl.datasets",
    "qloc_tl.loading", "qloc_tl.store", "qloc_tl.testing", "qloc_tl.errors", "qloc_tl.report", "qloc_tl.cli",
    "qloc_tl.known", "qloc_tl.zoo.smollm2", "qloc_tl.strength", "qloc_tl.completeness", "qloc_tl.specificity",
]  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]


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
