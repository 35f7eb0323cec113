"""The change log: one entry per write batch, kept in Chroma beside the records.

Every write claims the next sequence number `seq` before it touches the records (entry state
"pending", listing the documents it changes), and marks the entry "done" after. Any client
catches up from the log alone: the documents named by entries past its watermark are re-read
from Chroma and replace what its derived indexes hold, so catching up costs what changed.

Sequence numbers are claimed with Chroma's `add`, which ignores an id that exists: a writer
adds entry `seq` with its own token and reads it back; if the token is another writer's, it
tries `seq + 1`. So numbers are unique and dense, with no lock, across processes and machines.

A pending entry means a write is under way, or that its writer died. A reader never advances
its watermark past a pending entry it has seen pending, unchanged, for less than `LEASE_S`
by its own monotonic clock (it re-reads those documents on each sync, so whatever landed is
seen at once); after that the entry is abandoned, and whoever finds it repairs it
(`Follower.repair`). The writer's timestamp is never compared with the reader's clock
(clients on other machines have other clocks: a reader whose clock ran ahead took live
writes as abandoned); a writer that waits for another renews it (`renew`), and a reader
that sees it change counts the lease again. A writer whose write outlives half the lease
re-announces its documents under a fresh entry before it finishes, so no reader that moved
past it misses them.

Writers of the same documents take turns by sequence number (server mode, `Writer`): a
writer that claimed `seq` waits until every other writer's entry below it that names one of
its documents is done, and reads those documents again when one could have changed them
since it first read them (`mark`, `overlapping`, `wait`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .store import READ_PAGE

logger = logging.getLogger(__name__)

#: Seconds after which a pending entry counts as abandoned by a dead writer.
LEASE_S = 120.0
#: Entries kept after trimming; a client whose watermark falls below the trimmed floor
#: rebuilds its derived state from a scan of the collection instead.
KEEP = 20_000
_SUFFIX = "-rklog"
_FLOOR_KEY = "rk_floor"


@dataclass(frozen=True)
class Entry:
    """One write batch: its sequence number, the documents it changes, its state."""

    seq: int
    parents: tuple[str, ...]
    state: str  # "pending" or "done"
    ts: float  # the writer's clock when it claimed the entry
    writer: str
    #: seconds this client has seen the entry pending, by its own monotonic clock
    seen_pending_s: float = 0.0

    @property
    def abandoned(self) -> bool:
        return self.state == "pending" and self.seen_pending_s > LEASE_S


@dataclass(frozen=True)
class Mark:
    """What a writer knew of the log before it read the documents it is about to change."""

    head: int
    pending: tuple[Entry, ...]


def log_name(collection: str) -> str:
    """The name of the log collection of `collection` (within Chroma's 512 characters)."""
    return collection[:512 - len(_SUFFIX)] + _SUFFIX


def _entry_id(seq: int) -> str:
    return f"{seq:020d}"


class ChangeLog:
    """The log collection of one retrievekit collection."""

    def __init__(self, client: Any, collection: str, owner: str = "") -> None:
        self._client = client
        self._name = log_name(collection)
        self._col = client.get_or_create_collection(self._name, embedding_function=None)
        self.token = uuid.uuid4().hex  # this client's writer token
        #: names this log and `owner`, the id of the collection it logs; derived state made
        #: from another (either collection deleted and made anew under the same name, the
        #: log left behind) is rebuilt, never caught up from the wrong log
        self.origin = f"{self._col.id}+{owner}" if owner else str(self._col.id)
        self._head = 0  # the highest seq this client knows of
        self._floor = 0  # the trimmed floor as last read
        #: pending seq -> (its timestamp, time.monotonic() when first seen with it)
        self._first_seen: dict[int, tuple[float, float]] = {}

    # -- writers -----------------------------------------------------------------------------
    def begin(self, parents: Sequence[str]) -> Entry:
        """Claim the next sequence number for a write of these documents (state pending)."""
        doc = json.dumps(list(parents), ensure_ascii=False)
        seq = max(self._head, self.floor()) + 1
        while True:
            now = time.time()
            meta = {"seq": seq, "state": "pending", "writer": self.token, "ts": now}
            self._col.add(ids=[_entry_id(seq)], embeddings=[[1.0]], documents=[doc],
                          metadatas=[meta])
            got = self._col.get(ids=[_entry_id(seq)], include=["metadatas"])
            if got["metadatas"] and got["metadatas"][0].get("writer") == self.token:
                self._head = seq
                return Entry(seq, tuple(parents), "pending", now, self.token)
            # taken by another writer: jump past everything claimed since
            later = self.since(seq)
            seq = (later[-1].seq if later else seq) + 1

    def finish(self, entry: Entry, *, reannounce: bool = True) -> None:
        """Mark a write done. A write that ran for more than half the lease announces its
        documents again under a fresh entry first: a reader may have taken it as abandoned."""
        if reannounce and time.time() - entry.ts > LEASE_S / 2:
            self.finish(self.begin(entry.parents))
        self._col.update(ids=[_entry_id(entry.seq)],
                         metadatas=[{"state": "done", "ts": time.time()}])

    # -- readers -----------------------------------------------------------------------------
    def since(self, watermark: int) -> list[Entry]:
        """The entries after `watermark`, in order. One `get` when they fit in a page
        (`store.READ_PAGE`); more are read by ranges of as many sequence numbers."""
        got = self._col.get(where={"seq": {"$gt": int(watermark)}}, limit=READ_PAGE,
                            include=["metadatas", "documents"])
        pages = [got]
        if len(got["ids"]) == READ_PAGE:  # more: all again by ranges (a page has no order)
            pages, low = [], int(watermark)
            while True:
                upto = low + READ_PAGE
                pages.append(self._col.get(where={"$and": [{"seq": {"$gt": low}},
                                                           {"seq": {"$lte": upto}}]},
                                           include=["metadatas", "documents"]))
                low += READ_PAGE
                if not self._col.get(where={"seq": {"$gt": low}}, limit=1, include=[])["ids"]:
                    break
        out = [self._entry(m, d)
               for page in pages for m, d in zip(page["metadatas"], page["documents"])]
        out.sort(key=lambda e: e.seq)
        if out:
            self._head = max(self._head, out[-1].seq)
        return out

    def at(self, seq: int) -> Entry | None:
        """The entry `seq`, or None (not claimed, trimmed, or 0)."""
        got = self._col.get(ids=[_entry_id(seq)], include=["metadatas", "documents"])
        return self._entry(got["metadatas"][0], got["documents"][0]) if got["ids"] else None

    def head(self) -> int:
        """The highest sequence number claimed so far (0 for an empty log)."""
        known = max(self._head, self.floor())  # below the floor nothing is left to read
        later = self.since(known)
        return later[-1].seq if later else known

    def floor(self) -> int:
        """Entries at or below this seq may have been trimmed away."""
        meta = self._client.get_collection(self._name, embedding_function=None).metadata or {}
        self._floor = int(meta.get(_FLOOR_KEY, 0))
        return self._floor

    def pending(self) -> list[Entry]:
        """Entries not marked done."""
        got = self._col.get(where={"state": "pending"}, include=["metadatas", "documents"])
        out = sorted((self._entry(m, d) for m, d in zip(got["metadatas"], got["documents"])),
                     key=lambda e: e.seq)
        for seq in set(self._first_seen) - {e.seq for e in out}:
            del self._first_seen[seq]  # done since, or trimmed
        return out

    def _entry(self, meta: dict[str, Any], doc: str) -> Entry:
        seq, state, ts = int(meta["seq"]), str(meta["state"]), float(meta["ts"])
        held = 0.0
        if state == "pending":
            now = time.monotonic()
            seen = self._first_seen.get(seq)
            if seen is None or seen[0] != ts:  # new, or renewed by its writer
                seen = self._first_seen[seq] = (ts, now)
            held = now - seen[1]
        else:
            self._first_seen.pop(seq, None)
        return Entry(seq, tuple(json.loads(doc)), state, ts, str(meta["writer"]), held)

    # -- writers of the same documents, in turn ----------------------------------------------
    def mark(self) -> Mark:
        """A head, then the writes under way: read before a writer reads what it changes.
        (In this order: a write claimed after the head was read has a higher seq.) The head
        this client knows serves: one below the log's only makes `overlapping` read more."""
        head = self._head or self.head()
        return Mark(head, tuple(self.pending()))

    def overlapping(self, mark: Mark, entry: Entry) -> list[Entry]:
        """Other writers' entries before `entry` that name one of its documents and may have
        changed it since `mark`: under way then, or claimed since."""
        found = {e.seq: e for e in mark.pending}
        found.update((e.seq, e) for e in self.since(mark.head))
        mine = set(entry.parents)
        return [e for seq, e in sorted(found.items()) if seq < entry.seq
                and e.writer != self.token and not mine.isdisjoint(e.parents)]

    def wait(self, entries: Sequence[Entry], mine: Entry, poll_s: float = 0.02
             ) -> list[Entry]:
        """Wait until each of `entries` is done or abandoned; returns the abandoned ones.
        Meanwhile `mine` (the waiter's pending entry) is renewed every quarter lease: a
        waiter is not a dead writer, though its entry stays pending for as long as it waits."""
        seqs = {e.seq for e in entries}
        renewed = time.monotonic()
        while True:
            left = [e for e in self.pending() if e.seq in seqs]
            if all(e.abandoned for e in left):
                return left
            if time.monotonic() - renewed > LEASE_S / 4:
                self.renew(mine)
                renewed = time.monotonic()
            time.sleep(poll_s)
            poll_s = min(poll_s * 2, 0.5, LEASE_S / 8)

    def renew(self, entry: Entry) -> None:
        """Give a pending entry a new timestamp: readers count its lease again."""
        self._col.update(ids=[_entry_id(entry.seq)], metadatas=[{"ts": time.time()}])

    def trim(self, keep: int | None = None) -> None:
        """Delete done entries older than the newest `keep` (default `KEEP`), once the log
        holds twice that many: one trim per `keep` writes, amortized."""
        keep = KEEP if keep is None else keep
        if self._head - self._floor <= 2 * keep or self._head - self.floor() <= 2 * keep:
            return
        cut = self._head - keep
        # the floor first: a client below it rebuilds, so a kill between the two leaves at
        # worst entries no one needs, never a gap that a lagging client cannot see
        col = self._client.get_collection(self._name, embedding_function=None)
        col.modify(metadata={**(col.metadata or {}), _FLOOR_KEY: cut})
        self._floor = cut
        old = self._col.get(where={"$and": [{"seq": {"$lte": cut}}, {"state": "done"}]},
                            include=[])
        if old["ids"]:
            self._col.delete(ids=old["ids"])
        logger.info("change log trimmed to seq > %d", cut)


def advance(watermark: int, entries: Iterable[Entry]) -> int:
    """The new watermark after applying `entries` (sorted): past every entry that is done or
    abandoned, stopping before a gap or a write still under way."""
    for e in entries:
        if e.seq != watermark + 1 or (e.state == "pending" and not e.abandoned):
            break
        watermark = e.seq
    return watermark
