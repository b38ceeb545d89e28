"""Metrics of a knowledge edit: Reliability, Generalization, Locality, perplexity and probability changes.

All metrics read the next-token prediction at each query's last position (:func:`last_token_logprobs`);
o is the old object, o' the new one, q_i the edited query, q_j (j ≠ i) its neighbors:

* Reliability — erase: ``1[argmax_after(q_i) ≠ o]``; update: ``1[argmax_after(q_i) = o']``.
* Generalization — the same criterion averaged over the neighbors. For erase only the neighbors that
  predicted o *before* the edit count (an unknown neighbor would succeed trivially); ``nan`` when none did.
  For update every neighbor counts.
* Locality — the fraction of unrelated queries whose top-1 prediction is unchanged.
* Avg = (Rel + Gen + Loc) / 3.
* PPL = exp(Σ token NLL / #tokens) over a fixed held-out text set (every token after BOS is predicted;
  :func:`perplexity`); ΔPPL = PPL_after − PPL_before, relative ΔPPL = ΔPPL / PPL_before. To score many edits
  on the same texts, tokenise them once (:func:`text_batches`) and call :func:`batch_perplexity` per edit.
* Also reported: the probability change of o (and o') on the edited query and on the neighbors.

:func:`edit_metrics` computes all of them from before/after logits of one edit into an :class:`EditMetrics`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.model import TLModel
from qloc_tl.core.tokens import tokenize_prompts
from qloc_tl.core.validation import check_int, check_tensor, require_finite_logits

__all__ = [
    "last_token_logprobs",
    "text_batches",
    "batch_perplexity",
    "perplexity",
    "EditMetrics",
    "edit_metrics",
]

TokenBatch = tuple[Tensor, Tensor]
"""Right-padded tokens ``[B, P]`` and each row's last real position ``[B]`` (from ``tokenize_prompts``)."""


def last_token_logprobs(
    model: TLModel, prompts: Sequence[str] | Sequence[Tensor], *, batch_size: int = 32
) -> Float[Tensor, "n d_vocab"]:
    """Next-token log-probabilities at each prompt's last token (right-padded batches; float32, CPU); ``[0,
    d_vocab]`` for no prompts (a fact without neighbors or unrelated queries has none to score)."""
    check_int("batch_size", batch_size, 1)
    out = []
    items: list[Any] = list(prompts)
    for s in range(0, len(items), batch_size):
        toks, last = tokenize_prompts(model, items[s : s + batch_size])
        with torch.no_grad():
            logits = model(toks)
        require_finite_logits(model, logits, toks)
        rows = logits[torch.arange(len(last), device=logits.device), last]
        out.append(rows.float().log_softmax(-1).cpu())
    if not out:
        return torch.zeros(0, int(model.cfg.d_vocab))
    return torch.cat(out)


def text_batches(model: TLModel, texts: Sequence[str], *, batch_size: int = 32) -> list[TokenBatch]:
    """Right-padded token batches of ``texts`` (sorted by length, so little padding), to be scored many times
    by :func:`batch_perplexity` without tokenising again.

    Examples:
        >>> from qloc_tl.zoo.tiny import tiny_model
        >>> batches = text_batches(tiny_model(), ["the cat is red", "bob speaks", "alice was born in paris"], batch_size=2)
        >>> [toks.shape[0] for toks, _ in batches]
        [2, 1]
    """
    check_int("batch_size", batch_size, 1)
    texts = sorted(texts, key=lambda t: len(t.split()))
    return [tokenize_prompts(model, texts[s : s + batch_size]) for s in range(0, len(texts), batch_size)]


def _nll_sum(model: TLModel, batches: Sequence[TokenBatch]) -> tuple[float, int]:
    """Σ next-token NLL over the real tokens of ``batches`` (every token after the first) and their count."""
    total, count = 0.0, 0
    for toks, last in batches:
        with torch.no_grad():
            full = model(toks)
        require_finite_logits(model, full, toks)
        logits = full[:, :-1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        tgt = toks[:, 1:]  # position p predicts token p + 1
        nll = logits.logsumexp(-1) - logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # [B, P-1]
        mask = torch.arange(tgt.shape[1], device=tgt.device).unsqueeze(0) < last.unsqueeze(1)
        total += float(nll[mask].double().sum())
        count += int(mask.sum())
    return total, count


def batch_perplexity(model: TLModel, batches: Sequence[TokenBatch]) -> float:
    """PPL = exp(Σ NLL / #tokens) over pre-tokenised ``batches`` (:func:`text_batches`); see :func:`perplexity`.
    A mean NLL beyond ``exp``'s range (a wrecked model) gives ``inf``."""
    total, count = _nll_sum(model, batches)
    if count == 0:
        raise InvalidInputError(
            "the texts have no token to predict (each needs at least two tokens incl. BOS)"
        )
    try:
        return math.exp(total / count)
    except OverflowError:
        return math.inf


def perplexity(model: TLModel, texts: Sequence[str], *, batch_size: int = 32) -> float:
    """PPL = exp(Σ NLL / #tokens) over ``texts``, every token after the first (BOS when the model prepends
    one) predicted from its prefix; token-weighted across texts.

    Examples:
        >>> from qloc_tl.zoo.tiny import tiny_model
        >>> p = perplexity(tiny_model(), ["the cat is red", "alice was born in paris"])
        >>> 1.0 < p < 96 * 4
        True
    """
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise InvalidInputError("perplexity needs at least one text")
    return batch_perplexity(model, text_batches(model, list(texts), batch_size=batch_size))


@dataclass(frozen=True)
class EditMetrics:
    """Metrics of one edit (see the module docstring for the formulas).

    Attributes:
        reliability: 1.0 / 0.0 on the edited query.
        generalization: mean success over the neighbor queries (``nan`` when no neighbor counts).
        locality: fraction of unrelated queries whose top-1 is unchanged (``nan`` when there are none).
        ppl_before, ppl_after: held-out perplexity (``nan`` when not measured).
        dprob_old_edited: p_after(o) − p_before(o) on the edited query.
        dprob_new_edited: p_after(o') − p_before(o') on the edited query (update; ``nan`` for erase).
        dprob_old_neighbors, dprob_new_neighbors: the same averaged over the neighbors.
        n_neighbors: how many neighbors entered ``generalization``.
    """

    kind: str
    reliability: float
    generalization: float
    locality: float
    ppl_before: float = math.nan
    ppl_after: float = math.nan
    dprob_old_edited: float = math.nan
    dprob_new_edited: float = math.nan
    dprob_old_neighbors: float = math.nan
    dprob_new_neighbors: float = math.nan
    n_neighbors: int = 0

    @property
    def avg(self) -> float:
        """(Rel + Gen + Loc) / 3 (``nan`` if any is ``nan``)."""
        return (self.reliability + self.generalization + self.locality) / 3

    @property
    def ppl_delta(self) -> float:
        return self.ppl_after - self.ppl_before

    @property
    def ppl_rel_delta(self) -> float:
        return (self.ppl_after - self.ppl_before) / self.ppl_before

    def as_dict(self) -> dict[str, float]:
        d = asdict(self)
        d.update(avg=self.avg, ppl_delta=self.ppl_delta, ppl_rel_delta=self.ppl_rel_delta)
        return d


def _as_2d(x: Tensor | None, what: str) -> Tensor:
    if x is None:
        return torch.zeros(0, 0)
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    check_tensor(what, x, kind="float", nonempty=False)
    if x.ndim == 1:
        return x.unsqueeze(0)
    if x.ndim != 2:
        raise InvalidInputError(
            f"{what} must be [n, d_vocab] logits (or [d_vocab]), got shape {tuple(x.shape)}"
        )
    return x


def _mean(x: Tensor) -> float:
    return float(x.double().mean()) if x.numel() else math.nan


def edit_metrics(
    kind: Literal["erase", "update"],
    *,
    edited_before: Float[Tensor, " d_vocab"],
    edited_after: Float[Tensor, " d_vocab"],
    neighbors_before: Float[Tensor, "n d_vocab"] | None,
    neighbors_after: Float[Tensor, "n d_vocab"] | None,
    unrelated_before: Float[Tensor, "m d_vocab"] | None,
    unrelated_after: Float[Tensor, "m d_vocab"] | None,
    old_token: int,
    new_token: int | None = None,
    ppl_before: float = math.nan,
    ppl_after: float = math.nan,
) -> EditMetrics:
    """Rel / Gen / Loc (and probability changes) of one edit from next-token logits (or log-probs).

    Examples:
        >>> import torch
        >>> before = torch.tensor([3.0, 1.0, 0.0]); after = torch.tensor([0.0, 1.0, 3.0])
        >>> nb = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]]); na = torch.tensor([[0.0, 0.0, 3.0], [0.0, 3.0, 0.0]])
        >>> m = edit_metrics("erase", edited_before=before, edited_after=after, neighbors_before=nb,
        ...                  neighbors_after=na, unrelated_before=nb, unrelated_after=na, old_token=0)
        >>> m.reliability, m.generalization, m.locality   # neighbor 2 never predicted o: excluded
        (1.0, 1.0, 0.5)
    """
    if kind not in ("erase", "update"):
        raise InvalidInputError(f"kind must be 'erase' or 'update', got {kind!r}")
    if kind == "update" and new_token is None:
        raise InvalidInputError("an update needs new_token (o')")
    eb, ea = _as_2d(edited_before, "edited_before"), _as_2d(edited_after, "edited_after")
    if eb.shape[0] != 1 or ea.shape != eb.shape:
        raise InvalidInputError(
            "edited_before / edited_after must be one [d_vocab] vector each, of equal size"
        )
    nb, na = _as_2d(neighbors_before, "neighbors_before"), _as_2d(neighbors_after, "neighbors_after")
    ub, ua = _as_2d(unrelated_before, "unrelated_before"), _as_2d(unrelated_after, "unrelated_after")
    if nb.shape != na.shape or ub.shape != ua.shape:
        raise InvalidInputError(
            "before/after logits of the neighbors (and of the unrelated queries) must match in shape"
        )
    V = eb.shape[1]
    for name, x in (("neighbors", nb), ("unrelated", ub)):
        if x.numel() and x.shape[1] != V:
            raise InvalidInputError(
                f"{name} logits have {x.shape[1]} entries per row, the edited query's {V}"
            )
    o = check_int("old_token", old_token, 0, V - 1)
    if new_token is not None:
        check_int("new_token", new_token, 0, V - 1)
    for name, ppl in (("ppl_before", ppl_before), ("ppl_after", ppl_after)):
        if isinstance(ppl, bool) or not isinstance(ppl, numbers.Real) or not (math.isnan(ppl) or ppl >= 1.0):
            raise InvalidInputError(
                f"{name} must be a perplexity >= 1 (inf allowed) or nan (not measured), got {ppl!r}"
            )
    pe_b, pe_a = eb.double().softmax(-1)[0], ea.double().softmax(-1)[0]
    top_e = int(ea[0].argmax())
    nbp, nap = (nb.double().softmax(-1), na.double().softmax(-1)) if nb.numel() else (nb, na)
    if kind == "erase":
        rel = float(top_e != o)
        if nb.numel():
            known = nb.argmax(-1) == o
            gen = _mean((na.argmax(-1)[known] != o).double()) if bool(known.any()) else math.nan
            n_nb = int(known.sum())
        else:
            gen, n_nb = math.nan, 0
        dnew_e = dnew_n = math.nan
    else:
        t = int(new_token)  # type: ignore[arg-type]
        rel = float(top_e == t)
        gen = _mean((na.argmax(-1) == t).double()) if nb.numel() else math.nan
        n_nb = int(nb.shape[0]) if nb.numel() else 0
        dnew_e = float(pe_a[t] - pe_b[t])
        dnew_n = _mean(nap[:, t] - nbp[:, t]) if nb.numel() else math.nan
    loc = _mean((ub.argmax(-1) == ua.argmax(-1)).double()) if ub.numel() else math.nan
    return EditMetrics(
        kind=kind,
        reliability=rel,
        generalization=gen,
        locality=loc,
        ppl_before=float(ppl_before),
        ppl_after=float(ppl_after),
        dprob_old_edited=float(pe_a[o] - pe_b[o]),
        dprob_new_edited=dnew_e,
        dprob_old_neighbors=_mean(nap[:, o] - nbp[:, o]) if nb.numel() else math.nan,
        dprob_new_neighbors=dnew_n,
        n_neighbors=n_nb,
    )
