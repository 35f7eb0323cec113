"""The main job of `make demo`: index the sample corpus into .retrievekit/ and answer three
queries, showing for each hit its id, fused score and its rank on each side.

Run it twice: the second run reuses the store and encodes nothing (unchanged documents are
skipped by id and content hash).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from retrievekit import Document, HybridRetriever  # noqa: E402

HERE = Path(__file__).resolve().parent
STORE = os.environ.get("RETRIEVEKIT_DEMO_STORE", str(HERE.parent / ".retrievekit"))
QUERIES = [
    ("how do I merge keyword and vector search results?", None),
    ("E1042", None),                                   # an exact code: BM25 carries it
    ("fermented food", {"topic": "cooking"}),          # a metadata filter on both sides
]


def main() -> int:
    import torch

    torch.set_num_threads(max(1, min(4, (os.cpu_count() or 2) // 2)))
    docs = [Document(text=d["text"], id=d["id"], metadata=d["metadata"])
            for d in map(json.loads, (HERE / "data" / "corpus.jsonl").read_text().splitlines())]
    t0 = time.perf_counter()
    with HybridRetriever(path=STORE, model="sentence-transformers/all-MiniLM-L6-v2") as r:
        r.add_documents(docs)
        s = r.last_add_stats
        print(f"store {STORE}: {r.count()} documents "
              f"({s['written']} encoded and written, {s['unchanged']} unchanged) "
              f"in {time.perf_counter() - t0:.1f} s\n")
        for query, where in QUERIES:
            t = time.perf_counter()
            hits = r.search(query, k=3, where=where)
            ms = (time.perf_counter() - t) * 1000
            print(f"query: {query!r}" + (f"  where={where}" if where else "") + f"  ({ms:.0f} ms)")
            for i, h in enumerate(hits, 1):
                dense = f"#{h.ranks['dense']}" if "dense" in h.ranks else "-"
                sparse = f"#{h.ranks['sparse']}" if "sparse" in h.ranks else "-"
                rerank = f"  rerank #{h.ranks['rerank']}" if "rerank" in h.ranks else ""
                print(f"  {i}. {h.id:<16} fused={h.scores['fused']:.4f}  "
                      f"dense {dense:<4} bm25 {sparse:<4}{rerank}")
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
