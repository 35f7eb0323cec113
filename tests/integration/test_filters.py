"""Filters evaluated inside the BM25 index agree with Chroma's own `where`, record for record.

Random metadata (str, int, float, bool, lists, missing keys) and random filters over it
($eq, $ne, $in, $nin, $contains, $and, $or, nested); the oracle is `Collection.get(where=)`
of a real (in-memory) Chroma collection holding the same metadata.
"""

from __future__ import annotations

import random
import uuid

import chromadb
import pytest
from chromadb.config import Settings

from retrievekit.records import Record
from retrievekit.searcher import EXACT_SCAN_SHARE, POST_FILTER_SHARE
from retrievekit.sparse import SparseIndex

KEYS = ["lang", "year", "score", "flag", "tags"]


def _metadata(rng: random.Random) -> dict:
    meta = {}
    if rng.random() < 0.8:
        meta["lang"] = rng.choice(["en", "fr", "de", "EN", "en "])
    if rng.random() < 0.8:
        meta["year"] = rng.choice([2020, 2021, 2022, 2021.0, 2023.5])
    if rng.random() < 0.5:
        meta["score"] = rng.choice([0, 1, 1.0, -3, 0.5])
    if rng.random() < 0.6:
        meta["flag"] = rng.choice([True, False])
    if rng.random() < 0.4:
        meta["tags"] = rng.sample(["a", "b", "c"], rng.randint(1, 2))
    return meta


def _scalar(rng: random.Random, key: str):
    return {"lang": lambda: rng.choice(["en", "fr", "xx", "EN"]),
            "year": lambda: rng.choice([2020, 2021, 2021.0, 2023, 2023.0, 1999]),
            "score": lambda: rng.choice([0, 1, 1.0, -3, -3.0, True]),
            "flag": lambda: rng.choice([True, False]),
            "tags": lambda: rng.choice(["a", "b", "z"])}[key]()


def _leaf(rng: random.Random) -> dict:
    key = rng.choice(KEYS)
    op = rng.choice(["plain", "$eq", "$ne", "$in", "$nin"] + (["$contains"] * 2
                                                             if key == "tags" else []))
    if op == "plain":
        return {key: _scalar(rng, key)}
    if op in ("$in", "$nin"):
        first = _scalar(rng, key)
        same = [v for v in (_scalar(rng, key) for _ in range(3)) if type(v) is type(first)]
        return {key: {op: [first] + same}}
    return {key: {op: _scalar(rng, key)}}


def _where(rng: random.Random, depth: int = 0) -> dict:
    if depth < 2 and rng.random() < 0.35:
        op = rng.choice(["$and", "$or"])
        return {op: [_where(rng, depth + 1) for _ in range(rng.randint(2, 3))]}
    return _leaf(rng)


@pytest.fixture(scope="module")
def both():
    rng = random.Random(7)
    metas = [_metadata(rng) for _ in range(300)]
    ids = [f"r{i}" for i in range(len(metas))]
    client = chromadb.EphemeralClient(settings=Settings(anonymized_telemetry=False))
    col = client.get_or_create_collection(f"filters-{uuid.uuid4().hex[:8]}",
                                          embedding_function=None)
    col.add(ids=ids, embeddings=[[1.0, 0.0]] * len(ids),
            metadatas=[m or {"_rk_parent": i} for m, i in zip(metas, ids)])
    index = SparseIndex()
    index.replace([], [Record(i, i, "text", m) for i, m in zip(ids, metas)])
    index.commit(1)
    return col, index, ids


def test_random_filters_match_chroma_exactly(both):
    from chromadb.api.types import validate_where

    col, index, ids = both
    rng = random.Random(11)
    checked = unsupported = 0
    for _ in range(400):
        where = _where(rng)
        try:
            validate_where(where)
            expected = set(col.get(where=where, include=[])["ids"])
        except Exception:
            continue  # Chroma refuses it (e.g. a mixed-type $in): the searcher reports that
        matching = index.compile(where)
        if matching is None:
            unsupported += 1
            continue
        assert index.keep(ids, matching) == expected, where
        assert index.count(matching) == len(expected), where
        checked += 1
    assert checked >= 300 and unsupported == 0


def test_ranges_and_unknown_operators_fall_back_to_chroma(both):
    _, index, _ = both
    for where in [{"year": {"$gt": 2020}}, {"year": {"$lte": 2021}},
                  {"tags": {"$not_contains": "a"}}, {"lang": {"$like": "e%"}},
                  {"$and": [{"lang": "en"}, {"year": {"$gte": 2021}}]},
                  {"score": 2 ** 60}, {"score": 0.5}, {"year": {"$in": [2020, 2023.5]}}]:
        assert index.compile(where) is None, where


def test_a_filter_does_not_change_bm25_scores():
    index = SparseIndex()
    index.replace([], [Record("a", "a", "red apple", {"lang": "en"}),
                       Record("b", "b", "green apple pie", {"lang": "fr"}),
                       Record("c", "c", "apple", {"lang": "en"})])
    index.commit(1)
    plain = dict(index.search("apple", 5))
    only_en = index.search("apple", 5, matching=index.compile({"lang": "en"}))
    assert {d for d, _ in only_en} == {"a", "c"}
    assert all(s == plain[d] for d, s in only_en)


@pytest.fixture(scope="module", params=[False, True], ids=["chroma-vectors", "local-vectors"])
def filtered_store(request, tmp_path_factory, tiny_embedder):
    from retrievekit.pipeline import HybridRetriever

    rng = random.Random(5)
    path = tmp_path_factory.mktemp("filtered") / "s"
    # ef_search above the record count: HNSW answers exactly, so the oracle can be exact
    r = HybridRetriever({"store": {"path": str(path), "hnsw_ef_search": 1000},
                         "local_vectors": request.param}, embedder=tiny_embedder)
    docs = []
    for i in range(600):
        meta = _metadata(rng)
        meta["bucket"] = i % 150  # 4 records a value: selective, Chroma's plan
        docs.append({"text": f"record {i} " + " ".join(rng.sample(WORDS, 4)), "id": f"d{i}",
                     "metadata": meta})
    r.add_documents(docs)
    yield r
    r.close()


WORDS = ["river", "stone", "cloud", "engine", "garden", "signal", "copper", "lantern",
         "harbor", "meadow", "glacier", "orbit"]


def _exact(r, where, qvec, k):
    """The k best cosine similarities among the records Chroma's `where` selects."""
    import numpy as np

    got = r.store.get(where=where, include=["embeddings", "metadatas"])
    sims = sorted((float(np.asarray(v) @ qvec) for v, m in zip(got["embeddings"],
                                                               got["metadatas"]) if m),
                  reverse=True)
    return sims[:k]


def test_filtered_dense_search_is_exactly_the_filtered_answer(filtered_store, tiny_embedder):
    """Every plan (post-filtering a broad filter's unfiltered neighbours; for a selective
    one Chroma's filtered query, or with local_vectors an exact scan) gives the exact
    filtered top k: no hit outside the filter, k hits whenever k exist. Oracle: exact cosine
    over the vectors Chroma's `where` selects. With local_vectors a broad filter is
    post-filtered on the 8-bit in-process graph: exact scores, and at most one of the exact
    top 10 missed at a near tie (these random queries sit near zero similarity, where the
    8-bit rounding matters most)."""
    import numpy as np

    r = filtered_store
    rng = random.Random(13)
    nrng = np.random.default_rng(0)
    plans = {"post": 0, "chroma": 0}
    graph_misses = 0
    for i in range(60):
        where = _where(rng) if i % 3 else {"bucket": rng.randrange(150)}
        try:
            expected_pool = set(r.store.get(where=where, include=[])["ids"])
        except Exception:
            continue
        qvec = nrng.standard_normal(tiny_embedder.dim).astype(np.float32)
        qvec /= np.linalg.norm(qvec)
        hits = r.search("record", k=10, mode="dense", where=where, candidates=10,
                        query_vector=qvec)
        assert {h.id for h in hits} <= expected_pool, where
        share = len(expected_pool) / 600
        exact = _exact(r, where, qvec, 10)
        if r.config.local_vectors and share >= EXACT_SCAN_SHARE:
            # post-filtered on the in-process graph, whose 8-bit distances pick the
            # candidates: exact scores, the exact top 10 but for at most one near the cut
            missed = [s for s in exact if not any(abs(h.score - s) < 1e-5 for h in hits)]
            assert len(missed) <= 1, (where, missed)
            graph_misses += len(missed)
        else:  # compared by similarity, so that ties (equal texts) may come in either order
            np.testing.assert_allclose([h.score for h in hits], exact, atol=1e-5,
                                       err_msg=str(where))
        assert len(hits) == min(10, len(expected_pool))  # k hits whenever k exist
        plans["post" if share >= POST_FILTER_SHARE else "chroma"] += 1
        if hits and share < EXACT_SCAN_SHARE and r.config.local_vectors:  # exact scan answered
            assert hits[0].ranks == {"dense": 1} and "funnel" not in hits[0].ranks
        # the sparse side filters inside the BM25 index: same pool
        for h in r.search("river stone cloud", k=50, mode="sparse", where=where):
            assert h.id in expected_pool
    assert plans["post"] >= 10 and plans["chroma"] >= 10, plans
    assert graph_misses <= 6, graph_misses  # recall@10 >= 0.99 over the graph's queries



def test_local_vectors_follow_writes_and_reopen_without_encoding(tmp_path, tiny_embedder):
    """The local copy is a derived index: it follows updates and deletes, survives a reopen,
    and is rebuilt from the vectors Chroma holds (no text encoded again) when lost."""
    import shutil

    import numpy as np

    from retrievekit.pipeline import HybridRetriever

    path = str(tmp_path / "s")
    cfg = {"store": {"path": path}, "local_vectors": True}
    docs = [{"text": f"record {i} river", "id": f"d{i}", "metadata": {"bucket": i % 200}}
            for i in range(400)]
    with HybridRetriever(cfg, embedder=tiny_embedder) as r:
        r.add_documents(docs)
        r.add_documents([{"text": "a new text for d0", "id": "d0", "metadata": {"bucket": 0}}])
        r.delete(["d200"])
        assert r.verify()["ok"] and r.verify()["funnel_ids"] == r.verify()["chroma_ids"]
    calls = []
    encode = tiny_embedder.embed_documents

    def counting(texts, *a, **k):
        calls.append(len(texts))
        return encode(texts, *a, **k)

    tiny_embedder.embed_documents = counting
    try:
        shutil.rmtree(tmp_path / "s" / "retrievekit" / "retrievekit" / "funnel")
        with HybridRetriever(cfg, embedder=tiny_embedder) as r:
            assert r.verify()["ok"] and len(r.verify()["funnel_ids"]) == 399
            q = tiny_embedder.embed_query("a new text")
            hits = r.search("x", 3, mode="dense", where={"bucket": 0}, query_vector=q)
            assert [h.id for h in hits] == ["d0"]  # d200 is gone, d0 has its new vector
            assert hits[0].score == pytest.approx(float(
                np.asarray(r.store.get(ids=["d0"], include=["embeddings"])["embeddings"][0])
                @ q), abs=1e-5)
    finally:
        tiny_embedder.embed_documents = encode
    assert calls == []  # rebuilt from Chroma's vectors


def test_post_filtering_widens_until_k_pass():
    """The passing records sit past the first over-fetch (ranks 91-100 of 100, a share of
    0.1): the first list of 5 / 0.1 * 1.5 + 5 = 80 holds none, so it must widen."""
    from retrievekit.searcher import _post_filtered

    ranked = [(f"r{i}", 1.0 - i / 100) for i in range(100)]
    asked = []

    def query(m):
        asked.append(m)
        return ranked[:m]

    out = _post_filtered(query, lambda ids: {i for i in ids if int(i[1:]) >= 90}, 5, 0.1, 100)
    assert [rid for rid, _ in out] == ["r90", "r91", "r92", "r93", "r94"]
    assert asked == [80, 100]
    # fewer than n pass in the whole collection: all of them, after asking for everything
    out = _post_filtered(query, lambda ids: {"r99"}, 5, 0.01, 100)
    assert out == [("r99", ranked[99][1])] and asked[-1] == 100
