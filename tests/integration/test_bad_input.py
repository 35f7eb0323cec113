"""Bad input: each is refused with one retrievekit error whose message names the parameter
and the fix, and leaves the store as it was (count, BM25 ids and search results compared
after every failed call). Inputs that are allowed (k above the corpus size, an empty batch,
None metadata values, duplicates with the same content, long texts) are checked to work.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import CORPUS, MODEL
from retrievekit.errors import (ConfigError, InvalidInputError, ModelNotFoundError,
                                RetrieveKitError, StoreError, StoreMismatchError)
from retrievekit.pipeline import HybridRetriever
from retrievekit.types import Document

QUERIES = ("small pets that purr", "programming language memory safety")
LONG = " ".join(f"Paragraph {i} talks about harbours, ships and the cargo they carry."
                for i in range(60))  # ~900 model tokens: more than the 256 the model reads


def state(r: HybridRetriever):
    """What a failed call must not change."""
    results = [[(h.id, h.document.text, round(h.score, 5)) for h in r.search(q, k=8, mode=m)]
               for q in QUERIES for m in ("hybrid", "dense", "sparse")]
    return r.count(), sorted(r.verify()['sparse_ids']), sorted(r.store.get(include=[])["ids"]), results


@pytest.fixture(scope="module")
def shared(tmp_path_factory, embedder):
    """One store for the call-level cases (each compares the state before and after)."""
    r = HybridRetriever(path=str(tmp_path_factory.mktemp("bad") / "store"), embedder=embedder)
    r.add_documents([Document(t, id=i, metadata=m) for i, t, m in CORPUS])
    yield r, state(r)
    r.close()


def refused(call, shared, error=InvalidInputError, words=()):
    r, before = shared
    with pytest.raises(error) as err:
        call(r)
    assert isinstance(err.value, RetrieveKitError)
    msg = str(err.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    assert state(r) == before
    return msg


# -- search ------------------------------------------------------------------------------
@pytest.mark.parametrize("query", ["", "   ", "\n\t "])
def test_empty_query(shared, query):
    refused(lambda r: r.search(query), shared, words=["query", "pass the text"])


@pytest.mark.parametrize("query", [None, 42, ["cats"], b"cats"])
def test_non_str_query(shared, query):
    refused(lambda r: r.search(query), shared, words=["query must be a str"])


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3"])
def test_bad_k(shared, k):
    refused(lambda r: r.search("cats", k=k), shared, words=["k must be an int >= 1"])


def test_k_above_corpus_is_clamped(shared):
    r, before = shared
    assert len(r.search("animals", k=1000, mode="dense")) == len(CORPUS)
    assert len(r.search("animals", k=1000)) == len(CORPUS)
    assert state(r) == before


@pytest.mark.parametrize("mode", ["fuzzy", "DENSE", ""])
def test_unknown_mode(shared, mode):
    if mode == "":  # falsy: the configured default is used, not an error
        r, before = shared
        assert r.search("cats", mode=mode)
        return
    refused(lambda r: r.search("cats", mode=mode), shared,
            words=["mode must be one of", "hybrid", "sparse"])


@pytest.mark.parametrize("mode", ["hybrid", "sparse"])
@pytest.mark.parametrize("where", [
    {"year": {"$bogus": 1}}, {"$and": [{"topic": "food"}]}, {"topic": None},
    {"topic": [1, 2]}, {"$or": "food"}, {"year": {"$in": []}},
    # Chroma's own check lets these through; its Rust core then fails ("Invalid where clause")
    {"$in": [1]}, {"year": math.nan}, {"year": {"$in": [math.inf]}}, {"topic": "caf\udce9"},
    {"$nin": ["a"]}, {"year": {"$eq": 2 ** 64}}, {"year": {"$gt": True}},
    {"topic": "food", "lang": "en"}, {1: "x"},
])
def test_invalid_where(shared, where, mode):
    refused(lambda r: r.search("cats", where=where, mode=mode), shared,
            words=["where=", "not a valid Chroma filter"])


@pytest.mark.parametrize("mode", ["hybrid", "dense"])
@pytest.mark.parametrize("where, words", [
    ({"$in": [1]}, ["where key", "'$in'", "operators go inside a field"]),
    ({"year": math.nan}, ["where['year']", "finite number"]),
    ({"topic": "caf\udce9"}, ["where['topic']", "lone surrogate"]),
    # internals: _rk_text is a metadata key at store format 3, a Chroma document at 2
    ({"$and": [{"topic": "food"}, {"_rk_text": "x"}]},
     ["where['$and'][1] key", "'_rk_text'", "retrievekit's own bookkeeping"]),
])
def test_filter_that_chroma_would_fail_on_is_named(shared, where, mode, words):
    refused(lambda r: r.search("cats", where=where, mode=mode), shared, words=words)
    refused(lambda r: r.document_ids(where=where), shared, words=words)


def _nested(levels: int) -> dict:
    where: dict = {"topic": "food"}
    for _ in range(levels):
        where = {"$or": [where, {"topic": "tea"}]}
    return where


@pytest.mark.parametrize("levels", [65, 2000], ids=["65", "2000"])
def test_a_filter_nested_too_deeply_is_named(shared, levels):
    """A RecursionError once escaped from 1,000 levels; 64 are allowed."""
    refused(lambda r: r.search("cats", where=_nested(levels)), shared,
            words=["at most 64 levels", "flatten the filter", "not a valid Chroma filter"])
    shared[0].search("cats", where=_nested(64), mode="sparse")


@pytest.mark.parametrize("where", ["topic=food", [("topic", "food")]])
def test_where_not_a_dict(shared, where):
    refused(lambda r: r.search("cats", where=where), shared,
            words=["where must be a dict", "{'lang': 'en'}"])


def test_bad_candidates_and_rerank_without_reranker(shared):
    refused(lambda r: r.search("cats", candidates=0), shared,
            words=["candidates must be an int >= 1"])
    refused(lambda r: r.search("cats", rerank=True), shared, ConfigError,
            words=["rerank=True", "reranker="])


# -- add / delete --------------------------------------------------------------------------
def test_empty_batch_is_a_no_op(shared):
    r, before = shared
    assert r.add_documents([]) == []
    assert state(r) == before


@pytest.mark.parametrize("docs", ["just a string", Document("one doc", id="x"),
                                  {"text": "one dict"}])
def test_documents_not_a_list(shared, docs):
    refused(lambda r: r.add_documents(docs), shared,
            words=["documents must be a list", "wrap"])


@pytest.mark.parametrize("docs", [None, 42, b"bytes", 3.5])
def test_documents_not_iterable(shared, docs):
    refused(lambda r: r.add_documents(docs), shared,
            words=["documents must be a list of Documents", repr(docs)])


@pytest.mark.parametrize("ids", [None, "d1", {"cats": 1}, b"cats", 7])
@pytest.mark.parametrize("call", ["get", "delete", "stored_vectors"])
def test_ids_not_a_list(shared, ids, call):
    refused(lambda r: list(getattr(r, call)(ids)), shared,
            words=["ids must be a list of document ids", "wrap it in a list"])


def test_wrong_part_types_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="embedder must be a retrievekit Embedder"):
        HybridRetriever(path=str(tmp_path / "s"), embedder="x")
    with pytest.raises(ConfigError, match="reranker must be a Reranker"):
        HybridRetriever(path=str(tmp_path / "s"), reranker=42)
    with pytest.raises(ConfigError, match="weights must be a dict"):
        HybridRetriever({"weights": "abc"}, path=str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()  # refused before anything was created


def test_search_arguments_of_the_wrong_type(shared):
    refused(lambda r: r.search("cats", k=math.nan), shared, words=["k must be an int"])
    refused(lambda r: r.search("cats", mode=1), shared, words=["mode must be one of"])
    refused(lambda r: r.search("cats", rerank="yes"), shared,
            words=["rerank must be True, False or None", "'yes'"])
    refused(lambda r: r.search("cats", candidates=True), shared, words=["candidates"])


GOOD = Document("A perfectly fine new document about kites.", id="kites")

BAD_DOCS = {
    "empty-text": (Document("", id="e"), ["documents[1].text", "non-empty str"]),
    "blank-text": (Document("  \n", id="e"), ["documents[1].text"]),
    "int-text": (Document(5, id="e"), ["documents[1].text"]),
    "int-id": (Document("text", id=5), ["documents[1].id", "non-empty str"]),
    "empty-id": (Document("text", id=""), ["documents[1].id"]),
    "dict-unknown-key": ({"txt": "text"}, ["documents[1]", "'text'"]),
    "not-a-doc": (3.5, ["documents[1]", "Document, a str or a dict"]),
    "nested-dict": (Document("t", id="n", metadata={"author": {"name": "x"}}),
                    ["documents[1].metadata['author']", "Flatten", "json.dumps"]),
    "empty-list": (Document("t", id="n", metadata={"tags": []}),
                   ["documents[1].metadata['tags']", "empty list", "drop the key"]),
    "mixed-list": (Document("t", id="n", metadata={"tags": [1, "a"]}),
                   ["documents[1].metadata['tags']", "one scalar type"]),
    "nan": (Document("t", id="n", metadata={"score": math.nan}),
            ["documents[1].metadata['score']", "NaN"]),
    "reserved-key": (Document("t", id="n", metadata={"_rk_parent": "x"}),
                     ["reserved prefix", "rename"]),
    # Chroma stores these, then fails every later call of the store ("Error in compaction")
    "nan-in-list": (Document("t", id="n", metadata={"x": [1.0, math.nan]}),
                    ["documents[1].metadata['x'][1]", "NaN or inf"]),
    "inf": (Document("t", id="n", metadata={"x": math.inf}), ["metadata['x']", "NaN or inf"]),
    "inf-in-list": (Document("t", id="n", metadata={"x": [-math.inf]}), ["['x'][0]", "inf"]),
    "int-past-64-bits": (Document("t", id="n", metadata={"x": 2 ** 63}),
                         ["64-bit", "as a str"]),
    "int-past-64-bits-in-list": (Document("t", id="n", metadata={"x": [1, -2 ** 64]}),
                                 ["['x'][1]", "64-bit"]),
    "chroma-key": (Document("t", id="n", metadata={"chroma:document": "x"}),
                   ["'chroma:document'", "reserved prefix"]),
    "dollar-key": (Document("t", id="n", metadata={"$and": "x"}), ["'$and'", "reserved"]),
    # Chroma refuses '#' keys in its write: a StoreError saying to restore from a backup,
    # after earlier batches of the same add were written (found by an attack)
    "hash-key": (Document("t", id="n", metadata={"#src": "x"}), ["'#src'", "reserved"]),
    "chunk-like-id": (Document("t", id="a#chunk1"), ["documents[1].id", "chunk id"]),
    "non-str-key": (Document("t", id="n", metadata={1: "x"}), ["metadata keys"]),
    "metadata-not-dict": (Document("t", id="n", metadata=["a"]), ["metadata must be a dict"]),
    # nothing a tokenizer reads: every such text would embed alike (only special tokens)
    "control-only-text": (Document("\x00\x07\x1b", id="c"), ["documents[1].text",
                                                              "readable text"]),
    "zero-width-text": (Document("\u200b\ufeff \u2060", id="z"), ["readable text"]),
    # lone surrogates (a bad decode): Chroma, tantivy and the tokenizer each fail otherwise
    "surrogate-text": (Document("caf\udce9", id="s"), ["documents[1].text", "lone surrogate"]),
    "surrogate-id": (Document("t", id="\udce9"), ["documents[1].id", "lone surrogate"]),
    "surrogate-value": (Document("t", id="n", metadata={"a": "\udce9"}),
                        ["documents[1].metadata['a']", "lone surrogate"]),
    "surrogate-in-list": (Document("t", id="n", metadata={"a": ["x", "\udce9"]}),
                          ["['a'][1]", "lone surrogate"]),
    "surrogate-key": (Document("t", id="n", metadata={"\udce9": 1}),
                      ["metadata keys", "lone surrogate"]),
}


@pytest.mark.parametrize("name", sorted(BAD_DOCS))
def test_bad_document_refuses_the_whole_batch(shared, name):
    bad, words = BAD_DOCS[name]
    # the valid first document is not written either: the batch is validated up front
    refused(lambda r: r.add_documents([GOOD, bad]), shared, words=words)


def test_a_hash_key_in_a_later_batch_refuses_the_batches_before_it_too(shared):
    refused(lambda r: r.add_documents([GOOD, Document("t", id="n", metadata={"#x": 1})],
                                      batch_records=1), shared, words=["'#x'", "reserved"])


def test_other_public_calls_check_their_arguments(shared):
    """Found by an attack: bare TypeError / AttributeError from inside, or quiet [] / a
    bool taken for a number."""
    for bad in ("0.5", None, True, 1.5, math.nan):
        refused(lambda r: r.search_mmr("cats", lambda_mult=bad), shared,
                words=["lambda_mult must be"])
    for query, n, words in (("cats", 2.5, "n must be an int"), ("cats", 0, "n must be"),
                            ("cats", True, "n must be"), (None, 3, "query must be")):
        refused(lambda r: r.sparse_candidates(query, n), shared, words=[words])
    for hit in (None, "x"):
        refused(lambda r: r.relevance(hit), shared, words=["hit must be a Hit"])


def test_max_tokens_past_the_models_window_is_refused(tmp_path, embedder):
    """chunking.max_tokens above what the model reads was taken: each chunk was cut at 256
    tokens unseen, and a text past them could not be found by its end."""
    for chunking in ({"max_tokens": 100_000}, {"enabled": False, "max_tokens": 100_000}):
        with HybridRetriever({"store": {"path": str(tmp_path / str(len(chunking)))},
                              "chunking": chunking}, embedder=embedder) as r:
            with pytest.raises(ConfigError, match=r"chunking.max_tokens must be at most "
                                                  r"\d+ for this model, got 100000"):
                r.add_documents([Document(LONG, id="long")])
            assert r.count() == 0


def test_duplicate_ids_with_different_content(shared):
    refused(lambda r: r.add_documents([GOOD, Document("one", id="dup"),
                                       Document("two", id="dup")]),
            shared, words=["'dup'", "unique within a batch"])
    refused(lambda r: r.add_documents([Document("one", id="dup", metadata={"a": 1}),
                                       Document("one", id="dup", metadata={"a": 2})]),
            shared, words=["'dup'"])


@pytest.mark.parametrize("query", ["\x00", "\u200b\u200b", "caf\udce9"])
def test_query_without_readable_text(shared, query):
    refused(lambda r: r.search(query), shared, words=["query must be"])


@pytest.mark.parametrize("ids, words", [
    ("cats", ["single str", "wrap it in a list"]),
    (["\udce9"], ["ids[0]", "lone surrogate"]),
    ([None], ["ids[0] must be a non-empty str"]),
    ([5], ["ids[0] must be a non-empty str"]),
    (["cats", ""], ["ids[1]"]),
])
def test_bad_delete(shared, ids, words):
    refused(lambda r: r.delete(ids), shared, words=words)


def test_delete_of_nothing_or_unknown_ids(shared):
    r, before = shared
    head = r._writer.log.head()  # read for this check only
    assert r.delete([]) == 0 and r.delete(["no-such-id"]) == 0
    assert state(r) == before
    assert r._writer.log.head() == head  # no entry in the change log either (one each was)


@pytest.mark.parametrize("vector, words", [
    (np.zeros(3), ["query_vector has shape"]),
    (np.full(384, np.nan), ["NaN"]),
    ("abc", ["query_vector"]),
    (np.zeros(384), ["query_vector is all zeros", "embed_query"]),
])
def test_bad_query_vector(shared, vector, words):
    refused(lambda r: r.search("cats", query_vector=vector), shared, words=words)


@pytest.mark.parametrize("where", [None, {"topic": "food"}], ids=["unfiltered", "filtered"])
def test_a_query_vector_of_any_length_finds_the_same(shared, where):
    """Every plan scores by cosine, so a query vector's length changes nothing; scaled by
    1e20 or 1e-25 it once over- or underflowed in float32 (all scores 0, or not cosines)."""
    r, _ = shared
    q = r.embedder.embed_query("cats")
    want = [(h.id, round(h.score, 4)) for h in r.search("cats", 3, mode="dense", where=where,
                                                        query_vector=q)]
    for scale in (1e20, 1e-25, 3.0):
        assert [(h.id, round(h.score, 4)) for h in
                r.search("cats", 3, mode="dense", where=where,
                         query_vector=q * scale)] == want, scale


def test_allowed_oddities_work(tmp_path, embedder):
    """Inputs that are not errors: same-content duplicates collapse, None metadata values
    are dropped, a long text is chunked, str and dict documents are accepted."""
    with HybridRetriever(path=str(tmp_path / "s"), embedder=embedder) as r:
        ids = r.add_documents([Document("twice", id="t"), Document("twice", id="t"),
                               Document("meta", id="m", metadata={"a": None, "b": 1}),
                               Document(LONG, id="long"), "a plain string",
                               {"text": "a dict", "id": "d"}])
        assert ids[:2] == ["t", "t"] and len(ids) == 6
        assert r.get(["m"])[0].metadata == {"b": 1}
        assert r.get(["long"])[0].text == LONG
        assert r.count() > 5  # the long text is several chunks
        assert r.search("harbours cargo ships", k=1)[0].id == "long"


def test_documents_without_bm25_terms_are_searchable(tmp_path, embedder):
    """Texts that give no BM25 terms (emoji, stopwords, punctuation) are valid documents; a
    store holding only such texts still answers in every mode (BM25 finds nothing)."""
    with HybridRetriever(path=str(tmp_path / "s"), embedder=embedder) as r:
        r.add_documents([Document("🙂 🎉", id="emoji"), Document("the of and", id="stop"),
                         Document("!!! ???", id="punct")])
        assert r.search("party", mode="sparse") == []
        assert {h.id for h in r.search("party", k=3, mode="dense")} == {"emoji", "stop", "punct"}
        assert len(r.search("party", k=3)) == 3
        r.add_documents([Document("A party with balloons.", id="party")])
        assert r.search("party", k=1, mode="sparse")[0].id == "party"


def test_long_text_with_chunking_disabled(tmp_path, embedder):
    path = str(tmp_path / "s")
    with HybridRetriever({"chunking": {"enabled": False}}, path=path, embedder=embedder) as r:
        r.add_documents([Document("short one", id="s")])
        with pytest.raises(InvalidInputError) as err:
            r.add_documents([Document("another", id="a"), Document(LONG, id="long")])
        assert "'long'" in str(err.value) and "chunking.enabled" in str(err.value)
        assert r.count() == 1 and r.verify()['sparse_ids'] == {"s"}


# -- opening -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def closed_store(tmp_path_factory, embedder):
    """A store on disk that is closed, for the open-time cases; returns (path, state)."""
    path = str(tmp_path_factory.mktemp("closed") / "store")
    with HybridRetriever(path=path, embedder=embedder) as r:
        r.add_documents([Document(t, id=i, metadata=m) for i, t, m in CORPUS])
        return path, state(r)


def reopened_state(path, embedder):
    with HybridRetriever(path=path, embedder=embedder) as r:
        return state(r)


@pytest.mark.parametrize("kwargs, words", [
    ({"config": {"embedder": {"query_prefix": "query: "}}},
     ["embedder.query_prefix", "store has ''", "'query: '", "HybridRetriever.open"]),
    ({"model": "PACKAGE_DIR"}, ["embedder.model", "HybridRetriever.open"]),
    ({"config": {"sparse": {"tokenizer": {"stemmer": None}}}},
     ["sparse.tokenizer.stemmer"]),
    ({"config": {"chunking": {"max_tokens": 64}}}, ["chunking.max_tokens"]),
])
def test_store_made_with_other_settings(closed_store, embedder, kwargs, words):
    path, before = closed_store
    kwargs = dict(kwargs)
    if kwargs.get("model") == "PACKAGE_DIR":  # same weights, named by path instead of hub id
        kwargs["model"] = embedder.resolved.load_from
    with pytest.raises(StoreMismatchError) as err:
        HybridRetriever(path=path, **kwargs)
    for w in words:
        assert w in str(err.value)
    assert reopened_state(path, embedder) == before


def test_truncate_dim_above_model_dim(tmp_path, embedder):
    path = str(tmp_path / "s")
    with pytest.raises(ConfigError) as err:
        HybridRetriever(path=path, truncate_dim=1000)
    assert "truncate_dim=1000" in str(err.value) and "384" in str(err.value)
    # nothing was recorded: the right settings open the same path without a mismatch
    with HybridRetriever(path=path, embedder=embedder) as r:
        r.add_documents([Document("fine", id="f")])
        assert r.count() == 1


@pytest.mark.parametrize("value", [0, -3, "64", 2.5])
def test_truncate_dim_not_a_positive_int(value):
    with pytest.raises(ConfigError) as err:
        HybridRetriever(path=":memory:", truncate_dim=value)
    assert "truncate_dim must be an int >= 1" in str(err.value)


def test_unknown_model_offline(tmp_path, embedder):
    path = str(tmp_path / "s")
    with pytest.raises(ModelNotFoundError) as err:
        HybridRetriever(path=path, model="nobody/no-such-model-xyz")
    msg = str(err.value)
    assert "nobody/no-such-model-xyz" in msg and "local directory" in msg
    assert "HF_HUB_OFFLINE" in msg
    with HybridRetriever(path=path, embedder=embedder) as r:  # nothing was recorded
        assert r.count() == 0


def test_unwritable_store_directory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError) as err:
        HybridRetriever(path=str(blocker / "store"))
    assert "store.path" in str(err.value) and "writable" in str(err.value)


@pytest.mark.parametrize("kwargs, words", [
    ({"mode": "fuzzy"}, ["mode must be one of"]),
    ({"candidates": 0}, ["candidates must be an int >= 1"]),
    ({"collection": "a"}, ["store.collection", "3-512"]),
    ({"config": {"rrf_k": -1}}, ["rrf_k"]),
    ({"config": {"weights": {"dense": -1}}}, ["weight", "'dense'"]),
    ({"config": {"no_such_key": 1}}, ["unknown config keys", "valid keys"]),
])
def test_bad_settings(kwargs, words):
    with pytest.raises(ConfigError) as err:
        HybridRetriever(path=":memory:", **kwargs)
    for w in words:
        assert w in str(err.value)


# -- derived state on disk -----------------------------------------------------------------
def _corrupt(path: Path, how: str) -> None:
    if how == "deleted":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:max(1, len(data) // 2)])
    elif how == "garbage":
        path.write_bytes(b"\x00\xffnot what was written\x80\x04" * 7)


#: our state file, tantivy's meta file, and each kind of tantivy segment file
BM25_FILES = ["state.json", "meta.json", "*.term", "*.idx", "*.pos", "*.store", "*.fieldnorm",
              "*.fast"]


@pytest.mark.parametrize("how", ["deleted", "empty", "truncated", "garbage"])
@pytest.mark.parametrize("name", BM25_FILES)
def test_corrupt_bm25_file_is_rebuilt_from_chroma(closed_store, embedder, name, how, caplog):
    path, before = closed_store
    sparse = Path(path) / "retrievekit" / "retrievekit" / "sparse"
    targets = sorted(sparse.glob(name))
    assert targets, name
    _corrupt(targets[0], how)
    caplog.set_level(logging.INFO)
    assert reopened_state(path, embedder) == before  # rebuilt on open, same results
    # and committed again: the next open loads it without rebuilding
    caplog.clear()
    with HybridRetriever(path=path, embedder=embedder) as r:
        assert r.verify()["ok"]
    assert "unreadable" not in caplog.text and "rebuilt" not in caplog.text


def test_missing_bm25_folder_is_rebuilt(closed_store, embedder):
    path, before = closed_store
    shutil.rmtree(Path(path) / "retrievekit" / "retrievekit" / "sparse")
    assert reopened_state(path, embedder) == before


def test_bm25_made_with_another_stemmer_version_is_rebuilt(closed_store, embedder, caplog):
    # PyStemmer 2.2 and 3.1 stem 82 of the 36,688 words of the five collections differently
    # ("added": "ad" / "add"); an index made with one must not be queried with the other
    import Stemmer

    path, before = closed_store
    state_file = Path(path) / "retrievekit" / "retrievekit" / "sparse" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["signature"]["stemmer_version"] == Stemmer.version()
    state["signature"]["stemmer_version"] = "0.0-other"
    state_file.write_text(json.dumps(state))
    caplog.set_level(logging.INFO, logger="retrievekit")
    assert reopened_state(path, embedder) == before
    assert "rebuilt" in caplog.text
    assert json.loads(state_file.read_text())["signature"]["stemmer_version"] == \
        Stemmer.version()


def test_bm25_saved_with_other_settings_is_rebuilt(closed_store, embedder):
    path, before = closed_store
    state_file = Path(path) / "retrievekit" / "retrievekit" / "sparse" / "state.json"
    state = json.loads(state_file.read_text())
    state["signature"]["tokenizer"]["stemmer"] = "porter"
    state_file.write_text(json.dumps(state))
    assert reopened_state(path, embedder) == before


def test_calls_after_close_are_refused(tmp_path, tiny_embedder):
    """They once failed with a TypeError or AttributeError from inside."""
    r = HybridRetriever(path=str(tmp_path / "s"), embedder=tiny_embedder)
    r.add_documents([{"text": "a river stone", "id": "a"}])
    r.close()
    for call in (lambda: r.search("river"), lambda: r.add_documents(["more"]),
                 lambda: r.delete(["a"]), lambda: r.verify(), lambda: r.count(),
                 lambda: r.sparse_candidates("river", 3), lambda: r.stored_vectors(["a"])):
        with pytest.raises(StoreError, match="this retriever is closed"):
            call()
    r.close()  # closing twice is fine
    with HybridRetriever(path=str(tmp_path / "s"), embedder=tiny_embedder) as again:
        assert again.count() == 1
