"""Weighted Reciprocal Rank Fusion (Cormack et al., 2009).

score(d) = sum_i w_i / (k + rank_i(d)), ranks from 1; a document missing from a list adds 0.
Lists are deduplicated by document id (first, i.e. best, occurrence kept). Ties are broken by
the best single rank, then by id, so the output order is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .errors import ConfigError


@dataclass(frozen=True)
class Fused:
    """One fused entry: the id, its RRF score and the per-list ranks and scores it came with."""

    id: str
    score: float
    ranks: dict[str, int] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)


def validate_rrf_params(k: float, weights: Mapping[str, float] | None) -> None:
    """Raise ConfigError for an RRF constant or weight that cannot be used."""
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not k >= 0:
        raise ConfigError(f"rrf_k must be a number >= 0 (60 is the usual value), got {k!r}")
    for name, w in (weights or {}).items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise ConfigError(
                f"fusion weight for {name!r} must be a number >= 0, got {w!r}; "
                "use 0 to switch a side off")


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
        rank = 0
        seen: set[str] = set()
        for doc_id, score in items:
            if doc_id in seen:
                continue
            seen.add(doc_id)
            rank += 1
            total[doc_id] = total.get(doc_id, 0.0) + w / (k + rank)
            ranks.setdefault(doc_id, {})[name] = rank
            scores.setdefault(doc_id, {})[name] = float(score)
    order = sorted(total, key=lambda d: (-total[d], min(ranks[d].values()), d))
    return [Fused(d, total[d], ranks[d], scores[d]) for d in order]
