"""The write protocol: validated documents in, whole documents out to Chroma, log entries
around each batch, derived indexes caught up after.

For each batch of documents (at most one Chroma batch of records, a document never split):
1. claim a log entry naming the documents (state pending);
2. one Chroma upsert with every changed record and, as dead, the old records the new
   versions lack (records.py): each document changes in one call, old or new, never a mix;
3. delete those dead records;
4. mark the entry done.
Then the follower applies the log to the derived indexes. A crash anywhere leaves a pending
entry; the next open (embedded) or a search after the lease (server) repairs it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .changelog import ChangeLog
from .chunking import ChunkConfig, split_text
from .embedding import Embedder
from .errors import InvalidInputError, StoreFullError
from .funnel import short_vectors
from .records import HASH_KEY, SEQ_KEY, Record, dead_metadata, is_live, make_records
from .store import ChromaStore
from .sync import Follower
from .types import Document

logger = logging.getLogger(__name__)


def document_records(docs: Sequence[Document], embedder: Embedder, chunking: ChunkConfig
                     ) -> dict[str, list[Record]]:
    """Each document's records, by id: one record, or one per chunk when the document is
    longer than the model reads (the window: chunking.max_tokens, else the model's length
    less special tokens and the document prefix)."""
    tok = embedder.tokenizer
    window = chunking.max_tokens
    if window is None:
        prefix = len(tok(embedder.prefixes.document, add_special_tokens=False)["input_ids"])
        window = embedder.max_seq_length - 2 - prefix
    overlap = min(chunking.overlap_tokens, window // 2)
    lengths = [len(ids) for ids in tok([d.text for d in docs], add_special_tokens=False,
                                       truncation=False, verbose=False)["input_ids"]]
    out: dict[str, list[Record]] = {}
    for doc, n in zip(docs, lengths):
        assert doc.id is not None
        if n <= window:
            out[doc.id] = make_records(doc.id, doc.text, doc.metadata, None)
            continue
        if not chunking.enabled:
            raise InvalidInputError(
                f"document {doc.id!r} has {n} tokens, more than the model reads ({window}); "
                "enable chunking (chunking.enabled=true) or split it first")
        out[doc.id] = make_records(doc.id, doc.text, doc.metadata,
                                   split_text(doc.text, tok, window, overlap))
    return out


@dataclass(frozen=True)
class WriteStats:
    """What one `add_documents` did, in records."""

    written: int = 0
    unchanged: int = 0
    removed: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"written": self.written, "unchanged": self.unchanged, "removed": self.removed}


@dataclass
class _Change:
    """The Chroma side of one document's write."""

    parent: str
    records: list[Record]       # new or changed records
    dead: dict[str, dict]       # stale record id -> its stored metadata
    old: dict[str, dict] = field(default_factory=dict)  # every stored record's metadata


class Writer:
    def __init__(self, store: ChromaStore, log: ChangeLog, follower: Follower,
                 embedder: Embedder, chunking: ChunkConfig, funnel_dim: int | None) -> None:
        self.store = store
        self.log = log
        self.follower = follower
        self.embedder = embedder
        self.chunking = chunking
        self.funnel_dim = funnel_dim
        self.lock = threading.RLock()

    # -- writes ----------------------------------------------------------------------------
    def add(self, docs: Sequence[Document], progress: bool | None = None) -> WriteStats:
        """Insert or replace whole documents (validated, ids unique)."""
        new = document_records(docs, self.embedder, self.chunking)
        with self.lock:
            stored = self._stored(list(new))
            changes: list[_Change] = []
            unchanged = 0
            for parent, recs in new.items():
                old = stored.get(parent, {})
                ids = {r.id for r in recs}
                todo = [r for r in recs if r.id not in old or not is_live(old[r.id])
                        or old[r.id].get(HASH_KEY) != r.hash]
                dead = {rid: m for rid, m in old.items() if rid not in ids}
                unchanged += len(recs) - len(todo)
                if todo or dead:
                    changes.append(_Change(parent, todo, dead, old))
            stats = WriteStats(sum(len(c.records) for c in changes), unchanged,
                               sum(len(c.dead) for c in changes))
            if not changes:
                return stats
            texts = [r.text for c in changes for r in c.records]
            vectors = self.embedder.embed_documents(texts, progress=progress)
            by_id = {r.id: v for r, v in zip((r for c in changes for r in c.records), vectors)}
            for batch in self._batches(changes):
                self._write_batch(batch, by_id)
            self.follower.catch_up(by_id)  # indexes that keep vectors take them from here
            self.log.trim()
            return stats

    def delete(self, parents: Sequence[str]) -> int:
        """Delete whole documents; returns the records removed."""
        with self.lock:
            stored = self._stored(parents)
            changes = [_Change(p, [], recs) for p, recs in stored.items()]
            for batch in self._batches(changes):
                entry = self.log.begin([c.parent for c in batch])
                try:
                    self.store.delete([rid for c in batch for rid in c.dead])
                except BaseException:
                    self._recover(entry)
                    raise
                self.log.finish(entry)
            self.follower.catch_up()
            self.log.trim()
            return sum(len(c.dead) for c in changes)

    def _stored(self, parents: Sequence[str]) -> dict[str, dict[str, dict]]:
        """parent -> {record id: metadata} of every stored record (dead ones too)."""
        got = self.store.of_parents(parents, include=["metadatas"])
        out: dict[str, dict[str, dict]] = {}
        for rid, meta in zip(got["ids"], got["metadatas"]):
            meta = dict(meta or {})
            out.setdefault(str(meta.get("_rk_parent")), {})[rid] = meta
        return out

    def _batches(self, changes: list[_Change]) -> list[list[_Change]]:
        step = self.store.max_batch
        out: list[list[_Change]] = [[]]
        size = 0
        for c in changes:
            n = len(c.records) + len(c.dead)
            if out[-1] and size + n > step:
                out.append([])
                size = 0
            out[-1].append(c)
            size += n
        return out

    def _write_batch(self, batch: list[_Change], vectors: Mapping[str, np.ndarray]) -> None:
        entry = self.log.begin([c.parent for c in batch])
        try:
            groups = [self._group(c, entry.seq, vectors) for c in batch]
            self.store.write(groups)
            dead = [rid for c in batch for rid in c.dead]
            if dead:
                self.store.delete(dead)
        except BaseException as exc:
            self._recover(entry, exc)
            raise
        self.log.finish(entry)

    def _recover(self, entry: Any, error: BaseException | None = None) -> None:
        """After a failed batch: each document is old or new in Chroma; make the log and the
        derived indexes agree with it now, so searches do not wait for the next open. Best
        effort: the original error is the one the caller sees. Not on a full disk: Chroma
        1.5.9 can hang in the repair's next write there; the next open repairs it."""
        if isinstance(error, StoreFullError):
            logger.warning("the disk is full: the failed write is repaired on the next open")
            return
        try:
            self.follower.repair([entry])
            self.follower.catch_up()
        except Exception as exc:  # e.g. the server went away: the next sync repairs it
            logger.warning("could not repair the failed write at once (%s: %s); the next "
                           "open or search will", type(exc).__name__, exc)

    def _group(self, change: _Change, seq: int, vectors: Mapping[str, np.ndarray]
               ) -> tuple[list[str], np.ndarray, list[str], list[dict[str, Any]]]:
        """One upsert group: the changed records, then the stale ones overwritten as dead."""
        dim = self.funnel_dim or self.embedder.dim
        full = np.asarray([vectors[r.id] for r in change.records], dtype=np.float32) \
            .reshape(-1, self.embedder.dim)
        vecs = short_vectors(full, self.funnel_dim) if self.funnel_dim is not None \
            and len(full) else full[:, :dim]
        # a dead record needs some unit vector; it is never returned (readers skip it)
        filler = np.zeros((len(change.dead), dim), dtype=np.float32)
        filler[:, 0] = 1.0
        ids = [r.id for r in change.records] + list(change.dead)
        metas = [{**_replacing(r, change.old.get(r.id, {})), SEQ_KEY: seq} for r in change.records]
        metas += [{**dead_metadata(change.parent, m), SEQ_KEY: seq}
                  for m in change.dead.values()]
        texts = [r.text for r in change.records] + [""] * len(change.dead)
        return ids, np.concatenate([vecs, filler]), texts, metas


def _replacing(record: Record, old: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata that replaces (not merges into) a stored record's: Chroma merges on upsert,
    so keys the new version lacks are set to None, which removes them."""
    return {**{k: None for k in old}, **record.metadata}
