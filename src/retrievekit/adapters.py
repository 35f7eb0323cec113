"""What the framework adapters share: the keys they add to a result's metadata, and the
lifecycle of a `HybridRetriever` an adapter built for itself.

Framework-free: `retrievekit.langchain` and `retrievekit.llama_index` import this, never
the other way round.
"""

from __future__ import annotations

from typing import Any, Mapping

from .errors import ConfigError, InvalidInputError
from .records import parent_of
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


def partial(hit: Hit) -> dict[str, Any]:
    """`{CHUNK_ID_KEY: chunk id}` when a hit shows one chunk of a longer document (its text
    is that chunk's, not the document's), else `{}`: what a stored-form result carries so
    that it is never indexed again in its document's place (`indexable`)."""
    chunk = hit.chunk_id
    return {CHUNK_ID_KEY: chunk} if chunk is not None and chunk != hit.document.id else {}


def indexable(metadata: Mapping[str, Any], doc_id: str, name: str) -> dict[str, Any]:
    """Metadata of a document or node given to be indexed, less the result keys (so a
    retrieved one can be indexed again). One that a search returned as a chunk of a longer
    document is refused under that document's id, where its chunk's text would replace the
    whole document (under another id it is a document of its own)."""
    chunk = metadata.get(CHUNK_ID_KEY)
    if isinstance(chunk, str) and chunk != doc_id and parent_of(chunk) == doc_id:
        raise InvalidInputError(
            f"{name} {doc_id!r} is the chunk {chunk!r} of that document, as a search returned "
            f"it: its text is that chunk only, and indexing it would replace the whole "
            f"document; index the document itself, or give this one a new id")
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
