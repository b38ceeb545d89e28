"""attribute_neurons against independent oracles.

* an analytic toy (a HookedRootModule whose answer probability is a logistic function of the neurons):
  every quadrature rule, IG / SIG / AMIG, prob / logprob, against closed forms computed here in NumPy,
  for both ``implementation="fast"`` and ``"reference"``;
* masked baselines of several prompts against a hand loop;
* central finite differences of P(answer) through qloc_tl.core.hooks.set_neurons (no autograd, no attribution
  code) along the IG path;
* completeness: |delta| shrinks with m at the known rate for trapezoid and Gauss–Legendre;
* the result object and argument validation.

The fast execution engines against the reference are in ``tests/engines/test_attribution_engines.py``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ANSWERS, MODELS, PROMPTS, cached_model, rel_diff
from torch import nn

from qloc_tl.core.errors import InvalidInputError, NumericalError, UnsupportedModelError
from qloc_tl.core.hooks import set_neurons
from qloc_tl.core.identities import Neuron
from qloc_tl.methods.attribution import NeuronAttribution, attribute_neurons, select_neurons
from qloc_tl.methods.attribution.config import AttributionConfig
from qloc_tl.methods.attribution.quadrature import quadrature

# ------------------------------------------------------------------------------------------------
# analytic toy
# ------------------------------------------------------------------------------------------------


def _toy_class():
    from transformer_lens.hook_points import HookPoint

    try:
        from transformer_lens import HookedRootModule
    except ImportError:  # pragma: no cover - older TL
        from transformer_lens.hook_points import HookedRootModule

    class _MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hook_post = HookPoint()

    class _Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = _MLP()

    class LogisticToy(HookedRootModule):
        """Neurons at a position are E[token] (no mixing across positions); logits = [u·h, 0, …, 0].

        So P(token 0 | prompt) = σ(u·h_last − ln(V − 1)): a logistic function of the neurons.
        """

        def __init__(self, d: int = 6, vocab: int = 10, seed: int = 0) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.E = nn.Parameter(torch.randn(vocab, d, generator=g, dtype=torch.float64))
            self.u = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
            self.blocks = nn.ModuleList([_Block()])
            self.cfg = SimpleNamespace(
                n_layers=1,
                d_model=d,
                n_heads=1,
                d_head=d,
                d_vocab=vocab,
                d_mlp=d,
                n_ctx=32,
                default_prepend_bos=False,
            )
            self.setup()

        def forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
            h = self.blocks[0].mlp.hook_post(self.E[tokens])
            z = h @ self.u
            return torch.cat(
                [z.unsqueeze(-1), torch.zeros(*z.shape, self.cfg.d_vocab - 1, dtype=z.dtype)], -1
            )

    return LogisticToy


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _toy_expected(toy, w, b, rule, steps, objective="prob", multiply="difference"):
    """Closed form of the rule's IG sum for the logistic toy, in NumPy."""
    E_u = toy.u.detach().numpy()
    shift = -math.log(toy.cfg.d_vocab - 1)
    c0 = float(E_u @ b) + shift
    c1 = float(E_u @ (w - b))
    a, wt = (t.numpy() for t in quadrature(rule, steps))
    s = _sig(c0 + a * c1)
    dF = s * (1 - s) if objective == "prob" else (1 - s)  # d/dz of σ(z) or log σ(z)
    G = E_u * float((wt * dF).sum())
    mult = (w - b) if multiply == "difference" else w
    return mult * G


@pytest.fixture(scope="module")
def toy():
    model = _toy_class()()
    model.eval()
    return model


@pytest.mark.parametrize("rule", ["left", "right", "midpoint", "trapezoid", "gauss_legendre", "eleuther"])
@pytest.mark.parametrize("objective", ["prob", "logprob"])
def test_toy_ig_equals_closed_form_for_every_rule(toy, rule, objective):
    tokens = torch.tensor([3, 1, 4, 1, 5])
    w = toy.E[5].detach().numpy()
    for baseline in ("zero", torch.linspace(-1, 1, 6, dtype=torch.float64)):
        b = np.zeros(6) if isinstance(baseline, str) else baseline.numpy()
        for impl in ("fast", "reference"):
            res = attribute_neurons(
                toy,
                tokens,
                0,
                steps=7,
                rule=rule,
                objective=objective,
                baseline=baseline,
                implementation=impl,
            )
            expected = _toy_expected(toy, w, b, rule, 7, objective)
            assert np.allclose(res.scores[0].numpy(), expected, rtol=1e-12, atol=1e-15), (rule, impl)
            assert np.allclose(res.activations[0, 0].numpy(), w)


def test_toy_completeness_is_exact_in_the_limit(toy):
    tokens = torch.tensor([2, 7, 5])
    res = attribute_neurons(toy, tokens, 0, steps=40, rule="gauss_legendre")
    w = toy.E[5].detach().numpy()
    p_clean = _sig(float(toy.u.detach().numpy() @ w) - math.log(9))
    p_base = _sig(-math.log(9))
    assert float(res.clean_prob[0]) == pytest.approx(p_clean, rel=1e-12)
    assert float(res.baseline_prob[0, 0]) == pytest.approx(p_base, rel=1e-12)
    assert float(res.scores.sum()) == pytest.approx(p_clean - p_base, abs=1e-13)
    assert abs(float(res.completeness_delta[0, 0])) < 1e-13


def test_toy_sig_and_amig_closed_forms(toy):
    # the toy's neurons at the answer position depend only on the answer-position token: masking token j≠t
    # gives b_j = w̄; masking t gives b_t = E[rid]. SIG = (1/n)·IG(b = E[rid]); AMIG uses b̄ = mean_j b_j.
    tokens = torch.tensor([3, 1, 4, 1, 5])
    n, rid = 5, 8
    w = toy.E[5].detach().numpy()
    bt = toy.E[rid].detach().numpy()
    for rule in ("left", "gauss_legendre"):
        sig = attribute_neurons(toy, tokens, 0, method="sig", steps=9, rule=rule, replacement_id=rid)
        assert np.allclose(
            sig.scores[0].numpy(), _toy_expected(toy, w, bt, rule, 9) / n, rtol=1e-12, atol=1e-15
        )
        bbar = ((n - 1) * w + bt) / n
        amig = attribute_neurons(toy, tokens, 0, method="amig", steps=9, rule=rule, replacement_id=rid)
        exp = _toy_expected(toy, w, bbar, rule, 9, multiply="activation")
        assert np.allclose(amig.scores[0].numpy(), exp, rtol=1e-12, atol=1e-15)
        amig_d = attribute_neurons(
            toy, tokens, 0, method="amig", steps=9, rule=rule, replacement_id=rid, multiply_by="difference"
        )
        assert np.allclose(
            amig_d.scores[0].numpy(), _toy_expected(toy, w, bbar, rule, 9), rtol=1e-12, atol=1e-15
        )
        # baselines: SIG averages F(b_j) over j; AMIG evaluates F(b̄)
        shift = -math.log(9)
        u = toy.u.detach().numpy()
        f_b = ((n - 1) * _sig(u @ w + shift) + _sig(u @ bt + shift)) / n
        assert float(sig.baseline_prob[0, 0]) == pytest.approx(f_b, rel=1e-12)
        assert float(amig.baseline_prob[0, 0]) == pytest.approx(_sig(u @ bbar + shift), rel=1e-12)


def test_toy_mask_bos_and_replacement_default(toy):
    with pytest.raises(InvalidInputError, match="replacement_id"):
        attribute_neurons(toy, torch.tensor([1, 2]), 0, method="sig")  # no tokenizer → no EOS


@pytest.mark.parametrize("arch, source", MODELS)
def test_masked_baselines_of_several_prompts_equal_one_at_a_time(arch, source):
    """The masked variants of prompts of different lengths share right-padded passes; each prompt's
    baselines equal a hand loop over its variants (one forward each, no padding)."""
    from qloc_tl.methods.attribution.baselines import masked_token_baselines_many

    model = cached_model(arch, source)
    rows = [model.to_tokens(p)[0] for p in PROMPTS]
    cfg = AttributionConfig(method="amig")
    names = {l: f"blocks.{l}.mlp.hook_post" for l in (0, 2)}
    many = masked_token_baselines_many(model, rows, names, cfg, chunk=4)  # chunks cut across prompts
    eos = model.tokenizer.eos_token_id
    # HF LLaMA's RMSNorm computes in float32 even in a float64 model: batch rows of another length round
    # differently
    tol = 1e-12 if (arch, source) != ("llama", "hf") else 1e-6
    for row, got in zip(rows, many):
        positions = [j for j in range(len(row)) if not (j == 0 and int(row[0]) == model.tokenizer.bos_token_id)]
        assert got.shape == (len(positions), model.cfg.n_layers, model.cfg.d_mlp)
        for k, j in enumerate(positions):
            v = row.clone()
            v[j] = eos
            _, cache = model.run_with_cache(v.unsqueeze(0), names_filter=list(names.values()))
            for l, name in names.items():
                assert rel_diff(got[k, l], cache[name][0, -1]) <= tol
        assert bool((got[:, 1] == 0).all())  # layers not asked for stay 0


# ------------------------------------------------------------------------------------------------
# finite-difference oracle and completeness
# ------------------------------------------------------------------------------------------------


def _prob_with_layer_set(model, tokens, layer, values, answer, site="post"):
    d = values.shape[0]
    hooks = set_neurons([Neuron(layer, i) for i in range(d)], values, positions=-1, site=site)
    with model.hooks(fwd_hooks=hooks), torch.no_grad():
        logits = model(tokens)
    return float(torch.softmax(logits[0, -1].double(), -1)[answer])


@pytest.mark.parametrize(
    "arch, source, site, tol",
    [("gpt2", "native", "post", 1e-6), ("gpt2", "hf", "pre", 1e-6), ("llama", "hf", "post", 1e-3)],
)
def test_ig_matches_finite_differences_along_the_path(arch, source, site, tol):
    model = cached_model(arch, source)
    prompt, answer = "alice was born in", "paris"
    tokens = model.to_tokens(prompt)
    y = int(model.to_single_token(answer))
    layer, steps = 1, 4
    res = attribute_neurons(model, prompt, answer, steps=steps, rule="gauss_legendre", site=site)
    w = res.activations[0, layer]
    alphas, weights = quadrature("gauss_legendre", steps)
    idx = sorted({int(torch.argmax(res.scores[layer])), int(torch.argmin(res.scores[layer])), 7})
    eps = 1e-5
    for i in idx:
        fd_sum = 0.0
        for a, wt in zip(alphas.tolist(), weights.tolist()):
            x = a * w
            e = torch.zeros_like(w)
            e[i] = eps
            fp = _prob_with_layer_set(model, tokens, layer, (x + e).to(model.cfg.dtype), y, site)
            fm = _prob_with_layer_set(model, tokens, layer, (x - e).to(model.cfg.dtype), y, site)
            fd_sum += wt * (fp - fm) / (2 * eps)
        expected = float(w[i]) * fd_sum
        scale = float(res.scores[layer].abs().max())
        assert abs(float(res.scores[layer, i]) - expected) <= tol * scale, (
            i,
            float(res.scores[layer, i]),
            expected,
        )


@pytest.mark.parametrize(
    "rule, ms, min_ratio", [("trapezoid", (4, 8, 16), 3.0), ("gauss_legendre", (1, 2, 4), 5.0)]
)
def test_completeness_delta_shrinks_with_steps(rule, ms, min_ratio):
    model = cached_model("gpt2", "hf")
    deltas = []
    for m in ms:
        res = attribute_neurons(model, PROMPTS[0], ANSWERS[0], steps=m, rule=rule)
        # delta is exactly Σ scores − (F(clean) − F(baseline)) with independently computed F's
        assert torch.allclose(
            res.completeness_delta[0],
            res.scores.sum(-1) - (res.clean_prob[0] - res.baseline_prob[0]),
            atol=1e-15,
        )
        deltas.append(float(res.completeness_delta.abs().max()))
    assert deltas[0] / deltas[1] >= min_ratio and deltas[1] / deltas[2] >= min_ratio, deltas
    # and the baseline probability is the zero-ablation probability measured directly
    model_b = _prob_with_layer_set(
        model,
        model.to_tokens(PROMPTS[0]),
        2,
        torch.zeros(model.cfg.d_mlp, dtype=torch.float64),
        res.answer_ids[0].item(),
    )
    assert float(res.baseline_prob[0, 2]) == pytest.approx(model_b, rel=1e-9)


# ------------------------------------------------------------------------------------------------
# result object
# ------------------------------------------------------------------------------------------------


def test_result_object_views_and_frames():
    model = cached_model("gpt2", "native")
    res = attribute_neurons(model, PROMPTS, ANSWERS, steps=4, layers=[0, 2])
    assert isinstance(res, NeuronAttribution) and len(res) == 3
    assert torch.isnan(res.scores[:, 1]).all() and torch.isfinite(res.scores[:, [0, 2]]).all()
    assert torch.isnan(res.completeness_delta[:, 1]).all() and torch.isfinite(res.activations).all()
    full = attribute_neurons(model, PROMPTS, ANSWERS, steps=4)
    assert rel_diff(res.scores[:, [0, 2]], full.scores[:, [0, 2]]) <= 1e-12
    one = res[1]
    assert one.single and one.scores.shape == (3, model.cfg.d_mlp) and one.clean_prob.shape == (1,)
    assert torch.allclose(one.scores, res.scores[1], equal_nan=True)
    # top_k against torch.topk over finite entries
    s = res.scores[1].nan_to_num(nan=-math.inf).reshape(-1)
    vals, idx = torch.topk(s, 5)
    got = res.top_k(5, prompt=1)
    assert [n for n, _ in got] == [Neuron(int(i) // model.cfg.d_mlp, int(i) % model.cfg.d_mlp) for i in idx]
    assert [v for _, v in got] == pytest.approx(vals.tolist())
    df = res.to_dataframe()
    assert len(df) == 3 * 3 * model.cfg.d_mlp
    row = df[(df.prompt == 2) & (df.layer == 2) & (df.neuron == 11)].iloc[0]
    assert row.score == pytest.approx(float(res.scores[2, 2, 11])) and row.activation == pytest.approx(
        float(res.activations[2, 2, 11])
    )
    assert res.neurons(value=0.3) == select_neurons(res.scores, value=0.3)
    assert one.neurons() == select_neurons(res.scores[1])
    assert res.summary_dataframe().shape == (9, 5)


# ------------------------------------------------------------------------------------------------
# validation, hygiene, errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"method": "lrp"}, "method"),
        ({"rule": "simpson"}, "rule"),
        ({"site": "resid"}, "site"),
        ({"objective": "logit"}, "objective"),
        ({"steps": 0}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"multiply_by": "input"}, "multiply_by"),
        ({"layers": [5]}, "out of range"),
        ({"implementation": "magic"}, "implementation"),
        ({"method": "sig", "baseline": "zero"}, "masked"),
        ({"baseline": torch.zeros(7, dtype=torch.float64)}, "d_mlp"),
        ({"multi_token": "all"}, "multi_token"),
    ],
)
def test_invalid_arguments(kw, match):
    model = cached_model("gpt2", "native")
    with pytest.raises(InvalidInputError, match=match):
        attribute_neurons(model, PROMPTS[0], ANSWERS[0], **kw)


def test_model_checks():
    model = cached_model("gpt2", "native")
    with pytest.raises(UnsupportedModelError):
        attribute_neurons(nn.Linear(3, 3), "a", "b")
    with pytest.raises(InvalidInputError, match="one answer per prompt"):
        attribute_neurons(model, PROMPTS, ANSWERS[:2])
    model.train()
    try:
        with pytest.raises(InvalidInputError, match="eval"):
            attribute_neurons(model, PROMPTS[0], ANSWERS[0])
    finally:
        model.eval()


def test_overflow_raises_numerical_error():
    model = cached_model("gpt2", "native", torch.float32)
    huge = torch.full((model.cfg.d_mlp,), 3e38)
    with pytest.raises(NumericalError):
        attribute_neurons(model, PROMPTS[0], ANSWERS[0], baseline=huge, steps=2)


