"""What one filter's vectors cost to read: from Chroma, from the BM25 index's stored records.

A filter seen for the first time, and passed by few records, is answered on the dense side
by an exact scan of the passing records' vectors, read from Chroma (searcher.py,
`_read_scan`). This times that read by its parts, on a built store, for the records one
filter passes:

- `get(ids, include=["embeddings"])` through chromadb, as the search reads them (by 250);
- the same `get` through chromadb's Rust bindings, with the step that turns the result's
  vectors into Python lists and the one that turns those into a numpy array timed apart;
- `get(ids, include=[])`: the ids alone;
- the same records' stored fields read from the BM25 index (tantivy's document store), and
  their vectors from there where the index keeps them (`keep_vectors`).

Usage: python benchmarks/vector_reads.py --store DIR [--where JSON] [--repeat 7] [--out NAME]
(DIR: a store built by `benchmarks/scale.py --keep`, its `ours` folder). Writes
benchmarks/results/NAME.json (default vector-reads) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

DEFAULT_WHERE = {"$and": [{"collection": "cisi"}, {"replica": 0}]}


def _median_ms(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 2)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--where", default=json.dumps(DEFAULT_WHERE))
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default="vector-reads")
    args = ap.parse_args(argv)

    import chromadb
    from chromadb.config import Settings

    from retrievekit.sparse import SparseIndex

    where = json.loads(args.where)
    client = chromadb.PersistentClient(args.store, settings=Settings(anonymized_telemetry=False))
    col = next(c for c in client.list_collections() if not c.name.endswith("-rklog"))
    ids = col.get(where=where, include=[])["ids"]
    bindings = client._server.bindings  # chromadb's own call path, below its Python layer

    def rust_get() -> Any:
        return bindings.get(str(col.id), ids, None, None, 0, None, ["embeddings"],
                            "default_tenant", "default_database")

    got = rust_get()
    lists = got.embeddings
    sparse_dir = next(Path(args.store).glob("retrievekit/*/sparse"))
    # opened as the store made it (other settings would rebuild it, here without records)
    made = json.loads((sparse_dir / "state.json").read_text(encoding="utf-8"))["signature"]
    index = SparseIndex(directory=sparse_dir, keep_vectors=bool(made.get("vectors")))
    try:
        searcher = index.reader().searcher
        matching = index.compile(where)
        addrs = [a for _, a in searcher.search(matching.query, limit=len(ids) + 1,
                                               count=False).hits]
        rows = [
            ("chromadb get, embeddings, by 250 (the search's read)",
             _median_ms(lambda: [col.get(ids=ids[s:s + 250], include=["embeddings"])
                                 for s in range(0, len(ids), 250)], args.repeat)),
            ("chromadb get, embeddings, all at once", _median_ms(
                lambda: col.get(ids=ids, include=["embeddings"]), args.repeat)),
            ("  of which: the Rust call", _median_ms(rust_get, args.repeat)),
            ("  of which: its vectors as Python lists", _median_ms(
                lambda: rust_get().embeddings, args.repeat)
             - _median_ms(rust_get, args.repeat)),
            ("  of which: the lists as a numpy array", _median_ms(
                lambda: np.array(lists, dtype=np.float32), args.repeat)),
            ("chromadb get, ids only", _median_ms(lambda: col.get(ids=ids, include=[]),
                                                  args.repeat)),
            ("BM25 index: the passing records' ids", _median_ms(
                lambda: index.reader().matching(matching, len(ids) + 1), args.repeat)),
            ("BM25 index: their stored fields (text, metadata, and the vector where kept)",
             _median_ms(lambda: [searcher.doc(a)["record"][0] for a in addrs], args.repeat)),
            ("BM25 index: their vectors (`Snapshot.vectors`, by id)", _median_ms(
                lambda: index.reader().vectors(ids, len(lists[0])), args.repeat)),
        ]
    finally:
        index.close()
    table = C.md_table(["read", "median ms"], rows)
    print(f"{len(ids)} records pass {json.dumps(where)} of {col.count()}\n")
    print(table)
    path = C.write_results(args.out, {"machine": C.machine_info(), "where": where,
                                      "records": col.count(), "passing": len(ids),
                                      "rows": [{"read": r, "median_ms": m} for r, m in rows]})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
