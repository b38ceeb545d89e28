"""Every public function and class has a docstring, and the docs pages named in mkdocs.yml exist."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

MODULES = [
    "qloc_tl", "qloc_tl.core.identities", "qloc_tl.core.hooks", "qloc_tl.core.model", "qloc_tl.data.facts", "qloc_tl.methods.attribution",
    "qloc_tl.methods.attribution.quadrature", "qloc_tl.methods.attribution.selection", "qloc_tl.methods.attribution.unembed",
    "qloc_tl.methods.attribution.fused", "qloc_tl.methods.attribution.layout",
    "qloc_tl.experiments.consistency", "qloc_tl.experiments.mapping", "qloc_tl.methods.synapses", "qloc_tl.experiments.dynamic", "qloc_tl.methods.tracing",
    "qloc_tl.reporting.views", "qloc_tl.experiments.query_localization", "qloc_tl.experiments.editing", "qloc_tl.zoo", "qloc_tl.data.datasets",
    "qloc_tl.zoo.loading", "qloc_tl.core.store", "qloc_tl.zoo.tiny", "qloc_tl.core.errors", "qloc_tl.reporting.report", "qloc_tl.cli",
    "qloc_tl.methods.known", "qloc_tl.zoo.smollm2", "qloc_tl.experiments.strength", "qloc_tl.methods.completeness", "qloc_tl.experiments.specificity",
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
