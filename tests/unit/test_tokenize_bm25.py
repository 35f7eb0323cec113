"""BM25: tokenizer behaviour, parity with rank-bm25 (the oracle), incremental updates,
persistence."""

from __future__ import annotations

import math

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from retrievekit.records import Record
from retrievekit.sparse import SparseConfig, SparseIndex
from retrievekit.tokenize import Tokenizer, TokenizerConfig

PLAIN = TokenizerConfig(stopwords=None, stemmer=None)

DOCS = {
    f"d{i}": text for i, text in enumerate([
        "alpha beta gamma", "beta delta epsilon zeta", "gamma gamma eta theta",
        "iota kappa lambda mu", "nu xi omicron pi rho", "sigma tau upsilon",
        "phi chi psi omega alpha", "delta delta delta kappa", "eta theta iota",
        "mu nu xi", "rho sigma tau", "upsilon phi chi", "psi omega beta"])
}


class LuceneBM25(BM25Okapi):
    """rank-bm25's BM25Okapi with Lucene's idf, ln(1 + (N - n + 0.5) / (n + 0.5)), which is
    the BM25 tantivy (and Elasticsearch) score with; the tf part is BM25Okapi's own."""

    def _calc_idf(self, nd):
        for word, freq in nd.items():
            self.idf[word] = math.log(1 + (self.corpus_size - freq + 0.5) / (freq + 0.5))


def _index(docs: dict[str, str], config: SparseConfig | None = None, directory=None
           ) -> SparseIndex:
    ix = SparseIndex(config or SparseConfig(tokenizer=PLAIN), directory)
    ix.replace([], [Record(i, i, t, {}) for i, t in docs.items()])
    ix.commit(1)
    return ix


def test_tokenizer_defaults_and_unicode():
    tok = Tokenizer()
    assert tok("The Cats are RUNNING!") == ["cat", "run"]
    assert Tokenizer(PLAIN)("Café naïve") == ["café", "naïve"]
    assert Tokenizer(PLAIN)("东京大学 in Tokyo") == ["东", "京", "大", "学", "in", "tokyo"]
    assert Tokenizer(PLAIN)("") == []
    assert Tokenizer(PLAIN)("snake_case x-ray 3.14") == ["snake", "case", "x", "ray", "3", "14"]


def test_words_keep_their_combining_marks():
    """Words of scripts written with combining marks (Devanagari, Tamil, vocalized Arabic)
    stay whole, and a decomposed (NFD) spelling gives the composed one's token: `re`'s \\w
    has no marks, which cut these words into consonants that matched each other."""
    import unicodedata

    tok = Tokenizer(PLAIN)
    assert tok("हिन्दी भाषा") == ["हिन्दी", "भाषा"]
    assert tok("தமிழ் மொழி") == ["தமிழ்", "மொழி"]
    assert tok("مُحَمَّد") == ["مُحَمَّد"]
    assert tok(unicodedata.normalize("NFD", "Café Résumé")) == ["café", "résumé"]
    assert tok("ﬁle ＡＢＣ") == ["file", "abc"]  # NFKC: ligatures, full-width letters


def test_stopwords_match_in_any_case_without_lowercasing():
    """With lowercase=False, a stopword list (lowercased or not) still removes "The" and
    "Of": the list was lowercased and the tokens were not, so capitals passed."""
    cased = Tokenizer(TokenizerConfig(lowercase=False, stopwords=("The", "Of"), stemmer=None))
    assert cased("The Lord Of the Rings") == ["Lord", "Rings"]
    en = Tokenizer(TokenizerConfig(lowercase=False, stemmer=None))
    assert en("The Lord of The Rings") == ["Lord", "Rings"]


@pytest.mark.parametrize("query", ["alpha gamma", "delta kappa", "theta iota mu", "omega",
                                   "delta delta beta", "unknownword"])
def test_parity_with_rank_bm25(query):
    ids = sorted(DOCS)
    tok = Tokenizer(PLAIN)
    oracle = LuceneBM25([tok(DOCS[i]) for i in ids], k1=1.2, b=0.75)
    expected = oracle.get_scores(tok(query))
    exp = sorted(((ids[j], s) for j, s in enumerate(expected) if s > 0),
                 key=lambda x: (-x[1], x[0]))[:10]
    got = _index(DOCS).search(query, 10)
    assert [d for d, _ in got] == [d for d, _ in exp]
    # short documents: tantivy's one-byte length norms are exact, so scores agree
    np.testing.assert_allclose([s for _, s in got], [s for _, s in exp], rtol=1e-4)


def test_search_clamps_drops_nonpositive_and_filters():
    ix = _index(DOCS)
    res = ix.search("delta", 100)
    assert [d for d, _ in res] == ["d7", "d1"]  # only docs that contain the term
    assert all(s > 0 for _, s in res)
    assert ix.search("delta", 100, allowed={"d1"})[0][0] == "d1"
    # the filter must not change scores
    assert ix.search("delta", 100, allowed={"d1"})[0][1] == dict(res)["d1"]
    assert ix.search("delta", 100, allowed={"d0"}) == []
    assert ix.search("delta", 100, allowed=set()) == []
    assert ix.search("", 5) == []


def test_ties_are_broken_by_id():
    docs = {f"t{i:02d}": "same words here" for i in range(40)}
    got = _index(docs).search("words", 5)
    assert [d for d, _ in got] == ["t00", "t01", "t02", "t03", "t04"]


def test_tie_groups_bigger_than_one_fetch_are_broken_by_id():
    """300 records tie for the best score among 3,000 others: the top 5 are still the 5
    smallest ids (tantivy returns tied records in index order, not id order)."""
    docs = {f"t{i:03d}": "solar wind" for i in reversed(range(300))}
    docs.update({f"o{i:04d}": "solar " + " ".join(f"w{i % 97}" for _ in range(1 + i % 5))
                 for i in range(3000)})
    got = _index(docs).search("solar wind", 5)
    assert [d for d, _ in got] == ["t000", "t001", "t002", "t003", "t004"]


def test_ids_read_from_one_snapshot_are_not_reused_by_the_next():
    """Record ids are remembered by document address within a committed snapshot; after a
    commit the same addresses hold other records (here: all replaced), never the old ids."""
    ix = SparseIndex(SparseConfig(tokenizer=PLAIN))
    ix.replace([], [Record(f"old{i}", f"old{i}", "shared word", {}) for i in range(5)])
    ix.commit(1)
    assert {rid for rid, _ in ix.search("shared", 5)} == {f"old{i}" for i in range(5)}
    ix.clear()
    ix.replace([], [Record(f"new{i}", f"new{i}", "shared word", {}) for i in range(5)])
    ix.commit(2)
    assert {rid for rid, _ in ix.search("shared", 5)} == {f"new{i}" for i in range(5)}
    ids = [f"new{i}" for i in range(5)]
    assert ix.reader().keep(ids + ["old0"], ix.compile({"x": {"$ne": 1}})) == set(ids)


def test_replace_and_delete_follow_documents():
    ix = SparseIndex(SparseConfig(tokenizer=PLAIN))
    ix.replace([], [Record("a", "a", "red apple", {}), Record("b#chunk0", "b", "green pear", {}),
                    Record("b#chunk1", "b", "pear tree", {})])
    ix.commit(1)
    assert ix.search("apple", 5)[0][0] == "a"
    ix.replace(["a"], [Record("a", "a", "yellow banana", {})])
    ix.commit(2)
    assert ix.search("apple", 5) == []
    assert ix.search("banana", 5)[0][0] == "a"
    ix.replace(["b", "zzz"], [])  # every chunk of b goes with its parent
    ix.commit(3)
    assert ix.ids() == {"a"} and len(ix) == 1 and ix.watermark == 3


def test_persisted_index_reopens_without_rebuild(tmp_path):
    ix = _index(DOCS, directory=tmp_path / "sparse")
    ix.commit(7)
    before = {q: ix.search(q, 5) for q in ["alpha", "delta kappa"]}
    ix.close()
    back = SparseIndex(SparseConfig(tokenizer=PLAIN), tmp_path / "sparse")
    assert back.watermark == 7 and back.ids() == set(DOCS)
    assert {q: back.search(q, 5) for q in before} == before
    back.close()
    # other settings: the derived index is dropped (watermark -1: the owner rebuilds it)
    other = SparseIndex(SparseConfig(), tmp_path / "sparse")
    assert other.watermark == -1 and len(other) == 0
    other.close()


def test_an_index_of_other_tokenizer_rules_is_rebuilt(tmp_path):
    """An index made by other tokenizer rules (a state without this TOKENIZER_VERSION, as
    every index before version 2) is dropped on open, for its owner to rebuild: its
    tokens would not be the ones queries are cut into now."""
    import json

    ix = _index(DOCS, directory=tmp_path / "sparse")
    ix.commit(7)
    ix.close()
    state = tmp_path / "sparse" / "state.json"
    data = json.loads(state.read_text())
    data["signature"].pop("tokenizer_version")
    state.write_text(json.dumps(data))
    back = SparseIndex(SparseConfig(tokenizer=PLAIN), tmp_path / "sparse")
    assert back.watermark == -1 and len(back) == 0
    back.close()


def test_damaged_state_file_means_rebuild(tmp_path):
    ix = _index(DOCS, directory=tmp_path / "sparse")
    ix.close()
    (tmp_path / "sparse" / "state.json").write_text("{")
    back = SparseIndex(SparseConfig(tokenizer=PLAIN), tmp_path / "sparse")
    assert back.watermark == -1 and len(back) == 0
    back.close()


@pytest.mark.parametrize("bad", [{"k1": 1.5}, {"b": 0.5}])
def test_bm25_parameters_tantivy_cannot_honor_are_refused(bad):
    from retrievekit.errors import ConfigError

    with pytest.raises(ConfigError, match="sparse\\."):
        SparseConfig(**bad)
