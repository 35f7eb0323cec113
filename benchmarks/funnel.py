"""Matryoshka funnel benchmark: truncated-only vs funnel at 384/256/128/64 dims.

For each collection and dim: a dense-mode store whose Chroma vectors are truncated to `d`
(truncated-only), and a funnel store (stage 1 on `d` dims, stage 2 exact full-dim rescoring
of the stage-1 candidates). Reports nDCG@10, Recall@100, the stage-1 HNSW index size on disk
and the dense search latency with query encoding excluded.

Vectors come from the embedding cache (benchmarks/.cache), so nothing is re-encoded once the
quality benchmark has run:  python benchmarks/funnel.py [--collections nfcorpus,cranfield]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from _common import (RESULTS_DIR, collection_texts, load_collection,  # noqa: E402
                     machine_info, md_table)

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DIMS = (384, 256, 128, 64)


def dir_size(path: Path, pattern: str = "*.bin") -> int:
    return sum(f.stat().st_size for f in path.rglob(pattern) if f.is_file())


def run_one(ds, docs, variant: str, dim: int, workdir: Path) -> dict:
    from retrievekit.evaluation import evaluate
    from retrievekit.pipeline import HybridRetriever
    from retrievekit.types import Document

    cfg: dict = {"store": {"path": str(workdir)}, "cache_dir": str(Path(__file__).resolve().parent / ".cache" / "embeddings"),
                 "mode": "dense", "candidates": 100}
    if variant == "truncated" and dim < 384:
        cfg["embedder"] = {"model": MODEL, "truncate_dim": dim}
    elif variant == "funnel":
        cfg["funnel_dim"] = dim
    r = HybridRetriever(cfg)
    t0 = time.perf_counter()
    r.add_documents([Document(text=t, id=i) for i, t in docs], progress=False)
    build_s = time.perf_counter() - t0
    res = evaluate(lambda q, k: r.search(q, k=k, mode="dense", candidates=100), ds, k=100,
                   progress=False)
    # latency with query encoding excluded: a dense search on precomputed vectors (since
    # Engine v2 through the public search, so it includes reading the hits' texts)
    qs = list(ds.queries.values())[:200]
    qv = r.embedder.embed_queries(qs)
    lat = []
    for q, v in zip(qs, qv):
        t = time.perf_counter()
        r.search(q, k=100, mode="dense", candidates=100, query_vector=v)
        lat.append((time.perf_counter() - t) * 1000)
    r.close()
    index_bytes = dir_size(workdir)
    return {"variant": variant, "dim": dim, "ndcg@10": res.means["ndcg@10"],
            "recall@100": res.means["recall@100"], "index_bytes": index_bytes,
            "vector_bytes": len(docs) * dim * 4, "build_s": build_s,
            "p50_ms": statistics.median(lat), "p95_ms": float(np.percentile(lat, 95))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--collections", default="nfcorpus,cranfield")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    results = {"machine": machine_info(), "command": " ".join(["python"] + sys.argv),
               "rows": []}
    for name in args.collections.split(","):
        ds = load_collection(name)
        docs = collection_texts(ds)
        for variant in ("truncated", "funnel"):
            for dim in DIMS:
                if variant == "funnel" and dim == 384:
                    continue
                work = Path(tempfile.mkdtemp(prefix=f"funnel-{name}-"))
                try:
                    row = {"collection": name, **run_one(ds, docs, variant, dim, work)}
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                print(json.dumps(row), flush=True)
                results["rows"].append(row)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "funnel.json").write_text(json.dumps(results, indent=2))
    plot(results["rows"], RESULTS_DIR.parent.parent / "docs" / "funnel.png")
    print(table(results["rows"]))
    return 0


def table(rows: list[dict]) -> str:
    base = {(r["collection"]): r["ndcg@10"] for r in rows
            if r["variant"] == "truncated" and r["dim"] == 384}
    base_idx = {(r["collection"]): r["index_bytes"] for r in rows
                if r["variant"] == "truncated" and r["dim"] == 384}
    return md_table(
        ["collection", "variant", "dims", "nDCG@10", "% of 384-d", "Recall@100",
         "stage-1 index MB", "index vs 384-d", "dense p50 ms", "dense p95 ms"],
        [(r["collection"], r["variant"], r["dim"], f"{r['ndcg@10']:.4f}",
          f"{100 * r['ndcg@10'] / base[r['collection']]:.1f}%", f"{r['recall@100']:.4f}",
          f"{r['index_bytes'] / 2**20:.2f}",
          f"{r['index_bytes'] / base_idx[r['collection']]:.2f}",
          f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}") for r in rows])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = sorted({r["collection"] for r in rows})
    fig, axes = plt.subplots(1, len(cols), figsize=(5 * len(cols), 3.6), squeeze=False)
    for ax, c in zip(axes[0], cols):
        for variant, style in (("truncated", "o--"), ("funnel", "s-")):
            pts = sorted((r["dim"], r["ndcg@10"]) for r in rows
                         if r["collection"] == c and (r["variant"] == variant or r["dim"] == 384))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=variant)
        ax.set_title(f"{c}: dense nDCG@10 by stage-1 dims")
        ax.set_xlabel("dims in the Chroma index")
        ax.set_xticks(DIMS)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
