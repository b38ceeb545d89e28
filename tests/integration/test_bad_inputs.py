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


def _nan_model():
    m = tiny_model("gpt2")
    with torch.no_grad():
        m.blocks[1].mlp.W_in.fill_(float("inf"))  # layer 1's neurons become inf/NaN, layer 0 stays finite
    return m


def _nonfinite_logits(tmp):
    from qloc_tl.methods.known import next_token_probs

    return next_token_probs(_nan_model(), ["alice was born in"])


def _disk_full(tmp):
    import errno
    from unittest import mock

    from qloc_tl.core.store import RunStore

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with mock.patch("qloc_tl.core.store.os.fsync", full):
        RunStore.open(tmp / "run", {"steps": 2})


def _out_of_memory(tmp):
    from unittest import mock

    from qloc_tl.methods.attribution import attribute_neurons
    from qloc_tl.methods.attribution.engines import dispatch

    real = dispatch.make_engine

    def make(*a, **k):  # every pass runs out of memory, however small
        engine = real(*a, **k)

        def evaluate(*a, **k):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 2147483648 bytes (simulated)")

        engine.evaluate = evaluate
        return engine

    with mock.patch.object(dispatch, "make_engine", make):
        attribute_neurons(model(), "alice was born in", "paris", steps=2)


def _nonfinite_clean_activations(tmp):
    from qloc_tl.methods.attribution import attribute_neurons

    return attribute_neurons(_nan_model(), "alice was born in", "paris", steps=2)


def _figure_disk_full(tmp):
    import errno
    from unittest import mock

    import pandas as pd

    from qloc_tl.methods.completeness import plot_path_probabilities

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    curves = pd.DataFrame({"layer": [0, 0], "alpha": [0.0, 1.0], "prob": [0.1, 0.5]})
    with mock.patch("qloc_tl.core.store.os.fsync", full):
        plot_path_probabilities(curves, path=tmp / "curves.png")


def _out_is_a_file(tmp):
    (tmp / "taken").write_text("x")
    return ["consistency", "--model", "builtin", "--out", str(tmp / "taken"), "--no-progress"]


def _mapping_no_facts(tmp):
    from qloc_tl.experiments.mapping import measure_query_kn_mapping

    return measure_query_kn_mapping(model(), [], {})


def _edit_metrics(**kw):
    from qloc_tl.methods.edit_metrics import edit_metrics

    args = dict(edited_before=torch.zeros(96), edited_after=torch.zeros(96), neighbors_before=None, neighbors_after=None,
                unrelated_before=None, unrelated_after=None, old_token=3)  # fmt: skip
    return lambda tmp: edit_metrics("erase", **{**args, **kw})


NEW_CASES = [
    # non-finite numbers
    Case("factor-nan", "NaN factor of a neuron intervention", lambda t: q.scale_neurons([q.Neuron(0, 1)], float("nan")), E.InvalidInputError, "factor must be a finite number"),
    Case("factor-tensor-inf", "factor tensor holding inf", lambda t: q.set_neurons([q.Neuron(0, 1)], torch.tensor([float("inf")])), E.InvalidInputError, "values contains inf/NaN"),
    Case("attention-factor-nan", "NaN attention factor", lambda t: q.scale_attention([q.Head(0, 1)], float("nan")), E.InvalidInputError, "factor must be a finite number"),
    Case("topk-cas-value-nan", "NaN top-k CAS value in the editing config", lambda t: __import__("qloc_tl.experiments.editing", fromlist=["x"]).EditingConfig(cas_method="topk", cas_value=float("nan")), E.InvalidInputError, "cas_value must be a finite number"),
    Case("trace-noise-nan", "NaN noise tensor of a causal-trace restoration", lambda t: __import__("qloc_tl.methods.tracing", fromlist=["x"]).restore_states(model(), torch.tensor([[0, 3, 4]]), 5, [[]], noise=torch.full((1, 1, 64), float("nan")), subject_positions=[1]), E.InvalidInputError, "noise contains inf/NaN"),
    Case("logits-nan", "logits holding NaN given to edit_metrics", _edit_metrics(edited_after=torch.full((96,), float("nan"))), E.InvalidInputError, "edited_after contains inf/NaN"),
    Case("nonfinite-activations", "a model whose activations overflow to inf/NaN", _nonfinite_logits, E.NumericalError, r"first non-finite activations are at 'blocks\.1\.mlp\.hook_post'"),
    # numbers outside their range
    Case("fraction-above-1", "fraction_of_max threshold above 1", lambda t: __import__("qloc_tl.methods.attribution", fromlist=["x"]).select_neurons(torch.rand(2, 3), value=1.5), E.InvalidInputError, r"fraction_of_max value must lie in \[0, 1\]"),
    Case("cs-value-out-of-range", "a Consistency Score outside [0, 1]", lambda t: __import__("qloc_tl.methods.consistency_score", fromlist=["x"]).split_facts([0.2, 5.0]), E.InvalidInputError, r"CS values must lie in \[0, 1\]"),
    Case("ci-level-out-of-range", "confidence level outside (0, 1)", lambda t: __import__("qloc_tl.core.stats", fromlist=["x"]).bootstrap_proportion_ci([True, False], level=1.5), E.InvalidInputError, r"level must be a number in \(0.0, 1.0\)"),
    Case("permutations-negative", "a negative number of permutations", lambda t: __import__("qloc_tl.core.stats", fromlist=["x"]).permutation_p(torch.ones(2).numpy(), torch.zeros(2).numpy(), -1, 0), E.InvalidInputError, "n_perm must be an int >= 1"),
    Case("seed-negative", "a negative seed in a config", lambda t: __import__("qloc_tl.experiments.consistency", fromlist=["x"]).ConsistencyConfig(seed=-1), E.InvalidInputError, "seed must be an int >= 0"),
    Case("token-id-out-of-range", "an answer token id outside the vocabulary of the logits", _edit_metrics(old_token=500), E.InvalidInputError, r"old_token must be an int in \[0, 95\]"),
    Case("batch-size-zero-logprobs", "batch_size 0 for last-token log-probs", lambda t: __import__("qloc_tl.methods.edit_metrics", fromlist=["x"]).last_token_logprobs(model(), ["alice was born in"], batch_size=0), E.InvalidInputError, "batch_size must be an int >= 1"),
    Case("position-beyond-context", "an intervention position beyond the model's context", lambda t: q.scale_neurons([q.Neuron(0, 1)], 0.0, positions=99, model=model()), E.InvalidInputError, "out of range for the model's context n_ctx=32"),
    Case("trace-window-zero", "a causal-trace window of 0 layers", lambda t: __import__("qloc_tl.methods.tracing", fromlist=["x"]).trace_window(1, 0, 3), E.InvalidInputError, "window must be an int >= 1"),
    # tensors of the wrong dtype or rank
    Case("tokens-float", "a float token tensor", _attr(prompt=torch.tensor([1.0, 2.0, 3.0]), answer=5), E.InvalidInputError, "token tensors must hold integer token ids, got dtype torch.float32"),
    Case("tokens-bool", "a bool token tensor in a list of prompts", lambda t: __import__("qloc_tl.core.tokens", fromlist=["x"]).tokenize_prompts(model(), [torch.ones(3, dtype=torch.bool)]), E.InvalidInputError, "token tensors must hold integer token ids, got dtype torch.bool"),
    Case("factor-tensor-int", "an integer factor tensor", lambda t: q.scale_neurons([q.Neuron(0, 1)], torch.tensor([2])), E.InvalidInputError, "factor must be a floating-point tensor"),
    Case("row-positions-float", "float row_positions", lambda t: q.scale_neurons([q.Neuron(0, 1)], 0.0, row_positions=torch.tensor([0.5])), E.InvalidInputError, "row_positions must be an integer tensor"),
    Case("scores-bool", "a bool score tensor for neuron selection", lambda t: __import__("qloc_tl.methods.attribution", fromlist=["x"]).select_neurons(torch.ones(2, 3, dtype=torch.bool)), E.InvalidInputError, r"scores must be a real \(integer or floating-point\) tensor"),
    Case("erase-value-int", "an integer erase vector", lambda t: __import__("qloc_tl.core.edits", fromlist=["x"]).apply_erase(model(), [q.Neuron(0, 1)], value=torch.zeros(64, dtype=torch.long)), E.InvalidInputError, "erase value must be a floating-point tensor"),
    Case("update-embedding-width", "update embeddings of another width than the value rows", lambda t: __import__("qloc_tl.core.edits", fromlist=["x"]).update_rows(torch.rand(1, 4), torch.rand(3), torch.rand(4)), E.InvalidInputError, "e_old has 3 entries for value rows of width 4"),
    Case("run-inputs-float-2d", "float 2-D inputs to run_with_interventions", lambda t: q.run_with_interventions(model(), torch.ones(1, 3), q.scale_neurons([q.Neuron(0, 1)], 0.0)), E.InvalidInputError, "inputs must be a 3-D tensor"),
    Case("model-dtype-int", "an integer model dtype", lambda t: q.zoo.load_model("builtin", dtype=torch.int64), E.InvalidInputError, "dtype must be one of torch.float32"),
    # empty collections
    Case("trace-kinds-empty", "no kinds to trace", lambda t: __import__("qloc_tl.methods.tracing", fromlist=["x"]).causal_trace(model(), "alice was born in", "paris", subject="alice", kinds=()), E.InvalidInputError, "kinds is empty"),
    Case("record-layers-empty", "no layers to record", lambda t: q.record_neurons([], {}), E.InvalidInputError, "layers is empty"),
    Case("head-list-empty", "empty head list", lambda t: q.scale_attention([], 0.0), E.InvalidInputError, "empty head list"),
    Case("relations-empty", "an empty relation filter", lambda t: q.load_pararel(relations=[]), E.InvalidInputError, "relations is empty"),
    Case("mapping-facts-empty", "no facts for the Query-KN mapping", _mapping_no_facts, E.InvalidInputError, "facts is empty"),
    Case("completeness-steps-empty", "no step counts for the completeness check", lambda t: __import__("qloc_tl.methods.completeness", fromlist=["x"]).completeness_by_layer(model(), ["alice was born in"], ["paris"], steps=()), E.InvalidInputError, "steps is empty"),
    Case("bootstrap-ratios-empty", "no statistic to bootstrap", lambda t: __import__("qloc_tl.core.stats", fromlist=["x"]).bootstrap_summary(__import__("pandas").DataFrame({"fact_key": ["a"]}), ratios={}), E.InvalidInputError, "ratios is empty"),
    # resources and computed numbers
    Case("out-of-memory", "out of memory even at one prompt and one sample per pass", _out_of_memory, E.ResourceError, r"samples per pass down to 1 .*shorten the prompt"),
    Case("nonfinite-clean-activations", "clean activations holding inf/NaN", _nonfinite_clean_activations, E.NumericalError, r"clean activations became inf/NaN at layer 1 \('blocks\.1\.mlp\.hook_post'"),
    # output directory
    Case("output-disk-full", "a full disk while writing a run directory", _disk_full, E.OutputError, "no space left on device.*no half-written"),
    Case("cli-out-is-a-file", "CLI: --out names an existing file", _cli(_out_is_a_file), SystemExit, "2"),
    Case("figure-disk-full", "a full disk while a figure is saved (path=)", _figure_disk_full, E.OutputError, "no space left on device.*no half-written"),
]
CASES = CASES + NEW_CASES


def _hook_not_fired(tmp):
    with q.intervene(model(), q.scale_neurons([q.Neuron(0, 1)], 0.0)):
        pass


CASES = [c if c.id != "hook-not-fired" else Case(c.id, c.what, _hook_not_fired, c.exc, c.match) for c in CASES]


def test_table_is_large_and_ids_unique():
    assert len(CASES) >= 70
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


def test_docs_list_every_error_class():
    page = (Path(__file__).resolve().parents[2] / "docs" / "failure_modes.md").read_text()
    assert not [name for name in E.__all__ if f"| `{name}` |" not in page and name != "QlocError"]


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


def _write_docs(path: Path) -> None:  # pragma: no cover - doc generator
    """Replace the table of ``path`` (from its header row to the next blank line) by a fresh one."""
    lines = path.read_text().splitlines()
    start = lines.index("| case | bad input | exception | message |")
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())
    path.write_text("\n".join([*lines[:start], _markdown(), *lines[end:]]) + "\n")


if __name__ == "__main__":  # pragma: no cover
    import sys

    if "--write" in sys.argv:  # python tests/integration/test_bad_inputs.py --write
        _write_docs(Path(__file__).resolve().parents[2] / "docs" / "failure_modes.md")
    else:
        print(_markdown())
