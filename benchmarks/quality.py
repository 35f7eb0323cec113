"""Retrieval quality on the shared test collections: BM25 parity, tokenizer choice, the
pipeline's sparse/dense/hybrid modes, hybrid variants and fusions, the gap to the best peer
recipe, and the dense checks.

Usage (from the repository root; see benchmarks/README.md):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py index     # encode once (slow)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py bm25      # no model needed
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py modes
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py variants
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py fusions --candidates 100,200
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py default   # choose the default fusion
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py gap       # offline fusions
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py dense
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py all

Data are read from --data (default /work/shared/data, or $RETRIEVEKIT_DATA), never copied.
Passage vectors go to an embedding cache under benchmarks/.cache/ (gitignored), stores to
benchmarks/.cache/stores/, so only the first `index` run encodes anything. Results are
printed as Markdown and written to benchmarks/results/quality-<phase>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
COLLECTIONS = ("nfcorpus", "cranfield", "cisi", "cacm", "npl")
#: encoding order: smallest first, so a partial run already covers whole collections
INDEX_ORDER = ("cisi", "cranfield", "cacm", "nfcorpus", "npl")
#: nDCG@10 / Recall@100 / MRR@10 of rank-bm25 (k1=1.5, b=0.75, no stemming/stopwords),
#: from each collection's SOURCE.md
BASELINES = {
    "nfcorpus": (0.3064, 0.2331, 0.5085),
    "cranfield": (0.3366, 0.6863, 0.4930),
    "cisi": (0.3041, 0.3691, 0.5600),
    "cacm": (0.4084, 0.5701, 0.6813),
    "npl": (0.3456, 0.4522, 0.6472),
}
MTEB_NFCORPUS_MINILM = 0.316
HEADLINE = ("ndcg@10", "recall@100", "mrr@10")
LABELS = {"ndcg@10": "nDCG@10", "recall@100": "R@100", "mrr@10": "MRR@10"}

log = logging.getLogger("quality")


def _data_dir(args: argparse.Namespace, name: str) -> Path:
    return Path(args.data) / name


def _load(args: argparse.Namespace, name: str, split: str = "test"):
    from retrievekit.evaluation import load_beir

    return load_beir(_data_dir(args, name), split=split)


def _cache():
    from retrievekit.cache import EmbeddingCache

    return EmbeddingCache(CACHE / "embeddings" / "embeddings.sqlite")


def _retriever(name: str, embedder: Any = None, **kw: Any):
    from retrievekit.report import open_eval_retriever

    # one folder per collection: an embedded store is locked while open, so another phase
    # can read a finished collection while `index` writes the next one
    return open_eval_retriever(CACHE / "stores" / name, name, embedder=embedder, **kw)


def _save(phase: str, payload: Mapping[str, Any], command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"phase": phase, "command": command, "machine": _machine(),
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **payload}
    path = RESULTS / f"quality-{phase}.json"
    path.write_text(json.dumps(out, indent=2), encoding="utf-8")
    print(f"\n(wrote {path.relative_to(HERE.parent)})")


def _machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpus": os.cpu_count(), "cpu_model": cpu, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------------
# index: encode every collection once (the slow part), through the real pipeline
# --------------------------------------------------------------------------------------


def phase_index(args: argparse.Namespace) -> None:
    from retrievekit.report import index_dataset

    totals = {}
    with _cache() as cache:
        embedder = None
        for name in [c for c in INDEX_ORDER if c in args.collections]:
            ds = _load(args, name)
            t0 = time.perf_counter()
            with _retriever(name, embedder=embedder, dtype=args.dtype) as r:
                embedder = r.embedder
                stats = index_dataset(r, ds, cache=cache, progress=True, batch_size=128)
                stats["records"] = r.count()
            stats["seconds"] = round(time.perf_counter() - t0, 1)
            totals[name] = stats
            print(f"{name}: {stats}", flush=True)
    _save("index", {"dtype": args.dtype, "collections": totals},
          "benchmarks/quality.py index")


# --------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------


def _docs(ds) -> tuple[list[str], list[str]]:
    from retrievekit.evaluation import dataset_documents

    pairs = [(i, t) for i, t in dataset_documents(ds) if t.strip()]
    return [i for i, _ in pairs], [t for _, t in pairs]


def _bm25_eval(ds, ids: list[str], texts: list[str], sparse: Mapping[str, Any]) -> dict[str, float]:
    """Whole-document BM25 (no chunking) with these SparseConfig fields, scored like the CLI."""
    from retrievekit.evaluation import evaluate
    from retrievekit.records import Record
    from retrievekit.sparse import SparseConfig, SparseIndex

    index = SparseIndex(SparseConfig(**sparse))
    index.replace([], [Record(i, i, t, {}) for i, t in zip(ids, texts)])
    index.commit(1)
    res = evaluate(lambda q, n: index.search(q, n), ds, k=100, ks=(10, 100),
                   metrics=("ndcg", "recall", "mrr"), progress=False)
    return {m: res.means[m] for m in HEADLINE}


def _fmt(v: float) -> str:
    return f"{v:.4f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(c) if isinstance(c, float) else str(c)
                                        for c in row) + " |")
    return "\n".join(lines)


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    return sum(vals) / len(vals) if vals else float("nan")


# --------------------------------------------------------------------------------------
# bm25: parity with the README baselines, and what stopwords / stemming add
# --------------------------------------------------------------------------------------

PLAIN = {"stopwords": None, "stemmer": None}
TOKENIZERS = {
    "none": PLAIN,
    "stopwords": {"stopwords": "en", "stemmer": None},
    "stemmer": {"stopwords": None, "stemmer": "english"},
    "stopwords+stemmer (default)": {"stopwords": "en", "stemmer": "english"},
}
#: the one engine since Engine v2 (k1=1.2, b=0.75, fixed by tantivy); the bm25s engines it
#: replaced are compared in benchmarks/sparse_engines.py
ENGINES = {"tantivy (default)": {}}


def phase_bm25(args: argparse.Namespace) -> None:
    parity: dict[str, dict[str, dict[str, float]]] = {}
    tokenizers: dict[str, dict[str, dict[str, float]]] = {}
    sets = [(c, "test") for c in args.collections]
    if "nfcorpus" in args.collections:
        sets.append(("nfcorpus", "dev"))
    for name, split in sets:
        ds = _load(args, name, split)
        ids, texts = _docs(ds)
        key = name if split == "test" else f"{name} (dev)"
        if split == "test":
            parity[key] = {e: _bm25_eval(ds, ids, texts, {**cfg, "tokenizer": PLAIN})
                           for e, cfg in ENGINES.items()}
        tokenizers[key] = {t: _bm25_eval(ds, ids, texts, {"tokenizer": tok})
                           for t, tok in TOKENIZERS.items()}
        print(f"{key}: done", flush=True)

    print("\n### BM25 parity (whole documents, tantivy k1=1.2 b=0.75, no stopwords, no "
          "stemming)\n")
    rows = []
    for name, per in parity.items():
        base = BASELINES[name]
        rows.append((name, "README baseline (rank-bm25 0.2.2)", *base, ""))
        for engine, m in per.items():
            d = m["ndcg@10"] - base[0]
            rows.append((name, engine, *(m[h] for h in HEADLINE), f"{d:+.4f}"))
    print(_table(["collection", "BM25", "nDCG@10", "R@100", "MRR@10", "Δ nDCG@10"], rows))

    print("\n### Tokenizer (tantivy, whole documents): nDCG@10 / R@100 / MRR@10\n")
    rows = []
    for name, per in tokenizers.items():
        rows.append((name, *("/".join(f"{per[t][h]:.3f}" for h in HEADLINE) for t in TOKENIZERS)))
    tests = [n for n in tokenizers if "(dev)" not in n]
    rows.append(("mean nDCG@10 (test sets)",
                 *(f"{_mean(tokenizers[n][t]['ndcg@10'] for n in tests):.4f}" for t in TOKENIZERS)))
    rows.append(("best nDCG@10 on (test sets)",
                 *(str(sum(1 for n in tests if max(tokenizers[n].values(),
                                                    key=lambda m: m["ndcg@10"]) is tokenizers[n][t]))
                   for t in TOKENIZERS)))
    print(_table(["collection", *TOKENIZERS], rows))
    _save("bm25", {"parity": parity, "baselines": BASELINES, "tokenizers": tokenizers},
          "benchmarks/quality.py bm25")


# --------------------------------------------------------------------------------------
# modes: the pipeline as users run it (chunking, default tokenizer), sparse/dense/hybrid
# --------------------------------------------------------------------------------------


def phase_modes(args: argparse.Namespace) -> None:
    from retrievekit.report import evaluate_modes, index_dataset

    results: dict[str, dict[str, Any]] = {}
    with _cache() as cache:
        embedder = None
        for name in args.collections:
            ds = _load(args, name)
            with _retriever(name, embedder=embedder) as r:
                embedder = r.embedder
                stats = index_dataset(r, ds, cache=cache, progress=False)
                if stats["encoded"]:
                    print(f"warning: {name}: {stats['encoded']} passages were not in the cache "
                          "(run the index phase first)", flush=True)
                res = evaluate_modes(r, ds, ("sparse", "dense", "hybrid"), k=10,
                                     candidates=100, progress=False)
            results[name] = {m: {"metrics": v.metrics, "latency_ms": v.latency_ms,
                                 "num_queries": v.num_queries} for m, v in res.items()}
            results[name]["records"] = stats["written"] + stats["unchanged"]
            print(f"{name}: done", flush=True)

    print("\n### Pipeline modes (chunked, default tokenizer; k=100 hits, 100 candidates/side)\n")
    rows, wins = [], 0
    for name, per in results.items():
        best_single = max(per["sparse"]["metrics"]["ndcg@10"], per["dense"]["metrics"]["ndcg@10"])
        ok = per["hybrid"]["metrics"]["ndcg@10"] >= best_single
        wins += ok
        for mode in ("sparse", "dense", "hybrid"):
            m = per[mode]["metrics"]
            lat = per[mode]["latency_ms"]
            flag = ("yes" if ok else "no") if mode == "hybrid" else ""
            rows.append((name, mode, *(m[h] for h in HEADLINE), f"{lat['p50']:.1f}",
                         f"{lat['p95']:.1f}", flag))
    print(_table(["collection", "mode", "nDCG@10", "R@100", "MRR@10", "p50 ms", "p95 ms",
                  "hybrid ≥ best single"], rows))
    print(f"\nhybrid >= the better single mode (nDCG@10) on {wins} of {len(results)} collections")
    means = {mode: {h: _mean(results[n][mode]["metrics"][h] for n in results) for h in HEADLINE}
             for mode in ("sparse", "dense", "hybrid")}
    print("\n" + _table(["mean over collections", *(LABELS[h] for h in HEADLINE)],
                        [(mode, *(means[mode][h] for h in HEADLINE)) for mode in means]))
    _save("modes", {"results": results, "means": means, "hybrid_wins": wins},
          "benchmarks/quality.py modes")


# --------------------------------------------------------------------------------------
# variants: hybrid candidates and weights (chosen on nfcorpus dev, reported on test)
# --------------------------------------------------------------------------------------

CANDIDATES = (50, 100)
WEIGHTS = {"1:1 (default)": {"dense": 1.0, "sparse": 1.0},
           "dense 1 : sparse 0.5": {"dense": 1.0, "sparse": 0.5},
           "dense 0.5 : sparse 1": {"dense": 0.5, "sparse": 1.0}}


def _hybrid_grid(args: argparse.Namespace, variants: Mapping[str, Mapping[str, Any]],
                 phase: str, title: str, save: bool = True
                 ) -> dict[str, dict[str, dict[str, Any]]]:
    """Hybrid nDCG@10 / MRR@10 (k = 10) of each variant (query-time config options) at each
    of `--candidates` per side, on the nfcorpus dev split first, then the test sets; each
    cell also keeps its per-query nDCG@10 (``"per_query"``, not printed)."""
    from retrievekit.evaluation import evaluate
    from retrievekit.report import index_dataset

    sets = [("nfcorpus", "dev")] if "nfcorpus" in args.collections else []
    sets += [(c, "test") for c in args.collections]
    results: dict[str, dict[str, dict[str, float]]] = {}
    with _cache() as cache:
        embedder = None
        for name, split in sets:
            ds = _load(args, name, split)
            key = name if split == "test" else f"{name} (dev)"
            results[key] = {}
            for vname, options in variants.items():
                with _retriever(name, embedder=embedder, options=dict(options)) as r:
                    embedder = r.embedder
                    index_dataset(r, ds, cache=cache, progress=False)
                    with r.embedder.using_cache(cache):  # queries too: quality only here
                        for cand in args.candidates:
                            res = evaluate(
                                lambda q, n, c=cand: r.search(q, k=n, mode="hybrid",
                                                              candidates=c),
                                ds, k=10, ks=(10,), metrics=("ndcg", "mrr"), progress=False)
                            results[key][f"{vname}, candidates {cand}"] = {
                                **res.means, "per_query": {q: v["ndcg@10"] for q, v
                                                           in res.per_query.items()}}
            print(f"{key}: done", flush=True)

    print(f"\n### {title} (k=10): nDCG@10 / MRR@10\n")
    names = list(next(iter(results.values())))
    tests = [c for c in results if "(dev)" not in c]
    rows = [(n, *(f"{results[c][n]['ndcg@10']:.4f} / {results[c][n]['mrr@10']:.3f}"
                  for c in results),
             f"{_mean(results[c][n]['ndcg@10'] for c in tests):.4f}") for n in names]
    print(_table(["variant", *results, "mean nDCG@10 (test)"], rows))
    if save:
        command = f"benchmarks/quality.py {phase}"
        if tuple(args.candidates) != CANDIDATES:  # a run beside the documented one
            phase += "-c" + "-".join(map(str, args.candidates))
            command += " --candidates " + ",".join(map(str, args.candidates))
        _save(phase, {"results": _means_only(results)}, command)
    return results


def _means_only(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    return {key: {n: {m: v for m, v in cell.items() if m != "per_query"}
                  for n, cell in cells.items()} for key, cells in results.items()}


def phase_variants(args: argparse.Namespace) -> None:
    _hybrid_grid(args, {name: {"weights": w} for name, w in WEIGHTS.items()}, "variants",
                 "Hybrid variants")


FUSIONS = ("rrf", "relative_score", "dbsf")


def phase_fusions(args: argparse.Namespace) -> None:
    """Hybrid with each fusion method and candidates per side, nfcorpus dev first."""
    _hybrid_grid(args, {f: {"fusion": f} for f in FUSIONS}, "fusions",
                 "Fusion methods (hybrid, equal weights)")


#: the library's default before `default` chose it (RRF, 50 candidates per side)
FORMER_DEFAULT = "rrf, candidates 50"


def phase_default(args: argparse.Namespace) -> None:
    """Choose the default fusion for collections never seen: every fusion method at every
    `--candidates` (default 50,100,150,200) in the pipeline; then, with each test collection
    left out in turn, the setting with the best mean nDCG@10 over the other test sets and
    the nfcorpus dev split (the dev split too is left out with nfcorpus) is scored on the
    left-out one, against the former default (paired randomization test per collection,
    and over all test queries pooled)."""
    if tuple(args.candidates) == CANDIDATES:
        args.candidates = [50, 100, 150, 200]
    results = _hybrid_grid(args, {f: {"fusion": f} for f in FUSIONS}, "default",
                           "Fusion methods (hybrid, equal weights)", save=False)
    dev = "nfcorpus (dev)"
    tests = [c for c in results if c != dev]
    names = list(results[tests[0]])
    chosen: dict[str, Any] = {}
    for out in tests:
        train = [c for c in results if c != out and not (out == "nfcorpus" and c == dev)]
        score = {n: _mean(results[c][n]["ndcg@10"] for c in train) for n in names}
        best = max(names, key=lambda n: (score[n], -names.index(n)))
        a, b = results[out][best]["per_query"], results[out][FORMER_DEFAULT]["per_query"]
        diff, se, p = _paired(a, b)
        chosen[out] = {"chosen": best, "chosen_on": train, "train_mean": score[best],
                       "ndcg@10": results[out][best]["ndcg@10"],
                       "former_default": results[out][FORMER_DEFAULT]["ndcg@10"],
                       "diff": diff, "se": se, "p": p}
    picks = {v["chosen"] for v in chosen.values()}
    pooled = None
    if len(picks) == 1:
        pick = next(iter(picks))
        a = {f"{c}/{q}": v for c in tests for q, v in results[c][pick]["per_query"].items()}
        b = {f"{c}/{q}": v for c in tests
             for q, v in results[c][FORMER_DEFAULT]["per_query"].items()}
        pooled = dict(zip(("diff", "se", "p"), _paired(a, b)), queries=len(a), setting=pick)
    print("\n### Left out in turn: the setting chosen on the rest, scored on the left-out set\n")
    print(_table(["left out", "chosen on the rest", "nDCG@10", f"{FORMER_DEFAULT}",
                  "difference ± s.e.", "p"],
                 [(c, v["chosen"], v["ndcg@10"], v["former_default"],
                   f"{v['diff']:+.4f} ± {v['se']:.4f}", f"{v['p']:.3f}")
                  for c, v in chosen.items()]))
    if pooled:
        print(f"\npooled over {pooled['queries']} test queries: {pooled['setting']} - "
              f"{FORMER_DEFAULT} = {pooled['diff']:+.4f} ± {pooled['se']:.4f}, "
              f"p = {pooled['p']:.4f}")
    print("\n" + _table(["setting", *results], [
        (n, *(f"{results[c][n]['ndcg@10']:.4f}" for c in results)) for n in names]))
    _save("default", {"results": _means_only(results), "left_out": chosen,
                      "pooled": pooled,
                      "per_query_ndcg@10": {c: {n: {q: round(v, 4) for q, v in
                                                    results[c][n]["per_query"].items()}
                                                for n in (FORMER_DEFAULT, *picks)}
                                            for c in results}},
          "benchmarks/quality.py default")


# --------------------------------------------------------------------------------------
# gap: where ours loses to the best peer recipe (LlamaIndex relative_score, 100 per side)
# --------------------------------------------------------------------------------------

#: depth of every side list collected for the offline fusions
GAP_DEPTH = 200


def _peer_bm25(ids: Sequence[str], texts: Sequence[str]) -> Callable[[str, int], list]:
    """LlamaIndex's `BM25Retriever.from_defaults` as it scores: bm25s (Lucene BM25, k1=1.5,
    b=0.75) over whole documents, bm25s's English stopwords, PyStemmer's English stemmer."""
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    index = bm25s.BM25()
    index.index(bm25s.tokenize(list(texts), stopwords="en", stemmer=stemmer,
                               show_progress=False), show_progress=False)

    def search(query: str, n: int) -> list[tuple[str, float]]:
        tokens = bm25s.tokenize(query, stopwords="en", stemmer=stemmer, show_progress=False)
        docs, scores = index.retrieve(tokens, k=min(n, len(ids)), show_progress=False)
        return [(ids[int(d)], float(s)) for d, s in zip(docs[0], scores[0])]
    return search


def _side_lists(args: argparse.Namespace, name: str, split: str, embedder: Any, cache: Any
                ) -> tuple[Any, dict[str, dict[str, list]]]:
    """Per query, each side's documents (id, score) best first, GAP_DEPTH deep: ours (the
    pipeline's dense and sparse modes: best chunk per document, dense with chunk_penalty),
    the peer's (first-chunk dense = the whole passage truncated to the model window, as the
    peers embed it; LlamaIndex's BM25). Kept under benchmarks/.cache/gap/."""
    import numpy as np

    from retrievekit.report import index_dataset

    ds = _load(args, name, split)
    path = CACHE / "gap" / f"{name}-{split}.json"
    if path.exists():
        return ds, json.loads(path.read_text(encoding="utf-8"))
    qids = list(ds.qrels)
    lists: dict[str, dict[str, list]] = {}
    with _retriever(name, embedder=embedder) as r:
        index_dataset(r, ds, cache=cache, progress=False)
        with r.embedder.using_cache(cache):
            qvecs = r.embedder.embed_queries([ds.queries[q] for q in qids])
        for side, mode in (("dense", "dense"), ("sparse", "sparse")):
            lists[side] = {
                q: [(h.id, float(h.scores[mode])) for h in
                    r.search(ds.queries[q], k=GAP_DEPTH, mode=mode, candidates=GAP_DEPTH,
                             query_vector=v)]
                for q, v in zip(qids, qvecs)}
        parents, _, first = _stored(r, first_chunk_only=True)
    sims = qvecs @ first.T
    lists["peer dense"] = {}
    for qi, q in enumerate(qids):
        top = np.argsort(-sims[qi], kind="stable")[:GAP_DEPTH]
        # LlamaIndex's Chroma store turns Chroma's default squared L2 into exp(-distance);
        # on unit vectors that is exp(2 cos - 2)
        lists["peer dense"][q] = [(parents[j], float(np.exp(2 * sims[qi, j] - 2))) for j in top]
    ids, texts = _docs(ds)
    bm25 = _peer_bm25(ids, texts)
    lists["peer sparse"] = {q: bm25(ds.queries[q], GAP_DEPTH) for q in qids}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(lists), encoding="utf-8")
    return ds, lists


def _fused_run(lists: Mapping[str, Mapping[str, list]], sides: tuple[str, str], method: str,
               n: int | tuple[int, int], weights: tuple[float, float] = (1.0, 1.0),
               rrf_k: float = 60) -> dict[str, list[str]]:
    """Documents fused by the library's own fusion functions from the top `n` of each of two
    side lists (n documents, not chunks; a pair gives dense and sparse their own)."""
    from retrievekit.fusion import reciprocal_rank_fusion, score_fusion

    nd, ns = (n, n) if isinstance(n, int) else n
    run = {}
    for q in lists[sides[0]]:
        ranked = {"dense": [tuple(x) for x in lists[sides[0]][q][:nd]],
                  "sparse": [tuple(x) for x in lists[sides[1]][q][:ns]]}
        ranked = {k: v for k, v in ranked.items() if v}
        w = {"dense": weights[0], "sparse": weights[1]}
        w = {k: w[k] for k in ranked}
        fused = reciprocal_rank_fusion(ranked, k=rrf_k, weights=w) if method == "rrf" else \
            score_fusion(ranked, method=method, weights=w)
        run[q] = [f.id for f in fused[:101]]
    return run


def _single_run(lists: Mapping[str, Mapping[str, list]], side: str) -> dict[str, list[str]]:
    return {q: [d for d, _ in v[:101]] for q, v in lists[side].items()}


#: offline configurations: (label, (dense side, sparse side), method, n per side, weights)
OURS = ("dense", "sparse")
GAP_CONFIGS: list[tuple[str, tuple[str, str], str, Any, tuple[float, float], float]] = [
    *((f"ours rrf k={k} 100", OURS, "rrf", 100, (1, 1), k) for k in (10, 20, 30, 60, 100)),
    ("ours rrf k=60 50 (default)", OURS, "rrf", 50, (1, 1), 60),
    *((f"ours {m} {n}", OURS, m, n, (1, 1), 60)
      for m in ("dbsf", "relative_score") for n in (50, 100, 150, 200)),
    *((f"ours {m} 100, dense {wd} : sparse {ws}", OURS, m, 100, (wd, ws), 60)
      for m in ("dbsf", "relative_score") for wd, ws in ((1, 0.75), (0.75, 1))),
    ("ours dbsf dense 100 sparse 200", OURS, "dbsf", (100, 200), (1, 1), 60),
    ("ours dbsf dense 200 sparse 100", OURS, "dbsf", (200, 100), (1, 1), 60),
    ("peer relative_score 100 (replica)", ("peer dense", "peer sparse"), "relative_score", 100,
     (1, 1), 60),
    ("peer dense + ours sparse, relative_score 100", ("peer dense", "sparse"),
     "relative_score", 100, (1, 1), 60),
    ("ours dense + peer sparse, relative_score 100", ("dense", "peer sparse"),
     "relative_score", 100, (1, 1), 60),
    ("ours dense + peer sparse, dbsf 100", ("dense", "peer sparse"), "dbsf", 100, (1, 1), 60),
]


#: per-query numbers kept in the results file (the others only as means)
GAP_KEEP = ("ours rrf k=60 50 (default)", "ours dbsf 100", "peer relative_score 100 (replica)")


def _paired(a: Mapping[str, float], b: Mapping[str, float], rounds: int = 5000
            ) -> tuple[float, float, float]:
    """Mean of a - b over the queries, its standard error, and the two-sided p-value of a
    paired randomization test (signs flipped at random, seed 0)."""
    import random
    import statistics

    diff = [a[q] - b[q] for q in a]
    obs = sum(diff) / len(diff)
    se = statistics.stdev(diff) / len(diff) ** 0.5  # the sample's sd (n - 1)
    rng = random.Random(0)
    hits = sum(abs(sum(d if rng.random() < 0.5 else -d for d in diff)) / len(diff)
               >= abs(obs) - 1e-12 for _ in range(rounds))
    return obs, se, (hits + 1) / (rounds + 1)  # the observed signs count as one round


def phase_gap(args: argparse.Namespace) -> None:
    """Offline fusions of the collected side lists, per-query comparison on each set."""
    from retrievekit.evaluation import evaluate_run
    from retrievekit.tokenize import Tokenizer

    sets = [("nfcorpus", "dev")] if "nfcorpus" in args.collections else []
    sets += [(c, "test") for c in args.collections]
    out: dict[str, Any] = {}
    per_query: dict[str, dict[str, dict[str, float]]] = {}
    lengths: dict[str, dict[str, int]] = {}
    tokenizer = Tokenizer()
    with _cache() as cache:
        embedder = None
        for name, split in sets:
            key = name if split == "test" else f"{name} (dev)"
            ds, lists = _side_lists(args, name, split, embedder, cache)
            runs = {f"{side} alone": _single_run(lists, side) for side in lists}
            for label, sides, method, n, w, k in GAP_CONFIGS:
                runs[label] = _fused_run(lists, sides, method, n, w, rrf_k=k)
            res = {label: evaluate_run(run, ds.qrels, ks=(10,), metrics=("ndcg", "mrr"))
                   for label, run in runs.items()}
            out[key] = {label: {"ndcg@10": r.means["ndcg@10"], "mrr@10": r.means["mrr@10"]}
                        for label, r in res.items()}
            per_query[key] = {label: {q: v["ndcg@10"] for q, v in r.per_query.items()}
                              for label, r in res.items()}
            lengths[key] = {q: len(tokenizer(ds.queries[q])) for q in ds.qrels}
            print(f"{key}: done", flush=True)
    labels = list(next(iter(out.values())))
    tests = [k for k in out if "(dev)" not in k]
    print("\n### Offline fusions of the side lists (k=10): nDCG@10\n")
    print(_table(["configuration", *out, "mean (test)"],
                 [(lab, *(out[k][lab]["ndcg@10"] for k in out),
                   _mean(out[k][lab]["ndcg@10"] for k in tests)) for lab in labels]))

    pairs = [("ours dbsf 100", "peer relative_score 100 (replica)"),
             ("ours dbsf 100", "ours rrf k=60 50 (default)")]
    paired: dict[str, dict[str, Any]] = {}
    rows = []
    for a, b in pairs:
        for key in out:
            d, se, p = _paired(per_query[key][a], per_query[key][b])
            paired.setdefault(f"{a} - {b}", {})[key] = {"diff": d, "se": se, "p": p}
            rows.append((f"{a} − {b}", key, f"{d:+.4f}", f"{se:.4f}", f"{p:.2f}"))
    print("\n### Paired differences of nDCG@10 (randomization test, 5000 rounds)\n")
    print(_table(["difference", "set", "mean", "s.e.", "p"], rows))

    halves: dict[str, dict[str, Any]] = {}
    rows = []
    for key in out:
        qs = sorted(lengths[key], key=lambda q: (lengths[key][q], q))
        short, long = qs[:len(qs) // 2], qs[len(qs) // 2:]
        halves[key] = {"short_max_terms": lengths[key][short[-1]],
                       "long_max_terms": lengths[key][long[-1]]}
        for lab in labels:
            pq = per_query[key][lab]
            halves[key][lab] = {"short": _mean(pq[q] for q in short),
                                "long": _mean(pq[q] for q in long)}
    key = "cisi" if "cisi" in out else next(iter(out))
    print(f"\n### {key}: nDCG@10 on the shorter and the longer half of the queries (query "
          f"terms <= {halves[key]['short_max_terms']} / up to "
          f"{halves[key]['long_max_terms']})\n")
    print(_table(["configuration", "short half", "long half"],
                 [(lab, halves[key][lab]["short"], halves[key][lab]["long"]) for lab in labels]))
    kept = {key: {lab: {q: round(v, 4) for q, v in pq[lab].items()} for lab in GAP_KEEP}
            for key, pq in per_query.items()}
    _save("gap", {"depth": GAP_DEPTH, "results": out, "paired": paired,
                  "query_length_halves": halves, "per_query_ndcg@10": kept},
          "benchmarks/quality.py gap")


# --------------------------------------------------------------------------------------
# dense: nfcorpus against the published number; exact vs HNSW; bf16 vs fp32
# --------------------------------------------------------------------------------------


def _stored(r, first_chunk_only: bool = False):
    """(parent ids, chunk texts, float32 vector matrix) of every stored record."""
    import numpy as np

    from retrievekit.records import CHUNK_KEY, PARENT_KEY, is_live

    parents, texts, vecs = [], [], []
    for batch in r.store.iter_records(include=["embeddings", "metadatas", "documents"]):
        for meta, text, vec in zip(batch["metadatas"], batch["documents"], batch["embeddings"]):
            if not is_live(meta) or first_chunk_only and int(meta.get(CHUNK_KEY, 0)) != 0:
                continue
            parents.append(str(meta[PARENT_KEY]))
            texts.append(text)
            vecs.append(np.asarray(vec, dtype=np.float32))
    return parents, texts, np.stack(vecs)


def _exact_run(parents: Sequence[str], matrix, queries, qids: Sequence[str], depth: int = 101
               ) -> dict[str, dict[str, float]]:
    """Brute-force cosine; a document scores its best chunk; top `depth` documents."""
    import numpy as np

    sims = queries @ matrix.T
    run: dict[str, dict[str, float]] = {}
    for qi, qid in enumerate(qids):
        best: dict[str, float] = {}
        for j in np.argsort(-sims[qi], kind="stable"):
            d = parents[j]
            if d not in best:  # chunks come best first: the first one seen is the max
                best[d] = float(sims[qi, j])
                if len(best) >= depth:
                    break
        run[qid] = best
    return run


def _exact_dense(r, ds, first_chunk_only: bool) -> dict[str, float]:
    from retrievekit.evaluation import evaluate_run

    parents, _, matrix = _stored(r, first_chunk_only)
    qids = list(ds.qrels)
    queries = r.embedder.embed_queries([ds.queries[q] for q in qids])
    res = evaluate_run(_exact_run(parents, matrix, queries, qids), ds.qrels, ks=(10, 100),
                       metrics=("ndcg", "recall", "mrr"))
    return {m: res.means[m] for m in HEADLINE}


def _bf16_ranking(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Dense retrieval over one whole collection with bf16 vs fp32 vectors (exact search)."""
    from retrievekit.embedding import Embedder, EmbedderConfig
    from retrievekit.evaluation import evaluate_run

    ds = _load(args, name)
    with _retriever(name) as r:
        parents, texts, fp32_docs = _stored(r)
        fp32_embedder = r.embedder
        qids = list(ds.qrels)
        qtexts = [ds.queries[q] for q in qids]
        engine = {"backend": "torch"} if "backend" in EmbedderConfig.__dataclass_fields__ else {}
        fp32_queries = Embedder(model=fp32_embedder.config.model, dtype="float32",
                                **engine).embed_queries(qtexts)
        bf16 = Embedder(model=fp32_embedder.config.model, dtype="bfloat16", **engine)
        t0 = time.perf_counter()
        bf16_docs = bf16.embed_documents(texts, progress=False)
        seconds = time.perf_counter() - t0
        bf16_queries = bf16.embed_queries(qtexts)
    out: dict[str, Any] = {"collection": name, "passages": len(texts),
                           "bf16_passages_per_s": len(texts) / seconds}
    runs = {}
    for label, docs, queries in (("float32", fp32_docs, fp32_queries),
                                 ("bfloat16", bf16_docs, bf16_queries)):
        runs[label] = _exact_run(parents, docs, queries, qids)
        res = evaluate_run(runs[label], ds.qrels, ks=(10, 100), metrics=("ndcg", "recall", "mrr"))
        out[label] = {m: res.means[m] for m in HEADLINE}
    same = sum(1 for q in qids if list(runs["float32"][q])[:10] == list(runs["bfloat16"][q])[:10])
    out["identical_top10_share"] = same / len(qids)
    return out


def _bf16_sample(args: argparse.Namespace, n_per: int = 40) -> dict[str, Any]:
    import random

    import numpy as np

    from retrievekit.embedding import Embedder, EmbedderConfig

    # compare the torch model in both precisions (other engines, where the embedder has
    # them, are not what this check is about)
    engine = {"backend": "torch"} if "backend" in EmbedderConfig.__dataclass_fields__ else {}
    texts: list[str] = []
    for name in args.collections:
        _, docs = _docs(_load(args, name))
        texts += random.Random(0).sample(docs, min(n_per, len(docs)))
    out: dict[str, Any] = {"passages": len(texts)}
    vecs = {}
    for dtype in ("float32", "bfloat16"):
        e = Embedder(model="sentence-transformers/all-MiniLM-L6-v2", dtype=dtype, **engine)
        e.embed_documents(texts[:4])  # load and warm up
        t0 = time.perf_counter()
        vecs[dtype] = e.embed_documents(texts, progress=False)
        out[f"{dtype}_passages_per_s"] = len(texts) / (time.perf_counter() - t0)
    diff = np.abs(vecs["float32"] - vecs["bfloat16"])
    cos = (vecs["float32"] * vecs["bfloat16"]).sum(axis=1)
    out.update(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
               min_cosine=float(cos.min()), mean_cosine=float(cos.mean()))
    return out


def phase_dense(args: argparse.Namespace) -> None:
    from retrievekit.report import evaluate_modes, index_dataset

    out: dict[str, Any] = {}
    if "nfcorpus" in args.collections:
        ds = _load(args, "nfcorpus")
        with _cache() as cache, _retriever("nfcorpus") as r:
            index_dataset(r, ds, cache=cache, progress=False)
            r.embedder.cache = cache
            hnsw = evaluate_modes(r, ds, ("dense",), k=10, progress=False)["dense"].metrics
            out["nfcorpus"] = {
                "pipeline dense (HNSW, best chunk)": {h: hnsw[h] for h in HEADLINE},
                "exact, best chunk": _exact_dense(r, ds, first_chunk_only=False),
                "exact, first chunk only (= MTEB's truncation to 256 tokens)":
                    _exact_dense(r, ds, first_chunk_only=True),
            }
            r.embedder.cache = None
        print(f"\n### Dense on nfcorpus (published all-MiniLM-L6-v2: {MTEB_NFCORPUS_MINILM})\n")
        print(_table(["variant", "nDCG@10", "R@100", "MRR@10", "Δ nDCG@10 vs 0.316"],
                     [(v, *(m[h] for h in HEADLINE), f"{m['ndcg@10'] - MTEB_NFCORPUS_MINILM:+.4f}")
                      for v, m in out["nfcorpus"].items()]))
    out["bf16"] = b = _bf16_sample(args)
    print(f"\n### bfloat16 vs float32 embeddings ({b['passages']} passages, 40 per collection)\n")
    print(_table(["max |Δ| per component", "mean |Δ|", "min cosine(fp32, bf16)",
                  "mean cosine", "fp32 passages/s", "bf16 passages/s"],
                 [(f"{b['max_abs_diff']:.2e}", f"{b['mean_abs_diff']:.2e}",
                   f"{b['min_cosine']:.6f}", f"{b['mean_cosine']:.6f}",
                   f"{b['float32_passages_per_s']:.1f}", f"{b['bfloat16_passages_per_s']:.1f}")]))
    if args.bf16_ranking:
        out["bf16_ranking"] = br = _bf16_ranking(args, args.bf16_ranking)
        print(f"\n### Dense retrieval with bf16 vs fp32 vectors ({br['collection']}, "
              f"{br['passages']} passages, exact search)\n")
        print(_table(["vectors", "nDCG@10", "R@100", "MRR@10"],
                     [(lab, *(br[lab][h] for h in HEADLINE)) for lab in ("float32", "bfloat16")]))
        print(f"\nidentical top-10 lists: {br['identical_top10_share']:.1%} of the queries; "
              f"bf16 encoding ran at {br['bf16_passages_per_s']:.1f} passages/s")
    command = "benchmarks/quality.py dense" + (
        f" --bf16-ranking {args.bf16_ranking}" if args.bf16_ranking else "")
    _save("dense", out, command)


PHASES: dict[str, Callable[[argparse.Namespace], None]] = {
    "index": phase_index, "bm25": phase_bm25, "modes": phase_modes,
    "variants": phase_variants, "fusions": phase_fusions, "default": phase_default,
    "gap": phase_gap,
    "dense": phase_dense,
}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=[*PHASES, "all"])
    p.add_argument("--data", default=os.environ.get("RETRIEVEKIT_DATA", "/work/shared/data"))
    p.add_argument("--collections", default=",".join(COLLECTIONS))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="embedding precision for `index` (the cache key does not include it)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--candidates", default=",".join(map(str, CANDIDATES)),
                   help="variants, fusions: candidates per side to try (default 50,100)")
    p.add_argument("--bf16-ranking", metavar="COLLECTION", default=None,
                   help="dense phase: also re-encode this whole collection in bf16 (slow) and "
                   "compare its retrieval with the fp32 vectors")
    args = p.parse_args(argv)
    args.collections = [c for c in args.collections.split(",") if c]
    args.candidates = [int(c) for c in args.candidates.split(",") if c]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    phases = list(PHASES) if args.phase == "all" else [args.phase]
    for ph in phases:
        t0 = time.perf_counter()
        PHASES[ph](args)
        print(f"[{ph} took {time.perf_counter() - t0:.0f} s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
