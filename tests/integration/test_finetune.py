"""Fine-tuning end to end on a tiny BEIR collection: mining, training, loading by path, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datasets")
pytest.importorskip("accelerate")

from retrievekit.errors import ConfigError, InvalidInputError  # noqa: E402
from retrievekit.finetune import (MiningConfig, TrainConfig, TrainingExample,  # noqa: E402
                                  load_examples, mine_hard_negatives, pairs_from_qrels,
                                  save_examples, train_embedder, train_reranker)

DOCS = {
    "d-cat": "Cats are small carnivorous mammals kept as house pets; they purr and hunt mice.",
    "d-lion": "Lions are large wild cats living in prides on the African savanna.",
    "d-dog": "Dogs descend from wolves and are loyal companions trained to herd and guard.",
    "d-wolf": "Wolves hunt in packs across forests and tundra of the northern hemisphere.",
    "d-py": "Python is a programming language with readable syntax and a large library.",
    "d-rust": "Rust is a systems programming language with memory safety and no garbage "
              "collector.",
    "d-js": "JavaScript runs in web browsers and makes web pages interactive.",
    "d-bread": "Sourdough bread is leavened with a fermented starter of flour and water.",
    "d-tea": "Green tea contains catechins and less caffeine than coffee.",
    "d-coffee": "Coffee is brewed from roasted beans and is rich in caffeine.",
    "d-rain": "Rain forms when water vapour condenses into droplets heavy enough to fall.",
    "d-snow": "Snow is precipitation of ice crystals that falls when the air is cold.",
}
TRAIN = {  # query id -> (text, relevant doc ids)
    "t1": ("which animals purr and catch mice", ["d-cat"]),
    "t2": ("pack hunters of the northern forests", ["d-wolf", "d-dog"]),
    "t3": ("a memory safe language without garbage collection", ["d-rust"]),
    "t4": ("language for scripting web pages", ["d-js"]),
    "t5": ("drink with less caffeine than coffee", ["d-tea"]),
    "t6": ("how does rain form", ["d-rain"]),
}
TEST = {
    "s1": ("big cats of Africa", ["d-lion"]),
    "s2": ("easy to read programming language", ["d-py"]),
    "s3": ("bread made with a starter", ["d-bread"]),
    "s4": ("cold weather precipitation", ["d-snow"]),
}


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-beir")
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for did, text in DOCS.items():
            fh.write(json.dumps({"_id": did, "title": "", "text": text}) + "\n")
    with open(root / "queries.jsonl", "w", encoding="utf-8") as fh:
        for qid, (text, _) in {**TRAIN, **TEST}.items():
            fh.write(json.dumps({"_id": qid, "text": text}) + "\n")
    (root / "qrels").mkdir()
    # dev: the train queries again (a tiny slice has no others); tunes the reranker weight
    for split, qs in (("train", TRAIN), ("test", TEST), ("dev", TRAIN)):
        lines = ["query-id\tcorpus-id\tscore"]
        lines += [f"{qid}\t{d}\t1" for qid, (_, rel) in qs.items() for d in rel]
        (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def mining_retriever(tmp_path_factory, embedder):
    from retrievekit.pipeline import HybridRetriever

    r = HybridRetriever(path=str(tmp_path_factory.mktemp("mine-store")), embedder=embedder)
    r.add_documents([{"id": d, "text": t} for d, t in DOCS.items()])
    yield r
    r.close()


def _queries() -> dict[str, str]:
    return {q: t for q, (t, _) in TRAIN.items()}


def _qrels() -> dict[str, dict[str, int]]:
    return {q: {d: 1 for d in rel} for q, (_, rel) in TRAIN.items()}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- pairs and mining ------------------------------------------------------------------------


def test_pairs_round_robin_spread_over_queries():
    qrels = {"a": {"x": 1, "y": 2, "z": 1}, "b": {"x": 1}, "c": {"w": 0}}
    pairs = pairs_from_qrels(qrels, seed=3)
    assert sorted(pairs) == [("a", "x"), ("a", "y"), ("a", "z"), ("b", "x")]
    assert ("c", "w") not in pairs  # grade 0 is not relevant
    two = pairs_from_qrels(qrels, max_pairs=2, seed=3)
    assert {q for q, _ in two} == {"a", "b"}  # one per query before any second one
    assert ("a", "y") in two  # the highest grade comes first
    assert sorted(pairs_from_qrels(qrels, max_pairs_per_query=1, seed=3)) == [("a", "y"),
                                                                               ("b", "x")]
    assert pairs_from_qrels(qrels, seed=3) == pairs  # seeded: the same draw every time
    with pytest.raises(InvalidInputError, match="max_pairs"):
        pairs_from_qrels(qrels, max_pairs=0)


def test_mining_never_returns_a_positive_and_scores_match_the_embedder(mining_retriever,
                                                                        embedder):
    res = mine_hard_negatives(mining_retriever, _queries(), _qrels(), corpus=DOCS,
                              config=MiningConfig(num_negatives=2, margin=None, depth=10))
    assert len(res.examples) == res.stats["examples"] == 7  # every pair found 2 negatives
    assert res.stats["dropped_relevant"] >= 6
    doc_vecs = dict(zip(DOCS, embedder.embed_documents(list(DOCS.values()))))
    for ex in res.examples:
        relevant = set(TRAIN[ex.query_id][1])
        assert ex.positive_id in relevant and ex.positive == DOCS[ex.positive_id]
        assert not relevant & set(ex.negative_ids)
        assert list(ex.negatives) == [DOCS[d] for d in ex.negative_ids]
        assert list(ex.negative_ranks) == sorted(ex.negative_ranks)
        # scores are cosines of the same vectors the embedder gives (an independent path)
        q = embedder.embed_query(ex.query)
        assert ex.positive_score == pytest.approx(_cos(q, doc_vecs[ex.positive_id]), abs=1e-4)
        for did, s in zip(ex.negative_ids, ex.negative_scores):
            assert s == pytest.approx(_cos(q, doc_vecs[did]), abs=1e-4)
        # without filters the negatives are the best-ranked non-relevant documents
        ranked = [h.id for h in mining_retriever.search(ex.query, k=12, mode="dense")]
        assert list(ex.negative_ids) == [d for d in ranked if d not in relevant][:2]


def test_mining_never_takes_a_judged_or_identical_document_as_a_negative(tiny_embedder,
                                                                         tmp_path):
    """A negative is never a document the qrels judge relevant (also when the qrels' query
    keys are ints), the query's own document (a BEIR corpus entry under the query's id,
    which the evaluation leaves out), nor a text equal to the positive's or the query's."""
    from retrievekit.pipeline import HybridRetriever

    docs = {**DOCS, "dup": DOCS["d-cat"], "t1": TRAIN["t1"][0], "7": "a note about cats"}
    with HybridRetriever(path=str(tmp_path / "s"), embedder=tiny_embedder) as r:
        r.add_documents([{"id": d, "text": t} for d, t in docs.items()])
        cfg = MiningConfig(num_negatives=len(docs) - 4, margin=None, depth=len(docs),
                           sampling="top")
        res = mine_hard_negatives(r, {"t1": TRAIN["t1"][0]}, {"t1": {"d-cat": 1}},
                                  pairs=[("t1", "d-cat")], corpus=docs, config=cfg)
        (ex,) = res.examples
        assert not {"dup", "t1", "d-cat"} & set(ex.negative_ids)
        assert res.stats["dropped_same_text"] == 1
        # int query keys: the judged d-lion is never a negative of query 7
        res = mine_hard_negatives(r, {"7": "big cats of Africa"},
                                  {7: {"d-cat": 1, "d-lion": 1}}, pairs=[(7, "d-cat")],
                                  corpus=docs, config=cfg)
        (ex,) = res.examples
        assert not {"d-lion", "7", "d-cat"} & set(ex.negative_ids)


def test_mining_respects_skip_top_and_margin(mining_retriever):
    plain = mine_hard_negatives(mining_retriever, _queries(), _qrels(), corpus=DOCS,
                                config=MiningConfig(num_negatives=1, margin=None))
    skipped = mine_hard_negatives(mining_retriever, _queries(), _qrels(), corpus=DOCS,
                                  config=MiningConfig(num_negatives=1, margin=None, skip_top=3))
    assert skipped.stats["dropped_skip_top"] > 0
    for ex in skipped.examples:
        assert min(ex.negative_ranks) > 3
    assert [e.negative_ids for e in plain.examples] != [e.negative_ids for e in skipped.examples]

    margin = 0.15
    res = mine_hard_negatives(mining_retriever, _queries(), _qrels(), corpus=DOCS,
                              config=MiningConfig(num_negatives=2, margin=margin, depth=12))
    assert res.stats["dropped_margin"] > 0
    for ex in res.examples:
        assert all(s < ex.positive_score - margin for s in ex.negative_scores)
    # a margin nothing can satisfy leaves no example, and says why
    none = mine_hard_negatives(mining_retriever, _queries(), _qrels(), corpus=DOCS,
                               config=MiningConfig(margin=5.0))
    assert none.examples == [] and none.stats["skipped_too_few_negatives"] == 7


def test_mining_positive_depth_keeps_pairs_the_first_stage_ranks_high(mining_retriever):
    ranked = {q: [h.id for h in mining_retriever.search(t, k=12, mode="hybrid")]
              for q, t in _queries().items()}
    pos_rank = {(q, d): ranked[q].index(d) + 1 for q, (_, rel) in TRAIN.items() for d in rel}
    depth, pos_depth = 4, 1  # t2 has two positives: only one of them can rank first
    res = mine_hard_negatives(mining_retriever, _queries(), _qrels(), corpus=DOCS,
                              config=MiningConfig(mode="hybrid", num_negatives=1, margin=None,
                                                  depth=depth, positive_depth=pos_depth))
    kept = {(ex.query_id, ex.positive_id) for ex in res.examples}
    assert kept == {p for p, r in pos_rank.items() if r <= pos_depth}
    assert res.stats["skipped_positive_below_depth"] == sum(
        1 for r in pos_rank.values() if r > pos_depth) > 0
    for ex in res.examples:
        assert all(r <= depth for r in ex.negative_ranks)


def test_mining_random_sampling_draws_within_depth_seeded(mining_retriever):
    def mine(seed):
        return mine_hard_negatives(
            mining_retriever, _queries(), _qrels(), corpus=DOCS,
            config=MiningConfig(num_negatives=2, margin=None, depth=8, sampling="random",
                                seed=seed))

    a, b, c = mine(0), mine(0), mine(1)
    assert [e.negative_ids for e in a.examples] == [e.negative_ids for e in b.examples]
    assert [e.negative_ids for e in a.examples] != [e.negative_ids for e in c.examples]
    for ex in a.examples:
        assert list(ex.negative_ranks) == sorted(ex.negative_ranks)
        assert all(r <= 8 for r in ex.negative_ranks)
        assert not set(TRAIN[ex.query_id][1]) & set(ex.negative_ids)
    top = mine_hard_negatives(mining_retriever, _queries(), _qrels(), corpus=DOCS,
                              config=MiningConfig(num_negatives=2, margin=None, depth=8))
    assert [e.negative_ids for e in top.examples] != [e.negative_ids for e in a.examples]
    with pytest.raises(ConfigError, match="sampling"):
        MiningConfig(sampling="hardest")
    with pytest.raises(ConfigError, match="positive_depth"):
        MiningConfig(positive_depth=0)


def test_mining_hybrid_mode_reads_texts_from_the_store(mining_retriever, tmp_path):
    res = mine_hard_negatives(mining_retriever, _queries(), _qrels(), pairs=[("t1", "d-cat")],
                              config=MiningConfig(mode="hybrid", num_negatives=3, margin=None))
    (ex,) = res.examples
    assert ex.positive == DOCS["d-cat"] and len(ex.negatives) == 3
    assert [DOCS[d] for d in ex.negative_ids] == list(ex.negatives)
    path = save_examples(tmp_path / "rows.jsonl", res.examples)
    assert load_examples(path) == res.examples
    with pytest.raises(InvalidInputError, match="no text"):
        mine_hard_negatives(mining_retriever, _queries(), _qrels(), pairs=[("nope", "d-cat")])


def test_configs_reject_bad_values():
    with pytest.raises(ConfigError, match="mode"):
        MiningConfig(mode="sparse")
    with pytest.raises(ConfigError, match="skip_top"):
        MiningConfig(skip_top=-1)
    with pytest.raises(ConfigError, match="matryoshka_dims"):
        TrainConfig(matryoshka_dims=(128, 128))
    with pytest.raises(ConfigError, match="reranker_loss"):
        TrainConfig(reranker_loss="hinge")
    with pytest.raises(ConfigError, match="head_learning_rate"):
        TrainConfig(head_learning_rate=0)
    with pytest.raises(ConfigError, match="margin"):
        MiningConfig(margin=float("nan"))
    assert TrainConfig(matryoshka_dims=(64, 384, 128)).matryoshka_dims == (384, 128, 64)
    # weights follow their dims when the dims are sorted
    cfg = TrainConfig(matryoshka_dims=(128, 384, 64), matryoshka_weights=(3, 1, 2))
    assert cfg.matryoshka_weights == (1.0, 3.0, 2.0)
    with pytest.raises(ConfigError, match="one positive number per dim"):
        TrainConfig(matryoshka_dims=(384, 128), matryoshka_weights=(1,))
    with pytest.raises(ConfigError, match="needs matryoshka_dims"):
        TrainConfig(matryoshka_weights=(1.0,))


# -- training and loading by path ------------------------------------------------------------


@pytest.fixture(scope="module")
def examples(mining_retriever) -> list[TrainingExample]:
    return mine_hard_negatives(mining_retriever, _queries(), _qrels(), corpus=DOCS,
                               config=MiningConfig(num_negatives=1, margin=None)).examples


def _mean_gap(emb, rows: list[TrainingExample]) -> float:
    q = emb.embed_queries([r.query for r in rows])
    p = emb.embed_documents([r.positive for r in rows])
    n = emb.embed_documents([r.negatives[0] for r in rows])
    return float(np.mean(np.sum(q * p, axis=1) - np.sum(q * n, axis=1)))


def test_embedder_training_improves_the_examples_and_loads_by_path(examples, embedder,
                                                                    tmp_path):
    from retrievekit.embedding import Embedder
    from retrievekit.pipeline import HybridRetriever

    out = train_embedder(examples, tmp_path / "emb", config=TrainConfig(
        max_steps=6, batch_size=4, learning_rate=2e-4, max_seq_length=64,
        matryoshka_dims=(384, 128), matryoshka_weights=(1, 2), device="cpu"), progress=False)
    info = json.loads((out / "retrievekit_finetune.json").read_text())
    assert info["kind"] == "embedder" and info["steps"] == 6
    assert info["loss"] == "MatryoshkaLoss(MultipleNegativesRankingLoss)"
    tuned = Embedder(model=str(out), backend="torch")  # torch: no ONNX export in a test
    assert tuned.max_seq_length == embedder.max_seq_length  # saved with the original length
    assert (tuned.prefixes.query, tuned.prefixes.document) == ("", "")
    assert tuned.identity()["model_hash"] != embedder.identity()["model_hash"]
    assert _mean_gap(tuned, examples) > _mean_gap(embedder, examples)

    with HybridRetriever({"embedder": {"model": str(out), "backend": "torch"},
                          "store": {"path": str(tmp_path / "store")}}) as r:
        r.add_documents([{"id": d, "text": t} for d, t in DOCS.items()])
        assert r.search("animals that purr", k=3, mode="dense")
        assert r.info()["settings"]["embedder"]["model"] == str(out)
    with pytest.raises(ConfigError, match="not empty"):
        train_embedder(examples, out, config=TrainConfig(max_steps=1))


def test_reranker_training_loads_by_path(examples, tmp_path):
    from retrievekit.rerank import Reranker

    out = train_reranker(examples, tmp_path / "bce", config=TrainConfig(
        max_steps=2, batch_size=4, max_seq_length=64, device="cpu"), progress=False)
    info = json.loads((out / "retrievekit_finetune.json").read_text())
    assert info["kind"] == "reranker" and info["steps"] == 2
    assert info["loss"] == "BinaryCrossEntropyLoss" and info["rows"] == 2 * len(examples)
    scores = Reranker(model=str(out), max_length=64, backend="torch").score(
        "animals that purr", [DOCS["d-cat"], DOCS["d-rust"]])
    assert scores.shape == (2,) and np.isfinite(scores).all()


def test_training_rejects_empty_examples(tmp_path):
    with pytest.raises(InvalidInputError, match="empty"):
        train_embedder([], tmp_path / "x")


@pytest.mark.parametrize("row, words", [
    ({"negatives": []}, "'negatives' is empty"),
    ({"negatives": ["pos text"]}, "the positive's text"),
    ({"negatives": ["a", "b"], "negative_ids": ["x"]}, "1 negative_ids for 2"),
    ({"positive_score": "high"}, "positive_score='high'"),
    ({"negative_scores": [0.1, "x"]}, "negative_scores"),
])
def test_training_rows_that_contradict_themselves_are_refused(tmp_path, row, words):
    """A row without negatives (it left every row's unused), with the positive as a
    negative, ids that do not pair with the negatives, or scores that are not numbers."""
    base = {"query": "q text", "positive": "pos text", "negatives": ["neg text"]}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({**base, **row}) + "\n")
    with pytest.raises(InvalidInputError, match=words):
        load_examples(path)
    with pytest.raises(InvalidInputError, match="has no negatives"):
        train_embedder([TrainingExample.from_dict(base),
                        TrainingExample(query_id="", query="q", positive_id="", positive="p",
                                        negative_ids=(), negatives=())],
                       tmp_path / "x")
    assert not (tmp_path / "x").exists()


# -- the command ---------------------------------------------------------------------------


def test_cli_finetune_embedder_prints_before_after_and_a_verdict(beir_dir, tmp_path, capsys):
    from retrievekit.cli import main

    out = tmp_path / "ft"
    rc = main(["finetune", "embedder", "--data", str(beir_dir), "--out", str(out),
               "--max-steps", "2", "--batch-size", "4", "--max-seq-length", "64",
               "--matryoshka-dims", "384,128", "--no-margin", "--device", "cpu", "-q"])
    assert rc == 0
    text = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert "| metric | base | fine-tuned | delta |" in text
    assert "| dense ndcg@10 |" in text and "| dense@128 ndcg@10 |" in text
    gain = report["after"]["dense ndcg@10"] - report["before"]["dense ndcg@10"]
    assert report["gain"] == pytest.approx(gain)
    assert report["decision"] == ("keep" if gain > 0 else "discard")
    assert f"\n{report['decision']}: dense ndcg@10" in text
    assert (out / "model").is_dir() == (report["decision"] == "keep")
    assert report["eval_queries"] == 4 and report["mining"]["examples"] == 7
    assert len(load_examples(out / "hard_negatives.jsonl")) == 7


def test_cli_finetune_reranker_compares_hybrid_with_and_without(beir_dir, tmp_path, capsys):
    from retrievekit.cli import main

    out = tmp_path / "rr"
    rc = main(["finetune", "reranker", "--data", str(beir_dir), "--out", str(out),
               "--max-steps", "2", "--batch-size", "4", "--max-seq-length", "64",
               "--num-negatives", "2", "--loss", "mnrl", "--head-lr", "1e-3",
               "--keep-discarded", "--min-gain", "-1", "-q"])
    assert rc == 0
    text = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert "| metric | hybrid alone | + fine-tuned reranker | delta |" in text
    assert report["decision"] == "keep"  # min_gain -1: any result is kept
    assert "\nkeep: hybrid ndcg@10" in text
    assert report["mining"]["mode"] == "hybrid" and (out / "model").is_dir()
    info = json.loads((out / "model" / "retrievekit_finetune.json").read_text())
    assert info["loss"] == "MultipleNegativesRankingLoss" and info["negatives_per_example"] == 2
    assert info["config"]["head_learning_rate"] == 1e-3
    # the reranker's weight against the hybrid order was chosen on dev, evaluated on test
    from retrievekit.finetune import BLEND_WEIGHTS

    tuning = report["weight_tuning"]
    assert tuning["split"] == "dev" and tuning["queries"] == len(TRAIN)
    assert sorted(float(w) for w in tuning["ndcg@10 by weight"]) == sorted(BLEND_WEIGHTS)
    best = max(tuning["ndcg@10 by weight"].values())
    assert tuning["ndcg@10 by weight"][f"{report['reranker_weight']:g}"] == best
    assert info["recommended_weight"] == report["reranker_weight"]
    assert set(report["after_weight_1"]) == set(report["after"])
    assert "reranker's order alone (weight 1)" in text
    assert 0 < report["p_value"] <= 1 and "paired permutation test over 4 queries" in text
    if report["reranker_weight"] == 1.0:
        assert report["after_weight_1"] == report["after"]


def test_finetune_refuses_tuning_on_the_evaluation_split(beir_dir, tmp_path, tiny_model):
    from retrievekit.finetune import run_finetune

    with pytest.raises(InvalidInputError, match="tune_split='test' is the evaluation split"):
        run_finetune("reranker", beir_dir, out=tmp_path / "x", tune_split="test")
    with pytest.raises(InvalidInputError, match="split='test' is the evaluation split"):
        run_finetune("embedder", beir_dir, out=tmp_path / "x", split="test")
    with pytest.raises(InvalidInputError, match="tune_split='train' is the training split"):
        run_finetune("reranker", beir_dir, out=tmp_path / "x", tune_split="train")
    # dimensions past the base model's: refused before anything is indexed or written
    from retrievekit.finetune import TrainConfig as _TC

    with pytest.raises(ConfigError, match="the largest must be <= the dimension"):
        run_finetune("embedder", beir_dir, out=tmp_path / "x", base=tiny_model,
                     training=_TC(matryoshka_dims=(64, 16)))
    with pytest.raises(ConfigError, match="eval_dims"):
        run_finetune("embedder", beir_dir, out=tmp_path / "x", base=tiny_model, eval_dims=[64])
    with pytest.raises(InvalidInputError, match="blend_weights"):
        run_finetune("reranker", beir_dir, out=tmp_path / "x", blend_weights=(1.0, 1.5))
    assert not (tmp_path / "x").exists()


def test_paired_p_value():
    from retrievekit.finetune import paired_p_value

    rng = np.random.default_rng(0)
    before = {f"q{i}": float(v) for i, v in enumerate(rng.random(60))}
    assert paired_p_value(before, before) == 1.0
    better = {q: v + 0.1 for q, v in before.items()}
    assert paired_p_value(before, better) < 0.001
    noisy = {q: v + float(rng.normal(0, 0.2)) for q, v in before.items()}
    assert paired_p_value(before, noisy) > 0.05
    # only the queries both runs scored are paired
    assert paired_p_value(before, {"q0": 1.0}) == 1.0


def test_reranked_runs_blend_and_tune_by_hand():
    from retrievekit.finetune import _RerankedRuns, _tune_weight

    runs = _RerankedRuns(ids={"q": ["a", "b", "c", "d"]},
                         scores={"q": np.array([0.1, 0.2, 0.9], dtype=np.float32)})
    assert runs.run(None, 60) == {"q": ["a", "b", "c", "d"]}
    assert runs.run(1.0, 60) == {"q": ["c", "b", "a", "d"]}  # the tail stays behind the head
    qrels = {"q": {"c": 1}}
    weight, by_weight = _tune_weight(runs, qrels, (1.0, 0.5, 0.2), 60)
    assert weight == 1.0 and by_weight["1"] == 1.0  # ties go to the larger weight
    qrels = {"q": {"a": 1}}
    weight, by_weight = _tune_weight(runs, qrels, (1.0, 0.5, 0.2), 60)
    assert weight == 0.2 and by_weight["0.2"] == 1.0 and by_weight["1"] < 1.0


def test_a_later_run_never_deletes_the_model_an_earlier_one_kept(beir_dir, tiny_model,
                                                                 tmp_path, capsys):
    """A run trains into `model.new` and replaces `model` only when it keeps its own: a
    discarded second run into the same folder leaves the first run's model as it was. A
    test query that the train qrels judge too is left out of training, and counted."""
    import hashlib
    import shutil

    from retrievekit.cli import main

    data = tmp_path / "beir"
    shutil.copytree(beir_dir, data)
    with open(data / "qrels" / "train.tsv", "a") as fh:
        fh.write("s1\td-lion\t1\n")  # a test query in the training qrels
    out = tmp_path / "ft"
    args = ["finetune", "embedder", "--data", str(data), "--out", str(out), "--base",
            tiny_model, "--max-steps", "1", "--batch-size", "4", "--max-seq-length",
            "32", "--no-margin", "--device", "cpu", "-q"]

    def weights() -> str:
        return hashlib.sha256((out / "model" / "model.safetensors").read_bytes()).hexdigest()

    assert main([*args, "--min-gain", "-1"]) == 0  # kept whatever it scores
    first = json.loads((out / "report.json").read_text())
    assert first["decision"] == "keep" and first["mining"]["eval_queries_left_out"] == 1
    assert "s1" not in {e.query_id for e in load_examples(out / "hard_negatives.jsonl")}
    kept = weights()
    assert main([*args, "--min-gain", "1", "--seed", "7"]) == 0  # discarded whatever
    second = json.loads((out / "report.json").read_text())
    assert second["decision"] == "discard" and second["model_dir"] is None
    assert weights() == kept and not (out / "model.new").exists()
    capsys.readouterr()
    assert main([*args, "--num-negatives", "0"]) != 0  # 0 is refused, not the default
    assert "num_negatives" in capsys.readouterr().err
