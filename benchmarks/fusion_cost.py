"""What a fusion setting costs per query: the former default (RRF, 50 candidates per side)
against the current one (dbsf, 100), on the real stores that `quality.py index` made.

Each collection's store is opened once per setting and round (rounds alternate the
settings, so a slow spell of the shared machine hits both); every query of the test split
is searched with a precomputed query vector (query encoding is not in the times), k = 10,
after a warm-up. Reports the median over rounds of each setting's p50 / p95.

    python benchmarks/fusion_cost.py [--collections nfcorpus,npl] [--rounds 3]

Writes benchmarks/results/fusion-cost.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import quality as Q  # noqa: E402

SETTINGS = {"rrf, 50": {"fusion": "rrf", "candidates": 50},
            "dbsf, 100": {"fusion": "dbsf", "candidates": 100}}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--collections", default="nfcorpus,cranfield,cisi,cacm,npl")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", default=str(C.DATA_DIR))
    args = p.parse_args(argv)
    C.setup_torch(1)
    out: dict[str, dict[str, list[dict[str, float]]]] = {}
    embedder = None
    for name in [c for c in args.collections.split(",") if c]:
        ds = Q._load(args, name)
        texts = [ds.queries[q] for q in ds.qrels]
        out[name] = {label: [] for label in SETTINGS}
        vectors = None
        for _ in range(args.rounds):
            for label, options in SETTINGS.items():
                with Q._retriever(name, embedder=embedder, options=dict(options)) as r:
                    embedder = r.embedder
                    if vectors is None:
                        vectors = dict(zip(texts, r.embedder.embed_queries(texts)))
                    out[name][label].append(C.time_queries(
                        lambda q: r.search(q, k=10, query_vector=vectors[q]), texts))
        print(f"{name}: done", flush=True)
    rows = []
    for name, by in out.items():
        med = {label: {m: statistics.median(run[m] for run in runs) for m in ("p50", "p95")}
               for label, runs in by.items()}
        a, b = med["rrf, 50"], med["dbsf, 100"]
        rows.append((name, a["p50"], b["p50"], b["p50"] / a["p50"], a["p95"], b["p95"],
                     b["p95"] / a["p95"]))
    print("\n| collection | p50 ms rrf/50 | p50 ms dbsf/100 | ratio | p95 ms rrf/50 | "
          "p95 ms dbsf/100 | ratio |\n|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row[0]} | " + " | ".join(f"{x:.2f}" for x in row[1:]) + " |")
    path = C.write_results("fusion-cost", {
        "benchmark": "fusion_cost", "machine": C.machine_info(),
        "command": "python benchmarks/fusion_cost.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "rounds": args.rounds, "results": out})
    print(f"\n(wrote {path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
