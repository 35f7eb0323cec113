"""Maximal Marginal Relevance (Carbonell & Goldstein, 1998): pick results one at a time,
each the best trade-off between similarity to the query and dissimilarity to those already
picked:  argmax_d  lambda * sim(q, d) - (1 - lambda) * max_{s in picked} sim(d, s).
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidInputError


def mmr(query: np.ndarray, vectors: np.ndarray, k: int, lambda_mult: float = 0.5) -> list[int]:
    """Indices of up to `k` rows of `vectors` in MMR order (cosine similarity).

    Args:
        query: the query vector.
        vectors: one candidate per row, in any order.
        lambda_mult: 1 is pure relevance, 0 pure diversity.
    """
    if not 0 <= lambda_mult <= 1:
        raise InvalidInputError(f"lambda_mult must be a number in [0, 1] (1: relevance only, "
                                f"0: diversity only), got {lambda_mult!r}")
    if len(vectors) == 0 or k < 1:
        return []
    v = np.asarray(vectors, dtype=np.float32)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    q = np.asarray(query, dtype=np.float32)
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    relevance = v @ q
    picked = [int(np.argmax(relevance))]
    redundancy = v @ v[picked[0]]
    while len(picked) < min(k, len(v)):
        score = lambda_mult * relevance - (1 - lambda_mult) * redundancy
        score[picked] = -np.inf
        best = int(np.argmax(score))
        picked.append(best)
        redundancy = np.maximum(redundancy, v @ v[best])
    return picked
