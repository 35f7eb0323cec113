"""What filters matched, remembered by each committed state of the BM25 index.

Multi-tenant RAG filters every query, mostly by a few values used over and over. From a
filter's second use on, a snapshot of the BM25 index (sparse.py) remembers the records it
matches: the dense side then keeps an unfiltered neighbour list's passing records by set
membership, or scans the subset's vectors exactly (searcher.py). This is a search engine's
filter cache (Lucene's LRUQueryCache with its usage-tracking policy caches a filter once it
has been seen more than once), bounded the same way: by the records and vector bytes held,
the least recently used dropped first.

A commit carries the subsets forward, patched by what it changed (the records of replaced
documents out, the new records that match in): O(change), so a write does not make the hot
filters cold again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Sequence

import numpy as np

#: filters a snapshot counts or notes before it forgets them (and starts over)
_FILTER_MEMO = 1024
#: the records the subsets may hold together, as a share of all (at 120k: ~60k ids, ~6 MiB)
SUBSET_SHARE = 0.5
#: the bytes of vectors the subsets may hold together (64 MiB: ~44k vectors of 384 floats)
SUBSET_VECTOR_BYTES = 64 << 20


@dataclass(frozen=True)
class Filter:
    """A `where` filter as the BM25 index evaluates it: its tantivy query and a key naming
    it (the filter as canonical JSON), under which a snapshot remembers what it matched."""

    key: str
    query: Any = field(repr=False)  # a comparison's repr lists its ~480 terms


Vectors = tuple[list[str], np.ndarray]  # ids found in Chroma, one unit row each


class Subset:
    """The records a filter matches in one snapshot (`ids`, `members`), and their vectors
    while it holds them for the query path: `held` is one pair, replaced whole (searches
    and commits read it without a lock, and a subset a commit did not touch is shared by
    two snapshots): the `Vectors` read so far, or None, and the ids whose vectors are not
    read yet (records written since)."""

    __slots__ = ("filter", "ids", "members", "held", "reading")

    def __init__(self, f: Filter, ids: list[str], vectors: Vectors | None = None,
                 missing: Sequence[str] = ()) -> None:
        self.filter = f
        self.ids = ids
        self.members = frozenset(ids)
        self.held: tuple[Vectors | None, tuple[str, ...]] = (vectors, tuple(missing))
        #: a search started reading its vectors behind the query path (`Subsets.claim`)
        self.reading = False

    @property
    def vectors(self) -> Vectors | None:
        return self.held[0]

    def nbytes(self) -> int:
        vectors = self.held[0]
        return 0 if vectors is None else int(vectors[1].nbytes)


class Subsets:
    """The filter memo of one snapshot.

    Args:
        count: how many records a tantivy query matches.
        matching: the ids of every record a tantivy query matches.
        size: how many records the snapshot holds.
    """

    def __init__(self, count: Callable[[Any], int], matching: Callable[[Any, int], list[str]],
                 size: int) -> None:
        self._count = count
        self._matching = matching
        self.size = size
        self._counts: dict[str, int] = {}
        self._asked: set[str] = set()  # keys a subset was asked for once
        self._subsets: OrderedDict[str, Subset] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # searches share the memo: its changes are atomic

    def __bool__(self) -> bool:
        """Whether any subset is remembered (a commit then has something to carry)."""
        return bool(self._subsets)

    def count(self, f: Filter) -> int:
        n = self._counts.get(f.key)
        if n is None:
            if len(self._counts) >= _FILTER_MEMO:
                self._counts.clear()
            n = self._counts[f.key] = self._count(f.query)
        return n

    def subset(self, f: Filter) -> Subset | None:
        """What `f` matches, from the second time it is asked for on (a filter used once
        costs nothing extra; reading the set costs ~2 us a record)."""
        with self._lock:
            got = self._subsets.get(f.key)
            if got is not None:
                self._subsets.move_to_end(f.key)
                return got
            if f.key not in self._asked:
                if len(self._asked) >= _FILTER_MEMO:
                    self._asked.clear()
                self._asked.add(f.key)
                return None
        return self.remember(f)

    def remember(self, f: Filter) -> Subset | None:
        """What `f` matches, remembered now (None past the budget): for a filter the query
        path reads in whole anyway, on its first use."""
        n = self.count(f)
        if n > SUBSET_SHARE * self.size:
            return None
        return self._add(Subset(f, self._matching(f.query, n) if n else []))

    def _add(self, subset: Subset) -> Subset:
        """Remember `subset`, dropping the least recently used ones over the budget; the
        one remembered already when another search remembered the filter meanwhile (one
        subset per filter: vectors held on a second would not count against the budget)."""
        with self._lock:
            got = self._subsets.get(subset.filter.key)
            if got is not None:
                self._subsets.move_to_end(subset.filter.key)
                return got
            held = sum(len(s.ids) for s in self._subsets.values())
            while self._subsets and held + len(subset.ids) > SUBSET_SHARE * self.size:
                held -= len(self._subsets.popitem(last=False)[1].ids)
            self._subsets[subset.filter.key] = subset
        return subset

    def claim(self, subset: Subset) -> bool:
        """Whether the caller is the first to read `subset`'s vectors (then it reads them)."""
        with self._lock:
            if subset.reading or subset.held[0] is not None:
                return False
            subset.reading = True
            return True

    @staticmethod
    def can_hold(nbytes: int) -> bool:
        return nbytes <= SUBSET_VECTOR_BYTES

    def hold(self, subset: Subset, vectors: Vectors) -> Vectors:
        """Keep `vectors` on `subset` (all of its records now), dropping those of the least
        recently used subsets until all held fit in `SUBSET_VECTOR_BYTES` (the caller
        checks with `can_hold` that these fit). Returns `vectors`: another search may drop
        them from the subset again at once."""
        need = int(vectors[1].nbytes)
        with self._lock:
            held = sum(s.nbytes() for s in self._subsets.values() if s is not subset)
            for other in self._subsets.values():
                if held + need <= SUBSET_VECTOR_BYTES:
                    break
                if other is not subset:
                    held -= other.nbytes()
                    other.held = (None, ())
            subset.held = (vectors, ())
        return vectors

    def carried(self, to: "Subsets", removed: Collection[str], added: Sequence[str],
                keep: Callable[[Sequence[str], Filter], Collection[str]]) -> "Subsets":
        """These subsets, moved to the next snapshot `to`: without the `removed` records
        (those of replaced or deleted documents), with those of the `added` ones that
        `keep` (evaluated in `to`) says match; one the commit did not touch is shared. A
        subset whose size then disagrees with its filter's count in `to` is dropped
        (rebuilt on its next use), never served. The filters asked for once are noted in
        `to` too, so that a filter used between every two commits is remembered."""
        with self._lock:
            to._asked = set(self._asked)
            olds = list(self._subsets.values())
        for old in olds:
            joined = keep(added, old.filter) if added else ()
            if not joined and old.members.isdisjoint(removed):  # untouched: shared
                if len(old.ids) == to.count(old.filter):
                    to._add(old)
                continue
            ids = [rid for rid in old.ids if rid not in removed] + \
                [rid for rid in added if rid in joined]
            if len(ids) != to.count(old.filter):
                continue
            vectors, missing = None, []
            held, pending = old.held  # one read: a search may hold new vectors meanwhile
            if held is not None:
                found, matrix = held
                rows = [i for i, rid in enumerate(found) if rid not in removed]
                vectors = ([found[i] for i in rows], matrix[rows])
                missing = [rid for rid in pending if rid not in removed] + \
                    [rid for rid in added if rid in joined]
            to._add(Subset(old.filter, ids, vectors, missing))
        return to
