"""The pipeline's configuration: one frozen tree of dataclasses, to and from dict / TOML."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from .chunking import ChunkConfig
from .embedding import EmbedderConfig
from . import validate as v
from .errors import ConfigError
from .fusion import METHODS as FUSIONS
from .fusion import validate_rrf_params
from .rerank import RerankConfig
from .sparse import SparseConfig
from .store import StoreConfig
from .tokenize import TokenizerConfig

MODES = ("hybrid", "dense", "sparse")


@dataclass(frozen=True)
class RetrieverConfig:
    """Everything a `HybridRetriever` needs.

    Args:
        embedder, store, sparse, chunking: the parts' settings.
        reranker: None for no reranking.
        mode: default search mode ("hybrid", "dense" or "sparse").
        candidates: how many candidates each side (dense, BM25) contributes to fusion.
        fusion: how hybrid mode fuses the two sides: "dbsf" (default: each side's scores
            normalized by mean ± 3 standard deviations, then a weighted sum: Qdrant's DBSF,
            LlamaIndex's dist_based_score), "relative_score" (min-max normalized scores:
            LlamaIndex's relative_score, Weaviate's relativeScoreFusion) or "rrf" (weighted
            Reciprocal Rank Fusion). dbsf with 100 candidates was chosen for collections
            never seen: left out in turn, each of the five shared collections gets it from
            the other four and the nfcorpus dev split (docs/benchmarks.md, "The default").
        rrf_k: the RRF constant; weights: per-side weights {"dense": w, "sparse": w} (used
            by every fusion method).
        collapse_chunks: return one hit per parent document (its best chunk).
        chunk_penalty: on the dense side, a document's later chunks score their cosine
            similarity minus this, so a document is found by its first chunk (which holds
            the title and the lead) unless a later chunk is clearly nearer. 0.05 was chosen
            on the nfcorpus dev split; 0 is the plain maximum over chunks.
        cache_dir: directory of an on-disk embedding cache (None: no cache).
        funnel_dim: Matryoshka funnel: index only the leading `funnel_dim` dims in Chroma and
            rescore the stage-1 candidates with the full vectors (None: off).
        funnel_candidates: stage-1 candidates to rescore (default: 4 x the dense candidates).
        local_vectors: answer the dense side in this process: a copy of every record's
            full vector (derived from Chroma like the BM25 index; 4 bytes x dimension per
            record, 1.5 KB at 384) and, without a funnel, an HNSW graph over it (usearch,
            8-bit, the store's hnsw_* settings; ~0.7 KB a record at M=32), whose candidates
            are scored exactly on the copy. Unfiltered and broadly filtered queries walk that
            graph instead of Chroma's; a filter that few records pass (under 5%) is answered
            by an exact scan over exactly those records held in the process, where the
            default reads their vectors from the BM25 index's copy (~10 us each; from
            Chroma, ~45 us each, in a server client without replica_dir). With a funnel
            the copy exists anyway and is used for the scans.
    """

    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    chunking: ChunkConfig = field(default_factory=ChunkConfig)
    reranker: RerankConfig | None = None
    mode: str = "hybrid"
    candidates: int = 100
    fusion: str = "dbsf"
    rrf_k: float = 60
    weights: Mapping[str, float] = field(default_factory=lambda: {"dense": 1.0, "sparse": 1.0})
    collapse_chunks: bool = True
    chunk_penalty: float = 0.05
    cache_dir: str | None = None
    funnel_dim: int | None = None
    funnel_candidates: int | None = None
    local_vectors: bool = False

    def __post_init__(self) -> None:
        for name, kind in (("embedder", EmbedderConfig), ("store", StoreConfig),
                           ("sparse", SparseConfig), ("chunking", ChunkConfig)):
            if not isinstance(getattr(self, name), kind):
                v.fail(name, f"a {kind.__name__}", getattr(self, name),
                       "or pass a dict to RetrieverConfig.from_dict")
        if self.reranker is not None and not isinstance(self.reranker, RerankConfig):
            v.fail("reranker", "a RerankConfig or None", self.reranker)
        v.choice("mode", self.mode, MODES)
        v.choice("fusion", self.fusion, FUSIONS)
        v.number("chunk_penalty", self.chunk_penalty, 0, 2,
                 fix="a cosine-similarity margin; 0 switches it off")
        v.integer("candidates", self.candidates, fix="100 is the default")
        v.boolean("collapse_chunks", self.collapse_chunks)
        object.__setattr__(self, "cache_dir", v.path("cache_dir", self.cache_dir,
                                                     optional=True))
        v.integer("funnel_dim", self.funnel_dim, optional=True,
                  fix="e.g. a third of the model's dimension")
        v.integer("funnel_candidates", self.funnel_candidates, optional=True)
        if self.funnel_candidates is not None and self.funnel_dim is None:
            v.fail("funnel_candidates", "unset without a funnel_dim (it sizes the funnel's "
                   "first stage)", self.funnel_candidates,
                   "set funnel_dim too, or drop funnel_candidates")
        if not isinstance(self.weights, Mapping):
            v.fail("weights", "a dict like {'dense': 1.0, 'sparse': 0.5}", self.weights)
        v.boolean("local_vectors", self.local_vectors)
        weights = dict(self.weights)
        unknown = set(weights) - {"dense", "sparse"}
        if unknown:
            v.fail("weights", "a dict with the keys 'dense' and 'sparse' only", self.weights,
                   f"drop {sorted(unknown, key=str)}")
        validate_rrf_params(self.rrf_k, weights)
        object.__setattr__(self, "weights", {"dense": 1.0, "sparse": 1.0, **weights})

    # -- conversions -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (JSON/TOML-safe, auth tokens left out)."""
        return {
            "embedder": self.embedder.to_dict(),
            "store": self.store.to_dict(),
            "sparse": self.sparse.to_dict(),
            "chunking": self.chunking.to_dict(),
            "reranker": self.reranker.to_dict() if self.reranker else None,
            "mode": self.mode,
            "candidates": self.candidates,
            "fusion": self.fusion,
            "rrf_k": self.rrf_k,
            "weights": dict(self.weights),
            "collapse_chunks": self.collapse_chunks,
            "chunk_penalty": self.chunk_penalty,
            "cache_dir": self.cache_dir,
            "funnel_dim": self.funnel_dim,
            "funnel_candidates": self.funnel_candidates,
            "local_vectors": self.local_vectors,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RetrieverConfig":
        """Build from a nested dict; unknown keys are an error that lists the valid ones."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"config must be a dict, got {type(data).__name__}")
        data = dict(data)
        parts = {"embedder": EmbedderConfig, "store": StoreConfig, "sparse": SparseConfig,
                 "chunking": ChunkConfig, "reranker": RerankConfig}
        kwargs: dict[str, Any] = {}
        top = {f.name for f in dataclasses.fields(cls)}
        _reject_unknown("config", data, top)
        for key, value in data.items():
            if key in parts and value is not None and not dataclasses.is_dataclass(value):
                kwargs[key] = _build(parts[key], value, key)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "RetrieverConfig":
        """Read a TOML file whose tables mirror `to_dict()` ([embedder], [store], ...)."""
        return cls.from_dict(read_toml(path))

    def replace(self, **changes: Any) -> "RetrieverConfig":
        """A copy with top-level fields changed; nested parts may be given as dicts."""
        d = self.to_dict()
        d["store"]["auth_token"] = self.store.auth_token
        changes = {key: value.to_dict() if dataclasses.is_dataclass(value) else value
                   for key, value in changes.items()}
        return RetrieverConfig.from_dict(merged(d, changes))


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML config file's tables as written (not validated; `from_toml` validates), with
    a one-line `ConfigError` for a file that cannot be read, is not UTF-8 or is not TOML.
    A UTF-8 byte order mark, as Windows editors write, is skipped."""
    import tomllib

    path = v.path("config file", path, fix="pass the path of a TOML file")
    try:
        with open(path, "rb") as fh:
            return tomllib.loads(fh.read().decode("utf-8-sig"))
    except OSError as exc:
        raise ConfigError(f"config file {path!r} cannot be read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not UTF-8 (byte {exc.start} is "
                          f"{exc.object[exc.start:exc.start + 1]!r}); TOML files are "
                          "UTF-8: save it with that encoding") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from exc


def merged(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `changes` laid over it, table by table: a table given in part (say
    ``{"sparse": {"tokenizer": {"stemmer": False}}}``) changes the keys it names and keeps
    the others, at every depth."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def _reject_unknown(where: str, data: Mapping[str, Any], valid: set[str]) -> None:
    unknown = set(data) - valid
    if unknown:
        raise ConfigError(f"unknown {where} keys {sorted(unknown, key=repr)}; valid keys: "
                          f"{sorted(valid)}")


def _build(kind: type, value: Any, where: str) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(f"config.{where} must be a table/dict, got {type(value).__name__}")
    _reject_unknown(where, value, {f.name for f in dataclasses.fields(kind)})
    value = dict(value)
    if kind is SparseConfig and isinstance(value.get("tokenizer"), Mapping):
        value["tokenizer"] = TokenizerConfig.from_dict(value["tokenizer"])
    try:
        return kind(**value)
    except TypeError as exc:
        raise ConfigError(f"config.{where}: {exc}") from exc
