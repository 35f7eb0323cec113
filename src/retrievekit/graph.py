"""An HNSW graph over the local vectors, in this process (usearch).

With `local_vectors` the dense side does not ask Chroma: a nearest-neighbour query of
Chroma's graph pays for the client, its log and SQLite on every call (1.45 ms against
0.29 ms in process for the same graph over the real vectors of the five collections,
docs/benchmarks.md "The dense floor"). The graph is derived state like the BM25 index: it
holds the vectors of `FunnelVectors`, follows its changes, and is saved with its base
snapshot (usearch's own file format; never pickle). Candidates it finds
are scored again exactly on the float32 copy, so the graph may hold its vectors in 8 bits.

Nothing is ever removed from the usearch index: a record replaced or deleted leaves its old
vector behind (a key may hold several: `multi`), which results skip or score again exactly.
usearch's removal reuses the freed slots and leaves other records that no search reaches
(measured: 2-9 of ~1,450 live vectors after 60 rounds of updates and deletes in clusters;
0 with old vectors left behind, 0-2 at three vectors a record). The old vectors are
dropped when `FunnelVectors` builds the graph again, once they pass a quarter of the
records (`STALE_SHARE`).

Why usearch: a maintained HNSW library with several vectors a key, concurrent search and a
documented file format, with wheels; hnswlib (Chroma's own before 1.0) ships only a source package
that needs a C++ build.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np


#: candidates asked of the graph per neighbour wanted (up to ef_search): there this costs
#: almost nothing and keeps the 8-bit distances from dropping a neighbour near the cut
OVERFETCH = 2
#: the graph is built again when the old vectors it holds pass this share of its records
STALE_SHARE = 0.25


@dataclass(frozen=True)
class GraphSettings:
    """The graph's HNSW parameters (the store's: `StoreConfig.hnsw_*`)."""

    m: int
    ef_construction: int
    ef_search: int


def key_of(record_id: str) -> int:
    """The graph's 64-bit key of a record id."""
    return int.from_bytes(hashlib.blake2b(record_id.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "little")


class VectorGraph:
    """Record ids -> vectors in a usearch HNSW index (cosine, int8), searchable while it
    changes. Writes are serialized by the caller (`FunnelVectors`' lock)."""

    def __init__(self, dim: int, settings: GraphSettings) -> None:
        self.dim = dim
        self.settings = settings
        self._index = self._new()
        self._ids: dict[int, str] = {}  # key -> record id
        #: ids whose key another id already holds (a 64-bit hash collision): not in the
        #: graph, offered to every query instead, so they are still found
        self._outside: set[str] = set()

    def _new(self):
        from usearch.index import Index

        s = self.settings
        return Index(ndim=self.dim, metric="cos", dtype="i8", connectivity=s.m,
                     expansion_add=s.ef_construction, expansion_search=s.ef_search, multi=True)

    def __len__(self) -> int:
        return len(self._ids) + len(self._outside)

    @property
    def stale(self) -> int:
        """Vectors in the index that no record holds now (old versions, removed records)."""
        return len(self._index) - len(self._ids)

    def ids(self) -> set[str]:
        """The record ids the graph holds."""
        return set(self._ids.values()) | self._outside

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Hold `vectors[i]` under `ids[i]`, replacing what an id held (its old vector stays
        in the index, stale)."""
        if not len(ids):
            return
        last = {rid: row for row, rid in enumerate(ids)}  # an id given twice: the last wins
        keys, rows = [], []
        for rid, row in last.items():
            key = key_of(rid)
            if self._ids.get(key, rid) != rid:  # a 64-bit collision with another id
                self._outside = self._outside | {rid}  # copy on write: readers iterate it
                continue
            self._ids[key] = rid
            keys.append(key)
            rows.append(row)
        if keys:  # one thread: usearch's concurrent add strands nodes no search reaches
            self._index.add(np.asarray(keys, dtype=np.uint64),  # (unum-cloud/USearch#735)
                            np.ascontiguousarray(vectors[rows], dtype=np.float32), threads=1)

    def remove(self, ids: Iterable[str]) -> None:
        """Stop holding `ids` (their vectors stay in the index, stale)."""
        for rid in ids:
            if rid in self._outside:
                self._outside = self._outside - {rid}
                continue
            key = key_of(rid)
            if self._ids.get(key) == rid:
                del self._ids[key]

    def clear(self) -> None:
        self._index, self._ids, self._outside = self._new(), {}, set()

    def nearest(self, query: np.ndarray, n: int) -> list[str]:
        """Candidates for the `n` records nearest to `query`: more than n nearest by the
        graph's 8-bit distances (so that quantization does not cost the n-th), plus any
        collided ids; unordered, the caller scores them exactly."""
        index, ids, outside = self._index, self._ids, self._outside  # clear() swaps them
        if n <= 0 or not ids:
            return list(outside)
        # twice n while that stays within ef_search (free there); past it, a quarter more
        # (a post-filter's long lists: the cut is what 8-bit rounding can move)
        fetch = max(n + n // 4, min(OVERFETCH * n, self.settings.ef_search))
        # as many more as stale vectors may take places among them
        fetch = min(len(index), math.ceil(fetch * len(index) / len(ids)))
        # usearch walks max(ef_search, fetch) wide: a long list needs no wider setting (one
        # raised for it would stay, and slow every later query)
        found = index.search(np.asarray(query, dtype=np.float32), fetch)
        out = dict.fromkeys(rid for rid in map(ids.get, found.keys.tolist()) if rid is not None)
        return list(out) + list(outside)

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write the graph to `path` in usearch's format (its folder's checksums, persist.py,
        guard it: usearch reads a file with altered bytes, then crashes in a search)."""
        try:
            self._index.save(str(path))
        except RuntimeError as exc:  # usearch's word for a full disk, among others
            if shutil.disk_usage(path.parent).free < self._index.serialized_length:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
            raise

    @classmethod
    def load(cls, path: Path, dim: int, settings: GraphSettings, ids: Iterable[str]
             ) -> "VectorGraph":
        """The graph saved at `path`, which must hold exactly `ids`; ValueError when it does
        not (damaged, or saved with other settings), OSError when it is missing: the
        caller builds it again."""
        from usearch.index import Index

        graph = cls(dim, settings)
        if not path.is_file():
            raise FileNotFoundError(path)
        try:
            index = Index.restore(str(path))
        except Exception as exc:  # usearch raises RuntimeError or returns None on damage
            raise ValueError(f"the saved graph is unreadable: {exc}") from exc
        if index is None:
            raise ValueError("the saved graph is unreadable")
        if len(index) == 0:  # usearch does not keep an empty index's settings
            index = graph._index
        elif index.ndim != dim or index.connectivity != settings.m or not index.multi \
                or str(index.dtype).lower().rsplit(".", 1)[-1] != "i8":
            raise ValueError("the saved graph was made with other settings")
        index.expansion_add = settings.ef_construction
        index.expansion_search = settings.ef_search
        for rid in ids:
            key = key_of(rid)
            if key in graph._ids:
                graph._outside.add(rid)
            else:
                graph._ids[key] = rid
        keys = np.fromiter(graph._ids, dtype=np.uint64, count=len(graph._ids))
        if len(index) < len(keys) or (len(keys) and not np.all(index.contains(keys))):
            raise ValueError(f"the saved graph holds {len(index)} vectors, not every one of "
                             f"the {len(keys)} records of its snapshot")
        graph._index = index
        return graph

