"""Filters evaluated inside the BM25 index agree with Chroma's own `where`, record for record.

Random metadata (str, int, float, bool, lists, missing keys) and random filters over it
($eq, $ne, $in, $nin, $contains, $not_contains, $gt, $gte, $lt, $lte, $and, $or, nested);
the oracle is `Collection.get(where=)` of a real (in-memory) Chroma collection holding the
same metadata.
"""

from __future__ import annotations

import random
import uuid

import chromadb
import numpy as np
import pytest
from chromadb.config import Settings

from retrievekit.records import Record
from retrievekit.searcher import EXACT_SCAN_SHARE, POST_FILTER_SHARE, READ_SCAN
from retrievekit.sparse import Snapshot, SparseIndex

KEYS = ["lang", "year", "score", "flag", "tags"]


def _metadata(rng: random.Random) -> dict:
    meta = {}
    if rng.random() < 0.8:
        meta["lang"] = rng.choice(["en", "fr", "de", "EN", "en "])
    if rng.random() < 0.8:
        meta["year"] = rng.choice([2020, 2021, 2022, 2021.0, 2023.5, 2020.9999999999998,
                                   2021.0000000000002])
    if rng.random() < 0.5:
        meta["score"] = rng.choice([0, 1, 1.0, -3, 0.5, -0.5, -0.0, -3.5, 2 ** 60, 1e300,
                                    0.9999999999999999, 0.30000000000000004])
    if rng.random() < 0.6:
        meta["flag"] = rng.choice([True, False])
    if rng.random() < 0.4:
        meta["tags"] = rng.sample(["a", "b", "c"], rng.randint(1, 2))
    return meta


def _scalar(rng: random.Random, key: str):
    return {"lang": lambda: rng.choice(["en", "fr", "xx", "EN"]),
            "year": lambda: rng.choice([2020, 2021, 2021.0, 2023, 2023.0, 1999, 2023.5,
                                        2021.7]),
            "score": lambda: rng.choice([0, 1, 1.0, -3, -3.0, True, 0.5, -0.5, -3.5,
                                         0.9999999999999999, 0.30000000000000004]),
            "flag": lambda: rng.choice([True, False]),
            "tags": lambda: rng.choice(["a", "b", "z"])}[key]()


def _leaf(rng: random.Random) -> dict:
    key = rng.choice(KEYS)
    op = rng.choice(["plain", "$eq", "$ne", "$in", "$nin"]
                    + (["$contains", "$contains", "$not_contains"] if key == "tags" else [])
                    + (["$gt", "$gte", "$lt", "$lte"] if key in ("year", "score") else []))
    if op == "plain":
        return {key: _scalar(rng, key)}
    if op.startswith(("$gt", "$lt")):
        return {key: {op: rng.choice([2020, 2021, 2021.0, 2021.5, 2022.9, 2023.5, -2.5, 0,
                                      0.5, 1, 1.0, -3, -3.5, -0.0, 1999, 2 ** 53,
                                      # Chroma reads these as 1.0 and 2021.0
                                      0.9999999999999999, 2020.9999999999998])}}
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
    index = _indexed(col, ids)
    return col, index, ids


def _indexed(col, ids):
    """A BM25 index of the records as Chroma holds them: read back, as the pipeline's
    index follows Chroma (Chroma moves some floats of 16-17 digits by an ulp or two)."""
    held = col.get(ids=ids, include=["metadatas"])
    index = SparseIndex()
    index.replace([], [Record(i, i, "text", {k: v for k, v in m.items() if k != "_rk_parent"})
                       for i, m in zip(held["ids"], held["metadatas"])])
    index.commit(1)
    return index


def test_random_filters_match_chroma_exactly(both):
    from chromadb.api.types import validate_where

    col, index, ids = both
    rng = random.Random(11)
    checked = unsupported = remembered = 0
    seen = set()
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
        now = index.reader()
        assert now.keep(ids, matching) == expected, where
        assert now.count(matching) == len(expected), where
        checked += 1
        # remembered from the second ask on (within the budget: half the records)
        assert now.subset(matching) is None or matching.key in seen, where
        seen.add(matching.key)
        subset = now.subset(matching)
        if len(expected) <= 150:
            assert subset.members == expected and sorted(subset.ids) == sorted(expected), where
            remembered += 1
        else:
            assert subset is None, where
    assert checked >= 300 and unsupported == 0 and remembered >= 150


#: a metadata value longer than tantivy's longest term (65,530 bytes with its key)
LONG = "x" * 65_525
#: metadata whose keys or values read like another key's term, signed zeros, and numbers
#: past 2**53 (where an int and a float of "the same" value no longer compare as one)
TRICKY = [{"a": "b=s:c"}, {"a=s:b": "c"}, {"t": ["x"]}, {"t[]": "x"}, {"a": "z=n:1.0"},
          {"a=s:z": 1}, {"x": 0}, {"x": 0.0}, {"x": -0.0}, {"x": 2 ** 60},
          {"x": float(2 ** 60)}, {"x": 2 ** 53 + 2}, {"\"q\"": "v"}, {"x": 1},
          # list elements keep their number type ($contains tells 1 from 1.0), a numpy
          # float is a float, values and keys too long for one tantivy term are hashed
          {"l": [1, 2]}, {"l": [1.0, 2.5]}, {"l": [0]}, {"l": [-0.0]}, {"l": [2 ** 40]},
          {"l": [float(2 ** 40)]}, {"y": np.float64(2021.0)}, {"y": 2021},
          {"k": LONG}, {"k": LONG + "y"}, {LONG: 1}]
TRICKY_WHERE = [{"a": "b=s:c"}, {"a=s:b": "c"}, {"t": {"$contains": "x"}}, {"t[]": "x"},
                {"a": "z=n:1.0"}, {"a=s:z": 1}, {"x": -0.0}, {"x": 0}, {"x": {"$ne": -0.0}},
                {"x": {"$nin": [-0.0, 1.0]}}, {"x": float(2 ** 60)}, {"x": 2 ** 60},
                {"x": {"$ne": float(2 ** 60)}}, {"x": {"$in": [float(2 ** 53 + 2)]}},
                {"\"q\"": "v"}, {"a": {"$ne": "b=s:c"}},
                {"l": {"$contains": 1}}, {"l": {"$contains": 1.0}}, {"l": {"$contains": 0}},
                {"l": {"$contains": 0.0}}, {"l": {"$contains": -0.0}},
                {"l": {"$contains": 2 ** 40}}, {"l": {"$contains": float(2 ** 40)}},
                {"y": np.float64(2021.0)}, {"y": {"$ne": np.float64(2021.0)}},
                {"y": {"$in": [np.float64(2021.0)]}}, {"k": LONG}, {"k": {"$ne": LONG}},
                {"k": {"$in": [LONG + "y", "z"]}}, {LONG: 1}, {LONG: {"$ne": 1}},
                # comparisons: signed zeros, values past 2**53, lists, strings and bools
                {"x": {"$gt": 0}}, {"x": {"$gte": -0.0}}, {"x": {"$lt": 0.0}},
                {"x": {"$lte": 0}}, {"x": {"$gt": 2 ** 53}}, {"x": {"$gte": float(2 ** 53)}},
                {"l": {"$gt": 0}}, {"l": {"$lte": 2 ** 40}}, {"y": {"$gte": 2021}},
                {"y": {"$lt": 2021.5}}, {"a": {"$gt": 0}}, {LONG: {"$gte": 1}},
                # a fractional float: its integer part for ints, not for a list's ints
                {"x": 0.5}, {"x": -0.5}, {"x": {"$ne": 0.5}}, {"x": {"$in": [0.5, 1.5]}},
                {"x": {"$nin": [-0.5, 2.5]}}, {"l": {"$contains": 2.5}},
                {"l": {"$contains": 0.5}}, {"y": 2021.5}, {"a": 0.5},
                {"l": {"$not_contains": 1}}, {"l": {"$not_contains": 2.5}},
                {"t": {"$not_contains": "x"}}, {"a": {"$not_contains": "b=s:c"}},
                # operands Chroma reads as their neighbours (1.0, 2021.0)
                {"x": 0.9999999999999999}, {"x": {"$lte": 0.9999999999999999}},
                {"l": {"$contains": 0.9999999999999999}}, {"y": {"$gte": 2020.9999999999998}}]


def test_keys_and_numbers_that_look_alike_match_as_chroma_does():
    ids = [f"r{i}" for i in range(len(TRICKY))]
    client = chromadb.EphemeralClient(settings=Settings(anonymized_telemetry=False))
    col = client.get_or_create_collection(f"tricky-{uuid.uuid4().hex[:8]}",
                                          embedding_function=None)
    col.add(ids=ids, embeddings=[[1.0, 0.0]] * len(ids), metadatas=TRICKY)
    index = _indexed(col, ids)
    evaluated = 0
    for where in TRICKY_WHERE:
        expected = set(col.get(where=where, include=[])["ids"])
        matching = index.compile(where)
        if matching is not None:  # None: Chroma evaluates it (numbers past 2**53)
            assert index.reader().keep(ids, matching) == expected, where
            evaluated += 1
    assert evaluated >= 55


def test_ranges_and_unknown_operators_fall_back_to_chroma(both):
    _, index, _ = both
    for where in [{"year": {"$gt": 2 ** 53 + 1}}, {"year": {"$lte": -1e20}},
                  {"lang": {"$like": "e%"}},
                  {"$and": [{"lang": "en"}, {"year": {"$gte": 2 ** 60}}]},
                  {"score": 2 ** 60}, {"score": float(2 ** 60)},
                  {"year": {"$in": [2020, float(2 ** 54)]}}]:
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


@pytest.mark.parametrize("read_scan", [True, False], ids=["read-scan", "no-read-scan"])
def test_filtered_dense_search_is_exactly_the_filtered_answer(filtered_store, tiny_embedder,
                                                              monkeypatch, read_scan):
    """Every plan (post-filtering a broad filter's unfiltered neighbours; for a selective
    one an exact scan of its vectors read from Chroma, remembered or not, or with
    local_vectors an exact scan of those held) gives the exact
    filtered top k: no hit outside the filter, k hits whenever k exist. Oracle: exact cosine
    over the vectors Chroma's `where` selects. With local_vectors a broad filter is
    post-filtered on the 8-bit in-process graph: exact scores, and at most one of the exact
    top 10 missed at a near tie (these random queries sit near zero similarity, where the
    8-bit rounding matters most)."""
    import numpy as np

    from retrievekit import searcher

    if not read_scan:
        monkeypatch.setattr(searcher, "READ_SCAN", 0.0)
    r = filtered_store
    rng = random.Random(13)
    nrng = np.random.default_rng(0)
    plans = {"post": 0, "scan": 0, "read": 0}
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
        passing = len(expected_pool)
        plans["read" if read_scan and not r.config.local_vectors
              and passing ** 2 <= searcher.READ_SCAN * 10 * 600 else
              "post" if share >= POST_FILTER_SHARE else "scan"] += 1
        if hits and share < EXACT_SCAN_SHARE and r.config.local_vectors:  # exact scan answered
            assert hits[0].ranks == {"dense": 1} and "funnel" not in hits[0].ranks
        # the sparse side filters inside the BM25 index: same pool
        for h in r.search("river stone cloud", k=50, mode="sparse", where=where):
            assert h.id in expected_pool
    if read_scan and not r.config.local_vectors:
        assert plans["read"] >= 10 and plans["post"] >= 10, plans
    else:
        assert plans["post"] >= 10 and plans["scan"] >= 10, plans
    assert graph_misses <= 6, graph_misses  # recall@10 >= 0.99 over the graph's queries


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_a_filter_only_chroma_evaluates_is_answered_exactly(filtered_store, tiny_embedder,
                                                            mode):
    """A filter the BM25 index cannot evaluate (an operand past 2**53) takes its ids from
    Chroma's `get(where=)` once a search, and both sides use them: the dense side post-
    filters an unfiltered query by them, or scans their vectors when few pass. Chroma's
    own filtered query, which can return no neighbours where records match
    (docs/reliability.md), is never asked. Oracle: exact cosine over Chroma's `where`."""
    r = filtered_store
    nrng = np.random.default_rng(7)
    big = 2 ** 60
    filters = [{"year": {"$lt": big}}, {"score": big}, {"score": {"$ne": big}},
               {"$and": [{"year": {"$lt": big}}, {"bucket": {"$in": [1, 2, 3]}}]},
               {"$or": [{"bucket": 7}, {"score": big}]},
               {"$and": [{"lang": "en"}, {"year": {"$gte": big}}]}]
    asked = []
    real_query = r.store.collection.query

    def recording(*a, **k):
        asked.append(k.get("where"))
        return real_query(*a, **k)

    r.store.collection.query = recording
    index = SparseIndex()
    try:
        shares = set()
        for where in filters:
            assert index.compile(where) is None, where
            pool = set(r.store.get(where=where, include=[])["ids"])
            share = len(pool) / 600
            shares.add("none" if not pool else "few" if share < POST_FILTER_SHARE * 8
                       else "many")
            for _ in range(3):
                qvec = nrng.standard_normal(tiny_embedder.dim).astype(np.float32)
                qvec /= np.linalg.norm(qvec)
                hits = r.search("record river", k=10, mode=mode, where=where, candidates=10,
                                query_vector=qvec)
                assert {h.id for h in hits} <= pool, where
                assert len(hits) == min(10, len(pool)), where  # k hits whenever k exist
                if mode == "dense" and not r.config.local_vectors:
                    np.testing.assert_allclose([h.score for h in hits],
                                               _exact(r, where, qvec, 10), atol=1e-5,
                                               err_msg=str(where))
    finally:
        r.store.collection.query = real_query
    assert shares == {"none", "few", "many"}, shares
    assert all(w is None for w in asked), asked



def test_a_filter_used_again_is_answered_exactly_from_its_subset(filtered_store, tiny_embedder):
    """From its second use on, a filter's matching ids are remembered (sparse.py, Subset)
    and it is answered by an exact scan of their vectors (read from Chroma once; with
    local_vectors, those held in the process for a selective filter). Each filter is asked
    three times; every answer is the exact filtered top 10, and the third ask runs no
    Chroma query at all (with local_vectors: for a selective filter)."""
    import numpy as np

    r = filtered_store
    rng = random.Random(29)
    nrng = np.random.default_rng(3)
    queries = {"n": 0}
    real_query = r.store.collection.query

    def counting(*a, **k):
        queries["n"] += 1
        return real_query(*a, **k)

    wheres = [{"bucket": b} for b in rng.sample(range(150), 4)] + \
        [{"lang": "en"}, {"flag": True}, {"$or": [{"lang": "fr"}, {"bucket": 3}]},
         {"tags": {"$contains": "a"}}]
    r.store.collection.query = counting
    try:
        for where in wheres:
            pool = set(r.store.get(where=where, include=[])["ids"])
            share = len(pool) / 600
            for use in range(3):
                qvec = nrng.standard_normal(tiny_embedder.dim).astype(np.float32)
                qvec /= np.linalg.norm(qvec)
                before = queries["n"]
                hits = r.search("record", k=10, mode="dense", where=where, candidates=10,
                                query_vector=qvec)
                assert {h.id for h in hits} <= pool and len(hits) == min(10, len(pool))
                exact = _exact(r, where, qvec, 10)
                if r.config.local_vectors and share >= EXACT_SCAN_SHARE:
                    missed = [x for x in exact if not any(abs(h.score - x) < 1e-5 for h in hits)]
                    assert len(missed) <= 1, (where, missed)  # the 8-bit graph, as above
                else:
                    np.testing.assert_allclose([h.score for h in hits], exact, atol=1e-5,
                                               err_msg=f"{where} use {use}")
                # each hit's score is its own record's similarity
                got = r.store.get(ids=[h.id for h in hits], include=["embeddings"])
                own = {i: float(np.asarray(e) @ qvec) for i, e in zip(got["ids"],
                                                                     got["embeddings"])}
                for h in hits:
                    assert h.score == pytest.approx(own[h.id], abs=1e-5), (where, h.id)
                if use == 2 and (share < EXACT_SCAN_SHARE or not r.config.local_vectors):
                    assert queries["n"] == before, where  # the exact scan answered
                if not r.config.local_vectors and len(pool) ** 2 <= READ_SCAN * 10 * 600:
                    # selective enough that reading its vectors beats a query: from the
                    # first use on
                    assert queries["n"] == before, (where, use)
    finally:
        r.store.collection.query = real_query


def _exact_docs(r, where, qvec, k):
    """The oracle: the k documents nearest `qvec` among those Chroma's `where` passes."""
    import numpy as np

    got = r.store.get(where=where, include=["embeddings", "metadatas"])
    sims = [(float(np.asarray(e) @ qvec / np.linalg.norm(e)), m["_rk_parent"])
            for e, m in zip(got["embeddings"], got["metadatas"])]
    return [doc for _, doc in sorted(sims, reverse=True)[:k]]


def test_subset_vectors_dropped_by_another_search_are_still_used(tmp_path, tiny_embedder,
                                                                monkeypatch):
    """Another search may drop a subset's vectors (its budget) right after this one held
    them, or hold them while a commit carries the subset: a search uses the vectors it read
    itself, and a commit the one pair (vectors, records still to read) it read, so no record
    goes missing from later scans."""
    import threading

    import numpy as np

    from retrievekit.pipeline import HybridRetriever

    docs = [{"id": f"d{i}", "text": f"record {i} river", "metadata": {"b": i % 4}}
            for i in range(100)]
    where = {"b": 0}
    with HybridRetriever({"store": {"path": str(tmp_path / "s"), "hnsw_ef_search": 1000}},
                         embedder=tiny_embedder) as r:
        r.add_documents(docs)
        index = r._searcher.engine.sparse  # reached into for this check only
        q = np.random.default_rng(0).standard_normal(tiny_embedder.dim).astype(np.float32)
        real_hold = Snapshot.hold

        def hold_then_dropped(self, subset, vectors):  # another search's budget, at once
            out = real_hold(self, subset, vectors)
            subset.held = (None, ())
            return out

        monkeypatch.setattr(Snapshot, "hold", hold_then_dropped)
        for _ in range(3):
            hits = r.search("x", k=5, mode="dense", where=where, query_vector=q)
            assert [h.id for h in hits] == _exact_docs(r, where, q, 5)
        monkeypatch.setattr(Snapshot, "hold", real_hold)
        r.search("x", k=5, mode="dense", where=where, query_vector=q)  # held again
        r.add_documents([{"id": "new1", "text": "a lantern", "metadata": {"b": 0}}])
        subset = index.reader().filters._subsets[index.compile(where).key]
        assert subset.held[1] == ("new1",)  # to be read on the next scan
        fired = []

        class SearchInside(list):  # runs one search while the next commit carries the pair
            def __iter__(self):
                if not fired:
                    fired.append(1)
                    t = threading.Thread(target=r.search, args=("x",), kwargs=dict(
                        k=5, mode="dense", where=where, query_vector=q))
                    t.start()
                    t.join()
                return super().__iter__()

        (found, matrix), pending = subset.held
        subset.held = ((SearchInside(found), matrix), pending)
        r.add_documents([{"id": "new2", "text": "something else", "metadata": {"b": 0}}])
        assert fired
        new1 = np.asarray(r.store.get(ids=["new1"], include=["embeddings"])["embeddings"][0],
                          dtype=np.float32)
        hits = r.search("x", k=3, mode="dense", where=where, query_vector=new1)
        assert hits[0].id == "new1"
        assert [h.id for h in hits] == _exact_docs(r, where, new1, 3)


def test_vectors_of_records_deleted_meanwhile_are_skipped(tmp_path, tiny_embedder):
    """A search between Chroma's delete and the BM25 index's catch-up asks for vectors
    Chroma no longer holds: they are left out, not an error."""
    from retrievekit.pipeline import HybridRetriever

    with HybridRetriever({"store": {"path": str(tmp_path / "s")}}, embedder=tiny_embedder) as r:
        r.add_documents([{"id": "d0", "text": "kept"}])
        ids, matrix = r.store.unit_vectors(["gone", "d0"] + [f"x{i}" for i in range(300)],
                                            tiny_embedder.dim)
        assert ids == ["d0"] and matrix.shape == (1, tiny_embedder.dim)
        ids, matrix = r.store.unit_vectors([f"x{i}" for i in range(300)], tiny_embedder.dim)
        assert ids == [] and len(matrix) == 0


def test_subset_vectors_stay_within_their_budget(tmp_path, tiny_embedder, monkeypatch):
    """The subsets' vectors together stay within `subsets.SUBSET_VECTOR_BYTES`: holding one
    more drops the least recently used; a subset whose vectors alone exceed it is
    post-filtered by its ids instead, with the same exact answer."""
    import numpy as np

    from retrievekit import subsets
    from retrievekit.pipeline import HybridRetriever

    docs = [{"text": f"record {i}", "id": f"d{i}", "metadata": {"bucket": i % 8}}
            for i in range(400)]
    dim = tiny_embedder.dim
    monkeypatch.setattr(subsets, "SUBSET_VECTOR_BYTES", 120 * dim * 4)  # 120 vectors
    with HybridRetriever({"store": {"path": str(tmp_path / "s"), "hnsw_ef_search": 1000}},
                         embedder=tiny_embedder) as r:
        r.add_documents(docs)
        nrng = np.random.default_rng(1)
        index = r._searcher.engine.sparse  # the snapshot's subsets, read for this check only

        def held():
            return {k: s.vectors is not None for k, s in index.reader().filters._subsets.items()}

        def ask(where):
            q = nrng.standard_normal(dim).astype(np.float32)
            hits = r.search("x", k=10, mode="dense", where=where, query_vector=q)
            np.testing.assert_allclose([h.score for h in hits],
                                       _exact(r, where, q / np.linalg.norm(q), 10), atol=1e-5)

        for where in ({"bucket": 0}, {"bucket": 1}):  # 50 records each: both fit
            for _ in range(3):
                ask(where)
        assert list(held().values()) == [True, True]
        for _ in range(3):
            ask({"bucket": 2})  # a third: the least recently used (bucket 0) is dropped
        assert list(held().values()) == [False, True, True]
        broad = {"bucket": {"$in": [4, 5, 6]}}  # 150 records: more than the budget
        for _ in range(3):
            ask(broad)
        assert held()[index.compile(broad).key] is False


@pytest.mark.parametrize("where", [{"bucket": 7},
                                   {"$and": [{"bucket": {"$gt": 6}}, {"bucket": {"$lte": 7}}]}],
                         ids=["equality", "comparison"])
@pytest.mark.parametrize("vectors", [True, False], ids=["scanned", "post-filtered"])
def test_a_remembered_filter_follows_writes(tmp_path, tiny_embedder, monkeypatch, vectors,
                                            where):
    """A commit carries the subsets to the new snapshot, patched by what it changed: after
    an update that moves a record out of the filter, a new record in it and a delete, the
    filter (remembered) answers exactly from the new state at once: scanned from its held
    vectors, with no Chroma query and only the written records' vectors read (from the BM25
    index, which keeps them); or, with no room for vectors, post-filtered by its remembered
    ids."""
    import numpy as np

    from retrievekit import subsets
    from retrievekit.pipeline import HybridRetriever

    if not vectors:
        monkeypatch.setattr(subsets, "SUBSET_VECTOR_BYTES", 0)

    docs = [{"text": f"record {i} " + WORDS[i % len(WORDS)], "id": f"d{i}",
             "metadata": {"bucket": i % 50}} for i in range(300)]
    with HybridRetriever({"store": {"path": str(tmp_path / "s"), "hnsw_ef_search": 1000}},
                         embedder=tiny_embedder) as r:
        r.add_documents(docs)
        # where: d7, d57, ..., d257: six records, 2%
        q = tiny_embedder.embed_query("a text about a lantern by the harbor")
        for _ in range(3):
            first = r.search("x", k=10, mode="dense", where=where, query_vector=q)
        assert {h.id for h in first} == {f"d{i}" for i in range(7, 300, 50)}
        r.add_documents([{"text": "a text about a lantern by the harbor", "id": "new",
                          "metadata": {"bucket": 7}},
                         {"text": "moved away", "id": "d7", "metadata": {"bucket": 8}},
                         {"text": "d107 again, same bucket", "id": "d107",
                          "metadata": {"bucket": 7}}])
        r.delete(["d57"])
        calls = {"query": 0, "get": []}
        real_query, real_get = r.store.collection.query, r.store.collection.get

        def query(*a, **k):
            calls["query"] += 1
            return real_query(*a, **k)

        def get(*a, **k):
            if k.get("ids") is not None:  # (the change log is read by `where`)
                calls["get"].append(k["ids"])
            return real_get(*a, **k)

        r.store.collection.query, r.store.collection.get = query, get
        try:
            for use in range(3):
                hits = r.search("x", k=10, mode="dense", where=where, query_vector=q)
                assert hits[0].id == "new"
                assert {h.id for h in hits} == {"new"} | {f"d{i}" for i in range(107, 300, 50)}
                np.testing.assert_allclose([h.score for h in hits], _exact(r, where, q, 10),
                                           atol=1e-5)
        finally:
            r.store.collection.query, r.store.collection.get = real_query, real_get
        if vectors:
            assert calls["query"] == 0
            assert calls["get"] == [], calls  # the written vectors: from the BM25 index
        else:
            assert calls["query"] == 3 and calls["get"] == []


def test_a_record_the_graph_cannot_reach_is_still_found(tmp_path, tiny_embedder,
                                                      monkeypatch):
    """An HNSW graph can leave a record unreachable (more often after updates): a query for
    every neighbour then returns fewer than asked, without it. A post-filtered search that
    meets such a short list with passing records missing answers by an exact scan of the
    passing records, so the filtered answer keeps every record it should have."""
    from retrievekit import subsets
    from retrievekit.pipeline import HybridRetriever

    monkeypatch.setattr(subsets, "SUBSET_VECTOR_BYTES", 0)  # no held vectors: post-filter
    docs = [{"text": f"record {i} " + WORDS[i % len(WORDS)], "id": f"d{i}",
             "metadata": {"bucket": i % 50}} for i in range(300)]
    where = {"bucket": 7}  # six records, 2%: above POST_FILTER_SHARE
    with HybridRetriever({"store": {"path": str(tmp_path / "s")}},
                         embedder=tiny_embedder) as r:
        r.add_documents(docs)
        q = tiny_embedder.embed_query("a text about a lantern by the harbor")
        real_query = r.store.collection.query

        def query(*a, **k):  # the graph never reaches d157
            got = real_query(*a, **k)
            keep = [j for j, rid in enumerate(got["ids"][0]) if rid != "d157"]
            return {**got, "ids": [[got["ids"][0][j] for j in keep]],
                    "distances": [[got["distances"][0][j] for j in keep]]}

        r.store.collection.query = query
        try:
            for _ in range(3):  # asked once, then remembered
                hits = r.search("x", k=10, mode="dense", where=where, query_vector=q)
                assert {h.id for h in hits} == {f"d{i}" for i in range(7, 300, 50)}
                np.testing.assert_allclose([h.score for h in hits], _exact(r, where, q, 10),
                                           atol=1e-5)
        finally:
            r.store.collection.query = real_query


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
    """The passing records sit past the first over-fetch (ranks 901-1000 of 1000, a share
    of 0.1): the first list of overfetch(5, 0.1) = 166 holds none, so it must widen."""
    from retrievekit.searcher import _post_filtered

    ranked = [(f"r{i}", 1.0 - i / 1000) for i in range(1000)]
    asked = []

    def query(m):
        asked.append(m)
        return ranked[:m]

    def scan():
        raise AssertionError("the index gave every passing record")

    out = _post_filtered(query, lambda ids: {i for i in ids if int(i[1:]) >= 900}, 5, 0.1,
                         1000, scan)
    assert [rid for rid, _ in out] == ["r900", "r901", "r902", "r903", "r904"]
    assert asked == [166, 332, 664, 1000]
    # fewer than n pass in the whole collection: all of them, after asking for everything
    out = _post_filtered(query, lambda ids: {"r999"}, 5, 0.001, 1000, scan)
    assert out == [("r999", ranked[999][1])] and asked[-1] == 1000
    # the index cannot reach a passing record (a graph's unreachable node) and has no more
    # to give: the exact scan answers, not the short list
    reachable = ranked[:998] + ranked[999:]
    out = _post_filtered(lambda m: reachable[:m], lambda ids: {i for i in ids if i >= "r995"},
                         5, 0.005, 1000, lambda: [("r998", 0.5)])
    assert out == [("r998", 0.5)]


@pytest.mark.parametrize("share,n", [(0.15, 100), (0.01, 100), (0.5, 100), (0.1, 5),
                                     (1.0, 100), (0.03, 37)])
def test_overfetch_is_the_fewest_that_pass_n_at_three_sd(share, n):
    """The first over-fetch: the fewest f with f*p - 3*sqrt(f*p*(1-p)) >= n, so that n pass
    unless the passing records are rarer among the neighbours than 3 sd of a binomial.
    Checked by the inequality itself, by hand at p = 0.15, n = 100 (879, against 1,100 for
    the former n / p * 1.5 + n), and by simulation."""
    import math

    import numpy as np

    from retrievekit.searcher import overfetch

    f = overfetch(n, share, 10**9)
    lower = lambda m: m * share - 3 * math.sqrt(m * share * (1 - share))  # noqa: E731
    assert lower(f) >= n and (f == n or lower(f - 1) < n)
    assert overfetch(n, share, 50) == min(50, f)  # never more than the collection
    if (share, n) == (0.15, 100):
        assert f == 879
    passed = np.random.default_rng(0).binomial(f, share, size=20_000)
    assert (passed < n).mean() < 0.005


def test_remembered_filters_under_concurrent_writes(tmp_path, tiny_embedder):
    """Six threads search with repeated filters (remembered, scanned, post-filtered) while
    another thread moves records between filter values, adds and deletes: no search fails,
    every hit matched its filter in the version found or the one written just before (a
    search reads committed state: a hit's metadata is read after its candidates were found,
    so a write in between may show), and once the writes are done every filter answers
    exactly (a subset left stale by a commit would fail here)."""
    import threading

    import numpy as np

    from retrievekit.pipeline import HybridRetriever

    def doc(i, round_=0):
        return {"text": f"record {i} " + WORDS[(i + round_) % len(WORDS)], "id": f"d{i}",
                "metadata": {"wide": (i + round_) % 5, "narrow": (i + round_) % 50}}

    def matches(where, m):
        return m["wide"] == 1 if where == wheres[0] else m["narrow"] == 3 \
            if where == wheres[1] else m["narrow"] == 4 or m["wide"] == 2

    wheres = [{"wide": 1}, {"narrow": 3}, {"$or": [{"narrow": 4}, {"wide": 2}]}]
    written: dict[str, list[dict]] = {}  # id -> the metadata of each version written

    def add(docs):
        for d in docs:  # noted before the write: a search may see it as soon as it lands
            written.setdefault(d["id"], []).append(d["metadata"])
        r.add_documents(docs)

    errors, outside, done = [], [], threading.Event()
    with HybridRetriever({"store": {"path": str(tmp_path / "s"), "hnsw_ef_search": 1000}},
                         embedder=tiny_embedder) as r:
        add([doc(i) for i in range(400)])

        def search(n):
            rng = np.random.default_rng(n)
            try:
                while not done.is_set():
                    where = wheres[int(rng.integers(len(wheres)))]
                    q = rng.standard_normal(tiny_embedder.dim).astype(np.float32)
                    for h in r.search("record river", k=10, mode=("dense", "hybrid")[n % 2],
                                      where=where, query_vector=q):
                        versions = written[h.id][-2:]
                        if not any(matches(where, m) for m in versions):
                            outside.append((where, h.id, versions))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=search, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        try:
            for round_ in range(1, 16):
                add([doc(i, round_) for i in range(round_, 400, 37)])
                add([doc(1000 + round_)])
                r.delete([f"d{round_ * 7}"])
        finally:
            done.set()
            for t in threads:
                t.join(120)
        assert errors == [] and outside == []
        rng = np.random.default_rng(99)
        for where in wheres:
            for _ in range(3):
                q = rng.standard_normal(tiny_embedder.dim).astype(np.float32)
                q /= np.linalg.norm(q)
                hits = r.search("x", k=10, mode="dense", where=where, query_vector=q)
                np.testing.assert_allclose([h.score for h in hits], _exact(r, where, q, 10),
                                           atol=1e-5, err_msg=str(where))


def test_a_filter_used_once_before_a_commit_is_remembered_on_its_next_use(tmp_path,
                                                                          tiny_embedder):
    """A commit keeps the note that a filter was used: in a store written between every
    two queries, a filter's second use still remembers it (and scans its vectors instead
    of querying HNSW)."""
    import numpy as np

    from retrievekit.pipeline import HybridRetriever

    docs = [{"text": f"record {i}", "id": f"d{i}", "metadata": {"bucket": i % 5}}
            for i in range(300)]
    with HybridRetriever({"store": {"path": str(tmp_path / "s"), "hnsw_ef_search": 1000}},
                         embedder=tiny_embedder) as r:
        r.add_documents(docs)
        where = {"bucket": {"$in": [0, 1]}}  # 120 records: too many to read on first use
        q = np.random.default_rng(0).standard_normal(tiny_embedder.dim).astype(np.float32)
        calls = _count_queries(r)
        r.search("x", k=10, mode="dense", where=where, candidates=10, query_vector=q)
        assert calls["n"] == 1  # the first use: post-filtered HNSW neighbours
        r.add_documents([{"text": "one more", "id": "more", "metadata": {"bucket": 2}}])
        hits = r.search("x", k=10, mode="dense", where=where, candidates=10, query_vector=q)
        # remembered on the second use: post-filtered by it while its vectors are read
        # behind the search (120 of them cost more than the post-filter), then scanned
        assert calls["n"] == 2
        np.testing.assert_allclose([h.score for h in hits],
                                   _exact(r, where, q / np.linalg.norm(q), 10), atol=1e-5)
        assert r._calls.wait(10)
        hits = r.search("x", k=10, mode="dense", where=where, candidates=10, query_vector=q)
        assert calls["n"] == 2
        np.testing.assert_allclose([h.score for h in hits],
                                   _exact(r, where, q / np.linalg.norm(q), 10), atol=1e-5)


def test_a_commit_during_a_search_does_not_cut_its_filtered_records(tmp_path, tiny_embedder,
                                                                   monkeypatch):
    """A search reads one state of the BM25 index throughout (`SparseIndex.reader`): a
    commit between counting a filter's records and reading their ids once made the ids
    come from the new state, cut at the old count, so that a record matching in both
    states (here one replaced after records were added) was left out of the exact
    scan."""
    from retrievekit import subsets
    from retrievekit.pipeline import HybridRetriever

    cfg = {"store": {"path": str(tmp_path / "s")}, "local_vectors": True}
    docs = [{"text": f"record {i}", "id": f"d{i}", "metadata": {"bucket": i % 50}}
            for i in range(200)]  # 4 a bucket: a selective filter, scanned exactly
    count = subsets.Subsets.count
    with HybridRetriever(cfg, embedder=tiny_embedder) as r:
        r.add_documents(docs)
        for bucket in range(4):
            text = f"record {bucket} written again"
            late = [[{"text": f"late {bucket} {j}", "id": f"late{bucket}-{j}",
                      "metadata": {"bucket": bucket}} for j in range(8)],
                    [{"text": text, "id": f"d{bucket}", "metadata": {"bucket": bucket}}]]

            def counting(self, f, late=late):  # writers commit right after the count
                n = count(self, f)
                while late:
                    r.add_documents(late.pop(0))
                return n

            monkeypatch.setattr(subsets.Subsets, "count", counting)
            hits = r.search("x", 4, mode="dense", where={"bucket": bucket},
                            query_vector=tiny_embedder.embed_documents([text])[0])
            monkeypatch.setattr(subsets.Subsets, "count", count)
            # its new vector is the query: first in either state
            assert hits[0].id == f"d{bucket}" and hits[0].score > 0.999, (bucket, hits)


def _count_queries(r) -> dict:
    """Count `r`'s Chroma nearest-neighbour queries from now on (in the dict's "n")."""
    calls = {"n": 0}
    real = r.store.collection.query

    def query(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    r.store.collection.query = query
    return calls


def _broad_store(tmp_path, tiny_embedder):
    """300 records, a filter passing 120 of them (40%): on its second use, reading their
    vectors costs more than a post-filter of 10 candidates (120**2 > READ_SCAN * 10 * 300)."""
    from retrievekit.pipeline import HybridRetriever

    assert 120 ** 2 > READ_SCAN * 10 * 300 and 120 >= POST_FILTER_SHARE * 300
    r = HybridRetriever({"store": {"path": str(tmp_path / "s"), "hnsw_ef_search": 1000}},
                        embedder=tiny_embedder)
    r.add_documents([{"text": f"record {i}", "id": f"d{i}", "metadata": {"bucket": i % 5}}
                     for i in range(300)])
    return r, {"bucket": {"$in": [0, 1]}}


def test_a_broad_filter_used_again_reads_its_vectors_behind_the_search(tmp_path,
                                                                       tiny_embedder):
    """The second use of a filter whose vectors cost more to read than the search itself
    answers at once (post-filtered by the remembered subset, exactly), while another thread
    reads the vectors; from then on it is scanned, with no Chroma query. Before, that
    second search read them itself (0.5-0.9 s for 18k records at 120k)."""
    import threading

    r, where = _broad_store(tmp_path, tiny_embedder)
    q = np.random.default_rng(0).standard_normal(tiny_embedder.dim).astype(np.float32)
    exact = _exact(r, where, q / np.linalg.norm(q), 10)
    release, readers = threading.Event(), []
    real_read = r._searcher.engine._unit_vectors

    def unit_vectors(*a, **k):
        readers.append(threading.current_thread())
        assert release.wait(20)
        return real_read(*a, **k)

    r._searcher.engine._unit_vectors = unit_vectors
    queries = _count_queries(r)
    try:
        for use in range(2):  # the first use, and the second while its vectors are read
            hits = r.search("x", k=10, mode="dense", where=where, candidates=10,
                            query_vector=q)
            np.testing.assert_allclose([h.score for h in hits], exact, atol=1e-5)
        assert queries["n"] == 2 and len(readers) == 1
        assert readers[0] is not threading.current_thread()
        release.set()
        assert r._calls.wait(20)
        hits = r.search("x", k=10, mode="dense", where=where, candidates=10, query_vector=q)
        np.testing.assert_allclose([h.score for h in hits], exact, atol=1e-5)
        assert queries["n"] == 2 and len(readers) == 1  # scanned from the vectors read
    finally:
        release.set()
        r.close()


def test_close_waits_for_a_read_behind_the_search(tmp_path, tiny_embedder):
    """`close` waits for a read that a search started behind itself, and the store is
    released after it (a new retriever opens it); a read refused or failed is tried again
    by the next search."""
    import threading

    from retrievekit.pipeline import HybridRetriever

    r, where = _broad_store(tmp_path, tiny_embedder)
    q = np.random.default_rng(1).standard_normal(tiny_embedder.dim).astype(np.float32)
    release, started, reads = threading.Event(), threading.Event(), {"n": 0}
    real_read = r._searcher.engine._unit_vectors

    def unit_vectors(*a, **k):
        reads["n"] += 1
        if reads["n"] == 1:
            raise OSError("a read that fails")
        started.set()
        assert release.wait(20)
        return real_read(*a, **k)

    r._searcher.engine._unit_vectors = unit_vectors
    for _ in range(2):
        r.search("x", k=10, mode="dense", where=where, candidates=10, query_vector=q)
    assert r._calls.wait(20) and reads["n"] == 1  # failed, and logged
    r.search("x", k=10, mode="dense", where=where, candidates=10, query_vector=q)
    assert started.wait(20) and reads["n"] == 2  # tried again
    closer = threading.Thread(target=r.close)
    closer.start()
    closer.join(0.5)
    assert closer.is_alive()  # waiting for the read
    release.set()
    closer.join(20)
    assert not closer.is_alive()
    with HybridRetriever({"store": {"path": str(tmp_path / "s")}},
                         embedder=tiny_embedder) as again:
        assert again.count() == 300


def test_floats_chroma_reads_as_their_neighbours_filter_as_in_chroma(tmp_path, tiny_embedder):
    """Chroma's JSON parser moves some floats of 16-17 digits by an ulp or two, stored
    values and filter operands alike (0.9999999999999999 is held and compared as 1.0):
    through the real write path (the BM25 index follows Chroma) a filter selects what
    Chroma's own `where` selects, on both sides."""
    from retrievekit.pipeline import HybridRetriever

    values = [0.9999999999999999, 2020.9999999999998, 9007199254740991.0,
              4503599627370494.0, 4503599627370495.5, 1, 0, 0.30000000000000004]
    with HybridRetriever({"store": {"path": str(tmp_path / "s")}}, embedder=tiny_embedder) as r:
        r.add_documents([{"text": f"word{i} common", "id": f"d{i}", "metadata": {"n": v}}
                         for i, v in enumerate(values)])
        for where in [{"n": 1}, {"n": {"$gte": 1}}, {"n": {"$lt": 2021}}, {"n": 2021},
                      {"n": {"$gt": 4503599627370494}}, {"n": 4503599627370495},
                      {"n": 0.9999999999999999}, {"n": {"$lte": 0.9999999999999999}},
                      {"n": {"$ne": 2020.9999999999998}}, {"n": 0.30000000000000004}]:
            chroma = set(r.store.get(where=where, include=[])["ids"])
            assert r._sparse.compile(where) is not None, where  # evaluated in the index
            for mode in ("sparse", "dense"):
                got = {h.id for h in r.search("common", k=10, mode=mode, where=where)}
                assert got == chroma, (where, mode)


def test_reads_behind_the_search_run_one_at_a_time_and_need_no_thread(tmp_path,
                                                                      tiny_embedder,
                                                                      monkeypatch):
    """One read behind the query path at a time: a second filter's read waits for a later
    search (found by an attack: two filters pushing each other's subset out started a
    thread per search, 37 at once). A thread that cannot start is no error: the search
    answers, and a later one reads."""
    import threading

    r, _ = _broad_store(tmp_path, tiny_embedder)
    a, b = {"bucket": 0}, {"bucket": 1}  # 60 records each: read behind, both remembered
    q = np.random.default_rng(2).standard_normal(tiny_embedder.dim).astype(np.float32)
    exact = {k: _exact(r, w, q / np.linalg.norm(q), 10) for k, w in (("a", a), ("b", b))}
    release, readers = threading.Event(), []
    real_read, real_start = r._searcher.engine._unit_vectors, threading.Thread.start

    def unit_vectors(sparse, ids, dim):
        readers.append(sorted(ids)[0])
        assert release.wait(20)
        return real_read(sparse, ids, dim)

    def no_thread(self):
        raise RuntimeError("can't start new thread")

    def search(where, key):
        hits = r.search("x", k=10, mode="dense", where=where, candidates=10, query_vector=q)
        np.testing.assert_allclose([h.score for h in hits], exact[key], atol=1e-5)

    r._searcher.engine._unit_vectors = unit_vectors
    try:
        search(a, "a")
        monkeypatch.setattr(threading.Thread, "start", no_thread)
        search(a, "a")  # its read cannot start: answered all the same
        monkeypatch.setattr(threading.Thread, "start", real_start)
        assert readers == []
        search(a, "a")  # a later search reads
        search(b, "b")
        search(b, "b")  # a's read is under way: b's waits
        search(b, "b")
        assert len(readers) == 1
        release.set()
        assert r._calls.wait(20)
        search(b, "b")  # now b's
        assert r._calls.wait(20) and len(readers) == 2
        queries = _count_queries(r)
        search(a, "a")
        search(b, "b")
        assert queries["n"] == 0  # both scanned from their vectors
    finally:
        release.set()
        r.close()


def test_dead_records_take_no_place_under_a_filter_only_chroma_evaluates(tmp_path,
                                                                          tiny_embedder):
    """While a replace is between its upsert and the delete of its stale records, those
    records are dead and have lost every user key, so a `$ne` filter matches them in
    Chroma. The ids a filter only Chroma evaluates passes are its live records: dead ones,
    nearest to a query at their filler vector's direction, would fill the candidates and
    leave a short page."""
    import threading

    from retrievekit.pipeline import HybridRetriever

    r = HybridRetriever({"store": {"path": str(tmp_path / "s"), "hnsw_ef_search": 1000}},
                        embedder=tiny_embedder)
    long = " ".join(f"word{j} river stone" for j in range(200))  # several chunks each
    r.add_documents([{"text": f"doc {i} {long}", "id": f"d{i}", "metadata": {"n": i}}
                     for i in range(6)])
    held, entered = threading.Event(), threading.Event()
    real_delete = r.store.delete

    def delete_later(ids):
        entered.set()
        held.wait(30)
        return real_delete(ids)

    r.store.delete = delete_later
    replace = threading.Thread(target=r.add_documents,
                               args=([{"text": "doc 0 short", "id": "d0", "metadata": {"n": 0}}],))
    replace.start()
    try:
        assert entered.wait(30)
        where = {"n": {"$ne": 2 ** 60}}
        got = r.store.get(where=where, include=["metadatas"])
        assert any(m.get("_rk_dead") for m in got["metadatas"])  # the window is open
        q = np.zeros(tiny_embedder.dim, np.float32)
        q[0] = 1.0  # the dead records' filler direction (writer.stored_form)
        for mode in ("dense", "hybrid"):
            hits = r.search("zzz river", k=6, mode=mode, where=where, candidates=6,
                            query_vector=q)
            assert sorted(h.id for h in hits) == [f"d{i}" for i in range(6)], mode
    finally:
        held.set()
        replace.join(30)
        r.store.delete = real_delete
        r.close()


def test_a_filter_too_long_for_chroma_is_refused_by_name(filtered_store):
    """Chroma 1.5.9 evaluates a `where` of at most ~16,000 $in/$nin values (SQLite's bound
    variables): past that it fails with an internal error, which is the request's fault,
    not the store's. The BM25 index evaluates a longer list itself."""
    from retrievekit.errors import InvalidInputError

    r = filtered_store
    too_long = {"bucket": {"$in": [2 ** 60 + i for i in range(20_000)]}}
    for mode in ("dense", "sparse", "hybrid"):
        with pytest.raises(InvalidInputError, match=r"where filter with long \$in/\$nin"):
            r.search("record", k=5, mode=mode, where=too_long)
    long_compiled = {"bucket": {"$in": list(range(20_000))}}
    assert len(r.search("record", k=5, where=long_compiled)) == 5


def test_only_filters_that_may_match_a_dead_record_need_the_live_clause():
    """`may_match_dead` decides whether a filter left to Chroma needs its live-records
    clause (~50 ms at 120k records). Oracle: a Chroma collection holding one dead record
    (`dead_metadata`) and random filters; every filter that matches it must be flagged,
    and a filter with none of `$ne`, `$nin`, `$not_contains` never is."""
    from chromadb.api.types import validate_where as chroma_validate

    from retrievekit.filters import may_match_dead
    from retrievekit.records import dead_metadata

    client = chromadb.EphemeralClient(settings=Settings(anonymized_telemetry=False))
    col = client.get_or_create_collection(f"dead-{uuid.uuid4().hex[:8]}",
                                          embedding_function=None)
    col.add(ids=["dead"], embeddings=[[1.0, 0.0]],
            metadatas=[{**dead_metadata("p", {}), "_rk_seq": 3}])
    rng = random.Random(17)
    matched = 0
    for where in [_where(rng) for _ in range(300)]:
        try:
            chroma_validate(where)
            hit = bool(col.get(where=where, include=[])["ids"])
        except Exception:
            continue
        if hit:
            matched += 1
            assert may_match_dead(where), where
        text = repr(where)
        if not any(s in text for s in ("$ne", "$nin", "$not_contains")):
            assert not may_match_dead(where), where
    assert matched >= 30, matched


@pytest.mark.parametrize("funnel", [None, {"funnel_dim": 16, "funnel_candidates": 500}],
                         ids=["hnsw", "funnel"])
def test_the_chunk_penalty_is_applied_before_the_neighbour_list_is_cut(tmp_path,
                                                                       tiny_embedder, funnel):
    """A later chunk loses `chunk_penalty`: a document whose first chunk sits just past the
    raw n-th neighbour outranks penalized later chunks inside the list, so the unfiltered
    and post-filtered plans widen their lists until it cannot, and answer as the exact
    scan does (documents were missing when k was near the candidates); the funnel's second
    stage (every record a first-stage candidate here) cuts after the penalty too."""
    from retrievekit.pipeline import HybridRetriever
    from retrievekit.records import chunk_position, parent_of

    words = ["river", "stone", "cloud", "engine", "garden", "signal", "copper", "lantern"]
    rng = np.random.default_rng(0)
    docs = [{"id": f"d{i}", "text": " ".join(rng.choice(words, 40 if i % 2 else 6)),
             "metadata": {"g": i % 5 != 0}} for i in range(60)]  # every other one chunked
    with HybridRetriever({"store": {"path": str(tmp_path / "s"), "hnsw_ef_search": 1000},
                          "chunking": {"max_tokens": 16, "overlap_tokens": 4},
                          "candidates": 10, **(funnel or {})}, embedder=tiny_embedder) as r:
        r.add_documents(docs)
        got = r.store.get(include=["documents"])  # full vectors (Chroma's are short)
        unit = dict(zip(got["ids"], tiny_embedder.embed_documents(got["documents"])))
        g = {d["id"]: d["metadata"]["g"] for d in docs}
        for seed in range(40):
            q = np.random.default_rng(seed).normal(size=tiny_embedder.dim).astype(np.float32)
            q /= np.linalg.norm(q)
            for where in (None, {"g": True}):
                best: dict[str, float] = {}
                for rid, v in unit.items():
                    if where is None or g[parent_of(rid)]:
                        s = float(v @ q) - (0.05 if chunk_position(rid) else 0.0)
                        best[parent_of(rid)] = max(best.get(parent_of(rid), -9.0), s)
                want = sorted(best.values(), reverse=True)[:10]
                hits = r.search("x", k=10, mode="dense", query_vector=q, where=where)
                np.testing.assert_allclose([h.score for h in hits], want, atol=1e-4)


def _held_vectors_match_chroma(r) -> int:
    """Every live record's vector in the BM25 index is Chroma's (to its last bit: Chroma's
    cosine space keeps each vector normalized again); returns the records compared."""
    got = r.store.get(include=["embeddings", "metadatas"])
    live = [(rid, e) for rid, e, m in zip(got["ids"], got["embeddings"], got["metadatas"])
            if not (m or {}).get("_rk_dead")]
    ids, matrix = r._sparse.vectors([rid for rid, _ in live], len(live[0][1]))
    assert sorted(ids) == sorted(rid for rid, _ in live)
    chroma = dict(live)
    for rid, row in zip(ids, matrix):
        np.testing.assert_allclose(row, np.asarray(chroma[rid], dtype=np.float32), atol=1e-7,
                                   err_msg=rid)
    return len(ids)


def test_a_selective_filter_used_once_reads_its_vectors_from_the_bm25_index(tmp_path,
                                                                           tiny_embedder):
    """The exact scan of a filter seen for the first time read the passing records' vectors
    from Chroma (~50 us a record at 120k records, most of it chromadb turning them into
    Python lists: 42-47 ms for 1.5%). The BM25 index now keeps each record's vector as
    Chroma holds it, through writes, replaces, deletes, reopens and rebuilds, and the scan
    reads them there: the answer is the same, with no vector read from Chroma."""
    import shutil

    from retrievekit.pipeline import HybridRetriever

    path = tmp_path / "s"
    docs = [{"text": f"record {i} " + WORDS[i % len(WORDS)], "id": f"d{i}",
             "metadata": {"bucket": i % 50}} for i in range(300)]
    with HybridRetriever(path=str(path), embedder=tiny_embedder) as r:
        r.add_documents(docs)
        r.add_documents([{"text": "record 7 rewritten by a lantern", "id": "d7",
                          "metadata": {"bucket": 7}}])
        r.delete(["d57"])
        assert _held_vectors_match_chroma(r) == 299
    shutil.rmtree(path / "retrievekit")  # derived state lost: rebuilt from Chroma's vectors
    with HybridRetriever(path=str(path), embedder=tiny_embedder) as r:
        assert _held_vectors_match_chroma(r) == 299
        q = np.random.default_rng(3).standard_normal(tiny_embedder.dim).astype(np.float32)
        reads = []
        real_get = r.store.collection.get

        def get(*a, **k):
            if k.get("ids") is not None and "embeddings" in (k.get("include") or []):
                reads.append(k["ids"])  # (the oracle reads by `where`)
            return real_get(*a, **k)

        r.store.collection.get = get
        try:
            for where in ({"bucket": 7}, {"bucket": {"$in": [1, 2]}}):
                hits = r.search("x", k=5, mode="dense", where=where, query_vector=q)
                np.testing.assert_allclose([h.score for h in hits],
                                           _exact(r, where, q / np.linalg.norm(q), 5),
                                           atol=1e-6)
        finally:
            r.store.collection.get = real_get
        assert reads == []
