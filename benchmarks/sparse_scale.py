"""The BM25 side alone at 100k, 300k and 1M records, and embedded Chroma beside it.

Where does "embedded Chroma + our tantivy BM25 in one process" stop? This measures the
sparse side (`SparseIndex`) on its own, the way the writer feeds it, at sizes past the 100k
of scale.py, and optionally raw embedded Chroma at one size with the store's HNSW settings.

Corpus: the five shared collections chunked once with the real chunker (the bundled model's
tokenizer, default `ChunkConfig`: 25,193 records from 21,124 passages), then replicas of
those records under new document ids (``<collection>:<id>:r<n>``, chunk ids follow) until
the target count of *records*. Unlike scale.py, replica n > 0 is perturbed so that it is not
an exact copy: it drops one word in ten (positions depend on n and the record) and rewrites
one word in fifty into a replica-specific form (``<word>q<n>``). Exact copies would give 40
equal BM25 scores per passage at 1M (every top 50 a tie) and a vocabulary frozen at 25k
records; the perturbation keeps scores distinct and lets the vocabulary grow with the
corpus. Metadata per record: ``collection``, ``replica``, ``tenant`` (document number mod
100) and the reserved keys the writer stores (the BM25 index skips those).

Sparse side, per size, each step in its own process (so peak RSS is its own):
- build "batched": ``replace(parents, records)`` + ``commit`` per batch of whole documents
  of at most ``--batch`` records (2,048), as a writer that adds documents in batches does
  (replace deletes every batch's parents first, as the follower does);
- build "single": the same ``replace`` calls, one ``commit`` at the end;
- reopen (of each build): ``SparseIndex(directory)`` in a fresh process, RSS after open,
  first query, then k=50 queries: short (1-4 terms after our tokenizer) and long (>= 10
  terms) query texts of the collections' query sets, each without a filter, with
  ``where={"collection": "cacm"}`` (~13% of records) and ``where={"tenant": 7}`` (1%),
  compiled into the index (``SparseIndex.compile``) as the searcher does.

Chroma (``--chroma N``): a PersistentClient collection with the store's configuration
(cosine, M=32, ef 200/200), N of the same records with random 384-d unit vectors, texts and
metadata, upserted in batches of Chroma's max batch size; then in a fresh process: open +
first query, k=50 queries (ids and distances, as the store asks), RSS, disk.

Usage: python benchmarks/sparse_scale.py [--records 100000,300000,1000000] [--chroma 300000]
Scratch data goes to a temporary folder (``--workdir``), removed at the end. Writes
benchmarks/results/<--name>.json after every step and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

DIM = 384
K = 50
FILTERS = {"none": None, "cacm": {"collection": "cacm"}, "tenant": {"tenant": 7}}
SHORT_MAX, LONG_MIN = 4, 10  # query terms after our tokenizer


# -- the corpus --------------------------------------------------------------------------

def prepare(workdir: Path, n_queries: int) -> dict[str, Any]:
    """Chunk the five collections once (the real chunker) and pick the queries; written to
    `workdir` so that the measuring processes load no model."""
    from scale import random_embedder

    from retrievekit.chunking import ChunkConfig
    from retrievekit.tokenize import Tokenizer
    from retrievekit.types import Document
    from retrievekit.writer import document_records

    docs, queries = [], []
    for name in C.COLLECTIONS:
        ds = C.load_collection(name)
        docs += [Document(text=t, id=f"{name}:{i}", metadata={"collection": name})
                 for i, t in C.collection_texts(ds)]
        queries += list(ds.queries.values())
    by_doc = document_records(docs, random_embedder(seed=1), ChunkConfig())
    base = [[r.id, r.parent, r.text, r.metadata["collection"]]
            for recs in by_doc.values() for r in recs]
    tok = Tokenizer()
    lengths = [len(tok(q)) for q in queries]
    rng = np.random.default_rng(0)

    def pick(cands: list[str]) -> list[str]:
        idx = rng.choice(len(cands), size=min(n_queries, len(cands)), replace=False)
        return [cands[i] for i in sorted(idx)]

    sets = {"short": pick([q for q, n in zip(queries, lengths) if 1 <= n <= SHORT_MAX]),
            "long": pick([q for q, n in zip(queries, lengths) if n >= LONG_MIN])}
    (workdir / "base.json").write_text(json.dumps(base))
    (workdir / "queries.json").write_text(json.dumps(sets))
    return {"base_passages": len(docs), "base_records": len(base),
            "queries": {k: len(v) for k, v in sets.items()},
            "query_terms_median": {k: statistics.median(len(tok(q)) for q in v)
                                   for k, v in sets.items()}}


def _perturb(text: str, n: int, j: int) -> str:
    words = text.split()
    out = []
    for i, w in enumerate(words):
        if (i + 7 * n + j) % 10 == 0:
            continue  # one word in ten dropped
        out.append(f"{w}q{n}" if (3 * i + n + j) % 50 == 0 else w)
    return " ".join(out)


def documents(workdir: Path, target: int) -> Iterator[list[Any]]:
    """Yield each document's records (retrievekit Records with the writer's metadata) until
    `target` records; a document is never cut short."""
    from retrievekit.records import CHUNK_KEY, HASH_KEY, PARENT_KEY, SEQ_KEY, Record, \
        chunk_position, content_hash

    base = json.loads((workdir / "base.json").read_text())
    made, replica, doc_no = 0, 0, -1
    while True:
        current, group = None, []
        for j, (rid, parent, text, coll) in enumerate(base):
            if parent != current:
                if group:
                    yield group
                    made += len(group)
                    if made >= target:
                        return
                current, group, doc_no = parent, [], doc_no + 1
            if replica:
                new_parent = f"{parent}:r{replica}"
                rid = new_parent + rid[len(parent):]
                parent, text = new_parent, _perturb(text, replica, j)
            meta = {"collection": coll, "replica": replica, "tenant": doc_no % 100}
            meta.update({PARENT_KEY: parent, CHUNK_KEY: chunk_position(rid),
                         HASH_KEY: content_hash(text, meta), SEQ_KEY: 1})
            group.append(Record(rid, parent, text, meta))
        if group:
            yield group
            made += len(group)
            if made >= target:
                return
        replica += 1


def batches(workdir: Path, target: int, size: int) -> Iterator[list[Any]]:
    """Batches of whole documents, at most `size` records each (as writer batches are)."""
    batch: list[Any] = []
    for group in documents(workdir, target):
        if batch and len(batch) + len(group) > size:
            yield batch
            batch = []
        batch += group
    if batch:
        yield batch


# -- measuring -----------------------------------------------------------------------------

def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":")) / 1024


def _rss() -> dict[str, float]:
    return {"rss": _status_mb("VmRSS"), "anon": _status_mb("RssAnon"),
            "file": _status_mb("RssFile")}


def _peak_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries a parent's peak into
    ru_maxrss across fork + exec, so a child of a process that loaded a model reports that."""
    return _status_mb("VmHWM")


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def _ms(seconds: Sequence[float]) -> dict[str, float]:
    a = np.asarray(seconds) * 1000
    return {"p50": round(float(np.percentile(a, 50)), 2),
            "p95": round(float(np.percentile(a, 95)), 2),
            "p99": round(float(np.percentile(a, 99)), 2), "max": round(float(a.max()), 2),
            "mean": round(float(a.mean()), 2), "n": int(a.size)}


def child_build(workdir: Path, target: int, mode: str, batch: int, out: dict) -> None:
    from retrievekit.sparse import SparseIndex

    directory = workdir / f"sparse-{target}-{mode}"
    shutil.rmtree(directory, ignore_errors=True)
    ix = SparseIndex(directory=directory)
    ix.tokenizer("warm up the stemmer")
    out["base_rss_mb"] = _rss()["rss"]
    spent_index = spent_commit = 0.0
    records = n_batches = 0
    started = time.perf_counter()
    curve = []
    for b in batches(workdir, target, batch):
        t = time.perf_counter()
        ix.replace(list(dict.fromkeys(r.parent for r in b)), b)
        spent_index += time.perf_counter() - t
        records += len(b)
        n_batches += 1
        if mode == "batched":
            t = time.perf_counter()
            ix.commit(n_batches)
            spent_commit += time.perf_counter() - t
        if records // 100_000 != (records - len(b)) // 100_000:
            curve.append([records, round(time.perf_counter() - started, 1),
                          round(_rss()["rss"], 1)])
            out.update(curve=curve, records_so_far=records)
            _checkpoint(out)
    if mode == "single":
        t = time.perf_counter()
        ix.commit(n_batches)
        spent_commit += time.perf_counter() - t
    wall = time.perf_counter() - started
    out.update(records=len(ix), batches=n_batches, wall_s=round(wall, 1),
               replace_s=round(spent_index, 1), commit_s=round(spent_commit, 1),
               generate_s=round(wall - spent_index - spent_commit, 1),
               build_s=round(spent_index + spent_commit, 1),
               segments_after_build=int(ix._view.searcher.num_segments),
               rss_after_build_mb=_rss())
    t = time.perf_counter()
    ix.close()
    out["close_s"] = round(time.perf_counter() - t, 2)
    out["disk_mb"] = round(dir_mb(directory), 1)
    out["peak_rss_mb"] = _peak_mb()
    out["peak_minus_base_mb"] = round(out["peak_rss_mb"] - out["base_rss_mb"], 1)


class _CountingSearcher:
    """Delegates to a tantivy Searcher, counting searches past k + 16 hits (the full
    tie-break fetch of `SparseIndex.search`)."""

    def __init__(self, inner: Any) -> None:
        self._inner, self.tie_fetches = inner, 0

    def search(self, query: Any, limit: int = 10, **kw: Any) -> Any:
        if limit > K + 16 and kw.get("count") is False:
            self.tie_fetches += 1
        return self._inner.search(query, limit, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def child_reopen(workdir: Path, target: int, mode: str, out: dict) -> None:
    import tantivy  # noqa: F401  (imports are not the index's memory)

    from retrievekit.sparse import SparseIndex
    from retrievekit.tokenize import Tokenizer

    directory = workdir / f"sparse-{target}-{mode}"
    sets = json.loads((workdir / "queries.json").read_text())
    Tokenizer()("warm up the stemmer")
    before = _rss()
    t = time.perf_counter()
    ix = SparseIndex(directory=directory)
    out["open_ms"] = round(1000 * (time.perf_counter() - t), 1)
    after_open = _rss()
    q0 = sets["short"][0]
    t = time.perf_counter()
    ix.search(q0, K)
    out["first_query_ms"] = round(1000 * (time.perf_counter() - t), 1)
    out["records"] = len(ix)
    out["segments"] = int(ix._view.searcher.num_segments)
    out["rss_open_mb"] = {k: round(after_open[k] - before[k], 1) for k in before}
    counting = _CountingSearcher(ix._view.searcher)
    ix._view.searcher = counting
    compiled = {name: (ix.compile(w) if w else None) for name, w in FILTERS.items()}
    out["filter_share"] = {name: (round(ix.count(q) / len(ix), 4) if q is not None else 1.0)
                           for name, q in compiled.items()}
    lat: dict[str, Any] = {}
    for kind, queries in sets.items():
        for name, matching in compiled.items():
            for q in queries[:5]:  # warm-up, not timed
                ix.search(q, K, matching=matching)
            counting.tie_fetches = 0
            spent, tied = [], []
            for q in queries:
                before_q = counting.tie_fetches
                t = time.perf_counter()
                ix.search(q, K, matching=matching)
                spent.append(time.perf_counter() - t)
                if counting.tie_fetches > before_q:
                    tied.append(spent[-1])
            lat[f"{kind}/{name}"] = {**_ms(spent), "tie_fetches": counting.tie_fetches}
            if tied:  # the queries whose k-th score tied past k + 16 hits
                lat[f"{kind}/{name}"]["tied_ms"] = _ms(tied)
                lat[f"{kind}/{name}"]["untied_ms"] = _ms([x for x in spent if x not in tied])
            out["latency_ms"] = lat
            _checkpoint(out)
    after = _rss()
    out["rss_queries_mb"] = {k: round(after[k] - before[k], 1) for k in before}
    out["kb_per_record_resident"] = round(out["rss_queries_mb"]["rss"] * 1024 / len(ix), 3)
    out["kb_per_record_anon"] = round(out["rss_queries_mb"]["anon"] * 1024 / len(ix), 3)
    out["disk_mb"] = round(dir_mb(directory), 1)
    out["kb_per_record_disk"] = round(out["disk_mb"] * 1024 / len(ix), 3)
    ix.close()


def _chroma_client(path: Path):
    import chromadb
    from chromadb.config import Settings

    return chromadb.PersistentClient(path=str(path),
                                     settings=Settings(anonymized_telemetry=False))


CHROMA_CONFIG = {"hnsw": {"space": "cosine", "max_neighbors": 32, "ef_construction": 200,
                          "ef_search": 200}}  # StoreConfig's defaults, as store.py sets them


def child_chroma_build(workdir: Path, target: int, out: dict) -> None:
    import chromadb  # noqa: F401

    path = workdir / f"chroma-{target}"
    shutil.rmtree(path, ignore_errors=True)
    out["base_rss_mb"] = _rss()["rss"]
    client = _chroma_client(path)
    col = client.get_or_create_collection("bench", configuration=CHROMA_CONFIG,
                                          embedding_function=None)
    step = int(client.get_max_batch_size())
    out["chroma_batch"] = step
    rng = np.random.default_rng(1)
    started = time.perf_counter()
    spent = 0.0
    records, curve = 0, []
    for b in batches(workdir, target, step):
        vecs = C.random_unit(rng, len(b), DIM)
        t = time.perf_counter()
        col.upsert(ids=[r.id for r in b], embeddings=vecs, documents=[r.text for r in b],
                   metadatas=[dict(r.metadata) for r in b])
        spent += time.perf_counter() - t
        records += len(b)
        if records // 50_000 != (records - len(b)) // 50_000:
            curve.append([records, round(spent, 1), round(_rss()["rss"], 1)])
            out.update(curve=curve, records_so_far=records, add_s_so_far=round(spent, 1))
            out["peak_rss_mb"] = _peak_mb()
            _checkpoint(out)
    out.update(records=col.count(), add_s=round(spent, 1),
               wall_s=round(time.perf_counter() - started, 1), rss_after_add_mb=_rss())
    qrng = np.random.default_rng(2)
    qv = C.random_unit(qrng, 200, DIM)
    for v in qv[:5]:
        col.query(query_embeddings=[v], n_results=K, include=["distances"])
    spent_q = []
    for v in qv:
        t = time.perf_counter()
        col.query(query_embeddings=[v], n_results=K, include=["distances"])
        spent_q.append(time.perf_counter() - t)
    out["latency_ms"] = _ms(spent_q)
    out["peak_rss_mb"] = _peak_mb()
    out["peak_minus_base_mb"] = round(out["peak_rss_mb"] - out["base_rss_mb"], 1)
    del col, client


def child_chroma_reopen(workdir: Path, target: int, out: dict) -> None:
    import chromadb  # noqa: F401  (imported before the clock, as in writes.py)

    path = workdir / f"chroma-{target}"
    before = _rss()
    qv = C.random_unit(np.random.default_rng(3), 200, DIM)
    t = time.perf_counter()
    col = _chroma_client(path).get_collection("bench", embedding_function=None)
    out["open_ms"] = round(1000 * (time.perf_counter() - t), 1)
    t = time.perf_counter()
    col.query(query_embeddings=[qv[0]], n_results=K, include=["distances"])
    out["first_query_ms"] = round(1000 * (time.perf_counter() - t), 1)
    spent = []
    for v in qv[1:]:
        t = time.perf_counter()
        col.query(query_embeddings=[v], n_results=K, include=["distances"])
        spent.append(time.perf_counter() - t)
    out["latency_ms"] = _ms(spent)
    after = _rss()
    out["rss_queries_mb"] = {k: round(after[k] - before[k], 1) for k in before}
    out["records"] = col.count()
    out["kb_per_record_resident"] = round(out["rss_queries_mb"]["rss"] * 1024 / out["records"], 3)
    out["disk_mb"] = round(dir_mb(path), 1)
    out["kb_per_record_disk"] = round(out["disk_mb"] * 1024 / out["records"], 3)
    out["peak_rss_mb"] = _peak_mb()


_RESULT_FILE: Path | None = None


def _checkpoint(out: dict) -> None:
    if _RESULT_FILE is not None:
        _RESULT_FILE.write_text(json.dumps(out, indent=2))


# -- the driver ------------------------------------------------------------------------------

def _run(step: str, workdir: Path, target: int, args: argparse.Namespace, mode: str = ""
         ) -> dict[str, Any]:
    result = workdir / f"{step}-{target}-{mode}.json"
    cmd = [sys.executable, __file__, "--child", step, "--workdir", str(workdir),
           "--target", str(target), "--mode", mode or "-", "--batch", str(args.batch),
           "--result", str(result)]
    print(f"[{time.strftime('%H:%M:%S')}] {step} {target} {mode} ...", file=sys.stderr,
          flush=True)
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(cmd, timeout=args.timeout, capture_output=True, text=True, env=env)
    except subprocess.TimeoutExpired:
        data = json.loads(result.read_text()) if result.exists() else {}
        return {**data, "timed_out": f"after {args.timeout:.0f}s"}
    if proc.returncode != 0 or not result.exists():
        return {"error": proc.stderr[-3000:]}
    data = json.loads(result.read_text())
    data["process_wall_s"] = round(time.perf_counter() - start, 1)
    print(f"    done in {data['process_wall_s']:.0f}s", file=sys.stderr, flush=True)
    return data


def table(results: dict[str, Any]) -> str:
    head = ["records", "build", "build s (replace + commit)", "commit s", "peak - base MiB",
            "disk MiB", "disk KB/record", "segments", "open ms", "RSS after open MiB",
            "RSS after queries MiB (anon)", "KB/record resident"]
    for kind in ("short", "long"):
        for f in FILTERS:
            head.append(f"{kind} {f} p50/p95 ms")
    rows = []
    for size, modes in results["sparse"].items():
        for mode, d in modes.items():
            b, r = d.get("build", {}), d.get("reopen", {})
            lat = r.get("latency_ms", {})
            row = [b.get("records", size), mode, b.get("build_s"), b.get("commit_s"),
                   b.get("peak_minus_base_mb"), r.get("disk_mb", b.get("disk_mb")),
                   r.get("kb_per_record_disk"), r.get("segments"), r.get("open_ms"),
                   (r.get("rss_open_mb") or {}).get("rss"),
                   f"{(r.get('rss_queries_mb') or {}).get('rss')} "
                   f"({(r.get('rss_queries_mb') or {}).get('anon')})",
                   r.get("kb_per_record_resident")]
            for kind in ("short", "long"):
                for f in FILTERS:
                    v = lat.get(f"{kind}/{f}")
                    row.append(f"{v['p50']:.2f} / {v['p95']:.2f}" if v else None)
            rows.append(row)
    return C.md_table(head, rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", default="100000,300000,1000000")
    ap.add_argument("--modes", default="batched,single")
    ap.add_argument("--batch", type=int, default=2048, help="records per writer batch")
    ap.add_argument("--queries", type=int, default=200, help="queries per kind")
    ap.add_argument("--chroma", type=int, default=0, help="records for the Chroma run (0: none)")
    ap.add_argument("--name", default="sparse-scale")
    ap.add_argument("--timeout", type=float, default=3000, help="seconds per process")
    ap.add_argument("--workdir", help="scratch folder (default: a new one under the temp dir)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--target", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        global _RESULT_FILE
        _RESULT_FILE = Path(args.result)
        out: dict[str, Any] = {}
        wd, n, mode = Path(args.workdir), args.target, args.mode
        {"build": lambda: child_build(wd, n, mode, args.batch, out),
         "reopen": lambda: child_reopen(wd, n, mode, out),
         "chroma-build": lambda: child_chroma_build(wd, n, out),
         "chroma-reopen": lambda: child_chroma_reopen(wd, n, out)}[args.child]()
        _checkpoint(out)
        return 0

    started = time.perf_counter()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rk-sparse-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "benchmark": "sparse-scale", "machine": C.machine_info(),
        "command": "python benchmarks/sparse_scale.py " + " ".join(argv or sys.argv[1:]),
        "k": K, "batch": args.batch, "filters": FILTERS, "sparse": {}, "chroma": {}}
    try:
        results["corpus"] = prepare(workdir, args.queries)
        for n in (int(x) for x in args.records.split(",")):
            for mode in args.modes.split(","):
                d = results["sparse"].setdefault(str(n), {}).setdefault(mode, {})
                d["build"] = _run("build", workdir, n, args, mode)
                C.write_results(args.name, results)
                if "build_s" in d["build"]:
                    d["reopen"] = _run("reopen", workdir, n, args, mode)
                shutil.rmtree(workdir / f"sparse-{n}-{mode}", ignore_errors=True)
                results["runtime_s"] = round(time.perf_counter() - started)
                C.write_results(args.name, results)
        if args.chroma:
            d = results["chroma"][str(args.chroma)] = {}
            d["build"] = _run("chroma-build", workdir, args.chroma, args)
            C.write_results(args.name, results)
            if "add_s" in d["build"]:
                d["reopen"] = _run("chroma-reopen", workdir, args.chroma, args)
            results["runtime_s"] = round(time.perf_counter() - started)
            C.write_results(args.name, results)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(table(results))
    print(f"\nwrote {C.RESULTS_DIR / (args.name + '.json')} in "
          f"{time.perf_counter() - started:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
