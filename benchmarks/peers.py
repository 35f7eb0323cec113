"""retrievekit's hybrid search against the LangChain and LlamaIndex hybrid recipes.

Same documents, same all-MiniLM-L6-v2 vectors (read from the embedding cache at
benchmarks/.cache/embeddings.sqlite, so no system re-encodes the corpus), same queries, one run:

- ours: ``HybridRetriever`` with default settings (50 candidates per side, RRF k=60, chunking
  of passages longer than the model's window), searched for k=10 and k=100 hits;
- LangChain: ``EnsembleRetriever([BM25Retriever, Chroma.as_retriever()])`` with k=10 and
  k=100 per side, BM25 tokenized by the default ``str.split`` or by lowercase alphanumeric
  runs;
- LlamaIndex: ``QueryFusionRetriever([vector retriever, BM25Retriever], num_queries=1)`` with
  RRF (``reciprocal_rerank``) or ``relative_score`` fusion, k=10 and k=100 per side.

The peers index whole passages. all-MiniLM-L6-v2 reads at most 254 tokens of a passage, so the
vector the peers get for a longer one is the cached vector of its first 254 tokens, which is
also ours' first chunk; the run checks on a few passages that this equals encoding the whole
passage (`truncation_check`). Ours splits such passages into overlapping chunks instead.

Latency is per query, in one thread, with query encoding (the model runs on each query) and
without it (a precomputed query vector: ``search(query_vector=...)`` for ours, an
embeddings object that looks the vector up for the peers).

Usage: ``python benchmarks/peers.py [--collections nfcorpus,cisi | all]``
Writes benchmarks/results/peers.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

REFERENCE_NFCORPUS = {  # nDCG@10 measured earlier on this machine (issue 5)
    "LlamaIndex RRF, k=10/side": 0.336,
    "LlamaIndex relative_score, k=10/side": 0.343,
    "LangChain alnum, k=10/side": 0.335,
    "LangChain alnum, k=100/side": 0.317,
    "LangChain str.split, k=10/side": 0.287,
}


@dataclass
class _Config:
    system: str
    label: str
    k: int
    search: Callable[[str, int], list[str]]


def _measure(configs: list[_Config], ds, source: C.VectorSource) -> list[dict[str, Any]]:
    """Quality and per-query latency of every configuration, interleaved.

    Each query is run by every configuration in turn (the order rotates from query to
    query), so all of them see the same machine load; a busy shared machine otherwise
    favours whichever ran in a quiet minute. Two passes: precomputed query vectors (quality
    and latency), then live query encoding (latency).
    """
    from retrievekit.evaluation import evaluate_run

    queries = list(ds.queries.items())
    spent: dict[str, dict[int, list[float]]] = {"pre": {}, "live": {}}
    runs: dict[str, dict[int, dict[str, list[str]]]] = {"pre": {}, "live": {}}
    for mode in ("pre", "live"):
        source.live = mode == "live"
        for c in configs:  # warm-up: lazy imports, first-query caches
            for _, q in queries[:3]:
                c.search(q, c.k)
        for n, (qid, q) in enumerate(queries):
            for j in range(len(configs)):
                i = (n + j) % len(configs)
                c = configs[i]
                fetch = c.k + 1 if qid in ds.corpus else c.k  # BEIR: the query's own doc drops
                start = time.perf_counter()
                ids = c.search(q, fetch)
                spent[mode].setdefault(i, []).append(time.perf_counter() - start)
                runs[mode].setdefault(i, {})[qid] = C.unique(ids)[:fetch]
    source.live = False
    rows = []
    for i, c in enumerate(configs):
        ks = (10, 100) if c.k >= 100 else (10,)
        pre = evaluate_run(runs["pre"][i], ds.qrels, ks=ks, metrics=("ndcg", "recall"))
        live = evaluate_run(runs["live"][i], ds.qrels, ks=ks, metrics=("ndcg", "recall"))
        lp, ll = C.latency_ms(spent["pre"][i]), C.latency_ms(spent["live"][i])
        rows.append({"system": c.system, "config": c.label, "k": c.k,
                     "ndcg@10": pre["ndcg@10"], "recall@100": pre.means.get("recall@100"),
                     "ndcg@10_live": live["ndcg@10"], "queries": pre.num_queries,
                     "p50_pre_ms": lp["p50"], "p95_pre_ms": lp["p95"],
                     "p50_live_ms": ll["p50"], "p95_live_ms": ll["p95"]})
    return rows


def _check_truncation(embedder, source: C.VectorSource, texts: list[str], n: int = 8
                      ) -> dict[str, Any]:
    """Encode a few long passages whole (the model truncates them) and compare with the
    vectors the peers are given for them."""
    import numpy as np

    long = [t for t in texts if t in source.substitute][:n]
    if not long:
        return {"checked": 0}
    embedder.cache = None
    whole = embedder.embed_documents(long, progress=False)
    given = source.documents(long)
    source.documents_served -= len(long)
    cos = np.sum(whole * given, axis=1)
    return {"checked": len(long), "min_cosine": float(cos.min()),
            "max_abs_diff": float(np.abs(whole - given).max())}


def _build_ours(items, embedder, cache, root: Path, config: dict[str, Any] | None = None,
                name: str = "ours"):
    from retrievekit.pipeline import HybridRetriever
    from retrievekit.types import Document

    docs = [Document(text=t, id=i) for i, t, _ in items]
    for attempt in (1, 2):
        path = root / f"{name}{attempt}"
        r = HybridRetriever(path=str(path), embedder=embedder, config=config)
        embedder.cache = cache
        before = cache.written
        with C.Timer() as t:
            r.add_documents(docs, progress=False)
        encoded = cache.written - before
        embedder.cache = None
        if encoded == 0:
            return r, t.seconds, attempt
        # Chunks missing from the cache were encoded in the timed run: time it again.
        print(f"  ours: {encoded} chunk vectors were not cached; rebuilding for timing",
              file=sys.stderr)
        r.close()
        shutil.rmtree(path, ignore_errors=True)
    raise RuntimeError("the embedding cache did not fill; is it writable?")


def run_collection(name: str, embedder, cache, root: Path, limit_docs: int | None,
                   limit_queries: int | None, local_vectors: bool = False) -> dict[str, Any]:
    import chromadb
    from chromadb.config import Settings

    ds = C.load_collection(name)
    items = [(i, t, {}) for i, t in C.collection_texts(ds)][:limit_docs]
    if limit_docs or limit_queries:
        keep = {i for i, _, _ in items}
        qrels = {q: {d: g for d, g in rel.items() if d in keep} for q, rel in ds.qrels.items()}
        qrels = dict(list({q: r for q, r in qrels.items() if r}.items())[:limit_queries])
        ds = type(ds)(name=ds.name, corpus={i: ds.corpus[i] for i in keep},
                      queries={q: ds.queries[q] for q in qrels}, qrels=qrels, split=ds.split)
    texts = [t for _, t, _ in items]
    print(f"{name}: {len(items)} docs, {len(ds.queries)} judged queries", file=sys.stderr)
    source = C.cached_model_source(embedder, cache)

    # Fill the cache with every full-passage vector the peers will ask for (untimed).
    with C.Timer() as t:
        source.substitute.update(C.truncation_map(embedder, texts))
    print(f"  {len(source.substitute)} passages exceed the model window; tokenized in "
          f"{t.seconds:.0f}s", file=sys.stderr)
    before = cache.written
    with C.Timer() as t:
        for s in range(0, len(texts), 512):
            source.documents(texts[s:s + 512])
    warm = {"encoded": cache.written - before, "seconds": t.seconds}
    print(f"  cache warm-up: {warm['encoded']} passages encoded in {t.seconds:.0f}s",
          file=sys.stderr)
    check = _check_truncation(embedder, source, texts)
    queries = list(ds.queries.values())
    embedder.cache = None
    qvecs = embedder.embed_queries(queries, progress=False)
    source.precomputed = dict(zip(queries, qvecs))

    out: dict[str, Any] = {"docs": len(items), "queries": len(ds.queries), "warmup": warm,
                           "long_passages": len(source.substitute), "truncation_check": check}

    # -- ours ---------------------------------------------------------------------------
    ours, seconds, attempt = _build_ours(items, embedder, cache, root)
    out["index_s"] = {"ours": seconds}
    out["ours_records"] = ours.count()
    print(f"  ours: indexed {ours.count()} records in {seconds:.1f}s", file=sys.stderr)

    def ours_search(q: str, fetch: int) -> list[str]:
        if source.live:
            return [h.id for h in ours.search(q, k=fetch)]
        return [h.id for h in ours.search(q, k=fetch, query_vector=source.precomputed[q])]

    configs = [_Config("ours", f"hybrid defaults, k={k}", k, ours_search) for k in (10, 100)]
    local = None
    if local_vectors:  # the dense side in the process (graph.py), a store of its own
        local, seconds, _ = _build_ours(items, embedder, cache, root, {"local_vectors": True},
                                        "ours-local")
        out["index_s"]["ours_local_vectors"] = seconds

        def local_search(q: str, fetch: int) -> list[str]:
            if source.live:
                return [h.id for h in local.search(q, k=fetch)]
            return [h.id for h in local.search(q, k=fetch,
                                               query_vector=source.precomputed[q])]
        configs.append(_Config("ours", "hybrid local_vectors, k=10", 10, local_search))
    settings = Settings(anonymized_telemetry=False)

    # -- LangChain ----------------------------------------------------------------------
    client = chromadb.PersistentClient(path=str(root / "langchain"), settings=settings)
    lc, timings = C.build_langchain(C.langchain_documents(items), source, client,
                                    "langchain-bench", tokenizers=("split", "alnum"))
    out["index_s"]["langchain"] = timings["vector_s"] + timings["bm25_split_s"]
    out["index_s"]["langchain_parts"] = timings
    for tok in ("split", "alnum"):
        for k in (10, 100):
            retriever = lc.ensemble(k, tok)

            def lc_search(q: str, fetch: int, retriever=retriever) -> list[str]:
                return C.langchain_ids(retriever.invoke(q))
            configs.append(_Config(
                "langchain", f"EnsembleRetriever, BM25 "
                f"{'str.split' if tok == 'split' else 'alnum'}, k={k}/side", k, lc_search))

    # -- LlamaIndex ---------------------------------------------------------------------
    client = chromadb.PersistentClient(path=str(root / "llama"), settings=settings)
    li, timings = C.build_llama(C.llama_nodes(items), source, client, "llama-bench")
    out["index_s"]["llamaindex"] = timings["vector_s"] + timings["bm25_s"]
    out["index_s"]["llamaindex_parts"] = timings
    for mode in ("reciprocal_rerank", "relative_score"):
        for k in (10, 100):
            retriever = li.fusion(k, mode)

            def li_search(q: str, fetch: int, retriever=retriever) -> list[str]:
                return C.llama_ids(retriever.retrieve(q))
            configs.append(_Config(
                "llamaindex", f"QueryFusionRetriever "
                f"{'RRF' if mode.startswith('rec') else mode}, k={k}/side", k, li_search))

    with C.Timer() as t:
        out["rows"] = _measure(configs, ds, source)
    print(f"  {len(configs)} configurations x {len(ds.queries)} queries x 2 passes in "
          f"{t.seconds:.0f}s; served {source.documents_served} document vectors",
          file=sys.stderr)
    for r in out["rows"]:
        if abs(r["ndcg@10_live"] - r["ndcg@10"]) > 0.01:
            print(f"  note: {r['system']} {r['config']}: nDCG@10 live {r['ndcg@10_live']:.4f} "
                  f"vs precomputed {r['ndcg@10']:.4f}", file=sys.stderr)
    ours.close()
    if local is not None:
        local.close()
    del lc, li, client, configs
    gc.collect()
    return out


def tables(results: dict[str, Any]) -> str:
    parts = []
    for name, res in results["collections"].items():
        ours = {r["k"]: r for r in res["rows"] if r["system"] == "ours"}
        idx = res["index_s"]
        head = ["system", "config", "nDCG@10", "Recall@100", "index s", "p50 ms",
                "p95 ms", "p50 ms (no enc.)", "p95 ms (no enc.)", "p50 ratio vs ours",
                "p50 ratio vs ours (no enc.)"]
        rows = []
        for r in res["rows"]:
            base = ours[r["k"]]
            rows.append([r["system"], r["config"], r["ndcg@10"],
                         r["recall@100"] if r["k"] >= 100 else None, idx[r["system"]],
                         r["p50_live_ms"], r["p95_live_ms"], r["p50_pre_ms"], r["p95_pre_ms"],
                         f"{r['p50_live_ms'] / base['p50_live_ms']:.2f}x",
                         f"{r['p50_pre_ms'] / base['p50_pre_ms']:.2f}x"])
        parts.append(f"**{name}** ({res['docs']} docs, {res['queries']} queries; ours stores "
                     f"{res['ours_records']} records after chunking)\n\n" + C.md_table(head, rows))
        parts.append("Index time vs ours: " + ", ".join(
            f"{s} {idx[s]:.1f}s ({idx[s] / idx['ours']:.2f}x)" for s in ("langchain", "llamaindex")))
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--collections", default="nfcorpus",
                    help="comma-separated names, or 'all' (default: nfcorpus)")
    ap.add_argument("--cache", default=str(C.CACHE_FILE), help="embedding cache sqlite file")
    ap.add_argument("--out", default="peers", help="results file name under benchmarks/results")
    ap.add_argument("--limit-docs", type=int, default=None, help="smoke test: first N docs")
    ap.add_argument("--limit-queries", type=int, default=None, help="smoke test: N queries")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--local-vectors", action="store_true",
                    help="also run ours with local_vectors=true (k=10)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other collections already in the results file")
    args = ap.parse_args(argv)
    threads = C.setup_torch(args.threads)
    names = list(C.COLLECTIONS) if args.collections == "all" else args.collections.split(",")

    from retrievekit.cache import EmbeddingCache
    from retrievekit.embedding import Embedder

    # evaluate() repeats the same BEIR identical-id warning on every pass
    logging.getLogger("retrievekit.evaluation").setLevel(logging.ERROR)

    started = time.perf_counter()
    embedder = Embedder()
    embedder.model  # load before any timing
    disk_cache = EmbeddingCache(args.cache)
    cache = C.CountingCache(disk_cache)
    results: dict[str, Any] = {"benchmark": "peers", "machine": C.machine_info(),
                               "command": "python benchmarks/peers.py " + " ".join(argv or sys.argv[1:]),
                               "model": embedder.config.model, "cache": args.cache,
                               "torch_threads": threads,
                               "reference_nfcorpus_ndcg@10": REFERENCE_NFCORPUS,
                               "collections": {}}
    previous = C.RESULTS_DIR / f"{args.out}.json"
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        results["collections"] = {k: v for k, v in old.get("collections", {}).items()
                                  if k not in names}
        results["earlier_runs"] = old.get("earlier_runs", []) + [
            {k: old.get(k) for k in ("command", "machine", "runtime_s")}]
    root = Path(tempfile.mkdtemp(prefix="rk-peers-"))
    try:
        for name in names:
            results["collections"][name] = run_collection(
                name, embedder, cache, root / name, args.limit_docs, args.limit_queries,
                args.local_vectors)
            shutil.rmtree(root / name, ignore_errors=True)
            results["runtime_s"] = time.perf_counter() - started
            path = C.write_results(args.out, results)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        disk_cache.close()
    print(tables(results))
    print(f"\nwrote {path} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
