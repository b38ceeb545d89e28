"""The bad-input table (docs/failure_modes.md lists the same cases with their messages).

Each case calls the public API (or the CLI) with one bad value and asserts a typed qloc_tl exception whose
message names the problem; none may surface as a raw error from deep inside torch or TransformerLens.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import qloc_tl as q
from qloc_tl.core import errors as E
from qloc_tl.core.model import tl_major
from qloc_tl.core.tokens import answer_token_id
from qloc_tl.methods.consistency_score import cs_threshold
from qloc_tl.zoo.tiny import tiny_model

TL_MAJOR = tl_major()  # not from conftest: this file also runs as a script (the docs table)
MODEL = None


def model():
    global MODEL
    if MODEL is None:
        MODEL = tiny_model("gpt2")
    return MODEL


@dataclass(frozen=True)
class Case:
    id: str
    what: str
    call: Callable[[Path], object]
    exc: type[BaseException]
    match: str


def _attr(**kw):
    from qloc_tl.methods.attribution import attribute_neurons

    return lambda tmp: attribute_neurons(model(), kw.pop("prompt", "alice was born in"), kw.pop("answer", "paris"), **kw)


def _no_tokenizer(tmp):
    from qloc_tl.methods.attribution import attribute_neurons

    m = tiny_model("gpt2")
    m.tokenizer = None
    return attribute_neurons(m, "alice was born in", 5)


def _train_mode(tmp):
    from qloc_tl.methods.attribution import attribute_neurons

    m = tiny_model("gpt2")
    m.train()
    return attribute_neurons(m, "alice was born in", "paris")


def _fp16_overflow(tmp):
    from qloc_tl.methods.attribution import attribute_neurons

    m = tiny_model("gpt2", dtype=torch.float16)
    with torch.no_grad():
        m.blocks[0].mlp.W_out.fill_(6.0e4)  # any non-zero activation sums past the fp16 maximum
    return attribute_neurons(m, "alice was born in", "paris", steps=2)


def _ignoring_backend(tmp):
    if TL_MAJOR >= 4:  # TL 4 boot_native discards attn-score edits
        m = tiny_model("llama", source="native")
        hooks = q.scale_attention([q.Head(0, 0)], 0.0, target="scores")
    else:  # TL 3.9's native bridge discards pattern edits
        from transformer_lens.model_bridge import TransformerBridge

        try:
            m = TransformerBridge.boot_native(dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=16, act_fn="gelu"))
        except Exception:
            pytest.skip("TL 3 native bridge not constructible here")
        m.eval()
        hooks = q.scale_attention([q.Head(0, 0)], 0.0)
    with q.intervene(m, hooks):
        m(torch.tensor([[1, 2, 3]]))


def _pararel(tmp, patterns=None, facts=None):
    root = tmp / "pararel"
    (root / "pattern_data/graphs_json").mkdir(parents=True)
    (root / "trex_lms_vocab").mkdir()
    (root / "pattern_data/graphs_json/P1.jsonl").write_text(patterns if patterns is not None else '{"pattern": "[X] plays [Y]."}\n')
    (root / "trex_lms_vocab/P1.jsonl").write_text(facts if facts is not None else '{"sub_label": "bob", "obj_label": "piano"}\n')
    return root


def _resume_other_config(tmp):
    from qloc_tl.core.store import RunStore

    RunStore.open(tmp / "run", {"method": "ig", "steps": 20})
    RunStore.open(tmp / "run", {"method": "ig", "steps": 10})


def _cli(argv):
    def call(tmp):
        from qloc_tl.cli import main

        rc = main(argv(tmp) if callable(argv) else argv)
        if rc:
            raise SystemExit(rc)

    return call


def _cli_resume_mismatch(tmp):
    out = tmp / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"settings": {"model": "builtin", "steps": 3}}))
    return ["run", "--out", str(out), "--resume"]


FACT = q.Fact("alice", "P19", "paris", ["alice was born in", "alice is from"])

CASES = [
    Case("template-no-x", "template without [X]", lambda t: q.Template("was born in [Y]."), E.InvalidInputError, r"\[X\] exactly once"),
    Case("template-no-y", "template without [Y]", lambda t: q.Template("[X] was born."), E.InvalidInputError, r"\[Y\] exactly once"),
    Case("template-y-not-final", "[Y] not final", lambda t: q.Template("[Y] is where [X] was born."), E.InvalidInputError, r"does not end with \[Y\]"),
    Case("answer-multi-token", "object of several tokens (error mode)", lambda t: answer_token_id(model(), "alice was born in", "paris london"), E.InvalidInputError, "2 tokens.*multi_token='first'"),
    Case("answer-oov", "object not in the vocabulary", lambda t: answer_token_id(model(), "alice was born in", "zanzibar"), E.InvalidInputError, "not in the model's vocabulary"),
    Case("fact-no-queries", "empty neighbor set", lambda t: q.Fact("alice", "P19", "paris", []), E.InvalidInputError, "has no queries"),
    Case("fact-one-query", "one-query neighbor set in the consistency runner", lambda t: __import__("qloc_tl.experiments.consistency", fromlist=["x"]).run_consistency(model(), [q.Fact("alice", "P19", "paris", ["alice was born in"])], known_only=False), E.InvalidInputError, "at least 2 are needed"),
    Case("prompt-too-long", "prompt longer than n_ctx", _attr(prompt=" ".join(["the"] * 40)), E.InvalidInputError, "longer than the model's context n_ctx=32"),
    Case("prompt-empty", "empty prompt", _attr(prompt="   "), E.InvalidInputError, "empty prompt"),
    Case("layer-range", "layer index out of range", lambda t: q.scale_neurons([q.Neuron(9, 0)], 0.0, model=model()), E.InvalidInputError, "out of range: the model has layers 0..2"),
    Case("neuron-range", "neuron index out of range", lambda t: q.scale_neurons([q.Neuron(0, 999)], 0.0, model=model()), E.InvalidInputError, "out of range: d_mlp=128"),
    Case("neuron-negative", "negative neuron index", lambda t: q.Neuron(0, -1), E.InvalidInputError, "must be >= 0"),
    Case("head-range", "head index out of range", lambda t: q.scale_attention([q.Head(0, 4)], 0.0, model=model()), E.InvalidInputError, "4 query heads"),
    Case("head-gqa", "GQA: a key/value-head count is not the head range", lambda t: q.scale_attention([q.Head(0, 3)], 0.0, model=tiny_model("llama")) and q.scale_attention([q.Head(0, 4)], 0.0, model=tiny_model("llama")), E.InvalidInputError, "query heads per layer.*GQA"),
    Case("site-unknown", "unknown neuron site", lambda t: q.scale_neurons([q.Neuron(0, 1)], 0.0, site="mid"), E.InvalidInputError, "unknown neuron site 'mid'"),
    Case("site-missing", "site a model lacks (pre_linear on a non-gated MLP)", lambda t: q.neuron_hook_name(model(), 0, "pre_linear"), E.UnsupportedModelError, "hook_pre_linear exists only on gated MLPs"),
    Case("method-unknown", "unknown attribution method", _attr(method="lrp"), E.InvalidInputError, "method must be one of"),
    Case("rule-unknown", "unknown quadrature rule", _attr(rule="simpson"), E.InvalidInputError, "rule must be one of"),
    Case("threshold-unknown", "unknown threshold kind", lambda t: __import__("qloc_tl.methods.attribution", fromlist=["x"]).select_neurons(torch.zeros(2, 3), method="median"), E.InvalidInputError, "unknown selection method 'median'"),
    Case("cs-threshold-unknown", "unknown CS threshold kind", lambda t: cs_threshold([0.1], "median"), E.InvalidInputError, "threshold kind must be"),
    Case("steps-zero", "steps <= 0", _attr(steps=0), E.InvalidInputError, "steps must be a positive int, got 0"),
    Case("batch-zero", "batch size <= 0", _attr(batch_size=0), E.InvalidInputError, "batch_size must be a positive int"),
    Case("no-tokenizer", "model without a tokenizer given strings", _no_tokenizer, E.InvalidInputError, "no tokenizer"),
    Case("non-tl-module", "a non-TL nn.Module", lambda t: q.capabilities(torch.nn.Linear(2, 2)), E.UnsupportedModelError, "expected a TransformerLens model"),
    Case("train-mode", "a model in train mode", _train_mode, E.InvalidInputError, r"call model.eval\(\)"),
    Case("backend-ignores-edits", "a backend that ignores attention edits", _ignoring_backend, E.CapabilityError, "ignores edits to attn"),
    Case("fp16-overflow", "fp16 activations overflowing to inf/NaN during IG", _fp16_overflow, E.NumericalError, "inf|NaN|finite"),
    Case("pararel-missing", "ParaRel directory missing", lambda t: q.load_pararel(t / "nope"), E.DataError, "does not exist"),
    Case("pararel-layout", "ParaRel directory without the expected folders", lambda t: q.load_pararel(t), E.DataError, "not a ParaRel directory"),
    Case("pararel-malformed", "malformed ParaRel JSON line", lambda t: q.load_pararel(_pararel(t, facts='{"sub_label": "bob"\n')), E.DataError, "malformed JSON"),
    Case("pararel-field", "ParaRel fact without obj_label", lambda t: q.load_pararel(_pararel(t, facts='{"sub_label": "bob"}\n')), E.DataError, "lacks 'obj_label'"),
    Case("relation-unknown", "unknown relation id", lambda t: q.load_pararel(relations=["P0"]), E.InvalidInputError, "unknown relation"),
    Case("resume-other-config", "results directory written by another config", _resume_other_config, E.ResumeMismatchError, r"steps: 20 -> 10"),
    Case("empty-neurons", "empty neuron list", lambda t: q.scale_neurons([], 0.0), E.InvalidInputError, "empty neuron list"),
    Case("answers-mismatch", "number of answers != number of prompts", _attr(prompt=["alice was born in", "bob plays"], answer=["paris"]), E.InvalidInputError, "2 prompts but 1 answers"),
    Case("hook-not-fired", "a hook that never fired", lambda t: q.intervene(model(), q.scale_neurons([q.Neuron(0, 1)], 0.0)).__enter__() and None, E.HookNotFiredError, "never ran"),
    Case("cli-bad-method", "CLI: unknown method", _cli(["run", "--methods", "lrp"]), SystemExit, "2"),
    Case("cli-resume-mismatch", "CLI: --resume into a run with other settings", _cli(_cli_resume_mismatch), SystemExit, "2"),
]


def _hook_not_fired(tmp):
    with q.intervene(model(), q.scale_neurons([q.Neuron(0, 1)], 0.0)):
        pass


CASES = [c if c.id != "hook-not-fired" else Case(c.id, c.what, _hook_not_fired, c.exc, c.match) for c in CASES]


def test_table_is_large_and_ids_unique():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, capsys):
    with pytest.raises(case.exc) as info:
        case.call(tmp_path)
    if case.exc is SystemExit:
        assert str(info.value.code) == case.match
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error:" in err[0], err
    else:
        import re

        assert re.search(case.match, str(info.value)), str(info.value)
        assert isinstance(info.value, E.QlocError)
        # the error is raised by qloc_tl, not deep inside torch / TransformerLens
        tb = info.traceback
        assert "qloc_tl" in str(tb[-1].path), f"raised from {tb[-1].path}"


def test_docs_list_every_case():
    page = (Path(__file__).resolve().parents[2] / "docs" / "failure_modes.md").read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in page]
    assert not missing, f"docs/failure_modes.md lacks {missing}; regenerate with python tests/integration/test_bad_inputs.py"


def _markdown() -> str:  # pragma: no cover - doc generator
    import tempfile

    rows = ["| case | bad input | exception | message |", "| --- | --- | --- | --- |"]
    for c in CASES:
        with tempfile.TemporaryDirectory() as d:
            try:
                c.call(Path(d))
                msg, exc = "(no error!)", "-"
            except SystemExit as e:
                msg, exc = f"one line on stderr, exit status {e.code}", "SystemExit"
            except Exception as e:  # noqa: BLE001
                msg, exc = str(e).replace("|", "\\|").replace("\n", " "), type(e).__name__
        rows.append(f"| `{c.id}` | {c.what} | `{exc}` | {msg} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    print(_markdown())
