"""`HybridRetriever`: the facade over a writer and a searcher.

It reconciles the configuration with what the store records (settings.py), opens the parts,
and delegates: writes to `Writer` (writer.py), the catch-up of derived indexes to `Follower`
(sync.py), searches to `Searcher` (searcher.py). docs/design.md has the whole picture.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import hashlib
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from . import validate as v
from .changelog import ChangeLog, log_name
from .config import RetrieverConfig
from .embedding import Embedder
from .errors import ConfigError, InvalidInputError, StoreError
from .filters import validate_where
from .funnel import FunnelVectors
from .graph import GraphSettings
from .hnsw_repair import repair_if_damaged
from .records import (PARENT_KEY, SEQ_KEY, check_document_id, from_chroma, live_where,
                      parent_of, reassemble)
from .rerank import RerankConfig, Reranker
from .searcher import FusionSettings, LocalEngine, Searcher, check_weights
from .settings import config_from_settings, reconcile
from .sparse import SparseIndex
from .store import ChromaStore, chroma_errors, clean_metadata
from .sync import Follower
from .types import Document, Hit, text_id
from .writer import Writer, chroma_vectors

logger = logging.getLogger(__name__)


def _guarded(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Public calls turn a failure of Chroma (its change-log calls included) into a
    StoreError saying what failed (see `store.chroma_errors`), and are refused once the
    retriever is closed or closing (`close` waits for those under way)."""
    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def guarded(self: "HybridRetriever", *args: Any, **kwargs: Any) -> Any:
            with self._calls.entered(what):
                with chroma_errors(self.config.store, what):
                    return method(self, *args, **kwargs)
        return guarded
    return wrap


class _Calls:
    """The public calls under way, so that `close` releases nothing they are using: it
    refuses new calls, then waits for those under way in other threads. A call already
    under way in a thread finishes its own inner calls; `close` from inside one (a
    generator or callback it runs) is refused, as it would release the store under it."""

    def __init__(self) -> None:
        self._done = threading.Condition()
        self._count = 0
        self._mine = threading.local()
        self.closed = False

    @contextlib.contextmanager
    def entered(self, what: str) -> Iterator[None]:
        depth = getattr(self._mine, "depth", 0)
        with self._done:
            if self.closed and not depth:
                raise StoreError(f"cannot {what}: this retriever is closed; open a new "
                                 "HybridRetriever on the store to go on")
            self._count += 1
        self._mine.depth = depth + 1
        try:
            yield
        finally:
            self._mine.depth = depth
            with self._done:
                self._count -= 1
                self._done.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no other thread's call is under way (reads behind the query path
        included); False when `timeout` passed first."""
        mine = getattr(self._mine, "depth", 0)
        with self._done:
            return self._done.wait_for(lambda: self._count <= mine, timeout)

    def close(self) -> None:
        """Refuse new calls; wait for the other threads' calls under way."""
        if getattr(self._mine, "depth", 0):
            raise StoreError("cannot close this retriever from inside one of its own calls "
                             "(a generator or callback it is running): close it after the "
                             "call returns")
        with self._done:
            self.closed = True
            self._done.wait_for(lambda: self._count == 0)


class HybridRetriever:
    """Hybrid BM25 + dense retrieval over a Chroma collection.

    Args:
        config: a `RetrieverConfig`, a dict, or a path to a TOML file (default settings if None).
        embedder / reranker: ready-made parts to use instead of building them from the config;
            `reranker` may also be a model name or a dict of `RerankConfig` settings.
        path, host, port, collection, model, truncate_dim, mode, candidates: shortcuts for the
            most used settings.
    """

    def __init__(self, config: RetrieverConfig | Mapping[str, Any] | str | None = None, *,
                 embedder: Embedder | None = None,
                 reranker: Reranker | RerankConfig | Mapping[str, Any] | str | None = None,
                 path: str | None = None, host: str | None = None, port: int | None = None,
                 collection: str | None = None, model: str | None = None,
                 truncate_dim: int | None = None, mode: str | None = None,
                 candidates: int | None = None) -> None:
        if embedder is not None and not isinstance(embedder, Embedder):
            v.fail("embedder", "a retrievekit Embedder or None", embedder,
                   "pass model='<name>' to choose the model by name")
        if reranker is not None and \
                not isinstance(reranker, (Reranker, RerankConfig, Mapping, str)):
            v.fail("reranker", "a Reranker, a RerankConfig or its dict, a cross-encoder name "
                   "or None", reranker)
        cfg = _as_config(config)
        store_changes = {k: x for k, x in
                         {"path": path, "host": host, "port": port, "collection": collection
                          }.items() if x is not None}
        emb_changes = {k: x for k, x in {"model": model, "truncate_dim": truncate_dim}.items()
                       if x is not None}
        top = {k: x for k, x in {"mode": mode, "candidates": candidates}.items() if x is not None}
        if isinstance(reranker, str):
            top["reranker"] = {**(cfg.reranker.to_dict() if cfg.reranker else {}),
                               "model": reranker}
        elif isinstance(reranker, (RerankConfig, Mapping)):
            top["reranker"] = reranker
        elif isinstance(reranker, Reranker):
            top["reranker"] = reranker.config
        if embedder is not None:
            emb_changes = {**embedder.config.to_dict(), **emb_changes}
        if store_changes or emb_changes or top:
            changes: dict[str, Any] = dict(top)
            if store_changes:
                changes["store"] = store_changes
            if emb_changes:
                changes["embedder"] = emb_changes
            cfg = cfg.replace(**changes)
        self.config = cfg
        self._calls = _Calls()
        self._reading = threading.Semaphore()  # reads behind the query path: one at a time
        self._owned_cache = None
        #: what the last add_documents did: records written, unchanged (skipped), removed
        self.last_add_stats: dict[str, int] = {"written": 0, "unchanged": 0, "removed": 0}
        self.embedder = embedder if embedder is not None and embedder.config == cfg.embedder \
            else Embedder(cfg.embedder)
        if cfg.cache_dir:
            from .cache import EmbeddingCache

            if self.embedder is embedder:
                # never mutate the caller's embedder: a shallow copy shares its loaded model
                self.embedder = copy.copy(embedder)
            self.embedder.cache = EmbeddingCache(Path(cfg.cache_dir) / "embeddings.sqlite")
            self._owned_cache = self.embedder.cache
        self._reranker = reranker if isinstance(reranker, Reranker) else \
            Reranker(cfg.reranker) if cfg.reranker else None
        self._store = ChromaStore(cfg.store)
        self._sparse: SparseIndex | None = None
        self._funnel: FunnelVectors | None = None
        try:
            with chroma_errors(cfg.store, "open"):
                self._open_parts()
        except BaseException:
            self.close()
            self._store.discard()  # a store this constructor created goes again
            raise

    def _open_parts(self) -> None:
        cfg, store = self.config, self._store
        upgraded = reconcile(store, cfg, self.embedder)
        local = store.local_dir
        if upgraded and local is not None:
            import shutil

            shutil.rmtree(local, ignore_errors=True)  # format-1 derived files
        if local is not None:
            repair_if_damaged(store, local, log_name(cfg.store.collection), functools.partial(
                chroma_vectors, self.embedder, cfg.funnel_dim))
        log = ChangeLog(store.client, cfg.store.collection, owner=str(store.collection.id))
        # the vectors of a selective filter's records are read from the BM25 index where it
        # persists (not in a server client's memory: each open would read them all) and no
        # copy in this process holds them (funnel, local_vectors)
        copy = cfg.funnel_dim is None and not cfg.local_vectors and local is not None
        self._sparse = SparseIndex(cfg.sparse, local / "sparse" if local else None,
                                   keep_vectors=copy)
        indexes: list[Any] = [self._sparse]
        self._funnel = None  # full vectors by record id: the funnel's, or local_vectors'
        if cfg.funnel_dim is not None or cfg.local_vectors:
            graph = GraphSettings(cfg.store.hnsw_m, cfg.store.hnsw_ef_construction,
                                  cfg.store.hnsw_ef_search) if cfg.funnel_dim is None else None
            self._funnel = FunnelVectors(self.embedder.dim, self.embedder.embed_documents,
                                         local / "funnel" if local else None, graph)
            indexes.append(self._funnel)
        self._follower = Follower(store, log, indexes, sole_writer=not cfg.store.is_server,
                                  vectors_in_store=cfg.funnel_dim is None
                                  and (cfg.local_vectors or copy))
        self._follower.rebuild_if_ahead()
        self._follower.catch_up()
        self._check_truth()
        self._writer = Writer(store, log, self._follower, self.embedder, cfg.chunking,
                              cfg.funnel_dim)
        engine = LocalEngine(store, self._sparse, self._funnel, FusionSettings(
            cfg.rrf_k, cfg.weights, cfg.funnel_dim, cfg.funnel_candidates,
            by_document=cfg.collapse_chunks, method=cfg.fusion,
            chunk_penalty=cfg.chunk_penalty), background=self._behind)
        self._searcher = Searcher(
            engine, self.embedder.embed_query, self._reranker, dim=self.embedder.dim,
            collapse=cfg.collapse_chunks,
            before=self._follower.catch_up if cfg.store.is_server else None)

    def _behind(self, task: Callable[[], Any]) -> bool:
        """Run `task` in a thread of its own as a call of this retriever (`close` waits
        for it; once closing, it does not start), one at a time. False when it does not
        run (another is under way, or no thread could start): the caller asks again on its
        next search. A failure is logged, not raised: the query path that started it has
        its answer already."""
        if not self._reading.acquire(blocking=False):
            return False

        def run() -> None:
            try:
                with self._calls.entered("read a filter's vectors"):
                    task()
            except Exception:
                logger.debug("a read behind the query path failed", exc_info=True)
            finally:
                self._reading.release()

        try:
            threading.Thread(target=run, name="retrievekit-behind", daemon=True).start()
        except RuntimeError:  # no thread to be had (interpreter shutting down, a limit)
            self._reading.release()
            return False
        return True

    def _check_truth(self) -> None:
        """Notice a damaged Chroma at open: fewer records than the BM25 index holds (an
        embedded store has one writer, so after the catch-up both agree), unless the BM25
        index's own extra records explain it (`_bm25_only_stale`: rebuilt), or a server's
        vector index that does not find its own vectors."""
        if not self.config.store.is_server:
            chroma, bm25 = self._store.count(), len(self._sparse)
            if chroma < bm25 and not self._bm25_only_stale():
                raise StoreError(
                    f"Chroma holds {chroma} records of collection "
                    f"{self.config.store.collection!r} but the BM25 index, which follows it, "
                    f"holds {bm25}: Chroma's database lost records. Restore the store "
                    "directory from a backup (if you restored only chroma.sqlite3 on "
                    f"purpose, delete {str(self._store.local_dir)!r} to rebuild the derived "
                    "indexes from it)")
            if chroma != bm25:
                logger.warning("the BM25 index holds %d records, Chroma %d; rebuilding it",
                               bm25, chroma)
                self._follower.rebuild()
        else:  # an embedded store's vector index was checked (and repaired) before
            self._store.check_vectors()

    def _bm25_only_stale(self) -> bool:
        """Whether every record the BM25 index holds beyond Chroma's is the index's own
        error: an id held twice, or a record that a later write in the log replaced or
        deleted (a delete it missed; seen once after random kills, cause not found). A
        record Chroma lost has no such write; nor can one be told apart past the log's
        trimmed floor. Reads every id of both: only at an open that found them apart."""
        ids = self._sparse.ids()
        if len(ids) < len(self._sparse):
            return True
        extra = sorted(ids - set(self._store.get(include=[])["ids"]))
        held = self._sparse.records(extra)
        written = {rid: int(meta.get(SEQ_KEY, 0)) for rid, (_, meta) in held.items()}
        log = self._follower.log
        if not extra or len(written) < len(extra) or min(written.values()) <= log.floor():
            return False
        last: dict[str, int] = {}  # document -> the latest write naming it
        for entry in log.since(min(written.values())):
            for parent in entry.parents:
                last[parent] = entry.seq
        return all(last.get(str(held[rid][1].get(PARENT_KEY, rid)), 0) > seq
                   for rid, seq in written.items())

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str = ".retrievekit", *, collection: str = "retrievekit",
             host: str | None = None, port: int = 8000, ssl: bool = False,
             auth_token: str | None = None, replica_dir: str | None = None,
             private: bool = False, **changes: Any) -> "HybridRetriever":
        """Open an existing store with the settings recorded in it (model, prefixes, ...).

        `host`, `port`, `ssl`, `auth_token`, `replica_dir`: a Chroma server instead of the
        directory `path`; `private`: as `StoreConfig`'s.
        `changes` may set query-time options (mode, candidates, reranker, fusion, rrf_k,
        weights) and settings that are not recorded (embedder batch_size, device, ...); a
        table given in part keeps the recorded values of the keys it leaves out.
        """
        store_cfg: dict[str, Any] = {"path": path, "collection": collection, "private": private}
        if host is not None:
            store_cfg.update(host=host, port=port, ssl=ssl, auth_token=auth_token,
                             replica_dir=replica_dir)
        probe = ChromaStore(RetrieverConfig.from_dict({"store": store_cfg}).store,
                            create=False)
        try:
            recorded = probe.read_settings()
        finally:
            probe.close()
        if recorded is None:
            raise StoreError(f"no retrievekit store in collection {collection!r} at "
                             f"{host + ':' + str(port) if host else path!r}; create one with "
                             "HybridRetriever(path=...) and add_documents")
        reranker = changes.pop("reranker", None)
        return cls(config_from_settings(recorded, store_cfg, changes), reranker=reranker)

    # -- parts other modules may use -------------------------------------------------------
    @property
    def store(self) -> ChromaStore:
        """The Chroma store, to inspect the truth (writes go through this retriever)."""
        return self._store

    @property
    def reranker(self) -> Reranker | None:
        return self._reranker

    @reranker.setter
    def reranker(self, reranker: Reranker | None) -> None:
        if reranker is not None and not isinstance(reranker, Reranker):
            raise ConfigError(f"reranker must be a Reranker or None, got {type(reranker).__name__}")
        self._reranker = reranker
        self._searcher.reranker = reranker

    # -- writes ----------------------------------------------------------------------------
    @_guarded("add documents")
    def add_documents(self, documents: Iterable[Document | str | Mapping[str, Any]], *,
                      progress: bool | None = None,
                      batch_records: int | None = None) -> list[str]:
        """Insert or replace documents by id; returns their ids in input order.

        Unchanged documents (same text and metadata under the same id) are skipped without
        re-encoding; an id given twice in one call must carry the same content (then it is
        one document). Each document lands whole: its old version or its new one, even after
        a crash.

        The add is streamed: documents are chunked, encoded and written in batches of at
        most `batch_records` records (default: one Chroma batch, `get_max_batch_size()`,
        5,461 with chromadb 1.x embedded, capped at `writer.BATCH_RECORDS`; all records of
        a batch's documents count, a document is never split), each batch before the next
        is read. So memory follows the batch, not the input, and `documents` may be any
        iterable.

        - A list (any sequence) is validated whole first, without encoding (types, ids,
          metadata, repeated ids and, with chunking disabled, lengths): a bad document
          refuses the call before anything is written.
        - Any other iterable (a generator) is read once, batch by batch, and never held
          whole. A bad document, or an id repeated with other content, is found when it is
          reached: the batches before it stay written. The error names it
          (`documents[i]`) and says how many documents were written (`documents[0:n]`,
          each whole). Adding the whole input again is safe: unchanged documents are
          skipped. What is kept across batches: the ids returned and, per id, a 16-byte
          digest of its content for the repeated-id check.

        A failed write (Chroma, disk) likewise leaves the batches before it written.

        Args:
            progress: a tqdm bar over documents; default: for adds of more than 256
                documents, when stderr is a terminal.
            batch_records: records per streamed batch (an int >= 1).
        """
        if isinstance(documents, (str, Document, Mapping)):
            raise InvalidInputError("documents must be a list; wrap the single document in a list")
        if isinstance(documents, bytes) or not isinstance(documents, Iterable):
            v.fail("documents", "a list of Documents, str or dicts (or any iterable of them)",
                   documents,
                   "e.g. [Document('text', id='a')]", error=InvalidInputError)
        v.integer("batch_records", batch_records, optional=True, error=InvalidInputError,
                  fix="None: one Chroma batch")
        ids: list[str] = []
        if isinstance(documents, Sequence):
            checked = list(_validated(documents, ids))  # all of it, before any write
            if not ids:
                return []
            if not self.config.chunking.enabled:
                self._writer.check(checked)
            source: Iterable[Document] = _drained(checked)
            total: int | None = len(documents)
        else:
            source = _validated(documents, ids)
            total = None
        stats = self._writer.add(source, progress=progress, batch_records=batch_records,
                                 total=total)
        self.last_add_stats = stats.to_dict()
        return ids

    @_guarded("delete documents")
    def delete(self, ids: Sequence[str]) -> int:
        """Delete documents (and all their chunks) by id; returns how many records went.
        Unknown ids are ignored, so a repeated delete is safe."""
        ids = _id_list(ids)
        return self._writer.delete(ids) if ids else 0

    # -- reads -----------------------------------------------------------------------------
    @_guarded("count records")
    def count(self) -> int:
        """Number of stored records (chunks count one each)."""
        if self._sparse is None:
            return 0
        if self.config.store.is_server:
            self._follower.catch_up()  # writes of other clients count too
        return len(self._sparse)

    @_guarded("read documents")
    def get(self, ids: Sequence[str]) -> list[Document]:
        """Documents by id (chunked ones are put back together); unknown ids are skipped."""
        ids = _id_list(ids)
        if not ids:
            return []
        got = self._store.of_parents(ids)
        parts: dict[str, list] = {}
        for r in from_chroma(got["ids"], got["documents"], got["metadatas"]):
            parts.setdefault(r.parent, []).append(r)
        out = []
        for doc_id in ids:
            if doc_id in parts:
                text, meta = reassemble(parts[doc_id])
                out.append(Document(text=text, id=doc_id, metadata=meta))
        return out

    @_guarded("list document ids")
    def document_ids(self, where: Mapping[str, Any] | None = None) -> list[str]:
        """Ids of the stored documents (matching a Chroma `where` filter when given)."""
        validate_where(where)
        # one read of ids only (no page limit): pages by offset skip records when a delete
        # meanwhile shifts them
        ids = self._store.get(where=live_where(where), include=[])["ids"]
        return list(dict.fromkeys(parent_of(rid) for rid in ids))

    @_guarded("read stored vectors")
    def stored_vectors(self, ids: Sequence[str]) -> list[tuple[str, np.ndarray]]:
        """(document id, vector) for each stored record of these documents: one per chunk;
        with a funnel, the short vectors Chroma holds."""
        got = self._store.of_parents(_id_list(ids), include=["embeddings", "metadatas"])
        return [(str(meta[PARENT_KEY]), np.asarray(vec, dtype=np.float32))
                for vec, meta in zip(got["embeddings"], got["metadatas"])
                if from_chroma([""], [None], [meta])]

    @_guarded("search")
    def search(self, query: str, k: int = 10, *, where: Mapping[str, Any] | None = None,
               mode: str | None = None, rerank: bool | None = None,
               candidates: int | None = None,
               query_vector: np.ndarray | None = None,
               weights: Mapping[str, float] | None = None,
               sparse_candidates: int | None = None) -> list[Hit]:
        """Search; returns at most `k` hits, best first.

        Args:
            query: the query text.
            k: hits to return (clamped to what the store holds).
            where: a Chroma metadata filter, applied to the dense and the BM25 side alike.
            mode: "hybrid" (default from config), "dense" or "sparse".
            rerank: rerank with the configured cross-encoder (default: when one is configured).
            candidates: per-side candidates for fusion (default from config).
            query_vector: the query's embedding, computed earlier with `embedder.embed_query`
                (same model, prefix, truncation, normalization); used as given instead of
                encoding `query`, which the BM25 side and the reranker still read.
            weights: this call's fusion weights, e.g. ``{"dense": 0.7, "sparse": 0.3}``
                (default from config; a side left out keeps its configured weight).
            sparse_candidates: the BM25 side's candidates, when they should differ from
                `candidates` (which then counts for the dense side only); at least `k` in
                sparse mode, where that list is the answer.
        """
        sparse = self._sparse
        return self._searcher.search(
            query, k, total=lambda: len(sparse), where=where,
            mode=self.config.mode if mode is None or mode == "" else mode,
            rerank=rerank, query_vector=query_vector, weights=weights,
            sparse_candidates=sparse_candidates,
            candidates=candidates if candidates is not None else self.config.candidates)

    def relevance(self, hit: Hit, *, weights: Mapping[str, float] | None = None) -> float:
        """A hit's score mapped to [0, 1], comparable across queries (for score thresholds):
        the cross-encoder's sigmoid score when reranked; in hybrid mode the fused score over
        the best one possible (1: at or above the mean + 3 sd of both sides under dbsf, the
        top of both under relative_score, first on both under RRF); in dense mode the cosine
        similarity (negative ones as 0). `weights`: those the search that found the hit was
        given (None: the configured ones), which set the best fused score possible.

        Raises:
            InvalidInputError: for a sparse-only hit: BM25 scores have no upper bound, so
                they have no [0, 1] form; threshold on `Hit.score` instead.
        """
        from .fusion import score_ceiling

        if not isinstance(hit, Hit):
            v.fail("hit", "a Hit returned by search", hit, error=InvalidInputError)
        if "rerank" in hit.scores and self._reranker is not None:
            s = hit.scores["rerank"]
            return float(s if self._reranker.config.sigmoid else 1 / (1 + np.exp(-s)))
        if "fused" in hit.scores:
            cfg = self.config
            used = {**cfg.weights, **(check_weights(weights) if weights is not None else {})}
            ceiling = score_ceiling(cfg.fusion, used, cfg.rrf_k)
            return min(1.0, max(0.0, hit.scores["fused"] / ceiling)) if ceiling else 0.0
        if "dense" in hit.scores:
            return min(1.0, max(0.0, float(hit.scores["dense"])))
        raise InvalidInputError(
            "relevance scores exist for dense, hybrid and reranked hits; BM25 scores (mode="
            "'sparse') have no upper bound: threshold on Hit.score, or search in hybrid mode")

    @_guarded("search")
    def search_mmr(self, query: str, k: int = 4, *, fetch_k: int = 20,
                   lambda_mult: float = 0.5, where: Mapping[str, Any] | None = None,
                   mode: str | None = None, query_vector: Any = None) -> list[Hit]:
        """Maximal Marginal Relevance: `fetch_k` hits found as by `search` (no reranking),
        then `k` of them picked for relevance to the query and novelty among each other
        (cosine similarity of the stored vectors of the matched chunks; diversity.py).

        Args:
            lambda_mult: 1 picks by relevance alone, 0 by diversity alone.
            query_vector: the query's vector, as for `search` (then `query` is not encoded).
        """
        from .diversity import mmr
        from .funnel import short_vectors

        for name, value in (("k", k), ("fetch_k", fetch_k)):
            v.integer(name, value, error=InvalidInputError)
        v.number("lambda_mult", lambda_mult, 0, 1, error=InvalidInputError,
                 fix="1 picks by relevance alone, 0 by diversity alone")
        vec = query_vector if query_vector is not None else \
            self.embedder.embed_query(query) if isinstance(query, str) and query.strip() \
            else None
        hits = self.search(query, max(fetch_k, k), where=where, mode=mode, rerank=False,
                           query_vector=vec)  # checks query_vector
        if not hits:
            return []
        # as `search` read it: unit length, taken in float64 (a vector of 1e20s or 1e-25s
        # overflows or vanishes in float32, and every relevance would be 0)
        vec = np.asarray(vec, dtype=np.float64)
        vec = (vec / np.linalg.norm(vec)).astype(np.float32)
        chunk_ids = [h.chunk_id or h.id for h in hits]
        got = self._store.get(ids=chunk_ids, include=["embeddings"])
        stored = dict(zip(got["ids"], got["embeddings"]))
        keep = [i for i, c in enumerate(chunk_ids) if c in stored]
        vectors = np.asarray([stored[chunk_ids[i]] for i in keep], dtype=np.float32)
        if self.config.funnel_dim is not None:  # Chroma holds the short vectors
            vec = short_vectors(vec, self.config.funnel_dim)[0]
        return [hits[keep[j]] for j in mmr(vec, vectors, k, lambda_mult)]

    @_guarded("search")
    def sparse_candidates(self, query: str, n: int) -> list[tuple[str, float]]:
        """The BM25 side alone: up to `n` (record id, score), best first."""
        v.readable("query", query, "pass the text to search for")
        v.integer("n", n, error=InvalidInputError)
        return self._sparse.search(query, n)

    async def asearch(self, query: str, k: int = 10, **kwargs: Any) -> list[Hit]:
        """`search` run in a worker thread, so the event loop is not blocked."""
        return await asyncio.to_thread(self.search, query, k, **kwargs)

    async def aadd_documents(self, documents: Iterable[Document | str | Mapping[str, Any]],
                             **kwargs: Any) -> list[str]:
        """`add_documents` run in a worker thread (a list is copied first; any other
        iterable is read in that thread)."""
        docs = list(documents) if isinstance(documents, Sequence) else documents
        return await asyncio.to_thread(self.add_documents, docs, **kwargs)

    async def adelete(self, ids: Sequence[str]) -> int:
        return await asyncio.to_thread(self.delete, _id_list(ids))

    @_guarded("verify the derived indexes")
    def verify(self) -> dict[str, Any]:
        """Compare the derived indexes with Chroma, record by record (reads every id: a
        check for tests and operators, not for the query path). Run it while nothing
        writes to the store: it reads Chroma in pages and the indexes after, so a write
        meanwhile shows as a difference.

        Returns the live record ids in Chroma, in the BM25 index, in the vector copy and its
        graph (None without local_vectors or a funnel), the number of dead
        records and of unfinished log entries, the ids whose text or metadata in the BM25
        index's stored copy differs from Chroma's (`stale`), and `ok`: whether they all
        agree."""
        live: set[str] = set()
        dead = 0
        stale: list[str] = []
        for batch in self._store.iter_records(include=["documents", "metadatas"]):
            records = {r.id: r for r in from_chroma(batch["ids"], batch["documents"],
                                                   batch["metadatas"])}
            dead += len(batch["ids"]) - len(records)
            live.update(records)
            held = self._sparse.records(list(records)) if self._sparse is not None else {}
            stale += [rid for rid, (text, meta) in held.items()
                      if (text, meta) != (records[rid].text, records[rid].metadata)]
        sparse = self._sparse.ids() if self._sparse is not None else set()
        funnel = self._funnel.ids() if self._funnel is not None else None
        graph = self._funnel.graph.ids() if self._funnel is not None \
            and self._funnel.graph is not None else None
        pending = len(self._follower.log.pending())
        return {"chroma_ids": live, "sparse_ids": sparse, "funnel_ids": funnel,
                "graph_ids": graph, "dead": dead, "pending": pending, "stale": sorted(stale),
                "ok": live == sparse and funnel in (None, live) and graph in (None, live)
                and not dead and not pending and not stale}

    # -- lifecycle -------------------------------------------------------------------------
    @_guarded("describe itself")
    def info(self) -> dict[str, Any]:
        """What the store holds and its settings."""
        n = self.count()
        return {"records": n, "bm25_records": n, "chroma_records": self._store.count(),
                "log_watermark": self._sparse.watermark if self._sparse else None,
                "store": self.config.store.to_dict(), "settings": self._store.read_settings()}

    def close(self) -> None:
        """Release the store (and its directory lock), once the calls under way in other
        threads have returned; later calls raise StoreError."""
        self._calls.close()
        sparse, self._sparse = self._sparse, None
        if sparse is not None:
            sparse.close()
        funnel, self._funnel = self._funnel, None
        if funnel is not None:
            funnel.close()
        if self._store.client is not None:
            self._store.close()
        cache = self._owned_cache
        if cache is not None:  # only the cache this retriever opened (config.cache_dir)
            self._owned_cache = None
            self.embedder.cache = None
            cache.close()

    def __enter__(self) -> "HybridRetriever":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _id_list(ids: Any) -> list[str]:
    """A list of document ids: a str, a dict, bytes or a non-iterable are refused (a str
    would be read as its characters)."""
    if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable):
        what = "a single str" if isinstance(ids, str) else type(ids).__name__
        raise InvalidInputError(f"ids must be a list of document ids, got {what} "
                                f"{v.shown(ids)}; wrap it in a list")
    ids = list(ids)
    for i, x in enumerate(ids):
        v.text(f"ids[{i}]", x, empty=False, error=InvalidInputError)
    return ids


def _as_config(config: RetrieverConfig | Mapping[str, Any] | str | None) -> RetrieverConfig:
    if config is None:
        return RetrieverConfig()
    if isinstance(config, RetrieverConfig):
        return config
    if isinstance(config, Mapping):
        return RetrieverConfig.from_dict(config)
    if isinstance(config, (str, Path)):
        return RetrieverConfig.from_toml(config)
    raise ConfigError(f"config must be a RetrieverConfig, a dict or a TOML path, got "
                      f"{type(config).__name__}")


def _validated(documents: Iterable[Any], ids: list[str] | None = None, *,
               unique: bool = True) -> Iterator[Document]:
    """The documents normalized and checked one by one, as they are read.

    `unique`: refuse an id repeated with other content (anywhere in `documents`). `ids`: each
    document's id is appended to it as the document is read."""
    seen: dict[str, bytes] = {}
    for i, d in enumerate(_callers(documents)):
        doc = _normalize_document(d, i)
        assert doc.id is not None
        if unique and seen.setdefault(doc.id, key := _content_key(doc)) != key:
            raise InvalidInputError(
                f"documents[{i}] has id {doc.id!r}, like an earlier document but with other "
                "content; ids must be unique within a batch (one add_documents call): drop "
                "one, or give them different ids")
        if ids is not None:
            ids.append(doc.id)
        yield doc


def _drained(items: list[Any]) -> Iterator[Any]:
    """The items of a list, each let go of by the list as it is handed out."""
    for i in range(len(items)):
        item, items[i] = items[i], None
        yield item


def _callers(items: Iterable[Any]) -> Iterator[Any]:
    """`items`, with an error raised by the caller's own iterable marked as the caller's:
    it reaches the caller as it was, not as a store failure (store.chroma_errors)."""
    it = iter(items)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as exc:
            exc.retrievekit_caller = True  # type: ignore[attr-defined]
            raise
        yield item


def _content_key(doc: Document) -> bytes:
    """A digest of a normalized document's text and metadata (for the repeated-id check)."""
    h = hashlib.blake2b(doc.text.encode("utf-8"), digest_size=16)
    h.update(repr(sorted(doc.metadata.items())).encode("utf-8"))
    return h.digest()


def _normalize_document(d: Any, i: int) -> Document:
    """documents[i] as a Document with an id and clean metadata, or InvalidInputError."""
    if isinstance(d, str):
        d = Document(text=d)
    elif isinstance(d, Mapping):
        unknown = set(d) - {"text", "id", "metadata"}
        if unknown or "text" not in d:
            raise InvalidInputError(
                f"documents[{i}] must have keys 'text' and optionally 'id', 'metadata'; "
                f"got {sorted(d)}")
        d = Document(text=d["text"], id=d.get("id"), metadata=d.get("metadata") or {})
    elif not isinstance(d, Document):
        raise InvalidInputError(
            f"documents[{i}] must be a Document, a str or a dict, got {type(d).__name__}")
    v.readable(f"documents[{i}].text", d.text, "give the text to index, or drop it")
    if v.text(f"documents[{i}].id", d.id, optional=True, empty=False,
              error=InvalidInputError, fix="None derives one from the text") is not None:
        check_document_id(d.id, f"documents[{i}].id")
    meta = clean_metadata(d.metadata, f"documents[{i}]")
    return Document(text=d.text, id=d.id if d.id is not None else text_id(d.text), metadata=meta)
