"""The LangChain adapters end to end: bundled MiniLM, real Chroma, real cross-encoder.

The standard suites live in tests/contract/test_langchain_standard.py; these tests check
what they do not: prefixes, metadata keys, call-time options, the indexing API keeping both
sides in step, the reranker, and an LCEL RAG chain.
"""

from __future__ import annotations

import asyncio
import copy
import subprocess
import sys
import uuid

import numpy as np
import pytest

pytest.importorskip("langchain_core")

from langchain_core.documents import Document as LCDocument  # noqa: E402
from langchain_core.indexing import InMemoryRecordManager, aindex, index  # noqa: E402
from langchain_core.language_models import FakeListChatModel  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.runnables import (RunnableLambda, RunnableParallel,  # noqa: E402
                                      RunnablePassthrough)
from langchain_core.vectorstores import InMemoryVectorStore  # noqa: E402

from retrievekit.errors import ConfigError, InvalidInputError  # noqa: E402
from retrievekit.langchain import (RetrieveKitEmbeddings, RetrieveKitReranker,  # noqa: E402
                                   RetrieveKitRetriever, document_id)
from retrievekit.pipeline import HybridRetriever  # noqa: E402
from retrievekit.rerank import Reranker  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _memory(embedder, **kwargs) -> HybridRetriever:
    return HybridRetriever(path=":memory:", collection=f"lca-{uuid.uuid4().hex[:12]}",
                           embedder=embedder, **kwargs)


def _lc(corpus_docs) -> list[LCDocument]:
    return [LCDocument(page_content=d.text, id=d.id, metadata=dict(d.metadata))
            for d in corpus_docs]


async def _loop_ticks_while(coro):
    """Run `coro` as a task and count event-loop turns until it is done: a call that
    blocks the loop finishes within the first turn, one in a worker thread does not."""
    task = asyncio.ensure_future(coro)
    ticks = 0
    while not task.done():
        ticks += 1
        await asyncio.sleep(0)
    return task.result(), ticks


@pytest.fixture(scope="module")
def tiny_reranker(tiny_cross_encoder_path):
    r = Reranker(model=tiny_cross_encoder_path)
    _ = r.model
    return r


# -- embeddings ------------------------------------------------------------------------------
def test_embeddings_prefix_truncate_normalize_against_sentence_transformers(st_oracle):
    emb = RetrieveKitEmbeddings(model=MODEL, query_prefix="query: ",
                                document_prefix="passage: ", truncate_dim=128,
                                dtype="float32")
    st = st_oracle  # same weights, used as the independent oracle

    def oracle(text: str) -> np.ndarray:
        v = st.encode([text], convert_to_numpy=True, normalize_embeddings=False)[0][:128]
        return v / np.linalg.norm(v)

    q = emb.embed_query("sourdough starter")
    d = emb.embed_documents(["sourdough starter", "green tea"])
    assert isinstance(q, list) and isinstance(q[0], float) and len(q) == 128
    assert np.allclose(q, oracle("query: sourdough starter"), atol=1e-5)
    assert np.allclose(d[0], oracle("passage: sourdough starter"), atol=1e-5)
    assert np.allclose(d[1], oracle("passage: green tea"), atol=1e-5)
    assert not np.allclose(q, d[0], atol=1e-3)  # the two prefixes really differ


def test_embeddings_share_an_embedder_and_reject_bad_arguments(embedder):
    emb = RetrieveKitEmbeddings(embedder=embedder)
    assert emb.embedder is embedder
    assert np.allclose(emb.embed_documents(["x y"])[0], embedder.embed_documents(["x y"])[0])
    with pytest.raises(ConfigError, match="not both"):
        RetrieveKitEmbeddings(embedder=embedder, truncate_dim=64)
    with pytest.raises(ConfigError, match="query_prefix"):
        RetrieveKitEmbeddings(model=MODEL, qeury_prefix="q: ")
    with pytest.raises(ConfigError, match="Embedder"):
        RetrieveKitEmbeddings(embedder="all-MiniLM")
    with pytest.raises(InvalidInputError, match="wrap it in a list"):
        emb.embed_documents("one string")


async def test_async_embeddings_match_and_leave_the_loop_running(embedder):
    emb = RetrieveKitEmbeddings(embedder=embedder)
    texts = [f"passage number {i} about tea and bread" for i in range(16)]
    vecs, ticks = await _loop_ticks_while(emb.aembed_documents(texts))
    assert ticks > 2
    assert np.allclose(vecs, emb.embed_documents(texts), atol=1e-6)
    q, ticks = await _loop_ticks_while(emb.aembed_query("tea"))
    assert ticks > 2
    assert np.allclose(q, emb.embed_query("tea"), atol=1e-6)


def test_embeddings_drive_langchains_in_memory_vector_store(embedder, corpus_docs):
    emb = RetrieveKitEmbeddings(embedder=embedder)
    store = InMemoryVectorStore(embedding=emb)
    store.add_documents(_lc(corpus_docs))
    top = store.similarity_search("which pet purrs and hunts mice?", k=1)
    assert top[0].id == "cats"
    stored = store.store["rust"]["vector"]
    assert np.allclose(stored, embedder.embed_documents([corpus_docs[3].text])[0], atol=1e-6)


# -- retriever -------------------------------------------------------------------------------
def test_documents_carry_id_metadata_and_the_cores_scores(retriever):
    lc = RetrieveKitRetriever(retriever=retriever)
    docs = lc.invoke("the flux capacitor error code XQ7-42", k=3)
    hits = retriever.search("the flux capacitor error code XQ7-42", k=3)
    assert [d.id for d in docs] == [h.id for h in hits]
    assert docs[0].id == "xq7"
    for d, h in zip(docs, hits):
        assert d.page_content == h.document.text
        assert d.metadata["score"] == pytest.approx(h.score)
        assert d.metadata["retrievekit_ranks"] == dict(h.ranks)
        assert d.metadata["retrievekit_scores"] == pytest.approx(dict(h.scores))
        assert d.metadata["retrievekit_chunk_id"] == h.id
        assert d.metadata["retrievekit_added"] == ["id", "score"]
        assert {k: d.metadata[k] for k in ("topic", "lang", "year")} == dict(h.document.metadata)
    assert docs[0].metadata["retrievekit_ranks"]["fused"] == 1
    assert docs[0].metadata["topic"] == "code" and docs[0].metadata["year"] == 2024
    assert lc.invoke("XQ7-42", k=4) and len(lc.invoke("XQ7-42")) == 4  # default k=4


def test_k_where_and_mode_as_fields_and_at_call_time(retriever):
    lc = RetrieveKitRetriever(retriever=retriever, k=2, where={"topic": "animals"})
    docs = lc.invoke("animals that are pets")
    assert len(docs) == 2 and {d.metadata["topic"] for d in docs} == {"animals"}
    assert len(lc.invoke("animals that are pets", k=3)) == 3
    # a call-time filter replaces the field's
    food = lc.invoke("something to drink", k=5, where={"topic": "food"})
    assert {d.id for d in food} == {"bread", "tea"}
    assert [d.id for d in lc.invoke("chat canapé", where={"lang": "fr"})] == ["chat"]
    sparse = lc.invoke("memory safety", mode="sparse", where=None)
    assert sparse[0].id == "rust"
    assert all(set(d.metadata["retrievekit_ranks"]) == {"sparse"} for d in sparse)
    dense_lc = RetrieveKitRetriever(retriever=retriever, mode="dense")
    dense = dense_lc.invoke("a language without a garbage collector")
    assert dense[0].id == "rust"
    assert all(set(d.metadata["retrievekit_ranks"]) == {"dense"} for d in dense)
    assert set(dense_lc.invoke("rust", mode="hybrid")[0].metadata["retrievekit_ranks"]) \
        >= {"dense", "fused"}


def test_bad_search_arguments_name_the_fix(retriever):
    lc = RetrieveKitRetriever(retriever=retriever)
    with pytest.raises(InvalidInputError, match="use where="):
        lc.invoke("cats", filter={"lang": "en"})
    with pytest.raises(InvalidInputError, match="k must be"):
        lc.invoke("cats", k=0)
    with pytest.raises(InvalidInputError, match="mode must be"):
        lc.invoke("cats", mode="fuzzy")
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        RetrieveKitRetriever(retriever=retriever, k=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        RetrieveKitRetriever(retriever=retriever, mode="fuzzy")
    with pytest.raises(ConfigError, match="not both"):
        RetrieveKitRetriever(retriever=retriever, path=":memory:")
    with pytest.raises(ConfigError, match="HybridRetriever"):
        RetrieveKitRetriever(retriever="not a retriever")


async def test_ainvoke_uses_asearch_and_leaves_the_loop_running(retriever):
    lc = RetrieveKitRetriever(retriever=retriever, k=3)
    docs, ticks = await _loop_ticks_while(lc.ainvoke("loyal pets", where={"lang": "en"}))
    assert ticks > 2
    sync = lc.invoke("loyal pets", where={"lang": "en"})
    assert [d.id for d in docs] == [d.id for d in sync] and docs[0].id == "dogs"
    assert [d.metadata["score"] for d in docs] == pytest.approx(
        [d.metadata["score"] for d in sync])
    assert len(await lc.ainvoke("loyal pets", k=1, mode="sparse")) == 1


def test_rerank_stage_and_call_time_switch(embedder, corpus_docs, tiny_reranker):
    hr = _memory(embedder, reranker=tiny_reranker)
    try:
        hr.add_documents(corpus_docs)
        lc = RetrieveKitRetriever(retriever=hr, k=3)
        docs = lc.invoke("programming language")
        assert all("rerank" in d.metadata["retrievekit_ranks"] for d in docs)
        assert docs[0].metadata["score"] == pytest.approx(
            docs[0].metadata["retrievekit_scores"]["rerank"])
        plain = lc.invoke("programming language", rerank=False)
        assert not any("rerank" in d.metadata["retrievekit_ranks"] for d in plain)
    finally:
        hr.close()


def test_builds_its_own_store_from_a_dict_or_toml_and_closes_it(tmp_path, embedder):
    store = tmp_path / "store"
    cfg = {"store": {"path": str(store), "collection": "built"}}
    with RetrieveKitRetriever(config=cfg, embedder=embedder, k=1) as lc:
        lc.add_documents([LCDocument(page_content="Kettles boil water.", id="kettle")])
        assert [d.id for d in lc.invoke("boiling water")] == ["kettle"]
    toml = tmp_path / "rk.toml"
    toml.write_text(f'mode = "sparse"\n[store]\npath = "{store}"\ncollection = "built"\n')
    # the first one released the directory lock on close, so this opens
    lc2 = RetrieveKitRetriever(config=str(toml), embedder=embedder)
    try:
        assert lc2.retriever.config.mode == "sparse"
        assert [d.id for d in lc2.invoke("kettles")] == ["kettle"]
    finally:
        lc2.close()
    passed = HybridRetriever(path=str(store), collection="built", embedder=embedder)
    RetrieveKitRetriever(retriever=passed).close()  # not its own: stays open
    try:
        assert passed.count() == 1
    finally:
        passed.close()


def test_add_documents_ids_and_metadata(embedder):
    hr = _memory(embedder)
    lc = RetrieveKitRetriever(retriever=hr)
    try:
        docs = [LCDocument(page_content="Boilerplate licence text.", metadata={"source": "a.txt"}),
                LCDocument(page_content="Boilerplate licence text.", metadata={"source": "b.txt"}),
                LCDocument(page_content="Owls hunt at night.", id="owl",
                           metadata={"source": "c.txt"})]
        before = copy.deepcopy(docs)
        ids = lc.add_documents(docs)
        assert docs == before  # the caller's documents are untouched
        assert ids[2] == "owl"
        assert ids[0] != ids[1]  # equal text from two sources stays apart
        assert ids[:2] == [document_id(docs[0]), document_id(docs[1])]
        assert lc.add_documents(docs) == ids and hr.count() == 3  # idempotent
        got = {d.id: d for d in lc.get(ids)}
        assert got[ids[1]].metadata == {"source": "b.txt"}
        assert got["owl"] == LCDocument(page_content="Owls hunt at night.", id="owl",
                                        metadata={"source": "c.txt"})
        # a re-upsert replaces the metadata (Chroma alone would merge it) on both sides
        lc.add_documents([LCDocument(page_content="Owls hunt at night.", id="owl",
                                     metadata={"kind": "bird"})])
        assert lc.get(["owl"])[0].metadata == {"kind": "bird"}
        for mode in ("sparse", "dense"):
            assert lc.invoke("owls", mode=mode, where={"source": "c.txt"}) == []
            assert [d.id for d in lc.invoke("owls", mode=mode, where={"kind": "bird"})] == ["owl"]
        with pytest.raises(InvalidInputError, match="Flatten nested dicts"):
            lc.add_documents([LCDocument(page_content="x", metadata={"a": {"b": 1}})])
        with pytest.raises(InvalidInputError, match="wrap the single document"):
            lc.add_documents(LCDocument(page_content="x"))
        with pytest.raises(InvalidInputError, match="documents\\[0\\]"):
            lc.add_documents(["plain str"])
        for write in (lc.add_documents, lc.upsert):  # ids belong on the documents
            with pytest.raises(InvalidInputError, match="\\['ids'\\].*set Document.id"):
                write([LCDocument(page_content="x y")], ids=["x"])
        with pytest.raises(InvalidInputError, match="\\['batch_size'\\]"):
            asyncio.run(lc.aadd_documents([LCDocument(page_content="x y")], batch_size=2))
        assert hr.count() == 3
    finally:
        hr.close()


def test_splitter_output_can_be_indexed(embedder):
    splitters = pytest.importorskip("langchain_text_splitters")
    text = ("Kangaroos carry their young in a pouch. " * 3 + "\n\n"
            + "Penguins cannot fly but swim very well. " * 3)
    chunks = splitters.RecursiveCharacterTextSplitter(chunk_size=130, chunk_overlap=0) \
        .split_documents([LCDocument(page_content=text, metadata={"source": "zoo.txt"})])
    assert len(chunks) >= 2
    hr = _memory(embedder)
    lc = RetrieveKitRetriever(retriever=hr, k=1)
    try:
        lc.add_documents(chunks)
        top = lc.invoke("birds that swim")[0]
        assert "Penguins" in top.page_content and top.metadata["source"] == "zoo.txt"
    finally:
        hr.close()


# -- the indexing API ------------------------------------------------------------------------
def _sides(hr: HybridRetriever, query: str) -> tuple[list[str], list[str]]:
    lc = RetrieveKitRetriever(retriever=hr, k=10)
    return ([d.page_content for d in lc.invoke(query, mode="sparse")],
            [d.page_content for d in lc.invoke(query, mode="dense")])


def test_indexing_api_incremental_and_full_cleanup_keep_both_sides_in_step(embedder):
    hr = _memory(embedder)
    lc = RetrieveKitRetriever(retriever=hr)
    rm = InMemoryRecordManager(namespace=f"rk/{uuid.uuid4().hex}")
    rm.create_schema()
    paris = "The capital of France is Paris."
    rome = "The capital of Italy is Rome."
    roo = "Kangaroos live in Australia."
    penguin = "Penguins live in Antarctica."
    zebra = "Zebras have black and white stripes."
    try:
        first = [LCDocument(page_content=paris, metadata={"source": "a"}),
                 LCDocument(page_content=roo, metadata={"source": "b"}),
                 LCDocument(page_content=penguin, metadata={"source": "b"}),
                 LCDocument(page_content=zebra, metadata={"source": "c"})]
        res = index(first, rm, lc, cleanup="incremental", source_id_key="source",
                    key_encoder="sha256")
        assert res == {"num_added": 4, "num_updated": 0, "num_skipped": 0, "num_deleted": 0}
        assert hr.count() == 4 and hr.verify()['ok']
        sparse, dense = _sides(hr, "Paris France")
        assert paris in sparse and paris in dense

        # source a changed, source b lost a chunk, source c not in this run
        second = [LCDocument(page_content=rome, metadata={"source": "a"}),
                  LCDocument(page_content=roo, metadata={"source": "b"})]
        res = index(second, rm, lc, cleanup="incremental", source_id_key="source",
                    key_encoder="sha256")
        assert res == {"num_added": 1, "num_updated": 0, "num_skipped": 1, "num_deleted": 2}
        assert hr.count() == 3 and hr.verify()['ok']
        for query, gone in (("Paris France", paris), ("Penguins Antarctica", penguin)):
            sparse, dense = _sides(hr, query)
            assert gone not in sparse and gone not in dense
        sparse, dense = _sides(hr, "Rome Italy")
        assert sparse[0] == rome and dense[0] == rome
        assert set(dense) == {rome, roo, zebra}

        # a full cleanup removes the source that is no longer there
        res = index(second, rm, lc, cleanup="full", source_id_key="source",
                    key_encoder="sha256")
        assert res["num_deleted"] == 1 and res["num_skipped"] == 2
        assert hr.count() == 2 and hr.verify()['ok']
        sparse, dense = _sides(hr, "Zebras stripes")
        assert zebra not in sparse and zebra not in dense
        assert sorted(d.page_content for d in lc.get(rm.list_keys())) == sorted([rome, roo])
    finally:
        hr.close()


def test_indexing_api_writes_to_the_vector_store(embedder):
    """index() passes batch_size= to a VectorStore's add_documents: the store takes it
    (and refuses a bad one by name) instead of refusing the whole call."""
    from retrievekit.langchain import RetrieveKitVectorStore

    vs = RetrieveKitVectorStore(path=":memory:", collection=f"lci-{uuid.uuid4().hex[:8]}",
                                embedding=RetrieveKitEmbeddings(embedder))
    rm = InMemoryRecordManager(namespace=f"rk/{uuid.uuid4().hex}")
    rm.create_schema()
    docs = [LCDocument(page_content=t, metadata={"source": s}) for t, s in
            (("Owls hunt at night.", "a"), ("Bees make honey.", "a"), ("Rust is fast.", "b"))]
    try:
        res = index(docs, rm, vs, cleanup="incremental", source_id_key="source",
                    key_encoder="sha256", batch_size=2)
        assert res == {"num_added": 3, "num_updated": 0, "num_skipped": 0, "num_deleted": 0}
        res = index(docs[1:], rm, vs, cleanup="incremental", source_id_key="source",
                    key_encoder="sha256")
        assert res["num_deleted"] == 1 and res["num_skipped"] == 2
        assert vs.retriever.count() == 2 and vs.retriever.verify()["ok"]
        with pytest.raises(InvalidInputError, match="batch_size"):
            vs.add_documents([LCDocument(page_content="x y")], batch_size=0)
        assert vs.retriever.count() == 2
    finally:
        vs.close()


async def test_async_indexing_api_replaces_changed_source(embedder):
    hr = _memory(embedder)
    lc = RetrieveKitRetriever(retriever=hr)
    rm = InMemoryRecordManager(namespace=f"rk/{uuid.uuid4().hex}")
    await rm.acreate_schema()
    try:
        await aindex([LCDocument(page_content="Old text about otters.", metadata={"source": "o"})],
                     rm, lc, cleanup="incremental", source_id_key="source", key_encoder="sha256")
        res = await aindex([LCDocument(page_content="New text about beavers.",
                                       metadata={"source": "o"})],
                           rm, lc, cleanup="incremental", source_id_key="source",
                           key_encoder="sha256")
        assert res["num_added"] == 1 and res["num_deleted"] == 1
        assert [d.page_content for d in await lc.ainvoke("otters", mode="sparse")] == []
        assert [d.page_content for d in await lc.ainvoke("beavers", mode="sparse")] == \
            ["New text about beavers."]
        assert hr.count() == 1 and hr.verify()['ok']
    finally:
        hr.close()


# -- reranker --------------------------------------------------------------------------------
def _oracle_scores(path: str, query: str, texts: list[str]) -> np.ndarray:
    import torch
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(path, max_length=512, local_files_only=True)
    raw = ce.predict([(query, t) for t in texts], activation_fn=torch.nn.Identity(),
                     convert_to_numpy=True, show_progress_bar=False)
    return 1.0 / (1.0 + np.exp(-np.asarray(raw, dtype=np.float64).reshape(-1)))


def test_reranker_orders_by_cross_encoder_and_leaves_inputs_alone(
        tiny_reranker, tiny_cross_encoder_path, corpus_docs):
    docs = [LCDocument(page_content=d.text, metadata={"n": i}, id=d.id if i % 2 else None)
            for i, d in enumerate(corpus_docs)]
    before = copy.deepcopy(docs)
    query = "which animal purrs?"
    expected = _oracle_scores(tiny_cross_encoder_path, query, [d.page_content for d in docs])
    order = sorted(range(len(docs)), key=lambda i: (-expected[i], i))

    out = RetrieveKitReranker(reranker=tiny_reranker).compress_documents(docs, query)
    assert docs == before
    assert all("relevance_score" not in d.metadata for d in docs)
    assert [d.metadata["n"] for d in out] == order[:3]  # default top_n=3
    assert [d.metadata["relevance_score"] for d in out] == pytest.approx(
        [expected[i] for i in order[:3]], abs=1e-4)
    assert [d.id for d in out] == [docs[i].id for i in order[:3]]
    assert [d.page_content for d in out] == [docs[i].page_content for i in order[:3]]

    all_of_them = RetrieveKitReranker(reranker=tiny_reranker, top_n=None) \
        .compress_documents(docs, query)
    assert [d.metadata["n"] for d in all_of_them] == order
    cut = float(np.median(expected))
    kept = RetrieveKitReranker(reranker=tiny_reranker, top_n=None, score_threshold=cut) \
        .compress_documents(docs, query)
    assert [d.metadata["n"] for d in kept] == [i for i in order if expected[i] >= cut]
    assert RetrieveKitReranker(reranker=tiny_reranker).compress_documents([], query) == []


def test_reranker_construction(tiny_cross_encoder_path, tiny_reranker):
    by_path = RetrieveKitReranker(model=tiny_cross_encoder_path, top_n=2)
    assert by_path.reranker.config.model == tiny_cross_encoder_path and by_path.top_n == 2
    with pytest.raises(ConfigError, match="needs reranker="):
        RetrieveKitReranker()
    with pytest.raises(ConfigError, match="not both"):
        RetrieveKitReranker(model=tiny_cross_encoder_path, reranker=tiny_reranker)
    with pytest.raises(ValueError, match="top_n must be"):
        RetrieveKitReranker(reranker=tiny_reranker, top_n=0)


async def test_reranker_after_any_retriever_in_lcel(embedder, corpus_docs, tiny_reranker):
    store = InMemoryVectorStore(embedding=RetrieveKitEmbeddings(embedder=embedder))
    store.add_documents(_lc(corpus_docs))
    base = store.as_retriever(search_kwargs={"k": 6})
    reranker = RetrieveKitReranker(reranker=tiny_reranker, top_n=2)
    chain = RunnableParallel(docs=base, query=RunnablePassthrough()) | RunnableLambda(
        lambda x: reranker.compress_documents(x["docs"], x["query"]))
    query = "programming languages"
    out = chain.invoke(query)
    candidates = base.invoke(query)
    assert len(out) == 2 and {d.id for d in out} <= {d.id for d in candidates}
    scores = [d.metadata["relevance_score"] for d in out]
    assert scores == sorted(scores, reverse=True)
    assert all("relevance_score" not in d.metadata for d in candidates)
    again = await reranker.acompress_documents(candidates, query)
    assert [d.id for d in again] == [d.id for d in out]


# -- an LCEL RAG chain -----------------------------------------------------------------------
def format_docs(docs: list[LCDocument]) -> str:
    return "\n".join(f"[{d.id}] {d.page_content}" for d in docs)


def test_lcel_rag_chain_puts_the_retrieved_context_into_the_prompt(retriever):
    lc = RetrieveKitRetriever(retriever=retriever, k=2)
    prompt = ChatPromptTemplate.from_template(
        "Answer from the context and cite ids.\n{context}\n\nQuestion: {question}")
    seen: list[str] = []

    def record(value):
        seen.append(value.to_string())
        return value

    llm = FakeListChatModel(responses=["Cats purr [cats]."])
    chain = ({"context": lc | format_docs, "question": RunnablePassthrough()}
             | prompt | RunnableLambda(record) | llm | StrOutputParser())
    answer = chain.invoke("Which animal purrs and hunts mice?")
    assert answer == "Cats purr [cats]."
    assert len(seen) == 1
    assert "[cats] Cats are small domesticated carnivorous mammals" in seen[0]
    assert "Question: Which animal purrs and hunts mice?" in seen[0]
    assert seen[0].count("\n[") == 2  # k=2 documents reached the prompt


# -- module hygiene --------------------------------------------------------------------------
def _loaded_after(statement: str, roots: tuple[str, ...]) -> list[str]:
    """Modules under `roots` that a fresh interpreter has loaded after `statement`."""
    code = (f"import sys\n{statement}\n"
            f"print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {roots!r} "
            "or m == 'retrievekit.langchain')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    return [m for m in out.stdout.strip().split(",") if m]


def test_import_retrievekit_does_not_import_langchain():
    loaded = _loaded_after("import retrievekit\nfrom retrievekit import Document, HybridRetriever",
                           ("langchain_core", "langchain", "langchain_community"))
    assert loaded == []


def test_langchain_module_imports_only_langchain_core():
    loaded = _loaded_after("import retrievekit.langchain",
                           ("langchain_core", "langchain", "langchain_community",
                            "langchain_classic"))
    assert "retrievekit.langchain" in loaded and "langchain_core" in loaded
    assert {m.split(".")[0] for m in loaded} == {"langchain_core", "retrievekit"}


def test_all_is_pinned():
    import retrievekit.langchain as mod

    assert mod.__all__ == ["RetrieveKitEmbeddings", "RetrieveKitReranker", "RetrieveKitRetriever",
                           "RetrieveKitVectorStore"]
    for name in mod.__all__:
        assert getattr(mod, name).__module__ == "retrievekit.langchain"


def test_fields_are_checked_strictly_at_construction(retriever):
    """pydantic alone reads rerank="no" as False and takes any dict as a filter."""
    for bad in ("no", "yes", 0, 1):
        with pytest.raises(ConfigError, match="rerank"):
            RetrieveKitRetriever(retriever=retriever, rerank=bad)
    with pytest.raises(ConfigError, match="\\$bad"):
        RetrieveKitRetriever(retriever=retriever, where={"$bad": 1})
    assert RetrieveKitRetriever(retriever=retriever, rerank=False, where={"topic": "food"}
                                ).invoke("bread")[0].id == "bread"


def test_unknown_options_are_refused_with_the_right_name(retriever):
    from retrievekit.errors import ConfigError
    from retrievekit.langchain import RetrieveKitRetriever

    with pytest.raises(ConfigError) as err:
        RetrieveKitRetriever(retriever=retriever, search_kwargs={"k": 1, "where": {"a": 1}},
                             top_k=2)
    msg = str(err.value)
    assert "search_kwargs" in msg and "k= and where=" in msg and "top_k: use k=" in msg
    with pytest.raises(ConfigError, match="filter: use where="):
        RetrieveKitRetriever(retriever=retriever, filter={"lang": "en"})
    ok = RetrieveKitRetriever(retriever=retriever, k=1, where={"lang": "en"}, tags=["x"])
    assert ok.k == 1 and ok.tags == ["x"]


# -- vector store ------------------------------------------------------------------------------
def _store(embedder, corpus_docs, **kwargs):
    from retrievekit.langchain import RetrieveKitVectorStore

    return RetrieveKitVectorStore.from_documents(
        _lc(corpus_docs), RetrieveKitEmbeddings(embedder), path=":memory:",
        collection=f"lcvs-{uuid.uuid4().hex[:12]}", **kwargs)


def test_vector_store_written_as_for_langchain_chroma(tmp_path, embedder, corpus_docs):
    """langchain-chroma's names and calls work unchanged; the store is a real retrievekit
    store (it reopens with its settings, BM25 in step)."""
    from retrievekit.langchain import RetrieveKitVectorStore

    db = str(tmp_path / "db")
    vs = RetrieveKitVectorStore(collection_name="kbase", persist_directory=db,
                                embedding_function=RetrieveKitEmbeddings(embedder))
    ids = vs.add_texts(["Rust has no garbage collector.", "Bread needs a starter."],
                       metadatas=[{"topic": "code"}, {"topic": "food"}], ids=["r", "b"])
    assert ids == ["r", "b"]
    got = vs.similarity_search("garbage collector", k=1, filter={"topic": "code"})
    assert got == [LCDocument(page_content="Rust has no garbage collector.",
                              metadata={"topic": "code"}, id="r")]
    assert vs.similarity_search("garbage collector", k=2, filter={"topic": "food"})[0].id == "b"
    vs.close()
    with HybridRetriever.open(db, collection="kbase") as hr:
        assert hr.count() == 2 and hr.verify()["ok"]


def test_vector_store_modes_and_scores(embedder, corpus_docs):
    vs = _store(embedder, corpus_docs)
    assert vs.retrieval_mode == "hybrid"
    q = "XQ7-42 flux capacitor"
    hybrid = vs.similarity_search_with_score(q, k=3)
    dense = vs.similarity_search_with_score(q, k=3, mode="dense")
    sparse = vs.similarity_search_with_score(q, k=3, mode="sparse")
    assert hybrid[0][0].id == dense[0][0].id == sparse[0][0].id == "xq7"
    # each mode's own score: the fused one in hybrid (dbsf: 0..1 a side), cosine in dense,
    # BM25 in sparse
    assert 1 < hybrid[0][1] <= 2 and hybrid[1][1] < hybrid[0][1]
    assert 0 < dense[0][1] <= 1 and sparse[0][1] > 1
    meta = {d.id: dict(d.metadata) for d in corpus_docs}
    assert [d.metadata for d, _ in hybrid] == [meta[d.id] for d, _ in hybrid]
    assert "retrievekit_ranks" not in hybrid[0][0].metadata  # store metadata only
    rel = vs.similarity_search_with_relevance_scores(q, k=3)
    # relevance: the fused score over its ceiling (dbsf: 2, one a side)
    assert [s for _, s in rel] == pytest.approx([s / 2 for _, s in hybrid])
    assert all(0 <= s <= 1 for _, s in rel)
    assert [s for _, s in rel] == sorted((s for _, s in rel), reverse=True)
    for w in ({"dense": 5, "sparse": 5}, {"dense": 0.2, "sparse": 0.2}, {"sparse": 3}):
        # over the ceiling of the weights the search used: equal ones, the same relevance
        weighted = vs.similarity_search_with_relevance_scores(q, k=3, weights=w)
        if w["sparse"] == w.get("dense", 1):
            assert [(d.id, s) for d, s in weighted] == [(d.id, pytest.approx(s))
                                                        for d, s in rel]
        assert all(0 <= s <= 1 for _, s in weighted) and weighted[0][1] > 0.5
    dense_rel = vs.similarity_search_with_relevance_scores(q, k=3, mode="dense")
    assert [s for _, s in dense_rel] == pytest.approx([s for _, s in dense])
    with pytest.raises(InvalidInputError, match="no upper bound"):
        vs.similarity_search_with_relevance_scores(q, k=3, mode="sparse")
    with pytest.raises(InvalidInputError, match="unknown search arguments"):
        vs.similarity_search(q, k=3, filters={"topic": "code"})
    vs.close()


def test_vector_store_as_retriever_search_types(embedder, corpus_docs):
    vs = _store(embedder, corpus_docs)
    sim = vs.as_retriever(search_kwargs={"k": 2, "filter": {"topic": "animals"}})
    assert [d.metadata["topic"] for d in sim.invoke("pets that purr")] == ["animals"] * 2
    thr = vs.as_retriever(search_type="similarity_score_threshold",
                          search_kwargs={"k": 8, "score_threshold": 0.6})
    found = thr.invoke("XQ7-42 flux capacitor")
    assert found and found[0].id == "xq7"
    everything = vs.similarity_search_with_relevance_scores("XQ7-42 flux capacitor", k=8)
    assert len(found) == sum(s >= 0.6 for _, s in everything) < 8
    mmr = vs.as_retriever(search_type="mmr", search_kwargs={"k": 3, "fetch_k": 8})
    assert len(mmr.invoke("programming language")) == 3
    vs.close()


def test_mmr_trades_relevance_for_diversity(embedder):
    """Near-duplicates: pure relevance returns them all; MMR returns one and moves on."""
    from retrievekit.langchain import RetrieveKitVectorStore

    texts = ["Python is a programming language with readable syntax.",
             "Python is a programming language with a readable syntax.",
             "Python is a programming language whose syntax is readable.",
             "Rust is a systems programming language with memory safety.",
             "Sourdough bread is leavened with a fermented starter."]
    vs = RetrieveKitVectorStore.from_texts(texts, RetrieveKitEmbeddings(embedder),
                                           ids=["p1", "p2", "p3", "rust", "bread"],
                                           path=":memory:", collection=f"mmr-{uuid.uuid4().hex[:8]}")
    q = "Python programming language syntax"
    relevant = [d.id for d in vs.max_marginal_relevance_search(q, k=3, fetch_k=5, lambda_mult=1.0)]
    assert set(relevant) == {"p1", "p2", "p3"}
    diverse = [d.id for d in vs.max_marginal_relevance_search(q, k=3, fetch_k=5, lambda_mult=0.3)]
    assert diverse[0] in {"p1", "p2", "p3"} and len({"p1", "p2", "p3"} & set(diverse)) == 1
    with pytest.raises(InvalidInputError, match="lambda_mult"):
        vs.max_marginal_relevance_search(q, k=2, lambda_mult=2)
    vs.close()


async def test_vector_store_async_and_delete(embedder, corpus_docs):
    vs = _store(embedder, corpus_docs)
    docs = await vs.asimilarity_search("sourdough starter", k=1)
    assert docs[0].id == "bread"
    rel = await vs.asimilarity_search_with_relevance_scores("sourdough starter", k=2)
    assert rel == vs.similarity_search_with_relevance_scores("sourdough starter", k=2)
    thr = vs.as_retriever(search_type="similarity_score_threshold",
                          search_kwargs={"k": 3, "score_threshold": 0.5})
    assert [d.id for d in await thr.ainvoke("sourdough starter")][:1] == ["bread"]
    mmr = await vs.amax_marginal_relevance_search("sourdough starter", k=2, fetch_k=4)
    assert len(mmr) == 2
    assert vs.delete(["bread"]) is True
    assert await vs.aget_by_ids(["bread", "tea"]) == [
        LCDocument(page_content=corpus_docs[7].text, metadata=dict(corpus_docs[7].metadata),
                   id="tea")]
    assert "bread" not in [d.id for d in await vs.asimilarity_search("sourdough starter", k=8)]
    vs.close()


def test_vector_store_refuses_what_it_cannot_honor(embedder, retriever):
    from langchain_core.embeddings import DeterministicFakeEmbedding

    from retrievekit.langchain import RetrieveKitVectorStore

    with pytest.raises(ConfigError, match="RetrieveKitEmbeddings"):
        RetrieveKitVectorStore(embedding=DeterministicFakeEmbedding(size=6), path=":memory:")
    with pytest.raises(ConfigError, match="not both"):
        RetrieveKitVectorStore(retriever, path=":memory:")
    with pytest.raises(ConfigError, match="retrieval_mode"):
        RetrieveKitVectorStore(retriever, retrieval_mode="semantic")
    vs = RetrieveKitVectorStore(retriever)
    with pytest.raises(InvalidInputError, match="metadatas has 1 entries for 2"):
        vs.add_texts(["a b", "c d"], metadatas=[{}])
    with pytest.raises(InvalidInputError, match="texts must be a list"):
        vs.add_texts("a single text")
    with pytest.raises(InvalidInputError, match="ids has 1 entries"):
        vs.add_documents([LCDocument(page_content="x y"), LCDocument(page_content="z")], ids=["1"])
    with pytest.raises(InvalidInputError, match="by vector is dense"):
        vs.similarity_search_by_vector(vs.embeddings.embed_query("cats"), k=1, mode="hybrid")
    cats = vs.embeddings.embed_query("purring cats")
    assert vs.similarity_search_by_vector(cats, k=1)[0].id == "cats"
    # every search takes its filter as filter= or where=, never both (a filter=None beside
    # where= hid the filter from the by-vector and MMR searches)
    searches = {"similarity_search": lambda **kw: vs.similarity_search("cats", k=8, **kw),
                "by_vector": lambda **kw: vs.similarity_search_by_vector(cats, k=8, **kw),
                "mmr": lambda **kw: vs.max_marginal_relevance_search("cats", 8, 8, **kw),
                "mmr_by_vector": lambda **kw: vs.max_marginal_relevance_search_by_vector(
                    cats, 8, 8, **kw)}
    for name, search in searches.items():
        for key in ("filter", "where"):
            found = search(**{key: {"topic": "code"}})
            assert found and {d.metadata["topic"] for d in found} == {"code"}, (name, key)
        with pytest.raises(InvalidInputError, match="not both"):
            search(filter=None, where={"topic": "code"})
    assert vs.max_marginal_relevance_search_by_vector(cats, k=1)[0].id == "cats"
    picks = {scale: [d.id for d in vs.max_marginal_relevance_search_by_vector(
        [x * scale for x in cats], k=4, fetch_k=8)] for scale in (1.0, 1e20, 1e-25)}
    assert picks[1.0] == picks[1e20] == picks[1e-25]  # float32 overflowed or vanished
    vs.close()  # not its retriever: still open
    assert retriever.count() == 8


def test_ensemble_retriever_dedups_our_documents_by_id(retriever):
    """EnsembleRetriever(id_key="id") reads metadata["id"]: it is there, so the same
    document from two of our retrievers is one entry (it raised KeyError 'id')."""
    ensemble_mod = pytest.importorskip("langchain_classic.retrievers")
    dense = RetrieveKitRetriever(retriever=retriever, mode="dense", k=4)
    sparse = RetrieveKitRetriever(retriever=retriever, mode="sparse", k=4)
    ensemble = ensemble_mod.EnsembleRetriever(retrievers=[dense, sparse], id_key="id")
    got = ensemble.invoke("programming language")
    ids = [d.metadata["id"] for d in got]
    assert len(ids) == len(set(ids)) and {"python", "rust"} <= set(ids)
    assert all(d.metadata["id"] == d.id for d in got)


def test_a_retrieved_chunk_is_never_added_in_its_document_s_place(embedder, corpus_docs):
    """A search result of a long document carries its best chunk's text under the
    document's id: added again, it replaced the whole document. Such a result carries
    the chunk's id and is refused; a whole one, retrieved with its scores, adds again."""
    from retrievekit.langchain import CHUNK_ID_KEY

    vs = _store(embedder, corpus_docs)
    long = " ".join(f"Sentence {i} tells of harbours, tides and cargo." for i in range(400))
    vs.add_documents([LCDocument(page_content=long, id="long")])
    records = vs.retriever.count()
    part, = [d for d in vs.similarity_search("cargo tides", k=3) if d.id == "long"]
    assert part.metadata[CHUNK_ID_KEY].startswith("long#chunk")
    with pytest.raises(InvalidInputError, match="replace the whole document"):
        vs.add_documents([part])
    whole = [d for d in RetrieveKitRetriever(retriever=vs.retriever, k=8).invoke("cats")
             if d.id == "cats"]
    stored = vs.retriever.get(["cats"])[0]
    assert {"id", "score"} <= set(whole[0].metadata)
    vs.add_documents(whole)  # what the search added is dropped: the same document again
    assert vs.retriever.last_add_stats == {"written": 0, "unchanged": 1, "removed": 0}
    assert vs.retriever.count() == records and vs.retriever.get(["long"])[0].text == long
    assert vs.retriever.get(["cats"]) == [stored]
    # keys of the document's own named id and score are kept, never replaced or dropped
    mine = {"id": "owls", "score": 5, "topic": "birds"}
    vs.add_documents([LCDocument(page_content="Owls hunt at night.", id="owls", metadata=mine)])
    found, = [d for d in RetrieveKitRetriever(retriever=vs.retriever, k=3).invoke("owls hunt")
              if d.id == "owls"]
    assert (found.metadata["id"], found.metadata["score"]) == ("owls", 5)
    assert found.metadata["retrievekit_added"] == []
    vs.add_documents([found])
    assert vs.retriever.last_add_stats["unchanged"] == 1
    assert vs.retriever.get(["owls"])[0].metadata == mine
    # retrievekit_added is retrievekit's own key: it drops at most id and score
    for odd in ({"retrievekit_added": ["topic"], "topic": "insects"},
                {"retrievekit_added": [["x"]], "topic": "insects"}):  # the second: TypeError
        vs.add_documents([LCDocument(page_content="Bees make honey.", id="bees", metadata=odd)])
        assert vs.retriever.get(["bees"])[0].metadata == {"topic": "insects"}
    # a whole retrieved document under another id is a document of its own, not a chunk
    copy = LCDocument(page_content=found.page_content, metadata=found.metadata, id="owls-2")
    vs.add_documents([copy])
    vs.add_texts([found.page_content], [found.metadata], ids=["owls-3"])
    assert [d.metadata for d in vs.get_by_ids(["owls-2", "owls-3"])] == [mine, mine]


def test_metadata_keys_of_several_types_are_refused_by_name():
    with pytest.raises(InvalidInputError, match="metadata keys must be str"):
        document_id(LCDocument(page_content="x", metadata={1: "a", "b": 2}))
