"""Retrieval evaluation: BEIR-layout loader, ranking metrics and a timed evaluation loop.

Conventions (fixed here once, and checked against ranx in the tests):

- Relevance: a judgment counts when its grade is > 0 (ranx ``rel_lvl=1``); judgments with
  grade <= 0 are ignored. A query is *judged* when it has at least one relevant document;
  only judged queries are scored, and means are taken over all of them. A judged query that
  is missing from the run scores 0 on every metric (ranx ``make_comparable=True``,
  ``trec_eval -c``). Queries of the run without judgments are ignored.
- ``ndcg@k``: trec_eval / Järvelin-Kekäläinen form, linear gain = the graded relevance,
  discount ``log2(rank + 1)``, ideal DCG from the qrels' grades sorted descending, cut at k.
- ``recall@k``: relevant documents in the top k / all relevant documents of the query.
- ``mrr@k``: 1 / rank of the first relevant document in the top k, else 0.
- ``map@k``: ranx's (and trec_eval ``map_cut``'s) definition: the sum of precision@r over the
  ranks r <= k that hold a relevant document, divided by the *total* number of relevant
  documents of the query (not by ``min(R, k)``), so a query with more than k relevant
  documents cannot reach 1.
- Ties in a ``{doc_id: score}`` run are broken by doc id ascending (score descending first),
  so results are deterministic. ranx leaves the order of ties unspecified and trec_eval
  breaks them by doc id *descending*: on runs with tied scores around a relevant document the
  numbers can differ from those tools; on runs without ties they agree.
- BEIR convention (``ignore_identical_ids=True``): a retrieved document whose id equals the
  query id is dropped before the ranking is cut at k (BEIR's ``EvaluateRetrieval.evaluate``).
  The qrels are left alone. In collections where query and document ids are unrelated
  numbers (cisi has 7 such relevant pairs, cranfield 1) the rule hides relevant documents;
  a warning says so, and ``ignore_identical_ids=False`` turns the rule off.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np

from retrievekit import validate as v
from retrievekit.errors import InvalidInputError
from retrievekit.records import check_document_id

logger = logging.getLogger(__name__)

__all__ = [
    "BeirDataset",
    "EvalResult",
    "LatencyStats",
    "METRICS",
    "dataset_documents",
    "evaluate",
    "evaluate_run",
    "load_beir",
    "map_at_k",
    "mrr_at_k",
    "ndcg_at_k",
    "recall_at_k",
]

#: Metric names accepted by `evaluate_run` and `evaluate`.
METRICS = ("ndcg", "recall", "mrr", "map")

Qrels = Mapping[str, Mapping[str, int]]
#: A run: per query, either ``{doc_id: score}`` (ranked by score desc, then doc id) or an
#: already ranked sequence of doc ids.
Run = Mapping[Any, Union[Mapping[Any, float], Sequence[Any]]]
SearchFn = Callable[[str, int], Sequence[Any]]


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BeirDataset:
    """A retrieval test collection in the BEIR layout.

    Attributes:
        name: the directory name (e.g. ``"nfcorpus"``).
        corpus: doc id -> ``{"title": str, "text": str}``.
        queries: query id -> query text, only the queries judged in `qrels`.
        qrels: query id -> {doc id -> grade}, only grades > 0.
        split: the qrels split that was read (``"test"``, ``"dev"``, ``"train"``).
    """

    name: str
    corpus: dict[str, dict[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    split: str = "test"

    def __repr__(self) -> str:
        return (
            f"BeirDataset(name={self.name!r}, split={self.split!r}, docs={len(self.corpus)}, "
            f"queries={len(self.queries)}, judgments={sum(len(v) for v in self.qrels.values())})"
        )


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[None]:
    """A file that is not UTF-8 text (or not gzip, for a `.gz`) as an InvalidInputError
    naming it."""
    try:
        yield
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as exc:
        raise InvalidInputError(
            f"{path} is not readable as UTF-8 text{' in gzip' if path.suffix == '.gz' else ''}"
            f" ({type(exc).__name__}: {exc}); BEIR files are UTF-8 JSON lines and TSV"
        ) from exc


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with _readable(path), opener(path, "rt", encoding="utf-8-sig") as fh:  # type: ignore[operator]
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(
                    f"{path}:{lineno} is not valid JSON ({exc.msg}); each line of a BEIR "
                    "jsonl file must be one JSON object"
                ) from exc
            if not isinstance(record, dict) or "_id" not in record:
                raise InvalidInputError(
                    f"{path}:{lineno} has no '_id' field; BEIR records look like "
                    '{"_id": "...", "title": "...", "text": "..."}'
                )
            rid = record["_id"]
            if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
                raise InvalidInputError(
                    f"{path}:{lineno} has '_id' {rid!r}; an id is a non-empty string (or int)")
            for key in ("title", "text"):
                if record.get(key) is not None and not isinstance(record[key], str):
                    raise InvalidInputError(
                        f"{path}:{lineno} has a {key!r} of type {type(record[key]).__name__}"
                        f"; it must be a string")
            yield lineno, record


def _layout_error(root: Path, missing: str) -> InvalidInputError:
    return InvalidInputError(
        f"load_beir(path={str(root)!r}): missing {missing}. Expected the BEIR layout: "
        "corpus.jsonl (or corpus.jsonl.gz), queries.jsonl and qrels/<split>.tsv"
    )


def load_beir(path: str | Path, split: str = "test") -> BeirDataset:
    """Load a BEIR-layout collection: corpus, judged queries of `split`, and positive qrels.

    Args:
        path: directory holding ``corpus.jsonl[.gz]``, ``queries.jsonl`` and ``qrels/``.
        split: which ``qrels/<split>.tsv`` to read (a name, not a path).

    Returns:
        The dataset, with `queries` restricted to the queries judged (grade > 0) in the split.

    Raises:
        InvalidInputError: a file is missing or malformed, a judgment is given twice with
            two grades, a judged query has no text, or a document id is one the store
            refuses.
    """
    qrels_path = split_file(path, split)
    root = Path(path)
    if not root.is_dir():
        raise InvalidInputError(
            f"load_beir(path={str(root)!r}): not a directory; pass the folder of a BEIR "
            "collection (holding corpus.jsonl, queries.jsonl, qrels/)"
        )
    corpus_path = next(
        (p for p in (root / "corpus.jsonl", root / "corpus.jsonl.gz") if p.is_file()), None
    )
    if corpus_path is None:
        raise _layout_error(root, "corpus.jsonl (or corpus.jsonl.gz)")
    queries_path = root / "queries.jsonl"
    if not queries_path.is_file():
        raise _layout_error(root, "queries.jsonl")
    if not qrels_path.is_file():
        available = sorted(p.stem for p in (root / "qrels").glob("*.tsv"))
        err = _layout_error(root, f"qrels/{split}.tsv")
        raise InvalidInputError(f"{err} (split={split!r}; splits found: {available or 'none'})")

    qrels = _read_qrels(qrels_path)

    all_queries: dict[str, tuple[str, int]] = {}  # id -> (text, line)
    for lineno, rec in _read_jsonl(queries_path):
        if str(rec["_id"]) in all_queries:
            raise InvalidInputError(f"{queries_path}:{lineno} repeats query id "
                                    f"{str(rec['_id'])!r}; ids must be unique")
        all_queries[str(rec["_id"])] = (str(rec.get("text") or ""), lineno)
    missing = [qid for qid in qrels if qid not in all_queries]
    if missing:
        raise InvalidInputError(
            f"{qrels_path} judges {len(missing)} query ids absent from {queries_path} "
            f"(first: {missing[:5]}); the qrels and queries files do not belong together"
        )
    queries = {qid: all_queries[qid][0] for qid in qrels}
    for qid, text in queries.items():  # a search would refuse it, after the whole indexing
        v.readable(f"{queries_path}:{all_queries[qid][1]} (query {qid!r}, judged in "
                   f"{qrels_path.name}) text", text, "give the query its text, or drop its "
                   "judgments")

    corpus: dict[str, dict[str, str]] = {}
    for lineno, rec in _read_jsonl(corpus_path):
        doc_id = str(rec["_id"])
        where = f"{corpus_path}:{lineno} '_id'"  # what the store would refuse, refused here
        v.utf8(where, doc_id, error=InvalidInputError)
        check_document_id(doc_id, where)
        if doc_id in corpus:
            raise InvalidInputError(
                f"{corpus_path}:{lineno} repeats document id {doc_id!r}; ids must be unique"
            )
        corpus[doc_id] = {"title": str(rec.get("title") or ""), "text": str(rec.get("text") or "")}

    unknown = sum(1 for docs in qrels.values() for d in docs if d not in corpus)
    if unknown:
        logger.warning(
            "%s: %d judgments name documents absent from %s; they count as relevant but "
            "can never be retrieved",
            qrels_path, unknown, corpus_path.name,
        )
    logger.info(
        "loaded %s/%s: %d docs, %d judged queries", root.name, split, len(corpus), len(queries)
    )
    return BeirDataset(name=root.name, corpus=corpus, queries=queries, qrels=qrels, split=split)


def split_file(path: str | Path, split: str) -> Path:
    """The qrels file of `split`: ``<path>/qrels/<split>.tsv``; a split is a name, so one
    spelled as a path (``./test``, ``../qrels/dev``) is refused: it could read another
    split's file than the one its name says."""
    if not isinstance(split, str) or not split or "/" in split or "\\" in split:
        v.fail("split", "the name of a qrels file without its .tsv (e.g. 'dev' for "
               "qrels/dev.tsv), not a path", split, error=InvalidInputError)
    return Path(path) / "qrels" / f"{split}.tsv"


_INTEGER = re.compile(r"[+-]?[0-9]+")  # not int()'s: it reads "1_0" as 10
_HEADER = ("query-id", "corpus-id", "score")  # the first line of BEIR's qrels files


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    seen: dict[tuple[str, str], tuple[int, int]] = {}  # (query, doc) -> (grade, line)
    with _readable(path), open(path, encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) != 3:
                raise InvalidInputError(
                    f"{path}:{lineno} has {len(cols)} tab-separated columns, expected 3 "
                    "(query-id, corpus-id, score)"
                )
            qid, doc_id, raw = (c.strip() for c in cols)
            if lineno == 1 and (qid, doc_id, raw) == _HEADER:
                continue
            if not _INTEGER.fullmatch(raw):
                raise InvalidInputError(
                    f"{path}:{lineno} has score {raw!r}; scores must be integers (a header "
                    f"line reads {chr(9).join(_HEADER)!r})")
            grade = int(raw)
            first = seen.setdefault((qid, doc_id), (grade, lineno))
            if first[0] != grade:  # which one counts would depend on the order of lines
                raise InvalidInputError(
                    f"{path}:{lineno} judges {qid!r} - {doc_id!r} again, with grade {grade}"
                    f" where line {first[1]} gave grade {first[0]}; keep one of them")
            if grade > 0:
                qrels.setdefault(qid, {})[doc_id] = grade
    if not qrels:
        raise InvalidInputError(f"{path} holds no judgment with score > 0; nothing to evaluate")
    return qrels


def dataset_documents(ds: BeirDataset) -> Iterator[tuple[str, str]]:
    """Yield ``(doc_id, text)`` for the corpus, text = title + newline + body (title if any)."""
    for doc_id, doc in ds.corpus.items():
        title = (doc.get("title") or "").strip()
        body = (doc.get("text") or "").strip()
        yield doc_id, (f"{title}\n{body}" if title else body)


# --------------------------------------------------------------------------------------
# Per-query metrics (ranking: ranked doc ids; relevant: doc id -> grade > 0)
# --------------------------------------------------------------------------------------


def recall_at_k(ranking: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """Share of the relevant documents found in the top `k` of `ranking`."""
    return _checked(_recall, ranking, relevant, k)


def mrr_at_k(ranking: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """1 / rank of the first relevant document within the top `k`, else 0."""
    return _checked(_mrr, ranking, relevant, k)


def ndcg_at_k(ranking: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """nDCG@k with linear gain (the grade) and log2(rank + 1) discount (trec_eval)."""
    return _checked(_ndcg, ranking, relevant, k)


def map_at_k(ranking: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """Average precision at k, divided by all relevant documents (ranx / trec_eval map_cut)."""
    return _checked(_map, ranking, relevant, k)


# The metrics proper, on a ranking without repeats, the relevant documents (grade > 0, at
# least one) and k >= 1.
def _recall(ranking: Sequence[str], rel: Mapping[str, int], k: int) -> float:
    return sum(1 for d in ranking[:k] if d in rel) / len(rel)


def _mrr(ranking: Sequence[str], rel: Mapping[str, int], k: int) -> float:
    for i, d in enumerate(ranking[:k], start=1):
        if d in rel:
            return 1.0 / i
    return 0.0


def _ndcg(ranking: Sequence[str], rel: Mapping[str, int], k: int) -> float:
    dcg = sum(rel.get(d, 0) / math.log2(i + 1) for i, d in enumerate(ranking[:k], start=1))
    ideal = sorted(rel.values(), reverse=True)[:k]
    return dcg / sum(g / math.log2(i + 1) for i, g in enumerate(ideal, start=1))


def _map(ranking: Sequence[str], rel: Mapping[str, int], k: int) -> float:
    hits = 0
    total = 0.0
    for i, d in enumerate(ranking[:k], start=1):
        if d in rel:
            hits += 1
            total += hits / i
    return total / len(rel)


_METRIC_FNS: dict[str, Callable[[Sequence[str], Mapping[str, int], int], float]] = {
    "ndcg": _ndcg,
    "recall": _recall,
    "mrr": _mrr,
    "map": _map,
}


def _checked(metric: Callable[[Sequence[str], Mapping[str, int], int], float],
             ranking: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """`metric` once `ranking` and `k` are checked (a document ranked twice would count
    twice, recall past 1; a cutoff below 1 means nothing); 0 without a relevant document."""
    k = int(k) if isinstance(k, np.integer) else k
    v.integer("k", k, 1, error=InvalidInputError, fix="e.g. 10")
    if len(set(ranking)) != len(ranking):
        raise InvalidInputError(f"ranking lists a document more than once: "
                                f"{v.shown(list(ranking))}; deduplicate by id first")
    rel = {d: g for d, g in relevant.items() if g > 0}
    return metric(ranking, rel, k) if rel else 0.0


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyStats:
    """Per-query search latency in seconds."""

    p50: float
    p95: float
    mean: float
    max: float
    total: float

    @classmethod
    def from_seconds(cls, seconds: Sequence[float]) -> LatencyStats:
        """Summarize per-query latencies (numpy linear-interpolated percentiles)."""
        if len(seconds) == 0:
            return cls(p50=0.0, p95=0.0, mean=0.0, max=0.0, total=0.0)
        arr = np.asarray(seconds, dtype=np.float64)
        return cls(
            p50=float(np.percentile(arr, 50)),
            p95=float(np.percentile(arr, 95)),
            mean=float(arr.mean()),
            max=float(arr.max()),
            total=float(arr.sum()),
        )


@dataclass(frozen=True)
class EvalResult:
    """Metric values per query and averaged over the judged queries.

    Attributes:
        means: metric name (``"ndcg@10"``, ``"recall@100"``, ...) -> mean over judged queries.
        per_query: query id -> {metric name -> value}; every judged query is present.
        num_queries: number of judged queries the means are taken over.
        latency: per-query search latency summary (set by `evaluate`, None for `evaluate_run`).
        per_query_latency: query id -> seconds spent in ``search_fn`` (set by `evaluate`).
    """

    means: dict[str, float]
    per_query: dict[str, dict[str, float]]
    num_queries: int
    latency: LatencyStats | None = None
    per_query_latency: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, metric: str) -> float:
        try:
            return self.means[metric]
        except KeyError:
            raise KeyError(
                f"metric {metric!r} was not computed; available: {sorted(self.means)}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of the means, query count and latency summary."""
        out: dict[str, Any] = {"num_queries": self.num_queries, **self.means}
        if self.latency is not None:
            out["latency_s"] = {
                "p50": self.latency.p50,
                "p95": self.latency.p95,
                "mean": self.latency.mean,
                "max": self.latency.max,
                "total": self.latency.total,
            }
        return out


# --------------------------------------------------------------------------------------
# Run-level evaluation
# --------------------------------------------------------------------------------------


def _validate_ks_metrics(
    ks: Iterable[int], metrics: Iterable[str]
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    if isinstance(ks, (int, np.integer)):
        ks = (ks,)
    ks_t = tuple(int(k) if isinstance(k, np.integer) else k for k in ks)
    if not ks_t:
        v.fail("ks", "a non-empty list of cutoffs", ks_t, "e.g. ks=(10, 100)",
               error=InvalidInputError)
    for i, k in enumerate(ks_t):
        v.integer(f"ks[{i}]", k, error=InvalidInputError, fix="e.g. ks=(10, 100)")
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics_t = tuple(metrics)
    bad = [m for m in metrics_t if m not in _METRIC_FNS]
    if not metrics_t or bad:
        raise InvalidInputError(
            f"metrics={metrics_t!r}: unknown {bad or 'empty'}; choose from {list(METRICS)}"
        )
    return tuple(dict.fromkeys(ks_t)), tuple(dict.fromkeys(metrics_t))


def _rank(qid: str, results: Mapping[str, float] | Sequence[Any]) -> list[str]:
    """Ranked doc ids of one query (ids as str, as in the qrels): score desc then doc id
    asc, or the given order of ids, ``(doc_id, score)`` pairs or hits."""
    if isinstance(results, Mapping):
        for doc_id, score in results.items():
            if not isinstance(score, (int, float, np.number)) or math.isnan(score):
                raise InvalidInputError(
                    f"run[{qid!r}][{doc_id!r}]={score!r}: scores must be real numbers (not NaN)"
                )
        scores = dict(zip(_ids(qid, list(results)), map(float, results.values())))
        return sorted(scores, key=lambda d: (-scores[d], d))
    if isinstance(results, str):
        raise InvalidInputError(
            f"run[{qid!r}] is a string; give a {{doc_id: score}} dict or a list of doc ids"
        )
    return _ids(qid, list(results))


def _ids(qid: str, items: list[Any]) -> list[str]:
    """The doc ids of one query's results, as str (`_doc_id`), each once."""
    ids = items if all(type(d) is str for d in items) else [_doc_id(d, qid) for d in items]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        for doc_id in ids:
            if doc_id in seen:
                raise InvalidInputError(
                    f"run[{qid!r}] lists document {doc_id!r} more than once; each document "
                    "may appear once per query (deduplicate by id before evaluating; 1 and "
                    "'1' are one id)")
            seen.add(doc_id)
    return ids


def _check_qrels(qrels: Qrels) -> dict[str, dict[str, int]]:
    """The judgments with grade > 0 by query, ids as str (checked as a run's are: 1 and "1"
    are one id, given once)."""
    judged: dict[str, dict[str, int]] = {}
    queries: set[str] = set()
    for qid, docs in qrels.items():
        query = _qrels_id(qid, queries, "qrels", "query")
        rel: dict[str, int] = {}
        seen: set[str] = set()
        for doc_id, grade in docs.items():
            doc = _qrels_id(doc_id, seen, f"qrels[{qid!r}]", "document")
            if not (v.is_int(grade) or isinstance(grade, np.integer)):
                raise InvalidInputError(
                    f"qrels[{qid!r}][{doc_id!r}]={grade!r}: relevance grades must be integers"
                )
            if grade > 0:
                rel[doc] = int(grade)
        if rel:
            judged[query] = rel
    if not judged:
        raise InvalidInputError("qrels holds no judgment with grade > 0; nothing to evaluate")
    return judged


def _qrels_id(value: Any, seen: set[str], where: str, what: str) -> str:
    """A qrels id as str, once in `seen` (it is added there)."""
    if not isinstance(value, (str, int, np.integer)) or isinstance(value, bool):
        raise InvalidInputError(f"{where} has the {what} id {v.shown(value)}; ids are str or "
                                "int")
    key = str(value)
    if key in seen:
        raise InvalidInputError(f"{where} has the {what} {value!r} twice (1 and '1' are one id)")
    seen.add(key)
    return key


def _warn_identical_ids(qrels: Mapping[str, Mapping[str, int]]) -> None:
    n = sum(1 for qid, docs in qrels.items() if qid in docs)
    if n:
        logger.warning(
            "%d relevant judgments have doc id == query id; with ignore_identical_ids=True "
            "(BEIR convention) they can never be retrieved. If query and document ids of "
            "this collection are unrelated, pass ignore_identical_ids=False",
            n,
        )


def _score_query(
    ranking: Sequence[str],
    relevant: Mapping[str, int],
    ks: tuple[int, ...],
    metrics: tuple[str, ...],
) -> dict[str, float]:
    """`ranking` as `_rank` gives it (no repeats), `relevant` as `_check_qrels` (grade > 0)."""
    return {f"{m}@{k}": _METRIC_FNS[m](ranking, relevant, k) for m in metrics for k in ks}


def _means(per_query: Mapping[str, Mapping[str, float]], names: Sequence[str]) -> dict[str, float]:
    n = len(per_query)
    if n == 0:
        return {name: 0.0 for name in names}
    return {name: math.fsum(v[name] for v in per_query.values()) / n for name in names}


def evaluate_run(
    run: Run,
    qrels: Qrels,
    ks: Iterable[int] = (10, 100),
    metrics: Iterable[str] = ("ndcg", "recall", "mrr", "map"),
    *,
    ignore_identical_ids: bool = True,
) -> EvalResult:
    """Score a run against qrels; see the module docstring for the conventions.

    Args:
        run: query id -> ``{doc_id: score}`` or a ranked list of doc ids, ``(doc_id,
            score)`` pairs or hits; ids are read as str, as the qrels' are (1 is "1").
        qrels: query id -> {doc id -> grade}; grades <= 0 are ignored.
        ks: cutoffs; each metric is computed at each cutoff (``"ndcg@10"`` ...).
        metrics: any of ``"ndcg"``, ``"recall"``, ``"mrr"``, ``"map"``.
        ignore_identical_ids: drop retrieved documents whose id equals the query id (BEIR).

    Returns:
        Per-query values for every judged query and their means.

    Raises:
        InvalidInputError: unknown metric, bad cutoff, non-integer grade, NaN score, a doc
            listed twice for a query, or qrels without any relevant document.
    """
    ks_t, metrics_t = _validate_ks_metrics(ks, metrics)
    judged = _check_qrels(qrels)
    if ignore_identical_ids:
        _warn_identical_ids(judged)
    names = [f"{m}@{k}" for m in metrics_t for k in ks_t]
    runs: dict[str, Any] = {}
    for qid, results in run.items():  # query ids as str, as in the qrels
        if str(qid) in runs:
            raise InvalidInputError(f"run has query {qid!r} twice (1 and '1' are one id)")
        runs[str(qid)] = results
    extra = sum(1 for qid in runs if qid not in judged)
    if extra:
        logger.info("ignoring %d run queries that have no relevant judgment", extra)
    per_query: dict[str, dict[str, float]] = {}
    missing = 0
    for qid, relevant in judged.items():
        results = runs.get(qid)
        if results is None:
            missing += 1
            ranking: list[str] = []
        else:
            ranking = _rank(qid, results)
            if ignore_identical_ids:
                ranking = [d for d in ranking if d != qid]
        per_query[qid] = _score_query(ranking, relevant, ks_t, metrics_t)
    if missing:
        logger.warning("%d judged queries are absent from the run; they score 0", missing)
    return EvalResult(
        means=_means(per_query, names), per_query=per_query, num_queries=len(per_query)
    )


# --------------------------------------------------------------------------------------
# Timed evaluation of a search function
# --------------------------------------------------------------------------------------


def _doc_id(item: Any, qid: str) -> str:
    """Doc id of one result, as str: an id (str or int), a ``(doc_id, score)`` pair or an
    object with ``.id`` (a retrievekit Hit)."""
    doc_id = item[0] if isinstance(item, (tuple, list)) and len(item) >= 1 else item \
        if isinstance(item, (str, int, np.integer)) else getattr(item, "id", None)
    # str() of anything but what would read as another id: None, bools, floats, bytes
    if doc_id is not None and not isinstance(doc_id, (bool, float, bytes, np.floating)):
        return str(doc_id)
    raise InvalidInputError(
        f"a result for query {qid!r} is {v.shown(item)}; give doc ids (str or int), "
        "(doc_id, score) pairs or objects with an `id` attribute (retrievekit Hit)")


def evaluate(
    search_fn: SearchFn,
    dataset: BeirDataset,
    k: int = 100,
    *,
    ks: Iterable[int] | None = None,
    metrics: Iterable[str] = ("ndcg", "recall", "mrr", "map"),
    progress: bool = True,
    ignore_identical_ids: bool = True,
) -> EvalResult:
    """Run `search_fn` on every judged query of `dataset`, time it, and score the results.

    Args:
        search_fn: ``search_fn(query_text, k)`` -> ranked results, each a ``(doc_id, score)``
            tuple or an object with an ``id`` (e.g. `retrievekit.types.Hit`).
        dataset: from `load_beir`.
        k: how many results to ask for per query. When `ignore_identical_ids` is on and the
            query id is also a document id, ``k + 1`` are asked for so that dropping the
            query's own document still leaves k (as BEIR's retrievers do).
        ks: metric cutoffs, each <= k; default ``(10, k)`` (just ``(k,)`` when k <= 10).
        metrics: any of ``"ndcg"``, ``"recall"``, ``"mrr"``, ``"map"``.
        progress: show a tqdm bar (only when stderr is a terminal).
        ignore_identical_ids: drop results whose id equals the query id (BEIR convention).

    Returns:
        Metric means and per-query values, plus per-query latency and its p50/p95/mean.

    Raises:
        InvalidInputError: bad `k`/`ks`/`metrics`, or `search_fn` returned malformed results.
    """
    v.integer("k", k, error=InvalidInputError, fix="results asked per query")
    ks_in: Iterable[int] = ks if ks is not None else tuple(sorted({min(10, k), k}))
    ks_t, metrics_t = _validate_ks_metrics(ks_in, metrics)
    too_big = [c for c in ks_t if c > k]
    if too_big:
        raise InvalidInputError(
            f"ks={ks_t!r} has cutoffs {too_big} above k={k}; raise k or lower the cutoffs"
        )
    if not callable(search_fn):
        raise InvalidInputError(f"search_fn={search_fn!r} is not callable; pass f(query, k)")

    judged = _check_qrels(dataset.qrels)
    if ignore_identical_ids:
        _warn_identical_ids(judged)
    names = [f"{m}@{c}" for m in metrics_t for c in ks_t]

    from tqdm.auto import tqdm  # deferred: only this function needs it

    disable = not progress or not sys.stderr.isatty()
    per_query: dict[str, dict[str, float]] = {}
    latencies: dict[str, float] = {}
    for qid in tqdm(judged, desc=f"evaluate {dataset.name}", unit="q", disable=disable):
        relevant = judged[qid]
        text = dataset.queries.get(qid)
        if text is None:
            raise InvalidInputError(
                f"dataset {dataset.name!r} judges query {qid!r} but has no text for it; "
                "load it with load_beir()"
            )
        fetch = k + 1 if ignore_identical_ids and qid in dataset.corpus else k
        start = time.perf_counter()
        results = search_fn(text, fetch)
        latencies[qid] = time.perf_counter() - start
        ranking = _rank(qid, results)
        if ignore_identical_ids:
            ranking = [d for d in ranking if d != qid]
        per_query[qid] = _score_query(ranking[:k], relevant, ks_t, metrics_t)

    latency = LatencyStats.from_seconds(list(latencies.values()))
    result = EvalResult(
        means=_means(per_query, names),
        per_query=per_query,
        num_queries=len(per_query),
        latency=latency,
        per_query_latency=latencies,
    )
    logger.info(
        "evaluated %s: %d queries, %s, latency p50 %.4fs p95 %.4fs",
        dataset.name, result.num_queries,
        ", ".join(f"{n}={v:.4f}" for n, v in result.means.items()), latency.p50, latency.p95,
    )
    return result
