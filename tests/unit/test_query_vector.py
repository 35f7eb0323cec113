"""`HybridRetriever.search(..., query_vector=...)`: a precomputed query embedding replaces
encoding the query text, and gives the same hits as letting the retriever encode it."""

from __future__ import annotations

import numpy as np
import pytest

from retrievekit.errors import InvalidInputError


def _ranked(hits):
    return [(h.id, round(h.score, 6), h.ranks) for h in hits]


@pytest.mark.parametrize("mode", ["hybrid", "dense"])
def test_precomputed_vector_gives_the_same_hits(retriever, mode):
    query = "a pet that purrs"
    vec = retriever.embedder.embed_query(query)
    expected = retriever.search(query, k=5, mode=mode)
    got = retriever.search(query, k=5, mode=mode, query_vector=vec)
    # the same order and ranks; scores to float32 noise (the query is encoded again, and
    # a last-bit difference once fell across round()'s sixth decimal: 0.496485 / 0.496484)
    assert [(h.id, h.ranks) for h in got] == [(h.id, h.ranks) for h in expected]
    assert [h.score for h in got] == pytest.approx([h.score for h in expected], abs=1e-5)
    assert got, "the fixture corpus should match something"


def test_vector_is_used_instead_of_the_text(retriever):
    # Dense side: the vector of another query decides the ranking, not the text.
    bread = retriever.embedder.embed_query("baking sourdough bread")
    hits = retriever.search("a pet that purrs", k=1, mode="dense", query_vector=bread)
    assert hits[0].id == "bread"
    # The caller's array is left as it was.
    before = bread.copy()
    retriever.search("x", k=2, query_vector=bread)
    assert np.array_equal(bread, before)


def test_sparse_mode_ignores_a_valid_vector(retriever):
    vec = retriever.embedder.embed_query("cats")
    assert _ranked(retriever.search("cats", k=3, mode="sparse", query_vector=vec)) == \
        _ranked(retriever.search("cats", k=3, mode="sparse"))


@pytest.mark.parametrize("bad", [np.zeros(7, np.float32), np.zeros((1, 384), np.float32),
                                 np.full(384, np.nan, np.float32), "not a vector"])
def test_wrong_vectors_are_rejected(retriever, bad):
    with pytest.raises(InvalidInputError, match="query_vector"):
        retriever.search("cats", k=3, query_vector=bad)
