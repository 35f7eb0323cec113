"""retrievekit: hybrid BM25 + dense retrieval with reranking over Chroma.

`import retrievekit` loads neither LangChain nor LlamaIndex, nor sentence-transformers;
adapters live in `retrievekit.langchain` and `retrievekit.llama_index`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import (ConfigError, InvalidInputError, MissingDependencyError, ModelNotFoundError,
                     RetrieveKitError, StoreError, StoreLockedError, StoreMismatchError)
from .types import Document, Hit

__version__ = "0.1.0"

_LAZY = {
    "HybridRetriever": ".pipeline",
    "RetrieverConfig": ".config",
    "Embedder": ".embedding",
    "EmbedderConfig": ".embedding",
    "Reranker": ".rerank",
    "RerankConfig": ".rerank",
    "SparseIndex": ".sparse",
    "SparseConfig": ".sparse",
    "TokenizerConfig": ".tokenize",
    "StoreConfig": ".store",
    "ChunkConfig": ".chunking",
    "reciprocal_rank_fusion": ".fusion",
}

__all__ = [
    "ChunkConfig", "ConfigError", "Document", "Embedder", "EmbedderConfig", "Hit",
    "HybridRetriever", "InvalidInputError", "MissingDependencyError", "ModelNotFoundError",
    "RerankConfig", "Reranker", "RetrieveKitError", "RetrieverConfig", "SparseConfig",
    "SparseIndex", "StoreConfig", "StoreError", "StoreLockedError", "StoreMismatchError",
    "TokenizerConfig", "reciprocal_rank_fusion",
]

if TYPE_CHECKING:  # pragma: no cover
    from .chunking import ChunkConfig
    from .config import RetrieverConfig
    from .embedding import Embedder, EmbedderConfig
    from .fusion import reciprocal_rank_fusion
    from .pipeline import HybridRetriever
    from .rerank import RerankConfig, Reranker
    from .sparse import SparseConfig, SparseIndex
    from .store import StoreConfig
    from .tokenize import TokenizerConfig


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'retrievekit' has no attribute {name!r}")
