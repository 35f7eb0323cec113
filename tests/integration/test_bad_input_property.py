"""Property: whatever a caller passes (None, ints, bools, floats with NaN and inf, str with
lone surrogates, bytes, lists, dicts, nested), each public call gives a correct result or
a RetrieveKitError, and a refused call leaves the store as it was (count, ids, and the
results of a fixed search).

The figures of a run (values tried, results, errors by type) are printed at the end of the
module (`pytest -s` shows them)."""

from __future__ import annotations

import collections
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CORPUS
from retrievekit.config import RetrieverConfig
from retrievekit.errors import RetrieveKitError
from retrievekit.pipeline import HybridRetriever
from retrievekit.types import Document

OUTCOMES: collections.Counter = collections.Counter()

# str of any code point, lone surrogates included (hypothesis leaves them out by default)
_TEXT = st.text(st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                max_size=12)
_SCALARS = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70)
            | st.floats(allow_nan=True, allow_infinity=True) | _TEXT | st.binary(max_size=6)
            | st.sampled_from([0, 1, 5, -1, 2 ** 63, 0.5, "", " ", "cats", "dense", "hybrid",
                               "sparse", "rrf", "en", "topic", "food", "$in", "$and", "$eq",
                               "$gt", "cats#chunk1", "\x00", "\u200b", "caf\udce9"]))
#: pointed bad values, drawn as often as everything else together
NASTY = st.sampled_from([None, True, False, 0, -1, 2 ** 63, math.nan, math.inf, -math.inf,
                         "", " ", "\x00\x01", "\u200b", "caf\udce9", b"cats", [], {},
                         ["cats"], {"text": None}, [None], [["x"]], {"$in": [1]},
                         {"topic": math.nan}, {"topic": "caf\udce9"}, {"topic": [1, 2]}])
ANY = st.recursive(
    _SCALARS,
    lambda inner: (st.lists(inner, max_size=3) | st.tuples(inner, inner)
                   | st.dictionaries(st.sampled_from(["topic", "year", "$in", "$and", "$or",
                                                     "text", "id", "metadata"]) | _TEXT
                                     | st.integers(-3, 3), inner, max_size=3)),
    max_leaves=6)
VALUES = NASTY | ANY
#: filters that are often well-formed, often not
WHERES = VALUES | st.fixed_dictionaries({"topic": VALUES}) | st.fixed_dictionaries(
    {"year": st.dictionaries(st.sampled_from(["$eq", "$ne", "$gt", "$lte", "$in", "$nin",
                                              "$contains", "$bogus"]), VALUES,
                             min_size=1, max_size=2)}) | st.fixed_dictionaries(
    {"$and": st.lists(st.fixed_dictionaries({"topic": VALUES}), max_size=3)})
DOCS = VALUES | st.lists(VALUES | st.fixed_dictionaries(
    {"text": VALUES, "id": VALUES, "metadata": VALUES | st.dictionaries(_TEXT, VALUES,
                                                                        max_size=2)}),
    max_size=3)
PROBE = "small pets that purr"


def snapshot(r: HybridRetriever):
    hits = [(h.id, h.document.text, round(h.score, 5)) for h in r.search(PROBE, k=5)]
    return r.count(), sorted(r.document_ids()), sorted(r.store.get(include=[])["ids"]), hits


@pytest.fixture(scope="module")
def store(tmp_path_factory, embedder):
    r = HybridRetriever(path=str(tmp_path_factory.mktemp("prop") / "store"), embedder=embedder)
    r.add_documents([Document(t, id=i, metadata=m) for i, t, m in CORPUS])
    yield r, [snapshot(r)]
    r.close()
    print(f"\nbad-input property: {sum(OUTCOMES.values())} calls; "
          + ", ".join(f"{k}: {n}" for k, n in sorted(OUTCOMES.items())))


def run(name, store, call, *, changes_store=False):
    """Make the call; a result is fine, a RetrieveKitError is fine, and then nothing may
    have changed. Anything else fails the test."""
    r, last = store
    try:
        out = call(r)
    except RetrieveKitError as exc:
        OUTCOMES[f"{name}: {type(exc).__name__}"] += 1
        assert snapshot(r) == last[0], f"a refused {name} changed the store"
        return None
    OUTCOMES[f"{name}: result"] += 1
    now = snapshot(r)
    if not changes_store:
        assert now == last[0], f"{name} that only reads changed the store"
    last[0] = now
    return out


SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


#: per search argument, values that are valid (WHERES also holds valid filters)
SEARCH_ARGS = {
    "query": st.sampled_from(["cats", "memory safety", "PURR!", "猫 🙂"]),
    "k": st.integers(1, 20),
    "where": st.none() | st.sampled_from([{"topic": "food"}, {"year": {"$gte": 2022}},
                                          {"lang": {"$in": ["fr", "de"]}}, {}]),
    "mode": st.sampled_from([None, "", "hybrid", "dense", "sparse"]),
    "candidates": st.none() | st.integers(1, 100),
    "rerank": st.sampled_from([None, False]),
}


@settings(SETTINGS, max_examples=100)
@given(bad=st.sampled_from([None, *SEARCH_ARGS]), data=st.data())
def test_search_with_any_arguments(store, bad, data):
    """One argument (or none) drawn from any value at all, the others valid: each check
    is reached, and calls that are all valid must give a correct result."""
    args = {name: data.draw(VALUES | (WHERES if name == "where" else VALUES)
                            if name == bad else valid, label=name)
            for name, valid in SEARCH_ARGS.items()}
    query, k = args.pop("query"), args.pop("k")
    hits = run("search", store, lambda r: r.search(query, k, **args))
    if hits is not None:  # a result must be a correct one: at most k hits, best first
        assert len(hits) <= k and len({h.id for h in hits}) == len(hits)
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    elif bad is None:
        pytest.fail(f"valid arguments were refused: {query!r}, {k!r}, {args!r}")


@SETTINGS
@given(ids=VALUES)
def test_get_and_delete_with_any_ids(store, ids):
    r, _ = store
    got = run("get", store, lambda r: r.get(ids))
    if got is not None:
        assert {d.id for d in got} <= {i for i, _, _ in CORPUS} | set(r.document_ids())
    run("document_ids", store, lambda r: r.document_ids(where=ids))
    deleted = run("delete", store, lambda r: r.delete(ids), changes_store=True)
    if deleted:  # put the corpus back, so that later examples see the same store
        r.add_documents([Document(t, id=i, metadata=m) for i, t, m in CORPUS])
        store[1][0] = snapshot(r)


@SETTINGS
@given(docs=DOCS)
def test_add_documents_with_any_batch(store, docs):
    r, _ = store
    before = r.count()
    ids = run("add_documents", store, lambda r: r.add_documents(docs), changes_store=True)
    if ids:
        assert {d.id for d in r.get(ids)} == set(ids) and r.count() >= before - len(ids)
        r.delete(ids)  # back to the corpus alone (a batch may have replaced one of it)
        r.add_documents([Document(t, id=i, metadata=m) for i, t, m in CORPUS])
        store[1][0] = snapshot(r)


_SECTIONS = {None: ["mode", "candidates", "fusion", "rrf_k", "weights", "collapse_chunks",
                    "chunk_penalty", "cache_dir", "funnel_dim", "funnel_candidates"],
             "embedder": ["model", "query_prefix", "truncate_dim", "normalize", "device",
                          "dtype", "batch_size", "backend", "onnx_quantize", "num_threads"],
             "store": ["path", "host", "port", "ssl", "collection", "hnsw_m",
                       "hnsw_ef_construction", "hnsw_ef_search", "replica_dir", "private"],
             "sparse": ["tokenizer", "k1", "b"],
             "chunking": ["max_tokens", "overlap_tokens", "enabled"],
             "reranker": ["model", "top_n", "threshold", "candidates", "max_length",
                          "sigmoid", "weight", "rrf_k"]}


PLAUSIBLE = st.sampled_from([None, True, False, 0, 1, 2, 16, 64, 100, 512, 0.05, 0.5, 1.0,
                             60.0, "dense", "rrf", "dbsf", "auto", "float32", "torch", "cpu",
                             "int8", "en", "english", "docs", "x/y", ".rk", "localhost",
                             {"dense": 0.5}, {"dense": math.nan}, {"sparse": math.inf},
                             {"lowercase": False}, {"stemmer": None}, math.nan, math.inf])


@settings(max_examples=500, deadline=None, derandomize=True)
@given(section=st.sampled_from(sorted(_SECTIONS, key=str)), data=st.data())
def test_config_with_any_value(section, data):
    key = data.draw(st.sampled_from(_SECTIONS[section]))
    value = data.draw(st.one_of(PLAUSIBLE, PLAUSIBLE, VALUES))
    raw = {key: value} if section is None else {section: {key: value}}
    try:
        cfg = RetrieverConfig.from_dict(raw)
    except RetrieveKitError as exc:
        OUTCOMES[f"config: {type(exc).__name__}"] += 1
        return
    OUTCOMES["config: result"] += 1
    # an accepted setting is a usable one: it survives a round trip and holds no NaN
    assert RetrieverConfig.from_dict(cfg.to_dict()) == cfg
    assert not any(isinstance(x, float) and not math.isfinite(x) for x in _leaves(cfg.to_dict()))


def _leaves(d):
    for x in (d.values() if isinstance(d, dict) else d):
        if isinstance(x, (dict, list, tuple)):
            yield from _leaves(x)
        else:
            yield x

