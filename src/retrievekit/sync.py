"""Derived indexes follow the change log: one catch-up for all of them.

A derived index (the BM25 index, the funnel's full vectors) implements `Derived`: it can
replace the records of some documents, be cleared, and commit the log watermark it has
reached. `Follower.catch_up` reads the log past the lowest watermark, re-reads from Chroma
the documents those entries name, and hands their live records to every index: the cost is
that of the changes. An index with no usable state (watermark -1, or below the trimmed log)
is rebuilt from a scan of the collection once.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from .changelog import ChangeLog, Entry, advance
from .records import DEAD_KEY, Record, from_chroma
from .store import READ_PAGE, ChromaStore

logger = logging.getLogger(__name__)


class Derived(Protocol):
    """What the follower needs of a derived index."""

    watermark: int
    origin: str  # the `ChangeLog.origin` its watermark refers to
    tip: str  # the writer of the log entry at its watermark ("" for none, or not known)

    def replace(self, parents: Sequence[str], records: Sequence[Record],
                vectors: Mapping[str, np.ndarray] | None = None) -> None:
        """Drop every record of `parents`, then hold `records` (live records from Chroma)."""

    def clear(self) -> None: ...

    def commit(self, watermark: int, tip: str | None = None) -> None:
        """Make the changes durable (where persistent) and record the watermark and its
        tip (None: the tip it has)."""


class Follower:
    """Keeps derived indexes in step with Chroma through the change log."""

    def __init__(self, store: ChromaStore, log: ChangeLog, indexes: Sequence[Derived],
                 *, sole_writer: bool, vectors_in_store: bool = False) -> None:
        self.store = store
        self.log = log
        self.indexes = list(indexes)
        #: Chroma holds the full vectors (no funnel) and an index keeps them: read them from
        #: Chroma (those the caller does not give) rather than encode the texts again
        self.vectors_in_store = vectors_in_store
        #: embedded stores have one writer process (the directory lock): a pending entry
        #: found at open belongs to a writer that died
        self.sole_writer = sole_writer
        self.lock = threading.RLock()

    def catch_up(self, vectors: Mapping[str, np.ndarray] | None = None) -> int:
        """Apply every change past the indexes' watermarks; returns the entries read.

        `vectors`: full vectors the caller already has (a writer's own records), by id."""
        with self.lock:
            stale = [ix for ix in self.indexes if ix.watermark < 0
                     or ix.origin != self.log.origin]
            if stale:
                self._rebuild(stale)
            low, entries = self._past_watermarks()
            if not entries:
                return 0
            dead = [e for e in entries if e.state == "pending"
                    and (e.abandoned or (self.sole_writer and e.writer != self.log.token))]
            if dead:
                self.repair(dead)
                entries = self.log.since(low)
            parents = list(dict.fromkeys(p for e in entries for p in e.parents))
            got = self.store.of_parents(parents, include=["documents", "metadatas"])
            live = from_chroma(got["ids"], got["documents"], got["metadatas"])
            vectors = dict(vectors or {})
            if self.vectors_in_store:
                vectors.update(self.store.vectors([r.id for r in live if r.id not in vectors]))
            for ix in self.indexes:
                mine = [e for e in entries if e.seq > ix.watermark]
                if not mine:
                    continue
                names = list(dict.fromkeys(p for e in mine for p in e.parents))
                keep = set(names)
                ix.replace(names, [r for r in live if r.parent in keep], vectors)
                reached = advance(ix.watermark, mine)
                ix.commit(reached, next((e.writer for e in mine if e.seq == reached), None))
            if len(entries) > 1:
                logger.info("caught up with %d writes (%d documents)", len(entries),
                            len(parents))
            return len(entries)

    def _past_watermarks(self) -> tuple[int, list[Entry]]:
        """The lowest watermark and the entries past it. First, an index whose watermark the
        log no longer continues is rebuilt: the entry at its watermark has another writer
        than the one it applied (a server restored from a backup, then written on: the new
        history reuses the old one's sequence numbers), or is gone though not trimmed; or
        the log was trimmed past its watermark."""
        low = min((ix.watermark for ix in self.indexes), default=0)
        entries = self.log.since(max(low - 1, 0))  # with the entry at the lowest watermark
        at = {e.seq: e for e in entries}
        forked = [ix for ix in self.indexes if ix.tip and ix.watermark > 0
                  and (at[ix.watermark].writer != ix.tip if ix.watermark in at
                       else ix.watermark > self.log.floor())]
        if forked:
            logger.warning("the change log no longer holds the last write that %d derived "
                           "index(es) applied (Chroma restored from a backup, then written "
                           "on?): rebuilding them from Chroma", len(forked))
            self._rebuild(forked)
        later = [e for e in entries if e.seq > low]
        if forked or (later and later[0].seq != low + 1):  # a gap: trimmed past a watermark?
            floor = self.log.floor()
            behind = [ix for ix in self.indexes if ix.watermark < floor]
            if behind:
                self._rebuild(behind)
            if forked or behind:
                low = min(ix.watermark for ix in self.indexes)
                later = self.log.since(low)
        return low, later

    @property
    def _include(self) -> list[str]:
        return ["documents", "metadatas"] + (["embeddings"] if self.vectors_in_store else [])

    def rebuild_if_ahead(self) -> None:
        """Rebuild the derived indexes whose watermark is past the log's head: they were
        made from a later state of Chroma than the one now there (a Chroma restored from a
        backup), and the truth is Chroma's."""
        with self.lock:
            head = self.log.head()
            ahead = [ix for ix in self.indexes if ix.watermark > head
                     and ix.origin == self.log.origin]
            if ahead:
                logger.warning("derived indexes are past the change log (seq %d > %d): "
                               "Chroma was restored from a backup? Rebuilding them from it",
                               max(ix.watermark for ix in ahead), head)
                self._rebuild(ahead)

    def rebuild(self) -> None:
        """Rebuild every derived index from a scan of the collection."""
        with self.lock:
            self._rebuild(self.indexes)
            self.catch_up()

    def repair(self, entries: Sequence[Entry]) -> None:
        """Finish writes whose writer died: delete the dead records they left, mark done.
        Each document already holds its old version or its new one (records.py)."""
        parents = list(dict.fromkeys(p for e in entries for p in e.parents))
        got = self.store.of_parents(parents, include=["metadatas"])
        dead = [rid for rid, m in zip(got["ids"], got["metadatas"]) if (m or {}).get(DEAD_KEY)]
        if dead:
            self.store.delete(dead)
        for e in entries:
            self.log.finish(e, reannounce=False)
        logger.warning("repaired %d interrupted writes (%d documents, %d dead records removed)",
                       len(entries), len(parents), len(dead))

    def _rebuild(self, indexes: Sequence[Derived]) -> None:
        """Rebuild from a scan of the collection; entries from the scan's start on are then
        applied by the normal catch-up (idempotent).

        The scan reads pages by offset, so a delete by another client during it shifts
        records past a page boundary unread. When the log says someone wrote meanwhile, the
        ids Chroma holds once the scan is over (one `get`, one snapshot) are compared with
        those read, and the missed ones read by id."""
        head = self.log.head()
        pending = [e.seq for e in self.log.pending()]
        start = min([head] + [s - 1 for s in pending])
        for ix in indexes:
            ix.clear()
            ix.origin = self.log.origin
        seen: set[str] = set()
        for batch in self.store.iter_records(include=self._include):
            self._hand(indexes, batch)
            seen.update(batch["ids"])
        if pending or self.log.head() != head:
            missed = [rid for rid in self.store.get(include=[])["ids"] if rid not in seen]
            for p in range(0, len(missed), READ_PAGE):
                self._hand(indexes, self.store.get(ids=missed[p:p + READ_PAGE],
                                                   include=self._include))
            seen.update(missed)
        tip = entry.writer if (entry := self.log.at(start)) else ""
        for ix in indexes:
            ix.commit(start, tip)
        logger.info("rebuilt %d derived index(es) from %d records in Chroma", len(indexes),
                    len(seen))

    @staticmethod
    def _hand(indexes: Sequence[Derived], got: Mapping[str, Any]) -> None:
        """Give the live records of a Chroma read (and its vectors, if read) to `indexes`."""
        live = from_chroma(got["ids"], got["documents"], got["metadatas"])
        vectors = _stored_vectors(got)
        for ix in indexes:
            ix.replace((), live, vectors)


def _stored_vectors(got: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Record id -> vector, for a Chroma result that includes embeddings (else empty)."""
    embeddings = got.get("embeddings")
    if embeddings is None or len(embeddings) == 0:
        return {}
    return {rid: np.asarray(v, dtype=np.float32) for rid, v in zip(got["ids"], embeddings)}
