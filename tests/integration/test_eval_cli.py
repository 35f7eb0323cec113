"""`retrievekit eval` end to end on a tiny BEIR folder: files, metrics, and no re-encoding."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from retrievekit.cli import main
from retrievekit.evaluation import evaluate_run, load_beir

DOCS = {
    "d1": ("Cats", "Cats are small domesticated carnivorous mammals that purr and hunt mice."),
    "d2": ("Dogs", "Dogs are loyal companions descended from wolves and kept as pets."),
    "d3": ("Python", "Python is a programming language with readable syntax."),
    "d4": ("Rust", "Rust is a systems programming language with memory safety."),
    "d5": ("Bread", "Sourdough bread is leavened with a fermented starter of flour and water."),
    "d6": ("Tea", "Green tea contains catechins and less caffeine than coffee."),
    "d7": ("Coffee", "Espresso is brewed by forcing hot water through finely ground coffee."),
    "d8": ("Volcanoes", "A volcano erupts when magma rises through the crust."),
    "d9": ("Glaciers", "Glaciers are slow rivers of ice that carve valleys."),
    "d10": ("Chess", "Chess is a board game of strategy for two players."),
    "d11": ("Tennis", "Tennis is played with rackets and a felt ball over a net."),
    "d12": ("Jazz", "Jazz music grew from blues and ragtime in New Orleans."),
}
QUERIES = {"q1": "which pets hunt mice", "q2": "programming language memory safety",
           "q3": "drinks with caffeine", "q4": "a query nobody judged"}
QRELS = [("q1", "d1", 2), ("q1", "d2", 1), ("q2", "d4", 1), ("q2", "d3", 1), ("q3", "d6", 1),
         ("q3", "d7", 1)]
METRICS = ("ndcg@10", "recall@100", "mrr@10", "map@10")


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tinybeir")
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for doc_id, (title, text) in DOCS.items():
            fh.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with open(root / "queries.jsonl", "w", encoding="utf-8") as fh:
        for qid, text in QUERIES.items():
            fh.write(json.dumps({"_id": qid, "text": text}) + "\n")
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in QRELS))
    return root


@pytest.fixture(scope="module")
def encode_spy():
    """Records the texts passed to the embedder (a spy that calls through, not a stand-in)."""
    from retrievekit.embedding import Embedder

    seen: dict[str, list[str]] = {"documents": [], "queries": []}
    mp = pytest.MonkeyPatch()
    for method, key in (("embed_documents", "documents"), ("embed_queries", "queries")):
        original = getattr(Embedder, method)

        def spy(self, texts, *args, _original=original, _key=key, **kwargs):
            seen[_key].extend(texts)
            return _original(self, texts, *args, **kwargs)

        mp.setattr(Embedder, method, spy)
    original_query = Embedder.embed_query

    def spy_query(self, query, *args, **kwargs):
        seen["queries"].append(query)
        return original_query(self, query, *args, **kwargs)

    mp.setattr(Embedder, "embed_query", spy_query)
    yield seen
    mp.undo()


@pytest.fixture(scope="module")
def two_runs(beir_dir, tmp_path_factory, tiny_cross_encoder_path, encode_spy):
    out = tmp_path_factory.mktemp("evalout")
    argv = ["eval", str(beir_dir), "--modes", "sparse,dense,hybrid,rerank", "--out", str(out),
            "--reranker", tiny_cross_encoder_path, "--threads", "1", "-q"]
    assert main(argv) == 0
    first = {k: list(v) for k, v in encode_spy.items()}
    rows1 = _cache_rows(out)
    report1 = json.loads((out / "results.json").read_text())
    for v in encode_spy.values():
        v.clear()
    assert main(argv) == 0
    second = {k: list(v) for k, v in encode_spy.items()}
    assert _cache_rows(out) == rows1 == len(DOCS)  # nothing new was encoded and cached
    report2 = json.loads((out / "results.json").read_text())
    return out, report1, report2, first, second


def _cache_rows(out: Path) -> int:
    import sqlite3

    with sqlite3.connect(out / "cache" / "embeddings.sqlite") as conn:
        return conn.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]


def _passages() -> set[str]:
    return {f"{title}\n{text}" for title, text in DOCS.values()}


def test_eval_writes_report_files_with_all_metrics(two_runs, capsys):
    out, report, _, _, _ = two_runs
    for name in ("results.json", "results.md", "results.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(report["modes"]) == {"sparse", "dense", "hybrid", "rerank"}
    assert report["num_queries"] == 3  # q4 has no judgment
    assert report["num_documents"] == len(DOCS)
    for mode, res in report["modes"].items():
        assert set(res["metrics"]) == set(METRICS), mode
        assert set(res["per_query"]) == {"q1", "q2", "q3"}
        for name in METRICS:
            values = [v[name] for v in res["per_query"].values()]
            assert all(0.0 <= v <= 1.0 for v in values)
            assert math.isclose(res["metrics"][name], sum(values) / 3), (mode, name)
        assert res["latency_ms"]["p95"] >= res["latency_ms"]["p50"] > 0
    md = (out / "results.md").read_text()
    assert "| rerank |" in md and "nDCG@10" in md and "Recall@100" in md


def test_recall_at_100_covers_the_whole_tiny_corpus(two_runs):
    # 12 documents and searches asking for 100: dense ranks every document, so each
    # judged document is found and Recall@100 is exactly 1.
    _, report, _, _, _ = two_runs
    assert report["modes"]["dense"]["metrics"]["recall@100"] == 1.0
    assert report["modes"]["hybrid"]["metrics"]["recall@100"] == 1.0
    # rerank only reorders the hybrid list, so it finds the same documents
    assert report["modes"]["rerank"]["metrics"]["recall@100"] == 1.0


def test_sparse_metrics_match_an_independent_bm25_run(two_runs, beir_dir):
    """The sparse numbers equal evaluate_run over a BM25 run built outside the pipeline."""
    from retrievekit.records import Record
    from retrievekit.sparse import SparseIndex

    _, report, _, _, _ = two_runs
    ds = load_beir(beir_dir)
    index = SparseIndex()
    index.replace([], [Record(i, i, f"{t}\n{x}", {}) for i, (t, x) in DOCS.items()])
    index.commit(1)
    run = {qid: dict(index.search(ds.queries[qid], 100)) for qid in ds.qrels}
    expected = evaluate_run(run, ds.qrels, ks=(10, 100))
    for name in METRICS:
        assert report["modes"]["sparse"]["metrics"][name] == pytest.approx(expected[name])


def test_second_run_reuses_store_and_cache(two_runs):
    out, report1, report2, first, second = two_runs
    assert set(first["documents"]) == _passages()  # the first run embedded every passage
    assert second["documents"] == [], "the second run embedded passages again"
    # queries are embedded live on every run (so latency is real), never from the cache
    assert set(second["queries"]) == {QUERIES[q] for q in ("q1", "q2", "q3")}
    assert report1["index"]["encoded"] == len(DOCS)
    assert report2["index"]["encoded"] == 0 and report2["index"]["written"] == 0
    assert report2["index"]["unchanged"] == len(DOCS)
    for mode in ("sparse", "dense", "hybrid"):
        assert report2["modes"][mode]["metrics"] == report1["modes"][mode]["metrics"]
    assert (out / "cache" / "embeddings.sqlite").is_file()


def test_another_precision_encodes_its_own_passage_vectors(beir_dir, tmp_path):
    """The cache and the store take vectors of any precision: an `--dtype bfloat16` run
    after a float32 one in the same folder scored the float32 passage vectors."""
    out = tmp_path / "out"
    argv = ["eval", str(beir_dir), "--modes", "dense", "--out", str(out), "--threads", "1",
            "-q"]
    assert main(argv) == 0
    fp32 = json.loads((out / "results.json").read_text())
    assert main(argv + ["--dtype", "bfloat16"]) == 0
    bf16 = json.loads((out / "results.json").read_text())
    assert bf16["index"]["encoded"] == len(DOCS) == fp32["index"]["encoded"]
    assert bf16["settings"]["collection"] != fp32["settings"]["collection"]
    assert bf16["settings"]["cache"].endswith("embeddings-bfloat16.sqlite")
    assert (out / "cache" / "embeddings.sqlite").is_file()


def test_rerank_without_reranker_is_a_clear_error(beir_dir, tmp_path, capsys):
    code = main(["eval", str(beir_dir), "--modes", "hybrid,rerank", "--out", str(tmp_path), "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--reranker" in err and "rerank" in err
    assert not (tmp_path / "store").exists()  # failed before indexing anything


def test_rerank_weight_is_recorded_and_checked(beir_dir, tmp_path, tiny_cross_encoder_path,
                                              capsys):
    bad = main(["eval", str(beir_dir), "--modes", "hybrid,rerank", "--out", str(tmp_path / "b"),
                "--reranker", tiny_cross_encoder_path, "--rerank-weight", "2", "-q"])
    assert bad == 2
    assert "reranker.weight" in capsys.readouterr().err
    assert not (tmp_path / "b" / "store").exists()
    out = tmp_path / "w"
    assert main(["eval", str(beir_dir), "--modes", "hybrid,rerank", "--out", str(out),
                 "--reranker", tiny_cross_encoder_path, "--rerank-weight", "0.3",
                 "--threads", "1", "-q"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["rerank_weight"] == 0.3
    assert "at weight 0.3 against the fused order" in (out / "results.md").read_text()


def test_unknown_mode_is_a_clear_error(beir_dir, tmp_path, capsys):
    code = main(["eval", str(beir_dir), "--modes", "sparse,bm42", "--out", str(tmp_path), "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert "bm42" in err and "hybrid" in err


def test_mode_search_returns_k_documents_when_chunks_collapse(tmp_path, embedder):
    """Chunks of one document collapse into one hit; the search widens its candidate lists
    so that it still returns k documents (and the evaluation's search relies on that)."""
    from retrievekit.pipeline import HybridRetriever
    from retrievekit.report import mode_search_fn

    long_text = " ".join(f"part{i} cats purr softly" for i in range(50))
    docs = [{"id": "long-a", "text": long_text},
            {"id": "long-b", "text": long_text.replace("softly", "loudly")}]
    docs += [{"id": doc_id, "text": f"{title}\n{text}"} for doc_id, (title, text) in DOCS.items()]
    cfg = {"store": {"path": str(tmp_path / "store")},
           "chunking": {"max_tokens": 16, "overlap_tokens": 0}}
    with HybridRetriever(cfg, embedder=embedder) as r:
        r.add_documents(docs)
        assert r.count() > 20  # the two long documents became many chunks
        plain = r.search("cats purr", k=5, mode="dense", candidates=5)
        assert len(plain) == 5 and len({h.id for h in plain}) == 5
        for mode in ("dense", "hybrid"):
            hits = mode_search_fn(r, mode, candidates=1)("cats purr", 5)
            assert len(hits) == 5 and len({h.id for h in hits}) == 5, mode
            assert {"long-a", "long-b"} <= {h.id for h in hits}
        # BM25 has only three matching documents: the search stops instead of looping
        sparse = mode_search_fn(r, "sparse", candidates=1)("cats purr", 5)
        assert sorted(h.id for h in sparse) == ["d1", "long-a", "long-b"]


def test_max_queries_draws_a_fixed_sample_of_judged_queries(beir_dir):
    from retrievekit.report import sample_queries

    ds = load_beir(beir_dir)
    a, b = sample_queries(ds, 2), sample_queries(ds, 2)
    assert len(a.qrels) == 2 and set(a.qrels) == set(b.qrels) == set(a.queries)
    assert set(a.qrels) <= {"q1", "q2", "q3"}
    assert all(a.qrels[q] == ds.qrels[q] for q in a.qrels)
    assert sample_queries(ds, 10) is ds and len(ds.qrels) == 3  # nothing dropped or changed


def test_tune_picks_on_the_dev_split_and_writes_loadable_toml(beir_dir, tmp_path, capsys):
    """`retrievekit tune` scores the grid on the dev split, writes the best as TOML that
    RetrieverConfig reads, and refuses the test split before anything is written."""
    import shutil

    from retrievekit.config import RetrieverConfig
    from retrievekit.tune import grid

    data = tmp_path / "beir"
    shutil.copytree(beir_dir, data)
    shutil.copy(data / "qrels" / "test.tsv", data / "qrels" / "dev.tsv")
    out = tmp_path / "tuned"
    assert main(["tune", str(data), "--out", str(out), "-q"]) == 0
    report = json.loads((out / "tune.json").read_text())
    trials = report["trials"]
    assert report["split"] == "dev" and len(trials) == len(grid())
    assert [t["ndcg@10"] for t in trials] == sorted((t["ndcg@10"] for t in trials),
                                                     reverse=True)
    cfg = RetrieverConfig.from_toml(out / "tuned.toml")
    best = trials[0]["settings"]
    assert (cfg.fusion, cfg.candidates, dict(cfg.weights)) == (
        best["fusion"], best["candidates"], best["weights"])
    assert "best on the dev split" in capsys.readouterr().out
    # settings of one's own: every key is written, and the default is not claimed
    from retrievekit.tune import tune

    mine = {"fusion": "rrf", "candidates": 50, "rrf_k": 10}
    tune(data, out=tmp_path / "mine", settings=[mine], cache_dir=out / "cache", progress=False)
    text = (tmp_path / "mine" / "tuned.toml").read_text()
    assert "library default was not tried" in text
    assert RetrieverConfig.from_toml(tmp_path / "mine" / "tuned.toml") == \
        RetrieverConfig.from_dict(mine)
    refused = tmp_path / "refused"
    assert main(["tune", str(data), "--split", "test", "--out", str(refused)]) == 2
    assert "tuning on the split" in capsys.readouterr().err and not refused.exists()


@pytest.mark.parametrize(("extra", "match"), [
    (["--cache-dir", ""], "cache_dir"),
    (["--model", ""], "model"),
    (["--rerank-weight", "0.5"], "--reranker"),
    (["--rerank-candidates", "7"], "--reranker"),
    (["--reranker", "cross-encoder/ms-marco-MiniLM-L-6-v2"], "add rerank to --modes"),
])
def test_eval_refuses_options_it_would_replace_or_ignore(beir_dir, tmp_path, monkeypatch,
                                                        capsys, extra, match):
    """Found by an attack: an empty --cache-dir wrote the cache into the working directory,
    an empty --model meant the default model, --rerank-weight / --rerank-candidates
    without --reranker were dropped without a word, and so was a --reranker whose rerank
    mode --modes left out."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    assert main(["eval", str(beir_dir), "--modes", "sparse", "--out", str(out), "-q",
                 "--threads", "1", *extra]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists() and not any(cwd.iterdir())


def test_eval_config_applies_a_tuned_file_s_query_time_settings(beir_dir, tmp_path, capsys):
    """`retrievekit eval --config tuned.toml` scores the settings `tune` chose: with RRF
    and the BM25 side's weight 0, hybrid ranks exactly as dense does (with the dense side's
    weight 0 instead, it does not), and the file's candidates are the ones used."""
    import shutil

    data = tmp_path / "beir"
    shutil.copytree(beir_dir, data)
    with open(data / "queries.jsonl", "a", encoding="utf-8") as fh:  # BM25: d9 d5 d7,
        fh.write(json.dumps({"_id": "q5", "text": "water and ice"}) + "\n")  # dense: d9 d7 d5
    # every document judged, each with its own grade: nDCG@10 reads the whole order
    (data / "qrels" / "test.tsv").write_text("".join(
        f"{q}\td{d}\t{1 + (d * 5 + i * 3) % 12}\n"
        for i, q in enumerate(("q1", "q2", "q3", "q5")) for d in range(1, 13)))
    out = tmp_path / "out"
    argv = ["eval", str(data), "--modes", "dense,hybrid", "--out", str(out), "-q",
            "--threads", "1"]
    cfg = tmp_path / "tuned.toml"
    runs = {}
    for side in ("dense", "sparse"):  # the other side's weight 0
        other = "sparse" if side == "dense" else "dense"
        cfg.write_text(f'fusion = "rrf"\ncandidates = 200\nrrf_k = 1\n\n[weights]\n'
                       f'{side} = 1.0\n{other} = 0.0\n')
        assert main([*argv, "--config", str(cfg)]) == 0
        runs[side] = json.loads((out / "results.json").read_text())
    tuned = runs["dense"]
    assert tuned["modes"]["hybrid"]["per_query"] == tuned["modes"]["dense"]["per_query"]
    assert runs["sparse"]["modes"]["hybrid"]["per_query"] != tuned["modes"]["hybrid"]["per_query"]
    assert tuned["settings"]["candidates"] == 200
    assert (tuned["settings"]["fusion"], tuned["settings"]["weights"]) == (
        "rrf", {"dense": 1.0, "sparse": 0.0})
    assert runs["sparse"]["index"]["written"] == 0  # one index for every query-time setting
    capsys.readouterr()
    for text, flags, match in (('[embedder]\nmodel = "x"\n', [], "['embedder']"),
                               ("collapse_chunks = false\n", [], "chunk ids"),
                               ("candidates = 200\n", ["--candidates", "300"], "--candidates"),
                               ('fusion = "bogus"\n', [], "fusion")):
        cfg.write_text(text)
        bad = tmp_path / "bad"
        assert main([*argv[:4], "--out", str(bad), "-q", "--config", str(cfg), *flags]) == 2
        assert match in capsys.readouterr().err
        assert not bad.exists()


def test_rerank_mode_with_a_threshold_scores_what_search_returns(tmp_path, embedder,
                                                                tiny_cross_encoder_path):
    """With a threshold only a scored hit can pass it: search drops the hits below the
    reranked head, and eval's rerank mode kept them (unscored), so it scored a list no
    search gives."""
    from retrievekit.pipeline import HybridRetriever
    from retrievekit.report import mode_search_fn

    docs = [{"id": doc_id, "text": f"{title}\n{text}"} for doc_id, (title, text) in DOCS.items()]
    cfg = {"store": {"path": str(tmp_path / "store")},
           "reranker": {"model": tiny_cross_encoder_path, "candidates": 2,
                        "threshold": -1e9}}
    with HybridRetriever(cfg, embedder=embedder) as r:
        r.add_documents(docs)
        searched = r.search("cats purr", k=5)
        assert len(searched) == 2  # the head only
        hits = mode_search_fn(r, "rerank")("cats purr", 5)
        assert [h.id for h in hits] == [h.id for h in searched]
