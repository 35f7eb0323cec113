"""LlamaIndex adapters: a vector store, an embedding model, a retriever and a node
postprocessor (reranker).

Only `llama_index.core` is imported, and only when this module is (``import retrievekit``
does not load it). The adapters convert types and call the core; retrieval itself is
`retrievekit.pipeline.HybridRetriever`'s.

Retrieved nodes (`RetrieveKitRetriever`, and `RetrieveKitVectorStore` without the result keys):
    ``NodeWithScore(node=TextNode(id_=<document id>, text=<text of the best chunk>, ...),
    score=<final score>)``. The node's metadata is the document's own metadata, keys in the
    order they were indexed in, and its ``excluded_llm_metadata_keys`` /
    ``excluded_embed_metadata_keys`` as they were indexed with (both kept in the store under
    ``_li_*`` keys), plus ``retrievekit_ranks``
    (``{stage: 1-based rank}``), ``retrievekit_scores`` (``{stage: score}``) for the stages
    the hit went through ("dense", "sparse", "fused", "rerank") and ``retrievekit_chunk_id``
    (the stored chunk that matched; the document id when the document was not chunked). The
    same keys as `retrievekit.langchain`. They are excluded from the embed and LLM views of
    the node (so they reach neither prompts nor cross-encoders) and from the node's `hash`,
    which LlamaIndex's `QueryFusionRetriever` dedups by: the same document found by two
    retrievekit retrievers (say a dense and a sparse one), or by retrievekit and another
    index holding the same node, is one node there.

Indexed nodes (`RetrieveKitRetriever.insert_nodes` / `add_documents`):
    id: ``node.node_id`` (for a LlamaIndex `Document`, its ``doc_id``); re-inserting the same
    node is a no-op, a changed one replaces the old. `SentenceSplitter` gives its nodes random
    ids unless you pass it ``id_func``, so splitting the same document twice makes new nodes;
    use `delete_ref_doc` to drop the old ones.
    text: ``node.get_content(metadata_mode=MetadataMode.NONE)`` -- the text alone, as the core
    embeds and tokenizes it (LlamaIndex's own vector stores embed metadata with the text).
    metadata, flattened for Chroma: nested dicts become dotted keys (``{"author": {"name":
    "x"}}`` -> ``{"author.name": "x"}``, filterable as such; a key excluded from the LLM
    or embed view, ``"author"``, excludes its dotted keys); None values, empty lists and
    empty dicts are dropped; tuples become lists; any other value that Chroma cannot hold
    (a datetime, a list of dicts, a list of mixed types) raises `InvalidInputError` naming the
    node and the key -- convert it (e.g. ``json.dumps``) or remove it before inserting. The
    result keys above are dropped, so retrieved nodes can be inserted again. A node's source
    document id (``node.source_node.node_id``) is stored as ``ref_doc_id`` and comes back as
    the SOURCE relationship of retrieved nodes.

Filters: a Chroma ``where`` dict, or LlamaIndex `MetadataFilters` translated by
`metadata_filters_to_where`.
"""

from __future__ import annotations

import asyncio
from hashlib import sha256
from typing import Any, Iterable, Mapping, Sequence

from .errors import ConfigError, InvalidInputError, MissingDependencyError

try:
    import llama_index.core.instrumentation as instrument
    from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.bridge.pydantic import Field, PrivateAttr
    from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload
    from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import (BaseNode, MetadataMode, NodeRelationship, NodeWithScore,
                                         QueryBundle, RelatedNodeInfo, TextNode)
    from llama_index.core.vector_stores.types import (BasePydanticVectorStore, FilterCondition,
                                                      FilterOperator, MetadataFilter,
                                                      MetadataFilters, VectorStoreQuery,
                                                      VectorStoreQueryMode,
                                                      VectorStoreQueryResult)
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        "retrievekit.llama_index needs llama-index-core: pip install 'retrievekit[llama-index]' "
        "(or pip install llama-index-core)") from exc

from .adapters import (CHUNK_ID_KEY, RANKS_KEY, RESULT_KEYS, SCORES_KEY,  # noqa: F401
                       ClosesOwnRetriever, indexable, open_retriever, partial, result_metadata)
from . import validate as v
from .config import MODES
from .embedding import DEFAULT_MODEL, Embedder, EmbedderConfig
from .filters import validate_where
from .pipeline import HybridRetriever
from .prefixes import Prefixes
from .records import parent_of
from .rerank import DEFAULT_RERANKER, Ranked, RerankConfig, Reranker
from .store import clean_metadata
from .types import Document, Hit

__all__ = ["RetrieveKitEmbedding", "RetrieveKitNode", "RetrieveKitReranker",
           "RetrieveKitRetriever", "RetrieveKitVectorStore", "hit_to_node",
           "metadata_filters_to_where", "nodes_to_documents"]

dispatcher = instrument.get_dispatcher(__name__)

#: Metadata key a node's source document id is stored under.
REF_DOC_KEY = "ref_doc_id"
#: Metadata keys that keep a node's exclusions (which metadata the LLM and the embedding
#: model do not see; e.g. `SimpleDirectoryReader` hides file sizes and dates from both).
EXCLUDED_KEYS = {"excluded_llm_metadata_keys": "_li_excluded_llm",
                 "excluded_embed_metadata_keys": "_li_excluded_embed"}
#: Metadata key that keeps the order of a node's metadata keys (Chroma returns them in no
#: fixed order, and LlamaIndex's node hash, which `QueryFusionRetriever` dedups by, reads it).
KEY_ORDER_KEY = "_li_key_order"
#: Metadata key of the score a node had before reranking (with ``keep_retrieval_score``).
RETRIEVAL_SCORE_KEY = "retrieval_score"


# -- embeddings ------------------------------------------------------------------------------
class RetrieveKitEmbedding(BaseEmbedding):
    """LlamaIndex embedding model over retrievekit's `Embedder` (prefix, truncate, normalize).

    Queries get the query prefix and texts the document prefix, both resolved by the core
    (user setting, then the model's own prompts, then retrievekit's table of known families),
    so the vectors equal the ones `HybridRetriever` stores and searches with. Use it as
    ``Settings.embed_model``, in ``VectorStoreIndex.from_documents(..., embed_model=...)`` or
    as the last step of an `IngestionPipeline`.

    Args:
        model_name: hub name or local directory (default: the bundled all-MiniLM-L6-v2).
        embedder: a ready `Embedder` (e.g. ``HybridRetriever.embedder``) to share its model;
            the fields are then read from its config (settings passed as well must agree).
        query_prefix / document_prefix: None to resolve automatically, "" for none.
        truncate_dim, normalize, device, dtype: as in `EmbedderConfig`.
        embed_batch_size: texts per call of the model (default: the embedder's batch_size).

    The fields record the settings; change them by building a new object.
    """

    model_name: str = Field(default=DEFAULT_MODEL, description="Hub name or local directory.")
    query_prefix: str | None = Field(
        default=None, description="Query prefix; None: resolved by retrievekit, '': none.")
    document_prefix: str | None = Field(
        default=None, description="Document prefix; None: resolved by retrievekit, '': none.")
    truncate_dim: int | None = Field(default=None, description="Matryoshka truncation.")
    normalize: bool = Field(default=True, description="L2-normalize after truncation.")
    device: str | None = Field(default=None, description="cpu, cuda, ...; None: automatic.")
    dtype: str = Field(default="auto", description="auto, float32, bfloat16 or float16.")

    _embedder: Embedder = PrivateAttr()

    def __init__(self, model_name: str | None = None, *, embedder: Embedder | None = None,
                 query_prefix: str | None = None, document_prefix: str | None = None,
                 truncate_dim: int | None = None, normalize: bool | None = None,
                 device: str | None = None, dtype: str | None = None,
                 embed_batch_size: int | None = None, **kwargs: Any) -> None:
        given = {k: v for k, v in {
            "model": model_name, "query_prefix": query_prefix, "document_prefix": document_prefix,
            "truncate_dim": truncate_dim, "normalize": normalize, "device": device, "dtype": dtype,
        }.items() if v is not None}
        if embedder is not None:
            if not isinstance(embedder, Embedder):
                raise ConfigError(f"embedder must be a retrievekit Embedder, got "
                                  f"{type(embedder).__name__}")
            differ = sorted(k for k, v in given.items() if getattr(embedder.config, k) != v)
            if differ:
                raise ConfigError(
                    f"settings {differ} differ from the passed embedder's config; pass either "
                    "embedder= or the settings (or build Embedder(...) with the ones you want)")
            core = embedder
        else:
            if embed_batch_size is not None:
                given["batch_size"] = embed_batch_size
            core = Embedder(EmbedderConfig(**given))
        cfg = core.config
        super().__init__(model_name=cfg.model, query_prefix=cfg.query_prefix,
                         document_prefix=cfg.document_prefix, truncate_dim=cfg.truncate_dim,
                         normalize=cfg.normalize, device=cfg.device, dtype=cfg.dtype,
                         embed_batch_size=embed_batch_size or cfg.batch_size, **kwargs)
        self._embedder = core

    @classmethod
    def class_name(cls) -> str:
        return "RetrieveKitEmbedding"

    @property
    def embedder(self) -> Embedder:
        """The core `Embedder` (its model loads on first use)."""
        return self._embedder

    @property
    def prefixes(self) -> Prefixes:
        """The resolved query and document prefixes and where each came from."""
        return self._embedder.prefixes

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._embedder.embed_query(query).tolist()

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._get_text_embeddings([text])[0]

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return (await self._aget_text_embeddings([text]))[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._embedder.embed_documents(list(texts), progress=False).tolist()

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, list(texts))


# -- conversions -----------------------------------------------------------------------------
class RetrieveKitNode(TextNode):
    """A `TextNode` whose `hash` leaves out retrievekit's result keys and metadata key order.

    LlamaIndex's `QueryFusionRetriever` dedups by ``node.hash`` (text plus ``str(metadata)``);
    ranks that differ between retrievers, or keys that Chroma returns in another order, would
    otherwise make one document two nodes.
    """

    @property
    def hash(self) -> str:
        meta = {k: v for k, v in self.metadata.items() if k not in RESULT_KEYS}
        return sha256((str(self.text) + str(meta)).encode("utf-8", "surrogatepass")).hexdigest()


def hit_to_node(hit: Hit) -> NodeWithScore:
    """A core `Hit` -> a `NodeWithScore` (score = the hit's final score; see module doc)."""
    node = stored_node(hit.document, extra=result_metadata(hit))
    return NodeWithScore(node=node, score=hit.score)


def stored_node(doc: Document, extra: Mapping[str, Any] | None = None) -> TextNode:
    """A core document -> a node: its metadata (keys in the order they were indexed in, else
    sorted), its source document as the SOURCE relationship, the exclusions it was indexed
    with; `extra` keys are added and hidden from the embed and LLM views."""
    stored = dict(doc.metadata)
    order = [k for k in stored.pop(KEY_ORDER_KEY, []) if k in stored]
    meta = {k: stored[k] for k in order + sorted(set(stored) - set(order))}
    ref = meta.pop(REF_DOC_KEY, None)
    hidden = {field: list(meta.pop(key, [])) for field, key in EXCLUDED_KEYS.items()}
    meta.update(extra or {})
    relationships = {NodeRelationship.SOURCE: RelatedNodeInfo(node_id=str(ref))} if ref else {}
    return RetrieveKitNode(id_=doc.id, text=doc.text, metadata=meta,
                           relationships=relationships,
                           **{field: _with(keys, list(extra or ())) for field, keys
                              in hidden.items()})


def flatten_metadata(metadata: Mapping[str, Any], node_id: str) -> dict[str, Any]:
    """Metadata with nested dicts as dotted keys, None values and empty lists dropped (the
    policy in the module doc; `clean_metadata` checks the rest)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, items: Mapping[Any, Any]) -> None:
        for k, v in items.items():
            if not isinstance(k, str) or not k:
                raise InvalidInputError(f"node {node_id!r}: metadata keys must be non-empty str, "
                                        f"got {prefix}{k!r}")
            key = f"{prefix}{k}"
            if isinstance(v, Mapping):
                walk(key + ".", v)
                continue
            if v is None or (isinstance(v, (list, tuple)) and not v):
                continue
            if key in out:
                raise InvalidInputError(
                    f"node {node_id!r}: metadata key {key!r} occurs both as a key and as a "
                    "flattened nested key; rename one of them")
            out[key] = list(v) if isinstance(v, tuple) else v

    walk("", metadata)
    return out


def nodes_to_documents(nodes: Sequence[BaseNode | NodeWithScore]) -> list[Document]:
    """LlamaIndex nodes or `Document`s -> core documents (id, text, flattened metadata)."""
    if isinstance(nodes, (BaseNode, NodeWithScore, str, bytes, Mapping)) \
            or not isinstance(nodes, Iterable):
        raise InvalidInputError(f"nodes must be a list of LlamaIndex nodes or Documents, got "
                                f"{v.shown(nodes)}; wrap the single node in a list")
    out = []
    for i, n in enumerate(nodes):
        if isinstance(n, NodeWithScore):
            n = n.node
        if not isinstance(n, BaseNode):
            raise InvalidInputError(f"nodes[{i}] must be a LlamaIndex node or Document, got "
                                    f"{type(n).__name__}")
        own = indexable(n.metadata, n.node_id, f"nodes[{i}]")
        meta = flatten_metadata(own, n.node_id)
        source = n.source_node
        if source is not None and source.node_id:
            meta[REF_DOC_KEY] = source.node_id
        # order and exclusions name the stored (flattened) keys: an excluded "author" hides
        # the keys its dict became ("author.name", ...), not a key of its own named
        # "author.x"; result keys need no record
        if len(meta) > 1:
            meta[KEY_ORDER_KEY] = list(meta)
        for field, key in EXCLUDED_KEYS.items():
            hidden = {stored for k in getattr(n, field) if k in own
                      for stored in flatten_metadata({k: own[k]}, n.node_id)}
            keep = [k for k in meta if k in hidden]
            if keep:
                meta[key] = keep
        out.append(Document(text=n.get_content(metadata_mode=MetadataMode.NONE), id=n.node_id,
                            metadata=clean_metadata(meta, f"node {n.node_id!r}")))
    return out


_OPERATORS = {
    FilterOperator.EQ: "$eq", FilterOperator.NE: "$ne", FilterOperator.GT: "$gt",
    FilterOperator.GTE: "$gte", FilterOperator.LT: "$lt", FilterOperator.LTE: "$lte",
    FilterOperator.IN: "$in", FilterOperator.NIN: "$nin", FilterOperator.CONTAINS: "$contains",
}
_SUPPORTED = [op.name for op in _OPERATORS] + ["ANY", "ALL"]


def _combine(op: str, parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    # Chroma wants at least two operands under $and / $or
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else {op: parts}


def _translate_filter(f: MetadataFilter) -> dict[str, Any] | None:
    op, value = f.operator, f.value
    if op in (FilterOperator.ANY, FilterOperator.ALL):
        values = value if isinstance(value, list) else [value]
        if not values or any(v is None for v in values):
            raise InvalidInputError(f"MetadataFilter {op.name} on {f.key!r} needs a non-empty "
                                    f"list of values, got {value!r}")
        return _combine("$or" if op == FilterOperator.ANY else "$and",
                        [{f.key: {"$contains": v}} for v in values])
    if op not in _OPERATORS:
        raise InvalidInputError(
            f"MetadataFilter operator {op.name} ({op.value!r}) on key {f.key!r} has no Chroma "
            f"equivalent; supported operators: {_SUPPORTED}. Filter on another key, or filter "
            "the retrieved nodes yourself")
    if value is None:
        raise InvalidInputError(f"MetadataFilter {op.name} on {f.key!r} has value None; Chroma "
                                "cannot compare with None (missing keys are never matched)")
    if op in (FilterOperator.IN, FilterOperator.NIN):
        if not isinstance(value, list) or not value:
            raise InvalidInputError(f"MetadataFilter {op.name} on {f.key!r} needs a non-empty "
                                    f"list, got {value!r}")
    elif isinstance(value, list):
        raise InvalidInputError(f"MetadataFilter {op.name} on {f.key!r} needs a single value, "
                                f"got the list {value!r}; use IN / NIN / ANY / ALL for lists")
    return {f.key: {_OPERATORS[op]: value}}


def metadata_filters_to_where(filters: MetadataFilters | MetadataFilter | None
                              ) -> dict[str, Any] | None:
    """Translate LlamaIndex `MetadataFilters` into a Chroma ``where`` dict.

    EQ, NE, GT, GTE, LT, LTE, IN, NIN map to ``$eq`` ... ``$nin``; CONTAINS to ``$contains``
    (the metadata list holds the value); ANY / ALL to ``$or`` / ``$and`` of ``$contains``.
    AND / OR conditions and nested `MetadataFilters` map to ``$and`` / ``$or``; a group of one
    is unwrapped; an empty one matches everything, as in LlamaIndex: dropped from an AND,
    and an OR holding one is no filter (None, also when nothing is left).

    Raises:
        InvalidInputError: for operators Chroma lacks (TEXT_MATCH, TEXT_MATCH_INSENSITIVE,
            IS_EMPTY), the NOT condition, or values the operator cannot take.
    """
    if filters is None:
        return None
    if isinstance(filters, MetadataFilter):
        return _translate_filter(filters)
    if not isinstance(filters, MetadataFilters):
        raise InvalidInputError(f"filters must be LlamaIndex MetadataFilters, got "
                                f"{type(filters).__name__}")
    condition = filters.condition or FilterCondition.AND
    if condition not in (FilterCondition.AND, FilterCondition.OR):
        raise InvalidInputError(
            f"MetadataFilters condition {condition.name} ({condition.value!r}) has no Chroma "
            "equivalent; supported: AND, OR. Negate the operators instead (EQ -> NE, IN -> NIN)")
    parts = [metadata_filters_to_where(f) for f in filters.filters]
    if condition == FilterCondition.OR and None in parts:
        return None  # an empty group matches everything, and so does the OR holding it
    return _combine("$and" if condition == FilterCondition.AND else "$or",
                    [p for p in parts if p is not None])


def _as_where(where: Any, name: str) -> dict[str, Any] | None:
    if where is None or isinstance(where, (MetadataFilters, MetadataFilter)):
        return metadata_filters_to_where(where)
    if isinstance(where, Mapping):
        validate_where(where)  # refused now, not at the first search
        return dict(where) or None
    raise InvalidInputError(f"{name} must be a Chroma where dict (e.g. {{'lang': 'en'}}) or "
                            f"LlamaIndex MetadataFilters, got {type(where).__name__}")


# -- retriever -------------------------------------------------------------------------------
def _query(query: Any) -> str | QueryBundle:
    """Refuse a query LlamaIndex would fail on in its own event validation."""
    if not isinstance(query, QueryBundle):
        v.readable("query", query, "pass the text to search for (or a QueryBundle)")
    return query


class RetrieveKitRetriever(ClosesOwnRetriever, BaseRetriever):
    """Hybrid BM25 + dense (+ rerank) retrieval as a LlamaIndex retriever.

    Build it around a `HybridRetriever` (``RetrieveKitRetriever(hr)``), or let
    `from_defaults` build one.

    Args:
        retriever: the `HybridRetriever` to search and write to (closing it is the caller's).
        similarity_top_k: nodes to return (default 10).
        where: a Chroma ``where`` dict or LlamaIndex `MetadataFilters`, applied to the dense
            and the BM25 side alike.
        filters: LlamaIndex `MetadataFilters` (the name LlamaIndex's retrievers use); when
            given with `where`, both must hold.
        mode: "hybrid", "dense" or "sparse" (None: the retriever's configured mode).
        rerank: rerank with the retriever's cross-encoder (None: when one is configured).
        candidates: per-side candidates for fusion (None: the retriever's setting).
    """

    def __init__(self, retriever: HybridRetriever, *, similarity_top_k: int = 10,
                 where: Mapping[str, Any] | MetadataFilters | None = None,
                 filters: MetadataFilters | None = None, mode: str | None = None,
                 rerank: bool | None = None, candidates: int | None = None,
                 callback_manager: CallbackManager | None = None, verbose: bool = False) -> None:
        if not isinstance(retriever, HybridRetriever):
            raise ConfigError(f"retriever must be a retrievekit HybridRetriever, got "
                              f"{type(retriever).__name__}")
        v.integer("similarity_top_k", similarity_top_k, error=InvalidInputError)
        if mode is not None:
            v.choice("mode", mode, MODES, error=InvalidInputError)
        self.retriever = retriever
        self._owned = False
        self.similarity_top_k = similarity_top_k
        self.where = where
        self.filters = filters
        self.mode = mode
        self.rerank = rerank
        self.candidates = candidates
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    @classmethod
    def from_defaults(cls, config: Any = None, *, similarity_top_k: int = 10,
                      where: Mapping[str, Any] | MetadataFilters | None = None,
                      filters: MetadataFilters | None = None, mode: str | None = None,
                      rerank: bool | None = None, candidates: int | None = None,
                      callback_manager: CallbackManager | None = None, verbose: bool = False,
                      **hybrid: Any) -> "RetrieveKitRetriever":
        """Build the `HybridRetriever` too: `config` and `hybrid` (path, host, port,
        collection, model, truncate_dim, embedder, reranker) go to its constructor. The
        retriever owns it: `close()` (or ``with``) releases the store."""
        core = HybridRetriever(config, candidates=candidates, **hybrid)
        try:
            out = cls(core, similarity_top_k=similarity_top_k, where=where, filters=filters,
                      mode=mode, rerank=rerank, callback_manager=callback_manager,
                      verbose=verbose)
        except BaseException:
            core.close()
            raise
        out._owned = True
        return out

    @property
    def where(self) -> dict[str, Any] | None:
        """The Chroma filter searches use: `where` and `filters` together (both must hold).
        Either may be set between calls."""
        parts = [p for p in (self._where, metadata_filters_to_where(self.filters)) if p]
        return _combine("$and", parts)

    @where.setter
    def where(self, value: Mapping[str, Any] | MetadataFilters | None) -> None:
        self._where = _as_where(value, "where")

    @property
    def filters(self) -> MetadataFilters | None:
        return self._filters

    @filters.setter
    def filters(self, value: MetadataFilters | None) -> None:
        if value is not None and not isinstance(value, (MetadataFilters, MetadataFilter)):
            raise InvalidInputError(f"filters must be LlamaIndex MetadataFilters, got "
                                    f"{type(value).__name__}; pass a Chroma dict as where=")
        validate_where(metadata_filters_to_where(value))  # refused now, not at query time
        self._filters = value

    def _options(self) -> dict[str, Any]:
        return {"where": self.where, "mode": self.mode, "rerank": self.rerank,
                "candidates": self.candidates}

    def retrieve(self, str_or_query_bundle: str | QueryBundle) -> list[NodeWithScore]:
        return super().retrieve(_query(str_or_query_bundle))

    async def aretrieve(self, str_or_query_bundle: str | QueryBundle) -> list[NodeWithScore]:
        return await super().aretrieve(_query(str_or_query_bundle))

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        hits = self.retriever.search(query_bundle.query_str, self.similarity_top_k,
                                     **self._options())
        return [hit_to_node(h) for h in hits]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        hits = await self.retriever.asearch(query_bundle.query_str, self.similarity_top_k,
                                            **self._options())
        return [hit_to_node(h) for h in hits]

    # -- writes ------------------------------------------------------------------------------
    def insert_nodes(self, nodes: Sequence[BaseNode | NodeWithScore], *,
                     progress: bool | None = None) -> list[str]:
        """Index LlamaIndex nodes (e.g. `SentenceSplitter` output) or `Document`s by id;
        returns the ids. See the module doc for ids, text and metadata."""
        return self.retriever.add_documents(nodes_to_documents(nodes), progress=progress)

    def add_documents(self, documents: Sequence[BaseNode], *,
                      progress: bool | None = None) -> list[str]:
        """Index LlamaIndex `Document`s whole (the core chunks long ones); returns their ids."""
        return self.insert_nodes(documents, progress=progress)

    async def ainsert_nodes(self, nodes: Sequence[BaseNode | NodeWithScore], *,
                            progress: bool | None = None) -> list[str]:
        return await self.retriever.aadd_documents(nodes_to_documents(nodes), progress=progress)

    async def aadd_documents(self, documents: Sequence[BaseNode], *,
                             progress: bool | None = None) -> list[str]:
        return await self.ainsert_nodes(documents, progress=progress)

    def delete(self, ids: Sequence[str]) -> int:
        """Delete nodes (documents and all their chunks) by id; returns the records removed."""
        return self.retriever.delete(ids)

    def delete_ref_doc(self, ref_doc_id: str) -> int:
        """Delete every node whose source document is `ref_doc_id`; returns records removed."""
        if not isinstance(ref_doc_id, str) or not ref_doc_id:
            raise InvalidInputError(f"ref_doc_id must be a non-empty str, got {ref_doc_id!r}")
        parents = self.retriever.document_ids(where={REF_DOC_KEY: ref_doc_id})
        return self.retriever.delete(parents) if parents else 0


# -- vector store ----------------------------------------------------------------------------
_HYBRID_MODES = (VectorStoreQueryMode.HYBRID, VectorStoreQueryMode.SEMANTIC_HYBRID)
_SPARSE_MODES = (VectorStoreQueryMode.SPARSE, VectorStoreQueryMode.TEXT_SEARCH)


class RetrieveKitVectorStore(ClosesOwnRetriever, BasePydanticVectorStore):
    """A LlamaIndex vector store whose queries are retrievekit's: dense, sparse (BM25) or
    hybrid (fused), with the store's own model, prefixes and chunking.

    Use it as any vector store::

        index = VectorStoreIndex.from_vector_store(vs, embed_model=vs.embed_model)
        index.as_query_engine(vector_store_query_mode="hybrid", sparse_top_k=20, alpha=0.5)

    Query modes: DEFAULT is `default_mode` ("dense" unless set), SPARSE / TEXT_SEARCH BM25,
    HYBRID / SEMANTIC_HYBRID both sides fused (`alpha`: the dense side's weight, 1 - alpha
    the sparse side's; `sparse_top_k`: the BM25 side's candidates; `hybrid_top_k`: how many
    to return), MMR (`mmr_threshold` as the trade-off, 0.5 by default; `mmr_prefetch_k`
    candidates). `filters` are LlamaIndex `MetadataFilters`, applied on both sides; `doc_ids`
    restricts to nodes of those source documents.

    The store embeds text itself (``is_embedding_query`` is False: LlamaIndex does not embed
    queries for it), so vectors always match the settings the store records. Node embeddings
    LlamaIndex computed before `add` are not used: inserting through `VectorStoreIndex`
    encodes twice, `vs.add(nodes)` (or `RetrieveKitRetriever.insert_nodes`) once.

    Args:
        retriever: a `HybridRetriever` to work on (closing it stays the caller's), or
        config / path / collection / model / embedder / reranker / ...: settings of the one
            this store builds and closes in `close()`.
        default_mode: what a DEFAULT query runs: "dense" (LlamaIndex's meaning), "hybrid" or
            "sparse".
    """

    stores_text: bool = True
    is_embedding_query: bool = False
    flat_metadata: bool = True
    default_mode: str = Field(default="dense", description="What a DEFAULT query runs.")

    _retriever: HybridRetriever = PrivateAttr()
    _owned: bool = PrivateAttr(default=False)

    def __init__(self, retriever: HybridRetriever | None = None, *, config: Any = None,
                 default_mode: str = "dense", **build: Any) -> None:
        if default_mode not in MODES:
            raise ConfigError(f"default_mode must be one of {list(MODES)}, got {default_mode!r}")
        core, owned = open_retriever(retriever, config, build, "RetrieveKitVectorStore")
        try:
            super().__init__(default_mode=default_mode)
        except BaseException:
            if owned:
                core.close()
            raise
        self._retriever, self._owned = core, owned

    @classmethod
    def class_name(cls) -> str:
        return "RetrieveKitVectorStore"

    @property
    def retriever(self) -> HybridRetriever:
        return self._retriever

    @property
    def client(self) -> HybridRetriever:
        """The `HybridRetriever` behind the store."""
        return self._retriever

    @property
    def embed_model(self) -> RetrieveKitEmbedding:
        """The store's model as a LlamaIndex embedding (for ``VectorStoreIndex``)."""
        return RetrieveKitEmbedding(embedder=self._retriever.embedder)

    # -- writes ------------------------------------------------------------------------------
    def add(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[str]:
        """Index nodes by id (see the module doc for ids, text and metadata)."""
        return self._retriever.add_documents(nodes_to_documents(nodes),
                                             progress=kwargs.get("progress", False))

    async def async_add(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[str]:
        return await asyncio.to_thread(self.add, list(nodes), **kwargs)

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node whose source document is `ref_doc_id`."""
        if not isinstance(ref_doc_id, str) or not ref_doc_id:
            raise InvalidInputError(f"ref_doc_id must be a non-empty str, got {ref_doc_id!r}")
        ids = self._retriever.document_ids(where={REF_DOC_KEY: ref_doc_id})
        if ids:
            self._retriever.delete(ids)

    async def adelete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        await asyncio.to_thread(self.delete, ref_doc_id)

    def _matching_ids(self, node_ids: Sequence[str] | None,
                      filters: MetadataFilters | None) -> list[str]:
        where = metadata_filters_to_where(filters)
        if node_ids is None:
            return self._retriever.document_ids(where=where)
        ids = [d.id for d in self._retriever.get(node_ids)]
        if where is not None:
            allowed = set(self._retriever.document_ids(where=where))
            ids = [i for i in ids if i in allowed]
        return ids

    def delete_nodes(self, node_ids: list[str] | None = None,
                     filters: MetadataFilters | None = None, **delete_kwargs: Any) -> None:
        """Delete nodes by id and/or filter (both given: nodes matching both)."""
        if node_ids is None and filters is None:
            raise InvalidInputError("delete_nodes needs node_ids and/or filters; use clear() to "
                                    "delete every node")
        ids = self._matching_ids(node_ids, filters)
        if ids:
            self._retriever.delete(ids)

    def clear(self) -> None:
        """Delete every node."""
        ids = self._retriever.document_ids()
        if ids:
            self._retriever.delete(ids)

    def get_nodes(self, node_ids: list[str] | None = None,
                  filters: MetadataFilters | None = None) -> list[BaseNode]:
        """Stored nodes by id and/or filter, whole (a chunked document put back together)."""
        return [stored_node(d) for d in self._retriever.get(self._matching_ids(node_ids, filters))]

    # -- queries -----------------------------------------------------------------------------
    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """Run a `VectorStoreQuery` in its mode (see the class doc)."""
        hits = self._hits(query, kwargs)
        return VectorStoreQueryResult(nodes=[stored_node(h.document, partial(h)) for h in hits],
                                      similarities=[h.score for h in hits],
                                      ids=[h.id for h in hits])

    async def aquery(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        return await asyncio.to_thread(self.query, query, **kwargs)

    def _hits(self, q: VectorStoreQuery, kwargs: Mapping[str, Any]) -> list[Hit]:
        """The hits of `q`; with `q.node_ids` (which `VectorStoreIndex` passes when it keeps
        the nodes itself: all of them), those of the search that are among them, the search
        widened until `similarity_top_k` are or it has no more."""
        try:
            query_mode = VectorStoreQueryMode(q.mode)
        except ValueError:
            raise InvalidInputError(f"vector_store_query_mode must be one of "
                                    f"{[m.value for m in VectorStoreQueryMode]}, got {q.mode!r}"
                                    ) from None
        want = (q.hybrid_top_k or q.similarity_top_k) if query_mode in _HYBRID_MODES \
            else q.similarity_top_k
        if not q.node_ids:
            return self._searched(q, kwargs, query_mode, want)
        # widened without the reranker (which returns at most its candidates, so a short
        # page would not mean the store has no more), then reranked as a search would be
        reranker = self._retriever.reranker
        if q.query_str is None or query_mode == VectorStoreQueryMode.MMR:
            reranker = None
        enough = want if reranker is None else max(want, reranker.config.candidates)
        allowed = set(q.node_ids)
        n = enough
        while True:
            hits = self._searched(q, kwargs, query_mode, n, rerank=False)
            kept = [h for h in hits if parent_of(h.id) in allowed]  # chunks when uncollapsed
            if len(kept) >= enough or len(hits) < n:
                break
            n *= 4
        if reranker is not None:
            kept = reranker.rerank_head(q.query_str, kept[:enough])
        return kept[:want]

    def _searched(self, q: VectorStoreQuery, kwargs: Mapping[str, Any],
                  query_mode: VectorStoreQueryMode, k: int, rerank: bool | None = None
                  ) -> list[Hit]:
        """The `k` best hits of `q` in `query_mode` (`rerank` as for `search`; never for a
        query without text)."""
        where = metadata_filters_to_where(q.filters)
        if q.doc_ids:
            by_doc = {REF_DOC_KEY: {"$in": list(q.doc_ids)}}
            where = by_doc if where is None else {"$and": [where, by_doc]}
        text = q.query_str
        if query_mode == VectorStoreQueryMode.MMR:
            # VectorIndexRetriever passes the threshold among its vector_store_kwargs
            threshold = next((t for t in (q.mmr_threshold, kwargs.get("mmr_threshold"))
                              if t is not None), 0.5)
            by_vector = text is None and q.query_embedding is not None
            prefetch = v.integer("mmr_prefetch_k", kwargs.get("mmr_prefetch_k"), optional=True,
                                 error=InvalidInputError, fix="None fetches 4 x k")
            return self._retriever.search_mmr(
                "(by vector)" if by_vector else text, k,
                fetch_k=max(prefetch or 4 * k, k), where=where,
                lambda_mult=threshold, mode="dense" if by_vector else self.default_mode,
                query_vector=q.query_embedding if by_vector else None)
        if query_mode in _HYBRID_MODES:
            mode = "hybrid"
        elif query_mode in _SPARSE_MODES:
            mode = "sparse"
        elif query_mode == VectorStoreQueryMode.DEFAULT:
            mode = self.default_mode
        else:
            raise InvalidInputError(f"vector_store_query_mode {query_mode.value!r} is not "
                                    "supported; "
                                    "use 'default', 'sparse', 'hybrid' or 'mmr'")
        weights = None
        if q.alpha is not None and mode == "hybrid":
            if not 0 <= q.alpha <= 1:
                raise InvalidInputError(f"alpha must be in [0, 1] (1: dense only, 0: BM25 only), "
                                        f"got {q.alpha!r}")
            weights = {"dense": float(q.alpha), "sparse": 1.0 - float(q.alpha)}
        vector = None
        if text is None:  # an embedding without text: dense only
            if q.query_embedding is None or mode != "dense":
                raise InvalidInputError("the query has no text; sparse and hybrid search need "
                                        "query_str")
            text, vector = "(by vector)", q.query_embedding
        return self._retriever.search(
            text, k, where=where, mode=mode, weights=weights, query_vector=vector,
            sparse_candidates=q.sparse_top_k if mode == "hybrid" else None,
            rerank=False if vector is not None else rerank)  # no text to rerank by


# -- reranker --------------------------------------------------------------------------------
_NOT_GIVEN: Any = object()


class RetrieveKitReranker(BaseNodePostprocessor):
    """Cross-encoder reranking of any retriever's nodes (a LlamaIndex node postprocessor).

    Returns new `NodeWithScore` objects, best first, scored by the cross-encoder (0..1 with
    the default sigmoid; the blend's score when ``weight`` < 1 orders them); their nodes
    are copies whose metadata gains the "rerank" stage (the cross-encoder's rank and score)
    and, with a blend, the "blend" stage in ``retrievekit_ranks`` / ``retrievekit_scores``.
    The input nodes and scores are left as they were. Emits LlamaIndex's `ReRankStartEvent` / `ReRankEndEvent` and the RERANKING
    callback event.

    Args:
        model: a cross-encoder name or local directory (default: ms-marco-MiniLM-L-6-v2).
        reranker: a ready `retrievekit.rerank.Reranker` to share its model (e.g.
            ``HybridRetriever.reranker``); then `model` must be left out or agree.
        top_n: keep at most this many (None: the reranker's own ``top_n``, by default all).
        threshold: drop nodes whose cross-encoder score is below it (None: the reranker's own
            ``threshold``).
        metadata_mode: which view of the node is scored; "none" (default) scores the text
            alone, as the core does; "embed" also scores the metadata, as LlamaIndex's
            `SentenceTransformerRerank` does.
        keep_retrieval_score: keep the score from before reranking in
            ``metadata["retrieval_score"]`` of the copy.
        batch_size, max_length, device, dtype, weight: as in `RerankConfig` (when building a
            model); ``weight < 1`` fuses the cross-encoder's rank with the incoming order.
    """

    model: str = Field(default=DEFAULT_RERANKER, description="Cross-encoder name or path.")
    top_n: int | None = Field(default=None, description="Nodes to keep (None: all).")
    threshold: float | None = Field(default=None, description="Drop nodes scoring below.")
    metadata_mode: MetadataMode = Field(default=MetadataMode.NONE,
                                        description="The view of the node that is scored.")
    keep_retrieval_score: bool = Field(default=False,
                                       description="Keep the earlier score in the metadata.")

    _reranker: Reranker = PrivateAttr()

    def __init__(self, model: str | None = None, *, reranker: Any = _NOT_GIVEN,
                 top_n: int | None = None, threshold: float | None = None,
                 metadata_mode: MetadataMode | str = MetadataMode.NONE,
                 keep_retrieval_score: bool = False, **kwargs: Any) -> None:
        build = {k: kwargs.pop(k) for k in ("batch_size", "max_length", "device", "dtype",
                                            "weight") if k in kwargs}
        if reranker is None:  # e.g. hr.reranker of a retriever that has none
            raise ConfigError("reranker=None: the HybridRetriever has no reranker configured; "
                              "pass model='<cross-encoder name or path>', or configure one with "
                              "HybridRetriever(reranker=...)")
        if reranker is not _NOT_GIVEN:
            if not isinstance(reranker, Reranker):
                raise ConfigError(f"reranker must be a retrievekit Reranker, got "
                                  f"{type(reranker).__name__}")
            if model is not None and str(model) != reranker.config.model or build:
                raise ConfigError("pass either reranker= or model= (and its build settings "
                                  f"{sorted(build)}), not both")
            core = reranker
        else:
            core = Reranker(RerankConfig(model=str(model or DEFAULT_RERANKER), **build))
        v.integer("top_n", top_n, optional=True)
        v.number("threshold", threshold, optional=True)
        try:
            mode = MetadataMode(metadata_mode)
        except ValueError as exc:
            raise ConfigError(f"metadata_mode must be one of "
                              f"{[m.value for m in MetadataMode]}, got {metadata_mode!r}") from exc
        super().__init__(model=core.config.model, top_n=top_n, threshold=threshold,
                         metadata_mode=mode, keep_retrieval_score=keep_retrieval_score,
                         **kwargs)
        self._reranker = core

    @classmethod
    def class_name(cls) -> str:
        return "RetrieveKitReranker"

    @property
    def reranker(self) -> Reranker:
        """The core `Reranker` (its model loads on first use)."""
        return self._reranker

    def _postprocess_nodes(self, nodes: list[NodeWithScore],
                           query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        if query_bundle is None:
            raise InvalidInputError("RetrieveKitReranker needs the query: call "
                                    "postprocess_nodes(nodes, query_str=...) or query_bundle=")
        nodes = list(nodes)
        top_n = self.top_n if self.top_n is not None else self._reranker.config.top_n
        dispatcher.event(ReRankStartEvent(query=query_bundle, nodes=nodes,
                                          top_n=top_n if top_n is not None else len(nodes),
                                          model_name=self.model))
        with self.callback_manager.event(
                CBEventType.RERANKING,
                payload={EventPayload.NODES: nodes, EventPayload.MODEL_NAME: self.model,
                         EventPayload.QUERY_STR: query_bundle.query_str,
                         EventPayload.TOP_K: top_n}) as event:
            texts = [n.node.get_content(metadata_mode=self.metadata_mode) for n in nodes]
            ranked = self._reranker.rank(query_bundle.query_str, texts, top_n=self.top_n,
                                         threshold=self.threshold) if texts else []
            out = [self._reranked(nodes[r.index], r) for r in ranked]
            event.on_end(payload={EventPayload.NODES: out})
        dispatcher.event(ReRankEndEvent(nodes=out))
        return out

    def _reranked(self, src: NodeWithScore, ranked: Ranked) -> NodeWithScore:
        node = src.node
        meta = dict(node.metadata)
        ranks = meta.get(RANKS_KEY)
        scores = meta.get(SCORES_KEY)
        meta[RANKS_KEY] = {**(ranks if isinstance(ranks, Mapping) else {}),
                           "rerank": ranked.rerank_rank}
        meta[SCORES_KEY] = {**(scores if isinstance(scores, Mapping) else {}),
                            "rerank": ranked.rerank_score}
        if ranked.blend_rank is not None:  # the order, and the node's score, are the blend's
            meta[RANKS_KEY]["blend"] = ranked.blend_rank
            meta[SCORES_KEY]["blend"] = ranked.score
        else:  # an earlier rerank's blend is no longer the order
            meta[RANKS_KEY].pop("blend", None)
            meta[SCORES_KEY].pop("blend", None)
        if self.keep_retrieval_score:
            meta[RETRIEVAL_SCORE_KEY] = src.score
        hidden = [RANKS_KEY, SCORES_KEY]
        copy = node.model_copy(update={
            "metadata": meta,
            "excluded_embed_metadata_keys": _with(node.excluded_embed_metadata_keys, hidden),
            "excluded_llm_metadata_keys": _with(node.excluded_llm_metadata_keys, hidden),
        })
        return NodeWithScore(node=copy, score=ranked.score)


def _with(keys: Sequence[str], extra: Sequence[str]) -> list[str]:
    return list(keys) + [k for k in extra if k not in keys]
