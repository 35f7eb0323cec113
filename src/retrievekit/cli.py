"""The `retrievekit` command: index, search, info, delete, eval, tune (and finetune where
installed).

Every error is one line on stderr, `error: ...`, and exit status 2. Only `index` with
something to write creates a store; the other commands refuse a missing one. `--json` makes
index, search, info and delete print one JSON document on stdout. docs/cli.md has the rest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from .errors import InvalidInputError, RetrieveKitError, StoreError, StoreMismatchError

logger = logging.getLogger(__name__)

IDS_HELP = ("Ids are stable however a path is spelled: a directory given is resolved, and a "
            "file's id is its path from the directory's parent, e.g. `index kb`, "
            "`index /abs/kb` and `cd kb && index .` all name kb/guide/a.md 'kb/guide/a.md'. "
            "A JSONL record's id is its 'id' field, else '<file id>:<line>'.")
_SHOW = 20  # skipped files listed one per line in the text report before "... and N more"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]  # one line, as all errors
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


# -- opening the store -------------------------------------------------------------------------
def _label(args: argparse.Namespace) -> str:
    where = f"{args.host}:{args.port}" if args.host else args.store
    return where if args.collection == "retrievekit" else f"{where} (collection " \
        f"{args.collection!r})"


def _settle_store(args: argparse.Namespace) -> dict[str, Any]:
    """The store a command opens: each of --store, --collection, --host and --port as given,
    else as the --config file's [store] table sets it, else StoreConfig's default. The
    table's other keys (ssl, auth_token, replica_dir, private, hnsw_*) come along in the
    [store] table returned, kept as `args.store_table`."""
    from .config import RetrieverConfig
    from .store import StoreConfig

    if hasattr(args, "store_table"):
        return args.store_table
    store = RetrieverConfig.from_toml(args.config).store if args.config else StoreConfig()
    table = {**store.to_dict(), "auth_token": store.auth_token}
    flags = {"path": args.store, "collection": args.collection, "host": args.host,
             "port": args.port}
    table.update({k: x for k, x in flags.items() if x is not None})
    args.store, args.collection = table["path"], table["collection"]
    args.host, args.port = table["host"], table["port"]
    args.store_table = table
    return table


def _config_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a --config file names, as it names them (the file is validated whole
    first), minus [store]: an existing store keeps every recorded setting the file leaves
    out, where a whole table of defaults would conflict with them."""
    from .config import RetrieverConfig, read_toml

    given = read_toml(args.config)
    cfg = RetrieverConfig.from_dict(given)
    changes = {k: x for k, x in given.items() if k != "store"}
    if "reranker" in changes:
        changes["reranker"] = cfg.reranker
    return changes


def _open_existing(args: argparse.Namespace) -> tuple[Any, StoreError | None]:
    """(the store's retriever with its recorded settings, None), or (None, why not)."""
    from .pipeline import HybridRetriever

    t = _settle_store(args)
    kwargs: dict[str, Any] = {"collection": t["collection"], "private": t["private"]}
    if t["host"]:
        kwargs.update({k: t[k] for k in ("host", "port", "ssl", "auth_token", "replica_dir")})
    if args.config:
        kwargs.update(_config_changes(args))
    try:
        return HybridRetriever.open(t["path"], **kwargs), None
    except StoreError as exc:
        return None, exc


def _open(args: argparse.Namespace, *, write: bool = False, has_docs: bool = True
          ) -> tuple[Any, bool]:
    """(retriever, created). Only a write with documents creates a missing store."""
    r, missing = _open_existing(args)
    if r is not None:
        if write and getattr(args, "model", None):
            try:
                _check_model(r, args.model)
            except BaseException:
                r.close()  # not left to the garbage collector: it holds the store's locks
                raise
        return r, False
    assert missing is not None
    if not (write and has_docs):
        raise missing
    from .config import RetrieverConfig
    from .pipeline import HybridRetriever

    cfg = RetrieverConfig.from_toml(args.config) if args.config else RetrieverConfig()
    changes: dict[str, Any] = {"store": _settle_store(args)}
    if args.model:
        changes["embedder"] = {"model": args.model}
    return HybridRetriever(cfg.replace(**changes)), True


def _check_model(r: Any, model: str) -> None:
    """Refuse --model when the store was made with another one, listing the differences."""
    recorded = r.info()["settings"]
    if model == recorded["embedder"]["model"]:
        return
    from .embedding import Embedder
    from .settings import diff, index_settings

    want = r.config.replace(embedder={"model": model})
    try:
        diffs = diff(recorded, index_settings(want, Embedder(want.embedder)))
    except RetrieveKitError:  # the other model cannot even be loaded: its name is the diff
        diffs = [("embedder.model", recorded["embedder"]["model"], model)]
    lines = "; ".join(f"{k}: store has {a!r}, --model gives {b!r}" for k, a, b in diffs)
    raise StoreMismatchError(
        f"--model {model!r} does not match the store, which was made with other settings "
        f"({lines}); omit --model to index with the store's own model, or give another "
        "--store or --collection for a store of the new model")


# -- index --------------------------------------------------------------------------------------
def _show(path: Path | str) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    p = Path(path)
    try:
        return p.relative_to(Path.cwd()).as_posix() or "."
    except ValueError:
        return str(p)


def _tree_roots(r: Any, scopes: Sequence[Any]) -> dict[Path, Path]:
    """For each file named alone that the store holds through a directory above it, that
    directory (its `root`): read through it again, the file keeps its ids, and `--prune`
    keeps its documents, where its own folder would give it new ids beside the old."""
    roots: dict[Path, Path] = {}
    for scope in scopes:
        if scope.is_dir:
            continue
        ids = r.document_ids(where=scope.where)
        for doc in r.get(ids[:1]):
            root = Path(str(doc.metadata.get("root", "")))
            if root != scope.path.parent and root in scope.path.parents:
                roots[scope.path] = root
    return roots


def _stale(r: Any, scopes: Sequence[Any]) -> list[str]:
    """Documents recorded under the paths given that this run did not produce, except those
    of files that are still there but could not be read this time."""
    stale: dict[str, None] = {}
    for scope in scopes:
        keep = set(scope.produced)
        if scope.unreadable:
            keep.update(r.document_ids(where={"$and": [
                scope.where, {"source": {"$in": sorted(scope.unreadable)}}]}))
        for doc_id in r.document_ids(where=scope.where):
            if doc_id not in keep:
                stale.setdefault(doc_id)
    return list(stale)


def _skip_lines(skipped: Sequence[Any]) -> list[str]:
    """The text report of skipped files: actionable ones one per line, the rest counted."""
    lines: list[str] = []
    listed = [s for s in skipped if s.kind not in ("hidden", "unsupported")]
    for s in listed[:_SHOW]:
        where = f"{_show(s.path)} line {s.line}" if s.line is not None else _show(s.path)
        lines.append(f"  {where}: {s.reason}")
    if len(listed) > _SHOW:
        lines.append(f"  ... and {len(listed) - _SHOW} more (--json lists all)")
    hidden = [s for s in skipped if s.kind == "hidden"]
    if hidden:
        names = ", ".join(_show(s.path) for s in hidden[:3]) + (", ..." if len(hidden) > 3 else "")
        lines.append(f"  {len(hidden)} hidden (name starts with '.'; --hidden includes them): "
                     f"{names}")
    unsupported = [s for s in skipped if s.kind == "unsupported"]
    if unsupported:
        from .loaders import SUPPORTED_SUFFIXES

        kinds = Counter(s.path.suffix.lower() or "(no suffix)" for s in unsupported)
        lines.append(f"  {len(unsupported)} not indexed by type: " + ", ".join(
            f"{k} ({n})" for k, n in kinds.most_common()) + f"; indexed types: "
            f"{' '.join(SUPPORTED_SUFFIXES)}")
    return lines


def cmd_index(args: argparse.Namespace) -> int:
    from .loaders import LoadOptions, load

    options = LoadOptions(text_field=args.text_field, encoding=args.encoding,
                          hidden=args.hidden, exclude=() if args.host else (Path(args.store),))
    loaded = load(args.paths, options)  # read everything before touching the store
    logger.info("read %d documents from %d files under %s; %d skipped", len(loaded.documents),
                len(loaded.files), " ".join(args.paths), len(loaded.skipped))
    try:
        r, created = _open(args, write=True, has_docs=bool(loaded.documents))
    except StoreError as exc:
        if loaded.documents:
            raise
        why = "; ".join(f"{_show(s.path)}: {s.reason}" for s in loaded.skipped[:3]) or \
            "no files found"
        if len(loaded.skipped) > 3:
            why += f"; {len(loaded.skipped) - 3} more skipped"
        raise InvalidInputError(f"nothing to index in {' '.join(args.paths)} ({why}), so no "
                                f"store was created at {_label(args)}") from exc
    try:
        with r:
            roots = _tree_roots(r, loaded.scopes)
            if roots:  # files named alone that a tree indexed: read through that tree
                loaded = load(args.paths, options, roots)
            before = r.count()
            if loaded.documents:
                r.add_documents(loaded.documents, progress=not args.quiet and sys.stderr.isatty())
            stats = dict(r.last_add_stats)
            stale = _stale(r, loaded.scopes)
            pruned = stale if args.prune else []
            if pruned:
                r.delete(pruned)
            after = r.count()
    except BaseException:
        if created:
            r.store.discard()  # a failed first index leaves no store behind
        raise
    report = {"store": args.host and f"{args.host}:{args.port}" or args.store,
              "collection": args.collection, "documents": len(loaded.documents),
              "files": [f.to_dict() for f in loaded.files], "records_written": stats["written"],
              "records_unchanged": stats["unchanged"], "stale_chunks_removed": stats["removed"],
              "records_before": before, "records_after": after, "pruned": pruned,
              "not_found": [] if args.prune else stale,
              "skipped": [s.to_dict() for s in loaded.skipped]}
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return 0
    print(f"indexed {_n(len(loaded.documents), 'document')} from "
          f"{_n(len(loaded.files), 'file')} into {_label(args)}: {stats['written']} records "
          f"written, {stats['unchanged']} unchanged, {stats['removed']} stale chunks removed; "
          f"{before} -> {after} records")
    if pruned:
        print(f"pruned {_n(len(pruned), 'document')} no longer found: {_few(pruned)}")
    if loaded.skipped:
        print(f"skipped {len(loaded.skipped)}:")
        print("\n".join(_skip_lines(loaded.skipped)))
    if stale and not args.prune:
        print(f"note: {_n(len(stale), 'document')} indexed earlier from these paths were not "
              f"found this time ({_few(stale)}); `retrievekit index --prune` deletes them")
    return 0


def _n(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _few(ids: Sequence[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f", ... ({len(ids) - n} more)" if len(ids) > n else "")


# -- delete -------------------------------------------------------------------------------------
def _matching(r: Any, target: str) -> list[str]:
    """Ids a `delete` target names: a document id, or a path of an indexed file (the
    documents read from it) or directory (every document read from a file under it)."""
    from .loaders import resolve_dir, resolve_file

    found: dict[str, None] = dict.fromkeys(d.id for d in r.get([target]))
    is_dir = Path(target).is_dir()
    p = resolve_dir(target) if is_dir else resolve_file(target)
    found.update(dict.fromkeys(r.document_ids(where={"$or": [{"source": str(p)},
                                                              {"root": str(p)}]})))
    if not Path(target).is_file() and p.parents:  # a directory inside a tree indexed higher up
        above = r.document_ids(where={"root": {"$in": [str(a) for a in p.parents]}})
        for s in range(0, len(above), 500):
            for d in r.get(above[s:s + 500]):
                if Path(str(d.metadata.get("source", ""))).is_relative_to(p):
                    found.setdefault(d.id)
    return list(found)


def cmd_delete(args: argparse.Namespace) -> int:
    r, _ = _open(args)
    with r:
        matched = {t: _matching(r, t) for t in args.targets}
        unmatched = [t for t, ids in matched.items() if not ids]
        if unmatched:
            raise InvalidInputError(
                f"nothing in {_label(args)} matches {', '.join(map(repr, unmatched))}; give "
                "document ids (as `search` prints them) or paths of indexed files or "
                "directories. Nothing was deleted")
        ids = list(dict.fromkeys(i for found in matched.values() for i in found))
        before = r.count()
        r.delete(ids)
        after = r.count()
    if args.json:
        print(json.dumps({"store": _label(args), "deleted": ids, "records_before": before,
                          "records_after": after}, ensure_ascii=False, indent=2))
    else:
        print(f"deleted {_n(len(ids), 'document')} from {_label(args)}: {_few(ids)}; "
              f"{before} -> {after} records")
    return 0


# -- search, info -------------------------------------------------------------------------------
def _reranker(args: argparse.Namespace, configured: Any) -> Any:
    """The --config file's reranker with --rerank's model and --rerank-weight laid over
    it (its other settings, top_n and candidates among them, kept)."""
    from .rerank import Reranker

    if configured is None and not args.rerank:
        raise InvalidInputError(
            f"--rerank-weight {args.rerank_weight} has no reranker to weigh; give --rerank "
            "MODEL, or a --config file with a [reranker] table")
    changes = {k: x for k, x in (("model", args.rerank), ("weight", args.rerank_weight))
               if x is not None}
    return Reranker(configured.config if configured else None, **changes)


def cmd_search(args: argparse.Namespace) -> int:
    try:
        where = json.loads(args.where) if args.where else None
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"--where {args.where!r} is not JSON ({exc.msg}); give a "
                                "Chroma filter such as '{\"topic\": \"code\"}'") from exc
    r, _ = _open(args)
    with r:
        if args.rerank or args.rerank_weight is not None:
            r.reranker = _reranker(args, r.reranker)
        logger.info("searching %s (%d records), mode %s", _label(args), r.count(),
                    args.mode or r.config.mode)
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
    if not hits:
        print("no hits", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    r, _ = _open(args)
    with r:
        info = r.info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    s = info.get("settings") or {}
    emb = s.get("embedder", {})
    print(f"store       {_label(args)}\n"
          f"records     {info['records']} (BM25 index: {info['bm25_records']}, Chroma: "
          f"{info['chroma_records']})\n"
          f"model       {emb.get('model')} (dim {emb.get('dim')}, truncate_dim "
          f"{emb.get('truncate_dim')})\n"
          f"format      {s.get('format')}; --json prints every recorded setting")
    return 0


# -- eval, tune ---------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from .report import run_eval

    if args.threads is not None:
        if args.threads < 1:
            raise InvalidInputError(f"--threads {args.threads}: give an int >= 1")
        import torch

        torch.set_num_threads(args.threads)
    options = _eval_options(args) if args.config else {}
    if "candidates" in options and args.candidates is not None:
        raise InvalidInputError(f"--candidates {args.candidates} and candidates = "
                                f"{options['candidates']} in --config {args.config}: give one")
    candidates = options.pop("candidates", args.candidates)
    run_eval(args.dataset, modes=args.modes.split(","), k=args.k, out=args.out,
             split=args.split, model=args.model, reranker=args.reranker,
             cache_dir=args.cache_dir, max_queries=args.max_queries, truncate_dim=args.truncate_dim,
             candidates=100 if candidates is None else candidates,
             rerank_candidates=args.rerank_candidates,
             rerank_weight=args.rerank_weight, dtype=args.dtype, options=options,
             progress=False if args.quiet else None)
    return 0


def _eval_options(args: argparse.Namespace) -> dict[str, Any]:
    """The query-time settings of `eval --config` (a `tune` trial's: tuned.toml)."""
    from .tune import check_settings

    return check_settings(_config_changes(args), f"--config {args.config}:")


def cmd_tune(args: argparse.Namespace) -> int:
    from .tune import table, tune

    trials = tune(args.dataset, split=args.split, out=args.out, model=args.model,
                  cache_dir=args.cache_dir, progress=False if args.quiet else None)
    print(table(trials))
    best = trials[0].settings
    print(f"\nbest on the {args.split} split: fusion={best['fusion']}, candidates="
          f"{best['candidates']}, weights={best['weights']}; written to "
          f"{Path(args.out) / 'tuned.toml'} (score it on test with `retrievekit eval "
          "--config`; it is a --config of index and search too)")
    return 0


# -- the parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="retrievekit", description="Hybrid BM25 + dense retrieval over Chroma.")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log progress at INFO level (and show tracebacks of unexpected errors)")
    sub = p.add_subparsers(dest="command", required=True)

    def store_args(sp: argparse.ArgumentParser) -> None:
        # each default is the --config file's [store] setting, else StoreConfig's
        sp.add_argument("--store", help="store directory (default .retrievekit/)")
        sp.add_argument("--collection", help="Chroma collection (default retrievekit)")
        sp.add_argument("--host", help="Chroma server host (instead of the embedded store)")
        sp.add_argument("--port", type=int, help="Chroma server port (default 8000)")
        sp.add_argument("--config", help="a TOML config file (see docs/configuration.md); "
                        "the flags above win over its [store] table")
        sp.set_defaults(settle=_settle_store)

    def json_arg(sp: argparse.ArgumentParser, what: str) -> None:
        sp.add_argument("--json", action="store_true",
                        help=f"print {what} as one JSON document on stdout")

    sp = sub.add_parser(
        "index", help="index files: text, markdown, HTML, PDF, JSONL (one document per file "
        "or JSONL record; long ones are chunked)",
        description="Index files and directories into the store (created on first use). "
        "Text (.txt .md .markdown .rst), HTML (.html .htm), PDF (.pdf, needs "
        "pip install 'retrievekit[pdf]') and JSON Lines (.jsonl .ndjson: one document per "
        "object, its text in --text-field, the other fields metadata). Files and folders "
        "whose name starts with '.' are left out (--hidden), and so is the store. Text must be "
        "UTF-8: other files are skipped and named (--encoding reads another codec). At the "
        "end, index reports what it indexed and what it skipped, and why. " + IDS_HELP +
        " Each document records its file in the metadata keys 'source' and 'root'.")
    sp.add_argument("paths", nargs="+", metavar="PATH", help="files or directories")
    sp.add_argument("--model", default=None,
                    help="embedding model of a new store (default all-MiniLM-L6-v2); an "
                    "existing store keeps its own, and a different --model is an error")
    sp.add_argument("--prune", action="store_true",
                    help="delete the documents recorded under these paths that this run did "
                    "not find (deleted files, removed JSONL records, files now left out); "
                    "files that exist but could not be read keep their documents")
    sp.add_argument("--text-field", default="text", metavar="NAME",
                    help="the JSONL field holding a record's text (default 'text')")
    sp.add_argument("--encoding", default=None,
                    help="decode text, HTML and JSONL files with this codec instead of UTF-8 "
                    "(e.g. cp1252)")
    sp.add_argument("--hidden", action="store_true",
                    help="also index files and folders whose name starts with '.'")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    json_arg(sp, "the report (indexed files, skipped ones with reasons, pruned ids)")
    store_args(sp)
    sp.set_defaults(func=cmd_index)

    sp = sub.add_parser("search", help="search the store")
    sp.add_argument("query")
    sp.add_argument("-k", "--k", type=int, default=5)
    sp.add_argument("--mode", choices=["hybrid", "dense", "sparse"], default=None)
    sp.add_argument("--where", help='a Chroma filter as JSON, e.g. \'{"topic": "code"}\'')
    sp.add_argument("--rerank", metavar="MODEL", help="rerank with this cross-encoder")
    sp.add_argument("--rerank-weight", type=float, default=None,
                    help="the cross-encoder's share of the order against the hybrid order, "
                    "in (0, 1] (default: the [reranker] table's, else 1: its order alone)")
    json_arg(sp, "the hits (a list)")
    store_args(sp)
    sp.set_defaults(func=cmd_search)

    sp = sub.add_parser("info", help="what the store holds and its settings")
    json_arg(sp, "the counts and every recorded setting")
    store_args(sp)
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser(
        "delete", help="delete documents by id or by the path they were indexed from",
        description="Delete documents. Each TARGET is a document id (as `search` prints it), "
        "the path of an indexed file (its documents; the file may be gone), or a directory "
        "(every document read from a file under it). A target that matches nothing is an "
        "error, and then nothing is deleted. " + IDS_HELP)
    sp.add_argument("targets", nargs="+", metavar="TARGET")
    json_arg(sp, "the deleted ids")
    store_args(sp)
    sp.set_defaults(func=cmd_delete)

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
    sp.add_argument("--candidates", type=int, default=None,
                    help="per-side candidates fused in hybrid mode (default 100; at least 100 "
                    "are used, so Recall@100 is meaningful)")
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
    sp.add_argument("--config", metavar="FILE",
                    help="a TOML file of query-time settings (fusion, candidates, weights, "
                    "rrf_k, chunk_penalty), e.g. the tuned.toml of `retrievekit tune`")
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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, its one line printed)
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "quiet", False) or not sys.stderr.isatty():
        # the hub's and transformers' bars ("Loading weights") read this once, at import;
        # a transformers imported before main() (a host program, a test) is told directly
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    try:
        if hasattr(args, "settle"):
            args.settle(args)
        return int(args.func(args) or 0)
    except RetrieveKitError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
    except BrokenPipeError:  # `retrievekit search ... | head`: the reader left, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a file or directory the command could not read or write
        print(f"error: {_one_line(exc)}", file=sys.stderr)
    except Exception as exc:  # a bug: still one line; -v shows where
        if args.verbose:
            logger.exception("unexpected error")
        print(f"error: unexpected {type(exc).__name__}: {_one_line(exc)} (rerun with -v for "
              "the traceback, and please report it)", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
