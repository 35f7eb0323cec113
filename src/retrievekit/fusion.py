"""Fusion of ranked lists: weighted Reciprocal Rank Fusion (Cormack et al., 2009), and
score-aware fusion by normalized scores (min-max or distribution-based).

RRF: score(d) = sum_i w_i / (k + rank_i(d)), ranks from 1; a document missing from a list
adds 0. Lists are deduplicated by document id (first, i.e. best, occurrence kept). Ties are
broken by the best single rank, then by id, so the output order is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from . import validate as v
from .errors import ConfigError


@dataclass(slots=True)
class Fused:
    """One fused entry: the id, its RRF score and the per-list ranks and scores it came with.
    Made for every candidate of every query, so plain (not frozen: a frozen dataclass costs
    2-3x to build); the searcher adds its own stages to `ranks` and `scores`."""

    id: str
    score: float
    ranks: dict[str, int] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)


def validate_rrf_params(k: float, weights: Mapping[str, float] | None) -> None:
    """Raise ConfigError for an RRF constant or weight that cannot be used."""
    v.number("rrf_k", k, 0, fix="60 is the usual value")
    for name, w in (weights or {}).items():
        v.number(f"weights[{name!r}]", w, 0, fix="use 0 to switch a side off")


def reciprocal_rank_fusion(
    ranked: Mapping[str, Sequence[tuple[str, float]]],
    *,
    k: float = 60,
    weights: Mapping[str, float] | None = None,
) -> list[Fused]:
    """Fuse ranked lists by weighted RRF.

    Args:
        ranked: list name -> [(id, score), ...] best first.
        k: the RRF constant.
        weights: list name -> weight (default 1.0 for each list). A weight for a name that is
            not in `ranked` is an error rather than silently ignored.

    Returns:
        Fused entries, best first.
    """
    validate_rrf_params(k, weights)
    weights = dict(weights or {})
    unknown = set(weights) - set(ranked)
    if unknown:
        raise ConfigError(
            f"fusion weights name lists that are not fused: {sorted(unknown)}; "
            f"the lists are {sorted(ranked)}")
    total: dict[str, float] = {}
    ranks: dict[str, dict[str, int]] = {}
    scores: dict[str, dict[str, float]] = {}
    for name, items in ranked.items():
        w = float(weights.get(name, 1.0))
        first = _first(items)
        for rank, doc_id in enumerate(first, start=1):
            total[doc_id] = total.get(doc_id, 0.0) + w / (k + rank)
            ranks.setdefault(doc_id, {})[name] = rank
            scores.setdefault(doc_id, {})[name] = first[doc_id]
    return _in_order(total, ranks, scores)


def _first(items: Sequence[tuple[str, float]]) -> dict[str, float]:
    """A list's ids in order, each with the score of its first (best) occurrence."""
    first: dict[str, float] = {}
    for doc_id, score in items:
        if doc_id not in first:
            first[doc_id] = float(score)
    return first


def _in_order(total: dict[str, float], ranks: dict[str, dict[str, int]],
              scores: dict[str, dict[str, float]]) -> list[Fused]:
    """Fused entries by score, then by best single rank, then by id (sorted on tuples: a
    key function per entry cost a third of a fusion)."""
    keyed = [(-t, min(ranks[d].values()), d) for d, t in total.items()]
    keyed.sort()
    return [Fused(d, total[d], ranks[d], scores[d]) for _, _, d in keyed]


#: fusion methods: weighted RRF (ranks), and the score-aware ones of LlamaIndex
#: (`relative_score`, `dist_based_score`), Weaviate (relativeScoreFusion) and Qdrant (DBSF)
METHODS = ("rrf", "relative_score", "dbsf")


def _normalized(scores: Sequence[float], method: str) -> list[float]:
    """Scores of one list mapped to [0, 1]: min-max ("relative_score"), or mean ± 3 standard
    deviations, clipped ("dbsf"). A list whose scores are all equal maps to 1."""
    lo, hi = min(scores), max(scores)
    if method == "dbsf":
        mean = sum(scores) / len(scores)
        sd = (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5
        lo, hi = mean - 3 * sd, mean + 3 * sd
    if hi <= lo:
        return [1.0] * len(scores)
    return [min(1.0, max(0.0, (s - lo) / (hi - lo))) for s in scores]


def score_fusion(
    ranked: Mapping[str, Sequence[tuple[str, float]]],
    *,
    method: str = "relative_score",
    weights: Mapping[str, float] | None = None,
) -> list[Fused]:
    """Fuse ranked lists by their normalized scores: score(d) = sum_i w_i * norm_i(d), where
    norm_i maps list i's scores to [0, 1] (`_normalized`) and a list without d adds 0.

    Lists are deduplicated by id (best occurrence kept); ties are broken by the best single
    rank, then by id. Each entry keeps its per-list ranks and raw scores.
    """
    if method not in METHODS[1:]:
        raise ConfigError(f"score fusion method must be one of {list(METHODS[1:])}, got "
                          f"{method!r}")
    validate_rrf_params(60, weights)
    weights = dict(weights or {})
    total: dict[str, float] = {}
    ranks: dict[str, dict[str, int]] = {}
    scores: dict[str, dict[str, float]] = {}
    for name, items in ranked.items():
        first = _first(items)
        if not first:
            continue
        w = float(weights.get(name, 1.0))
        for rank, (doc_id, norm) in enumerate(
                zip(first, _normalized(list(first.values()), method)), start=1):
            total[doc_id] = total.get(doc_id, 0.0) + w * norm
            ranks.setdefault(doc_id, {})[name] = rank
            scores.setdefault(doc_id, {})[name] = first[doc_id]
    return _in_order(total, ranks, scores)


def score_ceiling(method: str, weights: Mapping[str, float], rrf_k: float = 60) -> float:
    """The highest fused score `method` can give: first on every side (RRF), or the top
    normalized score on every side (score fusion). Dividing by it maps fused scores to
    [0, 1] (a relevance score: 1 means best on both sides)."""
    total = sum(float(w) for w in weights.values())
    return total / (rrf_k + 1) if method == "rrf" else total
