"""Cross-encoder reranking over sentence-transformers' `CrossEncoder`.

The forward pass runs on torch or on an ONNX export of the model's sequence-classification
network (`retrievekit.onnx_backend`); `retrievekit.inference` picks the engine per call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np

from . import validate as v
from .errors import ConfigError, InvalidInputError, MissingDependencyError, RetrieveKitError
from .inference import ModelEngines, configure_torch_threads, torch_dtype, validate_inference
from .models import check_available, model_not_found, resolve_model
from .types import Hit

logger = logging.getLogger(__name__)

DEFAULT_RERANKER = "cross-encoder/ms-marco-MiniLM-L-6-v2"


@dataclass(frozen=True)
class RerankConfig:
    """Settings of the reranker.

    Args:
        model: hub name or local directory of a cross-encoder.
        top_n: keep at most this many (None: as many as asked for).
        threshold: drop hits scoring below this (after the sigmoid when `sigmoid`).
        candidates: how many fused hits a search reranks; a search asking for more gets
            the rest below them in fused order (see `Reranker.rerank_head`).
        batch_size: pairs per forward pass.
        max_length: tokens per (query, passage) pair, at most the model's positions
            (refused above them when the reranker is built); None uses the model's.
        sigmoid: map raw logits to 0..1.
        weight: the cross-encoder's share of the final order. 1.0 (default): the
            cross-encoder's order alone, the usual setting for a strong reranker. Below 1,
            its rank is fused with the first-stage rank by weighted RRF,
            ``(1 - weight) / (rrf_k + first_rank) + weight / (rrf_k + rerank_rank)``: the
            safer choice for a reranker of unproven strength in your domain (a small or
            freshly fine-tuned one), since a reranker that is weaker than the first stage
            can otherwise drag it down. ``retrievekit finetune reranker`` picks it on a
            held-out split.
        rrf_k: the RRF constant of that fusion.
        device / dtype / backend / onnx_quantize / num_threads: as for the embedder
            (`EmbedderConfig`); here a call's size is its number of (query, passage) pairs.
    """

    model: str = DEFAULT_RERANKER
    top_n: int | None = None
    threshold: float | None = None
    candidates: int = 50
    batch_size: int = 32
    max_length: int | None = 512
    sigmoid: bool = True
    device: str | None = None
    dtype: str = "auto"
    backend: str = "auto"
    onnx_quantize: str | None = None
    num_threads: int | None = None
    weight: float = 1.0
    rrf_k: float = 60.0

    def __post_init__(self) -> None:
        v.text("reranker.model", self.model, empty=False,
               fix=f"a cross-encoder name like {DEFAULT_RERANKER!r} or a local directory")
        v.integer("reranker.top_n", self.top_n, optional=True, fix="None keeps all")
        v.number("reranker.threshold", self.threshold, optional=True, fix="None keeps all")
        v.integer("reranker.candidates", self.candidates, fix="50 is the default")
        v.integer("reranker.batch_size", self.batch_size, fix="32 is the default")
        v.integer("reranker.max_length", self.max_length, optional=True,
                  fix="None uses the model's")
        v.boolean("reranker.sigmoid", self.sigmoid)
        _check_blend(self.weight, self.rrf_k, "reranker.")
        object.__setattr__(self, "onnx_quantize", validate_inference(
            "reranker.", dtype=self.dtype, backend=self.backend,
            onnx_quantize=self.onnx_quantize, num_threads=self.num_threads, device=self.device))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_blend(weight: Any, rrf_k: Any, prefix: str = "",
                 error: type[RetrieveKitError] = ConfigError) -> None:
    v.number(f"{prefix}weight", weight, 0, 1, low_open=True, error=error,
             fix="1: the cross-encoder's order alone; 0.5: fused equally with the first stage")
    v.number(f"{prefix}rrf_k", rrf_k, 0, error=error, fix="60 is the usual value")


def blend_order(scores: Sequence[float], weight: float = 1.0, rrf_k: float = 60.0
                ) -> tuple[list[int], list[int], list[float]]:
    """The final order of candidates given in first-stage order, with their reranker scores.

    Returns:
        ``(order, rerank_rank, final)``: candidate indices best first; each candidate's
        1-based rank by reranker score (ties keep the first-stage order); each candidate's
        final score (the reranker score when ``weight == 1``, else the weighted RRF of its
        first-stage position and its reranker rank; ties go to the better reranker rank).
    """
    _check_blend(weight, rrf_k)
    n = len(scores)
    by_score = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    rank = [0] * n
    for r, i in enumerate(by_score, start=1):
        rank[i] = r
    if weight >= 1:
        return by_score, rank, [float(s) for s in scores]
    final = [(1.0 - weight) / (rrf_k + i + 1) + weight / (rrf_k + rank[i]) for i in range(n)]
    order = sorted(range(n), key=lambda i: (-final[i], rank[i]))
    return order, rank, final


@dataclass(frozen=True)
class Ranked:
    """One text as `Reranker.rank` ordered it.

    Attributes:
        index: its position in the texts given.
        score: the final score (the cross-encoder's, or the blend's when weight < 1).
        rerank_score / rerank_rank: the cross-encoder's score and 1-based rank.
        blend_rank: its final 1-based position when weight < 1 (None otherwise).
    """

    index: int
    score: float
    rerank_score: float
    rerank_rank: int
    blend_rank: int | None = None


class Reranker(ModelEngines):
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
        check_available(self.resolved)  # fail here, not at the first query
        limit = _position_limit(self.resolved)
        if config.max_length is not None and limit is not None and config.max_length > limit:
            v.fail("reranker.max_length", f"at most the {limit} positions of "
                   f"{config.model!r}", config.max_length, f"use a value <= {limit} or None")
        self._init_engines()

    # -- the model (`model`, `dtype`, `engine_for`: see inference.ModelEngines) -------------
    _ONNX_KIND = "rerank"

    def _onnx_options(self) -> dict[str, Any]:
        return {"max_length": self.config.max_length}

    def _reference_model(self):
        # a copy at the model's own max_length: the export's record keeps the model default
        return self._load(device="cpu", dtype="float32", max_length=None)

    def _load(self, device: str | None = None, dtype: str | None = None,
              max_length: int | None | str = "config"):
        try:
            from sentence_transformers import CrossEncoder
        except ImportError as exc:  # pragma: no cover
            raise MissingDependencyError(
                "reranking needs sentence-transformers: pip install sentence-transformers"
            ) from exc

        configure_torch_threads(self.config.num_threads)
        kwargs: dict[str, Any] = {}
        tdtype = torch_dtype(dtype or self.dtype)
        if tdtype is not None:
            kwargs["model_kwargs"] = {"dtype": tdtype}
        try:
            return CrossEncoder(self.resolved.load_from, device=device or self.config.device,
                                max_length=self.config.max_length if max_length == "config"
                                else max_length,
                                local_files_only=self.resolved.is_local, **kwargs)
        except Exception as exc:
            raise model_not_found(self.config.model, self.resolved, exc) from exc

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        """Scores of (query, passage) pairs, raw logits or sigmoid per `config.sigmoid`.

        Raises:
            InvalidInputError: an empty query, a passage that is not a str.
            ConfigError: the model scored a pair NaN (a broken model or precision).
        """
        return self._scores(_query(query), _texts("passages", passages))

    def _scores(self, query: str, passages: list[str]) -> np.ndarray:
        if not passages:
            return np.zeros(0, dtype=np.float32)
        pairs = [(query, p) for p in passages]
        if self.engine_for(len(pairs)) == "onnx":
            raw = self._onnx_engine().predict(pairs, batch_size=self.config.batch_size)
        else:
            import torch

            raw = self._torch_engine().predict(
                pairs, batch_size=self.config.batch_size, activation_fn=torch.nn.Identity(),
                show_progress_bar=False, convert_to_numpy=True)
        raw = np.asarray(raw, dtype=np.float32)
        if raw.ndim == 2:  # a 2-label head: take the "relevant" logit margin
            raw = raw[:, -1] - raw[:, 0] if raw.shape[1] == 2 else raw[:, 0]
        bad = np.flatnonzero(np.isnan(raw))
        if bad.size:  # NaN has no place in an order: sorting would leave it anywhere
            raise ConfigError(
                f"the cross-encoder {self.config.model!r} scored {bad.size} of {len(raw)} "
                f"(query, passage) pairs NaN (the first: passage {bad[0]}); in "
                f"reranker.dtype={self.dtype!r} a half precision can overflow: try "
                "dtype='float32', else check the model's weights")
        return 1.0 / (1.0 + np.exp(-raw)) if self.config.sigmoid else raw

    def rank(self, query: str, texts: Sequence[str], *, top_n: int | None = None,
             threshold: float | None = None, weight: float | None = None) -> list[Ranked]:
        """Rank plain texts (given best first by whatever found them) for `query`.

        Returns one `Ranked` per kept text, best first: its index in `texts`, the final score,
        the cross-encoder score and rank. Options as in `rerank`.
        """
        top_n = self.config.top_n if top_n is None else top_n
        threshold = self.config.threshold if threshold is None else threshold
        weight = self.config.weight if weight is None else weight
        v.integer("top_n", top_n, optional=True, error=InvalidInputError)
        v.number("threshold", threshold, optional=True, error=InvalidInputError)
        _check_blend(weight, self.config.rrf_k, error=InvalidInputError)
        scores = self._scores(_query(query), _texts("texts", texts))
        order, rank, final = blend_order(scores, weight, self.config.rrf_k)
        out = [Ranked(i, final[i], float(scores[i]), rank[i], pos if weight < 1 else None)
               for pos, i in enumerate(order, start=1)
               if threshold is None or scores[i] >= threshold]
        return out[:top_n] if top_n is not None else out

    def rerank(self, query: str, hits: Sequence[Hit], *, top_n: int | None = None,
               threshold: float | None = None, weight: float | None = None) -> list[Hit]:
        """Reorder `hits` (given best first by the first stage) by cross-encoder score.

        Each hit gets the ``rerank`` rank and score of the cross-encoder. With a weight
        below 1 the order is the weighted RRF of the first-stage position and the reranker
        rank (see `RerankConfig.weight`); those hits also carry a ``blend`` rank and score,
        and `Hit.score` is the blended score.

        Args:
            top_n: keep at most this many (default: config.top_n, else all).
            threshold: drop hits whose cross-encoder score is below it (default:
                config.threshold).
            weight: the cross-encoder's share of the order (default: config.weight).
        """
        hits = _listed("hits", hits, "pass the hits a search returned; rank() takes texts")
        for i, h in enumerate(hits):
            if not isinstance(h, Hit):
                v.fail(f"hits[{i}]", "a Hit", h, "rank() takes plain texts",
                       error=InvalidInputError)
        out: list[Hit] = []
        for r in self.rank(query, [h.document.text for h in hits], top_n=top_n,
                           threshold=threshold, weight=weight):
            h = hits[r.index]
            ranks = {**h.ranks, "rerank": r.rerank_rank}
            stage_scores = {**h.scores, "rerank": r.rerank_score}
            if r.blend_rank is not None:
                ranks["blend"] = r.blend_rank
                stage_scores["blend"] = r.score
            out.append(replace(h, score=r.score, ranks=ranks, scores=stage_scores))
        return out

    def rerank_head(self, query: str, hits: Sequence[Hit]) -> list[Hit]:
        """Hits as a search returns them: the first `config.candidates` of `hits` (best
        first by the first stage) reranked, then the rest in their given order, unscored
        (none of them with a threshold: only a scored hit can pass it); `config.top_n`
        caps the whole list."""
        hits = list(hits)
        n = self.config.candidates
        out = self.rerank(query, hits[:n])
        if self.config.threshold is None:
            out += hits[n:]
        return out[:self.config.top_n] if self.config.top_n is not None else out


def _query(query: Any) -> str:
    return v.readable("query", query, "pass the text to rank for")


def _listed(name: str, value: Any, fix: str) -> list[Any]:
    """`value` as a list; a str, bytes, a mapping or a non-iterable is refused (a str
    would be read as its characters)."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        v.fail(name, "a list", value, fix, error=InvalidInputError)
    return list(value)


def _texts(name: str, texts: Any) -> list[str]:
    return [v.text(f"{name}[{i}]", t, error=InvalidInputError)
            for i, t in enumerate(_listed(name, texts, "wrap a single text in a list"))]


#: model types whose position ids start past the padding index (pad_token_id + 1)
_PADDED_POSITIONS = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert",
                               "mpnet", "longformer", "data2vec-text"})


def _position_limit(resolved: Any) -> int | None:
    """The most tokens a pair may hold for the model's position embeddings (None when its
    config sets no such bound, as for relative or rotary positions without a maximum)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(resolved.load_from,
                                         local_files_only=resolved.is_local)
    except Exception as exc:
        raise model_not_found(resolved.name, resolved, exc) from exc
    positions = getattr(cfg, "max_position_embeddings", None)
    if not v.is_int(positions):
        return None
    if cfg.model_type in _PADDED_POSITIONS:
        positions -= (cfg.pad_token_id or 0) + 1
    return positions
