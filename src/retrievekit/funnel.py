"""Matryoshka funnel: find with short vectors, rank with full ones.

Stage 1 searches the Chroma collection, which holds the leading `funnel_dim` dims of each
vector, re-normalized (a small HNSW graph). Stage 2 rescores the stage-1 candidates by exact
cosine similarity on the full vectors, kept beside the store in a `FunnelVectors` array.

Why an array and not a second Chroma collection: Chroma builds an HNSW graph over every
collection's vectors, so storing the full vectors there would rebuild the very index the
funnel is meant to shrink. The array is derived state: it is rebuilt by re-encoding the texts
Chroma holds (the store records the model and its hash, and the embedding cache makes the
rebuild cheap), so Chroma stays the single source of truth.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from .embedding import truncate_and_normalize
from .graph import OVERFETCH, STALE_SHARE, GraphSettings, VectorGraph
from .persist import (MANIFEST, check_folder, load_array, load_json, read_manifest,
                      write_folder, write_manifest)
from .records import Record, parent_of

logger = logging.getLogger(__name__)

#: 4: every folder holds its files' checksums (persist.py); a format-3 copy is still read
FORMAT_VERSION = 4
#: in a base folder, with local_vectors. "-3": old vectors left behind, not removed; the
#: graphs of before may hold records no search reaches (graph.py), so they are built again
GRAPH_FILE = "graph-3.usearch"
#: delta rows a graph may have to replay on open after a clean close (`close`)
GRAPH_REPLAY = 1000
#: rows copied at once when all of them are written out or put in a graph
_ROWS_AT_ONCE = 8192


def short_vectors(vectors: np.ndarray, funnel_dim: int) -> np.ndarray:
    """The stage-1 vectors: leading `funnel_dim` dims, L2-normalized again."""
    return truncate_and_normalize(np.atleast_2d(vectors), funnel_dim, True)


class FunnelVectors:
    """Full-dimension vectors by record id: a float32 matrix plus an id -> row map.

    A derived index (`sync.Derived`): `replace` takes the live records of some documents,
    with their full vectors when the caller has them (a writer's own), else encodes them with
    `encode`. Saved as a snapshot under `directory` at each commit (embedded stores)."""

    def __init__(self, dim: int, encode: Callable[[list[str]], np.ndarray],
                 directory: str | os.PathLike | None = None,
                 graph: GraphSettings | None = None) -> None:
        self.dim = dim
        #: an HNSW graph over these vectors (local_vectors), or None (the funnel's stage 1
        #: runs in Chroma)
        self.graph = VectorGraph(dim, graph) if graph is not None else None
        #: a new base when the deltas outgrow 1/_base_every of it: with a graph, an open
        #: replays the deltas into it (~0.1-0.6 ms a vector), so they are kept smaller
        self._base_every = 10 if graph is not None else 4
        self.encode = encode
        self.directory = Path(directory) if directory is not None else None
        self._lock = threading.RLock()
        # rows are written in place; a reader that overlapped a write (the version moved, or
        # is odd while a write runs) reads again under the lock (`similarities`)
        self._version = 0
        self._rows: dict[str, int] = {}
        self._by_parent: dict[str, set[str]] = {}
        self._matrix = np.zeros((0, dim), dtype=np.float32)  # capacity rows, _used in use
        self._used = 0
        self._free: list[int] = []
        self.watermark = -1
        self.origin = ""
        self.tip = ""  # the writer of the log entry at the watermark (sync.py)
        self._changed: set[str] = set()  # ids upserted or removed since the last commit
        self._base: str | None = None  # folder names named by the manifest
        self._deltas: list[str] = []
        self._delta_rows = 0
        if self.directory is not None:
            self._load()

    def __len__(self) -> int:
        return len(self._rows)

    def ids(self) -> set[str]:
        return set(self._rows)

    def replace(self, parents: Sequence[str], records: Sequence[Record],
                vectors: Mapping[str, np.ndarray] | None = None) -> None:
        vectors = vectors or {}
        todo = [r for r in records if r.id not in vectors]
        encoded = dict(zip([r.id for r in todo], self.encode([r.text for r in todo]))) \
            if todo else {}
        with self._lock:
            self._version += 1
            try:
                self._write(parents, records, vectors, encoded)
            finally:
                self._version += 1

    def _write(self, parents: Sequence[str], records: Sequence[Record],
               vectors: Mapping[str, np.ndarray], encoded: Mapping[str, np.ndarray]) -> None:
        """`replace` in place, under the lock: O(change), amortized (the matrix doubles
        when it is full, so the rows are copied a few times over a bulk load, not once per
        write)."""
        rows = self._rows
        dropped: list[str] = []
        for p in parents:
            for rid in self._by_parent.pop(p, ()):
                self._free.append(rows.pop(rid))
                self._changed.add(rid)
                dropped.append(rid)
        need = len(records) - len(self._free)
        if need > 0:
            used = self._used
            if used + need > len(self._matrix):
                grown = np.zeros((max(2 * len(self._matrix), used + need, 1024), self.dim),
                                 np.float32)
                grown[:used] = self._matrix[:used]
                self._matrix = grown
            self._free.extend(range(used + need - 1, used - 1, -1))  # popped lowest first
            self._used = used + need
        matrix = self._matrix
        for r in records:
            row = rows.get(r.id)
            if row is None:
                row = rows[r.id] = self._free.pop()
            matrix[row] = vectors[r.id] if r.id in vectors else encoded[r.id]
            self._changed.add(r.id)
            self._by_parent.setdefault(r.parent, set()).add(r.id)
        if self.graph is not None:
            self.graph.remove([rid for rid in dropped if rid not in rows])
            ids = [r.id for r in records]
            self.graph.upsert(ids, self._vectors_of(ids))
            if self.graph.stale > STALE_SHARE * len(self.graph) + 64:
                self._build_graph()  # the old vectors left behind (graph.py), dropped

    def clear(self) -> None:
        with self._lock:
            self._version += 2  # a reader that overlapped reads again
            self._rows, self._by_parent, self._free = {}, {}, []
            self._matrix, self._used = np.zeros((0, self.dim), dtype=np.float32), 0
            self._base = None  # the next commit writes a new base
            if self.graph is not None:
                self.graph.clear()

    def similarities(self, ids: Sequence[str], query: np.ndarray, *, cosine: bool = False
                     ) -> np.ndarray:
        """Dot product of `query` (full dim) with each id's vector: the cosine similarity
        for normalized vectors, or always with `cosine`; -inf for an id that is not held."""
        version = self._version
        if not version & 1:
            try:
                out = self._similarities(ids, query, cosine)
            except IndexError:  # a row past the matrix it read: a write grew it meanwhile
                out = None
            if out is not None and self._version == version:  # no write overlapped
                return out
        with self._lock:
            return self._similarities(ids, query, cosine)

    def _similarities(self, ids: Sequence[str], query: np.ndarray, cosine: bool
                      ) -> np.ndarray:
        rows, matrix = self._rows, self._matrix
        idx = np.asarray([rows.get(i, -1) for i in ids], dtype=np.int64)
        out = np.full(len(ids), -np.inf, dtype=np.float32)
        ok = idx >= 0
        if ok.any():
            held = matrix[idx[ok]]
            q = np.asarray(query, dtype=np.float32)
            out[ok] = held @ q
            if cosine:
                out[ok] /= np.maximum(np.linalg.norm(held, axis=1) * np.linalg.norm(q), 1e-12)
        return out

    def nearest(self, query: np.ndarray, n: int) -> list[tuple[str, float]]:
        """The `n` records nearest to `query`, found by the graph and scored exactly
        (cosine), best first. Only with a graph."""
        assert self.graph is not None
        rows = self._rows
        # asked for about all of them (a small store, a widened filter): scan exactly, as a
        # graph walk may miss a few and the scan costs no more
        ids = list(rows) if OVERFETCH * n >= len(rows) else self.graph.nearest(query, n)
        sims = self.similarities(ids, query, cosine=True)
        order = np.argsort(-sims, kind="stable")[:n]
        return [(ids[i], float(sims[i])) for i in order if np.isfinite(sims[i])]

    def nbytes(self) -> int:
        return len(self._rows) * self.dim * 4

    # -- persistence: a base snapshot plus small deltas (persist.py) ----------------------
    def close(self) -> None:
        """With a graph, fold deltas of more than `GRAPH_REPLAY` rows into a new base, so
        that the next open loads the graph instead of replaying them into it (after a
        bulk load, seconds at 100k records)."""
        if self.graph is not None and self.directory is not None \
                and self._delta_rows > GRAPH_REPLAY:
            self._base = None
            self.commit(self.watermark)

    def commit(self, watermark: int, tip: str | None = None) -> None:
        """Record the changes since the last commit as one delta folder (O(change)); when
        the deltas outgrow a quarter of the base (a tenth with a graph), write a new base
        instead (amortized). Nothing changes here until the manifest is written: a commit
        that fails (a full disk) leaves the changes to the next one."""
        tip = self.tip if tip is None else tip
        if self.directory is None:
            self.watermark, self.tip = watermark, tip
            return
        with self._lock:
            rows = self._rows
            changed = sorted(i for i in self._changed if i in rows)
            removed = sorted(i for i in self._changed if i not in rows)
            root = self.directory
            base, deltas = self._base, self._deltas
            delta_rows = self._delta_rows + len(changed) + len(removed)
            if base is None or delta_rows > max(1000, len(self._rows) // self._base_every):
                ids = sorted(self._rows)
                files: dict[str, object] = {"vectors.npy": self._rows_writer(ids), "ids": ids}
                if self.graph is not None:
                    files[GRAPH_FILE] = self.graph.save
                base, deltas, delta_rows = write_folder(root, "base", files), [], 0
            elif changed or removed:
                deltas = [*deltas, write_folder(root, "delta", {
                    "vectors": self._vectors_of(changed), "ids": changed, "removed": removed})]
            else:
                delta_rows = self._delta_rows
            write_manifest(root, {"format": FORMAT_VERSION, "dim": self.dim,
                                  "count": len(self._rows), "watermark": watermark,
                                  "origin": self.origin, "tip": tip, "base": base,
                                  "deltas": deltas}, [base, *deltas])
            self._base, self._deltas, self._delta_rows = base, deltas, delta_rows
            self._changed = set()
            self.watermark, self.tip = watermark, tip

    def _rows_writer(self, ids: list[str]) -> Callable[[Path], None]:
        """Writes the vectors of `ids`, in that order, as one `.npy` file, a slice at a
        time (a gathered copy of them all would double the matrix's memory)."""
        def write(path: Path) -> None:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                      "fortran_order": False, "shape": (len(ids), self.dim)}
            with open(path, "wb") as fh:
                np.lib.format.write_array_header_2_0(fh, header)
                for part in _slices(ids):
                    fh.write(self._vectors_of(part).tobytes())
        return write

    def _vectors_of(self, ids: Sequence[str]) -> np.ndarray:
        """The vectors of `ids` (all held), in that order, as one new array."""
        return self._matrix[[self._rows[i] for i in ids]] if len(ids) else \
            np.zeros((0, self.dim), np.float32)

    def _load(self) -> None:
        root = self.directory
        assert root is not None
        try:
            m = read_manifest(root)
            if m.get("format") not in (3, FORMAT_VERSION) or m["dim"] != self.dim:
                raise ValueError("made with other settings")
            changes: list[tuple[list[str], list[str], np.ndarray]] = []  # base, then deltas
            for n, name in enumerate([m["base"], *m["deltas"]]):
                if m["format"] == FORMAT_VERSION:  # the graph's own: `_load_graph`
                    check_folder(root / name, skip=[GRAPH_FILE])
                ids = load_json(root / name, "ids")
                vectors = load_array(root / name, "vectors")
                if vectors.shape != (len(ids), self.dim) or vectors.dtype != np.float32 \
                        or not all(isinstance(i, str) for i in ids) \
                        or not np.isfinite(vectors).all():
                    raise ValueError(f"inconsistent arrays in {name}")
                changes.append((load_json(root / name, "removed") if n else [], ids, vectors))
            matrix, rows, free = _apply(changes)
            if len(rows) != m["count"]:
                raise ValueError(f"holds {len(rows)} vectors, {m['count']} were committed")
            watermark, origin = int(m["watermark"]), str(m.get("origin", ""))
            tip = str(m.get("tip", ""))
        except Exception as exc:  # any damage (an empty .npy is numpy's EOFError): rebuild
            if (root / MANIFEST).exists():
                logger.warning("funnel vectors at %s are unreadable (%s); rebuilding", root, exc)
            return
        self._matrix, self._rows, self._free, self._used = matrix, rows, free, len(matrix)
        for rid in rows:
            self._by_parent.setdefault(parent_of(rid), set()).add(rid)
        self._base, self._deltas = m["base"], list(m["deltas"])
        self._delta_rows = sum(len(ids) + len(removed) for removed, ids, _ in changes[1:])
        self.watermark, self.origin, self.tip = watermark, origin, tip
        if self.graph is not None:
            self._load_graph(root / m["base"], changes)

    def _load_graph(self, base: Path, changes: list[tuple[list[str], list[str], np.ndarray]]
                    ) -> None:
        """The graph saved with the base, brought up to date with the deltas; built again
        from the vectors (and saved with a new base) when it is missing or damaged."""
        assert self.graph is not None
        try:
            _, base_ids, _ = changes[0]
            check_folder(base, only=[GRAPH_FILE])  # usearch may crash on altered bytes
            self.graph = VectorGraph.load(base / GRAPH_FILE, self.dim, self.graph.settings,
                                          base_ids)
            for removed, ids, vectors in changes[1:]:
                self.graph.remove(removed)
                self.graph.upsert(ids, vectors)
            return
        except Exception as exc:  # a missing file is OSError; damage is ValueError
            if (base / GRAPH_FILE).exists():
                logger.warning("the vector graph in %s is unreadable (%s); building it again",
                               base, exc)
        self._build_graph()
        self._base = None  # saved with the next base, written now
        self.commit(self.watermark)

    def _build_graph(self) -> None:
        """The graph built anew from the vectors held, without the old vectors it kept; it
        takes the old one's place when whole (a search meanwhile uses the old one)."""
        assert self.graph is not None
        graph, ids = VectorGraph(self.dim, self.graph.settings), list(self._rows)
        for part in _slices(ids):
            graph.upsert(part, self._vectors_of(part))
        self.graph = graph


def _slices(ids: list[str]) -> Iterator[list[str]]:
    """`ids` in slices of `_ROWS_AT_ONCE` (so that no copy of all their vectors is made)."""
    for start in range(0, len(ids), _ROWS_AT_ONCE):
        yield ids[start:start + _ROWS_AT_ONCE]


def _apply(changes: list[tuple[list[str], list[str], np.ndarray]]
           ) -> tuple[np.ndarray, dict[str, int], list[int]]:
    """The matrix, id -> row map and free rows that a base and its deltas (in order) make:
    the base array is used as it was loaded and the deltas written into it (no copy unless
    they add rows)."""
    _, base_ids, matrix = changes[0]
    rows = {rid: i for i, rid in enumerate(base_ids)}
    free: list[int] = []
    extra: list[np.ndarray] = []  # rows past the base's
    for removed, ids, vectors in changes[1:]:
        for rid in removed:
            row = rows.pop(rid, None)
            if row is not None:
                free.append(row)
        for rid, vec in zip(ids, vectors):
            row = rows.get(rid)
            if row is None:
                row = rows[rid] = free.pop() if free else len(matrix) + len(extra)
                if row == len(matrix) + len(extra):
                    extra.append(vec)
                    continue
            if row < len(matrix):
                matrix[row] = vec
            else:
                extra[row - len(matrix)] = vec
    if extra:
        matrix = np.concatenate([matrix, np.stack(extra)])
    return matrix, rows, free
