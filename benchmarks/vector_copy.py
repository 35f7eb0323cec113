"""The vector copy's write path (funnel.py `FunnelVectors`, the copy behind `local_vectors`
and the Matryoshka funnel), without a graph and without Chroma: a bulk load and then
single-record writes, each followed by a commit (a delta folder on disk), as the follower
runs them.

    python benchmarks/vector_copy.py [--rows 120342] [--name vector-copy]

Run it with another checkout's sources first on PYTHONPATH to compare
(`PYTHONPATH=<worktree>/src python benchmarks/vector_copy.py --name vector-copy-before`).
Prints one JSON line: load seconds (120,342 random 384-d unit vectors in batches of 5,461,
one commit each), the peak RSS over the load minus the RSS before it, and the median of 30
one-record writes (a document replaced by a new vector) with their commits. Also written to
benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

DIM, BATCH = 384, 5461


def main(argv: Sequence[str] | None = None) -> int:
    import retrievekit
    from retrievekit.funnel import FunnelVectors
    from retrievekit.records import Record

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=120_342)
    ap.add_argument("--name", default="vector-copy")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)

    def unit(n: int) -> np.ndarray:
        x = rng.standard_normal((n, DIM)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    with tempfile.TemporaryDirectory() as tmp:
        fv = FunnelVectors(DIM, None, tmp)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t = time.perf_counter()
        for s in range(0, args.rows, BATCH):
            ids = [f"d{i}" for i in range(s, min(args.rows, s + BATCH))]
            fv.replace((), [Record(i, i, "", {}) for i in ids], dict(zip(ids, unit(len(ids)))))
            fv.commit(s)
        load_s = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
        one = []
        for k in range(30):
            rid = f"d{k}"
            t = time.perf_counter()
            fv.replace([rid], [Record(rid, rid, "", {})], {rid: unit(1)[0]})
            fv.commit(args.rows + k)
            one.append(time.perf_counter() - t)
    out = {"sources": str(Path(retrievekit.__file__).parents[1]), "rows": args.rows,
           "load_s": round(load_s, 2), "peak_minus_base_mb": round(peak),
           "one_write_ms": round(1000 * statistics.median(one), 2)}
    print(json.dumps(out))
    (Path(__file__).resolve().parent / "results" / f"{args.name}.json").write_text(
        json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
