"""The query path: candidates from each side, fusion, hits, reranking.

The seam: an `Engine` turns a `Request` into fused candidates (record ids with scores and
per-stage ranks). `LocalEngine` does it on this client (the dense side from Chroma's HNSW,
the funnel, or with local_vectors a graph in this process; the sparse side from the local
BM25 index; RRF or a score fusion; a filter planned by its share, or answered from what
the BM25 index remembers of it, subsets.py). A server-side hybrid engine (Chroma's Search
API with a sparse BM25 index and Rrf, on distributed Chroma or Chroma Cloud) can take its
place without the rest of this module changing; `LocalEngine` stays its oracle. See
docs/design.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Collection, Mapping, Protocol

import numpy as np

from . import validate as v
from .config import MODES
from .errors import ConfigError, InvalidInputError
from .filters import validate_where
from .funnel import FunnelVectors, short_vectors
from .fusion import Fused, reciprocal_rank_fusion, score_fusion
from .records import (CHUNK_KEY, PARENT_KEY, chunk_position, is_live, live_where, parent_of,
                      public_metadata)
from .rerank import Reranker
from .sparse import Snapshot, SparseIndex
from .subsets import Filter, Subset
from .store import ChromaStore, unit_rows
from .types import Document, Hit


@dataclass(frozen=True)
class Request:
    """One retrieval: the query, its vector (dense sides), the mode, candidates per side."""

    query: str
    vector: np.ndarray | None
    mode: str
    n: int
    where: Mapping[str, Any] | None
    #: this call's fusion weights (None: the settings')
    weights: Mapping[str, float] | None = None
    #: the sparse side's candidates when they differ from `n`
    n_sparse: int | None = None
    #: how many of the dense list's first entries must be exact after the chunk penalty
    #: (the hits asked for; None: all `n`)
    k: int | None = None

    def widened(self, total: int) -> "Request":
        """The same request with twice the candidates per side (at most `total`)."""
        return replace(self, n=min(total, 2 * self.n),
                       n_sparse=None if self.n_sparse is None else min(total, 2 * self.n_sparse))


Contents = Callable[[list[str]], dict[str, tuple[str, Mapping[str, Any]]]]


@dataclass(frozen=True)
class Ranking:
    """An engine's answer to one request."""

    #: fused candidates, best first
    fused: list[Fused]
    #: whether any side returned a full list of `request.n` (so that more may exist)
    full: bool
    #: text and metadata of the live records among some ids that pass the request's filter,
    #: read from the state the candidates came from (the hits' contents): a write since
    #: then cannot show a hit in a version outside the filter
    contents: Contents


class Engine(Protocol):
    def ranked(self, request: Request) -> Ranking:
        """The fused candidates of a request, and how to read their contents."""


@dataclass(frozen=True)
class FusionSettings:
    rrf_k: float
    weights: Mapping[str, float]
    funnel_dim: int | None
    funnel_candidates: int | None
    #: fuse documents (a document's rank on a side is its best chunk's), not chunks
    by_document: bool = True
    method: str = "rrf"  # fusion.METHODS
    #: subtracted from the dense similarity of a document's later chunks (see config.py)
    chunk_penalty: float = 0.0


class LocalEngine:
    """Dense from Chroma (or the funnel, or the graph over local vectors), sparse from the
    local BM25 index, fused."""

    def __init__(self, store: ChromaStore, sparse: SparseIndex, vectors: FunnelVectors | None,
                 settings: FusionSettings,
                 background: Callable[[Callable[[], Any]], bool] | None = None) -> None:
        self.store = store
        self.sparse = sparse
        self.vectors = vectors  # full vectors by record id (funnel or local_vectors), or None
        self.settings = settings
        #: runs a task behind the query path, or says it did not (the retriever's: `close`
        #: waits for it); None reads a remembered filter's vectors in the search that first
        #: needs them
        self.background = background

    @property
    def _penalty(self) -> float:
        """What a later chunk loses when documents are fused (`_prefer_first_chunks`)."""
        return self.settings.chunk_penalty if self.settings.by_document else 0.0

    def ranked(self, request: Request) -> Ranking:
        lists: dict[str, list[tuple[str, float]]] = {}
        stage1: dict[str, tuple[int, float]] = {}
        where = request.where
        sparse = self.sparse.reader()  # one state of the BM25 index for the whole search
        matching = None  # the filter, compiled for the BM25 index when it can evaluate it
        subset = None  # what it matches, when the index remembers (a filter used again)
        allowed = None  # the ids it matches, from Chroma, when only Chroma evaluates it
        if where is not None:
            matching = self.sparse.compile(where)
            if matching is not None:
                subset = sparse.subset(matching)
            else:  # both sides use them: Chroma's filtered query can miss hits
                allowed = frozenset(self.store.get(where=live_where(where), include=[])["ids"])
        if request.mode in ("hybrid", "dense"):
            assert request.vector is not None
            dense = self._dense(sparse, request.vector, request.n, matching, subset, allowed,
                                stage1, request.k)
            lists["dense"] = _prefer_first_chunks(dense, self._penalty)
        if request.mode in ("hybrid", "sparse"):
            lists["sparse"] = sparse.search(request.query, request.n_sparse or request.n,
                                            allowed=allowed, matching=matching)
        full = any(len(items) >= (request.n_sparse or request.n if side == "sparse"
                                  else request.n) for side, items in lists.items())
        settings = self.settings
        if request.weights is not None:
            settings = replace(settings, weights={**settings.weights, **request.weights})
        fused = fuse(lists, settings)
        for f in fused:
            if f.id in stage1:  # the funnel's first stage (empty otherwise)
                f.ranks["funnel"], f.scores["funnel"] = stage1[f.id]
        return Ranking(fused, full, lambda ids: self._contents(sparse, ids, where, matching))

    def _contents(self, sparse: Snapshot, ids: list[str], where: Mapping[str, Any] | None,
                  matching: Filter | None) -> dict[str, tuple[str, Mapping[str, Any]]]:
        """From the stored copy in the search's own snapshot of the BM25 index, where it
        passes the filter there; else from Chroma, where it passes the filter now (a dense
        candidate Chroma found in a version the snapshot does not hold: written since, or
        by another client since this one caught up; all hits of a filter only Chroma
        evaluates)."""
        found: dict[str, tuple[str, Mapping[str, Any]]] = {}
        if where is None or matching is not None:
            found = sparse.records(ids)
            if matching is not None and found:
                passed = sparse.keep(list(found), matching)
                found = {rid: rec for rid, rec in found.items() if rid in passed}
        missing = [rid for rid in ids if rid not in found]
        if missing:
            got = self.store.get(ids=missing, where=where, include=["documents", "metadatas"])
            found.update((rid, (t, m or {})) for rid, t, m in
                         zip(got["ids"], got["documents"], got["metadatas"]) if is_live(m))
        return found

    def _dense(self, sparse: Snapshot, vec: np.ndarray, n: int, matching: Filter | None,
               subset: Subset | None, allowed: frozenset[str] | None,
               stage1: dict[str, tuple[int, float]], k: int | None = None
               ) -> list[tuple[str, float]]:
        # how many records the filter passes (None: no filter), counted in the BM25 index
        # or, for a filter only Chroma evaluates, by the ids it gave (`allowed`)
        passing = len(allowed) if allowed is not None else \
            sparse.count(matching) if matching is not None else None
        # whether the passing records' vectors, read from Chroma, fit beside the subsets'
        # and cost less to read than a query (`READ_SCAN`)
        fits = passing is not None and sparse.can_hold(passing * vec.size * 4)
        cheap = passing is not None and passing * passing <= READ_SCAN * n * len(sparse)
        if fits and cheap and matching is not None and subset is None and self.vectors is None:
            subset = sparse.remember(matching)  # read in whole: cheaper than a query
        if fits and not cheap and subset is not None and self.vectors is None \
                and subset.held[0] is None and self.background is not None \
                and passing >= POST_FILTER_SHARE * len(sparse):
            # reading its vectors costs more than this search (~0.5-0.9 s for 18k at 120k
            # records): read behind it, post-filter by the subset now, scan from then on
            if sparse.claim(subset):
                def read(dim: int = vec.size) -> None:
                    try:
                        self._vectors_of(sparse, subset, dim)
                    finally:  # a read that failed may be tried again by the next search
                        subset.reading = False
                if not self.background(read):  # not now: a later search asks again
                    subset.reading = False
            return self._knn(sparse, vec, n, matching, subset, passing, k=k)
        if passing is not None and (
                self.vectors is not None and passing < EXACT_SCAN_SHARE * len(sparse)
                or subset is not None and self.vectors is None and fits):
            return self._exact(sparse, vec, n, matching, passing, subset, allowed)
        if self.settings.funnel_dim is None:
            return self._knn(sparse, vec, n, matching, subset, passing, allowed, k)
        # stage 1 on the short vectors in Chroma, stage 2 exact cosine on the full ones
        s = self.settings
        assert s.funnel_dim is not None
        first = self._knn_raw(sparse, short_vectors(vec, s.funnel_dim)[0],
                              max(n, s.funnel_candidates or 4 * n), matching, subset, passing,
                              allowed)
        ids = [rid for rid, _ in first]
        for r, (rid, s1) in enumerate(first, start=1):
            stage1[rid] = (r, s1)
        return self._ranked(ids, self.vectors.similarities(ids, vec, cosine=True), n)

    def _exact(self, sparse: Snapshot, vec: np.ndarray, n: int, matching: Filter | None,
               passing: int, subset: Subset | None, allowed: frozenset[str] | None
               ) -> list[tuple[str, float]]:
        """The `n` nearest of the records a filter passes, by an exact scan of their
        vectors: those held in this process (funnel or local_vectors; a selective filter),
        else those the filter's subset holds, read from Chroma on its first scan."""
        if passing == 0:
            return []
        if self.vectors is None:
            assert subset is not None
            return self._scanned(*self._vectors_of(sparse, subset, vec.size), vec, n)
        ids = _passing_ids(sparse, matching, passing, subset, allowed)
        return self._ranked(ids, self.vectors.similarities(ids, vec, cosine=True), n)

    def _scanned(self, ids: list[str], unit: np.ndarray, vec: np.ndarray, n: int
                 ) -> list[tuple[str, float]]:
        """The `n` nearest of `ids` by their L2-normalized vectors `unit`: cosine, as
        Chroma's space is, also for vectors stored unnormalized."""
        if not ids:
            return []
        return self._ranked(ids, unit @ (vec / max(float(np.linalg.norm(vec)), 1e-12)), n)

    def _ranked(self, ids: list[str], sims: np.ndarray, n: int) -> list[tuple[str, float]]:
        order = _top_after_penalty(ids, sims, n, self._penalty)
        return [(ids[i], float(sims[i])) for i in order if np.isfinite(sims[i])]

    def _vectors_of(self, sparse: Snapshot, subset: Subset, dim: int
                    ) -> tuple[list[str], np.ndarray]:
        """A subset's vectors: read on its first scan, and for the records written since
        then on the first scan after."""
        held, missing = subset.held  # one read: another search may drop or replace them
        if held is None:
            return sparse.hold(subset, self._unit_vectors(sparse, subset.ids, dim))
        if not missing:
            return held
        (ids, matrix), (more, rows) = held, self._unit_vectors(sparse, missing, dim)
        return sparse.hold(subset, (ids + more, np.concatenate([matrix, rows])))

    def _unit_vectors(self, sparse: Snapshot, ids: list[str], dim: int
                      ) -> tuple[list[str], np.ndarray]:
        """`ChromaStore.unit_vectors`, read from the BM25 index where it keeps them
        (~10 us a record, against Chroma's ~45), from Chroma for the rest."""
        found, matrix = sparse.vectors(ids, dim)
        if len(found) < len(ids):
            held = set(found)
            more, rows = self.store.unit_vectors([i for i in ids if i not in held], dim)
            return found + more, np.concatenate([unit_rows(matrix), rows])
        return found, unit_rows(matrix)

    def _knn(self, sparse: Snapshot, vec: np.ndarray, n: int, matching: Filter | None,
             subset: Subset | None, passing: int | None,
             allowed: frozenset[str] | None = None, k: int | None = None
             ) -> list[tuple[str, float]]:
        """The `n` nearest records that pass the filter, planned by how many pass
        (`passing`; None: no filter); with a chunk penalty, the `n` nearest after it, the
        first `k` of them exact (`_penalty_safe`)."""
        if not self._penalty:
            return self._knn_raw(sparse, vec, n, matching, subset, passing, allowed)
        return _penalty_safe(lambda m: self._knn_raw(sparse, vec, m, matching, subset,
                                                     passing, allowed),
                             n, n if k is None else min(k, n), self._penalty)

    def _knn_raw(self, sparse: Snapshot, vec: np.ndarray, n: int, matching: Filter | None,
                 subset: Subset | None, passing: int | None,
                 allowed: frozenset[str] | None) -> list[tuple[str, float]]:
        if passing is not None:
            total = max(len(sparse), passing)  # Chroma's ids may be ahead of the snapshot
            if passing == 0:
                return []
            if passing >= POST_FILTER_SHARE * total:
                keep = subset.members.intersection if subset is not None \
                    else allowed.intersection if allowed is not None \
                    else (lambda ids: sparse.keep(ids, matching))
                return _post_filtered(lambda m: self._nearest(vec, m), keep,
                                      n, passing / total, total,
                                      lambda: self._read_scan(sparse, vec, n, matching,
                                                              passing, subset, allowed))
            # few: their vectors, read (`_unit_vectors`) and scanned; Chroma's
            # filtered query costs more (~200 ms at 120k records) and can miss hits
            return self._read_scan(sparse, vec, n, matching, passing, None, allowed)
        return self._nearest(vec, n)

    def _read_scan(self, sparse: Snapshot, vec: np.ndarray, n: int, matching: Filter | None,
                   passing: int, subset: Subset | None, allowed: frozenset[str] | None
                   ) -> list[tuple[str, float]]:
        """The `n` nearest of the records the filter passes, by their vectors read
        (`_unit_vectors`) and scanned."""
        ids = _passing_ids(sparse, matching, passing, subset, allowed)
        return self._scanned(*self._unit_vectors(sparse, ids, vec.size), vec, n)

    def _nearest(self, vec: np.ndarray, n: int) -> list[tuple[str, float]]:
        """The `n` nearest records, unfiltered: from the graph in this process when there
        is one (local_vectors), else from Chroma's."""
        if self.vectors is not None and self.vectors.graph is not None:
            return self.vectors.nearest(vec, n)
        return self.store.query(vec, n)


def fuse(lists: Mapping[str, list[tuple[str, float]]], settings: FusionSettings
         ) -> list[Fused]:
    """Each side's ranked records, fused (RRF when there are two sides). With
    `settings.by_document`, documents are fused: a document's rank and score on a side are
    its best chunk's, and the entry's id is the chunk that ranked best on any side (the one
    whose text the hit shows). Otherwise records are fused as they are."""
    chunk: dict[str, tuple[int, str]] = {}  # document -> (rank, chunk standing for it)
    if settings.by_document:
        lists = {side: _best_chunks(items, chunk) for side, items in lists.items()}

    def shown(doc: str) -> str:
        return chunk[doc][1] if doc in chunk else doc

    if len(lists) == 1:
        (side, items), = lists.items()
        return [Fused(shown(d), s, {side: r}, {side: s})
                for r, (d, s) in enumerate(items, start=1)]
    weights = {s: settings.weights[s] for s in lists}
    fused = reciprocal_rank_fusion(lists, k=settings.rrf_k, weights=weights) \
        if settings.method == "rrf" else \
        score_fusion(lists, method=settings.method, weights=weights)
    for r, f in enumerate(fused, start=1):  # fresh entries: completed in place
        f.id = shown(f.id)
        f.ranks["fused"] = r
        f.scores["fused"] = f.score
    return fused


def _prefer_first_chunks(items: list[tuple[str, float]], penalty: float
                         ) -> list[tuple[str, float]]:
    """Later chunks of a document score their similarity minus `penalty`, re-sorted: a
    document is found by its first chunk (title and lead) unless a later one is clearly
    nearer (docs/benchmarks.md, "Chunk aggregation")."""
    if not penalty:
        return items
    scored = [(rid, s - penalty if chunk_position(rid) else s) for rid, s in items]
    return sorted(scored, key=lambda x: -x[1])


def _top_after_penalty(ids: list[str], sims: np.ndarray, n: int, penalty: float
                       ) -> np.ndarray:
    """The positions of the `n` best of `sims` as `_prefer_first_chunks` ranks them (a later
    chunk loses `penalty`), best raw cosine first: a first chunk just past the raw n-th can
    pass a later chunk inside it. Reads the raw order until the next cosine cannot reach the
    n-th penalized score."""
    if not penalty or len(sims) <= n:
        return _raw_top(sims, n)
    m = n
    while True:
        order = _raw_top(sims, m + 1)
        head = order[:m]
        scored = sims[head] - penalty * np.fromiter(
            (chunk_position(ids[i]) > 0 for i in head), dtype=bool, count=len(head))
        if m >= len(sims) or sims[order[m]] < np.partition(scored, -n)[-n]:
            return head[np.sort(np.argsort(-scored, kind="stable")[:n])]
        m *= 2


def _raw_top(sims: np.ndarray, m: int) -> np.ndarray:
    """The positions of the `m` largest of `sims`, largest first and ties by position: the
    first `m` of a stable argsort of `-sims`, without sorting the rest (a subset scan sorts
    16k cosines for 100 candidates). NaN sorts last, as in the argsort."""
    if m >= len(sims) or not np.isfinite(sims).all():
        return np.argsort(-sims, kind="stable")[:m]
    cut = np.partition(sims, len(sims) - m)[len(sims) - m]  # the m-th largest
    head = np.flatnonzero(sims >= cut)  # every tie at the cut, in position order
    return head[np.argsort(-sims[head], kind="stable")[:m]]


def _best_chunks(items: list[tuple[str, float]], chunk: dict[str, tuple[int, str]]
                 ) -> list[tuple[str, float]]:
    """A side's list of chunks as a list of documents, each at its best chunk's rank and
    score. `chunk` keeps, per document, the chunk with the best rank on any side: it stands
    for the document in the hits (on a tie of sides, the side fused first: dense)."""
    out: dict[str, float] = {}
    for rid, score in items:
        doc = parent_of(rid)
        if doc in out:
            continue
        out[doc] = score
        if doc not in chunk or len(out) < chunk[doc][0]:
            chunk[doc] = (len(out), rid)
    return list(out.items())


#: a filter matching at least this share of the records is applied after an unfiltered HNSW
#: query (over-fetched, widened until enough pass); a more selective one is an exact scan
#: of its records' vectors (at most this share of them), read from the BM25 index's copy
#: (~10 us each) or Chroma (~45 us each: `_unit_vectors`).
#: Chroma's own filtered query is never asked: it costs ~200 ms at 120k records and can
#: return no neighbours where records match (docs/reliability.md).
POST_FILTER_SHARE = 0.01
#: with the vectors in this process (local_vectors, funnel), a filter matching less than
#: this share is answered by an exact scan of the matching records: reading their ids from
#: the BM25 index and scoring their vectors costs ~3 ms per 1,600 records, below either plan
#: above. A filter used again is scanned at any share when its subset's vectors fit in
#: `subsets.SUBSET_VECTOR_BYTES`: read once (`_unit_vectors`), then ~0.5 ms a
#: scan of 16k vectors against ~11 ms for HNSW's 879 neighbours at 100k records.
EXACT_SCAN_SHARE = 0.05
#: a filter seen for the first time is scanned too when reading its records' vectors
#: (measured at ~20 us each from Chroma; ~10 from the BM25 index) costs less than the plans
#: above: the post-filter fetches ~n / share
#: neighbours at ~10 us each, so reading wins while passing^2 <= n * total / 2 (2,450
#: records for 100 candidates at 120k); below POST_FILTER_SHARE the scan reads them anyway,
#: but keeps them only when this holds
READ_SCAN = 0.5


def _penalty_safe(top: Callable[[int], list[tuple[str, float]]], n: int, k: int,
                  penalty: float) -> list[tuple[str, float]]:
    """The `n` records `_prefer_first_chunks` ranks first (a later chunk loses `penalty`),
    best raw cosine first, from lists of the nearest by raw cosine (`top(m)`: m or fewer
    when there are no more): a first chunk just past the raw n-th can pass a later chunk
    inside. Widened (doubled) until the next record's raw cosine cannot reach the score of
    the k-th document in the penalized order, so the first `k` documents are exact; the
    tail past them may miss such a record (the hits asked for are exact, the rest are
    fusion candidates)."""
    m = n
    while True:
        found = top(m + 1)
        head = found[:m]
        scored = [s - penalty if chunk_position(rid) else s for rid, s in head]
        order = sorted(range(len(head)), key=lambda i: (-scored[i], i))[:n]
        if len(found) <= m or found[m][1] < _kth_document_score(head, scored, order, k):
            return [head[i] for i in sorted(order)]
        m *= 2


def _kth_document_score(head: list[tuple[str, float]], scored: list[float],
                        order: list[int], k: int) -> float:
    """The penalized score at which the `k`-th document first appears in `order` (the
    last one's when fewer documents are there)."""
    seen: set[str] = set()
    for i in order:
        seen.add(parent_of(head[i][0]))
        if len(seen) >= k:
            return scored[i]
    return scored[order[-1]]


def _passing_ids(sparse: Snapshot, matching: Filter | None, passing: int,
                 subset: Subset | None, allowed: frozenset[str] | None) -> list[str]:
    """The ids of the records a filter passes: those Chroma gave (`allowed`), the ones its
    subset remembers, or read from the BM25 index."""
    if allowed is not None:
        return sorted(allowed)
    return subset.ids if subset is not None else sparse.matching(matching, passing)


def _post_filtered(query: Callable[[int], list[tuple[str, float]]],
                   keep: Callable[[list[str]], Collection[str]], n: int, share: float,
                   total: int, scan: Callable[[], list[tuple[str, float]]]
                   ) -> list[tuple[str, float]]:
    """The best `n` records that pass the filter, from unfiltered nearest-neighbour lists:
    ask for enough that n pass at the filter's share (`overfetch`) of the `total` records
    the filter was counted on, and double until n pass or every passing record was found.
    Exact with respect to the index: a passing record nearer than the n-th one returned
    would have been in the list. The index may hold more than `total` (a write in Chroma
    that the count's snapshot does not have yet): asking it for `total` neighbours is then
    not the whole collection. When the index has no more to give and passing records are
    still missing (HNSW graphs can leave a record unreachable, more often after updates),
    the answer is the exact `scan` of the passing records' vectors."""
    fetch = overfetch(n, share, total)
    wanted = min(n, round(share * total))
    while True:
        found = query(fetch)
        passed = keep([rid for rid, _ in found])
        out = [(rid, s) for rid, s in found if rid in passed]
        if len(out) >= wanted:
            return out[:n]
        if len(found) < fetch:
            return scan()
        fetch = min(total, 2 * fetch) if fetch < total else 2 * fetch


def overfetch(n: int, share: float, total: int) -> int:
    """How many unfiltered neighbours to ask for so that `n` of them pass a filter that
    passes `share` of the records, when the passing records are spread among the neighbours
    as among all records: the fewest f whose Binomial(f, share) count of passing records is
    n or more at 3 standard deviations below its mean, f*p - 3*sqrt(f*p*(1-p)) >= n (fails
    about 1 time in 700; then `_post_filtered` widens). At p = 0.15, n = 100: 879."""
    sd = math.sqrt(share * (1.0 - share))
    root = (3.0 * sd + math.sqrt(9.0 * sd * sd + 4.0 * share * n)) / (2.0 * share)
    return min(total, max(n, math.ceil(root * root)))


class Searcher:
    """Search over an engine: widen until enough documents, attach texts, rerank."""

    def __init__(self, engine: Engine, embed_query: Callable[[str], Any],
                 reranker: Reranker | None, *, dim: int, collapse: bool,
                 before: Callable[[], Any] | None = None) -> None:
        self.engine = engine
        self.embed_query = embed_query
        self.reranker = reranker
        self.dim = dim
        self.collapse = collapse
        self.before = before  # called before each search (server clients catch up)

    def search(self, query: str, k: int, *, total: int, where: Mapping[str, Any] | None,
               mode: str, rerank: bool | None, candidates: int,
               query_vector: np.ndarray | None, weights: Mapping[str, float] | None = None,
               sparse_candidates: int | None = None) -> list[Hit]:
        v.readable("query", query, "pass the text to search for")
        qvec = None if query_vector is None else _check_query_vector(query_vector, self.dim)
        v.integer("k", k, error=InvalidInputError, fix="e.g. 10")
        v.choice("mode", mode, MODES, error=InvalidInputError)
        validate_where(where)
        v.boolean("rerank", rerank, optional=True, error=InvalidInputError,
                  fix="None reranks when a reranker is configured")
        if rerank and self.reranker is None:
            raise ConfigError("rerank=True needs a reranker: pass reranker='<cross-encoder name>' "
                              "or set config.reranker")
        v.integer("candidates", candidates, error=InvalidInputError, fix="e.g. 50")
        v.integer("sparse_candidates", sparse_candidates, optional=True, error=InvalidInputError)
        if weights is not None:
            weights = check_weights(weights)
        reranker = self.reranker if rerank is not False else None
        want = max(k, reranker.config.candidates if reranker else k)
        if self.before is not None:
            self.before()
        n = min(max(candidates, want), total())
        if n == 0:
            return []
        vec = None
        if mode in ("hybrid", "dense"):
            vec = self.embed_query(query) if qvec is None else qvec
        if sparse_candidates is not None and mode == "sparse":  # the list is the answer
            sparse_candidates = max(sparse_candidates, want)
        request = Request(query, vec, mode, n, dict(where) if where else None, weights,
                          None if sparse_candidates is None
                          else min(sparse_candidates, total()), want)
        while True:
            ranking = self.engine.ranked(request)
            hits = self._hits(ranking, want)
            # chunks of one document collapse into one hit: when that leaves fewer than
            # asked for, widen the candidate lists rather than return a short page
            if len(hits) >= want or request.n >= total() or not ranking.full:
                break
            request = request.widened(total())
        if reranker is not None:
            hits = reranker.rerank_head(query, hits)
        return hits[:k]

    def _hits(self, ranking: Ranking, limit: int) -> list[Hit]:
        """Hits for the best `limit` entries; texts are read (`Ranking.contents`) only for
        entries that can still make the cut, a page at a time: first as many as are missing
        (fused by document, entries are distinct documents), then twice that (collapsing
        chunks and skipping dead records drop entries)."""
        fused = ranking.fused
        hits: list[Hit] = []
        seen: set[str] = set()
        pos = 0
        while pos < len(fused) and len(hits) < limit:
            need = limit - len(hits)
            page = fused[pos:pos + (need if pos == 0 else max(2 * need, 10))]
            pos += len(page)
            texts = ranking.contents([f.id for f in page])
            for f in page:
                if f.id not in texts:  # deleted, or dead, since the candidates were found
                    continue
                text, meta = texts[f.id]
                parent = str(meta.get(PARENT_KEY, f.id))
                if self.collapse:
                    if parent in seen:
                        continue
                    seen.add(parent)
                hits.append(Hit(Document(text=text, id=parent if self.collapse else f.id,
                                         metadata=public_metadata(meta)),
                                score=float(f.score), ranks=f.ranks, scores=f.scores,
                                chunk_id=f.id, chunk_index=int(meta.get(CHUNK_KEY, 0))))
                if len(hits) >= limit:
                    break
        return hits


def check_weights(weights: Any) -> dict[str, float]:
    """One search's fusion weights, checked: a dict of 'dense' and/or 'sparse' to numbers
    >= 0 (the sides it leaves out keep their configured weight)."""
    from .fusion import validate_rrf_params

    if not isinstance(weights, Mapping) or set(weights) - {"dense", "sparse"}:
        raise InvalidInputError(f"weights must be a dict with keys 'dense' and/or 'sparse', e.g. "
                                f"{{'dense': 0.7, 'sparse': 0.3}}, got {weights!r:.80}")
    try:
        validate_rrf_params(60, weights)
    except ConfigError as exc:
        raise InvalidInputError(str(exc)) from None
    return {side: float(w) for side, w in weights.items()}


def _check_query_vector(vector: Any, dim: int) -> np.ndarray:
    try:
        vec = np.asarray(vector, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"query_vector must be a 1-d array of {dim} floats: {exc}") from exc
    if vec.shape != (dim,):
        raise InvalidInputError(
            f"query_vector has shape {vec.shape}, expected ({dim},): pass one vector from "
            "embedder.embed_query(query) of this retriever's model")
    if not np.isfinite(vec).all():
        raise InvalidInputError("query_vector contains NaN or inf; pass a finite vector")
    # scaled in float64: a norm of 1e20 or 1e-25 over- or underflows in float32 (scores
    # were all 0, or not cosines); every plan scores by cosine, so the norm carries nothing
    wide = vec.astype(np.float64)
    norm = float(np.linalg.norm(wide))
    if norm == 0.0:
        raise InvalidInputError("query_vector is all zeros, which is no direction to search "
                                "in; pass embedder.embed_query(query)")
    return (wide / norm).astype(np.float32)
