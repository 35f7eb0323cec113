from __future__ import annotations

import pytest

from retrievekit.config import RetrieverConfig
from retrievekit.errors import ConfigError


def test_round_trip_dict_and_toml(tmp_path):
    cfg = RetrieverConfig.from_dict({
        "embedder": {"model": "intfloat/e5-small-v2", "truncate_dim": 256},
        "store": {"path": str(tmp_path / "s"), "collection": "docs", "hnsw_ef_search": 100},
        "sparse": {"k1": 1.2, "tokenizer": {"stemmer": None, "stopwords": ["a", "the"]}},
        "reranker": {"model": "cross-encoder/ms-marco-MiniLM-L-6-v2", "top_n": 5},
        "weights": {"sparse": 0.5}, "candidates": 30, "mode": "dense",
    })
    d = cfg.to_dict()
    assert RetrieverConfig.from_dict(d) == cfg
    assert d["weights"] == {"dense": 1.0, "sparse": 0.5}
    toml = tmp_path / "rk.toml"
    toml.write_text(f"""
mode = "dense"
candidates = 30
[embedder]
model = "intfloat/e5-small-v2"
truncate_dim = 256
[store]
path = "{tmp_path / 's'}"
collection = "docs"
hnsw_ef_search = 100
[sparse]
k1 = 1.2
[sparse.tokenizer]
stemmer = false
""".replace("stemmer = false", 'stopwords = ["a", "the"]'))
    from_toml = RetrieverConfig.from_toml(toml)
    assert from_toml.embedder.truncate_dim == 256
    assert from_toml.sparse.tokenizer.stopwords == ("a", "the")
    assert from_toml.store.collection == "docs"
    off = tmp_path / "off.toml"
    off.write_text("[sparse.tokenizer]\nstopwords = false\nstemmer = false\n")
    tok = RetrieverConfig.from_toml(off).sparse.tokenizer
    assert tok.stopwords is None and tok.stemmer is None


@pytest.mark.parametrize("data,fragment", [
    ({"nope": 1}, "unknown config keys"),
    ({"embedder": {"modle": "x"}}, "unknown embedder keys"),
    ({"mode": "fuzzy"}, "mode must be one of"),
    ({"candidates": 0}, "candidates"),
    ({"embedder": {"truncate_dim": 0}}, "truncate_dim"),
    ({"store": {"collection": "ab"}}, "store.collection"),
    ({"weights": {"bm25": 1}}, "weights"),
    ({"rrf_k": -5}, "rrf_k"),
    ({"sparse": {"tokenizer": {"stemmer": "klingon"}}}, "tokenizer.stemmer"),
])
def test_bad_config_names_the_setting(data, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RetrieverConfig.from_dict(data)


def test_auth_token_never_serialized():
    cfg = RetrieverConfig.from_dict({"store": {"host": "127.0.0.1", "auth_token": "s3cret"}})
    assert "s3cret" not in repr(cfg.store)
    assert cfg.to_dict()["store"]["auth_token"] is None
    assert cfg.replace(mode="dense").store.auth_token == "s3cret"


def test_stopwords_of_another_type_are_a_config_error():
    """A numpy array of words raised numpy's "truth value of an array is ambiguous"."""
    import numpy as np

    from retrievekit.errors import ConfigError
    from retrievekit.tokenize import TokenizerConfig

    for bad in (np.array(["the", "a"]), np.array([]), {"the"}, 3):
        with pytest.raises(ConfigError, match="tokenizer.stopwords must be"):
            TokenizerConfig(stopwords=bad)


def test_replace_and_open_merge_a_table_given_in_part():
    from retrievekit.config import RetrieverConfig

    cfg = RetrieverConfig.from_dict({"sparse": {"tokenizer": {"stemmer": False,
                                                              "stopwords": False}}})
    moved = cfg.replace(sparse={"tokenizer": {"min_token_len": 2}})
    assert moved.sparse.tokenizer.stemmer is None and moved.sparse.tokenizer.stopwords is None
    assert moved.sparse.tokenizer.min_token_len == 2


def test_funnel_candidates_without_funnel_dim_is_refused():
    from retrievekit.config import RetrieverConfig
    from retrievekit.errors import ConfigError

    with pytest.raises(ConfigError, match="funnel_candidates.*set funnel_dim"):
        RetrieverConfig(funnel_candidates=50)
    assert RetrieverConfig(funnel_dim=128, funnel_candidates=50).funnel_candidates == 50


def test_toml_with_a_byte_order_mark_is_read(tmp_path):
    from retrievekit.config import RetrieverConfig

    path = tmp_path / "rk.toml"
    path.write_bytes(b"\xef\xbb\xbf" + b'fusion = "rrf"\n')
    assert RetrieverConfig.from_toml(path).fusion == "rrf"
