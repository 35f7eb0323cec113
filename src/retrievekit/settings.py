"""What a store records about itself, built in one place, diffed on open.

The recorded settings are those that decide what the stored vectors and records mean:
the embedder's identity (model, file hash, dim, truncate_dim, prefixes, normalization),
chunking, funnel_dim, the BM25 tokenizer, and a format version. Opening a store with
settings that differ fails with a message listing every difference.

Precision (`dtype`) and ONNX int8 quantization are recorded under `written_with` but not
diffed: they move vectors by ~1e-3 (bf16) and ~1e-2 (int8) cosine, within what the same
model gives on another device, so a store written on a GPU in bf16 stays usable from a CPU
in fp32. A difference is logged.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from .config import RetrieverConfig, merged
from .embedding import Embedder
from .errors import ConfigError, StoreMismatchError
from .sparse import SparseIndex
from .store import ChromaStore

logger = logging.getLogger(__name__)

#: 3: texts are metadata strings (store.py); 2: texts are Chroma documents, kept so in a
#: store made by 2 or upgraded from 1 (rewriting every record would make an open O(n))
STORE_FORMAT = 3
_INFORMATIONAL = ("written_with",)


def index_settings(config: RetrieverConfig, embedder: Embedder) -> dict[str, Any]:
    """The settings a store made with `config` and `embedder` records."""
    emb = embedder.config
    return {"format": STORE_FORMAT, "embedder": embedder.identity(),
            "sparse": SparseIndex.describe(config.sparse),
            "chunking": config.chunking.to_dict(), "funnel_dim": config.funnel_dim,
            "written_with": {"dtype": emb.dtype, "onnx_quantize": emb.onnx_quantize}}


def config_from_settings(recorded: Mapping[str, Any], store: Mapping[str, Any],
                         changes: Mapping[str, Any]) -> RetrieverConfig:
    """The configuration that reopens a store with its recorded settings."""
    emb = recorded["embedder"]
    sparse = {k: v for k, v in recorded["sparse"].items() if k == "tokenizer"}
    cfg: dict[str, Any] = {
        "store": dict(store),
        "embedder": {"model": emb["model"], "truncate_dim": emb["truncate_dim"],
                     "normalize": emb["normalize"], "query_prefix": emb["query_prefix"],
                     "document_prefix": emb["document_prefix"]},
        "sparse": sparse,
        "chunking": recorded.get("chunking", {}),
        "funnel_dim": recorded.get("funnel_dim"),
    }
    return RetrieverConfig.from_dict(merged(cfg, changes))


def check_model_limits(config: RetrieverConfig, embedder: Embedder) -> None:
    td = config.embedder.truncate_dim
    if td is not None and td > embedder.model_dim:
        raise ConfigError(
            f"truncate_dim={td} is larger than the dimension of {config.embedder.model!r} "
            f"({embedder.model_dim}); use a value <= {embedder.model_dim} or None")
    fd = config.funnel_dim
    if fd is not None and fd >= embedder.dim:
        raise ConfigError(
            f"funnel_dim={fd} must be smaller than the embedding dimension ({embedder.dim}); "
            f"try {embedder.dim // 3} or None to switch it off")


def reconcile(store: ChromaStore, config: RetrieverConfig, embedder: Embedder) -> bool:
    """Record our settings in a new store, or check them against an existing one.

    Returns True when the store was upgraded from format 1 (its derived state must be
    rebuilt; its records are already in the format-2 layout)."""
    check_model_limits(config, embedder)
    ours = index_settings(config, embedder)
    recorded = store.read_settings()
    if recorded is not None and recorded.get("format") in (1, 2):
        ours["format"] = 2
        store.texts_in_metadata = False
    if recorded is None:
        n = store.count()
        if n:
            raise StoreMismatchError(
                f"collection {config.store.collection!r} holds {n} records that retrievekit "
                "did not write (no recorded settings); use another store.collection name")
        store.write_settings(ours)
        return False
    upgraded = recorded.get("format") == 1
    if upgraded:  # format 1 had the same records; only the derived BM25 settings changed
        recorded = {**recorded, "format": 2, "sparse": ours["sparse"]}
    elif "format" in recorded.get("sparse", {}):  # stores of early v2 builds recorded it
        recorded = {**recorded, "sparse": {k: v for k, v in recorded["sparse"].items()
                                           if k != "format"}}
    unhashed = recorded.get("embedder", {}).get("model_hash") == "" \
        and bool(ours["embedder"]["model_hash"])
    if unhashed:  # made before hub models were hashed: this snapshot is taken on trust, once
        recorded = {**recorded, "embedder": {**recorded["embedder"],
                                             "model_hash": ours["embedder"]["model_hash"]}}
    diffs = diff(recorded, ours)
    if diffs:
        lines = "; ".join(f"{k}: store has {a!r}, this retriever has {b!r}" for k, a, b in diffs)
        raise StoreMismatchError(
            f"the store at collection {config.store.collection!r} was made with other "
            f"settings ({lines}). Open it with HybridRetriever.open(path) to use its "
            "settings, or choose another store.path/collection for the new ones")
    if recorded.get("written_with") != ours["written_with"]:
        logger.info("store written with %s, read with %s (vectors stay compatible)",
                    recorded.get("written_with"), ours["written_with"])
    if upgraded or unhashed:
        store.write_settings({**ours, "written_with": recorded.get("written_with")})
    if upgraded:
        logger.warning("store upgraded from format 1 to 2; the BM25 index is rebuilt once")
    return upgraded


def diff(recorded: Mapping[str, Any], ours: Mapping[str, Any], prefix: str = ""
         ) -> list[tuple[str, Any, Any]]:
    """(key, recorded, ours) for every setting that differs, nested keys dotted."""
    out = []
    for key in sorted(set(recorded) | set(ours)):
        if not prefix and key in _INFORMATIONAL:
            continue
        a, b = recorded.get(key), ours.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(diff(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out
