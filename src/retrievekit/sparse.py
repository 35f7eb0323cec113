"""The BM25 side: a sparse index derived from the documents in Chroma.

Engines: `bm25s` (default; sparse-matrix scoring, sub-millisecond at 100k docs) and
`rank_bm25` (BM25Okapi, the reference implementation, slow but useful as an oracle).

The index keeps each document's term ids, so that a change (upsert/delete by id) rebuilds
the engine without re-tokenizing, and persists them as plain `.npy` + JSON. Writers build a
new immutable snapshot and swap it in, so concurrent searches never see half an update.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Sequence

import numpy as np

from .errors import ConfigError, MissingDependencyError
from .persist import current_snapshot, load_array, load_json, save_snapshot
from .tokenize import Tokenizer, TokenizerConfig

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_ENGINES = ("bm25s", "rank_bm25")
_METHODS = ("lucene", "robertson", "atire", "bm25l", "bm25+")


@dataclass(frozen=True)
class SparseConfig:
    """Settings of the BM25 side.

    Args:
        engine: "bm25s" (fast, default) or "rank_bm25" (BM25Okapi reference).
        k1, b: the BM25 parameters.
        method: bm25s's idf/tf variant ("lucene" is Lucene's/Elasticsearch's BM25).
        tokenizer: how text becomes terms.
    """

    engine: str = "bm25s"
    k1: float = 1.5
    b: float = 0.75
    method: str = "lucene"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def __post_init__(self) -> None:
        if isinstance(self.tokenizer, dict):
            object.__setattr__(self, "tokenizer", TokenizerConfig(**self.tokenizer))
        if self.engine not in _ENGINES:
            raise ConfigError(f"sparse.engine must be one of {list(_ENGINES)}, got {self.engine!r}")
        if self.method not in _METHODS:
            raise ConfigError(f"sparse.method must be one of {list(_METHODS)}, got {self.method!r}")
        for name in ("k1", "b"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"sparse.{name} must be a number >= 0, got {v!r}")
        if self.b > 1:
            raise ConfigError(f"sparse.b must be between 0 and 1, got {self.b!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokenizer"] = self.tokenizer.to_dict()
        return d


class _Snapshot:
    """An immutable scoring engine over a fixed list of ids."""

    def __init__(self, config: SparseConfig, ids: list[str], term_ids: list[np.ndarray],
                 vocab: dict[str, int]) -> None:
        self.ids = ids
        self.pos = {d: i for i, d in enumerate(ids)}
        self.vocab = vocab
        self.engine = None
        if not any(len(a) for a in term_ids):  # no terms at all (e.g. emoji-only texts):
            return  # nothing can score, and the engines fail on an empty vocabulary
        if config.engine == "bm25s":
            import bm25s

            # Only the terms in use: a vocabulary that kept deleted words would change idf-free
            # columns only, but compacting keeps the matrix small.
            used = np.unique(np.concatenate(term_ids)) if term_ids else np.zeros(0, np.int64)
            remap = np.full(max(len(vocab), 1), -1, dtype=np.int64)
            remap[used] = np.arange(len(used))
            inv = {i: t for t, i in vocab.items()}
            self.vocab = {inv[int(t)]: int(j) for j, t in enumerate(used)}
            corpus_ids = [remap[a].tolist() for a in term_ids]
            engine = bm25s.BM25(k1=config.k1, b=config.b, method=config.method)
            engine.index((corpus_ids, dict(self.vocab)), show_progress=False)
            self.engine = engine
        else:
            try:
                from rank_bm25 import BM25Okapi
            except ImportError as exc:  # pragma: no cover
                raise MissingDependencyError(
                    "sparse.engine='rank_bm25' needs rank-bm25: pip install rank-bm25") from exc
            inv = {i: t for t, i in vocab.items()}
            self.engine = BM25Okapi([[inv[int(t)] for t in a] for a in term_ids],
                                    k1=config.k1, b=config.b)

    def scores(self, terms: list[str], mask: np.ndarray | None) -> np.ndarray:
        if self.engine is None:
            return np.zeros(0, dtype=np.float32)
        if hasattr(self.engine, "get_scores_from_ids"):
            tids = [self.vocab[t] for t in terms if t in self.vocab]
            if not tids:
                return np.zeros(len(self.ids), dtype=np.float32)
            s = np.asarray(self.engine.get_scores_from_ids(tids), dtype=np.float32)
        else:
            s = np.asarray(self.engine.get_scores(terms), dtype=np.float32)
        if mask is not None:
            s = s * mask
        return s


class BM25Index:
    """A BM25 index keyed by document id, following upserts and deletes."""

    def __init__(self, config: SparseConfig | None = None) -> None:
        self.config = config or SparseConfig()
        self.tokenizer = Tokenizer(self.config.tokenizer)
        self._lock = threading.RLock()
        self._terms: dict[str, np.ndarray] = {}
        self._hashes: dict[str, str] = {}
        self._vocab: dict[str, int] = {}
        self._snapshot: _Snapshot | None = _Snapshot(self.config, [], [], {})
        self.marker: str = ""

    # -- writes ----------------------------------------------------------------------------
    def _term_ids(self, text: str) -> np.ndarray:
        out = []
        vocab = self._vocab
        for t in self.tokenizer(text):
            i = vocab.get(t)
            if i is None:
                i = vocab[t] = len(vocab)
            out.append(i)
        return np.asarray(out, dtype=np.int32)

    def upsert(self, ids: Sequence[str], texts: Sequence[str],
               hashes: Sequence[str] | None = None) -> None:
        """Insert or replace documents by id.

        Args:
            hashes: the content hash recorded in Chroma for each document, kept so that a
                later catch-up can tell which documents changed.
        """
        if hashes is None:
            hashes = [""] * len(ids)
        with self._lock:
            for doc_id, text, h in zip(ids, texts, hashes):
                self._terms[doc_id] = self._term_ids(text)
                self._hashes[doc_id] = h
            self._snapshot = None

    def hashes(self) -> dict[str, str]:
        """id -> content hash for every indexed document."""
        with self._lock:
            return dict(self._hashes)

    def delete(self, ids: Iterable[str]) -> None:
        with self._lock:
            for doc_id in ids:
                self._terms.pop(doc_id, None)
                self._hashes.pop(doc_id, None)
            self._snapshot = None

    def replace_all(self, ids: Sequence[str], texts: Sequence[str]) -> None:
        """Rebuild from scratch (used when Chroma and the index are found out of step)."""
        with self._lock:
            self._terms, self._hashes, self._vocab = {}, {}, {}
            self.upsert(ids, texts)

    # -- reads -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._terms)

    def ids(self) -> set[str]:
        with self._lock:
            return set(self._terms)

    def _current(self) -> _Snapshot:
        snap = self._snapshot
        if snap is None:
            with self._lock:
                if self._snapshot is None:
                    ids = sorted(self._terms)
                    self._snapshot = _Snapshot(self.config, ids, [self._terms[d] for d in ids],
                                               dict(self._vocab))
                snap = self._snapshot
        return snap

    def refresh(self) -> None:
        """Build the scoring engine now rather than on the next search."""
        self._current()

    def search(self, query: str, k: int, *, allowed: Collection[str] | None = None
               ) -> list[tuple[str, float]]:
        """Top `k` (id, score) by BM25, best first; scores <= 0 dropped; ties by id.

        Args:
            allowed: when given, only these ids may be returned (the `where` filter).
        """
        snap = self._current()
        n = len(snap.ids)
        if n == 0 or k <= 0:
            return []
        terms = self.tokenizer(query)
        if not terms:
            return []
        mask = None
        if allowed is not None:
            mask = np.zeros(n, dtype=np.float32)
            idx = [snap.pos[d] for d in allowed if d in snap.pos]
            if not idx:
                return []
            mask[idx] = 1.0
        scores = snap.scores(terms, mask)
        positive = np.flatnonzero(scores > 0)
        if positive.size == 0:
            return []
        k = min(k, positive.size)
        if positive.size > k:
            part = np.argpartition(-scores[positive], k - 1)[:k]
            # keep every doc tied with the k-th score so the id tie-break is exact
            kth = scores[positive[part]].min()
            top = positive[scores[positive] >= kth]
        else:
            top = positive
        order = sorted(top.tolist(), key=lambda i: (-float(scores[i]), snap.ids[i]))[:k]
        return [(snap.ids[i], float(scores[i])) for i in order]

    # -- persistence -----------------------------------------------------------------------
    def signature(self) -> dict[str, Any]:
        """The settings that decide what the tokens and scores mean."""
        return {"format": FORMAT_VERSION, **self.config.to_dict()}

    def save(self, directory: str | os.PathLike, marker: str) -> None:
        """Write the index under `directory` atomically (a new folder, then a pointer swap)."""
        with self._lock:
            ids = sorted(self._terms)
            arrays = [self._terms[d] for d in ids]
            hashes = [self._hashes.get(d, "") for d in ids]
            vocab_list = [""] * len(self._vocab)
            for t, i in self._vocab.items():
                vocab_list[i] = t
        lengths = np.asarray([len(a) for a in arrays], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        terms = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
        save_snapshot(directory, "bm25", {
            "offsets": offsets, "terms": terms, "ids": ids, "vocab": vocab_list,
            "hashes": hashes,
            "meta": {"signature": self.signature(), "marker": marker, "count": len(ids)}})
        self.marker = marker

    @classmethod
    def load(cls, directory: str | os.PathLike, config: SparseConfig) -> "BM25Index | None":
        """Load a saved index; None when missing, unreadable, or saved with other settings."""
        root = Path(directory)
        try:
            d = current_snapshot(root)
            meta = load_json(d, "meta")
            index = cls(config)
            if meta["signature"] != index.signature():
                logger.info("BM25 index at %s has other settings; it will be rebuilt", d)
                return None
            ids = load_json(d, "ids")
            vocab_list = load_json(d, "vocab")
            offsets = load_array(d, "offsets")
            terms = load_array(d, "terms")
            hashes = load_json(d, "hashes")
            if len(hashes) != len(ids) or len(offsets) != len(ids) + 1 or int(offsets[-1]) != len(terms) \
                    or meta["count"] != len(ids) or (len(terms) and terms.max() >= len(vocab_list)):
                raise ValueError("inconsistent arrays")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if (root / "current.json").exists():
                logger.warning("BM25 index at %s is unreadable (%s); it will be rebuilt",
                               root, exc)
            return None
        index._vocab = {t: i for i, t in enumerate(vocab_list)}
        index._terms = {doc_id: terms[offsets[i]:offsets[i + 1]]
                        for i, doc_id in enumerate(ids)}
        index._snapshot = None
        index.marker = meta["marker"]
        return index

