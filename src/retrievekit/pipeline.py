"""`HybridRetriever`: dense (Chroma) + BM25, fused by RRF, optionally reranked.

Writes go Chroma first, derived state (the BM25 index) after, and every write is an
idempotent upsert by id. A change marker in the collection's metadata tells any reader whose
BM25 index was saved before the last write that it must catch up.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .chunking import chunk_id, split_text
from .config import MODES, RetrieverConfig
from .embedding import Embedder
from .errors import ConfigError, InvalidInputError, StoreError, StoreMismatchError
from .funnel import FunnelVectors, short_vectors
from .fusion import reciprocal_rank_fusion
from .rerank import RerankConfig, Reranker
from .sparse import BM25Index
from .store import CHUNK_KEY, PARENT_KEY, ChromaStore, clean_metadata, public_metadata
from .types import Document, Hit, text_id

logger = logging.getLogger(__name__)

STORE_FORMAT = 1
HASH_KEY = "_rk_hash"
START_KEY = "_rk_start"
END_KEY = "_rk_end"
#: The marker of derived state known to be out of step; no store ever holds it.
STALE_MARKER = "stale"


def _hash_record(text: str, metadata: Mapping[str, Any]) -> str:
    h = hashlib.sha256(text.encode("utf-8"))
    h.update(repr(sorted(metadata.items())).encode("utf-8"))
    return h.hexdigest()[:24]


@dataclass(frozen=True)
class _Record:
    id: str
    parent: str
    position: int
    text: str
    metadata: dict[str, Any]


class HybridRetriever:
    """Hybrid BM25 + dense retrieval over a Chroma collection.

    Args:
        config: a `RetrieverConfig`, a dict, or a path to a TOML file (default settings if None).
        embedder / reranker: ready-made parts to use instead of building them from the config;
            `reranker` may also be a model name.
        path, host, port, collection, model, truncate_dim, mode, candidates: shortcuts for the
            most used settings.
    """

    def __init__(self, config: RetrieverConfig | Mapping[str, Any] | str | None = None, *,
                 embedder: Embedder | None = None,
                 reranker: Reranker | RerankConfig | str | None = None,
                 path: str | None = None, host: str | None = None, port: int | None = None,
                 collection: str | None = None, model: str | None = None,
                 truncate_dim: int | None = None, mode: str | None = None,
                 candidates: int | None = None) -> None:
        cfg = _as_config(config)
        store_changes = {k: v for k, v in
                         {"path": path, "host": host, "port": port, "collection": collection
                          }.items() if v is not None}
        emb_changes = {k: v for k, v in {"model": model, "truncate_dim": truncate_dim}.items()
                       if v is not None}
        top = {k: v for k, v in {"mode": mode, "candidates": candidates}.items() if v is not None}
        if isinstance(reranker, str):
            top["reranker"] = {**(cfg.reranker.to_dict() if cfg.reranker else {}),
                               "model": reranker}
        elif isinstance(reranker, RerankConfig):
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
        self._owned_cache = None
        self._write_lock = threading.RLock()
        #: what the last add_documents did: records written, unchanged (skipped), removed
        self.last_add_stats: dict[str, int] = {"written": 0, "unchanged": 0, "removed": 0}
        self._sync_lock = threading.Lock()
        self.embedder = embedder if embedder is not None and embedder.config == cfg.embedder \
            else Embedder(cfg.embedder)
        if cfg.cache_dir:
            from .cache import EmbeddingCache

            if self.embedder is embedder:
                # never mutate the caller's embedder: a shallow copy shares its loaded model
                self.embedder = copy.copy(embedder)
            self.embedder.cache = EmbeddingCache(Path(cfg.cache_dir) / "embeddings.sqlite")
            self._owned_cache = self.embedder.cache
        if isinstance(reranker, Reranker):
            self.reranker: Reranker | None = reranker
        else:
            self.reranker = Reranker(cfg.reranker) if cfg.reranker else None
        self.store = ChromaStore(cfg.store)
        try:
            self._check_settings()
            self.sparse = self._open_sparse()
            self.funnel = self._open_funnel()
        except BaseException:
            self.store.close()
            raise

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str = ".retrievekit", *, collection: str = "retrievekit",
             host: str | None = None, port: int = 8000, ssl: bool = False,
             auth_token: str | None = None, **changes: Any) -> "HybridRetriever":
        """Open an existing store with the settings recorded in it (model, prefixes, ...).

        `host`, `port`, `ssl`, `auth_token`: a Chroma server instead of the directory `path`.
        `changes` may set query-time options (mode, candidates, reranker, rrf_k, weights).
        """
        store_cfg: dict[str, Any] = {"path": path, "collection": collection}
        if host is not None:
            store_cfg.update(host=host, port=port, ssl=ssl, auth_token=auth_token)
        probe = ChromaStore(RetrieverConfig.from_dict({"store": store_cfg}).store)
        try:
            recorded = probe.read_settings()
        finally:
            probe.close()
        if recorded is None:
            raise StoreError(f"no retrievekit store in collection {collection!r} at "
                             f"{host + ':' + str(port) if host else path!r}; create one with "
                             "HybridRetriever(path=...) and add_documents")
        emb = recorded["embedder"]
        cfg = {
            "store": store_cfg,
            "embedder": {"model": emb["model"], "truncate_dim": emb["truncate_dim"],
                         "normalize": emb["normalize"], "query_prefix": emb["query_prefix"],
                         "document_prefix": emb["document_prefix"]},
            "sparse": {k: v for k, v in recorded["sparse"].items() if k != "format"},
            "chunking": recorded.get("chunking", {}),
            "funnel_dim": recorded.get("funnel_dim"),
        }
        reranker = changes.pop("reranker", None)
        cfg.update(changes)
        return cls(RetrieverConfig.from_dict(cfg), reranker=reranker)

    def _settings(self) -> dict[str, Any]:
        return {"format": STORE_FORMAT, "embedder": self.embedder.identity(),
                "sparse": BM25Index(self.config.sparse).signature(),
                "chunking": self.config.chunking.to_dict(),
                "funnel_dim": self.config.funnel_dim}

    def _check_settings(self) -> None:
        td = self.config.embedder.truncate_dim
        if td is not None:  # checked against the model before a new store records it
            dim = self.embedder.model_dim
            if td > dim:
                raise ConfigError(
                    f"truncate_dim={td} is larger than the dimension of "
                    f"{self.config.embedder.model!r} ({dim}); use a value <= {dim} or None")
        fd = self.config.funnel_dim
        if fd is not None and fd >= self.embedder.dim:
            raise ConfigError(
                f"funnel_dim={fd} must be smaller than the embedding dimension "
                f"({self.embedder.dim}); try {self.embedder.dim // 3} or None to switch it off")
        ours = self._settings()
        recorded = self.store.read_settings()
        if recorded is None:
            n = self.store.count()
            if n:
                raise StoreMismatchError(
                    f"collection {self.config.store.collection!r} holds {n} records that "
                    "retrievekit did not write (no recorded settings); use another "
                    "store.collection name")
            self.store.write_settings(ours, marker="")
            return
        diffs = _diff(recorded, ours)
        if diffs:
            lines = "; ".join(f"{k}: store has {a!r}, this retriever has {b!r}"
                              for k, a, b in diffs)
            raise StoreMismatchError(
                f"the store at collection {self.config.store.collection!r} was made with other "
                f"settings ({lines}). Open it with HybridRetriever.open(path) to use its "
                "settings, or choose another store.path/collection for the new ones")

    def _open_sparse(self) -> BM25Index:
        marker = self.store.read_marker()
        local = self.store.local_dir
        index = _load_derived(BM25Index.load, local / "sparse", self.config.sparse) \
            if local else None
        if index is not None and index.marker == marker and len(index) == self.store.count():
            return index
        if index is not None:
            logger.info("BM25 index is out of step with Chroma; catching up")
        index = index or BM25Index(self.config.sparse)
        self._catch_up(index, marker)
        return index

    def _open_funnel(self) -> FunnelVectors | None:
        fd = self.config.funnel_dim
        if fd is None:
            return None
        local = self.store.local_dir
        dim = self.embedder.dim
        funnel = _load_derived(FunnelVectors.load, local / "funnel", dim) if local else None
        marker = self.store.read_marker()
        if funnel is not None and funnel.marker == marker and len(funnel) == self.store.count():
            return funnel
        funnel = funnel or FunnelVectors(dim)
        self._catch_up_funnel(funnel, marker)
        return funnel

    def _remote_hashes(self) -> dict[str, str]:
        remote: dict[str, str] = {}
        for batch in self.store.iter_records(include=["metadatas"]):
            for rid, meta in zip(batch["ids"], batch["metadatas"]):
                remote[rid] = str((meta or {}).get(HASH_KEY, ""))
        return remote

    def _catch_up_funnel(self, funnel: FunnelVectors, marker: str) -> None:
        """Re-encode the texts whose full vectors are missing or stale (cache makes it cheap)."""
        remote = self._remote_hashes()
        local = funnel.hashes()
        stale = [rid for rid in local if rid not in remote]
        changed = [rid for rid, h in remote.items() if local.get(rid) != h]
        funnel.delete(stale)
        step = self.store.max_batch
        for s in range(0, len(changed), step):
            got = self.store.get(ids=changed[s:s + step], include=["documents", "metadatas"])
            vecs = self.embedder.embed_documents(got["documents"])
            funnel.upsert(got["ids"], vecs,
                          [str((m or {}).get(HASH_KEY, "")) for m in got["metadatas"]])
        funnel.marker = marker
        if self.store.local_dir is not None and (stale or changed or not
                                                 (self.store.local_dir / "funnel").exists()):
            funnel.save(self.store.local_dir / "funnel", marker)

    def _catch_up(self, index: BM25Index, marker: str) -> None:
        """Make `index` equal to what Chroma holds, fetching only changed records."""
        remote = self._remote_hashes()
        local = index.hashes()
        stale = [rid for rid in local if rid not in remote]
        changed = [rid for rid, h in remote.items() if local.get(rid) != h]
        if stale:
            index.delete(stale)
        step = self.store.max_batch
        for s in range(0, len(changed), step):
            got = self.store.get(ids=changed[s:s + step], include=["documents", "metadatas"])
            index.upsert(got["ids"], got["documents"],
                         [str((m or {}).get(HASH_KEY, "")) for m in got["metadatas"]])
        index.marker = marker
        if self.store.local_dir is not None and (stale or changed or not
                                                 (self.store.local_dir / "sparse").exists()):
            index.save(self.store.local_dir / "sparse", marker)
        if stale or changed:
            logger.info("BM25 caught up with Chroma: %d removed, %d added or changed",
                        len(stale), len(changed))

    def _sync(self) -> None:
        """Before a search against a server: catch up with writes made by other clients."""
        if not self.config.store.is_server:
            return
        marker = self.store.read_marker()
        if marker != self.sparse.marker:
            with self._sync_lock:
                if marker != self.sparse.marker:
                    self._catch_up(self.sparse, marker)
        if self.funnel is not None and marker != self.funnel.marker:
            with self._sync_lock:
                if marker != self.funnel.marker:
                    self._catch_up_funnel(self.funnel, marker)

    # -- writes ----------------------------------------------------------------------------
    def _records(self, docs: Sequence[Document]) -> list[_Record]:
        ch = self.config.chunking
        emb = self.embedder
        window = ch.max_tokens
        if window is None:
            prefix_tokens = len(emb.tokenizer(emb.prefixes.document, add_special_tokens=False)
                                ["input_ids"])
            window = emb.max_seq_length - 2 - prefix_tokens
        overlap = min(ch.overlap_tokens, window // 2)
        lengths = [len(ids) for ids in emb.tokenizer(
            [d.text for d in docs], add_special_tokens=False, truncation=False,
            verbose=False)["input_ids"]]
        out: list[_Record] = []
        for doc, n in zip(docs, lengths):
            meta = dict(doc.metadata)
            if n <= window:
                out.append(_Record(doc.id, doc.id, 0, doc.text,
                                   {**meta, PARENT_KEY: doc.id, CHUNK_KEY: 0}))
                continue
            if not ch.enabled:
                raise InvalidInputError(
                    f"document {doc.id!r} has {n} tokens, more than the model reads ({window}); "
                    "enable chunking (chunking.enabled=true) or split it before adding")
            spans = split_text(doc.text, emb.tokenizer, window, overlap)
            for pos, (begin, end) in enumerate(spans):
                out.append(_Record(chunk_id(doc.id, pos), doc.id, pos, doc.text[begin:end],
                                   {**meta, PARENT_KEY: doc.id, CHUNK_KEY: pos,
                                    START_KEY: begin, END_KEY: end}))
        return out

    def add_documents(self, documents: Iterable[Document | str | Mapping[str, Any]], *,
                      progress: bool | None = None) -> list[str]:
        """Insert or replace documents by id; returns their ids in input order.

        Unchanged documents (same text and metadata under the same id) are skipped without
        re-encoding. The whole batch is validated and embedded before anything is written.
        """
        docs = _normalize_documents(documents)
        if not docs:
            return []
        ids = [d.id for d in docs]
        unique: dict[str, Document] = {}
        for d in docs:
            prev = unique.get(d.id)
            if prev is not None and (prev.text != d.text or dict(prev.metadata) != dict(d.metadata)):
                raise InvalidInputError(
                    f"documents has two different entries with id {d.id!r}; ids must be unique "
                    "within a batch (drop one, or give them different ids)")
            unique[d.id] = d
        records = self._records(list(unique.values()))
        for r in records:
            r.metadata[HASH_KEY] = _hash_record(r.text, public_metadata(r.metadata))
        with self._write_lock:
            existing = self._existing(list(unique))
            new_ids = {r.id for r in records}
            stale = [rid for rid in existing if rid not in new_ids]
            todo = [r for r in records if existing.get(r.id) != r.metadata[HASH_KEY]]
            self.last_add_stats = {"written": len(todo), "unchanged": len(records) - len(todo),
                                   "removed": len(stale)}
            if not todo and not stale:
                return ids
            vectors = self.embedder.embed_documents([r.text for r in todo], progress=progress)
            stored = vectors if self.funnel is None else short_vectors(vectors,
                                                                       self.config.funnel_dim)
            started, in_step = self._begin_write()
            self.store.upsert([r.id for r in todo], stored, [r.text for r in todo],
                              [r.metadata for r in todo])
            if stale:
                self.store.delete(stale)
            with self._sync_lock:  # no catch-up may interleave with applying our own write
                self.sparse.upsert([r.id for r in todo], [r.text for r in todo],
                                   [r.metadata[HASH_KEY] for r in todo])
                self.sparse.delete(stale)
                if self.funnel is not None:
                    self.funnel.upsert([r.id for r in todo], vectors,
                                       [r.metadata[HASH_KEY] for r in todo])
                    self.funnel.delete(stale)
                self._finish_write(started, in_step)
        return ids

    def _begin_write(self) -> tuple[str, bool]:
        """Set a fresh change marker before writing to Chroma: derived state saved under an
        older one is stale from here on (a crash mid-write is caught up on the next open).
        Returns the marker and whether our derived state was in step with Chroma before."""
        before, started = self.store.swap_marker()
        return started, before == self.sparse.marker

    def _finish_write(self, started: str, in_step: bool) -> None:
        """Set another fresh marker now that the records are in Chroma, and save the derived
        state under it.

        A server client that caught up while the write was under way recorded `started`
        with only part of the records; the new marker makes it catch up again. Our own
        derived state takes the new marker only if it was in step before the write and no
        other client changed the marker during it; otherwise it is marked stale, and the
        next search (server) or open (embedded) catches up from Chroma."""
        current, final = self.store.swap_marker()
        self._save_sparse(final if in_step and current == started else STALE_MARKER)

    def _existing(self, parents: Sequence[str]) -> dict[str, str]:
        """Records now stored for these parent ids: record id -> content hash."""
        out: dict[str, str] = {}
        step = 1000
        for s in range(0, len(parents), step):
            part = list(parents[s:s + step])
            got = self.store.get(where={PARENT_KEY: {"$in": part}}, include=["metadatas"])
            for rid, meta in zip(got["ids"], got["metadatas"]):
                out[rid] = str((meta or {}).get(HASH_KEY, ""))
        return out

    def _save_sparse(self, marker: str) -> None:
        """Save the derived state (BM25 and funnel vectors) under the write's marker."""
        self.sparse.marker = marker
        if self.funnel is not None:
            self.funnel.marker = marker
        if self.store.local_dir is not None:
            self.sparse.save(self.store.local_dir / "sparse", marker)
            if self.funnel is not None:
                self.funnel.save(self.store.local_dir / "funnel", marker)

    def delete(self, ids: Sequence[str]) -> int:
        """Delete documents (and all their chunks) by id; returns how many records went.
        Unknown ids are ignored, so a repeated delete is safe."""
        if isinstance(ids, str):
            raise InvalidInputError("ids must be a list of ids, got a single str; wrap it in a list")
        ids = list(ids)
        for i, x in enumerate(ids):
            if not isinstance(x, str) or not x:
                raise InvalidInputError(f"ids[{i}] must be a non-empty str, got {x!r}")
        if not ids:
            return 0
        with self._write_lock:
            records = list(self._existing(ids))
            if not records:
                return 0
            started, in_step = self._begin_write()
            self.store.delete(records)
            with self._sync_lock:
                self.sparse.delete(records)
                if self.funnel is not None:
                    self.funnel.delete(records)
                self._finish_write(started, in_step)
        return len(records)

    # -- reads -----------------------------------------------------------------------------
    def count(self) -> int:
        """Number of stored records (chunks count one each)."""
        return self.store.count()

    def get(self, ids: Sequence[str]) -> list[Document]:
        """Documents by id (chunked ones are put back together); unknown ids are skipped."""
        ids = list(ids)
        if not ids:
            return []
        got = self.store.get(where={PARENT_KEY: {"$in": ids}}, include=["documents", "metadatas"])
        parts: dict[str, list[tuple[int, str, dict[str, Any]]]] = {}
        for text, meta in zip(got["documents"], got["metadatas"]):
            parts.setdefault(meta[PARENT_KEY], []).append((int(meta.get(CHUNK_KEY, 0)), text, meta))
        out = []
        for doc_id in ids:
            if doc_id not in parts:
                continue
            pieces = sorted(parts[doc_id], key=lambda p: p[0])
            text = pieces[0][1]
            end = pieces[0][2].get(END_KEY, len(text))
            for _, piece, meta in pieces[1:]:
                text += piece[end - meta[START_KEY]:]
                end = meta[END_KEY]
            out.append(Document(text=text, id=doc_id, metadata=public_metadata(pieces[0][2])))
        return out

    def search(self, query: str, k: int = 10, *, where: Mapping[str, Any] | None = None,
               mode: str | None = None, rerank: bool | None = None,
               candidates: int | None = None,
               query_vector: np.ndarray | None = None) -> list[Hit]:
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
        """
        _check_query(query)
        qvec = None if query_vector is None else _check_query_vector(query_vector,
                                                                      self.embedder.dim)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidInputError(f"k must be an int >= 1, got {k!r}")
        mode = mode or self.config.mode
        if mode not in MODES:
            raise InvalidInputError(f"mode must be one of {list(MODES)}, got {mode!r}")
        if where is not None and not isinstance(where, Mapping):
            raise InvalidInputError(
                f"where must be a dict in Chroma's filter syntax, e.g. {{'lang': 'en'}}, got "
                f"{type(where).__name__}")
        where = dict(where) if where else None
        if rerank and self.reranker is None:
            raise ConfigError("rerank=True needs a reranker: pass reranker='<cross-encoder name>' "
                              "or set config.reranker")
        use_rerank = self.reranker is not None if rerank is None else bool(rerank)
        n = candidates if candidates is not None else self.config.candidates
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidInputError(f"candidates must be an int >= 1, got {n!r}")
        want = max(k, self.reranker.config.candidates if use_rerank and self.reranker else k)
        n = max(n, want)
        self._sync()
        total = len(self.sparse)
        n = min(n, total)
        if n == 0:
            return []

        vec = None
        if mode in ("hybrid", "dense"):
            vec = self.embedder.embed_query(query) if qvec is None else qvec
        allowed = None
        if mode in ("hybrid", "sparse") and where is not None:
            try:
                allowed = self.store.get(where=where, include=[])["ids"]
            except ValueError as exc:
                raise InvalidInputError(
                    f"where={where!r} is not a valid Chroma filter: {exc}") from exc
        while True:
            hits, full = self._ranked_hits(query, vec, mode, n, where, allowed, want)
            # chunks of one document collapse into one hit: when that leaves fewer than
            # asked for, widen the candidate lists rather than return a short page
            if len(hits) >= want or n >= total or not full:
                break
            n = min(total, 2 * n)
        if use_rerank and self.reranker is not None:
            hits = self.reranker.rerank(query, hits[:self.reranker.config.candidates])
        return hits[:k]

    def _ranked_hits(self, query: str, vec: np.ndarray | None, mode: str, n: int,
                     where: dict[str, Any] | None, allowed: list[str] | None, want: int
                     ) -> tuple[list[Hit], bool]:
        """Candidates of each side, fused (hybrid) and turned into at most `want` hits.
        Also says whether any side returned a full list of `n` (more may exist)."""
        texts: dict[str, tuple[str, dict[str, Any]]] = {}
        lists: dict[str, list[tuple[str, float]]] = {}
        extra: dict[str, tuple[int, float]] = {}  # funnel stage-1 rank and score by id
        if mode in ("hybrid", "dense"):
            try:
                if self.funnel is None:
                    dense = self.store.query(vec, n, where, with_text=False)
                else:
                    dense = self._funnel_query(vec, n, where, extra)
            except ValueError as exc:
                raise InvalidInputError(f"where={where!r} is not a valid Chroma filter: {exc}") from exc
            lists["dense"] = [(rid, sim) for rid, sim, _, _ in dense]
            texts.update({rid: (t, m) for rid, _, t, m in dense if t is not None})
        if mode in ("hybrid", "sparse"):
            lists["sparse"] = self.sparse.search(query, n, allowed=allowed)

        if mode == "hybrid":
            weights = {s: self.config.weights[s] for s in lists}
            fused = reciprocal_rank_fusion(lists, k=self.config.rrf_k, weights=weights)
            ranked = [(f.id, f.score, {**f.ranks, "fused": r}, {**f.scores, "fused": f.score})
                      for r, f in enumerate(fused, start=1)]
        else:
            side = mode
            ranked = [(rid, s, {side: r}, {side: s})
                      for r, (rid, s) in enumerate(lists[side], start=1)]

        if extra:
            ranked = [(rid, sc, {**ranks, "funnel": extra[rid][0]} if rid in extra else ranks,
                       {**scores, "funnel": extra[rid][1]} if rid in extra else scores)
                      for rid, sc, ranks, scores in ranked]
        full = any(len(v) >= n for v in lists.values())
        return self._to_hits(ranked, texts, limit=want), full

    def _funnel_query(self, vec: np.ndarray, n: int, where: Mapping[str, Any] | None,
                      extra: dict[str, tuple[int, float]]
                      ) -> list[tuple[str, float, str, dict[str, Any]]]:
        """Stage 1 on the short vectors in Chroma, stage 2 exact cosine on the full ones."""
        assert self.funnel is not None and self.config.funnel_dim is not None
        n1 = max(n, self.config.funnel_candidates or 4 * n)
        stage1 = self.store.query(short_vectors(vec, self.config.funnel_dim)[0], n1, where,
                                  with_text=False)
        sims = self.funnel.similarities([rid for rid, *_ in stage1], vec)
        for r, (rid, s1, _, _) in enumerate(stage1, start=1):
            extra[rid] = (r, s1)
        order = sorted(range(len(stage1)), key=lambda i: (-float(sims[i]), i))[:n]
        return [(stage1[i][0], float(sims[i]), stage1[i][2], stage1[i][3]) for i in order
                if np.isfinite(sims[i])]

    def _to_hits(self, ranked: list[tuple[str, float, dict[str, int], dict[str, float]]],
                 texts: dict[str, tuple[str, dict[str, Any]]], limit: int) -> list[Hit]:
        """Hits for the best `limit` entries of `ranked`; texts are read from Chroma only for
        the entries that can still make the cut (a page at a time, since collapsing chunks
        to parents can drop entries)."""
        collapse = self.config.collapse_chunks
        hits: list[Hit] = []
        seen: set[str] = set()
        pos = 0
        while pos < len(ranked) and len(hits) < limit:
            page = ranked[pos:pos + max(2 * (limit - len(hits)), 10)]
            pos += len(page)
            missing = [rid for rid, *_ in page if rid not in texts]
            if missing:
                got = self.store.get(ids=missing, include=["documents", "metadatas"])
                texts.update({rid: (t, m or {}) for rid, t, m in
                              zip(got["ids"], got["documents"], got["metadatas"])})
            for rid, score, ranks, scores in page:
                if rid not in texts:  # deleted between the two reads
                    continue
                text, meta = texts[rid]
                parent = str(meta.get(PARENT_KEY, rid))
                if collapse:
                    if parent in seen:
                        continue
                    seen.add(parent)
                doc_id = parent if collapse else rid
                hits.append(Hit(Document(text=text, id=doc_id, metadata=public_metadata(meta)),
                                score=float(score), ranks=ranks, scores=scores, chunk_id=rid,
                                chunk_index=int(meta.get(CHUNK_KEY, 0))))
                if len(hits) >= limit:
                    break
        return hits

    async def asearch(self, query: str, k: int = 10, **kwargs: Any) -> list[Hit]:
        """`search` run in a worker thread, so the event loop is not blocked."""
        return await asyncio.to_thread(self.search, query, k, **kwargs)

    async def aadd_documents(self, documents: Iterable[Document | str | Mapping[str, Any]],
                             **kwargs: Any) -> list[str]:
        docs = list(documents)
        return await asyncio.to_thread(self.add_documents, docs, **kwargs)

    async def adelete(self, ids: Sequence[str]) -> int:
        return await asyncio.to_thread(self.delete, list(ids))

    # -- lifecycle -------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What the store holds and its settings."""
        return {"records": self.store.count(), "bm25_records": len(self.sparse),
                "store": self.config.store.to_dict(), "settings": self.store.read_settings()}

    def close(self) -> None:
        """Release the store (and its directory lock)."""
        if self.store.client is not None:
            self.store.close()
        cache = self._owned_cache
        if cache is not None:  # only the cache this retriever opened (config.cache_dir)
            self._owned_cache = None
            self.embedder.cache = None
            cache.close()

    def __enter__(self) -> "HybridRetriever":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _load_derived(load: Any, directory: Path, *args: Any) -> Any:
    """Load saved derived state; None (rebuilt from Chroma) on any failure to read it, e.g.
    numpy's EOFError for an empty `.npy` file, which a loader may not expect."""
    try:
        return load(directory, *args)
    except Exception as exc:
        logger.warning("derived state at %s is unreadable (%s: %s); it will be rebuilt",
                       directory, type(exc).__name__, exc)
        return None


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


def _check_query(query: Any) -> None:
    if not isinstance(query, str):
        raise InvalidInputError(f"query must be str, got {type(query).__name__}")
    if not query.strip():
        raise InvalidInputError("query is empty or whitespace; pass the text to search for")


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
    return vec


def _normalize_documents(documents: Any) -> list[Document]:
    if isinstance(documents, (str, Document)) or isinstance(documents, Mapping):
        raise InvalidInputError("documents must be a list; wrap the single document in a list")
    out: list[Document] = []
    for i, d in enumerate(documents):
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
        if not isinstance(d.text, str) or not d.text.strip():
            raise InvalidInputError(f"documents[{i}].text must be a non-empty str, got {d.text!r:.40}")
        if d.id is not None and (not isinstance(d.id, str) or not d.id):
            raise InvalidInputError(f"documents[{i}].id must be a non-empty str or None, got {d.id!r}")
        meta = clean_metadata(d.metadata, f"documents[{i}]")
        out.append(Document(text=d.text, id=d.id if d.id is not None else text_id(d.text),
                            metadata=meta))
    return out


def _diff(recorded: Mapping[str, Any], ours: Mapping[str, Any], prefix: str = ""
          ) -> list[tuple[str, Any, Any]]:
    out = []
    for key in sorted(set(recorded) | set(ours)):
        a, b = recorded.get(key), ours.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out
