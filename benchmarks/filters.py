"""Filtered hybrid search at scale: filters evaluated in the BM25 index and the planned dense
side, against the same filters left to Chroma, on the same store in one process.

"Chroma evaluates it" adds an always-true clause (`replica > -2**60`: an operand past 2**53,
which the BM25 index does not evaluate), so the search takes the matching ids from Chroma's
`get(where)` (both sides use them) and reads the hits with that `where`: the path every
filter took before 2026-12-01, except that until 2026-12-07 its dense side was Chroma's
filtered HNSW query (run this script from an older checkout to time that). Both return the
same hits. Comparisons (`replica < 1`) are timed beside the equality
filters that match the same records. Store: one built by `benchmarks/writes.py` (`--store`, e.g. its 100k store), random
query vectors (encoding excluded).

With --local-vectors the store is opened a second time with `local_vectors=True` (an
in-process copy of the vectors: selective filters are answered by an exact scan) and the
same filters are timed again, in the same run.

A filter used again is timed from its third query on; its first query (nothing remembered)
and its second (which reads and remembers the records it matches) are reported apart, and
"a new filter each query" adds a clause that changes the filter's key but not its records
(`replica != -i`), so that every query takes the path of a filter seen for the first time.

Usage: python benchmarks/filters.py --store DIR [--queries 50] [--local-vectors] [--out NAME]
Writes benchmarks/results/NAME.json (default filters) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from scale import DIM, random_embedder  # noqa: E402

FILTERS = {
    "none": None,
    "collection = cacm (~15%)": {"collection": "cacm"},
    "collection = cisi and replica = 0 (~1.5%)": {"$and": [{"collection": "cisi"},
                                                           {"replica": 0}]},
    "replica < 1 (~21%)": {"replica": {"$lt": 1}},
    "collection = cisi and replica < 1 (~1.5%)": {"$and": [{"collection": "cisi"},
                                                           {"replica": {"$lt": 1}}]},
}


def _old(where):
    """The same filter with a clause the BM25 index leaves to Chroma."""
    return {"$and": [where, {"replica": {"$gt": -(2 ** 60)}}]}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--local-vectors", action="store_true")
    ap.add_argument("--out", default="filters", help="results file name under benchmarks/results")
    args = ap.parse_args(argv)
    C.setup_torch(1)
    from retrievekit.pipeline import HybridRetriever

    queries = ["heart disease risk", "aerodynamic flow over wings", "library classification",
               "computer programs compilers", "electron beam", "vitamin d deficiency",
               "boundary layer", "information retrieval systems"]
    rng = np.random.default_rng(4)
    qvecs = rng.standard_normal((args.queries, DIM)).astype(np.float32)
    qvecs /= np.linalg.norm(qvecs, axis=1, keepdims=True)
    r = HybridRetriever(path=args.store, embedder=random_embedder(seed=9))
    rows, out = [], {"machine": C.machine_info(), "records": r.count(), "filters": {}}

    def p(where, *, each=False, uses=False):
        """p50 and p95 over the queries; with `each`, a new filter every query (the same
        records, a different key: nothing remembered helps); with `uses`, also the first
        and second query's ms (a filter's second use since the last commit reads the
        records it matches, sparse.py Subset) and p50/p95 from the third query on."""
        lat = []
        for i, v in enumerate(qvecs):
            w = {"$and": [where, {"replica": {"$ne": -1 - i}}]} if each else where
            t = time.perf_counter()
            r.search(queries[i % len(queries)], k=10, where=w, query_vector=v)
            lat.append(1000 * (time.perf_counter() - t))
        if uses:
            return lat[0], lat[1], statistics.median(lat[2:]), float(np.percentile(lat[2:], 95))
        return statistics.median(lat), float(np.percentile(lat, 95))

    p(None)  # warm up
    base = p(None)[0]
    for name, where in FILTERS.items():
        if where is None:
            new = p(None)
            first = second = None
        else:
            first, second, *new = p(where, uses=True)
            cold = p(where, each=True)
        old = p(_old(where)) if where else new
        # overlap of the top 10 (HNSW is approximate, filtered or not)
        same = 1.0 if where is None else statistics.mean(
            len({h.id for h in r.search(q, k=10, where=where, query_vector=v)}
                & {h.id for h in r.search(q, k=10, where=_old(where), query_vector=v)}) / 10
            for q, v in zip(queries, qvecs[:8]))
        out["filters"][name] = {"p50": new[0], "p95": new[1], "old_p50": old[0],
                                "old_p95": old[1], "top10_overlap": same}
        if where is not None:
            out["filters"][name].update(first_ms=first, second_ms=second, new_each_p50=cold[0],
                                        new_each_p95=cold[1])
        rows.append([name, f"{new[0]:.1f}", f"{new[1]:.1f}", f"{new[0] / base:.1f}x",
                     "" if first is None else f"{first:.1f} / {second:.1f}",
                     "" if where is None else f"{cold[0]:.1f} ({cold[0] / base:.1f}x)",
                     f"{old[0]:.1f}", f"{old[1]:.1f}", same])
    r.close()
    C.write_results(args.out, out)
    print(C.md_table(["filter", "p50 ms", "p95 ms", "p50 / unfiltered", "1st / 2nd query ms",
                      "a new filter each query: p50 ms", "Chroma evaluates it: p50 ms", "p95 ms",
                      "top-10 overlap"], rows))
    if args.local_vectors:
        t = time.perf_counter()
        r = HybridRetriever({"store": {"path": args.store}, "local_vectors": True},
                            embedder=random_embedder(seed=9))
        out["local_vectors"] = {"open_s": time.perf_counter() - t,
                                # float32 full vectors, one per record
                                "MiB": r.count() * r.embedder.dim * 4 / 2**20, "filters": {}}
        p(None)
        base = p(None)[0]
        rows = []
        for name, where in FILTERS.items():
            new = p(where)
            out["local_vectors"]["filters"][name] = {"p50": new[0], "p95": new[1]}
            rows.append([name, f"{new[0]:.1f}", f"{new[1]:.1f}", f"{new[0] / base:.1f}x"])
        r.close()
        C.write_results(args.out, out)
        print(f"local_vectors: open {out['local_vectors']['open_s']:.1f} s, "
              f"{out['local_vectors']['MiB']:.0f} MiB")
        print(C.md_table(["filter (local_vectors)", "p50 ms", "p95 ms", "p50 / unfiltered"],
                         rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
