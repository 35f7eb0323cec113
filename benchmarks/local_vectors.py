"""Hybrid search on the real collections with and without `local_vectors` (the dense side
in the process: a vector copy and an HNSW graph over it, graph.py), side by side.

    python benchmarks/local_vectors.py [--collections nfcorpus,...]   (after quality.py index)

For each collection's store from the `quality.py index` cache (all-MiniLM-L6-v2 vectors,
default settings): the store opened as it is, then opened with `local_vectors=true` (the
first such open builds the copy from Chroma's vectors and the graph; a second open loads
them), and for each the p50/p95 of a hybrid search (k=10) over the judged test queries
with their vectors computed beforehand (so query encoding is not in the times), nDCG@10,
and how many of the default's top 10 the local run returns. The local files are removed
afterwards, so the cached stores stay as `quality.py` made them.
Writes benchmarks/results/local-vectors.json and prints a markdown table.

With `--stages`, the local_vectors store is also timed stage by stage: each stage's
function called on its own for every query (median ms): the graph's candidates, their
exact rescoring (`FunnelVectors.nearest`), the BM25 search, fusion, `LocalEngine.ranked`
(both sides and fusion), reading the hits, and the whole `search`
(`benchmarks/results/local-vectors-stages.json`). To time another checkout the same way,
put its sources first: `PYTHONPATH=<worktree>/src python benchmarks/local_vectors.py
--stages --stages-name local-vectors-stages-before`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import quality as Q  # noqa: E402


def _run(r, texts, vectors, qids, qrels) -> dict[str, Any]:
    from retrievekit.evaluation import ndcg_at_k

    by_text = dict(zip(texts, vectors))
    lat = C.time_queries(lambda q: r.search(q, 10, query_vector=by_text[q]), texts)
    rankings = {qid: [h.id for h in r.search(t, 10, query_vector=v)]
                for qid, t, v in zip(qids, texts, vectors)}
    ndcg = statistics.mean(ndcg_at_k(rankings[q], qrels[q], 10) for q in qids)
    return {"p50_ms": lat["p50"], "p95_ms": lat["p95"], "ndcg@10": ndcg, "rankings": rankings}


def _stages(r, texts, vectors) -> dict[str, float]:
    """Median ms of each stage of a hybrid search (k=10, the default candidates)."""
    from retrievekit.searcher import Request, fuse

    engine, searcher = r._searcher.engine, r._searcher  # the parts, timed one at a time
    n = r.config.candidates
    qs = list(zip(texts, vectors))

    def med(f) -> float:
        return C.time_queries(lambda q: f(*q), qs)["p50"]

    lists = {t: {"dense": engine.vectors.nearest(v, n), "sparse": engine.sparse.search(t, n)}
             for t, v in qs}
    ranked = {t: engine.ranked(Request(t, v, "hybrid", n, None)) for t, v in qs}
    return {
        "graph candidates": med(lambda t, v: engine.vectors.graph.nearest(v, n)),
        "graph candidates + exact rescoring": med(lambda t, v: engine.vectors.nearest(v, n)),
        "BM25 search": med(lambda t, v: engine.sparse.search(t, n)),
        "fusion": med(lambda t, v: fuse(lists[t], engine.settings)),
        "both sides + fusion (ranked)": med(lambda t, v: engine.ranked(
            Request(t, v, "hybrid", n, None))),
        "reading the 10 hits": med(lambda t, v: searcher._hits(ranked[t], 10)),
        "search": med(lambda t, v: r.search(t, 10, query_vector=v)),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--collections", default=",".join(Q.COLLECTIONS))
    ap.add_argument("--data", default=Q.os.environ.get("RETRIEVEKIT_DATA", "/work/shared/data"))
    ap.add_argument("--stages", action="store_true", help="also time each stage (local_vectors)")
    ap.add_argument("--stages-name", default="local-vectors-stages",
                    help="results file of --stages (another checkout's run: another name)")
    args = ap.parse_args(argv)
    stages: dict[str, Any] = {}
    C.setup_torch(1)
    out: dict[str, Any] = {"machine": C.machine_info(), "k": 10, "collections": {}}
    rows = []
    for name in args.collections.split(","):
        ds = Q._load(args, name)
        qids = sorted(ds.qrels)
        texts = [ds.queries[q] for q in qids]
        with Q._retriever(name) as r, Q._cache() as cache:
            with r.embedder.using_cache(cache):
                vectors = r.embedder.embed_queries(texts)
            records = r.count()
            base = _run(r, texts, vectors, qids, ds.qrels)
            funnel = r.store.local_dir / "funnel"
            embedder = r.embedder
        shutil.rmtree(funnel, ignore_errors=True)
        try:
            with C.Timer() as first:
                Q._retriever(name, embedder, options={"local_vectors": True}).close()
            with C.Timer() as again:
                r = Q._retriever(name, embedder, options={"local_vectors": True})
            with r:
                local = _run(r, texts, vectors, qids, ds.qrels)
                if args.stages:
                    stages[name] = _stages(r, texts, vectors)
                    print(name, {k: round(v, 3) for k, v in stages[name].items()}, flush=True)
        finally:
            shutil.rmtree(funnel, ignore_errors=True)
        same = statistics.mean(len(set(base["rankings"][q]) & set(local["rankings"][q])) / 10
                               for q in qids)
        res = {"records": records, "queries": len(qids), "first_open_s": first.seconds,
               "open_s": again.seconds, "top10_overlap": same,
               "default": {k: v for k, v in base.items() if k != "rankings"},
               "local_vectors": {k: v for k, v in local.items() if k != "rankings"}}
        out["collections"][name] = res
        rows.append([name, records, f"{base['p50_ms']:.2f}", f"{local['p50_ms']:.2f}",
                     f"{local['p50_ms'] / base['p50_ms']:.2f}x",
                     f"{base['ndcg@10']:.4f}", f"{local['ndcg@10']:.4f}", f"{same:.3f}",
                     f"{first.seconds:.1f}", f"{again.seconds:.2f}"])
        print(name, rows[-1], flush=True)
    if stages:
        C.write_results(args.stages_name, {"machine": out["machine"], "stages_ms": stages})
    else:
        C.write_results("local-vectors", out)
    print(C.md_table(["collection", "records", "p50 ms default", "p50 ms local_vectors",
                      "ratio", "nDCG@10 default", "nDCG@10 local", "top-10 overlap",
                      "first open s (build)", "open s"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
