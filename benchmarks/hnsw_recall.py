"""HNSW settings by measured recall: recall@k of Chroma's HNSW against exact search, on the
real vectors of the five shared collections (all-MiniLM-L6-v2 chunk vectors from the cache
of `quality.py index`) and their judged queries, for each setting, with its build time.

With `--engine graph` the same for retrievekit's in-process graph (`local_vectors`:
usearch, 8-bit, twice the candidates, scored exactly on the float32 copy), queried through
`FunnelVectors.nearest`, the code a search runs.

Usage: python benchmarks/hnsw_recall.py [--k 50] [--engine chroma|graph]  (after quality.py index)
Writes benchmarks/results/hnsw-recall.json (graph: graph-recall.json) and prints a markdown
table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import quality as Q  # noqa: E402

SETTINGS = {"M=16, ef 100/100 (Chroma's defaults)": (16, 100, 100),
            "M=16, ef 100/200": (16, 100, 200),
            "M=16, ef 100/300": (16, 100, 300),
            "M=16, ef 100/400": (16, 100, 400),
            "M=12, ef 200/300": (12, 200, 300),
            "M=16, ef 200/300": (16, 200, 300),
            "M=24, ef 200/200": (24, 200, 200),
            "M=32, ef 100/200": (32, 100, 200),
            "M=32, ef 200/200 (retrievekit 0.1 defaults)": (32, 200, 200)}


def real_vectors():
    """All live chunk vectors of the five collections, and all their judged query vectors."""
    from retrievekit.records import is_live

    docs, queries = [], []
    with Q._cache() as cache:
        for name in Q.COLLECTIONS:
            ds = Q._load(argparse.Namespace(data=Q.os.environ.get("RETRIEVEKIT_DATA",
                                                                  "/work/shared/data")), name)
            with Q._retriever(name) as r:
                for b in r.store.iter_records(include=["embeddings", "metadatas"]):
                    docs += [v for v, m in zip(b["embeddings"], b["metadatas"]) if is_live(m)]
                with r.embedder.using_cache(cache):
                    queries.append(r.embedder.embed_queries([ds.queries[q] for q in ds.qrels]))
    return np.asarray(docs, dtype=np.float32), np.concatenate(queries)


def main(argv: Sequence[str] | None = None) -> int:
    import chromadb
    from chromadb.config import Settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--engine", choices=("chroma", "graph"), default="chroma")
    ap.add_argument("--settings", help="semicolon-separated names of SETTINGS to run (all when "
                                       "omitted), e.g. 'M=16, ef 100/300'", default=None)
    ap.add_argument("--out", help="results file name under benchmarks/results (default: "
                                  "hnsw-recall, or graph-recall with --engine graph)")
    args = ap.parse_args(argv)
    C.setup_torch(1)
    docs, queries = real_vectors()
    exact = np.argsort(-(queries @ docs.T), axis=1)[:, :args.k]
    client = chromadb.EphemeralClient(settings=Settings(anonymized_telemetry=False)) \
        if args.engine == "chroma" else None
    ids = [str(i) for i in range(len(docs))]
    rows, out = [], {"machine": C.machine_info(), "vectors": len(docs), "queries": len(queries),
                     "k": args.k, "settings": {}}
    chosen = SETTINGS if args.settings is None else \
        {n: SETTINGS[n] for n in SETTINGS if n.split(" (")[0] in args.settings.split(";")}
    for name, (m, efc, efs) in chosen.items():
        if args.engine == "graph":
            build, search = _graph(docs, ids, m, efc, efs)
        else:
            build, search = _chroma(client, docs, ids, m, efc, efs)
        recalls, lat = [], []
        for qi, q in enumerate(queries):
            t = time.perf_counter()
            got = search(q, args.k)
            lat.append(1000 * (time.perf_counter() - t))
            recalls.append(len({int(g) for g in got} & set(exact[qi].tolist())) / args.k)
        r = {"build_s": build, "recall": statistics.mean(recalls),
             "recall_min": min(recalls), "query_p50_ms": statistics.median(lat)}
        out["settings"][name] = r
        rows.append([name, f"{r['recall']:.4f}", f"{r['recall_min']:.2f}", f"{build:.1f}",
                     f"{r['query_p50_ms']:.2f}"])
    C.write_results(args.out or ("graph-recall" if args.engine == "graph" else "hnsw-recall"),
                    out)
    print(f"{len(docs)} vectors, {len(queries)} queries, k = {args.k}, {args.engine}\n")
    print(C.md_table(["HNSW", f"recall@{args.k}", "worst query", "build s", "query p50 ms"],
                     rows))
    return 0


def _chroma(client, docs, ids, m, efc, efs):
    """Build a Chroma collection at the setting; (build seconds, search(q, k) -> ids)."""
    col = client.create_collection(f"recall-{uuid.uuid4().hex[:8]}", embedding_function=None,
                                   configuration={"hnsw": {"space": "cosine",
                                                           "max_neighbors": m,
                                                           "ef_construction": efc,
                                                           "ef_search": efs}})
    t = time.perf_counter()
    for s in range(0, len(docs), 5000):
        col.add(ids=ids[s:s + 5000], embeddings=docs[s:s + 5000])
    build = time.perf_counter() - t
    return build, lambda q, k: col.query(query_embeddings=[q], n_results=k,
                                         include=[])["ids"][0]


def _graph(docs, ids, m, efc, efs):
    """The in-process graph at the setting, filled as writes fill it (batches of 5,461)."""
    from retrievekit.funnel import FunnelVectors
    from retrievekit.graph import GraphSettings
    from retrievekit.records import Record

    fv = FunnelVectors(docs.shape[1], lambda texts: None, None, GraphSettings(m, efc, efs))
    t = time.perf_counter()
    for s in range(0, len(docs), 5461):
        part = ids[s:s + 5461]
        fv.replace((), [Record(i, i, "", {}) for i in part], dict(zip(part, docs[s:s + 5461])))
    build = time.perf_counter() - t
    return build, lambda q, k: [rid for rid, _ in fv.nearest(q, k)]


if __name__ == "__main__":
    raise SystemExit(main())
