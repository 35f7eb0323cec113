"""What an embedded Chroma write costs, part by part: HNSW settings, the documents' texts,
the metadata (issue 14: build time against LlamaIndex's).

    python benchmarks/chroma_write.py      (after quality.py index)

The records (ids, texts, metadata, vectors) of the nfcorpus, cacm and npl stores that
`quality.py index` made (21,746 records, all-MiniLM-L6-v2 vectors, our reserved metadata
keys) are upserted into a new persistent Chroma collection in batches of 5,461 (Chroma's
largest), once per variant, each in a fresh process (variants alternate across repeats):

- `m32-texts`: our HNSW defaults (M=32, ef_construction=200), texts as documents (ours);
- `m16-texts`: Chroma's defaults (M=16, ef_construction=100) (the peers');
- `m8-texts`, `m4-texts`: cheaper graphs;
- `m32-none` / `m16-none` / `m4-none`: the same without texts;
- `m32-text-in-metadata`: the text as a metadata string instead of a document;
- `m32-no-fts`: texts as documents, with the schema asking for no full-text index
  (`Schema().delete_index(FtsIndexConfig(), key="#document")`); the script reports how
  many rows Chroma's SQLite full-text table holds afterwards.

Writes benchmarks/results/chroma-write.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

HERE = Path(__file__).resolve()
STORES = HERE.parent / ".cache" / "stores"
SOURCES = ("nfcorpus", "cacm", "npl")
BATCH = 5461
VARIANTS = ("m32-texts", "m16-texts", "m8-texts", "m4-texts", "m32-none", "m16-none",
            "m4-none", "m32-text-in-metadata", "m32-no-fts")
GRAPH = {"m32": (32, 200), "m16": (16, 100), "m8": (8, 32), "m4": (4, 8)}


def _records(workdir: Path) -> None:
    """The stores' records, once, into workdir (vectors.npy + records.json)."""
    import chromadb

    from retrievekit.store import read_lifted

    ids: list[str] = []
    texts: list[str] = []
    metas: list[Any] = []
    vectors = []
    for name in SOURCES:
        client = chromadb.PersistentClient(path=str(STORES / name))
        for c in client.list_collections():
            col = client.get_collection(c.name)
            if c.name.endswith("-rklog"):  # the change log, not records
                continue
            got = read_lifted(col, ["documents", "embeddings", "metadatas"],
                              limit=col.count())
            ids += [f"{name}:{i}" for i in got["ids"]]
            texts += got["documents"]
            metas += got["metadatas"]
            vectors.append(np.asarray(got["embeddings"], np.float32))
    np.save(workdir / "vectors.npy", np.concatenate(vectors))
    (workdir / "records.json").write_text(json.dumps({"ids": ids, "texts": texts,
                                                      "metas": metas}))


def _child(variant: str, workdir: Path) -> dict[str, Any]:
    import chromadb

    vectors = np.load(workdir / "vectors.npy")
    recs = json.loads((workdir / "records.json").read_text())
    m, efc = GRAPH[variant.split("-")[0]]
    hnsw = {"space": "cosine", "max_neighbors": m, "ef_construction": efc, "ef_search": 100}
    path = tempfile.mkdtemp(dir=workdir)
    client = chromadb.PersistentClient(path=path)
    if variant.endswith("no-fts"):
        from chromadb import FtsIndexConfig, HnswIndexConfig, Schema, VectorIndexConfig

        schema = Schema()
        schema.delete_index(FtsIndexConfig(), key="#document")
        schema.create_index(VectorIndexConfig(space="cosine", hnsw=HnswIndexConfig(
            max_neighbors=m, ef_construction=efc, ef_search=100)))
        col = client.create_collection("bench", schema=schema, embedding_function=None)
    else:
        col = client.create_collection("bench", configuration={"hnsw": hnsw},
                                       embedding_function=None)
    t = time.perf_counter()
    for s in range(0, len(vectors), BATCH):
        kw: dict[str, Any] = {"ids": recs["ids"][s:s + BATCH], "embeddings": vectors[s:s + BATCH],
                              "metadatas": recs["metas"][s:s + BATCH]}
        if variant.endswith("-texts") or variant.endswith("no-fts"):
            kw["documents"] = recs["texts"][s:s + BATCH]
        elif variant.endswith("text-in-metadata"):
            kw["metadatas"] = [{**meta, "_rk_text": text} for meta, text in
                               zip(kw["metadatas"], recs["texts"][s:s + BATCH])]
        col.upsert(**kw)
    seconds = time.perf_counter() - t
    db = sqlite3.connect(Path(path) / "chroma.sqlite3")
    fts = db.execute("select count(*) from embedding_fulltext_search").fetchone()[0]
    return {"variant": variant, "records": len(vectors), "upsert_s": round(seconds, 2),
            "fulltext_rows": int(fts)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, Path(args.workdir))))
        return 0
    variants = args.variants.split(",")
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        _records(workdir)
        for _ in range(args.repeats):
            for variant in variants:
                res = subprocess.run([sys.executable, str(HERE), "--child", variant,
                                      "--workdir", str(workdir)], capture_output=True,
                                     text=True, check=True)
                runs[variant].append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(runs[variant][-1], flush=True)
    base = statistics.median(r["upsert_s"] for r in runs[variants[0]])
    rows = []
    for variant in variants:
        med = statistics.median(r["upsert_s"] for r in runs[variant])
        rows.append([variant, runs[variant][0]["records"], f"{med:.2f}",
                     f"{med / base:.2f}", runs[variant][0]["fulltext_rows"]])
    out = {"machine": C.machine_info(), "batch": BATCH, "sources": SOURCES, "runs": runs}
    (HERE.parent / "results" / "chroma-write.json").write_text(json.dumps(out, indent=2))
    print("| variant | records | upsert s (median) | / first | rows in Chroma's full-text table |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
