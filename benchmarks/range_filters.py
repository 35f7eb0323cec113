"""Comparisons (`$gt`, `$gte`, `$lt`, `$lte`) in the BM25 index, against Chroma's `get(where)`.

Since FORMAT_VERSION 7 the BM25 index evaluates comparisons itself (ordered terms and one
regular-expression query, `retrievekit.filters`), where before every such filter asked
Chroma for the ids it passes on each search. This times, on one index of `--records`
records whose metadata holds a unique int (`ts`, a timestamp), a float in [0, 1)
(`score`) and an int of 100 values (`bucket`):

- compile: the `where` turned into a tantivy query (a filter seen for the first time; the
  index keeps the last 256 compiled);
- count: how many records pass (what plans the dense side of a filter used once);
- ids: the ids of every passing record (what a filter's second use reads and remembers);
- the same filter through Chroma (`get(where=..., include=[])`, ids only: the path of a
  comparison before), on an embedded collection of the same metadata (with `--chroma`).

Medians over `--repeat` runs of each. No model, no vectors beyond Chroma's 2-d dummies.

Usage: python benchmarks/range_filters.py [--records 120000] [--repeat 7] [--chroma]
Writes benchmarks/results/range-filters.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def filters(n: int) -> dict[str, dict[str, Any]]:
    """Named filters and the share of records each passes (ts runs 0..n-1)."""
    return {
        "ts >= 99% (1%)": {"ts": {"$gte": int(n * 0.99)}},
        "ts < 15%": {"ts": {"$lt": int(n * 0.15)}},
        "ts in a 15% window": {"$and": [{"ts": {"$gte": int(n * 0.40)}},
                                        {"ts": {"$lt": int(n * 0.55)}}]},
        "score > 0.5 (50%)": {"score": {"$gt": 0.5}},
        "bucket < 15 (15%, 15 values)": {"bucket": {"$lt": 15}},
        "bucket in 15 values (equality, for scale)": {"bucket": {"$in": list(range(15))}},
    }


def _median_ms(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    out = None
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times), out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=120_000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--chroma", action="store_true", help="also time Chroma's get(where)")
    ap.add_argument("--out", default="range-filters")
    args = ap.parse_args(argv)
    from retrievekit.records import Record
    from retrievekit.sparse import SparseIndex

    n = args.records
    rng = np.random.default_rng(0)
    ts = rng.permutation(n)
    score = rng.random(n)
    metas = [{"ts": int(ts[i]), "score": float(score[i]), "bucket": i % 100} for i in range(n)]
    ids = [f"r{i}" for i in range(n)]
    index = SparseIndex()
    t = time.perf_counter()
    for lo in range(0, n, 5000):
        index.replace([], [Record(ids[i], ids[i], "some words", metas[i])
                           for i in range(lo, min(n, lo + 5000))])
    index.commit(1)
    out: dict[str, Any] = {"machine": C.machine_info(), "records": n,
                           "index_s": time.perf_counter() - t, "filters": {}}
    col = None
    if args.chroma:
        import chromadb

        client = chromadb.PersistentClient(tempfile.mkdtemp(prefix="rk-range-"),
                                           settings=chromadb.Settings(anonymized_telemetry=False))
        col = client.create_collection("ranges", embedding_function=None)
        t = time.perf_counter()
        for lo in range(0, n, 5000):
            hi = min(n, lo + 5000)
            col.add(ids=ids[lo:hi], embeddings=[[1.0, 0.0]] * (hi - lo), metadatas=metas[lo:hi])
        out["chroma_add_s"] = time.perf_counter() - t
    rows = []
    for name, where in filters(n).items():
        fresh = [SparseIndex() for _ in range(args.repeat)]  # nothing compiled yet
        compile_ms, _ = _median_ms(lambda: fresh.pop().compile(where), args.repeat)
        matching = index.compile(where)
        reader = index.reader()
        # the tantivy count itself (the snapshot remembers a filter's count once asked)
        count_ms, count = _median_ms(
            lambda: reader.searcher.search(matching.query, limit=1, count=True).count,
            args.repeat)
        ids_ms, got = _median_ms(lambda: reader.matching(matching, count), args.repeat)
        row = {"compile_ms": compile_ms, "count_ms": count_ms, "ids_ms": ids_ms,
               "passing": count}
        if col is not None:
            chroma_ms, chroma = _median_ms(
                lambda: col.get(where=where, include=[])["ids"], max(3, args.repeat // 2))
            assert set(chroma) == set(got), name  # the same records, or the timing is moot
            row["chroma_get_ms"] = chroma_ms
        out["filters"][name] = row
        rows.append([name, f"{count:,}", f"{compile_ms:.2f}", f"{count_ms:.2f}",
                     f"{ids_ms:.1f}",
                     f"{row['chroma_get_ms']:.0f}" if col is not None else "-"])
    C.write_results(args.out, out)
    print(C.md_table(["filter", "passing", "compile ms", "count ms", "ids ms",
                      "Chroma get(where) ms"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
