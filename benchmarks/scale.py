"""Hybrid search at 100k documents: retrievekit against the LangChain and LlamaIndex recipes.

Corpus: the union of the five shared collections (nfcorpus, cranfield, cisi, cacm, npl;
21,124 non-blank passages, ids prefixed with the collection name), then replicas of that
union under new ids (``<collection>:<id>:r<n>``) until 100,000 documents. Every document has
the metadata ``{"collection": <name>, "replica": <n>}``.

Vectors: random unit vectors (384-d float32, the shape of all-MiniLM-L6-v2's), because
encoding 100k passages on this 2-core machine takes hours. Every system gets fresh vectors
from the same seeded stream; query vectors are random too and precomputed, so all latencies
here exclude query encoding. BM25 runs on the real texts. Quality is not measured here
(random vectors); see peers.py for quality.

LlamaIndex runs two ways: ``llamaindex`` is handed one TextNode per document, unsplit (a
real model reads only the first 256 tokens of each); ``llamaindex-chunked`` splits them first
with its default node parser (SentenceSplitter) at the window ours chunks to, the same job as
ours, and its build time includes the split.

Each system runs in its own subprocess (so ``ru_maxrss`` is its own peak): build, then
per-query latency without and with a ``where={"collection": "cacm"}`` filter (~15% of the
corpus), then a second subprocess reopens the persisted index and runs the first query.
Every subprocess loads the embedding model first, as a deployment that encodes queries
would; "peak - base" is the peak RSS minus the RSS after imports, model and corpus load.

Usage: ``python benchmarks/scale.py [--docs 100000] [--systems ours,llamaindex,langchain]
[--keep DIR]``
Writes benchmarks/results/scale.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

DIM = 384
_RESULT_FILE: Path | None = None  # set in a child: where it writes (and checkpoints) its result
FILTER = {"collection": "cacm"}
#: a selective filter, ~1.5% of the documents (the ~1% target of issue 14)
FILTER_SELECTIVE = {"$and": [{"collection": "cisi"}, {"replica": 0}]}
SYSTEMS = ("ours", "llamaindex", "llamaindex-chunked", "langchain", "ours-hnsw16", "ours-m32",
           "ours-efc100", "ours-local")
DEFAULT_SYSTEMS = ("ours", "llamaindex", "langchain")
#: Chroma's own HNSW defaults (what both peers get), for an apples-to-apples variant of ours
CHROMA_DEFAULT_HNSW = {"hnsw_m": 16, "hnsw_ef_construction": 100, "hnsw_ef_search": 100}
#: retrievekit's HNSW default before 2026-12-03 (M=32, ef 200/200), beside the current one
FORMER_HNSW = {"hnsw_m": 32, "hnsw_ef_construction": 200, "hnsw_ef_search": 200}
#: the cheaper build measured against today's default (M=16, ef 200/300)
EFC100_HNSW = {"hnsw_m": 16, "hnsw_ef_construction": 100, "hnsw_ef_search": 400}
#: what each variant of ours changes in the default config
OURS = {"ours": {}, "ours-hnsw16": {"store": CHROMA_DEFAULT_HNSW},
        "ours-m32": {"store": FORMER_HNSW}, "ours-efc100": {"store": EFC100_HNSW},
        "ours-local": {"local_vectors": True}}  # ours-local: the dense side in this process


# -- the corpus --------------------------------------------------------------------------

def build_corpus(target: int) -> tuple[list[tuple[str, str, dict[str, Any]]], list[str]]:
    """(id, text, metadata) for `target` documents, and the judged query texts of all sets."""
    base: list[tuple[str, str, str]] = []
    queries: list[str] = []
    for name in C.COLLECTIONS:
        ds = C.load_collection(name)
        base += [(name, i, t) for i, t in C.collection_texts(ds)]
        queries += list(ds.queries.values())
    items = []
    replica = 0
    while len(items) < target:
        for name, i, t in base:
            if len(items) == target:
                break
            doc_id = f"{name}:{i}" if replica == 0 else f"{name}:{i}:r{replica}"
            items.append((doc_id, t, {"collection": name, "replica": replica}))
        replica += 1
    return items, queries


def sample_queries(queries: list[str], n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(queries), size=min(n, len(queries)), replace=False)
    return [queries[i] for i in sorted(idx)]


def random_embedder(seed: int):
    """The real embedder (model, tokenizer, identity) handing out random unit vectors."""
    from retrievekit.embedding import Embedder

    class RandomEmbedder(Embedder):
        def __init__(self) -> None:
            super().__init__()
            self._rng = np.random.default_rng(seed)

        def embed_documents(self, texts: Sequence[str], *, progress: bool | None = None
                            ) -> np.ndarray:
            return C.random_unit(self._rng, len(list(texts)), DIM)

        def embed_queries(self, queries: Sequence[str], *, progress: bool | None = None
                          ) -> np.ndarray:
            return C.random_unit(self._rng, len(list(queries)), DIM)

        def embed_query(self, query: str) -> np.ndarray:
            return C.random_unit(self._rng, 1, DIM)[0]

    return RandomEmbedder()


# -- one system in one process ---------------------------------------------------------------

def _child(system: str, phase: str, workdir: Path, docs: int, n_queries: int) -> dict[str, Any]:
    C.setup_torch(1)
    started = time.perf_counter()
    from retrievekit.embedding import Embedder

    model_holder = random_embedder(seed=1) if system.startswith("ours") else Embedder()
    model_holder.model  # what a deployment that encodes queries keeps in memory
    items, all_queries = build_corpus(docs)
    queries = sample_queries(all_queries, n_queries)
    qrng = np.random.default_rng(2)
    qvecs = dict(zip(queries, C.random_unit(qrng, len(queries), DIM)))
    out: dict[str, Any] = {"system": system, "phase": phase, "docs": len(items),
                           "queries": len(queries), "base_rss_mb": C.rss_mb(),
                           "setup_s": time.perf_counter() - started}
    runner = _ours if system in OURS else _langchain if system == "langchain" else _llama
    runner(phase, workdir, items, queries, qvecs, model_holder, out)
    _checkpoint(out)
    return out


def _checkpoint(out: dict[str, Any]) -> None:
    """Record the peak so far and write what is measured, so a timeout keeps the rest."""
    out["peak_rss_mb"] = C.peak_rss_mb()
    out["peak_minus_base_mb"] = out["peak_rss_mb"] - out["base_rss_mb"]
    if _RESULT_FILE is not None:
        _RESULT_FILE.write_text(json.dumps(out, indent=2))


def _ours(phase, workdir, items, queries, qvecs, embedder, out) -> None:
    from retrievekit.config import RetrieverConfig
    from retrievekit.pipeline import HybridRetriever
    from retrievekit.types import Document

    system = out["system"]
    path = str(workdir / system)
    config = RetrieverConfig().replace(**OURS[system])
    out["hnsw"] = {k: getattr(config.store, k) for k in CHROMA_DEFAULT_HNSW}
    if phase == "build":
        docs = [Document(text=t, id=i, metadata=m) for i, t, m in items]
        r = HybridRetriever(config, path=path, embedder=embedder)
        with C.Timer() as t:
            r.add_documents(docs, progress=False)
        out["add_documents_s"] = t.seconds
        out["build_s"] = t.seconds  # BM25 included: it is committed by add_documents
        out["records"] = r.count()
        del docs
        _checkpoint(out)
        out["latency_ms"] = C.time_queries(
            lambda q: r.search(q, k=10, query_vector=qvecs[q]), queries)
        _checkpoint(out)
        for key, where in (("filter", FILTER), ("filter_selective", FILTER_SELECTIVE)):
            def run(q, where=where):
                return r.search(q, k=10, where=where, query_vector=qvecs[q])

            # a filter's first two queries apart: the second reads the records it matches
            # and their vectors (subsets.py); time_queries' warm-up would hide them
            out[f"first_two_{key}_ms"] = [_ms(run, q) for q in queries[-2:]]
            out[f"latency_{key}_ms"] = C.time_queries(run, queries)
            _checkpoint(out)
        sample = queries[:50]
        out["profile"] = {
            "search": _profile(lambda: [r.search(q, k=10, query_vector=qvecs[q])
                                        for q in sample], len(sample)),
            "search_where": _profile(lambda: [r.search(q, k=10, where=FILTER,
                                                       query_vector=qvecs[q])
                                              for q in sample], len(sample))}
        r.close()
    else:
        q0 = queries[0]
        with C.Timer() as t:
            r = HybridRetriever(config, path=path, embedder=embedder)
        out["open_s"] = t.seconds
        with C.Timer() as t2:
            r.search(q0, k=10, query_vector=qvecs[q0])
        out["first_query_s"] = t2.seconds
        out["reopen_s"] = t.seconds + t2.seconds
        out["latency_ms"] = C.time_queries(
            lambda q: r.search(q, k=10, query_vector=qvecs[q]), queries[:50])
        r.close()


def _ms(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return 1000 * (time.perf_counter() - start)


def _profile(fn, n_queries: int, top: int = 10) -> list[dict[str, Any]]:
    """cProfile `fn` and return the functions with the most own time, in ms per query."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"function": f"{Path(file).name}:{line}({name})", "calls": calls,
             "own_ms_per_query": own * 1000 / n_queries,
             "cum_ms_per_query": cum * 1000 / n_queries}
            for (file, line, name), (_, calls, own, cum, _) in rows]


def _chroma_client(path: Path):
    import chromadb
    from chromadb.config import Settings

    return chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))


def _langchain(phase, workdir, items, queries, qvecs, _model, out) -> None:
    source = C.random_source(DIM, seed=1)
    source.precomputed = qvecs
    if phase == "build":
        docs = C.langchain_documents(items)
        stack, timings = C.build_langchain(docs, source, _chroma_client(workdir / "langchain"),
                                           "langchain-bench", tokenizers=("split",))
        out["build_parts_s"] = timings
        out["build_s"] = timings["vector_s"] + timings["bm25_split_s"]
        _checkpoint(out)
        plain = stack.ensemble(10)
        out["latency_ms"] = C.time_queries(plain.invoke, queries)
        _checkpoint(out)
        filtered = stack.ensemble(10, where=FILTER)
        out["latency_filter_ms"] = C.time_queries(filtered.invoke, queries)
        out["filter_note"] = ("BM25Retriever has no metadata filter: only the Chroma side is "
                              "filtered, so BM25 hits outside the filter are returned")
    else:
        from langchain_chroma import Chroma
        from langchain_classic.retrievers import EnsembleRetriever
        from langchain_community.retrievers import BM25Retriever
        from langchain_core.documents import Document

        q0 = queries[0]
        with C.Timer() as t:
            vs = Chroma(client=_chroma_client(workdir / "langchain"),
                        collection_name="langchain-bench",
                        embedding_function=C.langchain_embeddings(source))
            # BM25Retriever keeps nothing on disk: rebuild it from the stored texts, read in
            # pages (one get of 100k ids exceeds SQLite's variable limit inside Chroma)
            docs = []
            for offset in range(0, vs._collection.count(), 5000):
                got = vs.get(include=["documents", "metadatas"], limit=5000, offset=offset)
                docs += [Document(page_content=d, metadata=m, id=i)
                         for i, d, m in zip(got["ids"], got["documents"], got["metadatas"])]
            bm25 = BM25Retriever.from_documents(docs, k=10)
            ens = EnsembleRetriever(
                retrievers=[bm25, vs.as_retriever(search_kwargs={"k": 10})], weights=[0.5, 0.5])
        out["open_s"] = t.seconds
        with C.Timer() as t2:
            ens.invoke(q0)
        out["first_query_s"] = t2.seconds
        out["reopen_s"] = t.seconds + t2.seconds
        out["latency_ms"] = C.time_queries(ens.invoke, queries[:50])


def _llama(phase, workdir, items, queries, qvecs, model, out) -> None:
    """LlamaIndex's recipe: `llamaindex` is handed one TextNode per document (no splitter);
    `llamaindex-chunked` splits the documents with its default node parser, SentenceSplitter,
    at the window ours chunks to (the model's tokens, 32 overlapping), timed in the build:
    the same job as ours, which chunks every text longer than the model reads."""
    source = C.random_source(DIM, seed=1)
    source.precomputed = qvecs
    name = out["system"]
    bm25_dir, chroma_dir = workdir / f"{name}-bm25", workdir / name
    if phase == "build":
        # made outside the timer, as ours' Documents are; only the split is timed
        nodes = C.llama_nodes(items) if name == "llamaindex" else _llama_documents(items)
        with C.Timer() as t:
            if name != "llamaindex":
                nodes = _llama_split(nodes, model)
        stack, timings = C.build_llama(nodes, source, _chroma_client(chroma_dir), "llama-bench")
        timings["split_s"] = t.seconds
        out["records"] = len(nodes)
        with C.Timer() as t:
            stack.bm25.persist(str(bm25_dir))
        timings["bm25_persist_s"] = t.seconds
        out["build_parts_s"] = timings
        out["build_s"] = sum(timings[k] for k in ("split_s", "vector_s", "bm25_s",
                                                  "bm25_persist_s"))
        del nodes
        _checkpoint(out)
        plain = stack.fusion(10)
        out["latency_ms"] = C.time_queries(plain.retrieve, queries)
        _checkpoint(out)
        with C.Timer() as t:
            filtered = stack.fusion(10, where=FILTER)
        out["filter_setup_s"] = t.seconds
        out["latency_filter_ms"] = C.time_queries(filtered.retrieve, queries)
        _checkpoint(out)
        with C.Timer() as t:
            filtered = stack.fusion(10, where=FILTER_SELECTIVE)
        out["filter_selective_setup_s"] = t.seconds
        out["latency_filter_selective_ms"] = C.time_queries(filtered.retrieve, queries)
        out["filter_note"] = ("BM25Retriever(filters=...) builds its weight mask once per "
                              "filter (filter_setup_s), not per query")
    else:
        from llama_index.core import VectorStoreIndex
        from llama_index.core.llms import MockLLM
        from llama_index.core.retrievers import QueryFusionRetriever
        from llama_index.retrievers.bm25 import BM25Retriever
        from llama_index.vector_stores.chroma import ChromaVectorStore

        q0 = queries[0]
        with C.Timer() as t:
            client = _chroma_client(chroma_dir)
            store = ChromaVectorStore(chroma_collection=client.get_collection("llama-bench"))
            index = VectorStoreIndex.from_vector_store(store, embed_model=C.llama_embedding(source))
            bm25 = BM25Retriever.from_persist_dir(str(bm25_dir))
            bm25.similarity_top_k = 10
            fusion = QueryFusionRetriever([index.as_retriever(similarity_top_k=10), bm25],
                                          llm=MockLLM(), mode="reciprocal_rerank",
                                          similarity_top_k=10, num_queries=1)
        out["open_s"] = t.seconds
        with C.Timer() as t2:
            fusion.retrieve(q0)
        out["first_query_s"] = t2.seconds
        out["reopen_s"] = t.seconds + t2.seconds
        out["latency_ms"] = C.time_queries(fusion.retrieve, queries[:50])


def _llama_documents(items) -> list[Any]:
    from llama_index.core import Document

    return [Document(text=t, id_=i, metadata=dict(m), excluded_embed_metadata_keys=list(m),
                     excluded_llm_metadata_keys=list(m)) for i, t, m in items]


def _llama_split(docs, model) -> list[Any]:
    from llama_index.core.node_parser import SentenceSplitter

    from retrievekit.config import ChunkConfig
    from retrievekit.writer import chunk_window

    window, overlap = chunk_window(model, ChunkConfig())
    tokenizer = model.tokenizer
    splitter = SentenceSplitter(chunk_size=window, chunk_overlap=overlap,
                                tokenizer=lambda text: tokenizer.encode(
                                    text, add_special_tokens=False, verbose=False))
    return splitter.get_nodes_from_documents(docs)


# -- the driver ------------------------------------------------------------------------------

def _run_child(system: str, phase: str, workdir: Path, args: argparse.Namespace,
               timeout: float) -> dict[str, Any]:
    result = workdir / f"{system}-{phase}.json"
    cmd = [sys.executable, __file__, "--child", system, "--phase", phase,
           "--workdir", str(workdir), "--docs", str(args.docs), "--queries", str(args.queries),
           "--result", str(result)]
    print(f"[{time.strftime('%H:%M:%S')}] {system} {phase} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        note = f"timed out after {timeout:.0f}s"
        if result.exists():  # what the child measured before the timeout
            return {**json.loads(result.read_text()), "timed_out": note}
        return {"system": system, "phase": phase, "error": note}
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not result.exists():
        return {"system": system, "phase": phase, "error": proc.stderr[-3000:]}
    data = json.loads(result.read_text())
    data["process_wall_s"] = wall
    print(f"    done in {wall:.0f}s", file=sys.stderr, flush=True)
    return data


def table(results: dict[str, Any]) -> str:
    runs = results["systems"]
    ours = runs.get("ours", {}).get("build", {})
    head = ["system", "build s", "records", "peak RSS MiB (build)", "peak - base MiB", "p50 ms",
            "p95 ms", "p50 ms (where)", "p95 ms (where)", "p50 ms (1.5% where)",
            "p95 ms (1.5% where)", "reopen s (open + 1st query)", "peak RSS MiB (reopen)",
            "p50 vs ours", "build vs ours"]
    rows = []
    for system, phases in runs.items():
        b, r = phases.get("build", {}), phases.get("reopen", {})
        if "error" in b:
            rows.append([system, "error"] + [None] * (len(head) - 2))
            continue
        lat, flt = b.get("latency_ms", {}), b.get("latency_filter_ms", {})
        sel = b.get("latency_filter_selective_ms", {})
        rows.append([system, b.get("build_s"), b.get("records", b.get("docs")),
                     b.get("peak_rss_mb"), b.get("peak_minus_base_mb"),
                     lat.get("p50"), lat.get("p95"), flt.get("p50"), flt.get("p95"),
                     sel.get("p50"), sel.get("p95"),
                     r.get("reopen_s"), r.get("peak_rss_mb"),
                     f"{lat['p50'] / ours['latency_ms']['p50']:.1f}x" if ours.get("latency_ms")
                     and lat else None,
                     f"{b['build_s'] / ours['build_s']:.2f}x" if ours.get("build_s") else None])
    return C.md_table(head, rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200, help="queries timed per pass")
    ap.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                    help=f"comma-separated, from {', '.join(SYSTEMS)}")
    ap.add_argument("--out", default="scale", help="results file name under benchmarks/results")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per subprocess")
    ap.add_argument("--keep", metavar="DIR",
                    help="build the stores in DIR and keep them (default: a temporary folder)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other systems already in the results file")
    ap.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--phase", choices=("build", "reopen"), default="build", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        global _RESULT_FILE
        _RESULT_FILE = Path(args.result)
        data = _child(args.child, args.phase, Path(args.workdir), args.docs, args.queries)
        Path(args.result).write_text(json.dumps(data, indent=2))
        return 0

    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "scale", "machine": C.machine_info(),
        "command": "python benchmarks/scale.py " + " ".join(argv or sys.argv[1:]),
        "corpus": f"union of {', '.join(C.COLLECTIONS)} plus replicas under new ids, "
                  f"{args.docs} documents; metadata collection/replica",
        "vectors": f"random unit vectors, {DIM}-d float32 (no model encoding)",
        "filter": FILTER, "filter_selective": FILTER_SELECTIVE, "k": 10, "systems": {}}
    previous = C.RESULTS_DIR / f"{args.out}.json"
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        results["systems"] = old.get("systems", {})
        results["earlier_runs"] = old.get("earlier_runs", []) + [
            {k: old.get(k) for k in ("command", "machine", "runtime_s")}]
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="rk-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.keep and any(workdir.iterdir()):
        ap.error(f"--keep {args.keep}: the folder must be empty (a build would reopen old stores)")
    try:
        for system in args.systems.split(","):
            runs = results["systems"][system] = {}
            runs["build"] = _run_child(system, "build", workdir, args, args.timeout)
            if "build_s" in runs["build"]:
                runs["reopen"] = _run_child(system, "reopen", workdir, args, args.timeout)
            for phase, data in runs.items():
                if "error" in data:
                    print(f"{system} {phase} failed:\n{data['error']}", file=sys.stderr)
            results["runtime_s"] = time.perf_counter() - started
            path = C.write_results(args.out, results)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(table(results))
    print(f"\nwrote {path} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
