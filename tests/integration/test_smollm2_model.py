"""The backend-neutral model layer on SmolLM2-135M: its capability probes pass despite float noise."""

from __future__ import annotations

from conftest import TL_MAJOR

from qloc_tl import capabilities


def test_smollm2_capabilities_despite_float_noise(smollm2_model):
    """SmolLM2-135M (30 layers, float32): its KV cache (TL 3) and start_at_layer pass the probes, whose
    4-token input reproduces the full forward only up to float reordering noise."""
    caps = capabilities(smollm2_model)
    assert caps.notes == ()
    if TL_MAJOR < 4:
        assert caps.backend == "hooked" and caps.kv_cache == "hooked" and caps.start_at_layer == "fast"
    else:
        assert caps.backend == "bridge" and caps.start_at_layer == "no_saving"
