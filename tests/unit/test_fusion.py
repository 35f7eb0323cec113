"""RRF with hand-computed expected numbers (k=60, ranks from 1)."""

from __future__ import annotations

import pytest

from retrievekit.errors import ConfigError
from retrievekit.fusion import reciprocal_rank_fusion


def test_two_lists_hand_computed():
    dense = [("a", 0.9), ("b", 0.8), ("c", 0.7)]
    sparse = [("c", 12.0), ("a", 10.0), ("d", 3.0)]
    fused = reciprocal_rank_fusion({"dense": dense, "sparse": sparse}, k=60)
    got = {f.id: f.score for f in fused}
    assert got["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert got["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert got["b"] == pytest.approx(1 / 62)
    assert got["d"] == pytest.approx(1 / 63)
    assert [f.id for f in fused] == ["a", "c", "b", "d"]
    a = fused[0]
    assert a.ranks == {"dense": 1, "sparse": 2}
    assert a.scores == {"dense": 0.9, "sparse": 10.0}


def test_weights_change_the_order():
    dense = [("a", 1.0), ("b", 0.5)]
    sparse = [("b", 5.0), ("a", 1.0)]
    even = reciprocal_rank_fusion({"dense": dense, "sparse": sparse})
    # a and b tie at 1/61 + 1/62; both best single rank 1 -> id order
    assert [f.id for f in even] == ["a", "b"]
    tilted = reciprocal_rank_fusion({"dense": dense, "sparse": sparse},
                                    weights={"dense": 0.5, "sparse": 2.0})
    assert [f.id for f in tilted] == ["b", "a"]
    assert tilted[0].score == pytest.approx(0.5 / 62 + 2.0 / 61)


def test_tie_break_best_single_rank_then_id():
    # x: ranks 1 and 4 -> 1/61 + 1/64 ; y: ranks 2 and 3 -> 1/62 + 1/63
    # 1/61+1/64 = 0.0320184..., 1/62+1/63 = 0.0319995...: not a tie, x first
    l1 = [("x", 1), ("y", 1), ("p", 1), ("q", 1)]
    l2 = [("p", 1), ("q", 1), ("y", 1), ("x", 1)]
    fused = reciprocal_rank_fusion({"l1": l1, "l2": l2}, k=0)
    # with k=0: x = 1 + 1/4 = 1.25, p = 1/3 + 1 = 1.333, y = 1/2 + 1/3, q = 1/4 + 1/2
    assert [f.id for f in fused] == ["p", "x", "y", "q"]
    # exact tie: same score and same best rank -> by id
    tie = reciprocal_rank_fusion({"l1": [("b", 1), ("a", 1)], "l2": [("a", 1), ("b", 1)]})
    assert [f.id for f in tie] == ["a", "b"]


def test_dedup_by_id_keeps_first_occurrence():
    fused = reciprocal_rank_fusion({"l": [("a", 3.0), ("a", 2.0), ("b", 1.0)]})
    assert [(f.id, f.ranks["l"]) for f in fused] == [("a", 1), ("b", 2)]
    assert fused[1].score == pytest.approx(1 / 62)


def test_missing_from_list_adds_zero_and_empty_lists():
    fused = reciprocal_rank_fusion({"a": [("x", 1.0)], "b": []})
    assert fused[0].score == pytest.approx(1 / 61)
    assert reciprocal_rank_fusion({"a": [], "b": []}) == []


@pytest.mark.parametrize("bad", [{"k": -1}, {"k": "60"}, {"weights": {"l": -1.0}},
                                 {"weights": {"nope": 1.0}}])
def test_bad_parameters_are_named(bad):
    with pytest.raises(ConfigError) as err:
        reciprocal_rank_fusion({"l": [("a", 1.0)]}, **bad)
    assert ("rrf_k" in str(err.value)) or ("weight" in str(err.value))


# -- the reranker blend (retrievekit.rerank.blend_order) -------------------------------------


def test_blend_order_hand_computed():
    from retrievekit.rerank import blend_order

    scores = [0.1, 0.9, 0.5]  # candidates in first-stage order 0, 1, 2
    order, rank, final = blend_order(scores, 1.0)
    assert order == [1, 2, 0] and rank == [3, 1, 2] and final == pytest.approx(scores)
    order, rank, final = blend_order(scores, 0.5, 60)
    assert rank == [3, 1, 2]
    assert final == pytest.approx([0.5 / 61 + 0.5 / 63, 0.5 / 62 + 0.5 / 61,
                                   0.5 / 63 + 0.5 / 62])
    assert order == [1, 0, 2]
    # a small weight keeps the first-stage order
    assert blend_order(scores, 0.01)[0] == [0, 1, 2]
    # a tie in the blend goes to the better reranker rank: positions 0/1 swap ranks 2/1
    order, _, final = blend_order([0.5, 0.9], 0.5, 60)
    assert final[0] == pytest.approx(final[1]) and order == [1, 0]
    assert blend_order([], 0.5) == ([], [], [])


@pytest.mark.parametrize("weight", [0, -0.1, 1.5, True, "0.5", float("nan")])
def test_blend_weight_must_be_in_0_1(weight):
    from retrievekit.rerank import RerankConfig, blend_order

    with pytest.raises(ConfigError, match="weight"):
        blend_order([0.1, 0.2], weight)
    with pytest.raises(ConfigError, match=r"reranker\.weight"):
        RerankConfig(weight=weight)


def test_blend_rrf_k_checked_and_config_round_trips():
    from retrievekit.config import RetrieverConfig
    from retrievekit.rerank import RerankConfig

    with pytest.raises(ConfigError, match=r"reranker\.rrf_k"):
        RerankConfig(rrf_k=-1)
    cfg = RetrieverConfig(reranker=RerankConfig(model="m", weight=0.6, rrf_k=20))
    again = RetrieverConfig.from_dict(cfg.to_dict())
    assert again.reranker.weight == 0.6 and again.reranker.rrf_k == 20


def test_fusion_by_document_takes_each_sides_best_chunk():
    """Document A's best dense chunk (A#chunk1) and best BM25 chunk (A#chunk0) differ:
    fused by document A gets 1/61 + 1/61; fused by record each chunk gets only 1/61."""
    from retrievekit.searcher import FusionSettings, fuse

    lists = {"dense": [("A#chunk1", 0.9), ("B", 0.8), ("A#chunk0", 0.7)],
             "sparse": [("A#chunk0", 12.0), ("C", 5.0), ("B", 4.0)]}
    by_doc = fuse(lists, FusionSettings(60, {"dense": 1.0, "sparse": 1.0}, None, None, True))
    assert [f.id for f in by_doc] == ["A#chunk1", "B", "C"]  # A shown by its dense chunk
    a, b, c = by_doc
    assert a.score == pytest.approx(2 / 61) and a.ranks == {"dense": 1, "sparse": 1, "fused": 1}
    assert a.scores["dense"] == 0.9 and a.scores["sparse"] == 12.0
    assert b.score == pytest.approx(1 / 62 + 1 / 63) and c.score == pytest.approx(1 / 62)
    by_record = fuse(lists, FusionSettings(60, {"dense": 1.0, "sparse": 1.0}, None, None,
                                           False))
    top = {f.id: f.score for f in by_record}
    assert top["A#chunk1"] == pytest.approx(1 / 61)
    assert top["A#chunk0"] == pytest.approx(1 / 63 + 1 / 61)


def test_document_is_shown_by_the_chunk_ranked_best_on_any_side():
    from retrievekit.searcher import FusionSettings, fuse

    lists = {"dense": [("B", 0.9), ("C", 0.8), ("A#chunk2", 0.7)],
             "sparse": [("A#chunk0", 9.0)]}
    fused = fuse(lists, FusionSettings(60, {"dense": 1.0, "sparse": 1.0}, None, None, True))
    assert fused[0].id == "A#chunk0"  # sparse rank 1 beats dense rank 3
    single = fuse({"sparse": [("A#chunk3", 2.0), ("A#chunk0", 1.0), ("B", 0.5)]},
                  FusionSettings(60, {"dense": 1.0, "sparse": 1.0}, None, None, True))
    assert [(f.id, f.ranks) for f in single] == [("A#chunk3", {"sparse": 1}),
                                                  ("B", {"sparse": 2})]


def test_relative_score_fusion_by_hand():
    """min-max per list, weighted sum; a list without the id adds 0 (LlamaIndex's
    relative_score, Weaviate's relativeScoreFusion)."""
    from retrievekit.fusion import score_fusion

    ranked = {"dense": [("a", 0.9), ("b", 0.7), ("c", 0.5)],
              "sparse": [("c", 12.0), ("d", 6.0), ("a", 3.0), ("a", 1.0)]}
    out = score_fusion(ranked, method="relative_score", weights={"dense": 1.0, "sparse": 0.5})
    # dense: a 1, b 0.5, c 0; sparse (a's repeat ignored): c 1, d 1/3, a 0
    expected = {"a": 1.0, "b": 0.5, "c": 0.5, "d": 0.5 / 3}
    assert [f.id for f in out] == ["a", "c", "b", "d"]  # b and c tie: c's best rank is 1
    assert {f.id: f.score for f in out} == pytest.approx(expected)
    assert out[1].ranks == {"dense": 3, "sparse": 1} and out[1].scores["sparse"] == 12.0


def test_tie_on_fused_score_breaks_by_best_rank_then_id():
    from retrievekit.fusion import score_fusion

    ranked = {"dense": [("x", 2.0), ("y", 1.0)], "sparse": [("y", 5.0), ("x", 1.0)]}
    out = score_fusion(ranked, method="relative_score")
    assert [(f.id, f.score) for f in out] == [("x", 1.0), ("y", 1.0)]  # both rank 1 once


def test_dbsf_by_hand():
    """Scores mapped by mean ± 3 sd to [0, 1], clipped (Qdrant's DBSF)."""
    from retrievekit.fusion import score_fusion

    out = score_fusion({"dense": [("a", 3.0), ("b", 1.0)]}, method="dbsf")
    # mean 2, sd 1: a -> (3 - -1) / 6 = 2/3, b -> 2/6
    assert [(f.id, round(f.score, 6)) for f in out] == [("a", round(2 / 3, 6)),
                                                         ("b", round(1 / 3, 6))]
    equal = score_fusion({"dense": [("a", 0.5), ("b", 0.5)]}, method="dbsf")
    assert [f.score for f in equal] == [1.0, 1.0]


def test_unknown_fusion_method_is_refused():
    from retrievekit.config import RetrieverConfig
    from retrievekit.errors import ConfigError
    from retrievekit.fusion import score_fusion

    with pytest.raises(ConfigError, match="fusion must be one of"):
        RetrieverConfig(fusion="borda")
    with pytest.raises(ConfigError, match="relative_score"):
        score_fusion({"dense": [("a", 1.0)]}, method="rrf")


def test_later_chunks_pay_the_chunk_penalty():
    """B's third chunk is nearer than A's first, but by less than the penalty: A comes first;
    C's second chunk beats its first by more than the penalty and keeps its place."""
    from retrievekit.records import chunk_position
    from retrievekit.searcher import _prefer_first_chunks

    items = [("B#chunk2", 0.80), ("A", 0.78), ("C#chunk1", 0.70), ("B#chunk0", 0.60),
             ("C#chunk0", 0.50)]
    out = _prefer_first_chunks(items, 0.05)
    assert [rid for rid, _ in out] == ["A", "B#chunk2", "C#chunk1", "B#chunk0", "C#chunk0"]
    assert dict(out)["B#chunk2"] == pytest.approx(0.75) and dict(out)["A"] == 0.78
    assert _prefer_first_chunks(items, 0.0) == items
    assert [chunk_position(r) for r in ("A", "A#chunk0", "A#chunk12", "A#chunkX")] == \
        [0, 0, 12, 0]


@pytest.mark.parametrize("bad", [-0.1, 3, True, "0.05", float("nan")])
def test_bad_chunk_penalty_is_refused(bad):
    from retrievekit.config import RetrieverConfig
    from retrievekit.errors import ConfigError

    with pytest.raises(ConfigError, match="chunk_penalty"):
        RetrieverConfig(chunk_penalty=bad)


def test_the_exact_plan_keeps_the_n_best_after_the_chunk_penalty():
    """The exact scan cut its n nearest by raw cosine and only then took `chunk_penalty` off
    later chunks: a first chunk just past the raw n-th, which the penalty puts inside the
    n best, was lost. Against ranking everything by the penalized score."""
    import numpy as np

    from retrievekit.searcher import _prefer_first_chunks, _top_after_penalty

    rng = np.random.default_rng(7)
    for trial in range(300):
        count = int(rng.integers(1, 60))
        ids = [f"d{i}#chunk{int(rng.integers(0, 3))}" if rng.random() < 0.6 else f"d{i}"
               for i in range(count)]
        sims = rng.normal(0.5, 0.08, count).astype(np.float32)
        n, penalty = int(rng.integers(1, 12)), float(rng.choice([0.0, 0.02, 0.05, 0.2]))
        got = _top_after_penalty(ids, sims, n, penalty)
        assert list(got) == sorted(got, key=lambda i: (-float(sims[i]), i))  # raw order
        raw = sorted(range(count), key=lambda i: (-float(sims[i]), i))
        everything = _prefer_first_chunks([(ids[i], float(sims[i])) for i in raw], penalty)
        want = {rid for rid, _ in everything[:n]}
        assert {ids[i] for i in got} == want, trial


def test_the_partial_sort_is_the_head_of_a_stable_argsort():
    """The exact scan takes its head by partition instead of sorting every cosine; ties at
    the cut (kept in position order) and NaN (last) must come out as the full sort has them."""
    import numpy as np

    from retrievekit.searcher import _raw_top

    rng = np.random.default_rng(3)
    for trial in range(2000):
        count = int(rng.integers(1, 200))
        m = int(rng.integers(1, count + 5))
        sims = (rng.choice(np.linspace(0, 1, int(rng.integers(1, 12))), count) if trial % 2
                else rng.normal(size=count)).astype(np.float32)
        if trial % 5 == 0:
            sims[rng.integers(0, count)] = np.nan
        want = np.argsort(-sims, kind="stable")[:m]
        assert list(_raw_top(sims, m)) == list(want), trial
