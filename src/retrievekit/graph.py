"""An HNSW graph over the local vectors, in this process (usearch).

With `local_vectors` the dense side does not ask Chroma: a nearest-neighbour query of
Chroma's graph pays for the client, its log and SQLite on every call (1.45 ms against
0.29 ms in process for the same graph over the real vectors of the five collections,
docs/benchmarks.md "The dense floor"). The graph is derived state like the BM25 index: it
holds the vectors of `FunnelVectors`, follows its changes, and is saved with its base
snapshot (usearch's own file format; never pickle). Candidates it finds
are scored again exactly on the float32 copy, so the graph may hold its vectors in 8 bits.

Why usearch: a maintained HNSW library with removal, concurrent search and a documented
file format, with wheels; hnswlib (Chroma's own before 1.0) ships only a source package
that needs a C++ build.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np


#: candidates asked of the graph per neighbour wanted (up to ef_search): there this costs
#: almost nothing and keeps the 8-bit distances from dropping a neighbour near the cut
OVERFETCH = 2


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
                     expansion_add=s.ef_construction, expansion_search=s.ef_search)

    def __len__(self) -> int:
        return len(self._ids) + len(self._outside)

    def ids(self) -> set[str]:
        """The record ids the graph holds."""
        return set(self._ids.values()) | self._outside

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Hold `vectors[i]` under `ids[i]`, replacing what an id held."""
        if not len(ids):
            return
        self.remove(ids)
        last = {rid: row for row, rid in enumerate(ids)}  # an id given twice: the last wins
        keys, rows = [], []
        for rid, row in last.items():
            key = key_of(rid)
            if key in self._ids:
                self._outside = self._outside | {rid}  # copy on write: readers iterate it
                continue
            self._ids[key] = rid
            keys.append(key)
            rows.append(row)
        if keys:  # one thread: usearch's concurrent add strands nodes no search reaches
            self._index.add(np.asarray(keys, dtype=np.uint64),  # (unum-cloud/USearch#735)
                            np.ascontiguousarray(vectors[rows], dtype=np.float32), threads=1)

    def remove(self, ids: Iterable[str]) -> None:
        gone = []
        for rid in ids:
            if rid in self._outside:
                self._outside = self._outside - {rid}
                continue
            key = key_of(rid)
            if self._ids.get(key) == rid:
                del self._ids[key]
                gone.append(key)
        if gone:
            self._index.remove(np.asarray(gone, dtype=np.uint64))

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
        fetch = min(len(ids), max(n + n // 4, min(OVERFETCH * n, self.settings.ef_search)))
        # usearch walks max(ef_search, fetch) wide: a long list needs no wider setting (one
        # raised for it would stay, and slow every later query)
        found = index.search(np.asarray(query, dtype=np.float32), fetch)
        out = [rid for rid in map(ids.get, found.keys.tolist()) if rid is not None]
        return out + list(outside)

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write the graph to `path` in usearch's format, and its checksum beside it."""
        self._index.save(str(path))
        _checksum_file(path).write_text(_checksum(path), encoding="ascii")

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
        try:  # usearch reads a file with altered bytes, then crashes the process in a search
            expected = _checksum_file(path).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"the saved graph has no readable checksum: {exc}") from exc
        if _checksum(path) != expected:
            raise ValueError("the saved graph does not match its checksum")
        try:
            index = Index.restore(str(path))
        except Exception as exc:  # usearch raises RuntimeError or returns None on damage
            raise ValueError(f"the saved graph is unreadable: {exc}") from exc
        if index is None:
            raise ValueError("the saved graph is unreadable")
        if len(index) == 0:  # usearch does not keep an empty index's settings
            index = graph._index
        elif index.ndim != dim or index.connectivity != settings.m \
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
        if len(index) != len(keys) or (len(keys) and not np.all(index.contains(keys))):
            raise ValueError(f"the saved graph holds {len(index)} vectors, not the "
                             f"{len(keys)} records of its snapshot")
        graph._index = index
        return graph


def _checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".blake2b")


def _checksum(path: Path) -> str:
    """The BLAKE2b digest of a file (~0.6 GB/s here: ~0.14 s for the 84 MB graph of 120k
    records, at each save and open)."""
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
