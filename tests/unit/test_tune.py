"""`retrievekit tune`'s TOML and table: every setting a trial used, read back as it was.

The whole command (grid, dev split, store) runs in tests/integration/test_eval_cli.py.
"""

from __future__ import annotations

import pytest

from retrievekit.config import RetrieverConfig
from retrievekit.errors import ConfigError, InvalidInputError
from retrievekit.tune import DEFAULT, Trial, grid, table, to_toml, tune


@pytest.mark.parametrize("settings", [
    {"fusion": "rrf", "candidates": 50, "weights": {"dense": 1.0, "sparse": 0.5}, "rrf_k": 10},
    {"fusion": "dbsf", "candidates": 200},  # no weights: the library's
    {"fusion": "relative_score", "chunk_penalty": 0.1, "weights": {"sparse": 2.0}},
])
def test_the_toml_holds_every_setting_of_the_trial(tmp_path, settings):
    """Only fusion, candidates and weights were written: an rrf_k the trial was scored
    with was lost, and a trial without weights raised KeyError after the last trial."""
    path = tmp_path / "tuned.toml"
    path.write_text(to_toml(Trial(settings, 0.5, 0.6), None, "set", "dev"), encoding="utf-8")
    cfg = RetrieverConfig.from_toml(path)
    assert cfg == RetrieverConfig.from_dict(settings)
    assert "library default was not tried" in path.read_text()
    row = table([Trial(settings, 0.5, 0.6)]).splitlines()[-1]
    assert ("rrf_k=10" in row) == ("rrf_k" in settings) and row.endswith("| 0.5000 | 0.6000 |")


def test_what_toml_cannot_hold_is_refused():
    with pytest.raises(InvalidInputError, match="finite float"):
        to_toml(Trial({"rrf_k": float("nan")}, 0.5, 0.6), None, "set", "dev")
    with pytest.raises(InvalidInputError, match="valid Unicode"):
        to_toml(Trial({"fusion": "rrf\ud800"}, 0.5, 0.6), None, "set", "dev")


@pytest.mark.parametrize("text", ["🔎 query: ", 'a "quoted" \\ back\nslash\x7f\x01', "é"])
def test_strings_round_trip_as_written(tmp_path, text):
    """json.dumps wrote a character past U+FFFF as a surrogate pair, which TOML refuses."""
    path = tmp_path / "t.toml"
    path.write_text(to_toml(Trial({"embedder": {"query_prefix": text}}, 0.5, 0.6), None, "s",
                            "dev"), encoding="utf-8")
    assert RetrieverConfig.from_toml(path).embedder.query_prefix == text


def test_a_collection_name_of_any_characters_is_a_comment():
    """A folder name with a newline broke the comment line, after every trial had run."""
    import tomllib

    text = to_toml(Trial({"fusion": "rrf"}, 0.5, 0.6), None, "odd\nname\r\x00🔎", "dev")
    assert tomllib.loads(text) == {"fusion": "rrf"} and "odd?name??🔎 (dev split)" in text


def test_the_default_trial_is_found_by_its_settings(tmp_path):
    best = Trial({"fusion": "rrf", "candidates": 50}, 0.52, 0.6)
    text = to_toml(best, Trial(DEFAULT, 0.5, 0.6), "set", "dev")
    assert "nDCG@10 0.5200 (library default 0.5000)" in text
    assert grid()[0] == DEFAULT


def test_settings_are_refused_before_anything_is_read(tmp_path):
    """A bad setting raised only after every trial had been encoded and scored."""
    missing = tmp_path / "no-such-collection"
    with pytest.raises(ConfigError, match="fusion"):
        tune(missing, settings=[{"fusion": "bogus"}], out=tmp_path / "out")
    with pytest.raises(ConfigError, match="rrf_k"):
        tune(missing, settings=[{"rrf_k": float("inf")}], out=tmp_path / "out")
    for other in ({"sparse": {"tokenizer": {"stemmer": "porter"}}}, {"chunking": {}},
                  {"embedder": {"model": "x"}}, {"store": {"path": "elsewhere"}}):
        with pytest.raises(InvalidInputError, match="query-time"):  # raised mid-run
            tune(missing, settings=[DEFAULT, {**DEFAULT, **other}], out=tmp_path / "out")
    with pytest.raises(InvalidInputError, match="at least one"):
        tune(missing, settings=[], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_test_split_is_refused_by_the_file_it_would_read(tmp_path):
    """Found by an attack: `--split ./test` (or `../qrels/test`, or a dev.tsv that is a link
    to test.tsv) tuned on the test split, since only the name "test" was refused."""
    data = tmp_path / "beir"
    (data / "qrels").mkdir(parents=True)
    (data / "qrels" / "test.tsv").write_text("q1\td1\t1\n")
    (data / "qrels" / "dev.tsv").symlink_to("test.tsv")
    for split, match in (("test", "tuning on the split"), ("dev", "tuning on the split"),
                         ("./test", "not a path"), ("../qrels/test", "not a path")):
        with pytest.raises(InvalidInputError, match=match):
            tune(data, split=split, settings=[DEFAULT], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("setting", "match"), [
    ({"collapse_chunks": False}, "chunk ids"),
    ({"funnel_candidates": 400}, "no funnel"),
    ({"cache_dir": ""}, "cache_dir"),
    ({"model": ""}, "model"),
])
def test_settings_that_would_score_nothing_they_say_are_refused(tmp_path, setting, match):
    """Found by an attack: collapse_chunks=False scored chunk ids ('d1#chunk1') against
    qrels that judge documents; funnel_candidates changed nothing (the evaluation index has
    no funnel); an empty cache_dir wrote into the working directory and an empty model
    meant the default one."""
    missing = tmp_path / "no-such-collection"
    options = {k: x for k, x in setting.items() if k in ("cache_dir", "model")}
    settings = [{k: x for k, x in setting.items() if k not in options}]
    with pytest.raises(InvalidInputError, match=match):
        tune(missing, settings=settings, out=tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()
