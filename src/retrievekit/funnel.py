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
from .persist import current_snapshot, load_array, load_json, save_snapshot
from .records import Record, parent_of

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2


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
                self._by_parent.setdefault(r.parent, set()).add(r.id)
            self._matrix, self._rows = matrix, rows

    def clear(self) -> None:
        with self._lock:
            self._rows, self._by_parent, self._free = {}, {}, []
            self._matrix = np.zeros((0, self.dim), dtype=np.float32)

    def similarities(self, ids: Sequence[str], query: np.ndarray) -> np.ndarray:
        """Cosine similarity of `query` (full dim, normalized) with each id's vector;
        -inf for an id that is not held."""
        rows, matrix = self._rows, self._matrix  # one consistent snapshot
        idx = np.asarray([rows.get(i, -1) for i in ids], dtype=np.int64)
        out = np.full(len(ids), -np.inf, dtype=np.float32)
        ok = idx >= 0
        if ok.any():
            out[ok] = matrix[idx[ok]] @ np.asarray(query, dtype=np.float32)
        return out

    def nbytes(self) -> int:
        return len(self._rows) * self.dim * 4

    # -- persistence (persist.py: new folder, then an atomic pointer swap) ----------------
    def commit(self, watermark: int) -> None:
        self.watermark = watermark
        if self.directory is None:
            return
        with self._lock:
            ids = sorted(self._rows)
            matrix = self._matrix[[self._rows[i] for i in ids]] if ids else \
                np.zeros((0, self.dim), np.float32)
        save_snapshot(self.directory, "funnel", {
            "vectors": matrix, "ids": ids,
            "meta": {"format": FORMAT_VERSION, "dim": self.dim, "count": len(ids),
                     "watermark": watermark, "origin": self.origin}})

    def _load(self) -> None:
        root = self.directory
        assert root is not None
        try:
            d = current_snapshot(root)
            meta = load_json(d, "meta")
            ids = load_json(d, "ids")
            matrix = load_array(d, "vectors")
            if meta["dim"] != self.dim or matrix.shape != (len(ids), self.dim) \
                    or meta["count"] != len(ids) or matrix.dtype != np.float32 \
                    or meta.get("format") != FORMAT_VERSION \
                    or not all(isinstance(i, str) for i in ids) \
                    or not np.isfinite(matrix).all():
                raise ValueError("inconsistent funnel arrays")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if (root / "current.json").exists():
                logger.warning("funnel vectors at %s are unreadable (%s); rebuilding", root, exc)
            return
        self._matrix = matrix
        self._rows = {doc_id: i for i, doc_id in enumerate(ids)}
        for rid in ids:
            self._by_parent.setdefault(parent_of(rid), set()).add(rid)
        self.watermark = int(meta["watermark"])
        self.origin = str(meta.get("origin", ""))
