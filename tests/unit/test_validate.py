"""validate.py and the settings checked with it: one message form, bools are not numbers,
strings are not bools, NaN/inf are not finite numbers, limits found on Chroma 1.5.9."""

from __future__ import annotations

import math

import pytest

from retrievekit import validate as v
from retrievekit.config import RetrieverConfig
from retrievekit.errors import ConfigError, InvalidInputError, RetrieveKitError
from retrievekit.store import StoreConfig


@pytest.mark.parametrize("value", [True, False, 0, -1, 2.0, "3", None, [1], math.nan])
def test_integer_refuses_bools_strings_floats(value):
    with pytest.raises(ConfigError) as err:
        v.integer("x", value, fix="e.g. 3")
    assert str(err.value) == f"x must be an int >= 1, got {value!r}; e.g. 3"


def test_integer_range_optional_and_error_kind():
    assert v.integer("x", 5, 1, 5) == 5 and v.integer("x", None, optional=True) is None
    with pytest.raises(InvalidInputError, match=r"x must be an int in \[1, 5\] or None, got 6"):
        v.integer("x", 6, 1, 5, optional=True, error=InvalidInputError)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "1", None])
def test_number_refuses_nan_inf_bools(value):
    with pytest.raises(ConfigError, match="must be a finite number >= 0"):
        v.number("w", value, 0)


def test_number_bounds():
    assert v.number("w", 0.5, 0, 1, low_open=True) == 0.5
    with pytest.raises(ConfigError, match=r"w must be a number in \(0, 1\], got 0"):
        v.number("w", 0, 0, 1, low_open=True)


@pytest.mark.parametrize("value", ["false", "no", 0, 1, None, []])
def test_boolean_is_strict(value):
    with pytest.raises(ConfigError, match="b must be True or False"):
        v.boolean("b", value)


def test_choice_compares_types():
    assert v.choice("m", "dense", ("dense", "sparse")) == "dense"
    assert v.choice("q", None, (None, "int8")) is None
    for bad in (1, True, [], "DENSE"):
        with pytest.raises(ConfigError, match="m must be one of"):
            v.choice("m", bad, ("dense", "sparse", 1.5))
    with pytest.raises(ConfigError):
        v.choice("m", True, (1, 2))  # True == 1, but a bool is not the int setting


@pytest.mark.parametrize("value", ["a\ud800b", "\udfff"])
def test_text_refuses_lone_surrogates(value):
    with pytest.raises(ConfigError, match="valid Unicode .* lone surrogate"):
        v.text("t", value)


@pytest.mark.parametrize("value", ["", " \n\t", "\x00\x01", "\u200b\ufeff", "\u2028"])
def test_readable_refuses_text_without_anything_to_read(value):
    with pytest.raises(InvalidInputError, match="readable text"):
        v.readable("text", value, "give the text")


@pytest.mark.parametrize("value", ["a", " x ", "🙂", "猫", "\x00a"])
def test_readable_accepts_any_printable_character(value):
    assert v.readable("text", value, "") == value


def test_path_accepts_pathlike_refuses_others(tmp_path):
    assert v.path("p", tmp_path) == str(tmp_path)
    for bad in (1, b"/tmp", "", "a\x00b", None, ["x"]):
        with pytest.raises(ConfigError, match="p must be a path"):
            v.path("p", bad)


def test_shown_cuts_long_values():
    assert len(v.shown("x" * 1000)) == 80


# -- settings ------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, words", [
    # M=1 builds an HNSW graph that finds almost nothing (0 of 5 self-queries on Chroma 1.5.9)
    ({"hnsw_m": 1}, ["store.hnsw_m", "[2, 10000]"]),
    # M=10**8: Chroma accepts it, then every add fails ("Failed to get hnsw segment writer")
    ({"hnsw_m": 10 ** 8}, ["store.hnsw_m"]),
    ({"hnsw_ef_search": 2 ** 64}, ["store.hnsw_ef_search"]),  # Chroma's create: not a u64
    ({"hnsw_ef_construction": 0}, ["store.hnsw_ef_construction"]),
    ({"hnsw_m": True}, ["store.hnsw_m", "got True"]),
    ({"port": 70000}, ["store.port", "65535"]),
    ({"port": "8000"}, ["store.port"]),
    ({"ssl": "yes"}, ["store.ssl", "True or False"]),
    ({"path": 5}, ["store.path", "got 5"]),
    ({"path": None}, ["store.path"]),
    ({"host": 5}, ["store.host"]),
    ({"replica_dir": "x"}, ["store.replica_dir", "store.host"]),
    ({"private": 1}, ["store.private"]),
])
def test_store_config_limits(changes, words):
    with pytest.raises(ConfigError) as err:
        StoreConfig(**changes)
    for w in words:
        assert w in str(err.value)


def test_store_config_accepts_the_edges():
    StoreConfig(hnsw_m=2, hnsw_ef_search=2 ** 64 - 1, port=65535)
    StoreConfig(hnsw_m=10_000, hnsw_ef_construction=1)


@pytest.mark.parametrize("data, words", [
    ({"weights": "abc"}, ["weights must be a dict", "'abc'"]),
    ({"weights": {"dense": math.nan}}, ["weights['dense']", "finite"]),
    ({"weights": {"dense": math.inf}}, ["weights['dense']"]),
    ({"weights": {"dense": True}}, ["weights['dense']"]),
    ({"weights": {1: 1.0}}, ["weights", "'dense' and 'sparse' only"]),
    ({"rrf_k": math.inf}, ["rrf_k"]),
    ({"candidates": True}, ["candidates must be an int >= 1, got True"]),
    ({"collapse_chunks": "no"}, ["collapse_chunks must be True or False"]),
    ({"cache_dir": 1}, ["cache_dir"]),
    ({"chunk_penalty": math.nan}, ["chunk_penalty"]),
    ({"mode": None}, ["mode must be one of"]),
    ({"store": None}, ["store must be a StoreConfig"]),
    ({"embedder": {"model": 1}}, ["embedder.model"]),
    ({"embedder": {"normalize": "no"}}, ["embedder.normalize"]),
    ({"embedder": {"batch_size": True}}, ["embedder.batch_size"]),
    ({"embedder": {"query_prefix": 1}}, ["embedder.query_prefix"]),
    ({"embedder": {"device": 0}}, ["device"]),
    ({"embedder": {"onnx_quantize": 1}}, ["onnx_quantize"]),
    ({"chunking": {"enabled": "no"}}, ["chunking.enabled"]),
    ({"chunking": {"max_tokens": True}}, ["chunking.max_tokens"]),
    ({"sparse": {"tokenizer": "x"}}, ["sparse.tokenizer"]),
    ({"sparse": {"tokenizer": {"lowercase": "no"}}}, ["tokenizer.lowercase"]),
    ({"sparse": {"tokenizer": {"min_token_len": True}}}, ["tokenizer.min_token_len"]),
    ({"sparse": {"tokenizer": {"stopwords": [1]}}}, ["tokenizer.stopwords"]),
    ({"sparse": {"tokenizer": {"nope": 1}}}, ["sparse.tokenizer", "nope"]),
    ({"reranker": {"top_n": True}}, ["reranker.top_n"]),
    ({"reranker": {"threshold": math.nan}}, ["reranker.threshold"]),
    ({"reranker": {"sigmoid": "x"}}, ["reranker.sigmoid"]),
    ({"reranker": {"max_length": 0}}, ["reranker.max_length"]),
    ({"reranker": {"weight": 0}}, ["reranker.weight"]),
    ({1: 2, "x": 3}, ["unknown config keys"]),
])
def test_config_refuses_with_the_setting_named(data, words):
    with pytest.raises(ConfigError) as err:
        RetrieverConfig.from_dict(data)
    assert isinstance(err.value, RetrieveKitError)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_toml_that_is_not_utf8(tmp_path):
    path = tmp_path / "rk.toml"
    path.write_bytes(b'mode = "dense"\n# caf\xe9\n')
    with pytest.raises(ConfigError, match="not UTF-8 .*byte 20"):
        RetrieverConfig.from_toml(path)
    with pytest.raises(ConfigError, match="config file must be a path"):
        RetrieverConfig.from_toml(3)  # an int would open file descriptor 3
