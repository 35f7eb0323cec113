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
from typing import Callable, Mapping, Sequence

import numpy as np

from .embedding import truncate_and_normalize
from .persist import MANIFEST, load_array, load_json, read_manifest, write_folder, write_manifest
from .records import Record, parent_of

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3


def short_vectors(vectors: np.ndarray, funnel_dim: int) -> np.ndarray:
    """The stage-1 vectors: leading `funnel_dim` dims, L2-normalized again."""
    return truncate_and_normalize(np.atleast_2d(vectors), funnel_dim, True)


class FunnelVectors:
    """Full-dimension vectors by record id: a float32 matrix plus an id -> row map.

    A derived index (`sync.Derived`): `replace` takes the live records of some documents,
    with their full vectors when the caller has them (a writer's own), else encodes them with
    `encode`. Saved as a snapshot under `directory` at each commit (embedded stores)."""

    def __init__(self, dim: int, encode: Callable[[list[str]], np.ndarray],
                 directory: str | os.PathLike | None = None) -> None:
        self.dim = dim
        self.encode = encode
        self.directory = Path(directory) if directory is not None else None
        self._lock = threading.RLock()
        self._rows: dict[str, int] = {}
        self._by_parent: dict[str, set[str]] = {}
        self._matrix = np.zeros((0, dim), dtype=np.float32)
        self._free: list[int] = []
        self.watermark = -1
        self.origin = ""
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
            rows = dict(self._rows)
            for p in parents:
                for rid in self._by_parent.pop(p, ()):
                    self._free.append(rows.pop(rid))
                    self._changed.add(rid)
            need = max(0, len(records) - len(self._free))
            matrix = np.array(self._matrix)  # copy: readers keep the old one
            if need:
                start = matrix.shape[0]
                matrix = np.vstack([matrix, np.zeros((need, self.dim), np.float32)])
                self._free.extend(range(start, start + need))
            for r in records:
                row = rows.get(r.id)
                if row is None:
                    row = rows[r.id] = self._free.pop()
                matrix[row] = vectors[r.id] if r.id in vectors else encoded[r.id]
                self._changed.add(r.id)
                self._by_parent.setdefault(r.parent, set()).add(r.id)
            self._matrix, self._rows = matrix, rows

    def clear(self) -> None:
        with self._lock:
            self._rows, self._by_parent, self._free = {}, {}, []
            self._matrix = np.zeros((0, self.dim), dtype=np.float32)
            self._base = None  # the next commit writes a new base

    def similarities(self, ids: Sequence[str], query: np.ndarray, *, cosine: bool = False
                     ) -> np.ndarray:
        """Dot product of `query` (full dim) with each id's vector: the cosine similarity
        for normalized vectors, or always with `cosine`; -inf for an id that is not held."""
        rows, matrix = self._rows, self._matrix  # one consistent snapshot
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

    def nbytes(self) -> int:
        return len(self._rows) * self.dim * 4

    # -- persistence: a base snapshot plus small deltas (persist.py) ----------------------
    def commit(self, watermark: int) -> None:
        """Record the changes since the last commit as one delta folder (O(change)); when
        the deltas outgrow a quarter of the base, write a new base instead (amortized)."""
        self.watermark = watermark
        if self.directory is None:
            return
        with self._lock:
            changed = sorted(self._changed & set(self._rows))
            removed = sorted(self._changed - set(self._rows))
            vectors = self._matrix[[self._rows[i] for i in changed]] if changed else \
                np.zeros((0, self.dim), np.float32)
            self._changed = set()
            root = self.directory
            delta_rows = self._delta_rows + len(changed) + len(removed)
            if self._base is None or delta_rows > max(1000, len(self._rows) // 4):
                ids = sorted(self._rows)
                matrix = self._matrix[[self._rows[i] for i in ids]] if ids else \
                    np.zeros((0, self.dim), np.float32)
                self._base = write_folder(root, "base", {"vectors": matrix, "ids": ids})
                self._deltas, self._delta_rows = [], 0
            elif changed or removed:
                self._deltas.append(write_folder(root, "delta", {
                    "vectors": vectors, "ids": changed, "removed": removed}))
                self._delta_rows = delta_rows
            write_manifest(root, {"format": FORMAT_VERSION, "dim": self.dim,
                                  "count": len(self._rows), "watermark": watermark,
                                  "origin": self.origin, "base": self._base,
                                  "deltas": self._deltas}, [self._base, *self._deltas])

    def _load(self) -> None:
        root = self.directory
        assert root is not None
        try:
            m = read_manifest(root)
            if m.get("format") != FORMAT_VERSION or m["dim"] != self.dim:
                raise ValueError("made with other settings")
            rows: dict[str, np.ndarray] = {}
            for n, name in enumerate([m["base"], *m["deltas"]]):
                ids = load_json(root / name, "ids")
                vectors = load_array(root / name, "vectors")
                if vectors.shape != (len(ids), self.dim) or vectors.dtype != np.float32 \
                        or not all(isinstance(i, str) for i in ids) \
                        or not np.isfinite(vectors).all():
                    raise ValueError(f"inconsistent arrays in {name}")
                for rid in (load_json(root / name, "removed") if n else ()):
                    rows.pop(rid, None)
                rows.update(zip(ids, vectors))
            if len(rows) != m["count"]:
                raise ValueError(f"holds {len(rows)} vectors, {m['count']} were committed")
        except Exception as exc:  # any damage (an empty .npy is numpy's EOFError): rebuild
            if (root / MANIFEST).exists():
                logger.warning("funnel vectors at %s are unreadable (%s); rebuilding", root, exc)
            return
        ids = list(rows)
        self._matrix = np.stack([rows[i] for i in ids]) if ids else \
            np.zeros((0, self.dim), np.float32)
        self._rows = {rid: i for i, rid in enumerate(ids)}
        for rid in ids:
            self._by_parent.setdefault(parent_of(rid), set()).add(rid)
        self._base, self._deltas = m["base"], list(m["deltas"])
        self._delta_rows = sum(len(load_json(root / d, "ids")) for d in self._deltas)
        self.watermark = int(m["watermark"])
        self.origin = str(m.get("origin", ""))
