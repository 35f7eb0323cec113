"""Inference speed and its quality guard: torch fp32 / torch bf16 / ONNX fp32 / ONNX int8 and
the default settings (backend="auto", dtype="auto").

Phases:
  speed    single-query encoding latency (p50/p95), indexing throughput (passages/s over a
           fixed set of nfcorpus passages), reranking 20 candidates (p50/p95) with a
           MiniLM-L6 cross-encoder (the architecture and size of
           cross-encoder/ms-marco-MiniLM-L-6-v2; built from the bundled MiniLM with a fresh
           head, since no trained cross-encoder is available offline: its timings are real,
           its scores are not meaningful, so only their deviation from fp32 is reported).
  crossover  ms per call by call size, ONNX fp32 vs torch bf16 (where "auto" switches).
  backends retrievekit's ONNX engine against sentence-transformers' own ONNX backend
           (`backend="onnx"`, optimum): export/reload time, passages/s and query latency
           (medians of interleaved rounds), agreement with torch fp32, int8 of both. Needs
           `optimum-onnx` next to sentence-transformers (see docs/benchmarks.md for the
           environment it ran in).
  quality  dense nDCG@10 of each setting on cranfield and nfcorpus (exact search, a
           document scores its best chunk; chunks made by the pipeline), its difference from
           torch fp32, and how far its vectors and top-10 lists move. The fp32 baseline's
           passage vectors come from the shared embedding cache (benchmarks/.cache) where
           present; every other setting encodes everything itself.

Every number comes with the 1-minute load average seen around it (the CPU is shared).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inference.py speed
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inference.py quality [--nfcorpus-docs N]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inference.py crossover
    HF_HUB_OFFLINE=1 python benchmarks/inference.py backends [--rounds 5] [--passages 320]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # optimum imports onnxruntime itself

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("RETRIEVEKIT_DATA", HERE.parent.parent / "shared" / "data"))
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"

#: name -> Embedder/Reranker settings. "default" is whatever the configs default to.
SETTINGS: dict[str, dict[str, Any]] = {
    "torch-fp32": {"backend": "torch", "dtype": "float32"},
    "torch-bf16": {"backend": "torch", "dtype": "bfloat16"},
    "onnx-fp32": {"backend": "onnx"},
    "onnx-int8": {"backend": "onnx", "onnx_quantize": "int8"},
    "default": {},
}


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def timed(fn: Callable[[Any], Any], items: Sequence[Any], warmup: int,
          cpu: list[float] | None = None) -> list[float]:
    """Wall seconds of `fn(item)` for each item (after `warmup` untimed calls); the process's
    CPU seconds per call go to `cpu` (on a busy machine: what the call costs, not what it
    waited)."""
    for item in items[:warmup]:
        fn(item)
    out = []
    for item in items:
        t0, c0 = time.perf_counter(), time.process_time()
        fn(item)
        out.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(time.process_time() - c0)
    return out


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    from retrievekit.inference import cpu_has_native_bf16, default_num_threads, physical_cores

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "physical_cores": physical_cores(), "native_bf16": cpu_has_native_bf16(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "torch_threads": torch.get_num_threads(), "default_threads": default_num_threads(),
            "python": platform.python_version()}


def save(name: str, payload: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": "benchmarks/inference.py " + " ".join(sys.argv[1:]),
               "machine": machine(), **payload}
    path = RESULTS / f"inference-{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"(wrote {path.relative_to(HERE.parent)})")


def chunk_texts(ds, embedder) -> tuple[list[str], list[str]]:
    """(parent doc id, chunk text) of a collection, chunked exactly as the pipeline does."""
    from retrievekit.chunking import ChunkConfig
    from retrievekit.evaluation import dataset_documents
    from retrievekit.types import Document
    from retrievekit.writer import document_records

    docs = [Document(text=t, id=i) for i, t in dataset_documents(ds) if t.strip()]
    # the pipeline's chunking, without encoding or storing
    records = [r for recs in document_records(docs, embedder, ChunkConfig()).values()
               for r in recs]
    return [rec.parent for rec in records], [rec.text for rec in records]


def tiny_cross_encoder() -> str:
    """A MiniLM-L6 cross-encoder (bundled MiniLM weights, fresh 1-logit head, seed 0)."""
    path = CACHE / "minilm-l6-cross-encoder"
    if not (path / "config.json").exists():
        import torch
        from sentence_transformers import CrossEncoder

        from retrievekit.models import resolve_model

        torch.manual_seed(0)
        ce = CrossEncoder(resolve_model(MODEL).load_from, num_labels=1, max_length=512,
                          local_files_only=True)
        ce.save(str(path))
    return str(path)


# -- speed -------------------------------------------------------------------------------------
def phase_speed(args: argparse.Namespace) -> None:
    from retrievekit.embedding import Embedder
    from retrievekit.evaluation import load_beir
    from retrievekit.rerank import Reranker

    ds = load_beir(DATA / "nfcorpus")
    queries = [ds.queries[q] for q in sorted(ds.queries)][:args.queries]
    probe = Embedder(model=MODEL, backend="torch", dtype="float32")
    _, chunks = chunk_texts(ds, probe)
    passages = chunks[:args.passages]
    tokens = [len(x) for x in probe.tokenizer(passages, add_special_tokens=True,
                                              truncation=True, max_length=256)["input_ids"]]
    # rerank candidates: each query's 20 most similar passages (fp32 vectors)
    pvecs = probe.embed_documents(passages, progress=False)
    rq = queries[:args.rerank_queries]
    candidates = [[passages[i] for i in np.argsort(-(pvecs @ probe.embed_query(q)))[:20]]
                  for q in rq]
    del probe
    ce_path = tiny_cross_encoder()
    names = args.settings.split(",")
    rows: dict[str, Any] = {}
    ref_vecs = ref_scores = None
    for run_no, name in enumerate(names):
        cfg = SETTINGS[name]
        row: dict[str, Any] = {"setting": name, "settings": cfg}
        emb = Embedder(model=MODEL, **cfg)
        t0 = time.perf_counter()
        emb.embed_query("warm up")  # loads (and, once, exports) what a query needs
        emb.embed_documents(passages[:40], progress=False)  # ... and what bulk needs
        row["load_s"] = round(time.perf_counter() - t0, 2)
        row["engines"] = {"query": emb.engine_for(1), "bulk": emb.engine_for(len(passages))}
        row["load_before"] = load1()
        cpu: list[float] = []
        lat = timed(emb.embed_query, queries, warmup=5, cpu=cpu)
        row["query_ms"] = {"p50": pct(lat, 50), "p95": pct(lat, 95), "n": len(lat),
                           "cpu_p50": pct(cpu, 50)}
        t0, c0 = time.perf_counter(), time.process_time()
        vecs = emb.embed_documents(passages, progress=False)
        sec, csec = time.perf_counter() - t0, time.process_time() - c0
        row["index_passages_per_s"] = len(passages) / sec
        row["index_passages_per_cpu_s"] = len(passages) / csec
        row["load_after_embed"] = load1()
        if ref_vecs is None and name == "torch-fp32":
            ref_vecs = vecs
        if ref_vecs is not None:
            row["min_cosine_vs_fp32"] = float(np.min(np.sum(vecs * ref_vecs, axis=1)))
        del emb
        rr = Reranker(model=ce_path, sigmoid=False, **cfg)  # raw logits (sigmoid costs ~0)
        rr.score(rq[0], candidates[0])
        cpu = []
        lat = timed(lambda i: rr.score(rq[i], candidates[i]), list(range(len(rq))), warmup=2,
                    cpu=cpu)
        row["rerank20_ms"] = {"p50": pct(lat, 50), "p95": pct(lat, 95), "n": len(lat),
                              "cpu_p50": pct(cpu, 50)}
        row["rerank_engine"] = rr.engine_for(20)
        scores = np.concatenate([rr.score(q, c) for q, c in zip(rq, candidates)])
        if ref_scores is None and name == "torch-fp32":
            ref_scores = scores
        if ref_scores is not None:
            row["max_logit_dev_vs_fp32"] = float(np.max(np.abs(scores - ref_scores)))
            row["logit_spread_fp32"] = float(np.std(ref_scores))
        row["load_after"] = load1()
        del rr
        rows[name if name not in rows else f"{name}#{run_no + 1}"] = row  # a repeat kept apart
        print(f"{name:11s} query p50 {row['query_ms']['p50']:6.1f} ms "
              f"(cpu {row['query_ms']['cpu_p50']:.1f}) | index "
              f"{row['index_passages_per_s']:6.1f} passages/s "
              f"(per cpu-s {row['index_passages_per_cpu_s']:.1f}) | rerank20 p50 "
              f"{row['rerank20_ms']['p50']:7.1f} ms (cpu {row['rerank20_ms']['cpu_p50']:.0f}) "
              f"| engines {row['engines']} "
              f"rerank {row['rerank_engine']} | load {row['load_before']}-{row['load_after']}",
              flush=True)
    save("speed", {"passages": len(passages), "passage_tokens_mean": statistics.mean(tokens),
                   "queries": len(queries), "rerank_queries": len(rq), "settings": rows})


# -- crossover ---------------------------------------------------------------------------------
def phase_crossover(args: argparse.Namespace) -> None:
    """Milliseconds per call by call size, ONNX fp32 against torch bf16: where the automatic
    backend should switch engines (`retrievekit.inference.AUTO_ONNX_MAX_ITEMS`)."""
    from retrievekit.embedding import Embedder
    from retrievekit.evaluation import load_beir
    from retrievekit.rerank import Reranker

    ds = load_beir(DATA / "nfcorpus")
    query = ds.queries[sorted(ds.queries)[0]]
    probe = Embedder(model=MODEL, backend="onnx")
    _, chunks = chunk_texts(ds, probe)
    sizes = [1, 2, 4, 8, 12, 16, 24, 32]
    out: dict[str, Any] = {"sizes": sizes}
    engines = {"onnx-fp32": {"backend": "onnx"},
               "torch-bf16": {"backend": "torch", "dtype": "bfloat16"}}
    for kind in ("embed", "rerank"):
        for name, cfg in engines.items():
            part = Embedder(model=MODEL, **cfg) if kind == "embed" else \
                Reranker(model=tiny_cross_encoder(), **cfg)
            run = (lambda n: part.embed_documents(chunks[:n], progress=False)) \
                if kind == "embed" else (lambda n: part.score(query, chunks[:n]))
            run(2)
            row, l0 = {}, load1()
            for n in sizes:
                row[n] = 1000 * min(timed(lambda _: run(n), [0] * args.repeats, warmup=1))
            out[f"{kind}:{name}"] = {"ms_per_call": row, "load": [l0, load1()]}
            print(f"{kind:6s} {name:10s} " + " ".join(f"{n}:{row[n]:.0f}" for n in sizes)
                  + f" ms (load {l0}-{load1()})", flush=True)
    save("crossover", out)


# -- quality -----------------------------------------------------------------------------------
def _ndcg(qids: list[str], qvecs: np.ndarray, parents: list[str], dvecs: np.ndarray, qrels,
          k: int = 10) -> tuple[float, dict[str, list[str]]]:
    from retrievekit.evaluation import evaluate_run

    uniq = sorted(set(parents))
    col = {p: j for j, p in enumerate(uniq)}
    pidx = np.array([col[p] for p in parents])
    sims = qvecs @ dvecs.T  # (q, chunks)
    run: dict[str, dict[str, float]] = {}
    tops: dict[str, list[str]] = {}
    for i, qid in enumerate(qids):
        best = np.full(len(uniq), -np.inf, dtype=np.float32)
        np.maximum.at(best, pidx, sims[i])
        top = np.argsort(-best, kind="stable")[:k + 1]  # +1: the query's own id may drop out
        run[qid] = {uniq[j]: float(best[j]) for j in top}
        tops[qid] = [uniq[j] for j in top[:k]]
    res = evaluate_run(run, qrels, ks=(k,), metrics=("ndcg",))
    return res[f"ndcg@{k}"], tops


def phase_quality(args: argparse.Namespace) -> None:
    from retrievekit.cache import EmbeddingCache
    from retrievekit.embedding import Embedder
    from retrievekit.evaluation import load_beir

    names = [n for n in args.settings.split(",") if n != "default"]
    if "torch-fp32" not in names:
        names.insert(0, "torch-fp32")
    out: dict[str, Any] = {}
    for coll in args.collections.split(","):
        ds = load_beir(DATA / coll)
        if coll == "nfcorpus" and args.nfcorpus_docs:
            # the first N documents by id; judgments and queries restricted to them (a query
            # keeps only relevant documents of the subset, and is dropped if none is left)
            keep = set(sorted(ds.corpus)[:args.nfcorpus_docs])
            qrels = {q: {d: g for d, g in rel.items() if d in keep} for q, rel in ds.qrels.items()}
            qrels = {q: rel for q, rel in qrels.items() if rel}
            ds = type(ds)(ds.name, {d: ds.corpus[d] for d in sorted(keep)},
                          {q: ds.queries[q] for q in qrels}, qrels, ds.split)
        qids = sorted(ds.queries)
        base = Embedder(model=MODEL, backend="torch", dtype="float32")
        parents, chunks = chunk_texts(ds, base)
        res: dict[str, Any] = {"docs": len(ds.corpus), "chunks": len(chunks),
                               "queries": len(qids), "settings": {}}
        print(f"{coll}: {len(ds.corpus)} docs, {len(chunks)} chunks, {len(qids)} queries",
              flush=True)
        vec: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in names:
            emb = base if name == "torch-fp32" else Embedder(model=MODEL, **SETTINGS[name])
            cache_file = CACHE / "embeddings" / "embeddings.sqlite"
            t0, l0 = time.perf_counter(), load1()
            before = 0
            if name == "torch-fp32" and cache_file.exists():
                emb.cache = EmbeddingCache(cache_file)  # fp32 vectors of the shared cache
                before = len(emb.cache)
            d = emb.embed_documents(chunks, progress=sys.stderr.isatty())
            encoded = len(emb.cache) - before if emb.cache is not None else len(chunks)
            if emb.cache is not None:
                emb.cache.close()
                emb.cache = None
            # all queries in one call: the same engine as one at a time for the pinned
            # settings (the default's query engine is taken from its own setting below)
            q = emb.embed_queries([ds.queries[i] for i in qids], progress=False)
            vec[name] = (q, d)
            res["settings"][name] = {"encoded_passages": encoded,
                                     "seconds": round(time.perf_counter() - t0, 1),
                                     "load": [l0, load1()],
                                     "engines": {"query": emb.engine_for(len(qids)),
                                                 "bulk": emb.engine_for(len(chunks))}}
            print(f"  {name}: encoded {encoded} passages in "
                  f"{res['settings'][name]['seconds']} s (load {l0}-{load1()})", flush=True)
            del emb
        # the default settings: which engine serves queries and bulk on this machine
        default = Embedder(model=MODEL)
        eng = {"query": default.engine_for(1), "bulk": default.engine_for(len(chunks))}
        src = {"onnx": "onnx-fp32" if default.config.onnx_quantize is None else "onnx-int8",
               "torch": {"float32": "torch-fp32", "bfloat16": "torch-bf16"}.get(default.dtype)}
        default_from = (src[eng["query"]], src[eng["bulk"]])
        if all(s in vec for s in default_from):
            vec["default"] = (vec[default_from[0]][0], vec[default_from[1]][1])
            res["settings"]["default"] = {"engines": eng, "queries_from": default_from[0],
                                          "passages_from": default_from[1]}
        del default
        ref_q, ref_d = vec["torch-fp32"]
        ref_ndcg, ref_tops = _ndcg(qids, ref_q, parents, ref_d, ds.qrels)
        for name, (q, d) in vec.items():
            ndcg, tops = _ndcg(qids, q, parents, d, ds.qrels)
            row = res["settings"][name]
            row.update({
                "ndcg@10": ndcg, "delta_vs_fp32": ndcg - ref_ndcg,
                "passage_cosine_vs_fp32": {"min": float(np.min(np.sum(d * ref_d, axis=1))),
                                           "mean": float(np.mean(np.sum(d * ref_d, axis=1)))},
                "query_cosine_vs_fp32_min": float(np.min(np.sum(q * ref_q, axis=1))),
                "top10_overlap_vs_fp32": float(np.mean(
                    [len(set(tops[i]) & set(ref_tops[i])) / 10 for i in qids])),
                "within_guard": abs(ndcg - ref_ndcg) <= 0.005,
            })
            print(f"  {name:11s} nDCG@10 {ndcg:.4f} (delta {ndcg - ref_ndcg:+.4f}) top-10 "
                  f"overlap {row['top10_overlap_vs_fp32']:.3f} min passage cos "
                  f"{row['passage_cosine_vs_fp32']['min']:.5f}", flush=True)
        res["subset"] = (f"first {args.nfcorpus_docs} documents by id"
                         if coll == "nfcorpus" and args.nfcorpus_docs else "all")
        out[coll] = res
        save(f"quality-{coll}", {"collection": res})


# -- backends ----------------------------------------------------------------------------------
def _folder_bytes(path: Path, pattern: str = "*.onnx") -> int:
    return sum(f.stat().st_size for f in path.rglob(pattern) if f.is_file())


def phase_backends(args: argparse.Namespace) -> None:
    """retrievekit's ONNX engine against sentence-transformers' own ONNX backend
    (`SentenceTransformer(model, backend="onnx")`, optimum), side by side in one process:
    export and reload time, files written, passages/s and query latency (medians over
    interleaved rounds), vector agreement with torch fp32, int8 variants.

    Needs `optimum-onnx` importable next to sentence-transformers; everything is exported
    into fresh temporary folders (nothing cached from earlier runs is reused)."""
    import shutil
    import tempfile

    import onnxruntime as ort
    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    from retrievekit.embedding import Embedder
    from retrievekit.evaluation import load_beir
    from retrievekit.inference import configure_torch_threads, default_num_threads
    from retrievekit.models import resolve_model

    threads = args.threads or default_num_threads()
    configure_torch_threads(threads)
    ds = load_beir(DATA / "nfcorpus")
    queries = [ds.queries[q] for q in sorted(ds.queries)][:args.queries]
    probe = Embedder(model=MODEL, backend="torch", dtype="float32")
    _, chunks = chunk_texts(ds, probe)
    passages = chunks[:args.passages]
    del probe
    tmp = Path(tempfile.mkdtemp(prefix="rk-backends-"))
    os.environ["RETRIEVEKIT_CACHE"] = str(tmp / "retrievekit-cache")
    st_dir = tmp / "st-model"  # a writable copy: sentence-transformers saves its export there
    shutil.copytree(resolve_model(MODEL).load_from, st_dir)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1

    def st_onnx(file_name: str | None = None) -> Any:
        kw: dict[str, Any] = {"session_options": opts, "provider": "CPUExecutionProvider"}
        if file_name:
            kw["file_name"] = file_name
        return SentenceTransformer(str(st_dir), backend="onnx", model_kwargs=kw,
                                   local_files_only=True)

    engines: dict[str, Any] = {}
    prep: dict[str, Any] = {}

    def prepared(name: str, make: Callable[[], Any], reload: Callable[[], Any] | None,
                 files: Callable[[], int]) -> None:
        t0 = time.perf_counter()
        engines[name] = make()
        row = {"first_s": round(time.perf_counter() - t0, 2), "load": load1()}
        if reload is not None:
            t0 = time.perf_counter()
            engines[name] = reload()
            row["reload_s"] = round(time.perf_counter() - t0, 2)
        row["onnx_bytes"] = files()
        prep[name] = row
        print(f"{name:14s} first use {row['first_s']:6.1f} s, reload "
              f"{row.get('reload_s', '-')} s, {row['onnx_bytes'] / 1e6:.1f} MB", flush=True)

    def rk(**cfg: Any) -> Callable[[], Any]:
        def make() -> Any:
            e = Embedder(model=MODEL, num_threads=threads, **cfg)
            e.embed_query("warm up")
            return e
        return make

    rk_cache = tmp / "retrievekit-cache"
    prepared("torch-fp32", lambda: SentenceTransformer(str(st_dir), device="cpu"), None,
             lambda: 0)
    prepared("torch-bf16", rk(backend="torch", dtype="bfloat16"), None, lambda: 0)
    prepared("rk-onnx-fp32", rk(backend="onnx"), rk(backend="onnx"),
             lambda: _folder_bytes(rk_cache, "embed-fp32.onnx"))

    def st_export() -> Any:
        m = st_onnx()
        m.save_pretrained(str(st_dir))  # the documented way to keep the export
        return m

    prepared("st-onnx-fp32", st_export, lambda: st_onnx("onnx/model.onnx"),
             lambda: _folder_bytes(st_dir / "onnx", "model.onnx"))
    prepared("rk-onnx-int8", rk(backend="onnx", onnx_quantize="int8"),
             rk(backend="onnx", onnx_quantize="int8"),
             lambda: _folder_bytes(rk_cache, "embed-int8.onnx"))

    def st_int8() -> Any:
        export_dynamic_quantized_onnx_model(engines["st-onnx-fp32"], "avx512_vnni",
                                            str(st_dir))
        return st_onnx("onnx/model_qint8_avx512_vnni.onnx")

    prepared("st-onnx-int8", st_int8, lambda: st_onnx("onnx/model_qint8_avx512_vnni.onnx"),
             lambda: _folder_bytes(st_dir / "onnx", "model_qint8*.onnx"))

    def encode(name: str, texts: list[str]) -> np.ndarray:
        e = engines[name]
        if isinstance(e, Embedder):
            return e.embed_documents(texts, progress=False)
        return e.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True,
                        show_progress_bar=False)

    ref = encode("torch-fp32", passages)
    rows: dict[str, Any] = {n: {**prep[n], "passages_per_s": [], "query_ms": []}
                            for n in engines}
    for name in engines:
        vecs = encode(name, passages)
        rows[name]["max_abs_diff_vs_torch"] = float(np.max(np.abs(vecs - ref)))
        rows[name]["min_cosine_vs_torch"] = float(np.min(np.sum(vecs * ref, axis=1)))
    for rnd in range(args.rounds):  # interleaved, so that load changes hit every engine
        for name in engines:
            t0 = time.perf_counter()
            encode(name, passages)
            rows[name]["passages_per_s"].append(len(passages) / (time.perf_counter() - t0))
            lat = timed(lambda q: encode(name, [q]), queries, warmup=3)
            rows[name]["query_ms"].append(pct(lat, 50))
        print(f"round {rnd + 1}/{args.rounds} (load {load1()})", flush=True)
    base = "rk-onnx-fp32"
    med = {n: (statistics.median(r["passages_per_s"]), statistics.median(r["query_ms"]))
           for n, r in rows.items()}
    for name, row in rows.items():
        row["passages_per_s_median"], row["query_ms_median"] = med[name]
        row["passages_per_s_ratio_vs_rk"] = med[name][0] / med[base][0]
        row["query_ms_ratio_vs_rk"] = med[name][1] / med[base][1]
        print(f"{name:14s} {med[name][0]:7.1f} passages/s ({row['passages_per_s_ratio_vs_rk']:.2f}x"
              f") | query p50 {med[name][1]:6.2f} ms ({row['query_ms_ratio_vs_rk']:.2f}x) | max "
              f"|diff| {row['max_abs_diff_vs_torch']:.1e} min cos "
              f"{row['min_cosine_vs_torch']:.6f}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    save("backends", {"passages": len(passages), "queries": len(queries), "rounds": args.rounds,
                      "threads": threads, "versions": {
                          "sentence_transformers": sentence_transformers.__version__,
                          "transformers": transformers.__version__,
                          "optimum_onnx": _version("optimum-onnx"),
                          "torch": torch.__version__, "onnxruntime": ort.__version__},
                      "engines": rows})


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=["speed", "quality", "crossover", "backends"])
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--passages", type=int, default=320, help="speed: passages encoded")
    p.add_argument("--queries", type=int, default=200, help="speed: single queries timed")
    p.add_argument("--rerank-queries", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="crossover: best of N calls")
    p.add_argument("--rounds", type=int, default=5, help="backends: interleaved rounds")
    p.add_argument("--threads", type=int, default=0, help="backends: threads (0: default)")
    p.add_argument("--collections", default="cranfield,nfcorpus")
    p.add_argument("--nfcorpus-docs", type=int, default=0,
                   help="quality: the first N nfcorpus documents by id (0: all)")
    args = p.parse_args(argv)
    {"speed": phase_speed, "quality": phase_quality,
     "crossover": phase_crossover, "backends": phase_backends}[args.phase](args)


if __name__ == "__main__":
    main()
