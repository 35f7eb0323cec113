"""BM25: tokenizer behaviour, parity with rank-bm25 (the oracle), persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from retrievekit.sparse import BM25Index, SparseConfig
from retrievekit.tokenize import Tokenizer, TokenizerConfig

PLAIN = TokenizerConfig(stopwords=None, stemmer=None)

DOCS = {
    f"d{i}": text for i, text in enumerate([
        "alpha beta gamma", "beta delta epsilon zeta", "gamma gamma eta theta",
        "iota kappa lambda mu", "nu xi omicron pi rho", "sigma tau upsilon",
        "phi chi psi omega alpha", "delta delta delta kappa", "eta theta iota",
        "mu nu xi", "rho sigma tau", "upsilon phi chi", "psi omega beta"])
}


def test_tokenizer_defaults_and_unicode():
    tok = Tokenizer()
    assert tok("The Cats are RUNNING!") == ["cat", "run"]
    assert Tokenizer(PLAIN)("Café naïve") == ["café", "naïve"]
    assert Tokenizer(PLAIN)("东京大学 in Tokyo") == ["东", "京", "大", "学", "in", "tokyo"]
    assert Tokenizer(PLAIN)("") == []
    assert Tokenizer(PLAIN)("snake_case x-ray 3.14") == ["snake", "case", "x", "ray", "3", "14"]


def test_parity_with_rank_bm25():
    ids = sorted(DOCS)
    tok = Tokenizer(PLAIN)
    oracle = BM25Okapi([tok(DOCS[i]) for i in ids], k1=1.5, b=0.75)
    # robertson idf is BM25Okapi's; with no term in more than half the docs, no idf floor applies
    ours = BM25Index(SparseConfig(engine="bm25s", method="robertson", tokenizer=PLAIN))
    ours.upsert(ids, [DOCS[i] for i in ids])
    ref = BM25Index(SparseConfig(engine="rank_bm25", tokenizer=PLAIN))
    ref.upsert(ids, [DOCS[i] for i in ids])
    for q in ["alpha gamma", "delta kappa", "theta iota mu", "omega", "unknownword"]:
        expected = oracle.get_scores(tok(q))
        exp = sorted(((ids[j], s) for j, s in enumerate(expected) if s > 0),
                     key=lambda x: (-x[1], x[0]))[:10]
        got = ours.search(q, 10)
        assert [d for d, _ in got] == [d for d, _ in exp]
        # bm25s leaves out BM25Okapi's constant (k1 + 1) numerator factor: same ranking,
        # scores scaled by 1 / (k1 + 1)
        np.testing.assert_allclose([s * 2.5 for _, s in got], [s for _, s in exp], rtol=1e-5)
        got_ref = ref.search(q, 10)
        assert [d for d, _ in got_ref] == [d for d, _ in exp]


def test_search_clamps_drops_nonpositive_and_filters():
    ix = BM25Index(SparseConfig(tokenizer=PLAIN))
    ix.upsert(list(DOCS), list(DOCS.values()))
    res = ix.search("delta", 100)
    assert [d for d, _ in res] == ["d7", "d1"]  # only docs that contain the term
    assert all(s > 0 for _, s in res)
    assert ix.search("delta", 100, allowed={"d1"})[0][0] == "d1"
    assert ix.search("delta", 100, allowed={"d0"}) == []
    assert ix.search("", 5) == []


def test_upsert_delete_follow_ids(tmp_path):
    ix = BM25Index(SparseConfig(tokenizer=PLAIN))
    ix.upsert(["a", "b"], ["red apple", "green pear"], ["h1", "h2"])
    assert ix.search("apple", 5)[0][0] == "a"
    ix.upsert(["a"], ["yellow banana"], ["h3"])
    assert ix.search("apple", 5) == []
    assert ix.search("banana", 5)[0][0] == "a"
    ix.delete(["b", "zzz"])
    assert ix.ids() == {"a"} and ix.hashes() == {"a": "h3"}


def test_save_load_roundtrip_no_pickle(tmp_path):
    ix = BM25Index()
    ix.upsert(list(DOCS), list(DOCS.values()))
    ix.save(tmp_path, marker="m1")
    back = BM25Index.load(tmp_path, SparseConfig())
    assert back is not None and back.marker == "m1" and back.ids() == ix.ids()
    for q in ["alpha", "delta kappa"]:
        assert back.search(q, 5) == ix.search(q, 5)
    current = json.loads((tmp_path / "current.json").read_text())
    folder = tmp_path / current["dir"]
    for f in folder.glob("*.npy"):
        np.load(f, allow_pickle=False)  # would raise on object arrays
    # other settings -> not loaded (rebuilt by the caller)
    assert BM25Index.load(tmp_path, SparseConfig(k1=1.2)) is None
    # corrupt -> not loaded
    (folder / "ids.json").write_text("[")
    assert BM25Index.load(tmp_path, SparseConfig()) is None
    assert BM25Index.load(tmp_path / "missing", SparseConfig()) is None


@pytest.mark.parametrize("bad", [{"engine": "lucene"}, {"k1": -1}, {"b": 2}, {"method": "x"}])
def test_bad_sparse_config(bad):
    from retrievekit.errors import ConfigError

    with pytest.raises(ConfigError, match="sparse\\."):
        SparseConfig(**bad)
