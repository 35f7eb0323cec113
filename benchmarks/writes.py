"""The write path at scale: what one write, the next search, a reopen and a catch-up cost.

Corpus and vectors as in scale.py: the union of the five shared collections replicated under
new ids, random unit vectors (encoding excluded), BM25 on the real texts. For each size:
- build (not the subject here, reported for context);
- search p50 over 30 queries (the baseline "any other search");
- one add of 1 document and of 100 new documents (median of 5 and of 3), and the search
  right after each;
- one update of 1 document (same id, new text), and the search after;
- reopen in a fresh process + its first query (chromadb already imported; this includes
  starting Chroma's client on the directory);
- resident memory of the sparse side per chunk (a fresh process that opens only the BM25
  index and runs 50 queries: RSS after minus RSS before);
- with `--server`: catch-up of client A after client B's 1-document write through a
  `chroma run` server on the same store (A's next search minus its median search), median
  of 5. A and B start by reading the whole collection (no `replica_dir`): not timed.

Usage: python benchmarks/writes.py [--docs 10000,100000] [--server] [--name writes]
Writes benchmarks/results/<name>.json and prints a markdown table. The same script measures
retrievekit 0.1 side by side when run with its sources first on the path (a worktree of
commit 509015d): PYTHONPATH=<worktree>/src python benchmarks/writes.py --docs 10000
--name writes-v01 (the sparse memory column is then left empty).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import _common as C  # noqa: E402
from scale import DIM, build_corpus, random_embedder, sample_queries  # noqa: E402


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 1)


def _timed(fn) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def measure(n_docs: int, workdir: Path) -> dict[str, Any]:
    from retrievekit.pipeline import HybridRetriever
    from retrievekit.types import Document

    items, all_queries = build_corpus(n_docs + 400)
    items, spare = items[:n_docs], items[n_docs:]
    queries = sample_queries(all_queries, 30)
    qvecs = dict(zip(queries, C.random_unit(np.random.default_rng(2), len(queries), DIM)))
    embedder = random_embedder(seed=1)
    path = str(workdir / f"store-{n_docs}")
    out: dict[str, Any] = {"docs": n_docs}
    r = HybridRetriever(path=path, embedder=embedder)
    t = time.perf_counter()
    for s in range(0, n_docs, 5000):
        r.add_documents([Document(text=x, id=i, metadata=m) for i, x, m in items[s:s + 5000]],
                        progress=False)
    out["build_s"] = round(time.perf_counter() - t, 1)
    out["records"] = r.count()

    def search(i: int = 0) -> float:
        q = queries[i % len(queries)]
        return _timed(lambda: r.search(q, k=10, query_vector=qvecs[q]))[1]

    out["search_p50_ms"] = _ms(statistics.median(search(i) for i in range(30)))
    before, adds1, after1, adds100, after100, upd, after_upd = [], [], [], [], [], [], []
    # the same query before and after each write, so the two columns compare like with like
    for j in range(5):
        i, x, m = spare[j]
        before.append(search(j))
        adds1.append(_timed(lambda: r.add_documents([Document(text=x, id=i, metadata=m)]))[1])
        after1.append(search(j))
    for j in range(3):
        part = spare[5 + 100 * j:105 + 100 * j]
        before.append(search(j))
        adds100.append(_timed(lambda: r.add_documents(
            [Document(text=x, id=i, metadata=m) for i, x, m in part]))[1])
        after100.append(search(j))
    for j in range(5):
        i, x, m = items[j]
        before.append(search(j))
        upd.append(_timed(lambda: r.add_documents(
            [Document(text=x + f" updated {j}", id=i, metadata=m)]))[1])
        after_upd.append(search(j))
    out["search_before_write_ms"] = _ms(statistics.median(before))
    out.update({
        "add_1_ms": _ms(statistics.median(adds1)),
        "search_after_add_1_ms": _ms(statistics.median(after1)),
        "add_100_ms": _ms(statistics.median(adds100)),
        "search_after_add_100_ms": _ms(statistics.median(after100)),
        "update_1_ms": _ms(statistics.median(upd)),
        "search_after_update_1_ms": _ms(statistics.median(after_upd)),
    })
    records = r.count()
    r.close()
    out["reopen_first_query_ms"] = _ms(_reopen(path, queries[0]))
    try:
        out["sparse_kb_per_chunk"] = round(_sparse_rss(path, queries) * 1024 / records, 3)
    except subprocess.CalledProcessError:  # retrievekit 0.1 (see --help): no SparseIndex
        out["sparse_kb_per_chunk"] = None
    return out


_REOPEN = """
import sys, time
sys.path.insert(0, {bench!r})
from scale import random_embedder, DIM
import numpy as np
e = random_embedder(seed=3); e.model
from retrievekit.pipeline import HybridRetriever
import chromadb  # imported before the clock: the cost of importing it is Chroma's, not a reopen's
t = time.perf_counter()
r = HybridRetriever(path={path!r}, embedder=e)
r.search({query!r}, k=10, query_vector=np.ones(DIM, np.float32) / DIM ** 0.5)
print(time.perf_counter() - t)
r.close()
"""

_SPARSE_RSS = """
import sys
sys.path.insert(0, {bench!r})
import _common as C
from retrievekit.sparse import SparseIndex
from retrievekit.tokenize import Tokenizer
Tokenizer()("warm up the stemmer")
before = C.rss_mb()
ix = SparseIndex(directory={sparse!r})
for q in {queries!r}:
    ix.search(q, 50)
print(C.rss_mb() - before)
"""


def _python(code: str) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)
    return float(res.stdout.strip().splitlines()[-1])


def _reopen(path: str, query: str) -> float:
    bench = str(Path(__file__).resolve().parent)
    return _python(_REOPEN.format(bench=bench, path=path, query=query))


def _sparse_rss(path: str, queries: Sequence[str]) -> float:
    bench = str(Path(__file__).resolve().parent)
    sparse = str(Path(path) / "retrievekit" / "retrievekit" / "sparse")
    return _python(_SPARSE_RSS.format(bench=bench, sparse=sparse, queries=list(queries)[:50]))


def catch_up(n_docs: int, workdir: Path) -> dict[str, Any]:
    """Client A's next search after client B wrote one document, through a `chroma run`
    server serving the store `measure` built (building 100k records through the server
    would take most of an hour here)."""
    from chroma_server import ChromaServer, chroma_binary

    from retrievekit.pipeline import HybridRetriever
    from retrievekit.types import Document

    items, all_queries = build_corpus(n_docs + 1000)
    queries = sample_queries(all_queries, 20)
    qvecs = dict(zip(queries, C.random_unit(np.random.default_rng(2), len(queries), DIM)))
    server = ChromaServer(workdir / f"store-{n_docs}", chroma_binary()).start()
    try:
        kw = {"host": server.host, "port": server.port}
        b = HybridRetriever(embedder=random_embedder(seed=1), **kw)
        a = HybridRetriever(embedder=random_embedder(seed=2), **kw)

        def search(j: int) -> float:
            q = queries[j % len(queries)]
            return _timed(lambda: a.search(q, k=10, query_vector=qvecs[q]))[1]

        base = statistics.median(search(j) for j in range(20))
        extra = []
        for j in range(5):
            i, x, m = items[n_docs + 500 + j]
            b.add_documents([Document(text=x, id=i, metadata=m)])
            extra.append(search(j) - base)
        a.close()
        b.close()
    finally:
        server.stop()
    return {"docs": n_docs, "server_search_p50_ms": _ms(base),
            "catch_up_1_doc_ms": _ms(statistics.median(extra))}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", default="10000,100000")
    ap.add_argument("--server", action="store_true", help="also measure a server catch-up")
    ap.add_argument("--name", default="writes", help="results file name")
    args = ap.parse_args(argv)
    C.setup_torch(1)
    results: dict[str, Any] = {"machine": C.machine_info(), "embedded": [], "server": []}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.docs.split(",")):  # writes-<n>.json after each size
            results["embedded"].append(measure(n, Path(tmp)))
            print(json.dumps(results["embedded"][-1]), flush=True)
            if args.server:
                results["server"].append(catch_up(n, Path(tmp)))
                print(json.dumps(results["server"][-1]), flush=True)
            C.write_results(args.name, results)
    keys = [k for k in results["embedded"][0] if k != "docs"]
    print(C.md_table(["docs"] + keys, [[r["docs"]] + [r[k] for k in keys]
                                       for r in results["embedded"]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
