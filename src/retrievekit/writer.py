"""The write protocol: validated documents in, whole documents out to Chroma, log entries
around each batch, derived indexes caught up after.

An add is streamed: documents are read, tokenized (once per text: the length check and the
chunk split share it), compared with what is stored, encoded and written in batches of at
most one Chroma batch of records, so what it holds at once follows the batch, not the input.

For each Chroma batch of documents (at most one Chroma batch of records, a document never
split):
1. claim a log entry naming the documents (state pending);
2. one Chroma upsert with every changed record and, as dead, the old records the new
   versions lack (records.py): each document changes in one call, old or new, never a mix;
3. delete those dead records;
4. mark the entry done.
After each streamed batch the follower applies the log to the derived indexes. A crash
anywhere leaves a pending entry; the next open (embedded) or a search after the lease
(server) repairs it. With a server, writers of the same documents take turns by sequence
number between steps 1 and 2, and diff again when an earlier one changed them
(`_write_batch`, changelog.py).
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .changelog import ChangeLog, Mark
from .chunking import ChunkConfig, split_offsets, split_text, token_lengths
from .embedding import Embedder
from .errors import ConfigError, InvalidInputError, StoreFullError
from .funnel import short_vectors
from .records import (END_KEY, HASH_KEY, SEQ_KEY, START_KEY, Record, dead_metadata, is_live,
                      make_records)
from .store import ChromaStore
from .sync import Follower
from .types import Document

logger = logging.getLogger(__name__)


#: Records per streamed batch of `Writer.add` by default: one Chroma batch
#: (`get_max_batch_size()`, 5,461 with chromadb 1.x embedded), at most this many. Every record
#: of the batch's documents counts, unchanged ones included; a document is never split, so
#: one longer document is a batch of its own. What an add holds at once: that many record
#: texts and vectors (8 MB at 384-d), ~170 passes of GPU encoding at batch_size 32, and as
#: many Chroma calls as an add that is not streamed (smaller batches cost time at 100k;
#: benchmarks/build.py, docs/benchmarks.md).
BATCH_RECORDS = 8192
#: Documents tokenized per call of the (fast, batched) tokenizer.
_TOKENIZE_GROUP = 256
#: A bar is shown by default only for adds of more documents than this.
_LONG_ADD = 256


#: the fewest tokens of a passage a model must read beside the document prefix
MIN_WINDOW = 8


def chunk_window(embedder: Embedder, chunking: ChunkConfig) -> tuple[int, int]:
    """(window, overlap) in model tokens: chunking.max_tokens, else the model's length less
    special tokens and the document prefix; the overlap at most half the window.

    Raises:
        ConfigError: chunking.max_tokens past what the model reads (the rest of each such
            chunk would be cut off unseen), or a document prefix that leaves the model
            fewer than `MIN_WINDOW` tokens of a passage."""
    tok = embedder.tokenizer
    prefix = len(tok(embedder.prefixes.document, add_special_tokens=False)["input_ids"])
    reads = embedder.max_seq_length - 2 - prefix
    if reads < MIN_WINDOW:
        raise ConfigError(
            f"embedder.document_prefix is {prefix} tokens long: the model reads "
            f"{embedder.max_seq_length} tokens, which leaves {reads} for a passage (at least "
            f"{MIN_WINDOW} are needed); use a shorter document_prefix")
    window = reads if chunking.max_tokens is None else chunking.max_tokens
    if window > reads:
        raise ConfigError(
            f"chunking.max_tokens must be at most {reads} for this model, got {window}: it "
            f"reads {embedder.max_seq_length} tokens of a passage (less 2 special tokens "
            "and the document prefix), and would cut the rest of each chunk off unseen; "
            "leave it unset to use the model's window")
    return window, min(chunking.overlap_tokens, window // 2)


def document_records(docs: Sequence[Document], embedder: Embedder, chunking: ChunkConfig,
                     *, first: int = 0) -> dict[str, list[Record]]:
    """Each document's records, by id: one record, or one per chunk when the document is
    longer than the model reads (the window, `chunk_window`).

    Each text is tokenized once: the same call gives its length and the offsets its chunks
    are cut at. `first`: the position of docs[0] in the caller's input (error messages)."""
    tok = embedder.tokenizer
    window, overlap = chunk_window(embedder, chunking)
    out: dict[str, list[Record]] = {}
    lengths = token_lengths(tok, [d.text for d in docs], window)
    for j, (doc, (n, offs)) in enumerate(zip(docs, lengths)):
        assert doc.id is not None
        if n <= window:
            out[doc.id] = make_records(doc.id, doc.text, doc.metadata, None)
            continue
        if not chunking.enabled:
            raise InvalidInputError(
                f"documents[{first + j}] ({doc.id!r}) has {n} tokens, more than the model "
                f"reads ({window}); enable chunking (chunking.enabled=true) or split it first")
        # a slow tokenizer has no offsets: split_text refuses it with transformers' error
        spans = split_offsets(doc.text, offs, window, overlap) if offs is not None \
            else split_text(doc.text, tok, window, overlap)
        out[doc.id] = make_records(doc.id, doc.text, doc.metadata, spans)
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
    def add(self, docs: Iterable[Document], progress: bool | None = None, *,
            batch_records: int | None = None, total: int | None = None) -> WriteStats:
        """Insert or replace whole documents (validated; a repeated id carries the same
        content), streamed: each batch of at most `batch_records` records (default one
        Chroma batch, at most `BATCH_RECORDS`) is tokenized, compared with what is stored,
        encoded, written and caught up before the next is read from `docs`, so memory
        follows the batch, not `docs`. `total`: how many documents `docs` holds, when known
        (the progress bar).
        The lock is taken per batch: another thread's write may land between two batches.

        Raises:
            InvalidInputError: a document found invalid while reading; when earlier
                batches were written, the message says how many documents that was.
        """
        limit = self.store.max_batch
        bound = min(limit, BATCH_RECORDS) if batch_records is None else batch_records
        written = unchanged = removed = done = 0
        bar = _Progress(progress, total)
        batches = self._read_batches(docs, bound, limit)
        try:
            while True:
                try:
                    item = next(batches, None)
                except InvalidInputError as exc:
                    if not done:
                        raise
                    raise InvalidInputError(
                        f"{exc}. The input was streamed: documents[0:{done}] (the batches "
                        f"before this one) were written, each whole; documents[{done}:] were "
                        "not. Fix it and add again: unchanged documents are skipped") from exc
                except BaseException as exc:  # e.g. the caller's generator failed
                    _note_written(exc, done, "were not")
                    raise
                if item is None:
                    break
                read, new = item
                try:
                    stats = self._add_batch(new)
                except BaseException as exc:
                    _note_written(exc, done, "may be old or new")
                    raise
                written += stats.written
                unchanged += stats.unchanged
                removed += stats.removed
                done += read
                bar.update(read)
        finally:
            bar.close()
        self.log.trim()
        return WriteStats(written, unchanged, removed)

    def check(self, docs: Iterable[Document]) -> None:
        """Refuse what `add` would refuse on tokenizing (a document longer than the model
        reads while chunking is disabled), before anything is written."""
        it = iter(docs)
        pos = 0
        while group := list(islice(it, _TOKENIZE_GROUP)):
            document_records(group, self.embedder, self.chunking, first=pos)
            pos += len(group)

    def _read_batches(self, docs: Iterable[Document], bound: int, limit: int
                      ) -> Iterator[tuple[int, dict[str, list[Record]]]]:
        """(documents read, records by document id) per batch of whole documents, at most
        `bound` records each (one longer document alone is a batch, of fewer than `limit`,
        Chroma's batch: a document is written whole in one, with the stale records of its
        old version; chunk ids are by position, so those are at most the old version's
        chunks past the new one's, or its one record when it was not chunked). A document
        repeated within a batch is written once."""
        it = iter(docs)
        batch: dict[str, list[Record]] = {}
        read = size = pos = 0
        # read ahead of the batch by one group at most, never more than the bound
        while group := list(islice(it, min(_TOKENIZE_GROUP, bound))):
            new = document_records(group, self.embedder, self.chunking, first=pos)
            pos += len(group)
            for j, doc in enumerate(group, start=pos - len(group)):
                assert doc.id is not None
                if doc.id not in batch:
                    recs = new[doc.id]
                    if len(recs) >= limit:  # room for the one dead record a replace can add
                        raise InvalidInputError(
                            f"documents[{j}] ({doc.id!r}) makes {len(recs):,} chunks, more "
                            f"than Chroma writes in one batch ({limit - 1:,} and the "
                            "record its replace may remove), and a document is written "
                            "whole in one: split it into several documents")
                    if batch and size + len(recs) > bound:
                        yield read, batch
                        batch, read, size = {}, 0, 0
                    batch[doc.id] = recs
                    size += len(recs)
                read += 1
        if read:
            yield read, batch

    def _add_batch(self, new: Mapping[str, list[Record]]) -> WriteStats:
        """Write one batch: changed records only, then the derived indexes follow."""
        with self.lock:
            mark = self._mark()
            changes, unchanged = _diff(new, self._stored(list(new)))
            if not changes:
                return WriteStats(0, unchanged, 0)
            by_id: dict[str, np.ndarray] = {}
            self._encode(changes, by_id)
            written = [c for batch in self._batches(changes)
                       for c in self._write_batch(batch, by_id, new, mark)]
            self.follower.catch_up(by_id)  # indexes that keep vectors take them from here
            return WriteStats(sum(len(c.records) for c in written), unchanged,
                              sum(len(c.dead) for c in written))

    def delete(self, parents: Sequence[str]) -> int:
        """Delete whole documents; returns the records removed."""
        with self.lock:
            mark = self._mark()
            gone: dict[str, list[Record]] = {p: [] for p in parents}
            changes, _ = _diff(gone, self._stored(parents))
            if not changes:  # nothing stored: no entry in the log either
                return 0
            removed = sum(len(c.dead) for batch in self._batches(changes)
                          for c in self._write_batch(batch, {}, gone, mark))
            self.follower.catch_up()
            self.log.trim()
            return removed

    def _mark(self) -> Mark | None:
        """Server mode: what the log says before the documents are read (`_write_batch`
        checks it). One writer process (embedded): nothing, its lock orders its writes."""
        return None if self.follower.sole_writer else self.log.mark()

    def _encode(self, changes: Sequence[_Change], by_id: dict[str, np.ndarray]) -> None:
        """Encode the changed records' texts that `by_id` lacks, into it."""
        todo = [r for c in changes for r in c.records if r.id not in by_id]
        if todo:
            vectors = self.embedder.embed_documents([r.text for r in todo], progress=False)
            by_id.update(zip((r.id for r in todo), vectors))

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

    def _write_batch(self, batch: list[_Change], vectors: dict[str, np.ndarray],
                     new: Mapping[str, list[Record]], mark: Mark | None) -> list[_Change]:
        """Claim an entry, write the batch (its upsert, then the dead records' delete), mark
        it done; returns what was written.

        Server mode: first wait for other writers of these documents that came before (lower
        seq), and diff again from what Chroma holds when one of them may have changed them
        since `mark`: else two writers of one document could leave it spliced, one's chunks
        beside the other's. When that diff has records to encode, the entry is given up
        (nothing written under it) while they are encoded, which can outlast the lease, and
        the batch is claimed again."""
        parents = [c.parent for c in batch]
        while True:
            entry = self.log.begin(parents)
            try:
                if mark is not None and (before := self.log.overlapping(mark, entry)):
                    abandoned = self.log.wait(before, entry)
                    if abandoned:
                        self.follower.repair(abandoned)
                    mark = self.log.mark()
                    batch, _ = _diff({p: new[p] for p in parents}, self._stored(parents))
                    if any(r.id not in vectors for c in batch for r in c.records):
                        self.log.finish(entry, reannounce=False)
                        self._encode(batch, vectors)
                        continue
                # a document deleted is only deleted; one replaced is written with its dead
                groups = [self._group(c, entry.seq, vectors) for c in batch if new[c.parent]]
                if groups:
                    self.store.write(groups)
                dead = [rid for c in batch for rid in c.dead]
                if dead:
                    self.store.delete(dead)
            except BaseException as exc:
                self._recover(entry, exc)
                raise
            self.log.finish(entry)
            return batch

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
        full = np.asarray([vectors[r.id] for r in change.records], dtype=np.float32) \
            .reshape(-1, self.embedder.dim)
        ids = [r.id for r in change.records] + list(change.dead)
        metas = [{**_replacing(r, change.old.get(r.id, {})), SEQ_KEY: seq} for r in change.records]
        metas += [{**dead_metadata(change.parent, m), SEQ_KEY: seq}
                  for m in change.dead.values()]
        texts = [r.text for r in change.records] + [""] * len(change.dead)
        vecs = stored_form(full, self.funnel_dim, dead=len(change.dead))
        return ids, vecs, texts, metas


def stored_form(full: np.ndarray, funnel_dim: int | None, dead: int = 0) -> np.ndarray:
    """The vectors Chroma holds for records with these full vectors (the funnel's short ones
    when it is on), then `dead` unit fillers: a dead record needs some vector, and readers
    never return it."""
    dim = funnel_dim or full.shape[1]
    vecs = short_vectors(full, funnel_dim) if funnel_dim is not None and len(full) \
        else full[:, :dim]
    filler = np.zeros((dead, dim), dtype=np.float32)
    filler[:, 0] = 1.0
    return np.concatenate([vecs, filler])


def chroma_vectors(embedder: Embedder, funnel_dim: int | None, texts: Sequence[str],
                   metas: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Chroma's vectors for stored records, encoded again from their texts (`hnsw_repair`)."""
    live = np.asarray([is_live(m) for m in metas], dtype=bool)
    kept = [t for t, ok in zip(texts, live) if ok]
    full = np.asarray(embedder.embed_documents(kept, progress=False) if kept else [],
                      dtype=np.float32).reshape(-1, embedder.dim)
    out = np.empty((len(texts), funnel_dim or embedder.dim), dtype=np.float32)
    out[live] = stored_form(full, funnel_dim)
    out[~live] = stored_form(full[:0], funnel_dim, dead=int((~live).sum()))
    return out


def _diff(new: Mapping[str, list[Record]], stored: Mapping[str, dict[str, dict]]
          ) -> tuple[list[_Change], int]:
    """What writing `new` (each document's records; none to delete it) over `stored` changes,
    per document, and how many of its records are unchanged."""
    changes: list[_Change] = []
    unchanged = 0
    for parent, recs in new.items():
        old = stored.get(parent, {})
        ids = {r.id for r in recs}
        todo = [r for r in recs if _changed(r, old.get(r.id))]
        dead = {rid: m for rid, m in old.items() if rid not in ids}
        unchanged += len(recs) - len(todo)
        if todo or dead:
            changes.append(_Change(parent, todo, dead, old))
    return changes, unchanged


def _note_written(exc: BaseException, done: int, later: str) -> None:
    """Say on an error that ends a streamed add what it had written (Python 3.11+ notes)."""
    if done and hasattr(exc, "add_note"):
        exc.add_note(f"add_documents: documents[0:{done}] were written before this error, "
                     f"each whole; later ones {later}")


class _Progress:
    """A tqdm bar over the documents of one add: shown when `progress` is True or, when it is
    None, once the add is longer than `_LONG_ADD` documents and stderr is a terminal."""

    def __init__(self, progress: bool | None, total: int | None) -> None:
        self.progress = progress
        self.total = total
        self.count = 0
        self.bar: Any = None
        if progress or (progress is None and (total or 0) > _LONG_ADD):
            self._start()

    def _start(self) -> None:
        if self.progress is False or (self.progress is None and not sys.stderr.isatty()):
            self.progress = False
            return
        from tqdm.auto import tqdm  # deferred: only long adds need it

        self.bar = tqdm(total=self.total, initial=self.count, desc="add_documents",
                        unit="doc")

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.progress is None and self.count > _LONG_ADD:
            self._start()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _replacing(record: Record, old: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata that replaces (not merges into) a stored record's: Chroma merges on upsert,
    so keys the new version lacks are set to None, which removes them."""
    return {**{k: None for k in old}, **record.metadata}


def _changed(record: Record, stored: Mapping[str, Any] | None) -> bool:
    """Whether `record` must be written over what Chroma holds under its id: absent, dead,
    another text or metadata (the hash), or the same text at another place in its document
    (an edit before it moved the span; skipped, the old span garbled the text put back
    together by `get`)."""
    return stored is None or not is_live(stored) or stored.get(HASH_KEY) != record.hash \
        or any(stored.get(k) != record.metadata.get(k) for k in (START_KEY, END_KEY))
