"""Cross-encoder reranking over sentence-transformers' `CrossEncoder`."""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np

from .errors import ConfigError, InvalidInputError, MissingDependencyError
from .models import model_not_found, resolve_model
from .types import Hit

logger = logging.getLogger(__name__)

DEFAULT_RERANKER = "cross-encoder/ms-marco-MiniLM-L-6-v2"


@dataclass(frozen=True)
class RerankConfig:
    """Settings of the reranker.

    Args:
        model: hub name or local directory of a cross-encoder.
        top_n: keep this many after reranking (None: as many as asked for).
        threshold: drop hits scoring below this (after the sigmoid when `sigmoid`).
        candidates: how many fused hits are reranked.
        batch_size: pairs per forward pass.
        max_length: tokens per (query, passage) pair; None uses the model's.
        sigmoid: map raw logits to 0..1.
        device / dtype: as for the embedder.
    """

    model: str = DEFAULT_RERANKER
    top_n: int | None = None
    threshold: float | None = None
    candidates: int = 50
    batch_size: int = 32
    max_length: int | None = 512
    sigmoid: bool = True
    device: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.top_n is not None and (not isinstance(self.top_n, int) or self.top_n < 1):
            raise ConfigError(f"reranker.top_n must be an int >= 1 or None, got {self.top_n!r}")
        if not isinstance(self.candidates, int) or self.candidates < 1:
            raise ConfigError(f"reranker.candidates must be an int >= 1, got {self.candidates!r}")
        if self.threshold is not None and not isinstance(self.threshold, (int, float)):
            raise ConfigError(f"reranker.threshold must be a number or None, got "
                              f"{self.threshold!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"reranker.batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"reranker.dtype must be auto, float32, bfloat16 or float16, "
                              f"got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Reranker:
    """Scores (query, passage) pairs with a cross-encoder and reorders hits.

    Never mutates its input: returns new `Hit` objects with `rerank` rank and score added.
    """

    def __init__(self, config: RerankConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = RerankConfig(**overrides)
        elif overrides:
            config = RerankConfig(**{**config.to_dict(), **overrides})
        self.config = config
        self.resolved = resolve_model(config.model)
        self._model = None
        self._lock = threading.Lock()

    @property
    def model(self):
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._load()
        return self._model

    def _load(self):
        try:
            from sentence_transformers import CrossEncoder
        except ImportError as exc:  # pragma: no cover
            raise MissingDependencyError(
                "reranking needs sentence-transformers: pip install sentence-transformers"
            ) from exc
        from .embedding import _torch_dtype

        kwargs: dict[str, Any] = {}
        dtype = _torch_dtype(self.config.dtype, self.config.device)
        if dtype is not None:
            kwargs["model_kwargs"] = {"dtype": dtype}
        try:
            return CrossEncoder(self.resolved.load_from, device=self.config.device,
                                max_length=self.config.max_length,
                                local_files_only=self.resolved.is_local, **kwargs)
        except Exception as exc:
            raise model_not_found(self.config.model, self.resolved, exc) from exc

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        """Scores of (query, passage) pairs, raw logits or sigmoid per `config.sigmoid`."""
        if not isinstance(query, str):
            raise InvalidInputError(f"query must be str, got {type(query).__name__}")
        if not passages:
            return np.zeros(0, dtype=np.float32)
        import torch

        raw = self.model.predict([(query, p) for p in passages],
                                 batch_size=self.config.batch_size,
                                 activation_fn=torch.nn.Identity(), show_progress_bar=False,
                                 convert_to_numpy=True)
        raw = np.asarray(raw, dtype=np.float32)
        if raw.ndim == 2:  # a 2-label head: take the "relevant" logit margin
            raw = raw[:, -1] - raw[:, 0] if raw.shape[1] == 2 else raw[:, 0]
        return 1.0 / (1.0 + np.exp(-raw)) if self.config.sigmoid else raw

    def rerank(self, query: str, hits: Sequence[Hit], *, top_n: int | None = None,
               threshold: float | None = None) -> list[Hit]:
        """Reorder `hits` by cross-encoder score (ties keep the input order).

        Args:
            top_n: keep at most this many (default: config.top_n, else all).
            threshold: drop hits scoring below it (default: config.threshold).
        """
        top_n = self.config.top_n if top_n is None else top_n
        threshold = self.config.threshold if threshold is None else threshold
        if top_n is not None and (not isinstance(top_n, int) or top_n < 1):
            raise InvalidInputError(f"top_n must be an int >= 1 or None, got {top_n!r}")
        hits = list(hits)
        scores = self.score(query, [h.document.text for h in hits])
        order = sorted(range(len(hits)), key=lambda i: (-float(scores[i]), i))
        out: list[Hit] = []
        for rank, i in enumerate(order, start=1):
            s = float(scores[i])
            if threshold is not None and s < threshold:
                continue
            h = hits[i]
            out.append(replace(h, score=s, ranks={**h.ranks, "rerank": rank},
                               scores={**h.scores, "rerank": s}))
        return out[:top_n] if top_n is not None else out
