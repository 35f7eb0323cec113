"""Evaluation reports: index a BEIR collection, run each search mode, write JSON/Markdown/PNG.

`run_eval` is what ``retrievekit eval`` calls. The pieces it is made of (`open_eval_retriever`,
`index_dataset`, `mode_search_fn`, `evaluate_modes`) are public so that benchmark scripts
measure exactly what the command measures.

What a mode means here:

- ``sparse`` / ``dense`` / ``hybrid``: `HybridRetriever.search` in that mode, asked for
  ``max(k, 100)`` documents. Candidates are chunks and a document's chunks collapse into one
  hit, so when a search returns fewer documents than asked for, it is repeated with twice the
  candidates (the query is embedded once) until enough documents come back; otherwise
  Recall@100 would be measured on ~80 documents on nfcorpus.
- ``rerank``: the hybrid ranking with its top ``rerank_candidates`` hits reordered by the
  cross-encoder; ranks below that keep the fused order, so Recall@100 stays comparable with
  hybrid (reranking can only move documents inside the reranked head). With a reranker
  threshold only the head hits that pass it count, as in a search.

Latency is the wall time of one search call, query embedding (and reranking) included. The
embedding cache serves passages only: queries are encoded live, so a rerun's latencies are real.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from . import validate as v
from .errors import ConfigError, InvalidInputError
from .evaluation import BeirDataset, dataset_documents, evaluate, load_beir

logger = logging.getLogger(__name__)

__all__ = [
    "ALL_MODES",
    "RECALL_DEPTH",
    "ModeResult",
    "evaluate_modes",
    "format_table",
    "index_dataset",
    "mode_search_fn",
    "open_eval_retriever",
    "run_eval",
    "sample_queries",
    "write_chart",
]

ALL_MODES = ("sparse", "dense", "hybrid", "rerank")
#: Recall is reported at this depth whatever `k` is, so every search asks for at least this many.
RECALL_DEPTH = 100
_ADD_BATCH = 256


def _metric_names(k: int) -> tuple[str, ...]:
    return (f"ndcg@{k}", f"recall@{RECALL_DEPTH}", f"mrr@{k}", f"map@{k}")


_LABELS = {"ndcg": "nDCG", "recall": "Recall", "mrr": "MRR", "map": "MAP"}


def _label(metric: str) -> str:
    name, _, cut = metric.partition("@")
    return f"{_LABELS.get(name, name)}@{cut}"


@dataclass(frozen=True)
class ModeResult:
    """One mode's scores: headline means, per-query values and latency in milliseconds."""

    mode: str
    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]
    latency_ms: dict[str, float]
    num_queries: int

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "latency_ms": self.latency_ms,
                "num_queries": self.num_queries, "per_query": self.per_query}


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def _check_modes(modes: Iterable[str]) -> tuple[str, ...]:
    modes = modes.split(",") if isinstance(modes, str) else list(modes)
    out = tuple(dict.fromkeys(m.strip() for m in modes if m.strip()))
    bad = [m for m in out if m not in ALL_MODES]
    if not out or bad:
        raise InvalidInputError(
            f"modes={list(modes)!r}: unknown {bad or 'empty list'}; choose from "
            f"{list(ALL_MODES)}, e.g. --modes sparse,dense,hybrid")
    return out


def _no_reranker() -> ConfigError:
    return ConfigError("mode 'rerank' needs a cross-encoder: pass --reranker MODEL "
                       "(run_eval(reranker=...)), e.g. cross-encoder/ms-marco-MiniLM-L-6-v2, "
                       "or leave rerank out of --modes")


def _collection_name(dataset: str, settings: Mapping[str, Any]) -> str:
    """A Chroma collection name per dataset and settings, so other settings get their own."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str)
                            .encode("utf-8")).hexdigest()[:10]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", dataset).strip("-._")[:40] or "dataset"
    return f"eval-{stem}-{digest}"


def eval_cache_name(dtype: str) -> str:
    """The embedding cache file of an evaluation at `dtype`: the cache's keys leave the
    precision out (a store takes vectors of any), so a run that measures another precision
    than float32 gets a file of its own, else it would score the float32 passage vectors."""
    return "embeddings.sqlite" if dtype == "float32" else f"embeddings-{dtype}.sqlite"


def open_eval_retriever(store_dir: str | Path, dataset_name: str, *,
                        model: str | None = None, truncate_dim: int | None = None,
                        dtype: str = "float32", sparse: Mapping[str, Any] | None = None,
                        reranker: str | None = None, rerank_candidates: int | None = None,
                        rerank_weight: float | None = None, embedder: Any = None,
                        options: Mapping[str, Any] | None = None):
    """A `HybridRetriever` over `store_dir`, in a collection named after the dataset and the
    settings that decide what the index means (model, truncate_dim, BM25 settings).

    Reopening with the same settings finds the same collection, so nothing is re-encoded;
    other settings get a collection of their own beside it.

    Args:
        sparse: `SparseConfig` fields (e.g. ``{"tokenizer": {"stemmer": None}}``).
        embedder: a loaded `Embedder` to reuse when its settings are the ones asked for.
        options: query-time `RetrieverConfig` fields (``weights``, ``rrf_k``, ``candidates``).
    """
    from .config import RetrieverConfig
    from .embedding import DEFAULT_MODEL
    from .pipeline import HybridRetriever
    from .rerank import RerankConfig

    emb: dict[str, Any] = {"model": model or DEFAULT_MODEL, "truncate_dim": truncate_dim,
                           "dtype": dtype}
    cfg: dict[str, Any] = {"embedder": emb}
    if sparse is not None:
        cfg["sparse"] = dict(sparse)
    base = RetrieverConfig.from_dict(cfg)
    identity = {"model": base.embedder.model, "truncate_dim": truncate_dim,
                "sparse": base.sparse.to_dict(), "chunking": base.chunking.to_dict()}
    if dtype != "float32":  # its own passage vectors (a store takes any precision's)
        identity["dtype"] = dtype
    collection = _collection_name(dataset_name, identity)
    if reranker is not None:  # checked before anything is written
        rr: dict[str, Any] = {"model": reranker}
        if rerank_candidates is not None:
            rr["candidates"] = rerank_candidates
        if rerank_weight is not None:
            rr["weight"] = rerank_weight
        cfg["reranker"] = RerankConfig(**rr)
    Path(store_dir).mkdir(parents=True, exist_ok=True)
    cfg["store"] = {"path": str(store_dir), "collection": collection}
    cfg.update(options or {})
    if embedder is not None and embedder.config != base.embedder:
        embedder = None
    return HybridRetriever(RetrieverConfig.from_dict(cfg), embedder=embedder)


def index_dataset(retriever: Any, dataset: BeirDataset, *, cache: Any = None,
                  progress: bool | None = None, batch_size: int = _ADD_BATCH) -> dict[str, Any]:
    """Make the retriever's collection hold exactly the dataset's corpus.

    Documents are ``title + "\\n" + text`` under their corpus ids; unchanged ones are skipped
    without encoding, documents no longer in the corpus are deleted, and empty documents
    (no title, no text) are left out with a warning, since they cannot be retrieved.

    Args:
        cache: an `EmbeddingCache` used while indexing (passage vectors are read from it and
            new ones written to it); the embedder's own cache is restored afterwards.
        progress: a tqdm bar over documents; default: when stderr is a terminal.

    Returns:
        Counts (documents; records written, unchanged, removed; passages encoded, i.e. not
        found in the cache; documents skipped_empty) and seconds taken.
    """
    from tqdm.auto import tqdm

    from .types import Document

    start = time.perf_counter()
    docs: list[Document] = []
    empty: list[str] = []
    for doc_id, text in dataset_documents(dataset):
        if text.strip():
            docs.append(Document(text=text, id=doc_id))
        else:
            empty.append(doc_id)
    if empty:
        logger.warning("%s: %d documents have neither title nor text and are not indexed "
                       "(first: %s)", dataset.name, len(empty), empty[:5])
    wanted = {d.id for d in docs}
    stored = set(retriever.document_ids())
    stats = {"documents": len(docs), "written": 0, "unchanged": 0, "removed": 0,
             "skipped_empty": len(empty)}
    stale = sorted(stored - wanted)
    if stale:
        stats["removed"] += retriever.delete(stale)
    show = sys.stderr.isatty() if progress is None else bool(progress)
    with retriever.embedder.using_cache(cache) as active, \
            tqdm(total=len(docs), desc=f"index {dataset.name}", unit="doc",
                 disable=not show) as bar:
        cached_before = len(active) if active is not None else 0
        for s in range(0, len(docs), batch_size):
            part = docs[s:s + batch_size]
            retriever.add_documents(part, progress=False)
            for key in ("written", "unchanged", "removed"):
                stats[key] += retriever.last_add_stats[key]
            bar.update(len(part))
        # passages the cache did not hold (without a cache: every record written)
        stats["encoded"] = len(active) - cached_before if active is not None else stats["written"]
    stats["seconds"] = time.perf_counter() - start
    logger.info("indexed %s: %s", dataset.name, stats)
    return stats


def _filled(search: Callable[[int], list[Any]], n: int, candidates: int, records: int,
            exhausted: Callable[[int], bool] | None = None) -> list[Any]:
    """Hits for `n` documents from ``search(candidates)``.

    Candidates are chunks, and chunks of one document collapse into one hit, so a search can
    return fewer documents than asked for (on nfcorpus, 100 dense candidates hold ~80
    documents). Ask again with twice the candidates until `n` documents come back, the
    candidates cover the whole store, or ``exhausted(candidates)`` says no more can come
    (BM25 found fewer positive-scoring chunks than it was allowed).
    """
    cand = max(candidates, n)
    hits = search(cand)
    while len(hits) < n and cand < records and not (exhausted and exhausted(cand)):
        cand = min(records, cand * 2)
        hits = search(cand)
    return hits[:n]


def mode_search_fn(retriever: Any, mode: str, *, candidates: int = RECALL_DEPTH
                   ) -> Callable[[str, int], list[Any]]:
    """``f(query, n) -> hits`` for one mode that returns `n` documents where the store
    holds them (see `_filled`; the module docstring says what ``rerank`` does)."""
    records = retriever.count()
    if mode == "rerank":
        reranker = retriever.reranker
        if reranker is None:
            raise _no_reranker()
        depth = reranker.config.candidates

        def search(query: str, n: int) -> list[Any]:
            want = max(n, depth)
            vec = retriever.embedder.embed_query(query)  # once, however many tries
            hits = _filled(lambda c: retriever.search(query, k=want, mode="hybrid",
                                                      rerank=False, candidates=c,
                                                      query_vector=vec),
                           want, candidates, records)
            head = reranker.rerank(query, hits[:depth], top_n=None)
            if reranker.config.threshold is not None:  # only a scored hit can pass it
                return head[:n]
            return (head + hits[depth:])[:n]

        return search
    if mode not in ("sparse", "dense", "hybrid"):
        raise InvalidInputError(f"mode={mode!r}: choose from {list(ALL_MODES)}")

    def search(query: str, n: int) -> list[Any]:
        vec = None if mode == "sparse" else retriever.embedder.embed_query(query)
        exhausted = None
        if mode == "sparse":
            def exhausted(c: int) -> bool:
                return len(retriever.sparse_candidates(query, c)) < c

        return _filled(lambda c: retriever.search(query, k=n, mode=mode, rerank=False,
                                                  candidates=c, query_vector=vec),
                       n, candidates, records, exhausted)

    return search


def sample_queries(dataset: BeirDataset, max_queries: int | None, seed: int = 0) -> BeirDataset:
    """The dataset with at most `max_queries` judged queries, drawn with a fixed seed."""
    if max_queries is None or max_queries >= len(dataset.qrels):
        return dataset
    keep = set(random.Random(seed).sample(sorted(dataset.qrels), max_queries))
    return BeirDataset(name=dataset.name, corpus=dataset.corpus,
                       queries={q: t for q, t in dataset.queries.items() if q in keep},
                       qrels={q: dict(d) for q, d in dataset.qrels.items() if q in keep},
                       split=dataset.split)


def evaluate_modes(retriever: Any, dataset: BeirDataset, modes: Sequence[str], *, k: int = 10,
                   candidates: int = RECALL_DEPTH, progress: bool | None = None,
                   warmup: bool = True) -> dict[str, ModeResult]:
    """Run every judged query in each mode; nDCG@k, Recall@100, MRR@k, MAP@k and latency."""
    v.integer("k", k, error=InvalidInputError)
    modes = _check_modes(modes)
    depth = max(k, RECALL_DEPTH)
    names = _metric_names(k)
    show = sys.stderr.isatty() if progress is None else bool(progress)
    first_query = next(iter(dataset.queries.values()), "")
    out: dict[str, ModeResult] = {}
    for mode in modes:
        fn = mode_search_fn(retriever, mode, candidates=max(candidates, depth))
        if warmup and first_query.strip():
            fn(first_query, depth)  # lazy model loads and first-call costs stay out of p50/p95
        res = evaluate(fn, dataset, k=depth, ks=sorted({k, RECALL_DEPTH}),
                       metrics=("ndcg", "recall", "mrr", "map"), progress=show)
        lat = res.latency
        out[mode] = ModeResult(
            mode=mode,
            metrics={n: res.means[n] for n in names},
            per_query={q: {n: v[n] for n in names} for q, v in res.per_query.items()},
            latency_ms={"p50": lat.p50 * 1e3, "p95": lat.p95 * 1e3, "mean": lat.mean * 1e3}
            if lat else {},
            num_queries=res.num_queries,
        )
    return out


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def format_table(results: Mapping[str, ModeResult], k: int) -> str:
    """A Markdown table: one row per mode, headline metrics and latency."""
    names = _metric_names(k)
    head = "| mode | " + " | ".join(_label(n) for n in names) + " | p50 ms | p95 ms |"
    rule = "|---|" + "---:|" * (len(names) + 2)
    rows = [head, rule]
    for mode, r in results.items():
        vals = " | ".join(f"{r.metrics[n]:.4f}" for n in names)
        rows.append(f"| {mode} | {vals} | {r.latency_ms.get('p50', 0):.1f} | "
                    f"{r.latency_ms.get('p95', 0):.1f} |")
    return "\n".join(rows)


def write_chart(results: Mapping[str, ModeResult], k: int, path: str | Path,
                title: str = "") -> Path:
    """A PNG with two panels: metrics per mode (grouped bars) and latency p50/p95 per mode."""
    try:
        import matplotlib
    except ImportError as exc:
        from .errors import MissingDependencyError

        raise MissingDependencyError(
            "the evaluation chart needs matplotlib: pip install 'retrievekit[eval]'") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    names = _metric_names(k)
    modes = list(results)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2),
                                   gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / max(len(modes), 1)
    x = np.arange(len(names))
    for i, mode in enumerate(modes):
        vals = [results[mode].metrics[n] for n in names]
        bars = ax1.bar(x + (i - (len(modes) - 1) / 2) * width, vals, width, label=mode)
        ax1.bar_label(bars, fmt="%.3f", fontsize=7, rotation=90, padding=2)
    ax1.set_xticks(x, [_label(n) for n in names])
    ax1.set_ylim(0, 1.2)  # room for the value labels above a bar at 1.0
    ax1.set_ylabel("score")
    ax1.set_title("quality per mode")
    ax1.legend(fontsize=8, ncols=min(len(modes), 4), loc="upper center",
               bbox_to_anchor=(0.5, -0.08), frameon=False)
    xm = np.arange(len(modes))
    p50 = [results[m].latency_ms.get("p50", 0.0) for m in modes]
    p95 = [results[m].latency_ms.get("p95", 0.0) for m in modes]
    ax2.bar(xm - 0.2, p50, 0.4, label="p50")
    ax2.bar(xm + 0.2, p95, 0.4, label="p95")
    ax2.set_xticks(xm, modes)
    ax2.set_ylabel("ms per query")
    ax2.set_title("latency per mode")
    ax2.legend(fontsize=8, ncols=2, loc="upper center", bbox_to_anchor=(0.5, -0.08),
               frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _markdown(report: Mapping[str, Any], table: str) -> str:
    s = report["settings"]
    notes = [
        f"- {report['num_queries']} judged queries of split `{report['split']}`, "
        f"{report['num_documents']} documents; every search asked for "
        f"{max(report['k'], RECALL_DEPTH)} hits with {s['candidates']} candidates per side.",
        f"- model `{s['model']}` (truncate_dim={s['truncate_dim']}, dtype={s['dtype']})"
        + (f"; reranker `{s['reranker']}` over the top {s['rerank_candidates']} fused hits "
           + (f"at weight {s['rerank_weight']:g} against the fused order "
              if s.get("rerank_weight", 1.0) != 1.0 else "")
           + "(lower ranks keep the fused order)" if s.get("reranker") else ""),
        "- latency: one search call, query embedding included (queries are not cached).",
        "- a retrieved document whose id equals the query id is ignored (BEIR convention).",
    ]
    if report.get("max_queries"):
        notes.append(f"- a sample of {report['max_queries']} queries (seed 0), not all of them.")
    return (f"# Evaluation: {report['dataset']}\n\n{report['created']}\n\n{table}\n\n"
            + "\n".join(notes) + "\n")


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------


def run_eval(dataset_dir: str | Path, modes: Iterable[str] = ("sparse", "dense", "hybrid"),
             k: int = 10, out: str | Path = "eval-results", split: str = "test",
             model: str | None = None, reranker: str | None = None,
             cache_dir: str | Path | None = None, max_queries: int | None = None,
             truncate_dim: int | None = None, *, candidates: int = RECALL_DEPTH,
             rerank_candidates: int | None = None, rerank_weight: float | None = None,
             dtype: str = "float32", options: Mapping[str, Any] | None = None,
             progress: bool | None = None, echo: bool = True) -> dict[str, Any]:
    """Evaluate a BEIR-layout collection in several modes and write a report.

    Indexes the corpus into ``<out>/store`` (reused on later runs; unchanged documents are
    not re-encoded, and passage vectors come from the embedding cache at `cache_dir`,
    default ``<out>/cache``), runs every judged query in each mode, prints a table and writes
    ``results.json``, ``results.md`` and ``results.png`` to `out`.

    Args:
        dataset_dir: folder with corpus.jsonl[.gz], queries.jsonl and qrels/<split>.tsv.
        modes: any of sparse, dense, hybrid, rerank (rerank needs `reranker`).
        k: cut-off of nDCG, MRR and MAP (Recall is at 100).
        candidates: per-side candidates fused in hybrid mode (at least 100 are used).
        rerank_candidates: fused hits the cross-encoder reorders (default: RerankConfig's).
        rerank_weight: the cross-encoder's share of the order (`RerankConfig.weight`;
            default 1.0: its order alone).
        max_queries: evaluate a seeded sample of this many queries only.
        options: query-time `RetrieverConfig` fields (fusion, weights, rrf_k, ...), as
            `tune` applies a trial (`tune.check_settings`); `candidates` is the argument.
        echo: print the table to stdout.

    Returns:
        The content written to results.json.

    Raises:
        InvalidInputError: bad modes/k/max_queries or a malformed dataset.
        ConfigError: mode rerank without a reranker.
    """
    modes_t = _check_modes(modes)
    v.integer("k", k, error=InvalidInputError)
    v.integer("max_queries", max_queries, optional=True, error=InvalidInputError)
    v.integer("candidates", candidates, error=InvalidInputError)
    v.text("model", model, optional=True, empty=False, error=InvalidInputError,
           fix="None (no --model) for the default model")
    v.path("cache_dir", cache_dir, optional=True, error=InvalidInputError,
           fix="None (no --cache-dir) for <out>/cache")
    if "rerank" in modes_t and not reranker:
        raise _no_reranker()
    if reranker and "rerank" not in modes_t:
        raise ConfigError(f"reranker={reranker!r} serves the rerank mode only, which modes="
                          f"{','.join(modes_t)} leaves out: add rerank to --modes, or drop "
                          "--reranker")
    if reranker is None and (rerank_candidates, rerank_weight) != (None, None):
        raise ConfigError(f"rerank_candidates={rerank_candidates!r}, rerank_weight="
                          f"{rerank_weight!r} set the cross-encoder of the rerank mode, and "
                          "there is none: pass --reranker MODEL (run_eval(reranker=...)) or "
                          "leave them out")
    if options is not None:
        from .tune import check_settings

        if "candidates" in options:
            v.fail("options", "settings without 'candidates'", dict(options),
                   "pass it as candidates=", error=InvalidInputError)
        options = check_settings(options, "options")
    from .cache import EmbeddingCache

    dataset = load_beir(dataset_dir, split=split)
    evaluated = sample_queries(dataset, max_queries)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_path = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    cache_file = cache_path / eval_cache_name(dtype)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with EmbeddingCache(cache_file) as cache, \
            open_eval_retriever(out_dir / "store", dataset.name, model=model,
                                truncate_dim=truncate_dim, dtype=dtype, reranker=reranker,
                                rerank_candidates=rerank_candidates,
                                rerank_weight=rerank_weight, options=options) as retriever:
        index_stats = index_dataset(retriever, dataset, cache=cache, progress=progress)
        results = evaluate_modes(retriever, evaluated, modes_t, k=k, candidates=candidates,
                                 progress=progress)
        settings = {"model": retriever.config.embedder.model, "truncate_dim": truncate_dim,
                    "dtype": dtype, "candidates": max(candidates, k, RECALL_DEPTH),
                    "reranker": reranker,
                    "rerank_candidates": retriever.reranker.config.candidates
                    if retriever.reranker else None,
                    "rerank_weight": retriever.reranker.config.weight
                    if retriever.reranker else None,
                    "store": str(out_dir / "store"),
                    "collection": retriever.config.store.collection,
                    "cache": str(cache_file),
                    "sparse": retriever.config.sparse.to_dict(),
                    **{k: retriever.config.to_dict()[k]
                       for k in ("fusion", "weights", "rrf_k", "chunk_penalty")}}
    table = format_table(results, k)
    report: dict[str, Any] = {
        "dataset": dataset.name, "dataset_dir": str(dataset_dir), "split": split,
        "created": started, "k": k, "recall_depth": RECALL_DEPTH,
        "num_documents": len(dataset.corpus),
        "num_queries": next(iter(results.values())).num_queries,
        "max_queries": max_queries, "settings": settings, "index": index_stats,
        "metric_names": list(_metric_names(k)),
        "modes": {m: r.to_dict() for m, r in results.items()},
    }
    (out_dir / "results.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out_dir / "results.md").write_text(_markdown(report, table), encoding="utf-8")
    write_chart(results, k, out_dir / "results.png",
                title=f"{dataset.name} ({report['num_queries']} queries)")
    if echo:
        print(f"{dataset.name}: {report['num_queries']} queries, {len(dataset.corpus)} documents; "
              f"index: {index_stats['written']} records written ({index_stats['encoded']} "
              f"passages encoded, the rest from the cache), {index_stats['unchanged']} unchanged")
        print(table)
        print(f"wrote {out_dir / 'results.json'}, results.md, results.png")
    return report
