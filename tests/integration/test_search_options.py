"""Per-call search options the adapters' vector stores map onto: fusion weights, the sparse
side's candidates, relevance scores, MMR, and ranking plain texts."""

from __future__ import annotations

import pytest

from retrievekit.errors import InvalidInputError


def test_weights_per_call_reweigh_the_sides(retriever):
    q = "the flux of water"
    dense = [h.id for h in retriever.search(q, 8, mode="dense")]
    sparse = [h.id for h in retriever.search(q, 8, mode="sparse")]
    only_dense = retriever.search(q, 8, weights={"dense": 1.0, "sparse": 0.0})
    assert [h.id for h in only_dense][:len(dense)] == dense
    only_sparse = retriever.search(q, 8, weights={"dense": 0.0, "sparse": 1.0})
    assert [h.id for h in only_sparse][:len(sparse)] == sparse
    assert dense[0] != sparse[0]  # otherwise the two checks above prove nothing
    # the configured weights are back for the next call
    assert retriever.search(q, 8) == retriever.search(q, 8, weights={"dense": 1, "sparse": 1})
    for bad in ({"bm25": 1}, {"dense": -1}, "abc", {"dense": float("nan")}):
        with pytest.raises(InvalidInputError, match="weight"):
            retriever.search(q, 3, weights=bad)


def test_sparse_candidates_bound_the_bm25_side_alone(retriever):
    q = "programming language"
    hits = retriever.search(q, 8, candidates=8, sparse_candidates=1)
    assert sum("sparse" in h.ranks for h in hits) == 1
    assert sum("dense" in h.ranks for h in hits) == 8
    wide = retriever.search(q, 8, candidates=8)
    assert sum("sparse" in h.ranks for h in wide) > 1
    with pytest.raises(InvalidInputError, match="sparse_candidates"):
        retriever.search(q, 3, sparse_candidates=0)


def test_relevance_maps_each_kind_of_score_to_0_1(retriever):
    q = "XQ7-42 flux capacitor"
    top, second = retriever.search(q, 3)[:2]
    # dbsf (the default): each side contributes at most 1, so the ceiling is 2
    assert top.id == "xq7" and retriever.relevance(top) == pytest.approx(top.score / 2)
    assert 0 < retriever.relevance(second) < retriever.relevance(top) <= 1
    d = retriever.search(q, 1, mode="dense")[0]
    assert retriever.relevance(d) == pytest.approx(d.scores["dense"])
    with pytest.raises(InvalidInputError, match="no upper bound"):
        retriever.relevance(retriever.search(q, 1, mode="sparse")[0])


def test_rank_orders_plain_texts(tiny_cross_encoder_path):
    from retrievekit.rerank import Reranker

    r = Reranker(model=tiny_cross_encoder_path)
    texts = ["unrelated words", "cats purr", "more unrelated"]
    ranked = r.rank("cats purr", texts)
    scores = r.score("cats purr", texts)
    assert [x.index for x in ranked] == sorted(range(3), key=lambda i: -scores[i])
    assert [x.rerank_rank for x in ranked] == [1, 2, 3]
    assert ranked[0].score == pytest.approx(float(max(scores)))
    assert len(r.rank("cats purr", texts, top_n=1)) == 1
    blended = r.rank("cats purr", texts, weight=0.5)
    assert [x.blend_rank for x in blended] == [1, 2, 3]


def test_sparse_mode_returns_k_hits_whatever_sparse_candidates_say(tmp_path, tiny_embedder):
    """In sparse mode the BM25 list is the answer: `sparse_candidates` below k once gave 3
    hits at 50 documents and 6 at 150 (widening stopped with the dense side's count)."""
    from retrievekit.pipeline import HybridRetriever

    for n_docs in (50, 150):
        with HybridRetriever(path=str(tmp_path / f"s{n_docs}"), embedder=tiny_embedder) as r:
            r.add_documents([{"text": f"river stone {i}", "id": f"d{i}"} for i in range(n_docs)])
            hits = r.search("river", k=10, mode="sparse", sparse_candidates=3)
            assert len(hits) == 10, n_docs

