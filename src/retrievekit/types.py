"""The two types that flow through the core: `Document` in, `Hit` out."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping

#: Stages a hit can carry ranks and scores for, in pipeline order.
STAGES = ("dense", "funnel", "sparse", "fused", "rerank", "blend")


def text_id(text: str) -> str:
    """Stable id for a document given without one: sha256 of its UTF-8 text (32 hex chars)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class Document:
    """A document to index or a retrieved one.

    Args:
        text: the text that is embedded and tokenized.
        id: the user's id; when None, a stable hash of the text is used.
        metadata: flat metadata (str, int, float, bool values), filterable with `where`.
    """

    text: str
    id: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def with_id(self) -> "Document":
        """Return this document with `id` filled in (hash of the text when absent)."""
        if self.id is not None:
            return self
        return Document(text=self.text, id=text_id(self.text), metadata=dict(self.metadata))


@dataclass(frozen=True)
class Hit:
    """One search result.

    Attributes:
        document: the document (parent id when chunks are collapsed; text of the best chunk).
        score: the final score the results are ordered by (rerank score when reranked, the
            blend score when the reranker's weight is below 1,
            else the fused score in hybrid mode, else the single side's score).
        ranks: 1-based rank of this document in each stage it appeared in
            (keys from `STAGES`); a stage it did not appear in is absent.
        scores: the score in each stage (dense: cosine similarity, sparse: BM25,
            fused: RRF, rerank: cross-encoder score, blend: the RRF of the first-stage and
            the reranker rank when the reranker's weight is below 1).
        chunk_id: id of the stored record that matched (equals `document.id` when unchunked).
        chunk_index: position of that chunk in its parent document.
    """

    document: Document
    score: float
    ranks: Mapping[str, int] = field(default_factory=dict)
    scores: Mapping[str, float] = field(default_factory=dict)
    chunk_id: str | None = None
    chunk_index: int = 0

    @property
    def id(self) -> str:
        assert self.document.id is not None  # hits always carry an id
        return self.document.id

    def explain(self) -> str:
        """One line that says why this hit ranked where it did."""
        parts = [f"{stage}#{self.ranks[stage]}({self.scores.get(stage, float('nan')):.4f})"
                 for stage in STAGES if stage in self.ranks]
        return f"{self.id} score={self.score:.4f} " + " ".join(parts)
