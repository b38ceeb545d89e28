"""The stages of a run (consistency, query localization, editing) with their figures, the resume check, the
summary lines and the merge of sharded runs."""


from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qloc_tl.cli.facts import load_facts, model_from_spec, pararel_dir, versions
from qloc_tl.cli.parser import DEFAULTS, STAGES, run_settings
from qloc_tl.core.model import TLModel
from qloc_tl.core.store import atomic_save_figure, ensure_directory, remove_stale_temporaries

logger = logging.getLogger("qloc_tl.cli")


# --------------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------------


def _stage_consistency(model: TLModel, facts: list[Any], settings: dict[str, Any], out: Path, progress: bool) -> Any:
    from qloc_tl.experiments.consistency import ConsistencyConfig, run_consistency
    from qloc_tl.reporting.consistency_plots import (
        plot_cs_histogram,
        plot_relation_ki,
        plot_tau_sweep,
        plot_threshold_sweep,
    )

    cfg = ConsistencyConfig(
        methods=tuple(settings["methods"]), steps=settings["steps"], seed=settings["seed"],
        n_boot=200 if settings["quick"] else 1000, n_perm=200 if settings["quick"] else 2000,
    )  # fmt: skip
    res = run_consistency(
        model, facts, cfg, model_name=settings["model"], out_dir=out / "consistency", show_progress=progress,
        known_only=False,  # the facts were filtered when loaded (settings["known"])
    )  # fmt: skip
    from qloc_tl.core.store import atomic_write_table

    n_boot = 200 if settings["quick"] else 1000
    atomic_write_table(out / "consistency" / "consistency_tau_sweep", res.tau_sweep(n_boot=n_boot, seed=settings["seed"]))
    if not settings.get("figures", True):
        return res
    figs = out / "figures"
    ensure_directory(figs)
    for m in cfg.methods:
        plot_cs_histogram(res, m, path=figs / f"cs_hist_{m}.png")
    for kind in ("static", "otsu"):  # both splits: on a model where the static τ finds no K_I, Otsu's shows the tail
        plot_relation_ki(res, kind, path=figs / f"ki_per_relation_{kind}.png")
        plot_threshold_sweep(res, kind, path=figs / f"threshold_sweep_{kind}.png")
    plot_tau_sweep(res, path=figs / "tau_sweep.png", n_boot=n_boot, seed=settings["seed"])
    _heatmaps(model, facts, res, settings, figs)
    return res


def _heatmaps(model: TLModel, facts: list[Any], res: Any, settings: dict[str, Any], figs: Path) -> None:
    """Figure-1 heatmaps for the most consistent and the least consistent fact."""
    from qloc_tl.methods.attribution import attribute_neurons
    from qloc_tl.reporting.consistency_plots import plot_fact_heatmap

    df = res.facts[(res.facts["method"] == settings["methods"][0]) & res.facts["cs"].notna()]
    if df.empty:
        return
    by_key = {f.key: f for f in facts}
    picks = [("consistent", df.sort_values("cs", ascending=False).iloc[0]), ("inconsistent", df.sort_values("cs").iloc[0])]
    for label, row in picks:
        fact = by_key[row["fact_key"]]
        attribution = attribute_neurons(
            model, list(fact.prompts), [fact.answer] * len(fact.queries), method=settings["methods"][0],
            steps=settings["steps"],
        )  # fmt: skip
        plot_fact_heatmap(attribution, fact, path=figs / f"heatmap_{label}.png")


def _classes(res_cons: Any, settings: dict[str, Any]) -> dict[str, str] | None:
    """K_C / K_I of the first method under the run's split (``--split``; default Otsu)."""
    if res_cons is None:
        return None
    return res_cons.classes(settings["methods"][0], settings.get("split", "otsu"))


def _kn_sets(res_cons: Any, settings: dict[str, Any]) -> dict[str, list[Any]] | None:
    if res_cons is None:
        return None
    m = settings["methods"][0]
    return {key: sets for (meth, key), sets in res_cons.kn_sets.items() if meth == m}


def _stage_ql(model: TLModel, facts: list[Any], settings: dict[str, Any], out: Path, progress: bool, cons: Any) -> Any:
    from qloc_tl.experiments import query_localization as ql

    cfg = ql.QLConfig(
        kn_method=settings["methods"][0], kn_steps=settings["steps"], ks_steps=settings["steps"], seed=settings["seed"],
        n_bootstrap=200 if settings["quick"] else 1000,
    )  # fmt: skip
    res = ql.run_query_localization(
        model, facts, config=cfg, classes=_classes(cons, settings), kn_sets=_kn_sets(cons, settings),
        out_dir=out / "ql", show_progress=progress, known_only=False,
    )  # fmt: skip
    if not settings.get("figures", True):
        return res
    figs = out / "figures"
    ensure_directory(figs)
    try:
        _ql_figures(model, facts, res, settings, figs)
    except Exception as exc:  # figures are secondary; never lose the tables for them
        logger.warning("query-localization figures failed: %r", exc)
    return res


def _save_png(fig: Any, path: Path) -> None:
    """``fig`` as a PNG at ``path``, written atomically (a full disk leaves no truncated image)."""
    atomic_save_figure(fig, path, format="png", dpi=120, bbox_inches="tight")


def _figure(obj: Any) -> Any:
    """A matplotlib Figure from a plotting function's return value (a Figure or an Axes)."""
    return obj if hasattr(obj, "savefig") else obj.figure


def _ql_figures(model: TLModel, facts: list[Any], res: Any, settings: dict[str, Any], figs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qloc_tl.methods.synapses import find_synapses, synapse_patterns
    from qloc_tl.methods.tracing import causal_trace
    from qloc_tl.reporting.views import (
        plot_causal_trace,
        plot_dynamic,
        plot_mapping,
        save_html,
        synapse_heads_view,
    )

    for name, plot in (("ql_mapping", lambda: plot_mapping(res.mapping)), ("ql_dynamic", lambda: plot_dynamic(res.dynamic))):
        if name == "ql_dynamic" and res.dynamic.empty:
            continue
        fig = _figure(plot())
        _save_png(fig, figs / f"{name}.png")
        plt.close(fig)
    # one knowledge-synapse view and one causal trace, for the first fact of each class
    shown = 0
    for cls in ("K_I", "K_C"):
        fact = next((f for f in facts if res.classes.get(f.key) == cls), None)
        if fact is None:
            continue
        syn = find_synapses(model, fact.prompts[0], fact.answer, steps=settings["steps"])
        if syn.synapses:
            save_html(synapse_heads_view(syn, synapse_patterns(model, syn, max_heads=6)), figs / f"ks_heads_{cls}.html", title=f"{cls}: {fact.prompts[0]}")
            shown += 1
        tr = causal_trace(model, fact.prompts[0], fact.answer, subject=fact.subject, kinds=("resid",), samples=5)
        fig = _figure(plot_causal_trace(tr, "resid"))
        _save_png(fig, figs / f"causal_trace_{cls}.png")
        plt.close(fig)
    logger.info("wrote %d knowledge-synapse views", shown)


def _stage_edit(model: TLModel, facts: list[Any], settings: dict[str, Any], out: Path, progress: bool, cons: Any) -> Any:
    from qloc_tl.experiments import editing
    from qloc_tl.reporting.editing_plots import plot_editing

    cfg = editing.EditingConfig(
        attribution_method=settings["methods"][0], steps=settings["steps"], seed=settings["seed"],
        lambda2=settings.get("lambda2"),
    )  # fmt: skip
    if settings["model"] == "builtin":
        from qloc_tl.data.datasets import builtin_ppl_texts

        texts = builtin_ppl_texts()
        # a fixed, evenly spaced subset: PPL is evaluated once per edit, so its size sets the stage's cost
        texts = texts[:: (15 if settings["quick"] else 6)]
    else:
        from qloc_tl.data.datasets import generic_ppl_texts

        texts = generic_ppl_texts()[:: (4 if settings["quick"] else 3)]
    pool = None
    if settings["facts"] != "builtin":
        # o' (the update's new object) is drawn from the pool's objects of the fact's relation, and Locality
        # queries from the pool's other relations: with a few known facts per relation the run's own facts
        # are too few, so the pool is every ParaRel fact of the run's relations (Locality: any prompt's top-1
        # should survive an edit, known or not)
        from qloc_tl.data.facts import load_pararel

        path = pararel_dir(settings["facts"])
        rels = sorted({f.relation for f in facts})
        keys = {f.key for f in facts}
        pool = list(facts) + [f for f in load_pararel(path, relations=rels, min_queries=2).facts if f.key not in keys]
    attributions = None
    if cons is not None:
        # the consistency stage attributed every query of every fact with the same method, steps and site:
        # reuse its persisted scores (≥ 0.05 · max per query, zero below; the KN sets are exact, CAS sees the
        # small entries as zero) instead of attributing again
        from qloc_tl.core.model import d_mlp, n_layers

        m0, L, D = settings["methods"][0], n_layers(model), d_mlp(model)
        attributions = {f.key: cons.dense_scores(m0, f.key, len(f.queries), L, D).float() for f in facts}
    res = editing.run_editing_experiment(
        model, facts, config=cfg, classes=_classes(cons, settings), ppl_texts=texts, out_dir=out / "editing",
        show_progress=progress, known_only=False, unrelated_facts=pool, attributions=attributions,
    )  # fmt: skip
    if not settings.get("figures", True):
        return res
    figs = out / "figures"
    ensure_directory(figs)
    try:
        plot_editing(res, path=figs / "editing.png")
    except Exception as exc:
        logger.warning("editing figure failed: %r", exc)
    return res


def _check_resume(out: Path, settings: dict[str, Any], resume: bool) -> None:
    from qloc_tl.core.errors import InvalidInputError, ResumeMismatchError

    run_json = out / "run.json"
    if not run_json.is_file():
        if out.is_dir() and any(out.iterdir()) and not resume:
            raise InvalidInputError(f"--out {str(out)!r} is not empty; pass --resume to continue a run there, or pick another directory")
        return
    old = json.loads(run_json.read_text()).get("settings", {})
    # the shard, the method list (below) and whether figures are drawn do not change the tables
    keys = [k for k in settings if k not in ("shard", "methods", "figures") and old.get(k) != settings[k]]
    # another method list is an extension of the run when its first method (the one the QL and editing
    # stages use) is the same: the consistency stage adds the new methods' parts and reuses the others
    if old.get("methods") and old["methods"][0] != settings["methods"][0]:
        keys.append("methods")
    if keys:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in keys)
        raise ResumeMismatchError(f"{out} holds a run with other settings ({detail}); use another --out")
    if not resume:
        raise InvalidInputError(f"--out {str(out)!r} already holds a run; pass --resume to continue it, or pick another directory")


def _earlier_invocations(out: Path) -> list[dict[str, Any]]:
    """What ``run.json`` in ``out`` (a run being resumed) records of the invocations before this one, oldest
    first: when each started, its stages, whether it finished, and its total seconds (``None`` for one that was
    killed: a run records its time only when it finishes). Empty for a new run."""
    run_json = out / "run.json"
    if not run_json.is_file():
        return []
    old = json.loads(run_json.read_text())
    if "started" not in old:  # written by merge or another tool: no invocation of its own
        return list(old.get("earlier_invocations", []))
    total = old.get("timings_s", {}).get("total") if old.get("status") == "finished" else None
    last = {"started": old["started"], "stages": old.get("stages", []), "status": old.get("status", "?"), "total_s": total}
    return [*old.get("earlier_invocations", []), last]


def execute(args: argparse.Namespace, stages: Sequence[str]) -> dict[str, Any]:
    """Run ``stages`` with the parsed arguments; returns the results by stage (plus timings)."""
    import torch

    from qloc_tl.core.store import atomic_write_text
    from qloc_tl.reporting.report import write_report

    settings = run_settings(args)
    kind = "builtin" if settings["model"] == "builtin" else "pretrained"
    torch.set_num_threads(getattr(args, "threads", None) or DEFAULTS[kind]["threads"])
    out = Path(args.out)
    _check_resume(out, settings, args.resume)
    ensure_directory(out)
    remove_stale_temporaries(out)  # left by a killed run's interrupted writes
    progress = not args.no_progress
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    run_info: dict[str, Any] = {"settings": settings, "versions": versions(), "stages": list(stages), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    earlier = _earlier_invocations(out)
    if earlier:
        run_info["earlier_invocations"] = earlier
    atomic_write_text(out / "run.json", json.dumps({**run_info, "status": "running"}, indent=2))
    t = time.perf_counter()
    model = model_from_spec(settings["model"], settings["device"])
    facts = load_facts(settings, model, out, progress)
    timings["load"] = time.perf_counter() - t
    logger.info("model %s, %d facts", settings["model"], len(facts))
    results: dict[str, Any] = {}
    cons = None
    if "consistency" in stages or "ql" in stages or "edit" in stages:
        t = time.perf_counter()
        cons = _stage_consistency(model, facts, settings, out, progress)
        results["consistency"] = cons
        timings["consistency"] = time.perf_counter() - t
    if "ql" in stages:
        t = time.perf_counter()
        results["ql"] = _stage_ql(model, facts, settings, out, progress, cons)
        timings["ql"] = time.perf_counter() - t
    if "edit" in stages:
        t = time.perf_counter()
        results["edit"] = _stage_edit(model, facts, settings, out, progress, cons)
        timings["edit"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    info = {**run_info, "status": "finished", "n_facts": len(facts), "timings_s": {k: round(v, 2) for k, v in timings.items()}}
    atomic_write_text(out / "run.json", json.dumps(info, indent=2))
    write_report(out, min_facts=getattr(args, "min_facts", None))
    results["timings"] = timings
    return results


def summary_lines(out: Path, min_facts: int | None = None) -> list[str]:
    """The lines printed at the end of a command: facts, model, methods and time, then each claim's verdict and the report's path."""
    from qloc_tl.reporting.claims import claim_verdicts

    info = json.loads((out / "run.json").read_text())
    lines = [
        f"qloc-tl: {info['n_facts']} facts, model {info['settings']['model']}, methods {','.join(info['settings']['methods'])}, "
        f"{info['timings_s']['total']:.0f} s",
    ]
    for claim, verdict in claim_verdicts(out, min_facts=min_facts):
        lines.append(f"  [{verdict['status']:>13}] {claim}: {verdict['evidence']}")
    lines.append(f"  report: {out / 'report.html'}")
    return lines


def merge(out: Path, shards: Sequence[str]) -> dict[str, Any]:
    """Copy every shard's persisted parts into ``out`` (after checking the shards ran the same settings), then
    finish the run there: nothing is recomputed, the tables cover all facts, and the report is written."""
    from qloc_tl.core.errors import InvalidInputError

    infos = []
    for s in shards:
        p = Path(s) / "run.json"
        if not p.is_file():
            raise InvalidInputError(f"{s!r} is not a qloc-tl output directory (no run.json)")
        infos.append(json.loads(p.read_text()))
    base = {k: v for k, v in infos[0]["settings"].items() if k != "shard"}
    for s, info in zip(shards, infos):
        other = {k: v for k, v in info["settings"].items() if k != "shard"}
        if other != base:
            raise InvalidInputError(f"shard {s!r} ran with other settings than {shards[0]!r}; cannot merge")
        if info.get("status") != "finished":
            raise InvalidInputError(f"shard {s!r} has not finished (status {info.get('status')!r}); rerun it with --resume first")
    shard_ids = sorted(tuple(i["settings"]["shard"] or (0, 1)) for i in infos)
    n = shard_ids[0][1]
    if [i for i, _ in shard_ids] != list(range(n)):
        raise InvalidInputError(f"shards {shard_ids} do not cover 0..{n - 1} of {n}")
    # Copy a stage's persisted parts only when every shard ran it with the same configuration. Consistency
    # (the attribution, the dominant cost) qualifies; the QL and editing stages take inputs that depend on the
    # whole fact set (the Otsu K_C/K_I split, unrelated-fact sampling), so they are recomputed here, which
    # keeps the merged tables identical to an unsharded run.
    stage_names = sorted({d.name for s in shards for d in Path(s).iterdir() if (d / "parts").is_dir()})
    for name in stage_names:
        cfgs = [(Path(s) / name / "config.json") for s in shards]
        texts = [c.read_text() if c.is_file() else None for c in cfgs]
        if None in texts or len(set(texts)) != 1:
            logger.info("stage %s: shard configurations differ; recomputing it in the merged run", name)
            continue
        dest = out / name
        ensure_directory(dest)
        if (dest / "config.json").is_file() and (dest / "config.json").read_text() != texts[0]:
            raise InvalidInputError(f"{dest} was written with another configuration than the shards' {name} stage")
        shutil.copy2(cfgs[0], dest / "config.json")
        for s in shards:
            shutil.copytree(Path(s) / name / "parts", dest / "parts", dirs_exist_ok=True)
    args = argparse.Namespace(**{**base, "shard": None, "out": str(out), "resume": True, "no_progress": True, "verbose": False,
                                 "no_figures": not base.get("figures", True)})
    args.relations = base["relations"]
    args.max_facts = base["max_facts"]
    return execute(args, infos[0].get("stages", list(STAGES)))
