"""LangChain adapters: a vector store, embeddings, a retriever that is also a `DocumentIndex`,
and a reranker.

Only `langchain_core` is imported, and only when this module is (``import retrievekit`` does
not load it). The adapters convert types and call the core; the retrieval itself is
`retrievekit.pipeline.HybridRetriever`'s.

Metadata of retrieved documents (`RetrieveKitRetriever`):
    ``id``: the document id (also ``Document.id``), unless the document's own metadata has an
    ``id`` key, which is kept; the document's own metadata; plus
    ``score``: the final score the results are ordered by (rerank, else fused, else the
    single side's score), unless the document's own metadata has a ``score`` key, which is
    kept; ``retrievekit_ranks``: ``{stage: 1-based rank}`` and ``retrievekit_scores``:
    ``{stage: score}`` for the stages the hit went through ("dense", "sparse", "fused",
    "rerank"); ``retrievekit_chunk_id``: the stored chunk that matched (the document id when
    the document was not chunked); ``retrievekit_added``: which of ``id`` and ``score`` the
    search added. The ``retrievekit_*`` keys overwrite user metadata keys of the same name in
    the returned copy (never in the store); added again, a document drops them and the keys
    ``retrievekit_added`` names.

Ids of indexed LangChain documents: ``Document.id`` when set, else a stable hash of the text
and the metadata (see `document_id`), so re-adding the same document is a no-op and equal
texts from different sources stay apart.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .errors import ConfigError, InvalidInputError, MissingDependencyError

try:
    from langchain_core.callbacks import (AsyncCallbackManagerForRetrieverRun, Callbacks,
                                          CallbackManagerForRetrieverRun)
    from langchain_core.documents import BaseDocumentCompressor
    from langchain_core.documents import Document as LCDocument
    from langchain_core.embeddings import Embeddings
    from langchain_core.indexing import DeleteResponse, DocumentIndex, UpsertResponse
    from langchain_core.vectorstores import VectorStore
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        "retrievekit.langchain needs langchain-core: pip install 'retrievekit[langchain]' "
        "(or pip install langchain-core)") from exc

from pydantic import ConfigDict, PrivateAttr, ValidationError, field_validator

from .adapters import (BUILD_KEYS, CHUNK_ID_KEY, RANKS_KEY, SCORES_KEY,  # noqa: F401
                       ClosesOwnRetriever, indexable, open_retriever, partial, result_metadata)
from . import validate as v
from .config import MODES, RetrieverConfig
from .embedding import Embedder, EmbedderConfig
from .filters import validate_where
from .pipeline import HybridRetriever
from .rerank import Reranker
from .types import Document, Hit

__all__ = ["RetrieveKitEmbeddings", "RetrieveKitReranker", "RetrieveKitRetriever",
           "RetrieveKitVectorStore"]

#: Metadata key of the final score on documents the retriever returns.
SCORE_KEY = "score"
#: Metadata key of the document id on documents the retriever returns (unless the document's
#: own metadata has that key): what `EnsembleRetriever(id_key="id")` dedups by.
ID_KEY = "id"
#: Metadata key listing which of `ID_KEY` and `SCORE_KEY` a returned document got from the
#: search (a key of the document's own is never replaced): added again, it drops just those.
ADDED_KEY = "retrievekit_added"
#: Metadata key the reranker writes its score to.
RELEVANCE_KEY = "relevance_score"

_EMBEDDER_KEYS = tuple(EmbedderConfig.__dataclass_fields__)
_SEARCH_KWARGS = ("k", "where", "mode", "rerank")


class _Unset:
    """Default of the call-time search options: use the retriever's field."""

    def __repr__(self) -> str:
        return "<field value>"


_UNSET: Any = _Unset()


# -- embeddings ------------------------------------------------------------------------------
class RetrieveKitEmbeddings(Embeddings):
    """LangChain `Embeddings` over retrievekit's `Embedder` (prefix, truncate, normalize).

    `embed_documents` uses the document prefix and `embed_query` the query prefix, so the
    vectors equal the ones `HybridRetriever` stores and searches with.

    Args:
        embedder: a ready `Embedder` (e.g. ``HybridRetriever.embedder``) to share its model.
        **config: instead of `embedder`, the fields of `EmbedderConfig` (model,
            query_prefix, document_prefix, truncate_dim, normalize, device, dtype,
            batch_size). The model loads on first use.
    """

    def __init__(self, embedder: Embedder | None = None, **config: Any) -> None:
        if embedder is not None:
            if config:
                raise ConfigError(
                    f"pass either embedder= or EmbedderConfig fields, not both (got embedder "
                    f"and {sorted(config)}); to change settings build Embedder(**fields)")
            if not isinstance(embedder, Embedder):
                raise ConfigError(f"embedder must be a retrievekit Embedder, got "
                                  f"{type(embedder).__name__}")
            self.embedder = embedder
            return
        unknown = set(config) - set(_EMBEDDER_KEYS)
        if unknown:
            raise ConfigError(f"unknown RetrieveKitEmbeddings arguments {sorted(unknown)}; "
                              f"valid: embedder or {list(_EMBEDDER_KEYS)}")
        self.embedder = Embedder(EmbedderConfig(**config))

    def __repr__(self) -> str:
        return f"RetrieveKitEmbeddings(model={self.embedder.config.model!r})"

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed passages with the document prefix."""
        return self.embedder.embed_documents(texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        """Embed a query with the query prefix."""
        return self.embedder.embed_query(text).tolist()

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """`embed_documents` in a worker thread, so the event loop keeps running."""
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        """`embed_query` in a worker thread, so the event loop keeps running."""
        return await asyncio.to_thread(self.embed_query, text)


def _build_model(init: Any, data: Mapping[str, Any]) -> None:
    """Run a pydantic constructor; its ValidationError becomes a ConfigError naming each
    field, like every other setting of retrievekit."""
    try:
        init(**data)
    except ValidationError as exc:
        parts = []
        for e in exc.errors():
            msg = str(e["msg"]).removeprefix("Value error, ")
            field = ".".join(map(str, e["loc"]))
            parts.append(msg if msg.startswith(field) else
                         f"{field}: {msg}, got {v.shown(e.get('input'))}")
        raise ConfigError("; ".join(parts)) from exc


# -- conversions -----------------------------------------------------------------------------
def document_id(doc: LCDocument) -> str:
    """The id a LangChain document is stored under: ``doc.id`` when set, else the first 32
    hex chars of sha256 over the text and the metadata (as sorted JSON)."""
    if doc.id is not None:
        return doc.id
    # surrogatepass: a text that is not valid Unicode is refused by the core, not here
    h = hashlib.sha256(str(doc.page_content).encode("utf-8", "surrogatepass"))
    h.update(b"\0")
    try:
        meta = json.dumps(doc.metadata, sort_keys=True, default=repr)
    except TypeError:  # keys of several types do not sort
        raise InvalidInputError(f"metadata keys must be str, got "
                                f"{v.shown(list(doc.metadata))}") from None
    h.update(meta.encode("utf-8"))
    return h.hexdigest()[:32]


def to_core(docs: Sequence[LCDocument], ids: Sequence[str | None] | None = None
            ) -> list[Document]:
    """LangChain documents -> core documents, under `ids` where given (None entries and no
    `ids`: `document_id`); validates the types."""
    if isinstance(docs, (LCDocument, str, bytes, Mapping)) or not isinstance(docs, Iterable):
        raise InvalidInputError(f"documents must be a list of LangChain Documents, got "
                                f"{v.shown(docs)}; wrap the single document in a list")
    docs = list(docs)
    if ids is not None and len(ids) != len(docs):
        raise InvalidInputError(f"ids has {len(ids)} entries for {len(docs)} documents; pass "
                                "one id per document")
    out = []
    for i, d in enumerate(docs):
        if not isinstance(d, LCDocument):
            raise InvalidInputError(f"documents[{i}] must be a langchain_core Document, got "
                                    f"{type(d).__name__}")
        doc_id = ids[i] if ids is not None and ids[i] is not None else document_id(d)
        added = d.metadata.get(ADDED_KEY)
        searched = {x for x in added if x in (ID_KEY, SCORE_KEY)} \
            if isinstance(added, list) else set()
        # a document the retriever returned: drop what the search added
        meta = {k: x for k, x in d.metadata.items() if k != ADDED_KEY and k not in searched}
        out.append(Document(text=d.page_content, id=doc_id,
                            metadata=indexable(meta, doc_id, f"documents[{i}]")))
    return out


def hit_to_document(hit: Hit) -> LCDocument:
    """A core `Hit` -> a LangChain `Document` carrying the scores in its metadata: the id
    and the final score where the document's own metadata has no key of that name, and
    the result keys."""
    own = hit.document.metadata
    added = {k: x for k, x in ((ID_KEY, hit.id), (SCORE_KEY, hit.score)) if k not in own}
    meta = {**own, **added, **result_metadata(hit), ADDED_KEY: list(added)}
    return LCDocument(page_content=hit.document.text, metadata=meta, id=hit.id)


def stored_document(doc: Document, extra: Mapping[str, Any] | None = None) -> LCDocument:
    """A core document as stored (its own metadata, no scores) -> a LangChain `Document`;
    `extra`: `adapters.partial` of the hit that showed it."""
    return LCDocument(page_content=doc.text, metadata={**doc.metadata, **(extra or {})},
                      id=doc.id)


# -- retriever / document index ----------------------------------------------------------------
class RetrieveKitRetriever(ClosesOwnRetriever, DocumentIndex):
    """Hybrid BM25 + dense (+ rerank) retrieval as a LangChain retriever and `DocumentIndex`.

    Build it around a `HybridRetriever` (``RetrieveKitRetriever(retriever=hr)``), or let it
    build one: ``RetrieveKitRetriever(config=<RetrieverConfig | dict | TOML path>, path=...,
    collection=..., embedder=..., reranker=...)``; a retriever it built is closed by `close()`.

    Search options are fields and may be overridden per call, e.g.
    ``retriever.invoke(q, k=3, where={"lang": "en"}, mode="sparse")``; a call-time value
    replaces the field's (filters are not merged).

    Args:
        retriever: the `HybridRetriever` to search and write to.
        k: documents to return (default 4).
        where: a Chroma metadata filter applied to the dense and the BM25 side alike.
        mode: "hybrid", "dense" or "sparse" (None: the retriever's configured mode).
        rerank: rerank with the retriever's cross-encoder (None: when one is configured).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: HybridRetriever
    k: int = 4
    where: dict[str, Any] | None = None
    mode: str | None = None
    rerank: bool | None = None

    _owned: bool = PrivateAttr(default=False)

    def __init__(self, **data: Any) -> None:
        unknown = sorted(set(data) - set(type(self).model_fields) - set(BUILD_KEYS)
                         - {"config"})
        if unknown:  # pydantic would drop them silently (a filter ignored is a wrong answer)
            hints = {"search_kwargs": "pass k= and where= directly", "top_k": "use k=",
                     "filter": "use where=", "filters": "use where=", "search_type":
                     "use mode= ('hybrid', 'dense' or 'sparse')"}
            fix = "; ".join(f"{k}: {hints[k]}" for k in unknown if k in hints)
            raise ConfigError(f"RetrieveKitRetriever got unknown options {unknown}"
                              f"{'; ' + fix if fix else ''}; valid: "
                              f"{sorted(set(type(self).model_fields) | set(BUILD_KEYS))}")
        build = {key: data.pop(key) for key in BUILD_KEYS
                 if key in data and key not in type(self).model_fields}
        data["retriever"], owned = open_retriever(data.get("retriever"), data.pop("config", None),
                                                  build, "RetrieveKitRetriever")
        try:
            _build_model(super().__init__, data)
        except BaseException:
            if owned:
                data["retriever"].close()
            raise
        self._owned = owned

    @field_validator("k", mode="before")
    @classmethod
    def _check_k(cls, k: int) -> int:
        return v.integer("k", k, error=InvalidInputError)

    @field_validator("mode", mode="before")
    @classmethod
    def _check_mode(cls, mode: str | None) -> str | None:
        return mode if mode is None else v.choice("mode", mode, MODES, error=InvalidInputError)

    @field_validator("rerank", mode="before")
    @classmethod
    def _check_rerank(cls, rerank: bool | None) -> bool | None:
        # before pydantic, which would read "no" or 0 as False
        return v.boolean("rerank", rerank, optional=True, error=InvalidInputError,
                         fix="None reranks when a reranker is configured")

    @field_validator("where", mode="before")
    @classmethod
    def _check_where(cls, where: Any) -> Any:
        validate_where(where)  # refused now, not at the first search
        return where

    # -- search ------------------------------------------------------------------------------
    def _search_args(self, k: int | None, where: Any, mode: Any, rerank: Any,
                     extra: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Call-time values where given, else the fields'."""
        extra.pop("verbose", None)  # BaseRetriever.invoke leaves it in for its callbacks
        if extra:
            hint = "; use where= for a metadata filter" if "filter" in extra else ""
            raise InvalidInputError(f"unknown search arguments {sorted(extra)}; valid: "
                                    f"{list(_SEARCH_KWARGS)}{hint}")
        return (self.k if k is None else k,
                {"where": self.where if where is _UNSET else where,
                 "mode": self.mode if mode is _UNSET else mode,
                 "rerank": self.rerank if rerank is _UNSET else rerank})

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None, where: Any = _UNSET, mode: Any = _UNSET,
                                rerank: Any = _UNSET, **kwargs: Any) -> list[LCDocument]:
        """Search; `k`, `where`, `mode`, `rerank` override the fields for this call
        (``where=None`` searches without the field's filter)."""
        n, options = self._search_args(k, where, mode, rerank, kwargs)
        return [hit_to_document(h) for h in self.retriever.search(query, n, **options)]

    async def _aget_relevant_documents(self, query: str, *,
                                       run_manager: AsyncCallbackManagerForRetrieverRun,
                                       k: int | None = None, where: Any = _UNSET,
                                       mode: Any = _UNSET, rerank: Any = _UNSET,
                                       **kwargs: Any) -> list[LCDocument]:
        """`_get_relevant_documents` through `HybridRetriever.asearch` (a worker thread)."""
        n, options = self._search_args(k, where, mode, rerank, kwargs)
        hits = await self.retriever.asearch(query, n, **options)
        return [hit_to_document(h) for h in hits]

    # -- writes ------------------------------------------------------------------------------
    def add_documents(self, documents: Sequence[LCDocument], **kwargs: Any) -> list[str]:
        """Index LangChain documents (loader or splitter output); returns their ids.

        Ids: ``Document.id`` when set, else a hash of text and metadata (`document_id`).
        Metadata values must be str, int, float, bool or lists of one of those.
        ``progress`` and ``batch_records`` go to `HybridRetriever.add_documents`.
        """
        options = _write_options(kwargs, ("progress", "batch_records"),
                                 "ids: set Document.id on each document")
        return self.retriever.add_documents(to_core(documents), **options)

    async def aadd_documents(self, documents: Sequence[LCDocument], **kwargs: Any) -> list[str]:
        docs = list(documents) if isinstance(documents, Iterator) else documents
        return await asyncio.to_thread(self.add_documents, docs, **kwargs)

    def upsert(self, items: Sequence[LCDocument], /, **kwargs: Any) -> UpsertResponse:
        """`DocumentIndex.upsert`: insert or replace by id. The batch is validated before
        anything is written, so an invalid item raises instead of being reported failed."""
        return {"succeeded": self.add_documents(items, **kwargs), "failed": []}

    async def aupsert(self, items: Sequence[LCDocument], /, **kwargs: Any) -> UpsertResponse:
        return await asyncio.to_thread(self.upsert, list(items), **kwargs)

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> DeleteResponse:
        """Delete documents (all their chunks) by id; unknown ids are not failures."""
        if ids is None:
            raise InvalidInputError("delete needs ids=[...]; to drop a whole store, delete its "
                                    "collection or directory")
        if kwargs:
            raise InvalidInputError(f"delete takes only ids, got {sorted(kwargs)}")
        ids = list(ids) if isinstance(ids, Iterator) else ids
        present = {d.id for d in self.retriever.get(ids)}  # refuses a str, non-str ids
        ids = list(dict.fromkeys(ids))
        self.retriever.delete(ids)
        done = [i for i in ids if i in present]
        return {"num_deleted": len(done), "succeeded": done, "failed": [], "num_failed": 0}

    async def adelete(self, ids: list[str] | None = None, **kwargs: Any) -> DeleteResponse:
        return await asyncio.to_thread(self.delete, ids, **kwargs)

    def get(self, ids: Sequence[str], /, **kwargs: Any) -> list[LCDocument]:
        """Documents by id with their own metadata (no scores); unknown ids are skipped."""
        if kwargs:
            raise InvalidInputError(f"get takes only ids, got {sorted(kwargs)}")
        return [stored_document(d) for d in self.retriever.get(ids)]  # refuses None, a str, ...

    async def aget(self, ids: Sequence[str], /, **kwargs: Any) -> list[LCDocument]:
        ids = list(ids) if isinstance(ids, Iterator) else ids
        return await asyncio.to_thread(self.get, ids, **kwargs)


# -- vector store ----------------------------------------------------------------------------
#: langchain-chroma's constructor names, accepted so code written for `Chroma` runs unchanged
_CHROMA_NAMES = {"collection_name": "collection", "persist_directory": "path"}
_VS_SEARCH = ("filter", "where", "mode", "rerank", "weights")


class RetrieveKitVectorStore(ClosesOwnRetriever, VectorStore):
    """A LangChain `VectorStore` whose searches are retrievekit's: hybrid (BM25 + dense,
    fused), dense or sparse, with the store's own model, prefixes and chunking.

    Code written for langchain-chroma runs as is: ``from_documents``, ``add_texts``,
    ``add_documents(ids=...)``, ``similarity_search(_with_score | _with_relevance_scores)``,
    ``max_marginal_relevance_search``, ``as_retriever(search_type="similarity" | "mmr" |
    "similarity_score_threshold")``, ``filter=`` (a Chroma ``where`` dict), ``get_by_ids``,
    ``delete``, and the async variants.

    Args:
        retriever: a `HybridRetriever` to work on (closing it stays the caller's), or
        config / path / collection / model / embedder / reranker / ...: settings of the one
            this store builds and closes in `close()` (`HybridRetriever`'s arguments; also
            langchain-chroma's ``collection_name`` and ``persist_directory``).
        embedding: a `RetrieveKitEmbeddings` to share its model (or ``embedding_function``,
            langchain-chroma's name). Other LangChain embeddings are refused: the store
            embeds with its own model, whose settings it records.
        retrieval_mode: "hybrid" (default), "dense" or "sparse"; ``mode=`` per call.

    Scores: `similarity_search_with_score` returns the hit's final score (higher is better:
    fused score in hybrid mode, cosine similarity in dense mode, BM25 in sparse mode, the
    cross-encoder's when reranked). Relevance scores are in [0, 1] (`HybridRetriever.relevance`);
    sparse mode has none, since BM25 scores have no upper bound.
    """

    def __init__(self, retriever: HybridRetriever | None = None, *, config: Any = None,
                 embedding: Any = None, retrieval_mode: str | None = None,
                 **build: Any) -> None:
        if "embedding_function" in build:
            if embedding is not None:
                raise ConfigError("pass embedding= or embedding_function=, not both")
            embedding = build.pop("embedding_function")
        for theirs, ours in _CHROMA_NAMES.items():
            if theirs in build:
                if ours in build:
                    raise ConfigError(f"pass {ours}= or {theirs}=, not both")
                build[ours] = build.pop(theirs)
        if embedding is not None:
            if not isinstance(embedding, RetrieveKitEmbeddings):
                raise ConfigError(
                    f"embedding must be a RetrieveKitEmbeddings (the store embeds with its own "
                    f"model and records its settings), got {type(embedding).__name__}; pass "
                    f"model='<sentence-transformers name or path>' instead")
            if "embedder" in build:
                raise ConfigError("pass embedding= or embedder=, not both")
            build["embedder"] = embedding.embedder
        if retrieval_mode is not None and retrieval_mode not in MODES:
            raise ConfigError(f"retrieval_mode must be one of {list(MODES)}, got "
                              f"{retrieval_mode!r}")
        self.retriever, self._owned = open_retriever(retriever, config, build,
                                                     "RetrieveKitVectorStore")
        self.retrieval_mode = retrieval_mode or self.retriever.config.mode

    @property
    def embeddings(self) -> RetrieveKitEmbeddings:
        """The store's model as LangChain `Embeddings` (query and document prefixes)."""
        return RetrieveKitEmbeddings(self.retriever.embedder)

    # -- writes ------------------------------------------------------------------------------
    def add_texts(self, texts: Iterable[str], metadatas: list[dict] | None = None, *,
                  ids: list[str] | None = None, **kwargs: Any) -> list[str]:
        """Index texts (insert or replace by id); returns their ids. Without ids, a text's
        id is a hash of text and metadata (`document_id`)."""
        texts = _list_arg(texts, "texts")
        metadatas = [{}] * len(texts) if metadatas is None else _list_arg(metadatas, "metadatas")
        if len(metadatas) != len(texts):
            raise InvalidInputError(f"metadatas has {len(metadatas)} entries for {len(texts)} "
                                    "texts; pass one dict per text (or none)")
        docs = [LCDocument(page_content=t, metadata=m if m is not None else {})
                for t, m in zip(texts, metadatas)]
        return self.add_documents(docs, ids=ids, **kwargs)

    def add_documents(self, documents: list[LCDocument], **kwargs: Any) -> list[str]:
        """Index LangChain documents; ids from ``ids=`` (None entries allowed), else
        ``Document.id``, else a hash of text and metadata. Returns the ids.

        ``progress`` and ``batch_records`` go to `HybridRetriever.add_documents`.
        ``batch_size`` (which LangChain's indexing API passes) is checked and otherwise
        unused: the add is streamed in bounded batches already (``batch_records``)."""
        ids = kwargs.pop("ids", None)
        batch_size = kwargs.pop("batch_size", None)
        v.integer("batch_size", batch_size, 1, optional=True, error=InvalidInputError)
        options = _write_options(kwargs, ("progress", "batch_records"))
        docs = to_core(documents, None if ids is None else _list_arg(ids, "ids"))
        return self.retriever.add_documents(docs, **options)

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool:
        """Delete documents (all their chunks) by id; unknown ids are skipped."""
        if ids is None:
            raise InvalidInputError("delete needs ids=[...]; to drop a whole store, delete its "
                                    "collection or directory")
        if kwargs:
            raise InvalidInputError(f"delete takes only ids, got {sorted(kwargs)}")
        self.retriever.delete(ids)
        return True

    def get_by_ids(self, ids: Sequence[str], /) -> list[LCDocument]:
        """Documents by id, with their own metadata; unknown ids are skipped."""
        return [stored_document(d) for d in self.retriever.get(ids)]

    # -- search ------------------------------------------------------------------------------
    def _search(self, query: str, k: int, kwargs: dict[str, Any]) -> list[Hit]:
        where = _where(kwargs, _VS_SEARCH)
        return self.retriever.search(query, k, where=where,
                                     mode=kwargs.get("mode") or self.retrieval_mode,
                                     rerank=kwargs.get("rerank"), weights=kwargs.get("weights"))

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[LCDocument]:
        """The `k` best documents for `query` (``filter=``, ``mode=``, ``rerank=``,
        ``weights=`` per call)."""
        return [stored_document(h.document, partial(h)) for h in self._search(query, k, kwargs)]

    def similarity_search_with_score(self, query: str, k: int = 4, **kwargs: Any
                                     ) -> list[tuple[LCDocument, float]]:
        """`similarity_search` with each hit's final score (higher is better)."""
        return [(stored_document(h.document, partial(h)), h.score)
                for h in self._search(query, k, kwargs)]

    def _similarity_search_with_relevance_scores(self, query: str, k: int = 4, **kwargs: Any
                                                 ) -> list[tuple[LCDocument, float]]:
        return [(stored_document(h.document, partial(h)),
                 self.retriever.relevance(h, weights=kwargs.get("weights")))
                for h in self._search(query, k, kwargs)]

    async def _asimilarity_search_with_relevance_scores(self, query: str, k: int = 4,
                                                        **kwargs: Any
                                                        ) -> list[tuple[LCDocument, float]]:
        return await asyncio.to_thread(self._similarity_search_with_relevance_scores, query, k,
                                       **kwargs)

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4, **kwargs: Any
                                    ) -> list[LCDocument]:
        """Dense search with a query vector from this store's `embeddings.embed_query`."""
        where = _vector_where(kwargs)
        hits = self.retriever.search("(by vector)", k, mode="dense", rerank=False, where=where,
                                     query_vector=embedding)
        return [stored_document(h.document, partial(h)) for h in hits]

    def max_marginal_relevance_search_by_vector(self, embedding: list[float], k: int = 4,
                                                fetch_k: int = 20, lambda_mult: float = 0.5,
                                                **kwargs: Any) -> list[LCDocument]:
        """`max_marginal_relevance_search` from a query vector (`embeddings.embed_query`):
        the candidates come from the dense side, which alone can search by vector."""
        where = _vector_where(kwargs)
        hits = self.retriever.search_mmr("(by vector)", k, fetch_k=fetch_k,
                                         lambda_mult=lambda_mult, where=where, mode="dense",
                                         query_vector=embedding)
        return [stored_document(h.document, partial(h)) for h in hits]

    def max_marginal_relevance_search(self, query: str, k: int = 4, fetch_k: int = 20,
                                      lambda_mult: float = 0.5, **kwargs: Any
                                      ) -> list[LCDocument]:
        """`k` documents out of the `fetch_k` best, picked for relevance and diversity
        (`HybridRetriever.search_mmr`; candidates found in the store's retrieval mode)."""
        where = _where(kwargs, ("filter", "where", "mode"))
        hits = self.retriever.search_mmr(query, k, fetch_k=fetch_k, lambda_mult=lambda_mult,
                                         where=where,
                                         mode=kwargs.get("mode") or self.retrieval_mode)
        return [stored_document(h.document, partial(h)) for h in hits]

    # -- construction (the async variants of the rest: the base class runs them in a thread) --
    @classmethod
    def from_texts(cls, texts: list[str], embedding: Any = None,
                   metadatas: list[dict] | None = None, *, ids: list[str] | None = None,
                   **kwargs: Any) -> "RetrieveKitVectorStore":
        """A store (built from `kwargs`, as the constructor's) holding `texts`."""
        store = cls(embedding=embedding, **kwargs)
        try:
            store.add_texts(texts, metadatas, ids=ids)
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def from_documents(cls, documents: list[LCDocument], embedding: Any = None,
                       **kwargs: Any) -> "RetrieveKitVectorStore":
        """A store (built from `kwargs`, as the constructor's) holding `documents`."""
        ids = kwargs.pop("ids", None)
        store = cls(embedding=embedding, **kwargs)
        try:
            store.add_documents(list(documents), ids=ids)
        except BaseException:
            store.close()
            raise
        return store


def _where(kwargs: Mapping[str, Any], valid: Sequence[str]) -> Any:
    """The filter of a vector-store search: ``filter=`` (langchain-chroma's name) or
    ``where=``, not both; any argument outside `valid` is refused."""
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise InvalidInputError(f"unknown search arguments {unknown}; valid: {list(valid)} "
                                "(filter= is a Chroma where dict)")
    if "filter" in kwargs and "where" in kwargs:
        raise InvalidInputError("pass filter= or where= (the same thing), not both")
    return kwargs.get("filter", kwargs.get("where"))


def _vector_where(kwargs: Mapping[str, Any]) -> Any:
    """The filter of a search by vector, which is dense (``mode="dense"`` or none)."""
    if kwargs.get("mode", "dense") != "dense":
        raise InvalidInputError("a search by vector is dense; it has no text for BM25")
    return _where(kwargs, ("filter", "where", "mode"))


def _write_options(kwargs: Mapping[str, Any], valid: Sequence[str], hint: str = ""
                   ) -> dict[str, Any]:
    """The keyword arguments of a write that go to `HybridRetriever.add_documents`."""
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise InvalidInputError(f"add_documents got unknown arguments {unknown}; valid: "
                                f"{list(valid)}{'; ' + hint if hint else ''}")
    return dict(kwargs)


def _list_arg(value: Any, name: str) -> list[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise InvalidInputError(f"{name} must be a list, got {type(value).__name__}; wrap a "
                                "single value in a list")
    return list(value)


# -- reranker -------------------------------------------------------------------------------
class RetrieveKitReranker(BaseDocumentCompressor):
    """Cross-encoder reranking of any retriever's documents (a `BaseDocumentCompressor`).

    Returns new documents, best first, with the cross-encoder's score in
    ``metadata["relevance_score"]`` (also when a blend, ``weight`` < 1, orders them); the
    input documents are not changed.

    Args:
        reranker: a ready `retrievekit.rerank.Reranker`, or
        model: a cross-encoder name or local directory to build one from.
        top_n: keep at most this many (default 3, as LangChain's `CrossEncoderReranker`;
            None: the reranker's own `top_n` setting, by default all).
        score_threshold: drop documents scoring below it (None: the reranker's own
            `threshold`; scores are 0..1 unless the reranker's `sigmoid` is off).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    reranker: Reranker
    top_n: int | None = 3
    score_threshold: float | None = None

    def __init__(self, **data: Any) -> None:
        model = data.pop("model", None)
        if model is not None:
            if data.get("reranker") is not None:
                raise ConfigError("pass either reranker= or model=, not both")
            if not isinstance(model, (str, Path)):
                raise ConfigError(f"model must be a cross-encoder name or directory, got "
                                  f"{type(model).__name__}")
            data["reranker"] = Reranker(model=str(model))
        elif data.get("reranker") is None:
            raise ConfigError("RetrieveKitReranker needs reranker=Reranker(...) or "
                              "model='<cross-encoder name or path>'")
        elif not isinstance(data["reranker"], Reranker):
            raise ConfigError(f"reranker must be a retrievekit Reranker, got "
                              f"{type(data['reranker']).__name__}")
        _build_model(super().__init__, data)

    @field_validator("top_n", mode="before")
    @classmethod
    def _check_top_n(cls, top_n: int | None) -> int | None:
        return v.integer("top_n", top_n, optional=True, error=InvalidInputError)

    def compress_documents(self, documents: Sequence[LCDocument], query: str,
                           callbacks: Callbacks | None = None) -> list[LCDocument]:
        """Rerank `documents` for `query`; returns copies with ``relevance_score`` set."""
        docs = list(documents)
        if not docs:
            return []
        ranked = self.reranker.rank(query, [d.page_content for d in docs], top_n=self.top_n,
                                    threshold=self.score_threshold)
        return [LCDocument(page_content=docs[r.index].page_content, id=docs[r.index].id,
                           metadata={**docs[r.index].metadata, RELEVANCE_KEY: r.rerank_score})
                for r in ranked]

    async def acompress_documents(self, documents: Sequence[LCDocument], query: str,
                                  callbacks: Callbacks | None = None) -> list[LCDocument]:
        return await asyncio.to_thread(self.compress_documents, list(documents), query)
