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
from typing import Sequence

import numpy as np

from .embedding import truncate_and_normalize
from .persist import current_snapshot, load_array, load_json, save_snapshot

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def short_vectors(vectors: np.ndarray, funnel_dim: int) -> np.ndarray:
    """The stage-1 vectors: leading `funnel_dim` dims, L2-normalized again."""
    return truncate_and_normalize(np.atleast_2d(vectors), funnel_dim, True)


class FunnelVectors:
    """Full-dimension vectors by id: a float32 matrix plus an id -> row map."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._lock = threading.RLock()
        self._rows: dict[str, int] = {}
        self._hashes: dict[str, str] = {}
        self._matrix = np.zeros((0, dim), dtype=np.float32)
        self._free: list[int] = []
        self.marker = ""

    def __len__(self) -> int:
        return len(self._rows)

    def hashes(self) -> dict[str, str]:
        with self._lock:
            return dict(self._hashes)

    def upsert(self, ids: Sequence[str], vectors: np.ndarray, hashes: Sequence[str]) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        with self._lock:
            matrix = np.array(self._matrix)  # copy: readers keep the old one
            rows = dict(self._rows)
            new = [i for i in ids if i not in rows]
            need = max(0, len(set(new)) - len(self._free))
            if need:
                start = matrix.shape[0]
                matrix = np.vstack([matrix, np.zeros((need, self.dim), np.float32)])
                self._free.extend(range(start, start + need))
            for doc_id, vec, h in zip(ids, vectors, hashes):
                row = rows.get(doc_id)
                if row is None:
                    row = rows[doc_id] = self._free.pop()
                matrix[row] = vec
                self._hashes[doc_id] = h
            self._matrix, self._rows = matrix, rows

    def delete(self, ids: Sequence[str]) -> None:
        with self._lock:
            rows = dict(self._rows)
            for doc_id in ids:
                row = rows.pop(doc_id, None)
                if row is not None:
                    self._free.append(row)
                    self._hashes.pop(doc_id, None)
            self._rows = rows

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
    def save(self, directory: str | os.PathLike, marker: str) -> None:
        with self._lock:
            ids = sorted(self._rows)
            matrix = self._matrix[[self._rows[i] for i in ids]] if ids else \
                np.zeros((0, self.dim), np.float32)
            hashes = [self._hashes.get(i, "") for i in ids]
        save_snapshot(directory, "funnel", {
            "vectors": matrix, "ids": ids, "hashes": hashes,
            "meta": {"format": FORMAT_VERSION, "dim": self.dim, "count": len(ids),
                     "marker": marker}})
        self.marker = marker

    @classmethod
    def load(cls, directory: str | os.PathLike, dim: int) -> "FunnelVectors | None":
        root = Path(directory)
        try:
            d = current_snapshot(root)
            meta = load_json(d, "meta")
            ids = load_json(d, "ids")
            hashes = load_json(d, "hashes")
            matrix = load_array(d, "vectors")
            if meta["dim"] != dim or matrix.shape != (len(ids), dim) or len(hashes) != len(ids) \
                    or meta["count"] != len(ids) or matrix.dtype != np.float32:
                raise ValueError("inconsistent funnel arrays")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if (root / "current.json").exists():
                logger.warning("funnel vectors at %s are unreadable (%s); rebuilding", root, exc)
            return None
        out = cls(dim)
        out._matrix = matrix
        out._rows = {doc_id: i for i, doc_id in enumerate(ids)}
        out._hashes = dict(zip(ids, hashes))
        out.marker = meta["marker"]
        return out
