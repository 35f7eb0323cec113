"""What the vector index repair costs (hnsw_repair.py), beside the first indexing it repeats.

A store of the first N passages of nfcorpus is built with the bundled model (the library's
default embedder: its device and precision picked as for a user), closed, and damaged as a
kill inside Chroma's persist damages it (`index_metadata.pickle` cut in half); then the open
that repairs it is timed. Once without the embedding cache, once with `cache_dir` set (the
build fills the cache, the repair reads it). Both in one process, one after the other.

Usage: python benchmarks/repair.py [--docs 2000] [--name repair]
Writes benchmarks/results/<name>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (Timer, collection_texts, load_collection, machine_info,  # noqa: E402
                     md_table, setup_torch, write_results)


def _pickle(path: Path) -> Path:
    db = sqlite3.connect(path / "chroma.sqlite3")
    (seg,), = db.execute("SELECT s.id FROM segments s JOIN collections c ON s.collection = "
                         "c.id WHERE c.name = 'retrievekit' AND s.scope = 'VECTOR'")
    db.close()
    return path / seg / "index_metadata.pickle"


def run(n: int, cache: bool, root: Path) -> dict[str, float]:
    from retrievekit import HybridRetriever

    docs = [{"text": t, "id": i} for i, t in collection_texts(load_collection("nfcorpus"))[:n]]
    path = root / f"store-{'cache' if cache else 'plain'}"
    config = {"cache_dir": str(root / "cache")} if cache else None
    with Timer() as build:
        with HybridRetriever(config, path=str(path)) as r:
            r.add_documents(docs, progress=False)
            records = r.count()
    pickle = _pickle(path)
    pickle.write_bytes(pickle.read_bytes()[:pickle.stat().st_size // 2])
    with Timer() as repair:
        with HybridRetriever(config, path=str(path)) as r:
            assert r.count() == records and r.verify()["ok"]
    with Timer() as reopen:
        HybridRetriever(config, path=str(path)).close()
    return {"records": records, "build_s": round(build.seconds, 1),
            "repair_open_s": round(repair.seconds, 1), "plain_open_s": round(reopen.seconds, 2),
            "repair_records_per_s": round(records / repair.seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--name", default="repair")
    args = ap.parse_args()
    setup_torch()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {mode: run(args.docs, mode == "cache", Path(tmp))
                for mode in ("no cache", "cache")}
    print(md_table(["embedding cache", "records", "build s", "open with repair s",
                    "open after s", "repair records/s"],
                   [[m, r["records"], r["build_s"], r["repair_open_s"], r["plain_open_s"],
                     r["repair_records_per_s"]] for m, r in rows.items()]))
    print(write_results(args.name, {"machine": machine_info(), "docs": args.docs,
                                    "results": rows}))


if __name__ == "__main__":
    main()
