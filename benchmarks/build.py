"""Build cost and memory of one big `add_documents`: this checkout against an older one, side
by side in one run (issue 14: stream add_documents).

Corpus as in scale.py: the union of the five shared collections replicated under new ids up
to N documents. Vectors are real all-MiniLM-L6-v2 vectors read from the embedding cache
(benchmarks/.cache/embeddings/embeddings.sqlite, filled by `quality.py index`; a miss is
encoded by the model and not written back), so encoding does not dominate; BM25 on the
real texts, HNSW defaults.

Each run is a fresh subprocess with one code version first on PYTHONPATH: it loads the
model, opens the cache, builds the corpus, then times ONE `add_documents` of all N
documents (progress off) and records its peak RSS (`ru_maxrss`) and the peak minus the RSS
just before the call (what the add itself holds on top of the caller's input). Variants:

- `before`: the sources given by `--before` (e.g. a worktree of the commit before the
  streamed add: `git worktree add --detach /tmp/rk-base c759578`), a list in;
- `after`: this checkout's sources, the same list in;
- `after-gen`: this checkout, the documents from a generator (nothing materialized);
- `after:<n>`: this checkout with `batch_records=n`.

Runs alternate (before, after, ... per repeat) so every variant sees the same load; the table
gives medians and the ratios to `before`. Each run also checks that the store it built
holds the same records (ids and content hashes) as the others. `--chunking` adds one run
per version that times only the step from documents to records (tokenizer, chunk split),
over the same N documents.

Usage: python benchmarks/build.py --before /tmp/rk-base/src [--docs 20000] [--repeats 2]
       [--variants before,after,after-gen] [--chunking] [--name build]
Writes benchmarks/results/<name>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

HERE = Path(__file__).resolve()
SRC = HERE.parents[1] / "src"


class _ReadOnlyCache:
    """The shared embedding cache, read only: misses are counted, not written back."""

    def __init__(self, cache: Any) -> None:
        self.inner = cache
        self.misses = 0

    def key_for(self, *args: Any) -> str:
        return self.inner.key_for(*args)

    def get_many(self, keys):
        return self.inner.get_many(keys)

    def put_many(self, items) -> None:
        self.misses += len(items)


def _embedder():
    from retrievekit.cache import EmbeddingCache
    from retrievekit.embedding import Embedder

    e = Embedder(backend="torch")  # the backend is not part of a vector's cache key
    _ = e.model  # what a deployment holds; a cache miss needs it
    cache = _ReadOnlyCache(EmbeddingCache(C.CACHE_FILE))
    e.cache = cache
    return e, cache


def _store_digest(r: Any) -> str:
    """A digest of the stored records' ids and content hashes (same records, same digest)."""
    rows = sorted((rid, str((m or {}).get("_rk_hash")))
                  for batch in r.store.iter_records(include=["metadatas"])
                  for rid, m in zip(batch["ids"], batch["metadatas"]))
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    from scale import build_corpus

    C.setup_torch(1)
    import retrievekit
    from retrievekit.pipeline import HybridRetriever
    from retrievekit.types import Document

    embedder, cache = _embedder()
    items, _ = build_corpus(spec["docs"])
    out: dict[str, Any] = {"variant": spec["variant"], "docs": len(items),
                           "retrievekit": str(Path(retrievekit.__file__).parents[1])}
    if spec["phase"] == "chunking":
        from retrievekit.chunking import ChunkConfig
        from retrievekit.writer import document_records

        docs = [Document(text=t, id=i, metadata=m) for i, t, m in items]
        _ = embedder.tokenizer, embedder.max_seq_length  # loaded before the clock
        t = time.perf_counter()
        recs = 0
        for s in range(0, len(docs), 2048):  # the same groups for both versions
            recs += sum(len(v) for v in document_records(docs[s:s + 2048], embedder,
                                                         ChunkConfig()).values())
        out.update(chunking_s=round(time.perf_counter() - t, 2), records=recs)
        return out
    r = HybridRetriever(path=str(Path(spec["workdir"]) / spec["variant"].replace(":", "-")),
                        embedder=embedder)
    kwargs: dict[str, Any] = {"progress": False}
    if ":" in spec["variant"]:
        kwargs["batch_records"] = int(spec["variant"].split(":")[1])
    if spec["variant"].endswith("-gen"):
        docs: Any = (Document(text=t, id=i, metadata=m) for i, t, m in items)
    else:
        docs = [Document(text=t, id=i, metadata=m) for i, t, m in items]
    gc.collect()
    base = C.rss_mb()
    t = time.perf_counter()
    r.add_documents(docs, **kwargs)
    out["add_s"] = round(time.perf_counter() - t, 1)
    peak = C.peak_rss_mb()
    out.update(base_rss_mb=round(base), peak_rss_mb=round(peak),
               peak_minus_base_mb=round(peak - base), records=r.count(),
               cache_misses=cache.misses)
    out["store_digest"] = _store_digest(r)
    r.close()
    return out


def _run(spec: dict[str, Any], src: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, str(HERE), "--child", json.dumps(spec)],
                         capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{spec['variant']} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="src folder of the code to compare with (required)")
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default="before,after,after-gen")
    ap.add_argument("--chunking", action="store_true", help="also time documents -> records")
    ap.add_argument("--name", default="build")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))), flush=True)
        return 0
    if not args.before:
        ap.error("--before SRC is required: the src folder of the code to compare with")
    variants = args.variants.split(",")
    srcs = {v: (args.before if v == "before" else str(SRC)) for v in variants}
    results: dict[str, Any] = {"machine": C.machine_info(), "docs": args.docs,
                               "before_src": args.before, "command": " ".join(sys.argv),
                               "runs": [], "chunking": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for v in variants:
                spec = {"variant": v, "docs": args.docs, "phase": "add",
                        "workdir": str(Path(tmp) / f"r{rep}")}
                results["runs"].append(_run(spec, srcs[v]))
                print(json.dumps(results["runs"][-1]), flush=True)
                C.write_results(args.name, results)
        if args.chunking:
            for v, src in (("before", args.before), ("after", str(SRC))):
                results["chunking"].append(_run({"variant": v, "docs": args.docs,
                                                 "phase": "chunking", "workdir": tmp}, src))
                print(json.dumps(results["chunking"][-1]), flush=True)
    digests = {r["store_digest"] for r in results["runs"]}
    results["same_records_in_every_store"] = len(digests) == 1
    summary = []
    for v in variants:
        runs = [r for r in results["runs"] if r["variant"] == v]
        summary.append({"variant": v, "runs": len(runs),
                        "add_s": statistics.median(r["add_s"] for r in runs),
                        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
                        "peak_minus_base_mb": statistics.median(r["peak_minus_base_mb"]
                                                                for r in runs),
                        "records": runs[0]["records"],
                        "cache_misses": max(r["cache_misses"] for r in runs)})
    ref = next((s for s in summary if s["variant"] == "before"), None)
    for s in summary:
        if ref is not None:
            s["time_vs_before"] = round(s["add_s"] / ref["add_s"], 3)
            s["peak_minus_base_vs_before"] = round(
                s["peak_minus_base_mb"] / max(ref["peak_minus_base_mb"], 1), 3)
    results["summary"] = summary
    C.write_results(args.name, results)
    keys = [k for k in summary[0] if k != "variant"]
    print(C.md_table(["variant"] + keys, [[s["variant"]] + [s.get(k) for k in keys]
                                          for s in summary]))
    print("same records in every store:", results["same_records_in_every_store"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
