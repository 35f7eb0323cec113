"""The embedder: prefix, then truncate (Matryoshka), then L2-normalize.

Wraps a sentence-transformers model, loaded lazily on first use so that importing
retrievekit stays cheap. The forward pass runs on torch or on an ONNX export of the same
model (`retrievekit.onnx_backend`); `retrievekit.inference` picks the engine per call.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from . import validate as v
from .errors import ConfigError, InvalidInputError, MissingDependencyError
from .inference import ModelEngines, configure_torch_threads, torch_dtype, validate_inference
from .models import (ResolvedModel, model_fingerprint, model_not_found, read_model_prompts,
                     resolve_model)
from .prefixes import Prefixes, resolve_prefixes

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class EmbedderConfig:
    """Settings of the embedder.

    Args:
        model: hub name or local directory.
        query_prefix / document_prefix: None to resolve automatically, "" for none.
        truncate_dim: keep the leading dims (Matryoshka); None keeps all.
        normalize: L2-normalize after truncation (cosine = dot product).
        device: "cpu", "cuda", ...; None picks CUDA when present.
        dtype: precision of the torch engine: "float32", "bfloat16", "float16", or "auto"
            (bf16 on CPUs with native bf16, fp16 on CUDA, else fp32).
        batch_size: texts per forward pass.
        backend: "auto" (ONNX fp32 for queries and small batches, torch in `dtype` for bulk
            when `dtype` resolves to a native half precision, else ONNX for all), "torch", or
            "onnx" (needs `pip install 'retrievekit[onnx]'`; falls back to torch, with a
            warning, when the export fails its check against torch).
        onnx_quantize: None, or "int8" for dynamic int8 weights in the ONNX engine (faster,
            but vectors move by ~1e-2 cosine; see docs/benchmarks.md). True means "int8".
        num_threads: intra-op threads of torch and onnxruntime; None: OMP_NUM_THREADS, else
            min(physical cores, 4) and never more than torch's current setting.
    """

    model: str = DEFAULT_MODEL
    query_prefix: str | None = None
    document_prefix: str | None = None
    truncate_dim: int | None = None
    normalize: bool = True
    device: str | None = None
    dtype: str = "auto"
    batch_size: int = 32
    backend: str = "auto"
    onnx_quantize: str | None = None
    num_threads: int | None = None

    def __post_init__(self) -> None:
        v.text("embedder.model", self.model, empty=False,
               fix=f"a hub name like {DEFAULT_MODEL!r} or a local directory")
        for name in ("query_prefix", "document_prefix"):
            v.text(f"embedder.{name}", getattr(self, name), optional=True,
                   fix="None resolves it from the model; '' for none")
        v.integer("embedder.truncate_dim", self.truncate_dim, optional=True,
                  fix="e.g. 256 for a Matryoshka model, None keeps all")
        v.boolean("embedder.normalize", self.normalize)
        v.integer("embedder.batch_size", self.batch_size, fix="32 is the default")
        object.__setattr__(self, "onnx_quantize", validate_inference(
            "", dtype=self.dtype, backend=self.backend, onnx_quantize=self.onnx_quantize,
            num_threads=self.num_threads, device=self.device))

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


class Embedder(ModelEngines):
    """Embeds queries and documents with separate prefixes.

    The model is loaded on first use. `embed_queries` / `embed_documents` return float32
    arrays of shape (n, dim) where dim is `truncate_dim` or the model's dimension.
    `engine_for(n)` says which engine (torch or ONNX) serves a call of n texts; `model` is
    the torch SentenceTransformer (see `inference.ModelEngines`).
    """

    def __init__(self, config: EmbedderConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = EmbedderConfig(**overrides)
        elif overrides:
            config = EmbedderConfig(**{**config.to_dict(), **overrides})
        self.config = config
        self.resolved: ResolvedModel = resolve_model(config.model)
        self._init_engines()
        self._tokenizer = None
        self._prefixes: Prefixes | None = None
        self.cache = None  # an EmbeddingCache, set by the pipeline when configured

    # -- the model (`model`, `dtype`, `engine_for`: see inference.ModelEngines) -------------
    _ONNX_KIND = "embed"

    def _onnx_options(self) -> dict[str, Any]:
        p = self.prefixes
        return {"prefixes": (p.query, p.document)}

    def _onnx_loaded(self, engine: Any) -> None:
        self._check_truncate_dim(engine.dim)

    def _load(self, device: str | None = None, dtype: str | None = None):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:  # pragma: no cover
            raise MissingDependencyError(
                "embedding needs sentence-transformers: pip install sentence-transformers") from exc

        configure_torch_threads(self.config.num_threads)
        kwargs: dict[str, Any] = {}
        tdtype = torch_dtype(dtype or self.dtype)
        if tdtype is not None:
            kwargs["model_kwargs"] = {"dtype": tdtype}
        try:
            model = SentenceTransformer(self.resolved.load_from,
                                        device=device or self.config.device,
                                        local_files_only=self.resolved.is_local, **kwargs)
        except Exception as exc:  # any loader failure becomes one clear error
            raise model_not_found(self.config.model, self.resolved, exc) from exc
        self._check_truncate_dim(_st_dim(model))
        return model

    def _check_truncate_dim(self, dim: int | None) -> None:
        td = self.config.truncate_dim
        if td is not None and dim is not None and td > dim:
            raise ConfigError(
                f"truncate_dim={td} is larger than the dimension of {self.config.model!r} "
                f"({dim}); use a value <= {dim} or None")

    @property
    def model_dim(self) -> int:
        known = getattr(self, "_model_dim", None)  # asked per document by the writer
        if known is not None:
            return known
        loaded = self._loaded_torch()
        if loaded is None and self.engine_for(1) == "onnx":
            dim = self._onnx_engine().dim  # no torch model needed for the dimension
        else:
            dim = int(_st_dim(loaded if loaded is not None else self._torch_engine()))
        self._model_dim = dim
        return dim

    @property
    def dim(self) -> int:
        """Dimension of the vectors this embedder returns."""
        return self.config.truncate_dim or self.model_dim

    @property
    def max_seq_length(self) -> int:
        loaded = self._loaded_torch()
        if loaded is None and self.engine_for(1) == "onnx":
            return int(self._onnx_engine().max_length)
        return int((loaded if loaded is not None else self._torch_engine()).max_seq_length)

    @property
    def tokenizer(self):
        """The model's (Hugging Face) tokenizer; loads no torch model when none is loaded."""
        loaded = self._loaded_torch()
        if loaded is not None:
            return loaded.tokenizer
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self.resolved.load_from, local_files_only=self.resolved.is_local)
            self._tokenizer.model_max_length = self.max_seq_length
        return self._tokenizer

    @property
    def prefixes(self) -> Prefixes:
        if self._prefixes is None:
            shipped = read_model_prompts(self.resolved.load_from) if self.resolved.is_local \
                else dict(getattr(self.model, "prompts", {}) or {})
            self._prefixes = resolve_prefixes(
                self.config.model, query_prefix=self.config.query_prefix,
                document_prefix=self.config.document_prefix, model_prompts=shipped)
        return self._prefixes

    @contextmanager
    def using_cache(self, cache: Any) -> Iterator[Any]:
        """Encode through `cache` (an `EmbeddingCache`) inside the block, then restore the
        cache this embedder had; None keeps the current one. Yields the cache in use."""
        previous = self.cache
        if cache is not None:
            self.cache = cache
        try:
            yield self.cache
        finally:
            self.cache = previous

    def identity(self) -> dict[str, Any]:
        """The settings that decide what the vectors mean (recorded in stores and cache keys)."""
        p, dim = self.prefixes, self.dim  # the model loaded first: a hub model's snapshot
        return {
            "model": self.config.model,
            "model_hash": model_fingerprint(self.resolved),
            "dim": dim,
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
            v.utf8(f"texts[{i}]", t, error=InvalidInputError)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        cache = self.cache
        keys: list[str] = []
        found: dict[str, np.ndarray] = {}
        if cache is not None:
            ident = self.identity()
            model_id = f"{ident['model']}@{ident['model_hash']}"
            if self.config.onnx_quantize:  # lossy vectors never mix with fp32/bf16 ones
                model_id += f"+{self.config.onnx_quantize}"
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
            raw = self._forward([texts[i] for i in todo], prefix, show)
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

    def _forward(self, texts: list[str], prefix: str, show: bool) -> np.ndarray:
        """The model's output for prefix + text (before truncation and normalization)."""
        if self.engine_for(len(texts)) == "onnx":
            return self._onnx_engine().encode([prefix + t for t in texts],
                                              batch_size=self.config.batch_size, progress=show)
        return self._torch_engine().encode(
            texts, prompt=prefix, batch_size=self.config.batch_size,
            show_progress_bar=show, convert_to_numpy=True, normalize_embeddings=False)

    def embed_queries(self, queries: Sequence[str], *, progress: bool | None = None) -> np.ndarray:
        """Embed queries with the query prefix."""
        return self._encode(queries, self.prefixes.query, progress)

    def embed_query(self, query: str) -> np.ndarray:
        """Embed one query; returns a 1-d float32 vector."""
        if not isinstance(query, str):
            raise InvalidInputError(f"query must be str, got {type(query).__name__}")
        v.utf8("query", query, error=InvalidInputError)
        return self._encode([query], self.prefixes.query, False)[0]

    def embed_documents(self, texts: Sequence[str], *, progress: bool | None = None) -> np.ndarray:
        """Embed passages with the document prefix."""
        return self._encode(texts, self.prefixes.document, progress)

    def count_tokens(self, text: str) -> int:
        """Number of model tokens of `text` with the document prefix, special tokens included."""
        tok = self.tokenizer
        return len(tok(self.prefixes.document + text, add_special_tokens=True,
                       truncation=False)["input_ids"])


def _st_dim(model: Any) -> int | None:
    fn = getattr(model, "get_embedding_dimension", None) or \
        model.get_sentence_embedding_dimension
    return fn()
