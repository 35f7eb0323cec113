"""HybridRetriever end to end: bundled MiniLM, real persistent Chroma in tmp_path."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from retrievekit.errors import InvalidInputError, StoreLockedError, StoreMismatchError
from retrievekit.pipeline import HybridRetriever
from retrievekit.rerank import Reranker
from retrievekit.types import Document


def test_each_mode_finds_the_obvious_document(retriever):
    for mode in ("hybrid", "dense", "sparse"):
        hits = retriever.search("memory safety without garbage collection", k=3, mode=mode)
        assert hits[0].id == "rust", (mode, [h.explain() for h in hits])
        assert mode if mode != "hybrid" else "fused" in hits[0].ranks


def test_exact_token_query_is_found_by_bm25_and_fusion(retriever):
    # an opaque code: the lexical side finds it even where the dense side is weak
    sparse = retriever.search("XQ7-42", k=3, mode="sparse")
    assert sparse[0].id == "xq7"
    hybrid = retriever.search("XQ7-42", k=3)
    assert hybrid[0].id == "xq7"
    assert hybrid[0].ranks["sparse"] == 1 and "dense" in hybrid[0].ranks


def _dbsf(scores):
    """Qdrant's DBSF, written out: mean ± 3 standard deviations mapped to 0..1, clipped."""
    mean = sum(scores.values()) / len(scores)
    sd = (sum((s - mean) ** 2 for s in scores.values()) / len(scores)) ** 0.5
    return {d: min(1.0, max(0.0, (s - mean + 3 * sd) / (6 * sd))) if sd else 1.0
            for d, s in scores.items()}


def test_hybrid_scores_are_dbsf_of_the_sides_by_default(retriever):
    q = "programming language"
    hits = retriever.search(q, k=8)
    sides = {m: _dbsf({h.id: h.score for h in retriever.search(q, k=8, mode=m)})
             for m in ("dense", "sparse")}
    assert len(sides["sparse"]) > 1 and len(sides["dense"]) == 8  # both sides count
    for h in hits:
        assert h.score == pytest.approx(sum(s.get(h.id, 0.0) for s in sides.values()))
        assert h.ranks["fused"] == hits.index(h) + 1
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_hybrid_scores_are_rrf_of_the_sides_with_rrf(tmp_path, embedder, corpus_docs):
    with HybridRetriever({"fusion": "rrf"}, path=str(tmp_path / "rrf"), embedder=embedder) as r:
        r.add_documents(corpus_docs)
        hits = r.search("loyal pets", k=8)
    for h in hits:
        expected = sum(1.0 / (60 + h.ranks[s]) for s in ("dense", "sparse") if s in h.ranks)
        assert h.score == pytest.approx(expected)
        assert h.ranks["fused"] == hits.index(h) + 1
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_dense_scores_are_cosine_similarities(retriever, embedder):
    hits = retriever.search("baking with a starter", k=2, mode="dense")
    q = embedder.embed_query("baking with a starter")
    d = embedder.embed_documents([hits[0].document.text])[0]
    assert hits[0].scores["dense"] == pytest.approx(float(q @ d), abs=1e-4)


def test_where_filter_applies_to_both_sides(retriever):
    for mode in ("hybrid", "dense", "sparse"):
        hits = retriever.search("cats dogs chat animals", k=8, mode=mode,
                                where={"lang": "fr"})
        assert {h.id for h in hits} <= {"chat"}
    hits = retriever.search("programming language", k=8,
                            where={"$and": [{"topic": "code"}, {"year": {"$gte": 2023}}]})
    assert {h.id for h in hits} == {"rust", "xq7"}
    assert hits[0].document.metadata["topic"] == "code"
    assert not any(k.startswith("_rk_") for h in hits for k in h.document.metadata)


def test_k_is_clamped_to_the_corpus(retriever):
    assert len(retriever.search("anything at all", k=1000, mode="dense")) == 8


def test_upsert_replaces_and_unchanged_is_not_reencoded(retriever, monkeypatch):
    calls = []
    real = retriever.embedder.embed_documents
    monkeypatch.setattr(retriever.embedder, "embed_documents",
                        lambda texts, **kw: calls.append(list(texts)) or real(texts, **kw))
    retriever.add_documents([Document("Cats are small domesticated carnivorous mammals that "
                                      "purr and hunt mice.", id="cats",
                                      metadata={"topic": "animals", "lang": "en", "year": 2020})])
    assert calls == []  # same text and metadata: nothing to do
    retriever.add_documents([Document("Cats now sleep eighteen hours a day.", id="cats",
                                      metadata={"topic": "animals"})])
    assert calls == [["Cats now sleep eighteen hours a day."]]
    assert retriever.count() == 8
    assert retriever.get(["cats"])[0].text == "Cats now sleep eighteen hours a day."
    assert retriever.search("purr hunt mice", k=1, mode="sparse") == [] or \
        retriever.search("purr hunt mice", k=1, mode="sparse")[0].id != "cats"
    assert retriever.search("eighteen hours", k=1, mode="sparse")[0].id == "cats"


def test_ids_default_to_text_hash_and_same_text_is_one_document(tmp_path, embedder):
    with HybridRetriever(path=str(tmp_path / "s"), embedder=embedder) as r:
        ids1 = r.add_documents(["same text here", "other text"])
        ids2 = r.add_documents(["same text here"])
        assert ids1[0] == ids2[0] and r.count() == 2


def test_delete_removes_from_both_sides(retriever):
    assert retriever.delete(["rust", "not-there"]) == 1
    assert retriever.delete(["rust"]) == 0
    for mode in ("dense", "sparse", "hybrid"):
        assert "rust" not in {h.id for h in retriever.search("memory safety garbage collector",
                                                             k=8, mode=mode)}
    assert retriever.count() == 7 and retriever.verify()['ok']


def test_reopen_reads_recorded_settings_and_bm25(tmp_path, embedder, corpus_docs):
    path = str(tmp_path / "s")
    r = HybridRetriever(path=path, embedder=embedder)
    r.add_documents(corpus_docs)
    before = r.search("green tea caffeine", k=4)
    r.close()
    r2 = HybridRetriever.open(path)
    assert r2.count() == 8 and r2.verify()['ok']
    after = r2.search("green tea caffeine", k=4)
    # the query may be encoded by another engine of the same model (ONNX or torch, picked
    # per call): cosines agree to ~1e-4, which the score-based fusion passes on
    assert [h.id for h in after] == [h.id for h in before]
    assert [h.score for h in after] == pytest.approx([h.score for h in before], abs=1e-3)
    r2.close()


def test_second_open_of_same_store_is_refused(retriever):
    with pytest.raises(StoreLockedError, match="already open in this process"):
        HybridRetriever(path=retriever.config.store.path, embedder=retriever.embedder)


def test_mismatched_reopen_lists_differences(tmp_path, embedder, corpus_docs):
    path = str(tmp_path / "s")
    with HybridRetriever(path=path, embedder=embedder) as r:
        r.add_documents(corpus_docs[:2])
    with pytest.raises(StoreMismatchError) as err:
        HybridRetriever(path=path, truncate_dim=128)
    assert "embedder.truncate_dim" in str(err.value) and "HybridRetriever.open" in str(err.value)
    with pytest.raises(StoreMismatchError, match="sparse.tokenizer.stemmer"):
        HybridRetriever({"store": {"path": path}, "sparse": {"tokenizer": {"stemmer": None}}},
                        embedder=embedder)
    # the failed opens left the store as it was and released its lock
    with HybridRetriever(path=path, embedder=embedder) as r:
        assert r.count() == 2


def test_truncate_dim_store(tmp_path, corpus_docs):
    with HybridRetriever(path=str(tmp_path / "t"), truncate_dim=128) as r:
        r.add_documents(corpus_docs)
        assert r.embedder.dim == 128
        assert r.search("loyal companions", k=1, mode="dense")[0].id == "dogs"
        vec = r.store.get(ids=["dogs"], include=["embeddings"])["embeddings"][0]
        assert len(vec) == 128 and np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)


def test_long_document_is_chunked_not_truncated(tmp_path, embedder):
    filler = " ".join(f"word{i}" for i in range(400))
    text = "Intro about gardening. " + filler + " The secret ingredient is saffron."
    with HybridRetriever({"store": {"path": str(tmp_path / "c")},
                          "chunking": {"max_tokens": 64, "overlap_tokens": 8}},
                         embedder=embedder) as r:
        r.add_documents([Document(text, id="long"), Document("Short note.", id="short")])
        assert r.count() > 2
        hit = r.search("secret ingredient saffron", k=1, mode="sparse")[0]
        assert hit.id == "long" and hit.chunk_id.startswith("long#chunk") and hit.chunk_index > 0
        assert "saffron" in hit.document.text
        assert r.get(["long"])[0].text == text  # chunks put back together exactly
        # chunks collapsing into one hit must not make a page short: candidates widen
        for mode in ("dense", "hybrid"):
            hits = r.search("gardening words and an ingredient", k=2, mode=mode, candidates=1)
            assert sorted(h.id for h in hits) == ["long", "short"], mode
        # a shorter new version drops the stale chunks
        r.add_documents([Document("Now short.", id="long")])
        assert r.count() == 2
        assert r.search("saffron", k=2, mode="sparse") == []


def test_rerank_adds_a_stage_and_keeps_input(tmp_path, embedder, corpus_docs,
                                             tiny_cross_encoder_path):
    rr = Reranker(model=tiny_cross_encoder_path, top_n=3)
    with HybridRetriever(path=str(tmp_path / "r"), embedder=embedder, reranker=rr) as r:
        r.add_documents(corpus_docs)
        hits = r.search("programming", k=5)
        assert len(hits) == 3
        assert [h.ranks["rerank"] for h in hits] == [1, 2, 3]
        assert all(0.0 <= h.score <= 1.0 and h.score == h.scores["rerank"] for h in hits)
        assert all("fused" in h.ranks for h in hits)
        plain = r.search("programming", k=5, rerank=False)
        assert len(plain) == 5 and all("rerank" not in h.ranks for h in plain)
        before = [(h.id, h.score, dict(h.ranks)) for h in plain]
        again = rr.rerank("programming", plain, top_n=2, threshold=-1.0)
        assert [(h.id, h.score, dict(h.ranks)) for h in plain] == before
        assert len(again) == 2


def test_rerank_weight_blends_with_the_first_stage(tiny_cross_encoder_path):
    from retrievekit.errors import InvalidInputError
    from retrievekit.types import Hit

    texts = ["bread and butter", "a passage on tea", "sourdough starters", "green tea"]
    hits = [Hit(Document(t, id=f"d{i}"), 1.0 / (i + 1), ranks={"fused": i + 1})
            for i, t in enumerate(texts)]
    kept = [(h.id, h.score, dict(h.ranks)) for h in hits]
    rr = Reranker(model=tiny_cross_encoder_path)
    scores = rr.score("tea", texts)
    alone = rr.rerank("tea", hits)
    assert all("blend" not in h.ranks for h in alone)
    assert [h.id for h in alone] == [f"d{i}" for i in np.argsort(-scores, kind="stable")]
    blended = Reranker(model=tiny_cross_encoder_path, weight=0.5).rerank("tea", hits)
    assert [h.ranks["blend"] for h in blended] == [1, 2, 3, 4]
    for h in blended:
        pos = int(h.id[1]) + 1
        assert h.score == pytest.approx(0.5 / (60 + pos) + 0.5 / (60 + h.ranks["rerank"]))
        assert h.scores["blend"] == h.score and h.scores["rerank"] == pytest.approx(
            float(scores[pos - 1]), abs=1e-6)
    assert [h.score for h in blended] == sorted((h.score for h in blended), reverse=True)
    # a call-time weight overrides the config; the input is never changed
    assert [h.id for h in rr.rerank("tea", hits, weight=0.5)] == [h.id for h in blended]
    assert [(h.id, h.score, dict(h.ranks)) for h in hits] == kept
    with pytest.raises(InvalidInputError, match="weight"):
        rr.rerank("tea", hits, weight=2)


def test_reranker_threshold_and_raw_scores(tiny_cross_encoder_path):
    raw = Reranker(model=tiny_cross_encoder_path, sigmoid=False)
    sig = Reranker(model=tiny_cross_encoder_path, sigmoid=True)
    s_raw = raw.score("q", ["a passage", "another passage"])
    s_sig = sig.score("q", ["a passage", "another passage"])
    np.testing.assert_allclose(s_sig, 1 / (1 + np.exp(-s_raw)), rtol=1e-5)
    from retrievekit.types import Hit

    hits = [Hit(Document("a passage", id="a"), 0.1), Hit(Document("another passage", id="b"), 0.2)]
    cut = float(np.max(s_sig)) + 1e-6
    assert sig.rerank("q", hits, threshold=cut) == []


def test_search_keeps_the_hits_below_the_reranked_head(tmp_path, embedder, corpus_docs,
                                                        tiny_cross_encoder_path):
    """`candidates` below k once cut the page to the reranked head (3 of 5 asked for)."""
    rr = Reranker(model=tiny_cross_encoder_path, candidates=3)
    q = "programming"
    with HybridRetriever(path=str(tmp_path / "r"), embedder=embedder, reranker=rr) as r:
        r.add_documents(corpus_docs)
        plain = r.search(q, k=5, rerank=False)
        hits = r.search(q, k=5)
        assert [h.id for h in hits[:3]] == [h.id for h in rr.rerank(q, plain[:3])]
        assert [h.ranks["rerank"] for h in hits[:3]] == [1, 2, 3]
        assert hits[3:] == plain[3:] and len(hits) == 5  # the rest in fused order, unscored
        assert len(r.search(q, k=50)) == len(corpus_docs)  # k clamped to the store
        r.reranker = Reranker(model=tiny_cross_encoder_path, candidates=3, top_n=4)
        assert [h.id for h in r.search(q, k=5)] == [h.id for h in hits[:4]]  # top_n caps all
        # only a scored hit can pass a threshold (sigmoid scores are all above -1)
        r.reranker = Reranker(model=tiny_cross_encoder_path, candidates=3, threshold=-1.0)
        assert [h.id for h in r.search(q, k=5)] == [h.id for h in hits[:3]]


def test_rank_refuses_what_search_refuses(tiny_cross_encoder_path):
    from retrievekit.types import Hit

    rr = Reranker(model=tiny_cross_encoder_path)
    for texts, where in (([1, 2], r"texts\[0\]"), (["a", None], r"texts\[1\]"),
                         (["a\ud800b"], r"texts\[0\].*surrogate"),
                         ("hello", "texts must be a list"), ({"a": 1}, "texts must be a list")):
        with pytest.raises(InvalidInputError, match=where):
            rr.rank("cats", texts)
    for query in ("", "   ", None, "ca\udc80ts"):
        with pytest.raises(InvalidInputError, match="query"):
            rr.rank(query, ["a"])
        with pytest.raises(InvalidInputError, match="query"):
            rr.score(query, ["a"])
    with pytest.raises(InvalidInputError, match=r"passages\[0\]"):
        rr.score("cats", [3])
    with pytest.raises(InvalidInputError, match=r"hits\[1\] must be a Hit"):
        rr.rerank("cats", [Hit(Document("a", id="a"), 1.0), "b"])
    with pytest.raises(InvalidInputError, match="hits must be a list"):
        rr.rerank("cats", "ab")
    assert rr.rank("cats", []) == [] and rr.rank("cats", [""])[0].index == 0


def test_reranker_max_length_is_bounded_by_the_model(tiny_cross_encoder_path):
    """max_length past the model's 512 positions once passed, and a long query then crashed
    in the forward pass (tensor size 721 vs 512)."""
    from retrievekit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"reranker.max_length.*100000.*512"):
        Reranker(model=tiny_cross_encoder_path, max_length=100000)
    with pytest.raises(ConfigError, match="reranker.max_length"):
        Reranker(model=tiny_cross_encoder_path, max_length=513)
    widest = Reranker(model=tiny_cross_encoder_path, max_length=512, backend="torch")
    assert len(widest.rank("cats " * 700, ["cat " * 2000, "dogs"])) == 2


def test_nan_scores_are_refused_not_ranked(tiny_cross_encoder_path, monkeypatch):
    """NaN from the model (fp16 overflow, a damaged checkpoint) once came back in input
    order ([0.2, nan, 0.9, 0.1] -> [0, 1, 2, 3]) and was dropped silently by a threshold."""
    from retrievekit.errors import ConfigError

    rr = Reranker(model=tiny_cross_encoder_path, backend="torch", dtype="float32")
    predict = rr.model.predict

    def one_nan(*args, **kwargs):  # the real model's output, its second score spoilt
        out = np.array(predict(*args, **kwargs), dtype=np.float32)
        out[1] = np.nan
        return out

    monkeypatch.setattr(rr.model, "predict", one_nan)
    for call in (lambda: rr.rank("q", list("abcd")),
                 lambda: rr.rank("q", list("abcd"), threshold=0.0, weight=0.5),
                 lambda: rr.score("q", list("abcd"))):
        with pytest.raises(ConfigError, match=r"NaN.*passage 1.*dtype"):
            call()


def test_async_search_matches_sync(retriever):
    async def run():
        return await asyncio.gather(retriever.asearch("sourdough", k=2),
                                    retriever.asearch("green tea", k=2))
    a, b = asyncio.run(run())
    assert a[0].id == "bread" and b[0].id == "tea"


def test_bad_query_and_k(retriever):
    for bad in ["", "   ", None, 3]:
        with pytest.raises(InvalidInputError, match="query"):
            retriever.search(bad)
    for k in [0, -1, 1.5, True]:
        with pytest.raises(InvalidInputError, match="k must be"):
            retriever.search("x", k=k)
    with pytest.raises(InvalidInputError, match="mode must be one of"):
        retriever.search("x", mode="fuzzy")
    with pytest.raises(InvalidInputError, match="where"):
        retriever.search("x", where={"year": {"$bad": 1}})
