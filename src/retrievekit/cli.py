"""The `retrievekit` command: index, search, info, eval, tune (and finetune where installed)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import RetrieveKitError

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")


def _files(paths: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()
                              and f.suffix.lower() in TEXT_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise RetrieveKitError(f"PATH {str(p)!r} does not exist; give files or directories")
    return out


def _open(args: argparse.Namespace, *, create: bool):
    from .pipeline import HybridRetriever

    kwargs: dict[str, Any] = {}
    if args.host:
        kwargs.update(host=args.host, port=args.port)
    if args.config:
        from .config import RetrieverConfig

        cfg = RetrieverConfig.from_toml(args.config)
        changes: dict[str, Any] = {"store": {"path": args.store, "collection": args.collection}}
        return HybridRetriever(cfg.replace(**changes), **kwargs)
    try:
        return HybridRetriever.open(args.store, collection=args.collection, **kwargs)
    except RetrieveKitError:
        if not create:
            raise
    model = getattr(args, "model", None)
    return HybridRetriever(path=args.store, collection=args.collection, model=model, **kwargs)


def cmd_index(args: argparse.Namespace) -> int:
    from .types import Document

    files = _files(args.paths)
    docs = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        docs.append(Document(text=text, id=f.as_posix(),
                             metadata={"source": f.as_posix(), "suffix": f.suffix.lower()}))
    with _open(args, create=True) as r:
        before = r.count()
        r.add_documents(docs, progress=not args.quiet and sys.stderr.isatty())
        stats = r.last_add_stats
        print(f"indexed {len(docs)} files into {args.store}: {stats['written']} records written, "
              f"{stats['unchanged']} unchanged, {stats['removed']} stale chunks removed; "
              f"{before} -> {r.count()} records")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    try:
        where = json.loads(args.where) if args.where else None
    except json.JSONDecodeError as exc:
        raise RetrieveKitError(f"--where {args.where!r} is not JSON ({exc.msg}); give a Chroma "
                               "filter such as '{\"topic\": \"code\"}'") from exc
    with _open(args, create=False) as r:
        if args.rerank:
            from .rerank import Reranker

            r.reranker = Reranker(model=args.rerank, weight=args.rerank_weight)
        hits = r.search(args.query, k=args.k, mode=args.mode, where=where)
        if args.json:
            print(json.dumps([{"id": h.id, "score": h.score, "ranks": dict(h.ranks),
                               "scores": dict(h.scores), "chunk_id": h.chunk_id,
                               "text": h.document.text, "metadata": dict(h.document.metadata)}
                              for h in hits], ensure_ascii=False, indent=2))
            return 0
        for i, h in enumerate(hits, 1):
            ranks = " ".join(f"{s}#{h.ranks[s]}" for s in ("dense", "sparse", "rerank", "blend")
                             if s in h.ranks)
            snippet = " ".join(h.document.text.split())[:100]
            print(f"{i:2d}. {h.id}  score={h.score:.4f}  [{ranks}]\n    {snippet}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with _open(args, create=False) as r:
        print(json.dumps(r.info(), indent=2, default=str))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .report import run_eval

    if args.threads is not None:
        if args.threads < 1:
            raise RetrieveKitError(f"--threads {args.threads}: give an int >= 1")
        import torch

        torch.set_num_threads(args.threads)
    run_eval(args.dataset, modes=args.modes.split(","), k=args.k, out=args.out,
             split=args.split, model=args.model, reranker=args.reranker,
             cache_dir=args.cache_dir, max_queries=args.max_queries, truncate_dim=args.truncate_dim,
             candidates=args.candidates, rerank_candidates=args.rerank_candidates,
             rerank_weight=args.rerank_weight, dtype=args.dtype,
             progress=False if args.quiet else None)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .tune import table, tune

    trials = tune(args.dataset, split=args.split, out=args.out, model=args.model,
                  cache_dir=args.cache_dir, progress=False if args.quiet else None)
    print(table(trials))
    best = trials[0].settings
    print(f"\nbest on the {args.split} split: fusion={best['fusion']}, candidates="
          f"{best['candidates']}, weights={best['weights']}; written to "
          f"{Path(args.out) / 'tuned.toml'} (use it with --config or RetrieverConfig.from_toml)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retrievekit",
                                description="Hybrid BM25 + dense retrieval over Chroma.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    def store_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--store", default=".retrievekit", help="store directory (default .retrievekit/)")
        sp.add_argument("--collection", default="retrievekit")
        sp.add_argument("--host", help="Chroma server host (instead of the embedded store)")
        sp.add_argument("--port", type=int, default=8000)
        sp.add_argument("--config", help="a TOML config file (see docs/configuration.md)")

    sp = sub.add_parser("index", help="index text/markdown files (one document per file; "
                        "long files are chunked)")
    sp.add_argument("paths", nargs="+")
    sp.add_argument("--model", default=None, help="embedding model for a new store")
    sp.add_argument("-q", "--quiet", action="store_true")
    store_args(sp)
    sp.set_defaults(func=cmd_index)

    sp = sub.add_parser("search", help="search the store")
    sp.add_argument("query")
    sp.add_argument("-k", "--k", type=int, default=5)
    sp.add_argument("--mode", choices=["hybrid", "dense", "sparse"], default=None)
    sp.add_argument("--where", help='a Chroma filter as JSON, e.g. \'{"topic": "code"}\'')
    sp.add_argument("--rerank", metavar="MODEL", help="rerank with this cross-encoder")
    sp.add_argument("--rerank-weight", type=float, default=1.0,
                    help="the cross-encoder's share of the order against the hybrid order, "
                    "in (0, 1] (default 1: its order alone)")
    sp.add_argument("--json", action="store_true", help="print hits as JSON")
    store_args(sp)
    sp.set_defaults(func=cmd_search)

    sp = sub.add_parser("info", help="what the store holds and its settings")
    store_args(sp)
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("eval", help="evaluate on a BEIR-layout collection")
    sp.add_argument("dataset", help="directory with corpus.jsonl[.gz], queries.jsonl, qrels/")
    sp.add_argument("--modes", default="sparse,dense,hybrid",
                    help="comma-separated: sparse,dense,hybrid,rerank")
    sp.add_argument("--k", type=int, default=10, help="cut-off of the headline metrics")
    sp.add_argument("--out", default="eval-results", help="directory for results.json/.md/.png")
    sp.add_argument("--split", default="test")
    sp.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    sp.add_argument("--reranker", default=None, help="cross-encoder for the rerank mode")
    sp.add_argument("--truncate-dim", type=int, default=None)
    sp.add_argument("--cache-dir", default=None,
                    help="embedding cache directory (default: <out>/cache)")
    sp.add_argument("--max-queries", type=int, default=None,
                    help="evaluate a seeded sample of this many queries only")
    sp.add_argument("--candidates", type=int, default=100,
                    help="per-side candidates fused in hybrid mode (at least 100 are used, "
                    "so Recall@100 is meaningful)")
    sp.add_argument("--rerank-candidates", type=int, default=None,
                    help="fused hits the cross-encoder reorders in the rerank mode (default 50)")
    sp.add_argument("--rerank-weight", type=float, default=None,
                    help="the cross-encoder's share of the order against the fused order, in "
                    "(0, 1] (default 1: its order alone; `retrievekit finetune reranker` "
                    "reports the weight it chose)")
    sp.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"],
                    default="float32", help="embedding model precision")
    sp.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice; 1 is steadier on a busy machine)")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("tune", help="choose fusion, candidates and weights on a dev split")
    sp.add_argument("dataset", help="directory with corpus.jsonl[.gz], queries.jsonl, qrels/")
    sp.add_argument("--split", default="dev", help="the split to tune on (never test)")
    sp.add_argument("--out", default="tune-results", help="directory for tuned.toml, tune.json")
    sp.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    sp.add_argument("--cache-dir", default=None,
                    help="embedding cache directory (default: <out>/cache)")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(func=cmd_tune)

    try:
        from .finetune import add_cli  # optional: the fine-tuning command
    except ImportError:
        pass
    else:
        add_cli(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except RetrieveKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
