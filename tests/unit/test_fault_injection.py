"""Fault injection: an exception raised inside any hook (at every call position) or inside any context
leaves no hook registered, every parameter bit-identical and the clean forward unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_params_identical, param_snapshot, registered_hooks

from qloc_tl import Head, Neuron, intervene, record_neurons, scale_attention, scale_neurons, set_neurons
from qloc_tl.zoo.tiny import tiny_model

TOK = torch.tensor([[3, 17, 9, 10, 25]])


class Injected(RuntimeError):
    pass


FACTORIES = {
    "scale_neurons": lambda: scale_neurons([Neuron(0, 1), Neuron(2, 3)], 0.0),
    "set_neurons": lambda: set_neurons([Neuron(1, 4)], 1.5, positions=None),
    "scale_attention": lambda: scale_attention([Head(0, 1), Head(1, 2)], 2.0, renormalize=True),
    "scale_scores": lambda: scale_attention([Head(2, 0)], 0.5, target="scores"),
    "record_neurons": lambda: record_neurons([0, 1, 2], {}),
}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return tiny_model(request.param, source="hf")


@pytest.mark.parametrize("name", list(FACTORIES))
def test_exception_inside_hook_at_every_call_position(model, name):
    clean = model(TOK).detach()
    snap = param_snapshot(model)
    hooks = FACTORIES[name]()
    n_hooks = len(hooks)
    for k in range(n_hooks):
        hooks = FACTORIES[name]()
        target = hooks[k][1]
        real = target.apply

        def boom(act, _k=k):
            raise Injected(f"inside hook {_k}")

        target.apply = boom
        with pytest.raises(Injected), intervene(model, hooks):
            model(TOK)
        target.apply = real
        assert registered_hooks(model) == 0
        assert_params_identical(model, snap)
        torch.testing.assert_close(model(TOK).detach(), clean, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_exception_in_context_body_before_and_after_forward(model, name):
    clean = model(TOK).detach()
    snap = param_snapshot(model)
    for when in ("before", "after"):
        with pytest.raises(Injected), intervene(model, FACTORIES[name]()):
            if when == "after":
                model(TOK)
            raise Injected(when)
        assert registered_hooks(model) == 0
        assert_params_identical(model, snap)
    torch.testing.assert_close(model(TOK).detach(), clean, atol=0, rtol=0)
