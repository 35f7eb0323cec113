"""LlamaIndex adapters: an embedding model, a retriever and a node postprocessor (reranker).

Only `llama_index.core` is imported, and only when this module is (``import retrievekit``
does not load it). The adapters convert types and call the core; retrieval itself is
`retrievekit.pipeline.HybridRetriever`'s.

Retrieved nodes (`RetrieveKitRetriever`):
    ``NodeWithScore(node=TextNode(id_=<document id>, text=<text of the best chunk>, ...),
    score=<final score>)``. The node's metadata is the document's own metadata (keys sorted,
    since Chroma returns them in no fixed order) plus ``retrievekit_ranks``
    (``{stage: 1-based rank}``), ``retrievekit_scores`` (``{stage: score}``) for the stages
    the hit went through ("dense", "sparse", "fused", "rerank") and ``retrievekit_chunk_id``
    (the stored chunk that matched; the document id when the document was not chunked). The
    same keys as `retrievekit.langchain`. They are excluded from the embed and LLM views of
    the node (so they reach neither prompts nor cross-encoders) and from the node's `hash`,
    which LlamaIndex's `QueryFusionRetriever` dedups by: the same document found by two
    retrievekit retrievers (say a dense and a sparse one) is one node there.

Indexed nodes (`RetrieveKitRetriever.insert_nodes` / `add_documents`):
    id: ``node.node_id`` (for a LlamaIndex `Document`, its ``doc_id``); re-inserting the same
    node is a no-op, a changed one replaces the old. `SentenceSplitter` gives its nodes random
    ids unless you pass it ``id_func``, so splitting the same document twice makes new nodes;
    use `delete_ref_doc` to drop the old ones.
    text: ``node.get_content(metadata_mode=MetadataMode.NONE)`` -- the text alone, as the core
    embeds and tokenizes it (LlamaIndex's own vector stores embed metadata with the text).
    metadata, flattened for Chroma: nested dicts become dotted keys (``{"author": {"name":
    "x"}}`` -> ``{"author.name": "x"}``, filterable as such); None values, empty lists and
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
    from llama_index.core.vector_stores.types import (FilterCondition, FilterOperator,
                                                      MetadataFilter, MetadataFilters)
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        "retrievekit.llama_index needs llama-index-core: pip install 'retrievekit[llama-index]' "
        "(or pip install llama-index-core)") from exc

from . import validate as v
from .config import MODES
from .embedding import DEFAULT_MODEL, Embedder, EmbedderConfig
from .pipeline import HybridRetriever
from .prefixes import Prefixes
from .rerank import DEFAULT_RERANKER, RerankConfig, Reranker
from .store import clean_metadata
from .types import Document, Hit

__all__ = ["RetrieveKitEmbedding", "RetrieveKitNode", "RetrieveKitReranker",
           "RetrieveKitRetriever", "hit_to_node", "metadata_filters_to_where",
           "nodes_to_documents"]

dispatcher = instrument.get_dispatcher(__name__)

#: Metadata keys the retriever (and the reranker) add to returned nodes.
RANKS_KEY = "retrievekit_ranks"
SCORES_KEY = "retrievekit_scores"
CHUNK_ID_KEY = "retrievekit_chunk_id"
RESULT_KEYS = (RANKS_KEY, SCORES_KEY, CHUNK_ID_KEY)
#: Metadata key a node's source document id is stored under.
REF_DOC_KEY = "ref_doc_id"
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
    dtype: str = Field(default="float32", description="float32, bfloat16, float16 or auto.")

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
        meta = {k: self.metadata[k] for k in sorted(self.metadata) if k not in RESULT_KEYS}
        return sha256((str(self.text) + str(meta)).encode("utf-8", "surrogatepass")).hexdigest()


def hit_to_node(hit: Hit) -> NodeWithScore:
    """A core `Hit` -> a `NodeWithScore` (score = the hit's final score; see module doc)."""
    meta = {k: hit.document.metadata[k] for k in sorted(hit.document.metadata)}
    ref = meta.pop(REF_DOC_KEY, None)
    meta[RANKS_KEY] = dict(hit.ranks)
    meta[SCORES_KEY] = dict(hit.scores)
    meta[CHUNK_ID_KEY] = hit.chunk_id if hit.chunk_id is not None else hit.id
    relationships = {NodeRelationship.SOURCE: RelatedNodeInfo(node_id=str(ref))} if ref else {}
    node = RetrieveKitNode(id_=hit.id, text=hit.document.text, metadata=meta,
                           relationships=relationships,
                           excluded_embed_metadata_keys=list(RESULT_KEYS),
                           excluded_llm_metadata_keys=list(RESULT_KEYS))
    return NodeWithScore(node=node, score=hit.score)


def flatten_metadata(metadata: Mapping[str, Any], node_id: str) -> dict[str, Any]:
    """Metadata Chroma can hold, per the policy in the module doc; raises InvalidInputError."""
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
    return clean_metadata(out, f"node {node_id!r}")


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
        meta = {k: v for k, v in n.metadata.items() if k not in RESULT_KEYS}
        source = n.source_node
        if source is not None and source.node_id:
            meta[REF_DOC_KEY] = source.node_id
        out.append(Document(text=n.get_content(metadata_mode=MetadataMode.NONE), id=n.node_id,
                            metadata=flatten_metadata(meta, n.node_id)))
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
    is unwrapped and an empty one dropped (None when nothing is left).

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
    return _combine("$and" if condition == FilterCondition.AND else "$or",
                    [p for p in parts if p is not None])


def _as_where(where: Any, name: str) -> dict[str, Any] | None:
    if where is None or isinstance(where, (MetadataFilters, MetadataFilter)):
        return metadata_filters_to_where(where)
    if isinstance(where, Mapping):
        return dict(where) or None
    raise InvalidInputError(f"{name} must be a Chroma where dict (e.g. {{'lang': 'en'}}) or "
                            f"LlamaIndex MetadataFilters, got {type(where).__name__}")


# -- retriever -------------------------------------------------------------------------------
def _query(query: Any) -> str | QueryBundle:
    """Refuse a query LlamaIndex would fail on in its own event validation."""
    if not isinstance(query, QueryBundle):
        v.readable("query", query, "pass the text to search for (or a QueryBundle)")
    return query


class RetrieveKitRetriever(BaseRetriever):
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
        if filters is not None and not isinstance(filters, (MetadataFilters, MetadataFilter)):
            raise InvalidInputError(f"filters must be LlamaIndex MetadataFilters, got "
                                    f"{type(filters).__name__}; pass a Chroma dict as where=")
        parts = [p for p in (_as_where(where, "where"), _as_where(filters, "filters")) if p]
        self.retriever = retriever
        self._owned = False
        self.similarity_top_k = similarity_top_k
        self.where: dict[str, Any] | None = _combine("$and", parts)
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

    def close(self) -> None:
        """Close the `HybridRetriever` if `from_defaults` built it (a passed-in one is the
        caller's to close)."""
        if self._owned:
            self.retriever.close()

    def __enter__(self) -> "RetrieveKitRetriever":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

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


# -- reranker --------------------------------------------------------------------------------
class RetrieveKitReranker(BaseNodePostprocessor):
    """Cross-encoder reranking of any retriever's nodes (a LlamaIndex node postprocessor).

    Returns new `NodeWithScore` objects, best first, scored by the cross-encoder (0..1 with
    the default sigmoid); their nodes are copies whose metadata gains the "rerank" stage in
    ``retrievekit_ranks`` / ``retrievekit_scores``. The input nodes and scores are left as
    they were. Emits LlamaIndex's `ReRankStartEvent` / `ReRankEndEvent` and the RERANKING
    callback event.

    Args:
        model: a cross-encoder name or local directory (default: ms-marco-MiniLM-L-6-v2).
        reranker: a ready `retrievekit.rerank.Reranker` to share its model (e.g.
            ``HybridRetriever.reranker``); then `model` must be left out or agree.
        top_n: keep at most this many (None: the reranker's own ``top_n``, by default all).
        threshold: drop nodes scoring below it (None: the reranker's own ``threshold``).
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

    def __init__(self, model: str | None = None, *, reranker: Reranker | None = None,
                 top_n: int | None = None, threshold: float | None = None,
                 metadata_mode: MetadataMode | str = MetadataMode.NONE,
                 keep_retrieval_score: bool = False, **kwargs: Any) -> None:
        build = {k: kwargs.pop(k) for k in ("batch_size", "max_length", "device", "dtype",
                                            "weight") if k in kwargs}
        if reranker is not None:
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
            # positions as ids: input nodes may repeat an id
            hits = [Hit(Document(text=n.node.get_content(metadata_mode=self.metadata_mode),
                                 id=str(i)), score=0.0) for i, n in enumerate(nodes)]
            ranked = self._reranker.rerank(query_bundle.query_str, hits, top_n=self.top_n,
                                           threshold=self.threshold) if hits else []
            out = [self._reranked(nodes[int(h.id)], h) for h in ranked]
            event.on_end(payload={EventPayload.NODES: out})
        dispatcher.event(ReRankEndEvent(nodes=out))
        return out

    def _reranked(self, src: NodeWithScore, hit: Hit) -> NodeWithScore:
        node = src.node
        meta = dict(node.metadata)
        ranks = meta.get(RANKS_KEY)
        scores = meta.get(SCORES_KEY)
        meta[RANKS_KEY] = {**(ranks if isinstance(ranks, Mapping) else {}),
                           "rerank": hit.ranks["rerank"]}
        meta[SCORES_KEY] = {**(scores if isinstance(scores, Mapping) else {}),
                            "rerank": hit.score}
        if self.keep_retrieval_score:
            meta[RETRIEVAL_SCORE_KEY] = src.score
        hidden = [RANKS_KEY, SCORES_KEY]
        copy = node.model_copy(update={
            "metadata": meta,
            "excluded_embed_metadata_keys": _with(node.excluded_embed_metadata_keys, hidden),
            "excluded_llm_metadata_keys": _with(node.excluded_llm_metadata_keys, hidden),
        })
        return NodeWithScore(node=copy, score=hit.score)


def _with(keys: Sequence[str], extra: Sequence[str]) -> list[str]:
    return list(keys) + [k for k in extra if k not in keys]
