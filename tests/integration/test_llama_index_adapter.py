"""LlamaIndex adapters end to end: bundled MiniLM, real in-memory Chroma, real LlamaIndex parts
(VectorStoreIndex, IngestionPipeline, RetrieverQueryEngine, QueryFusionRetriever, MockLLM)."""

from __future__ import annotations

import copy
from dataclasses import replace
import datetime
import re
import subprocess
import sys
import uuid

import numpy as np
import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Settings, VectorStoreIndex  # noqa: E402
from llama_index.core import Document as LIDocument  # noqa: E402
from llama_index.core.ingestion import IngestionPipeline  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402
from llama_index.core.instrumentation.events.rerank import (ReRankEndEvent,  # noqa: E402
                                                            ReRankStartEvent)
from llama_index.core.llms import MockLLM  # noqa: E402
from llama_index.core.node_parser import SentenceSplitter  # noqa: E402
from llama_index.core.query_engine import RetrieverQueryEngine  # noqa: E402
from llama_index.core.retrievers import QueryFusionRetriever  # noqa: E402
from llama_index.core.schema import (MetadataMode, NodeRelationship, NodeWithScore,  # noqa: E402
                                     TextNode)
from llama_index.core.vector_stores.types import (FilterCondition,  # noqa: E402
                                                  FilterOperator, MetadataFilter,
                                                  MetadataFilters)

import retrievekit.llama_index as rk_li  # noqa: E402
from retrievekit.embedding import Embedder  # noqa: E402
from retrievekit.errors import ConfigError, InvalidInputError  # noqa: E402
from retrievekit.llama_index import (RetrieveKitEmbedding, RetrieveKitNode,  # noqa: E402
                                     RetrieveKitReranker, RetrieveKitRetriever,
                                     metadata_filters_to_where, nodes_to_documents)
from retrievekit.pipeline import HybridRetriever  # noqa: E402
from retrievekit.prefixes import Prefixes  # noqa: E402
from retrievekit.rerank import Reranker  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _f(key, value, op="=="):
    return MetadataFilter(key=key, value=value, operator=FilterOperator(op))


@pytest.fixture
def hybrid(embedder, corpus_docs):
    """An in-memory HybridRetriever with the 8 corpus documents."""
    r = HybridRetriever(path=":memory:", collection=f"li-{uuid.uuid4().hex[:12]}",
                        embedder=embedder)
    r.add_documents(corpus_docs)
    yield r
    r.close()


@pytest.fixture
def li_docs(corpus_docs):
    """The corpus as LlamaIndex Documents (metadata keys sorted, see the fusion test)."""
    return [LIDocument(id_=d.id, text=d.text, metadata=dict(sorted(d.metadata.items())))
            for d in corpus_docs]


@pytest.fixture
def events():
    """LlamaIndex instrumentation events seen by a real handler on the root dispatcher."""

    class Collect(BaseEventHandler):
        seen: list = []

        def handle(self, event, **kwargs):
            self.seen.append(event)

    handler = Collect(seen=[])
    root = get_dispatcher()
    root.add_event_handler(handler)
    yield handler.seen
    root.event_handlers.remove(handler)


# -- module surface ------------------------------------------------------------------------------
def test_import_retrievekit_does_not_load_llama_index():
    code = ("import sys, retrievekit; retrievekit.HybridRetriever; retrievekit.Reranker; "
            "print(sorted(m for m in sys.modules if m.startswith('llama_index')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_all_is_pinned():
    assert sorted(rk_li.__all__) == [
        "RetrieveKitEmbedding", "RetrieveKitNode", "RetrieveKitReranker", "RetrieveKitRetriever",
        "RetrieveKitVectorStore", "hit_to_node", "metadata_filters_to_where",
        "nodes_to_documents"]


# -- MetadataFilters -> Chroma where -------------------------------------------------------------
@pytest.mark.parametrize("op, value, expected", [
    ("==", "code", {"topic": {"$eq": "code"}}),
    ("!=", "code", {"topic": {"$ne": "code"}}),
    (">", 2021, {"topic": {"$gt": 2021}}),
    (">=", 2021, {"topic": {"$gte": 2021}}),
    ("<", 2.5, {"topic": {"$lt": 2.5}}),
    ("<=", 2021, {"topic": {"$lte": 2021}}),
    ("in", ["a", "b"], {"topic": {"$in": ["a", "b"]}}),
    ("nin", [1, 2], {"topic": {"$nin": [1, 2]}}),
    ("contains", "x", {"topic": {"$contains": "x"}}),
    ("any", ["x", "y"], {"$or": [{"topic": {"$contains": "x"}}, {"topic": {"$contains": "y"}}]}),
    ("all", ["x", "y"], {"$and": [{"topic": {"$contains": "x"}},
                                  {"topic": {"$contains": "y"}}]}),
    ("any", ["x"], {"topic": {"$contains": "x"}}),
])
def test_each_operator_translates(op, value, expected):
    assert metadata_filters_to_where(MetadataFilters(filters=[_f("topic", value, op)])) == expected


def test_conditions_and_nesting_translate():
    filters = MetadataFilters(condition=FilterCondition.OR, filters=[
        _f("topic", "code"),
        MetadataFilters(filters=[_f("year", 2021, ">="), _f("lang", ["en", "fr"], "in")]),
        MetadataFilters(filters=[_f("topic", "food")]),  # a group of one is unwrapped
    ])
    assert metadata_filters_to_where(filters) == {"$or": [
        {"topic": {"$eq": "code"}},
        {"$and": [{"year": {"$gte": 2021}}, {"lang": {"$in": ["en", "fr"]}}]},
        {"topic": {"$eq": "food"}},
    ]}
    # an empty group matches everything, as in LlamaIndex: dropped from an AND; an OR
    # holding one matches everything too (it was dropped there, and the OR narrowed)
    empty = MetadataFilters(filters=[])
    assert metadata_filters_to_where(MetadataFilters(filters=[_f("topic", "code"), empty])) \
        == {"topic": {"$eq": "code"}}
    assert metadata_filters_to_where(MetadataFilters(
        condition=FilterCondition.OR, filters=[_f("topic", "code"), empty])) is None
    assert metadata_filters_to_where(empty) is None
    assert metadata_filters_to_where(None) is None


@pytest.mark.parametrize("op", ["text_match", "text_match_insensitive", "is_empty"])
def test_unsupported_operator_is_named(op):
    with pytest.raises(InvalidInputError, match=FilterOperator(op).name):
        metadata_filters_to_where(MetadataFilters(filters=[_f("topic", "x", op)]))


def test_not_condition_and_bad_values_raise():
    with pytest.raises(InvalidInputError, match="NOT"):
        metadata_filters_to_where(MetadataFilters(filters=[_f("topic", "x")],
                                                  condition=FilterCondition.NOT))
    with pytest.raises(InvalidInputError, match="IN on 'lang' needs a non-empty list"):
        metadata_filters_to_where(MetadataFilters(filters=[_f("lang", "en", "in")]))
    with pytest.raises(InvalidInputError, match="single value"):
        metadata_filters_to_where(MetadataFilters(filters=[_f("lang", ["en"], "==")]))
    with pytest.raises(InvalidInputError, match="None"):
        metadata_filters_to_where(MetadataFilters(filters=[_f("lang", None)]))


# -- nodes -> core documents ---------------------------------------------------------------------
def test_node_metadata_is_flattened_for_chroma():
    node = TextNode(id_="n1", text="hello", metadata={
        "author": {"name": "Ada", "born": {"year": 1815}}, "skip": None, "empty": [],
        "tags": ("a", "b"), "n": 3, "retrievekit_ranks": {"dense": 1}})
    (doc,) = nodes_to_documents([node])
    assert doc.id == "n1" and doc.text == "hello"
    assert dict(doc.metadata) == {
        "author.name": "Ada", "author.born.year": 1815, "tags": ["a", "b"], "n": 3,
        "_li_key_order": ["author.name", "author.born.year", "tags", "n"]}
    assert node.metadata["tags"] == ("a", "b")  # the caller's node is untouched


def test_unstorable_metadata_raises_naming_node_and_key():
    node = TextNode(id_="n2", text="x", metadata={"when": datetime.date(2024, 1, 1)})
    with pytest.raises(InvalidInputError, match=r"node 'n2'.*'when'.*date"):
        nodes_to_documents([node])
    clash = TextNode(id_="n3", text="x", metadata={"a.b": 1, "a": {"b": 2}})
    with pytest.raises(InvalidInputError, match="'a.b'"):
        nodes_to_documents([clash])
    with pytest.raises(InvalidInputError, match="wrap"):
        nodes_to_documents(node)


# -- embeddings ----------------------------------------------------------------------------------
def test_embedding_uses_query_and_document_prefixes_from_the_core(st_oracle):
    emb = RetrieveKitEmbedding(MODEL, query_prefix="query: ", document_prefix="passage: ",
                               dtype="float32")
    assert emb.prefixes == Prefixes("query: ", "passage: ", "user", "user")
    assert emb.class_name() == "RetrieveKitEmbedding"
    text = "Dogs are loyal companions"
    raw = st_oracle.encode(["query: " + text, "passage: " + text], convert_to_numpy=True)
    raw = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    q = np.array(emb.get_query_embedding(text))
    (d,) = np.array(emb.get_text_embedding_batch([text]))
    np.testing.assert_allclose(q, raw[0], atol=1e-5)
    np.testing.assert_allclose(d, raw[1], atol=1e-5)
    assert not np.allclose(q, d, atol=1e-3)


async def test_embedding_batch_and_async_paths_agree(embedder):
    emb = RetrieveKitEmbedding(embedder=embedder, embed_batch_size=2)
    assert emb.model_name == MODEL and emb.embed_batch_size == 2
    texts = ["cats purr", "rust is safe", "tea has catechins"]
    sync = np.array(emb.get_text_embedding_batch(texts))
    np.testing.assert_allclose(sync, embedder.embed_documents(texts), atol=1e-6)
    np.testing.assert_allclose(np.array(await emb.aget_text_embedding_batch(texts)), sync,
                               atol=1e-6)
    q = await emb._aget_query_embedding("purring cats")
    np.testing.assert_allclose(q, emb.get_query_embedding("purring cats"), atol=1e-6)
    np.testing.assert_allclose(await emb.aget_query_embedding("purring cats"), q, atol=1e-6)


def test_embedding_config_round_trip_and_conflicts(embedder):
    emb = RetrieveKitEmbedding(embedder=embedder)
    again = RetrieveKitEmbedding.from_dict(emb.to_dict())
    assert again.to_dict() == emb.to_dict()
    with pytest.raises(ConfigError, match="truncate_dim"):
        RetrieveKitEmbedding(embedder=embedder, truncate_dim=64)
    with pytest.raises(ConfigError, match="truncate_dim"):
        RetrieveKitEmbedding(MODEL, truncate_dim=0)


def test_vector_store_index_with_our_embedding_via_settings(embedder, li_docs):
    emb = RetrieveKitEmbedding(embedder=embedder)
    previous = Settings._embed_model
    Settings.embed_model = emb
    try:
        index = VectorStoreIndex.from_documents(li_docs)  # no embed_model: Settings' is used
    finally:
        Settings._embed_model = previous
    nodes = index.as_retriever(similarity_top_k=2).retrieve("memory safety without a garbage "
                                                             "collector")
    assert nodes[0].node.ref_doc_id == "rust"
    assert index._embed_model is emb


def test_ingestion_pipeline_then_our_retriever(embedder, tmp_path):
    emb = RetrieveKitEmbedding(embedder=embedder)
    doc = LIDocument(id_="guide", text=(
        "Sourdough needs a lively starter. Feed it flour and water every day. "
        "The bulk ferment takes many hours at room temperature. "
        "Bake the loaf in a very hot Dutch oven for a crisp crust."),
        metadata={"source": {"kind": "book", "page": 12}, "tags": ["baking", "bread"]})
    pipeline = IngestionPipeline(transformations=[
        SentenceSplitter(chunk_size=48, chunk_overlap=0), emb])
    nodes = pipeline.run(documents=[doc])
    assert [n.text.split()[0] for n in nodes] == ["Sourdough", "The", "Bake"]
    for n in nodes:
        expected = embedder.embed_documents([n.get_content(metadata_mode=MetadataMode.EMBED)])[0]
        np.testing.assert_allclose(n.embedding, expected, atol=1e-6)

    with HybridRetriever(path=str(tmp_path / "store"), embedder=embedder) as hr:
        ours = RetrieveKitRetriever(hr, similarity_top_k=1)
        assert ours.insert_nodes(nodes) == [n.node_id for n in nodes]
        assert ours.insert_nodes(nodes) == [n.node_id for n in nodes]  # idempotent
        assert hr.count() == len(nodes)
        best = ours.retrieve("hot Dutch oven crust")[0]
        assert best.node.node_id == nodes[-1].node_id
        assert best.node.source_node.node_id == "guide"
        assert best.node.metadata["source.page"] == 12
        assert "ref_doc_id" not in best.node.metadata
        # list metadata filters through CONTAINS / ANY
        tagged = RetrieveKitRetriever(hr, similarity_top_k=10, filters=MetadataFilters(
            filters=[_f("tags", ["cakes", "bread"], "any")]))
        assert len(tagged.retrieve("starter")) == len(nodes)
        none = RetrieveKitRetriever(hr, filters=MetadataFilters(
            filters=[_f("tags", "cakes", "contains")]))
        assert none.retrieve("starter") == []
        assert ours.delete_ref_doc("guide") == len(nodes)
        assert hr.count() == 0


# -- retriever -----------------------------------------------------------------------------------
def test_retriever_returns_nodes_with_ids_scores_and_stage_ranks(hybrid):
    ours = RetrieveKitRetriever(hybrid, similarity_top_k=3)
    got = ours.retrieve("XQ7-42")
    hits = hybrid.search("XQ7-42", 3)
    assert [n.node.node_id for n in got] == [h.id for h in hits] and got[0].node.node_id == "xq7"
    for n, h in zip(got, hits):
        assert isinstance(n, NodeWithScore) and isinstance(n.node, TextNode)
        assert n.score == h.score and n.node.text == h.document.text
        meta = n.node.metadata
        assert meta["retrievekit_ranks"] == dict(h.ranks)
        assert meta["retrievekit_scores"] == dict(h.scores)
        assert meta["retrievekit_chunk_id"] == h.id
        assert {k: meta[k] for k in ("topic", "lang", "year")} == dict(h.document.metadata)
        # the ranks reach neither the LLM nor an embedding / cross-encoder
        assert "retrievekit" not in n.node.get_content(metadata_mode=MetadataMode.LLM)
        assert "retrievekit" not in n.node.get_content(metadata_mode=MetadataMode.EMBED)
    assert got[0].node.metadata["retrievekit_ranks"]["sparse"] == 1


def test_where_dict_and_metadata_filters_filter_end_to_end(hybrid):
    query = "programming language"
    by_dict = RetrieveKitRetriever(hybrid, where={"$and": [{"topic": "code"},
                                                          {"year": {"$gte": 2023}}]})
    by_filters = RetrieveKitRetriever(hybrid, filters=MetadataFilters(
        filters=[_f("topic", "code"), _f("year", 2023, ">=")]))
    assert by_filters.where == {"$and": [{"topic": {"$eq": "code"}}, {"year": {"$gte": 2023}}]}
    assert {n.node.node_id for n in by_dict.retrieve(query)} == {"rust", "xq7"}
    assert {n.node.node_id for n in by_filters.retrieve(query)} == {"rust", "xq7"}
    either = RetrieveKitRetriever(hybrid, mode="sparse", where=MetadataFilters(
        condition=FilterCondition.OR, filters=[_f("lang", "fr"), _f("topic", ["food"], "in")]))
    assert {n.node.node_id for n in either.retrieve("the")} <= {"chat", "bread", "tea"}
    assert {n.node.node_id for n in either.retrieve("chat canapé")} == {"chat"}
    both = RetrieveKitRetriever(hybrid, where={"lang": "en"}, filters=MetadataFilters(
        filters=[_f("topic", "animals")]))
    assert {n.node.node_id for n in both.retrieve("animals")} == {"cats", "dogs"}


def test_from_defaults_builds_and_owns_its_store(embedder, li_docs, tmp_path):
    path = str(tmp_path / "owned")
    with RetrieveKitRetriever.from_defaults(path=path, embedder=embedder, similarity_top_k=2,
                                            mode="sparse") as ours:
        assert ours.add_documents(li_docs) == [d.doc_id for d in li_docs]
        assert ours.retrieve("sourdough starter")[0].node.node_id == "bread"
    assert ours.retriever.store.client is None  # closed, so the directory can be reopened
    with HybridRetriever(path=path, embedder=embedder) as again:
        assert again.count() == len(li_docs)


def test_retriever_rejects_bad_arguments(hybrid):
    with pytest.raises(InvalidInputError, match="TEXT_MATCH"):
        RetrieveKitRetriever(hybrid, filters=MetadataFilters(
            filters=[_f("topic", "co", "text_match")]))
    with pytest.raises(InvalidInputError, match="similarity_top_k"):
        RetrieveKitRetriever(hybrid, similarity_top_k=0)
    with pytest.raises(InvalidInputError, match="mode"):
        RetrieveKitRetriever(hybrid, mode="semantic")
    with pytest.raises(ConfigError, match="HybridRetriever"):
        RetrieveKitRetriever(object())


async def test_aretrieve_matches_retrieve_and_runs_off_the_loop(hybrid):
    ours = RetrieveKitRetriever(hybrid, similarity_top_k=4, mode="dense")
    sync = ours.retrieve("purring pets")
    got = await ours.aretrieve("purring pets")
    assert [(n.node.node_id, n.score) for n in got] == [(n.node.node_id, n.score) for n in sync]
    assert all(set(n.node.metadata["retrievekit_ranks"]) == {"dense"} for n in got)


# -- reranker ------------------------------------------------------------------------------------
def test_reranker_orders_by_cross_encoder_and_leaves_inputs_alone(hybrid, tiny_cross_encoder_path,
                                                                  events):
    import torch

    reranker = RetrieveKitReranker(tiny_cross_encoder_path, top_n=3, keep_retrieval_score=True)
    assert reranker.class_name() == "RetrieveKitReranker" and reranker.top_n == 3
    nodes = RetrieveKitRetriever(hybrid, similarity_top_k=6).retrieve("pets and animals")
    before = [(n, n.node, n.score, copy.deepcopy(n.node.metadata)) for n in nodes]

    out = reranker.postprocess_nodes(nodes, query_str="pets and animals")

    assert [(n, n.node, n.score, n.node.metadata) for n in nodes] == before
    # oracle: the cross-encoder itself, sigmoid of its logits
    logits = reranker.reranker.model.predict(
        [("pets and animals", n.node.text) for n in nodes], activation_fn=torch.nn.Identity())
    probs = 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))
    order = sorted(range(len(nodes)), key=lambda i: -probs[i])[:3]
    assert [n.node.node_id for n in out] == [nodes[i].node.node_id for i in order]
    for rank, (n, i) in enumerate(zip(out, order), start=1):
        # 1e-4: "auto" may score on an ONNX export another test cached (fp32, ~3e-5 apart)
        assert n.score == pytest.approx(probs[i], abs=1e-4)
        assert n.node.metadata["retrievekit_ranks"] == {**nodes[i].node.metadata[
            "retrievekit_ranks"], "rerank": rank}
        assert n.node.metadata["retrieval_score"] == nodes[i].score
        assert n.node is not nodes[i].node

    starts = [e for e in events if isinstance(e, ReRankStartEvent)]
    ends = [e for e in events if isinstance(e, ReRankEndEvent)]
    assert len(starts) == 1 and len(ends) == 1
    assert starts[0].query.query_str == "pets and animals" and starts[0].top_n == 3
    assert starts[0].model_name == tiny_cross_encoder_path
    assert [n.node.node_id for n in starts[0].nodes] == [n.node.node_id for n in nodes]
    assert [n.node.node_id for n in ends[0].nodes] == [n.node.node_id for n in out]


def test_node_ids_keep_the_chunks_of_an_uncollapsed_search(embedder):
    from llama_index.core.vector_stores.types import VectorStoreQuery

    vs = _vector_store(embedder, config={"collapse_chunks": False})
    long = " ".join(f"Sentence {i} tells of harbours, tides and cargo." for i in range(120))
    vs.add([TextNode(id_="long", text=long), TextNode(id_="short", text="Cargo ships.")])
    got = vs.query(VectorStoreQuery(query_str="cargo tides", similarity_top_k=3,
                                    node_ids=["long"]))
    assert len(got.ids) == 3 and all(i.startswith("long#chunk") for i in got.ids)
    vs.close()


def test_a_blend_keeps_the_cross_encoder_s_own_score(tiny_cross_encoder_path):
    """With weight < 1 the "rerank" score was the blend's (~0.016), not the cross-encoder's."""
    core = Reranker(model=tiny_cross_encoder_path, weight=0.5)
    texts = ["cats purr", "rust is safe", "tea is green", "bread rises"]
    nodes = [NodeWithScore(node=TextNode(id_=f"n{i}", text=t), score=1.0 - i / 10)
             for i, t in enumerate(texts)]
    ranked = {r.index: r for r in core.rank("cats", texts)}
    out = RetrieveKitReranker(reranker=core).postprocess_nodes(nodes, query_str="cats")
    for n in out:
        r = ranked[int(n.node.node_id[1:])]
        assert n.node.metadata["retrievekit_scores"] == pytest.approx(
            {"rerank": r.rerank_score, "blend": r.score})
        assert n.node.metadata["retrievekit_ranks"] == {"rerank": r.rerank_rank,
                                                        "blend": r.blend_rank}
        assert n.score == pytest.approx(r.score)
    langchain = pytest.importorskip("retrievekit.langchain")
    from langchain_core.documents import Document as LCDocument

    docs = langchain.RetrieveKitReranker(reranker=core, top_n=None).compress_documents(
        [LCDocument(page_content=t, id=f"n{i}") for i, t in enumerate(texts)], "cats")
    assert [d.metadata["relevance_score"] for d in docs] == pytest.approx(
        [ranked[int(d.id[1:])].rerank_score for d in docs])
    assert [d.id for d in docs] == [n.node.node_id for n in out]  # ordered by the blend
    again = RetrieveKitReranker(reranker=Reranker(model=tiny_cross_encoder_path)
                                ).postprocess_nodes(out, query_str="cats")
    assert all("blend" not in n.node.metadata["retrievekit_ranks"] and "blend" not in
               n.node.metadata["retrievekit_scores"] for n in again)  # not this one's order


def test_reranker_threshold_and_errors(tiny_cross_encoder_path):
    core = Reranker(model=tiny_cross_encoder_path)
    nodes = [NodeWithScore(node=TextNode(id_=f"n{i}", text=t), score=None) for i, t in
             enumerate(["cats purr", "rust is safe", "tea is green", "bread rises"])]
    probs = core.score("cats", [n.node.text for n in nodes])
    cut = float(np.median(probs))
    out = RetrieveKitReranker(reranker=core, threshold=cut).postprocess_nodes(nodes,
                                                                             query_str="cats")
    assert {n.node.node_id for n in out} == {f"n{i}" for i, p in enumerate(probs) if p >= cut}
    assert [n.score for n in out] == sorted((n.score for n in out), reverse=True)
    assert RetrieveKitReranker(reranker=core).postprocess_nodes([], query_str="cats") == []
    with pytest.raises(InvalidInputError, match="query"):
        RetrieveKitReranker(reranker=core).postprocess_nodes(nodes)
    with pytest.raises(ConfigError, match="top_n"):
        RetrieveKitReranker(reranker=core, top_n=0)
    with pytest.raises(ConfigError, match="either reranker= or model="):
        RetrieveKitReranker("other-model", reranker=core)


# -- inside LlamaIndex's own engines -------------------------------------------------------------
async def test_query_engine_with_our_retriever_and_reranker(hybrid, tiny_cross_encoder_path):
    retriever = RetrieveKitRetriever(hybrid, similarity_top_k=4)
    reranker = RetrieveKitReranker(tiny_cross_encoder_path, top_n=2)
    engine = RetrieverQueryEngine.from_args(retriever, node_postprocessors=[reranker],
                                            llm=MockLLM())
    query = "memory safety without a garbage collector"
    response = engine.query(query)
    retrieved = {n.node.node_id for n in retriever.retrieve(query)}
    assert len(response.source_nodes) == 2
    assert {n.node.node_id for n in response.source_nodes} <= retrieved
    for rank, n in enumerate(response.source_nodes, start=1):
        assert n.node.metadata["retrievekit_ranks"]["rerank"] == rank
        assert n.node.text in str(response)  # MockLLM echoes its prompt, the context included
        assert "retrievekit_ranks" not in str(response)

    aresponse = await engine.aquery(query)
    assert [(n.node.node_id, n.score) for n in aresponse.source_nodes] == \
        [(n.node.node_id, n.score) for n in response.source_nodes]


async def test_query_fusion_retriever_with_ours_and_a_vector_index(hybrid, embedder, li_docs):
    vector = VectorStoreIndex.from_documents(
        li_docs, embed_model=RetrieveKitEmbedding(embedder=embedder)).as_retriever(
        similarity_top_k=3)
    ours = RetrieveKitRetriever(hybrid, similarity_top_k=3, mode="sparse")
    fusion = QueryFusionRetriever([vector, ours], llm=MockLLM(), num_queries=1,
                                  mode="reciprocal_rerank", similarity_top_k=4, use_async=True)
    query = "XQ7-42 flux capacitor"
    nodes = await fusion.aretrieve(query)
    assert _doc_id(nodes[0]) == "xq7"
    # the same document from both sides is one node (same text and metadata, so same hash)
    expected = _rrf_by_doc(vector.retrieve(query), ours.retrieve(query))
    assert _by_doc(nodes) == pytest.approx(expected)
    assert _doc_id(fusion.retrieve(query)[0]) == "xq7"


def _doc_id(n: NodeWithScore) -> str:
    # a VectorStoreIndex node has its own id and the document's as its source
    source = n.node.source_node
    return source.node_id if source is not None else n.node.node_id


def _by_doc(nodes: list[NodeWithScore]) -> dict[str, float]:
    return {_doc_id(n): n.score for n in nodes}


def _rrf_by_doc(*lists):
    """QueryFusionRetriever's reciprocal_rerank keyed by document: sum of 1 / (60 + 0-based rank)."""
    fused: dict[str, float] = {}
    for nodes in lists:
        ranked = sorted(nodes, key=lambda n: n.score or 0.0, reverse=True)
        for rank, n in enumerate(ranked):
            fused[_doc_id(n)] = fused.get(_doc_id(n), 0.0) + 1.0 / (60 + rank)
    return fused


def test_two_of_our_retrievers_fuse_by_document(hybrid):
    dense = RetrieveKitRetriever(hybrid, similarity_top_k=5, mode="dense")
    sparse = RetrieveKitRetriever(hybrid, similarity_top_k=5, mode="sparse")
    fusion = QueryFusionRetriever([dense, sparse], llm=MockLLM(), num_queries=1,
                                  mode="reciprocal_rerank", similarity_top_k=8, use_async=False)
    query = "loyal dogs and wolves"
    fused = fusion.retrieve(query)
    # one document found by both sides is one node whose RRF score sums both ranks
    expected = _rrf_by_doc(dense.retrieve(query), sparse.retrieve(query))
    assert _by_doc(fused) == pytest.approx(expected)
    assert fused[0].node.node_id == "dogs"


def test_node_hash_ignores_result_keys():
    """The hash of a plain TextNode with the same text and metadata (key order included:
    the store keeps it), whatever the result keys say."""
    a = RetrieveKitNode(id_="x", text="t", metadata={"b": 1, "a": 2, "retrievekit_ranks": {"d": 1}})
    b = RetrieveKitNode(id_="x", text="t", metadata={"b": 1, "a": 2, "retrievekit_ranks": {"d": 9}})
    assert a.hash == b.hash == TextNode(id_="x", text="t", metadata={"b": 1, "a": 2}).hash
    assert a.hash != RetrieveKitNode(id_="x", text="t", metadata={"a": 3, "b": 1}).hash


def test_example_runs_offline_and_prints_stage_ranks(capsys):
    import importlib.util
    from pathlib import Path

    import torch

    path = Path(__file__).resolve().parents[2] / "examples" / "llamaindex_query_engine.py"
    spec = importlib.util.spec_from_file_location("llamaindex_query_engine_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        assert module.main([]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "Query: What does error E1042 mean?" in out
    sources = out.split("source nodes:")[1].splitlines()
    assert sources[1].split()[0] == "e1042" and "fused #1" in sources[1]
    assert "'locked directory' finds: ['e2001', 'e1042']" in out
    # alpha 0.5: each side weighs 0.5 and contributes at most 0.5 (dbsf)
    assert re.search(r"vector_store_query_mode='hybrid': \[\('e1042', 0\.[5-9]\d*\)", out)


# -- vector store ------------------------------------------------------------------------------
def _vector_store(embedder, **kwargs):
    return rk_li.RetrieveKitVectorStore(path=":memory:", collection=f"livs-{uuid.uuid4().hex[:12]}",
                                        embedder=embedder, **kwargs)


def test_vector_store_index_queries_in_every_mode(embedder, li_docs):
    """VectorStoreIndex over the store: built from documents through a StorageContext, then
    reopened with from_vector_store and queried in dense, sparse and hybrid mode."""
    from llama_index.core import StorageContext
    from llama_index.core.vector_stores.types import VectorStoreQueryMode

    vs = _vector_store(embedder)
    storage = StorageContext.from_defaults(vector_store=vs)
    VectorStoreIndex.from_documents(li_docs, storage_context=storage, embed_model=vs.embed_model)
    assert vs.client.count() == 8 and vs.client.verify()["ok"]
    index = VectorStoreIndex.from_vector_store(vs, embed_model=vs.embed_model)
    q = "XQ7-42 flux capacitor"
    for mode in ("default", "sparse", "hybrid", "text_search", "semantic_hybrid", "mmr"):
        got = index.as_retriever(similarity_top_k=3, vector_store_query_mode=mode).retrieve(q)
        assert got[0].node.ref_doc_id == "xq7", mode  # the splitter's node of that document
        assert len(got) == (1 if mode in ("sparse", "text_search") else 3)  # BM25: 1 matches
    stages = {mode: set(vs.client.search(q, 3, mode=m)[0].ranks)
              for mode, m in (("dense", "dense"), ("sparse", "sparse"), ("hybrid", "hybrid"))}
    assert stages == {"dense": {"dense"}, "sparse": {"sparse"},
                      "hybrid": {"dense", "sparse", "fused"}}
    hybrid = index.as_retriever(similarity_top_k=3, vector_store_query_mode="hybrid").retrieve(q)
    assert hybrid[0].score == pytest.approx(vs.client.search(q, 1)[0].score)  # the fused one
    # alpha is the dense side's weight: 1 gives the dense order, 0 the BM25 order
    p = "the flux of water"
    dense = [h.id for h in vs.client.search(p, 5, mode="dense")]
    sparse = [h.id for h in vs.client.search(p, 5, mode="sparse")]
    assert dense[0] != sparse[0]  # else the orders below prove nothing
    for alpha, order in ((1.0, dense), (0.0, sparse)):
        got = index.as_retriever(similarity_top_k=5, vector_store_query_mode="hybrid",
                                 alpha=alpha).retrieve(p)
        assert [n.node.node_id for n in got][:len(order)] == order
    # sparse_top_k bounds the BM25 side only
    one = vs.query(rk_li.VectorStoreQuery(query_str=p, similarity_top_k=5, sparse_top_k=1,
                                          mode=VectorStoreQueryMode.HYBRID))
    assert len(one.ids) == 5
    engine = index.as_query_engine(llm=MockLLM(), vector_store_query_mode="hybrid",
                                   similarity_top_k=2)
    answer = engine.query("What does the XQ7-42 error code mean?")
    assert answer.source_nodes[0].node.ref_doc_id == "xq7"
    vs.close()


def test_vector_store_filters_doc_ids_and_node_management(embedder, corpus_docs):
    from llama_index.core.vector_stores.types import VectorStoreQuery

    vs = _vector_store(embedder)
    source = LIDocument(id_="src", text="unused")
    nodes = [TextNode(id_=d.id, text=d.text, metadata=dict(d.metadata),
                      relationships={NodeRelationship.SOURCE: source.as_related_node_info()}
                      if d.metadata["topic"] == "food" else {}) for d in corpus_docs]
    assert vs.add(nodes) == [d.id for d in corpus_docs]
    code = MetadataFilters(filters=[_f("topic", "code")])
    got = vs.query(VectorStoreQuery(query_str="language", similarity_top_k=8, filters=code))
    assert set(got.ids) == {"python", "rust", "xq7"} and len(got.similarities) == 3
    by_doc = vs.query(VectorStoreQuery(query_str="bread tea", similarity_top_k=8,
                                       doc_ids=["src"]))
    assert set(by_doc.ids) == {"bread", "tea"}
    assert by_doc.nodes[0].source_node.node_id == "src"
    assert {n.node_id for n in vs.get_nodes(filters=code)} == {"python", "rust", "xq7"}
    assert [n.text for n in vs.get_nodes(node_ids=["cats", "nope"])] == [corpus_docs[0].text]
    vs.delete("src")  # by source document
    assert {n.node_id for n in vs.get_nodes()} == {d.id for d in corpus_docs} - {"bread", "tea"}
    vs.delete_nodes(node_ids=["cats", "python"], filters=code)  # both must hold
    assert "python" not in {n.node_id for n in vs.get_nodes()}
    assert "cats" in {n.node_id for n in vs.get_nodes()}
    with pytest.raises(InvalidInputError, match="clear"):
        vs.delete_nodes()
    vs.clear()
    assert vs.get_nodes() == [] and vs.client.count() == 0
    with pytest.raises(InvalidInputError, match="not supported"):
        vs.query(VectorStoreQuery(query_str="x", mode="svm"))
    with pytest.raises(InvalidInputError, match="alpha"):
        vs.query(VectorStoreQuery(query_str="x", mode="hybrid", alpha=2.0))
    vs.close()


def test_vector_store_takes_what_llama_index_s_own_retriever_passes(embedder, corpus_docs,
                                                                    tiny_cross_encoder_path):
    """VectorStoreIndex passes node_ids (all of them) when it keeps the nodes itself, and
    mmr_threshold among vector_store_kwargs; a query with an embedding and no text was
    reranked for the text "(by vector)"; MMR refused a query with no text."""
    from llama_index.core import StorageContext
    from llama_index.core.vector_stores.types import VectorStoreQuery

    vs = _vector_store(embedder, reranker=tiny_cross_encoder_path)
    nodes = [TextNode(id_=d.id, text=d.text, metadata=dict(d.metadata)) for d in corpus_docs]
    storage = StorageContext.from_defaults(vector_store=vs)
    index = VectorStoreIndex(nodes, storage_context=storage, embed_model=vs.embed_model,
                             store_nodes_override=True)
    got = index.as_retriever(similarity_top_k=3).retrieve("sourdough starter")
    assert [n.node.node_id for n in got] == vs.query(VectorStoreQuery(
        query_str="sourdough starter", similarity_top_k=3)).ids  # what all of them give
    few = vs.query(VectorStoreQuery(query_str="animals", similarity_top_k=2,
                                    node_ids=["tea", "rust", "cats"]))
    assert set(few.ids) <= {"tea", "rust", "cats"} and len(few.ids) == 2
    # past the reranker's candidates (it returns no more than those: a short page is no
    # sign that the store has no more), and the chunks of an uncollapsed search
    vs.client.reranker.config = replace(vs.client.reranker.config, candidates=2)
    last = vs.client.search("animals", 8, mode="dense", rerank=False)[-1].id
    assert vs.query(VectorStoreQuery(query_str="animals", similarity_top_k=1,
                                     node_ids=[last])).ids == [last]
    # past the candidates, hits come as a search gives them: the head reranked, the rest
    # after it in first-stage order (all of them were reranked)
    every = vs.query(VectorStoreQuery(query_str="animals", similarity_top_k=6,
                                      node_ids=[d.id for d in corpus_docs]))
    searched = vs.client.search("animals", 6, mode="dense")  # what DEFAULT means here
    assert every.ids == [h.id for h in searched]
    assert every.similarities == pytest.approx([h.score for h in searched])
    q = "programming languages"
    picks = {}
    for t in (0.0, 1.0):
        direct = vs.query(VectorStoreQuery(query_str=q, similarity_top_k=3, mmr_threshold=t,
                                           mode="mmr")).ids
        via = index.as_retriever(similarity_top_k=3, vector_store_query_mode="mmr",
                                 vector_store_kwargs={"mmr_threshold": t}).retrieve(q)
        assert [n.node.node_id for n in via] == direct
        picks[t] = direct
    assert picks[0.0] != picks[1.0]  # else the comparison above proves nothing
    vec = vs.embed_model.get_query_embedding("purring cats")
    dense = [h.id for h in vs.client.search("purring cats", 3, mode="dense", rerank=False,
                                            query_vector=vec)]
    assert vs.query(VectorStoreQuery(query_embedding=vec, similarity_top_k=3)).ids == dense
    mmr = vs.query(VectorStoreQuery(query_embedding=vec, similarity_top_k=3, mode="mmr"))
    assert mmr.ids[0] == dense[0] and len(mmr.ids) == 3
    with pytest.raises(InvalidInputError, match="mmr_prefetch_k"):  # was a TypeError
        vs.query(VectorStoreQuery(query_str="x", similarity_top_k=3, mode="mmr"),
                 mmr_prefetch_k="10")
    vs.close()


async def test_vector_store_async(embedder, corpus_docs):
    from llama_index.core.vector_stores.types import VectorStoreQuery

    vs = _vector_store(embedder, default_mode="hybrid")
    await vs.async_add([TextNode(id_=d.id, text=d.text, metadata=dict(d.metadata))
                        for d in corpus_docs])
    got = await vs.aquery(VectorStoreQuery(query_str="sourdough starter", similarity_top_k=2))
    assert got.ids[0] == "bread"
    assert "fused" in vs.client.search("sourdough starter", 1)[0].ranks
    await vs.adelete_nodes(node_ids=["bread"])
    assert [n.node_id for n in await vs.aget_nodes(node_ids=["bread"])] == []
    vs.close()


def test_reader_exclusions_survive_the_round_trip(tmp_path, embedder):
    """SimpleDirectoryReader hides file metadata from the LLM and the embedding model; the
    retrieved nodes keep hiding it (issue: file sizes and dates reached the prompt)."""
    from llama_index.core import SimpleDirectoryReader

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "kettle.txt").write_text("Kettles boil water for tea.")
    docs = SimpleDirectoryReader(str(tmp_path / "docs")).load_data()
    assert "file_size" in docs[0].excluded_llm_metadata_keys
    with RetrieveKitRetriever.from_defaults(path=":memory:", embedder=embedder,
                                            collection=f"rd-{uuid.uuid4().hex[:8]}") as r:
        r.add_documents(docs)
        node = r.retrieve("boiling water")[0].node
        assert node.metadata["file_size"] > 0
        llm_view = node.get_content(metadata_mode=MetadataMode.LLM)
        assert "file_size" not in llm_view and "creation_date" not in llm_view
        assert "file_path" in llm_view  # not excluded by the reader: still shown
        hidden = {k for k in docs[0].excluded_embed_metadata_keys if k in docs[0].metadata}
        assert hidden and hidden <= set(node.excluded_embed_metadata_keys)
        assert not any(k.startswith("_li_") for k in node.metadata)


def test_an_excluded_nested_key_stays_hidden_and_inserts_again_unchanged(embedder):
    """Exclusions name a node's keys before flattening: an excluded "author" hid neither
    "author.name" nor "author.email" once stored, and inserting the retrieved node again
    rewrote it (its recorded exclusions and key order named keys no longer there)."""
    node = TextNode(id_="n1", text="Zebra stripes on the savanna.",
                    metadata={"author": {"name": "Ann", "email": "ann@secret.example"},
                              "year": 2020},
                    excluded_llm_metadata_keys=["author"], excluded_embed_metadata_keys=["year"])
    with RetrieveKitRetriever.from_defaults(path=":memory:", embedder=embedder,
                                            collection=f"nx-{uuid.uuid4().hex[:8]}") as r:
        r.insert_nodes([node])
        got = r.retrieve("zebra")[0]
        llm = got.node.get_content(metadata_mode=MetadataMode.LLM)
        assert "ann@secret.example" not in llm and "Ann" not in llm and "2020" in llm
        embed = got.node.get_content(metadata_mode=MetadataMode.EMBED)
        assert "ann@secret.example" in embed and "2020" not in embed
        assert list(got.node.metadata)[:3] == ["author.name", "author.email", "year"]
        stored = r.retriever.get(["n1"])
        r.insert_nodes([got])
        assert r.retriever.last_add_stats["unchanged"] == 1
        assert r.retriever.get(["n1"]) == stored
        # a key of its own that reads like a nested one is not excluded with its namesake
        flat = TextNode(id_="n2", text="Zebra herds.", metadata={"a": 1, "a.b": 2, "ab": 3},
                        excluded_llm_metadata_keys=["a"])
        r.insert_nodes([flat])
        node, = [h.node for h in r.retrieve("zebra herds") if h.node.node_id == "n2"]
        assert [k for k in node.excluded_llm_metadata_keys if not k.startswith("retrievekit")] \
            == ["a"]


def test_fusion_with_another_index_dedups_unsorted_metadata(embedder, corpus_docs):
    """QueryFusionRetriever over retrievekit and a plain VectorStoreIndex of the same nodes:
    one node per document, whatever the order of the metadata keys."""
    nodes = [TextNode(id_=d.id, text=d.text,
                      metadata={"year": d.metadata["year"], "topic": d.metadata["topic"],
                                "lang": d.metadata["lang"]}) for d in corpus_docs]
    vs = _vector_store(embedder)
    vs.add(nodes)
    other = VectorStoreIndex(copy.deepcopy(nodes), embed_model=vs.embed_model)
    ours = RetrieveKitRetriever(vs.client, similarity_top_k=4)
    fusion = QueryFusionRetriever([ours, other.as_retriever(similarity_top_k=4)], llm=MockLLM(),
                                  similarity_top_k=8, num_queries=1, mode="reciprocal_rerank")
    got = [n.node.node_id for n in fusion.retrieve("programming language")]
    assert len(got) == len(set(got))
    assert list(ours.retrieve("programming language")[0].node.metadata)[:3] == \
        ["year", "topic", "lang"]
    vs.close()


def test_reranker_needs_a_model_it_can_load(hybrid, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from retrievekit.errors import ModelNotFoundError

    with pytest.raises(ConfigError, match="no reranker configured"):
        RetrieveKitReranker(reranker=hybrid.reranker)  # hybrid has none
    with pytest.raises(ModelNotFoundError, match="ms-marco-MiniLM-L-6-v2"):
        RetrieveKitReranker()  # the default cross-encoder is not cached offline


def test_filters_set_after_construction_apply(hybrid):
    r = RetrieveKitRetriever(hybrid, similarity_top_k=8)
    assert len(r.retrieve("animals")) == 8
    r.filters = MetadataFilters(filters=[_f("topic", "animals")])
    assert {n.node.node_id for n in r.retrieve("animals")} == {"cats", "dogs", "chat"}
    r.where = {"lang": "en"}
    assert {n.node.node_id for n in r.retrieve("animals")} == {"cats", "dogs"}
    with pytest.raises(InvalidInputError, match="MetadataFilters"):
        r.filters = {"topic": "animals"}
    before = r.where
    with pytest.raises(InvalidInputError, match=r"\$bad"):  # when set, not at the search
        r.where = {"$bad": 1}
    assert r.where == before


def test_a_retrieved_chunk_is_never_inserted_in_its_document_s_place(embedder):
    """A query result of a long document carries its best chunk's text under the
    document's id: inserted again, it replaced the whole document (51 records -> 1). Such
    a node carries the chunk's id (hidden from the embed and LLM views) and is refused;
    a whole one inserts again."""
    from llama_index.core.vector_stores.types import VectorStoreQuery

    vs = _vector_store(embedder)
    long = " ".join(f"Sentence {i} tells of harbours, tides and cargo." for i in range(400))
    vs.add([TextNode(id_="long", text=long), TextNode(id_="short", text="a harbour cat")])
    records = vs.client.count()
    assert records > 2
    found = vs.query(VectorStoreQuery(query_str="cargo tides", similarity_top_k=2,
                                      mode="hybrid")).nodes
    part = next(n for n in found if n.node_id == "long")
    assert part.metadata[rk_li.CHUNK_ID_KEY].startswith("long#chunk")
    for view in (MetadataMode.LLM, MetadataMode.EMBED):
        assert rk_li.CHUNK_ID_KEY not in part.get_content(metadata_mode=view)
    with pytest.raises(InvalidInputError, match="replace the whole document"):
        vs.add([part])
    retrieved = RetrieveKitRetriever(vs.client, similarity_top_k=2).retrieve("cargo tides")
    with pytest.raises(InvalidInputError, match="replace the whole document"):
        vs.add([n for n in retrieved if n.node.node_id == "long"])
    vs.add([n for n in found if n.node_id == "short"])  # whole: inserted again, unchanged
    assert vs.client.count() == records and vs.client.get(["long"])[0].text == long
    vs.close()


def test_hybrid_top_k_counts_in_hybrid_mode_only(embedder, li_docs):
    """It was applied in every mode (dense, sparse and MMR queries returned it)."""
    from llama_index.core.vector_stores.types import VectorStoreQuery

    vs = _vector_store(embedder)
    vs.add([TextNode(id_=d.id_, text=d.text) for d in li_docs])
    for mode, n in (("default", 2), ("mmr", 2), ("hybrid", 6)):
        got = vs.query(VectorStoreQuery(query_str="animals and code", similarity_top_k=2,
                                        hybrid_top_k=6, mode=mode))
        assert len(got.nodes) == n, mode
    vs.close()


def test_a_filter_chroma_would_refuse_is_refused_when_set(hybrid):
    r = RetrieveKitRetriever(hybrid, similarity_top_k=8)
    with pytest.raises(InvalidInputError, match=r"\$gt compares numbers only"):
        r.filters = MetadataFilters(filters=[_f("topic", "code", ">")])
    assert r.filters is None
