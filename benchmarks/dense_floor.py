"""What one nearest-neighbour query costs on its own: the floor under any hybrid query that
runs one, whatever the rest of the pipeline does.

    python benchmarks/dense_floor.py [--records 120000] [--queries 200]

For N random 384-d unit vectors (the vectors of benchmarks/scale.py) and, for contrast, the
real all-MiniLM-L6-v2 chunk vectors of the five collections (from the `quality.py index`
cache, ~25k, when it is there), the p50 of one query for 50 neighbours through:

- Chroma's HNSW (embedded, persistent, cosine), at retrievekit's defaults and at Chroma's;
- usearch's HNSW in this process (no client, no SQLite, no log), at Chroma's defaults, when
  the package is installed (`pip install usearch`): what keeping the graph in-process would
  buy;
- an exact scan in numpy (matrix-vector product and partial sort).

Each index is built once and queried with the same query vectors, one query at a time, in
one process. Results: benchmarks/results/dense-floor.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

K = 50
SETTINGS = {"retrievekit defaults (M=32, ef 200/200)": (32, 200, 200),
            "Chroma's defaults (M=16, ef 100/100)": (16, 100, 100)}
#: usearch is built at Chroma's defaults only (its build on random vectors takes minutes)
USEARCH_SETTING = "Chroma's defaults (M=16, ef 100/100)"


def _p50_ms(fn: Callable[[np.ndarray], Any], queries: np.ndarray) -> float:
    return C.time_queries(fn, queries)["p50"]  # 5 untimed first, then each query timed


def _chroma(vectors: np.ndarray, m: int, efc: int, efs: int) -> tuple[float, Callable]:
    import chromadb

    client = chromadb.PersistentClient(path=tempfile.mkdtemp(prefix="rk-floor-"))
    col = client.create_collection("floor", configuration={"hnsw": {
        "space": "cosine", "max_neighbors": m, "ef_construction": efc, "ef_search": efs}},
        embedding_function=None)
    ids = [str(i) for i in range(len(vectors))]
    t = time.perf_counter()
    for s in range(0, len(ids), 5000):
        col.add(ids=ids[s:s + 5000], embeddings=vectors[s:s + 5000])
    build = time.perf_counter() - t
    return build, lambda q: col.query(query_embeddings=[q], n_results=K, include=["distances"])


def _usearch(vectors: np.ndarray, m: int, efc: int, efs: int) -> tuple[float, Callable] | None:
    try:
        from usearch.index import Index
    except ImportError:
        return None
    ix = Index(ndim=vectors.shape[1], metric="cos", dtype="f32", connectivity=m,
               expansion_add=efc, expansion_search=efs)
    t = time.perf_counter()
    ix.add(np.arange(len(vectors), dtype=np.uint64), vectors, threads=2)
    return time.perf_counter() - t, lambda q: ix.search(q, K)


def _exact(vectors: np.ndarray) -> Callable:
    def query(q: np.ndarray):
        s = vectors @ q
        top = np.argpartition(-s, K)[:K]
        return top[np.argsort(-s[top])]
    return query


def _real_vectors() -> tuple[np.ndarray, np.ndarray] | None:
    try:
        import hnsw_recall
        docs, queries = hnsw_recall.real_vectors()
    except Exception as exc:  # no cache yet: `python benchmarks/quality.py index`
        print(f"real vectors skipped: {exc}", file=sys.stderr)
        return None
    return np.asarray(docs, np.float32), np.asarray(queries, np.float32)


def run(name: str, vectors: np.ndarray, queries: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    for label, (m, efc, efs) in SETTINGS.items():
        build, query = _chroma(vectors, m, efc, efs)
        rows.append({"vectors": name, "engine": "Chroma HNSW", "setting": label,
                     "build_s": build, "p50_ms": _p50_ms(query, queries)})
        print(rows[-1], flush=True)
        got = _usearch(vectors, m, efc, efs) if label == USEARCH_SETTING else None
        if got is not None:
            rows.append({"vectors": name, "engine": "usearch HNSW (in-process)",
                         "setting": label, "build_s": got[0], "p50_ms": _p50_ms(got[1], queries)})
            print(rows[-1], flush=True)
    rows.append({"vectors": name, "engine": "exact scan (numpy)", "setting": "-",
                 "build_s": 0.0, "p50_ms": _p50_ms(_exact(vectors), queries)})
    print(rows[-1], flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=120_000)
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = run(f"random, {args.records:,}", C.random_unit(rng, args.records, 384),
               C.random_unit(rng, args.queries, 384))
    real = _real_vectors()
    if real is not None:
        rows += run(f"real all-MiniLM-L6-v2, {len(real[0]):,}", real[0], real[1][:args.queries])
    print(C.md_table(["vectors", "engine", "setting", "build s", "p50 ms (50 neighbours)"],
                     [[r["vectors"], r["engine"], r["setting"], f"{r['build_s']:.1f}",
                       f"{r['p50_ms']:.2f}"] for r in rows]))
    C.write_results("dense-floor", {"benchmark": "dense_floor", "machine": C.machine_info(),
                                    "command": "python benchmarks/dense_floor.py "
                                    + " ".join(argv if argv is not None else sys.argv[1:]),
                                    "k": K, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
