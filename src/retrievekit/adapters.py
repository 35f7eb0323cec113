"""What the framework adapters share: the keys they add to a result's metadata, and the
lifecycle of a `HybridRetriever` an adapter built for itself.

Framework-free: `retrievekit.langchain` and `retrievekit.llama_index` import this, never
the other way round.
"""

from __future__ import annotations

from typing import Any, Mapping

from .errors import ConfigError
from .types import Hit

#: Metadata keys added to each retrieved document / node.
RANKS_KEY = "retrievekit_ranks"  # {stage: 1-based rank}
SCORES_KEY = "retrievekit_scores"  # {stage: score}
CHUNK_ID_KEY = "retrievekit_chunk_id"  # the stored chunk that matched
RESULT_KEYS = (RANKS_KEY, SCORES_KEY, CHUNK_ID_KEY)

#: `HybridRetriever` keyword arguments an adapter accepts when it builds its own.
BUILD_KEYS = ("embedder", "reranker", "path", "host", "port", "collection", "model",
              "truncate_dim", "candidates", "mode")


def result_metadata(hit: Hit) -> dict[str, Any]:
    """The result keys of a hit: per-stage ranks and scores, and the matching chunk's id."""
    return {RANKS_KEY: dict(hit.ranks), SCORES_KEY: dict(hit.scores),
            CHUNK_ID_KEY: hit.chunk_id if hit.chunk_id is not None else hit.id}


def without_result_keys(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata less the result keys (so a retrieved document can be indexed again)."""
    return {k: v for k, v in metadata.items() if k not in RESULT_KEYS}


def open_retriever(retriever: Any, config: Any, build: Mapping[str, Any], owner: str
                   ) -> tuple[Any, bool]:
    """The `HybridRetriever` an adapter works on, and whether the adapter built it (and so
    closes it): `retriever` when given, else one built from `config` and `build`."""
    from .pipeline import HybridRetriever

    if retriever is not None:
        if build or config is not None:
            extra = sorted(build) + (["config"] if config is not None else [])
            raise ConfigError(f"{owner}: pass either retriever= or config/{list(BUILD_KEYS)}, "
                              f"not both (got retriever and {extra})")
        if not isinstance(retriever, HybridRetriever):
            raise ConfigError(f"{owner}: retriever must be a retrievekit HybridRetriever, got "
                              f"{type(retriever).__name__}")
        return retriever, False
    unknown = sorted(set(build) - set(BUILD_KEYS))
    if unknown:
        raise ConfigError(f"{owner} got unknown options {unknown}; valid: retriever, config, "
                          f"{list(BUILD_KEYS)}")
    return HybridRetriever(config, **build), True


class ClosesOwnRetriever:
    """Mixin: `close()` (and ``with``) closes the `HybridRetriever` in ``self.retriever``
    when the adapter built it; a passed-in one is the caller's to close."""

    def close(self) -> None:
        """Close the `HybridRetriever` if this object built it."""
        # no class-level default: it would shadow a pydantic model's private attribute
        if getattr(self, "_owned", False):
            self.retriever.close()  # type: ignore[attr-defined]

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
