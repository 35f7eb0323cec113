"""The embedder: prefix, then truncate (Matryoshka), then L2-normalize.

Wraps a sentence-transformers model, loaded lazily on first use so that importing
retrievekit stays cheap.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from .errors import ConfigError, InvalidInputError, MissingDependencyError
from .models import (ResolvedModel, model_fingerprint, model_not_found, read_model_prompts,
                     resolve_model)
from .prefixes import Prefixes, resolve_prefixes

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EmbedderConfig:
    """Settings of the embedder.

    Args:
        model: hub name or local directory.
        query_prefix / document_prefix: None to resolve automatically, "" for none.
        truncate_dim: keep the leading dims (Matryoshka); None keeps all.
        normalize: L2-normalize after truncation (cosine = dot product).
        device: "cpu", "cuda", ...; None picks CUDA when present.
        dtype: "float32", "bfloat16", "float16" or "auto" (bf16 on CUDA, else fp32).
        batch_size: texts per forward pass.
    """

    model: str = DEFAULT_MODEL
    query_prefix: str | None = None
    document_prefix: str | None = None
    truncate_dim: int | None = None
    normalize: bool = True
    device: str | None = None
    dtype: str = "float32"
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.truncate_dim is not None and (
                isinstance(self.truncate_dim, bool) or not isinstance(self.truncate_dim, int)
                or self.truncate_dim < 1):
            raise ConfigError(
                f"truncate_dim must be a positive int or None, got {self.truncate_dim!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {list(_DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {self.batch_size!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def truncate_and_normalize(vectors: np.ndarray, truncate_dim: int | None,
                           normalize: bool) -> np.ndarray:
    """Keep the leading `truncate_dim` dims, then L2-normalize each row (zero rows stay zero)."""
    out = np.asarray(vectors, dtype=np.float32)
    if truncate_dim is not None:
        out = out[:, :truncate_dim]
    if normalize:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out = out / np.where(norms == 0, 1.0, norms)
    return np.ascontiguousarray(out, dtype=np.float32)


class Embedder:
    """Embeds queries and documents with separate prefixes.

    The model is loaded on first use. `embed_queries` / `embed_documents` return float32
    arrays of shape (n, dim) where dim is `truncate_dim` or the model's dimension.
    """

    def __init__(self, config: EmbedderConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = EmbedderConfig(**overrides)
        elif overrides:
            config = EmbedderConfig(**{**config.to_dict(), **overrides})
        self.config = config
        self.resolved: ResolvedModel = resolve_model(config.model)
        self._model = None
        self._lock = threading.Lock()
        self._prefixes: Prefixes | None = None
        self.cache = None  # an EmbeddingCache, set by the pipeline when configured

    # -- the model -------------------------------------------------------------------------
    @property
    def model(self):
        """The loaded SentenceTransformer (loaded on first access)."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._load()
        return self._model

    def _load(self):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:  # pragma: no cover
            raise MissingDependencyError(
                "embedding needs sentence-transformers: pip install sentence-transformers") from exc
        import torch

        kwargs: dict[str, Any] = {}
        dtype = _torch_dtype(self.config.dtype, self.config.device)
        if dtype is not None:
            kwargs["model_kwargs"] = {"dtype": dtype}
        try:
            model = SentenceTransformer(self.resolved.load_from, device=self.config.device,
                                        local_files_only=self.resolved.is_local, **kwargs)
        except Exception as exc:  # any loader failure becomes one clear error
            raise model_not_found(self.config.model, self.resolved, exc) from exc
        dim = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") \
            else model.get_sentence_embedding_dimension()
        td = self.config.truncate_dim
        if td is not None and dim is not None and td > dim:
            raise ConfigError(
                f"truncate_dim={td} is larger than the dimension of {self.config.model!r} "
                f"({dim}); use a value <= {dim} or None")
        del torch
        return model

    @property
    def model_dim(self) -> int:
        m = self.model
        fn = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(fn())

    @property
    def dim(self) -> int:
        """Dimension of the vectors this embedder returns."""
        return self.config.truncate_dim or self.model_dim

    @property
    def max_seq_length(self) -> int:
        return int(self.model.max_seq_length)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def prefixes(self) -> Prefixes:
        if self._prefixes is None:
            shipped = read_model_prompts(self.resolved.load_from) if self.resolved.is_local \
                else dict(getattr(self.model, "prompts", {}) or {})
            self._prefixes = resolve_prefixes(
                self.config.model, query_prefix=self.config.query_prefix,
                document_prefix=self.config.document_prefix, model_prompts=shipped)
        return self._prefixes

    def identity(self) -> dict[str, Any]:
        """The settings that decide what the vectors mean (recorded in stores and cache keys)."""
        p = self.prefixes
        return {
            "model": self.config.model,
            "model_hash": model_fingerprint(self.resolved),
            "dim": self.dim,
            "truncate_dim": self.config.truncate_dim,
            "normalize": self.config.normalize,
            "query_prefix": p.query,
            "document_prefix": p.document,
        }

    # -- encoding --------------------------------------------------------------------------
    def _encode(self, texts: Sequence[str], prefix: str, progress: bool | None) -> np.ndarray:
        if isinstance(texts, str):
            raise InvalidInputError("texts must be a list of strings, got a single str; "
                                    "wrap it in a list or use embed_query")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidInputError(f"texts[{i}] must be str, got {type(t).__name__}")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        cache = self.cache
        keys: list[str] = []
        found: dict[str, np.ndarray] = {}
        if cache is not None:
            ident = self.identity()
            model_id = f"{ident['model']}@{ident['model_hash']}"
            keys = [cache.key_for(model_id, prefix, self.config.truncate_dim,
                                  self.config.normalize, t) for t in texts]
            found = cache.get_many(keys)
            td = self.config.truncate_dim
            if td is not None and self.config.normalize and len(found) < len(keys):
                # normalize(normalize(x)[:d]) == normalize(x[:d]): a cached full-dim
                # normalized vector serves any truncate_dim without re-encoding
                miss = [i for i, key in enumerate(keys) if key not in found]
                full_keys = {i: cache.key_for(model_id, prefix, None, True, texts[i])
                             for i in miss}
                full = cache.get_many(list(full_keys.values()))
                for i, fk in full_keys.items():
                    if fk in full:
                        found[keys[i]] = truncate_and_normalize(full[fk][None, :], td, True)[0]
        todo = list(range(len(texts))) if cache is None else \
            [i for i, key in enumerate(keys) if key not in found]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if todo:
            show = (len(todo) > 256) if progress is None else progress
            raw = self.model.encode([texts[i] for i in todo], prompt=prefix or None,
                                    batch_size=self.config.batch_size,
                                    show_progress_bar=show, convert_to_numpy=True,
                                    normalize_embeddings=False)
            vecs = truncate_and_normalize(np.asarray(raw, dtype=np.float32),
                                          self.config.truncate_dim, self.config.normalize)
            out[todo] = vecs
            if cache is not None:
                cache.put_many({keys[i]: vecs[j] for j, i in enumerate(todo)})
        if cache is not None:
            for i, key in enumerate(keys):
                if key in found:
                    out[i] = found[key]
        return out

    def embed_queries(self, queries: Sequence[str], *, progress: bool | None = None) -> np.ndarray:
        """Embed queries with the query prefix."""
        return self._encode(queries, self.prefixes.query, progress)

    def embed_query(self, query: str) -> np.ndarray:
        """Embed one query; returns a 1-d float32 vector."""
        if not isinstance(query, str):
            raise InvalidInputError(f"query must be str, got {type(query).__name__}")
        return self._encode([query], self.prefixes.query, False)[0]

    def embed_documents(self, texts: Sequence[str], *, progress: bool | None = None) -> np.ndarray:
        """Embed passages with the document prefix."""
        return self._encode(texts, self.prefixes.document, progress)

    def count_tokens(self, text: str) -> int:
        """Number of model tokens of `text` with the document prefix, special tokens included."""
        tok = self.tokenizer
        return len(tok(self.prefixes.document + text, add_special_tokens=True,
                       truncation=False)["input_ids"])


def _torch_dtype(name: str, device: str | None):
    import torch

    if name == "float32":
        return None
    if name == "bfloat16":
        return torch.bfloat16
    if name == "float16":
        return torch.float16
    # auto: half precision only where it is known to be both fast and faithful
    if (device or "").startswith("cuda") or (device is None and torch.cuda.is_available()):
        return torch.float16
    return None
