"""Tests of retrievekit.evaluation: hand-computed metrics, ranx as an oracle, BEIR loading."""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from retrievekit.errors import InvalidInputError
from retrievekit.evaluation import (
    BeirDataset,
    EvalResult,
    dataset_documents,
    evaluate,
    evaluate_run,
    load_beir,
    map_at_k,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
)

SRC = Path(__file__).resolve().parents[2] / "src"
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
L3, L5 = math.log2(3), math.log2(5)

# One query, graded judgments, a ranking that finds d1 (grade 2) at rank 2, d3 (grade 3) at 4.
RELEVANT = {"d1": 2, "d2": 1, "d3": 3}
RANKING = ["d4", "d1", "d5", "d3"]
IDCG_3 = 3 / 1 + 2 / L3 + 1 / 2  # grades 3, 2, 1 at ranks 1, 2, 3 = 4.76185951


# --------------------------------------------------------------------------------------
# Hand-computed golden numbers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "k", "expected"),
    [
        (recall_at_k, 3, 1 / 3),
        (recall_at_k, 10, 2 / 3),
        (mrr_at_k, 1, 0.0),
        (mrr_at_k, 3, 1 / 2),
        # DCG@3 = 2/log2(3) = 1.26185951; / IDCG@3 4.76185951
        (ndcg_at_k, 3, 0.26499301486112564),
        # DCG@10 = 2/log2(3) + 3/log2(5) = 2.55388859; same ideal (only 3 relevant)
        (ndcg_at_k, 10, 0.5363218250207072),
        # hits at ranks 2 and 4: (1/2 + 2/4) / 3 relevant
        (map_at_k, 10, 1 / 3),
        # only the hit at rank 2 is inside the cutoff: (1/2) / 3
        (map_at_k, 3, 1 / 6),
    ],
)
def test_metric_golden(fn, k, expected) -> None:
    assert fn(RANKING, RELEVANT, k) == pytest.approx(expected, abs=1e-12)


def test_golden_ndcg_formulas_match_literals() -> None:
    # the literals above, re-derived from the formula so a typo in either is caught
    assert (2 / L3) / IDCG_3 == pytest.approx(0.26499301486112564, abs=1e-15)
    assert (2 / L3 + 3 / L5) / IDCG_3 == pytest.approx(0.5363218250207072, abs=1e-15)


def test_ndcg_ideal_is_cut_at_k() -> None:
    # 2 relevant of grade 1; k = 1: ideal holds one doc, so a hit at rank 1 is perfect
    assert ndcg_at_k(["a", "x"], {"a": 1, "b": 1}, 1) == pytest.approx(1.0)
    # map@1 still divides by all 2 relevant documents (ranx / trec_eval map_cut)
    assert map_at_k(["a", "x"], {"a": 1, "b": 1}, 1) == pytest.approx(0.5)


def test_non_positive_grades_are_not_relevant() -> None:
    assert recall_at_k(["a", "b"], {"a": 0, "b": 1}, 10) == pytest.approx(1.0)
    assert mrr_at_k(["a", "b"], {"a": 0, "b": 1}, 10) == pytest.approx(0.5)
    assert ndcg_at_k(["a"], {"a": 0}, 10) == 0.0


def test_evaluate_run_golden_means_and_coverage() -> None:
    run = {
        "q1": {"d4": 0.9, "d1": 0.8, "d5": 0.7, "d3": 0.6},
        "q3": {"dx": 1.0},  # not judged: ignored
    }
    qrels = {
        "q1": RELEVANT,
        "q2": {"d9": 1},  # judged but missing from the run: scores 0, counted
        "q4": {"d8": 0},  # no relevant document: not a judged query
    }
    res = evaluate_run(run, qrels, ks=(3, 10))
    assert isinstance(res, EvalResult)
    assert res.num_queries == 2
    assert set(res.per_query) == {"q1", "q2"}
    assert set(res.means) == {
        f"{m}@{k}" for m in ("ndcg", "recall", "mrr", "map") for k in (3, 10)
    }
    assert res.per_query["q1"]["ndcg@10"] == pytest.approx(0.5363218250207072)
    assert res.per_query["q2"] == {name: 0.0 for name in res.means}
    assert res["ndcg@10"] == pytest.approx(0.5363218250207072 / 2)
    assert res["recall@3"] == pytest.approx((1 / 3) / 2)
    assert res["mrr@10"] == pytest.approx(0.5 / 2)
    assert res["map@10"] == pytest.approx((1 / 3) / 2)


def test_list_run_equals_dict_run() -> None:
    qrels = {"q1": RELEVANT}
    a = evaluate_run({"q1": RANKING}, qrels, ks=(3, 10))
    b = evaluate_run({"q1": {d: -i for i, d in enumerate(RANKING)}}, qrels, ks=(3, 10))
    assert a.means == b.means


def test_ids_of_any_form_are_the_qrels_ids() -> None:
    """Qrels ids are read as str; a run's ids were used as given, so int ids, int query
    keys and (doc_id, score) pairs scored 0 (or raised a TypeError on mixed ids)."""
    qrels = {"q1": {"1": 1, "2": 2}}
    want = evaluate_run({"q1": ["2", "1"]}, qrels, ks=(10,)).means
    assert want["ndcg@10"] == 1.0
    for run in ({"q1": {2: 0.9, 1: 0.5}}, {"q1": [2, 1]}, {"q1": [("2", 0.9), ("1", 0.5)]},
                {"q1": {2: 0.9, "1": 0.5}}):
        assert evaluate_run(run, qrels, ks=(10,)).means == want, run
    assert evaluate_run({1: ["d1"]}, {1: {"d1": 1}}, ks=(10,)).means["ndcg@10"] == 1.0
    with pytest.raises(InvalidInputError, match="more than once"):
        evaluate_run({"q1": {2: 0.9, "2": 0.5}}, qrels)
    with pytest.raises(InvalidInputError, match="twice"):
        evaluate_run({1: ["1"], "1": ["2"]}, {"1": {"1": 1}})
    with pytest.raises(InvalidInputError, match="doc ids"):
        evaluate_run({"q1": [None]}, qrels)
    with pytest.raises(InvalidInputError, match="is 10.0;"):  # the item, not None
        evaluate_run({"q1": [10.0]}, qrels)
    import uuid  # ids of other types read as their str, as before

    u = uuid.UUID(int=7)
    assert evaluate_run({"q1": [(u, 0.9)]}, {"q1": {str(u): 1}}, ks=(10,)).means["ndcg@10"] == 1


def test_qrels_ids_are_checked_as_a_run_s() -> None:
    """Qrels merged 1 and "1" silently (one query lost, or the later grade kept) and read
    bytes ids as "b'd1'" (every metric 0); a run refuses all three."""
    with pytest.raises(InvalidInputError, match="query '1' twice"):
        evaluate_run({"1": ["d1"]}, {1: {"d1": 1}, "1": {"d2": 1}})
    with pytest.raises(InvalidInputError, match="document '1' twice"):
        evaluate_run({"q": ["1"]}, {"q": {1: 3, "1": 1}})
    with pytest.raises(InvalidInputError, match="ids are str or int"):
        evaluate_run({"q": ["d1"]}, {"q": {b"d1": 1}})
    assert evaluate_run({"q": ["d1"]}, {"q": {"d1": np.int64(2)}}, ks=np.int64(10)).means[
        "ndcg@10"] == 1.0
    assert evaluate_run({"q": ["d1"]}, {"q": {"d1": 1}}, ks=[np.int64(5)]).means["ndcg@5"] == 1.0


def test_per_query_metrics_refuse_repeats_and_cutoffs_below_one() -> None:
    for fn in (recall_at_k, mrr_at_k, ndcg_at_k, map_at_k):
        with pytest.raises(InvalidInputError, match="more than once"):
            fn(["a", "a"], {"a": 1}, 10)  # recall read 2.0
        for k in (0, -1, 2.5):
            with pytest.raises(InvalidInputError, match="k must be"):
                fn(["a", "b"], {"b": 1}, k)  # ndcg divided by zero; -1 cut the list
        assert fn(["b", "a"], {"b": 1}, np.int64(5)) == 1.0


def test_ties_broken_by_doc_id_ascending() -> None:
    qrels = {"q": {"b": 1}}
    # a and b tie: a comes first, so the relevant b sits at rank 2 whatever the dict order
    for run in ({"q": {"a": 1.0, "b": 1.0}}, {"q": {"b": 1.0, "a": 1.0}}):
        res = evaluate_run(run, qrels, ks=(1, 10), metrics=("mrr",))
        assert res["mrr@10"] == pytest.approx(0.5)
        assert res["mrr@1"] == 0.0


def test_identical_ids_dropped_before_cutoff() -> None:
    qrels = {"q1": {"d1": 1}}
    run = {"q1": {"q1": 0.9, "d1": 0.8}}
    on = evaluate_run(run, qrels, ks=(1,), metrics=("mrr", "recall"))
    off = evaluate_run(run, qrels, ks=(1,), metrics=("mrr", "recall"), ignore_identical_ids=False)
    assert on["mrr@1"] == 1.0 and on["recall@1"] == 1.0
    assert off["mrr@1"] == 0.0 and off["recall@1"] == 0.0


def test_identical_relevant_id_warns(caplog: pytest.LogCaptureFixture) -> None:
    qrels = {"7": {"7": 1, "8": 1}}
    run = {"7": ["7", "8"]}
    with caplog.at_level(logging.WARNING, logger="retrievekit.evaluation"):
        res = evaluate_run(run, qrels, ks=(10,), metrics=("recall",))
    assert res["recall@10"] == pytest.approx(0.5)  # "7" is dropped, still counted in R
    assert "ignore_identical_ids=False" in caplog.text
    off = evaluate_run(run, qrels, ks=(10,), metrics=("recall",), ignore_identical_ids=False)
    assert off["recall@10"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ks": (0,)}, "ks="),
        ({"ks": ()}, "ks="),
        ({"ks": (10.0,)}, "ks="),
        ({"metrics": ("ndcg", "p")}, "choose from"),
        ({"metrics": ()}, "metrics="),
    ],
)
def test_evaluate_run_rejects_bad_arguments(kwargs, match) -> None:
    with pytest.raises(InvalidInputError, match=match):
        evaluate_run({"q": ["a"]}, {"q": {"a": 1}}, **kwargs)


def test_evaluate_run_rejects_bad_runs_and_qrels() -> None:
    with pytest.raises(InvalidInputError, match="more than once"):
        evaluate_run({"q": ["a", "b", "a"]}, {"q": {"a": 1}})
    with pytest.raises(InvalidInputError, match="NaN"):
        evaluate_run({"q": {"a": float("nan")}}, {"q": {"a": 1}})
    with pytest.raises(InvalidInputError, match="integers"):
        evaluate_run({"q": ["a"]}, {"q": {"a": 1.5}})
    with pytest.raises(InvalidInputError, match="grade > 0"):
        evaluate_run({"q": ["a"]}, {"q": {"a": 0}})


# --------------------------------------------------------------------------------------
# ranx as an independent oracle
# --------------------------------------------------------------------------------------

RANX_METRICS = ["ndcg@10", "recall@100", "mrr@10", "map@10"]


def _random_case(seed: int) -> tuple[dict, dict]:
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(300)]
    qrels: dict[str, dict[str, int]] = {}
    run: dict[str, dict[str, float]] = {}
    for q in range(40):
        qid = f"q{q}"
        n_rel = rng.choice([1, 2, 5, 15, 40])  # some queries have more than 10 relevant
        qrels[qid] = {d: rng.randint(1, 3) for d in rng.sample(docs, n_rel)}
        if q % 9 == 0:
            continue  # judged but not in the run
        n_ret = rng.choice([3, 10, 50, 150])
        retrieved = rng.sample(docs, n_ret)
        # plant some relevant documents so the metrics are not all ~0
        retrieved += [d for d in qrels[qid] if rng.random() < 0.5 and d not in retrieved]
        scores = rng.sample(range(1, 10 * len(retrieved) + 1), len(retrieved))  # no ties
        run[qid] = {d: s / 7.0 for d, s in zip(retrieved, scores)}
    run["unjudged"] = {"d1": 1.0}
    return run, qrels


@pytest.fixture(scope="module")
def ranx():
    return pytest.importorskip("ranx")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_ranx_on_random_runs(ranx, seed: int) -> None:
    run, qrels = _random_case(seed)
    ours = evaluate_run(run, qrels, ks=(10, 100))
    ranx_run = ranx.Run(run)
    ranx_means = ranx.evaluate(ranx.Qrels(qrels), ranx_run, RANX_METRICS, make_comparable=True)
    assert ours.num_queries == len(qrels)
    for metric in RANX_METRICS:
        assert ours[metric] == pytest.approx(float(ranx_means[metric]), abs=1e-6), metric
        for qid in qrels:
            expected = float(ranx_run.scores[metric][qid])
            assert ours.per_query[qid][metric] == pytest.approx(expected, abs=1e-6), (metric, qid)


# --------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------

CORPUS = [
    {"_id": "d1", "title": "Heat", "text": "heat transfer in wings"},
    {"_id": "d2", "title": "", "text": "  no title here "},
    {"_id": "d3", "title": "  Lift ", "text": "lift and drag"},
]
QUERIES = [
    {"_id": "q1", "text": "wing heat"},
    {"_id": "q2", "text": "drag"},
    {"_id": "q3", "text": "never judged"},
    {"_id": "q4", "text": "judged only with score 0"},
]
QRELS_TSV = "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td3\t1\nq2\td3\t1\nq4\td2\t0\n"


def _write_beir(root: Path, gz: bool = False, split: str = "test") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in CORPUS)
    if gz:
        with gzip.open(root / "corpus.jsonl.gz", "wt", encoding="utf-8") as fh:
            fh.write(lines)
    else:
        (root / "corpus.jsonl").write_text(lines, encoding="utf-8")
    (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QUERIES))
    (root / "qrels").mkdir(exist_ok=True)
    (root / "qrels" / f"{split}.tsv").write_text(QRELS_TSV)
    return root


@pytest.mark.parametrize("gz", [False, True])
def test_load_beir(tmp_path: Path, gz: bool) -> None:
    ds = load_beir(_write_beir(tmp_path / "tiny", gz=gz))
    assert isinstance(ds, BeirDataset)
    assert ds.name == "tiny" and ds.split == "test"
    assert set(ds.corpus) == {"d1", "d2", "d3"}
    assert ds.corpus["d1"] == {"title": "Heat", "text": "heat transfer in wings"}
    assert ds.queries == {"q1": "wing heat", "q2": "drag"}  # q3 unjudged, q4 only score 0
    assert ds.qrels == {"q1": {"d1": 2, "d3": 1}, "q2": {"d3": 1}}
    assert list(dataset_documents(ds)) == [
        ("d1", "Heat\nheat transfer in wings"),
        ("d2", "no title here"),
        ("d3", "Lift\nlift and drag"),
    ]


def test_load_beir_reads_files_that_start_with_a_bom(tmp_path: Path) -> None:
    """Editors on Windows write UTF-8 with a byte order mark; it read as part of the first
    record (not JSON) or of the header line."""
    root = _write_beir(tmp_path / "tiny")
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        path = root / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    ds = load_beir(root)
    assert set(ds.corpus) == {"d1", "d2", "d3"} and set(ds.queries) == {"q1", "q2"}
    assert ds.qrels == {"q1": {"d1": 2, "d3": 1}, "q2": {"d3": 1}}


def test_load_beir_other_split(tmp_path: Path) -> None:
    root = _write_beir(tmp_path / "tiny", split="dev")
    assert load_beir(root, split="dev").split == "dev"
    with pytest.raises(InvalidInputError, match=r"qrels/test\.tsv.*splits found: \['dev'\]"):
        load_beir(root)


@pytest.mark.parametrize(
    ("remove", "match"),
    [
        ("corpus.jsonl", "corpus.jsonl"),
        ("queries.jsonl", "queries.jsonl"),
        ("qrels/test.tsv", r"qrels/test\.tsv"),
    ],
)
def test_load_beir_names_missing_file(tmp_path: Path, remove: str, match: str) -> None:
    root = _write_beir(tmp_path / "tiny")
    (root / remove).unlink()
    with pytest.raises(InvalidInputError, match=match):
        load_beir(root)


def test_load_beir_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="not a directory"):
        load_beir(tmp_path / "absent")
    root = _write_beir(tmp_path / "tiny")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq9\td1\t1\n")
    with pytest.raises(InvalidInputError, match="absent from"):
        load_beir(root)
    (root / "qrels" / "test.tsv").write_text("q1\td1\t1\nq1\td2\thigh\n")
    with pytest.raises(InvalidInputError, match=":2 has score 'high'"):
        load_beir(root)
    (root / "qrels" / "test.tsv").write_text(QRELS_TSV)
    (root / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\nnot json\n')
    with pytest.raises(InvalidInputError, match=r"corpus\.jsonl:2"):
        load_beir(root)


def test_load_beir_refuses_what_it_read_wrongly(tmp_path: Path) -> None:
    """Found by an attack: a first judgment with a score like 1.0 was taken for the header
    and dropped, "1_0" read as 10, a repeated query id replaced the first, a list as text
    became "['a', 'b']", a null id the id "None", and a file not in UTF-8 (or a .gz not in
    gzip) raised a bare UnicodeDecodeError (BadGzipFile)."""
    root = _write_beir(tmp_path / "tiny")
    qrels = root / "qrels" / "test.tsv"
    for text, match in (("q1\td1\t1.0\nq1\td2\t1\n", ":1 has score '1.0'"),
                        ("q1\td1\t1\nq1\td2\t1_0\n", ":2 has score '1_0'"),
                        ("q1\td1\t1e2\n", ":1 has score '1e2'")):
        qrels.write_text(text)
        with pytest.raises(InvalidInputError, match=match):
            load_beir(root)
    qrels.write_bytes(b"q1\td1\t1\nq\xe9\td2\t1\n")
    with pytest.raises(InvalidInputError, match="not readable as UTF-8"):
        load_beir(root)
    qrels.write_text(QRELS_TSV)
    queries = root / "queries.jsonl"
    for lines, match in (([{"_id": "q1", "text": "a"}, {"_id": "q1", "text": "b"}],
                          "repeats query id 'q1'"),
                         ([{"_id": "q1", "text": ["a", "b"]}], "'text' of type list"),
                         ([{"_id": None, "text": "a"}], "'_id' None"),
                         ([{"_id": True, "text": "a"}], "'_id' True")):
        queries.write_text("".join(json.dumps(r) + "\n" for r in lines))
        with pytest.raises(InvalidInputError, match=match):
            load_beir(root)
    queries.write_text("".join(json.dumps(r) + "\n" for r in QUERIES))
    (root / "corpus.jsonl").unlink()
    (root / "corpus.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(InvalidInputError, match="not readable as UTF-8 text in gzip"):
        load_beir(root)


def test_load_beir_refuses_what_it_would_read_ambiguously(tmp_path: Path) -> None:
    """Found by an attack: a judgment repeated with another grade kept the last one read
    (order decided it), a bad first line was dropped as a "header" (a bad second line was
    refused), a judged query without text loaded (every search on it then failed after the
    whole corpus was indexed), a corpus id the store refuses failed mid-index with a batch
    index, and a split spelled as a path (`./test`) read another file than its name."""
    root = _write_beir(tmp_path / "tiny")
    qrels = root / "qrels" / "test.tsv"
    for text, match in (("q1\td1\t1\nq1\td1\t0\n", r"test\.tsv:2 judges 'q1'.*'d1' again"),
                        ("q1\td1\t2\nq2\td3\t1\nq1\td1\t1\n", r":3 .*grade 1.*line 1.*grade 2"),
                        ("q1\td1\thigh\nq1\td2\t1\n", ":1 has score 'high'"),
                        ("query\tdoc\tscore\nq1\td2\t1\n", ":1 has score 'score'")):
        qrels.write_text(text)
        with pytest.raises(InvalidInputError, match=match):
            load_beir(root)
    qrels.write_text("q1\td1\t1\nq1\td1\t1\n")  # the same judgment twice: one judgment
    assert load_beir(root).qrels == {"q1": {"d1": 1}}
    qrels.write_text(QRELS_TSV)
    queries = root / "queries.jsonl"
    for record in ({"_id": "q2", "text": ""}, {"_id": "q2"}, {"_id": "q2", "text": " \u200b "}):
        queries.write_text("".join(json.dumps(r) + "\n" for r in (QUERIES[0], record)))
        with pytest.raises(InvalidInputError, match=r"queries\.jsonl:2 .*query 'q2'"):
            load_beir(root)
    queries.write_text("".join(json.dumps(r) + "\n" for r in QUERIES))
    corpus = root / "corpus.jsonl"
    for bad, match in (("x#chunk1", "ends like a chunk id"), ("\ud800", "lone surrogate")):
        corpus.write_text("".join(json.dumps(r) + "\n" for r in (*CORPUS, {"_id": bad, "text": "t"})))
        with pytest.raises(InvalidInputError, match=rf"corpus\.jsonl:4 .*{match}"):
            load_beir(root)
    corpus.write_text("".join(json.dumps(r) + "\n" for r in CORPUS))
    for split in ("./test", "../qrels/test", "sub/../test", "", "a\\b"):
        with pytest.raises(InvalidInputError, match="split"):
            load_beir(root, split=split)
    assert load_beir(root).qrels == {"q1": {"d1": 2, "d3": 1}, "q2": {"d3": 1}}


@pytest.mark.parametrize(
    ("name", "docs", "queries"),
    [("cranfield", 1400, 225), ("nfcorpus", 3633, 323)],
)
def test_load_shared_collections(name: str, docs: int, queries: int) -> None:
    if not (DATA / name).is_dir():
        pytest.skip(f"{DATA / name} not present")
    ds = load_beir(DATA / name)
    assert (len(ds.corpus), len(ds.queries)) == (docs, queries)
    assert set(ds.queries) == set(ds.qrels)


# --------------------------------------------------------------------------------------
# evaluate(): the timed loop
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FakeHit:
    id: str
    score: float


def _tiny_dataset() -> BeirDataset:
    return BeirDataset(
        name="tiny",
        corpus={d: {"title": "", "text": d} for d in ("1", "2", "d1", "d2", "d3", "d4")},
        queries={"1": "first", "q2": "second"},
        qrels={"1": {"d1": 2, "d2": 1}, "q2": {"d3": 1}},
    )


def test_evaluate_matches_evaluate_run_and_times() -> None:
    ds = _tiny_dataset()
    ranked = {"first": ["1", "d4", "d2", "d1"], "second": ["d3", "d1"]}
    asked: dict[str, int] = {}

    def search(query: str, k: int) -> list[tuple[str, float]]:
        asked[query] = k
        return [(d, 1.0 / (i + 1)) for i, d in enumerate(ranked[query][:k])]

    res = evaluate(search, ds, k=3, ks=(1, 3), progress=False)
    # query "1" is also a document id: one extra result is asked for and "1" is dropped
    assert asked == {"first": 4, "second": 3}
    expected = evaluate_run({"1": ["d4", "d2", "d1"], "q2": ["d3", "d1"]}, ds.qrels, ks=(1, 3))
    assert res.means == pytest.approx(expected.means)
    assert res.num_queries == 2
    assert set(res.per_query_latency) == {"1", "q2"}
    assert res.latency is not None
    assert 0.0 <= res.latency.p50 <= res.latency.p95 <= res.latency.max
    assert res.latency.mean == pytest.approx(sum(res.per_query_latency.values()) / 2)
    assert res.to_dict()["latency_s"]["p95"] == res.latency.p95


def test_evaluate_accepts_hit_objects_and_default_ks() -> None:
    ds = _tiny_dataset()

    def search(query: str, k: int) -> list[_FakeHit]:
        return [_FakeHit("d1", 2.0), _FakeHit("d3", 1.0)][:k]

    res = evaluate(search, ds, k=20, progress=False)
    names = {f"{m}@{c}" for m in ("ndcg", "recall", "mrr", "map") for c in (10, 20)}
    assert set(res.means) == names
    assert res.per_query["q2"]["mrr@10"] == pytest.approx(0.5)
    assert res.per_query["1"]["mrr@10"] == pytest.approx(1.0)


def test_evaluate_rejects_bad_arguments() -> None:
    ds = _tiny_dataset()
    with pytest.raises(InvalidInputError, match="k must be an int >= 1, got 0"):
        evaluate(lambda q, k: [], ds, k=0)
    with pytest.raises(InvalidInputError, match="above k=5"):
        evaluate(lambda q, k: [], ds, k=5, ks=(10,))
    with pytest.raises(InvalidInputError, match="doc_id, score"):
        evaluate(lambda q, k: [object()], ds, k=5, progress=False)


def test_import_stays_light() -> None:
    code = (
        "import sys, retrievekit.evaluation\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('sentence_transformers', 'langchain', 'langchain_core', 'llama_index')]\n"
        "print(heavy)\n"
    )
    pythonpath = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "[]"


def test_every_public_name_of_the_package_resolves() -> None:
    """`__all__` named a class renamed since (BM25Index): `from retrievekit import *` and
    `retrievekit.BM25Index` failed with an AttributeError."""
    code = ("import sys\nfrom retrievekit import *\nimport retrievekit\n"
            "print(sorted(n for n in retrievekit.__all__ if getattr(retrievekit, n) is None))\n"
            "print([m for m in sys.modules if m.split('.')[0] in ('langchain', "
            "'langchain_core', 'llama_index')])\n")
    pythonpath = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": pythonpath}, check=True)
    assert out.stdout.split() == ["[]", "[]"]
