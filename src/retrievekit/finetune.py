"""Fine-tuning on your own data: mine hard negatives, train, measure, keep or discard.

The flow behind ``retrievekit finetune embedder|reranker``:

1. (query, relevant document) pairs come from a BEIR-layout collection's qrels split.
2. Hard negatives are mined with our own `HybridRetriever` (dense or hybrid mode) over the
   training corpus: high-ranked documents that are not judged relevant. Two guards against
   false negatives (relevant documents nobody judged): the top `skip_top` ranks are skipped,
   and a candidate whose dense cosine similarity to the query is within `margin` of the
   positive's (``candidate >= positive - margin``) is dropped. A document judged relevant
   for the query is never a negative.
3. An embedder is trained with in-batch plus hard negatives (MultipleNegativesRankingLoss,
   ``scale = 1 / temperature``), optionally wrapped in MatryoshkaLoss; a reranker is a
   cross-encoder trained on the same positives and negatives (binary cross-entropy on
   pos=1 / neg=0, or the cross-encoder MultipleNegativesRankingLoss).
4. Base and fine-tuned models are evaluated on another split with `retrievekit.report`
   (dense nDCG@10 for an embedder; hybrid against hybrid + reranker for a reranker), and the
   new model is kept only when it improved.

A saved model is a plain sentence-transformers directory: pass its path wherever a model
name is accepted (``Embedder(model=dir)``, ``Reranker(model=dir)``,
``HybridRetriever(model=dir)``). A store records its model and the model's file hash, so a
fine-tuned embedder needs a new store (re-index); a reranker does not.

torch, sentence-transformers and `datasets` are imported only when training starts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from . import validate as v
from .errors import ConfigError, InvalidInputError, MissingDependencyError

if TYPE_CHECKING:  # pragma: no cover
    import argparse

    from .pipeline import HybridRetriever

logger = logging.getLogger(__name__)

__all__ = [
    "MiningConfig",
    "MiningResult",
    "TrainConfig",
    "TrainingExample",
    "add_cli",
    "load_examples",
    "mine_hard_negatives",
    "pairs_from_qrels",
    "run_finetune",
    "save_examples",
    "train_embedder",
    "train_reranker",
]

#: Written into every model directory this module saves: what it was trained from and how.
TRAINING_INFO_FILE = "retrievekit_finetune.json"
RERANKER_LOSSES = ("bce", "mnrl")
_INSTALL = "pip install 'retrievekit[finetune]'"


# --------------------------------------------------------------------------------------
# Settings and data
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MiningConfig:
    """How hard negatives are mined.

    Args:
        mode: retriever mode that ranks the candidates, "dense" or "hybrid".
        num_negatives: negatives per (query, positive) pair; pairs with fewer usable
            candidates are skipped (and counted).
        depth: candidates considered per query below the skipped ranks.
        skip_top: ranks 1..skip_top are never used as negatives (likely unjudged positives).
        margin: drop a candidate whose dense cosine is >= the positive's cosine - margin
            (None: no score filter). A negative margin allows negatives slightly above it.
        candidates: per-side candidates of the retriever search (default: what depth needs).
        positive_depth: keep a (query, positive) pair only when the positive is among the
            retriever's top `positive_depth` hits for the query (None: every judged pair).
            For a reranker, set it (and `depth`) to about the number of candidates it will
            reorder: it then learns from the lists it will see, relevant and non-relevant
            documents that the first stage both ranks high. Trained on positives the first
            stage never retrieves against negatives it ranks high, a cross-encoder learns
            that looking like a first-stage hit means "not relevant".
        sampling: "top" takes the highest-ranked usable candidates (the classic hard
            negatives; every pair of a query gets the same ones); "random" draws them
            uniformly (seeded, per pair) from the usable candidates within `depth`.
        seed: seed of the "random" draw.
    """

    mode: str = "dense"
    num_negatives: int = 1
    depth: int = 100
    skip_top: int = 0
    margin: float | None = 0.05
    candidates: int | None = None
    positive_depth: int | None = None
    sampling: str = "top"
    seed: int = 0

    def __post_init__(self) -> None:
        v.choice("mining.mode", self.mode, ("dense", "hybrid"))
        v.integer("mining.num_negatives", self.num_negatives)
        v.integer("mining.depth", self.depth, fix="candidates per query")
        v.integer("mining.skip_top", self.skip_top, 0)
        v.number("mining.margin", self.margin, optional=True,
                 fix="cosine units, e.g. 0.05; None switches the score filter off")
        v.integer("mining.candidates", self.candidates, optional=True)
        v.integer("mining.positive_depth", self.positive_depth, optional=True,
                  fix="None keeps every judged positive")
        v.choice("mining.sampling", self.sampling, ("top", "random"),
                 fix="'top': highest-ranked negatives, 'random': drawn within depth")
        v.integer("mining.seed", self.seed, -2 ** 63)


@dataclass(frozen=True)
class TrainConfig:
    """Training settings shared by the embedder and the reranker.

    Args:
        epochs: passes over the examples (`max_steps` wins when set).
        max_steps: stop after this many optimizer steps (None: epochs decide).
        batch_size: examples per step; each brings its query, positive and negatives, and
            the embedder also sees the other examples' documents as in-batch negatives.
        learning_rate, warmup_ratio, weight_decay: AdamW with linear warmup then decay.
        max_seq_length: tokens per text (per pair for a reranker) during training; the
            embedder is saved with its original length, so indexing is unchanged.
        scale: MultipleNegativesRankingLoss scale = 1 / temperature (embedder: 20 = 0.05).
        matryoshka_dims: wrap the embedder loss in MatryoshkaLoss over these dims.
        matryoshka_weights: the loss weight of each dim, in the order of `matryoshka_dims`
            as given (None: all 1); raise a dim's weight to make its truncation keep more.
        reranker_loss: "bce" (binary cross-entropy on pos=1/neg=0) or "mnrl" (the
            cross-encoder MultipleNegativesRankingLoss: positive against hard and in-batch
            negatives).
        head_learning_rate: reranker: learning rate of the classification head (parameters
            named ``classifier``), which starts from random weights when the base is not a
            cross-encoder; None: `learning_rate`.
        max_seconds: stop training after this much wall time (checked after each step;
            the learning-rate schedule still assumes the full run). None: no limit.
        bf16: bfloat16 autocast (CPUs with AVX512-BF16/AMX, recent GPUs).
        seed: seeds torch, the data order and the batch sampler.
        device: "cpu", "cuda", ...; None lets the trainer pick.
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    learning_rate: float = 3e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_seq_length: int | None = 256
    scale: float = 20.0
    matryoshka_dims: tuple[int, ...] | None = None
    matryoshka_weights: tuple[float, ...] | None = None
    reranker_loss: str = "bce"
    head_learning_rate: float | None = None
    max_seconds: float | None = None
    bf16: bool = False
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        v.number("max_seconds", self.max_seconds, 0, low_open=True, optional=True)
        v.integer("epochs", self.epochs)
        v.integer("batch_size", self.batch_size)
        v.integer("max_steps", self.max_steps, optional=True, fix="None: epochs decide")
        v.integer("max_seq_length", self.max_seq_length, optional=True)
        v.number("learning_rate", self.learning_rate, 0, low_open=True)
        v.number("scale", self.scale, 0, low_open=True)
        v.number("head_learning_rate", self.head_learning_rate, 0, low_open=True,
                 optional=True, fix="None uses learning_rate")
        v.number("warmup_ratio", self.warmup_ratio, 0, 1)
        if self.warmup_ratio == 1:
            v.fail("warmup_ratio", "in [0, 1)", self.warmup_ratio)
        v.number("weight_decay", self.weight_decay, 0)
        v.choice("reranker_loss", self.reranker_loss, RERANKER_LOSSES)
        v.boolean("bf16", self.bf16)
        v.integer("seed", self.seed, -2 ** 63)
        v.text("device", self.device, optional=True, empty=False)
        weights = self.matryoshka_weights
        if self.matryoshka_dims is not None:
            dims = tuple(self.matryoshka_dims)
            if not dims or any(not v.is_int(d) or d < 1 for d in dims) \
                    or len(set(dims)) != len(dims):
                raise ConfigError(f"matryoshka_dims={self.matryoshka_dims!r}: give distinct "
                                  "positive ints, e.g. (384, 256, 128, 64)")
            if weights is not None:
                weights = tuple(weights)
                if len(weights) != len(dims) or any(
                        not (v.is_int(w) or isinstance(w, float)) or not 0 < w < math.inf
                        for w in weights):
                    raise ConfigError(
                        f"matryoshka_weights={self.matryoshka_weights!r}: give one positive "
                        f"number per dim of matryoshka_dims={dims!r}")
                by_dim = dict(zip(dims, weights))
            dims = tuple(sorted(dims, reverse=True))
            object.__setattr__(self, "matryoshka_dims", dims)
            if weights is not None:
                object.__setattr__(self, "matryoshka_weights",
                                   tuple(float(by_dim[d]) for d in dims))
        elif weights is not None:
            raise ConfigError("matryoshka_weights needs matryoshka_dims; set both or neither")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["matryoshka_dims"] = list(self.matryoshka_dims) if self.matryoshka_dims else None
        d["matryoshka_weights"] = list(self.matryoshka_weights) \
            if self.matryoshka_weights else None
        return d


@dataclass(frozen=True)
class TrainingExample:
    """One training row: a query, a relevant document and mined hard negatives.

    Scores are dense cosine similarities under the mining model (None where unknown).
    """

    query_id: str
    query: str
    positive_id: str
    positive: str
    negative_ids: tuple[str, ...]
    negatives: tuple[str, ...]
    positive_score: float | None = None
    negative_scores: tuple[float | None, ...] = ()
    negative_ranks: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"query_id": self.query_id, "query": self.query,
                "positive_id": self.positive_id, "positive": self.positive,
                "negative_ids": list(self.negative_ids), "negatives": list(self.negatives),
                "positive_score": self.positive_score,
                "negative_scores": list(self.negative_scores),
                "negative_ranks": list(self.negative_ranks)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "row") -> TrainingExample:
        missing = [k for k in ("query", "positive", "negatives") if k not in data]
        if missing:
            raise InvalidInputError(f"{where} lacks {missing}; training rows look like "
                                    '{"query": ..., "positive": ..., "negatives": [...]}')
        negatives = data["negatives"]
        if isinstance(negatives, str) or not isinstance(negatives, Sequence):
            raise InvalidInputError(f"{where}: 'negatives' must be a list of texts")
        texts = [data["query"], data["positive"], *negatives]
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise InvalidInputError(f"{where}: query, positive and negatives must be "
                                    "non-empty strings")
        if not negatives:
            raise InvalidInputError(f"{where}: 'negatives' is empty; give at least one (a row "
                                    "without would leave every row's negatives unused)")
        if any(n.strip() == data["positive"].strip() for n in negatives):
            raise InvalidInputError(f"{where}: a negative is the positive's text; drop it")
        ids = data.get("negative_ids") or ()
        if ids and len(ids) != len(negatives):
            raise InvalidInputError(f"{where}: {len(ids)} negative_ids for {len(negatives)} "
                                    "negatives; give one id a negative, or none")
        for key in ("positive_score", "negative_scores"):
            got = data.get(key)
            values = got if isinstance(got, (list, tuple)) else [] if got is None else [got]
            if not all(x is None or v.is_number(x) for x in values):
                raise InvalidInputError(f"{where}: {key}={got!r} must be numbers (None where "
                                        "unknown)")
        return cls(query_id=str(data.get("query_id", "")), query=data["query"],
                   positive_id=str(data.get("positive_id", "")), positive=data["positive"],
                   negative_ids=tuple(str(x) for x in data.get("negative_ids") or ()),
                   negatives=tuple(negatives),
                   positive_score=data.get("positive_score"),
                   negative_scores=tuple(data.get("negative_scores") or ()),
                   negative_ranks=tuple(int(r) for r in data.get("negative_ranks") or ()))


@dataclass(frozen=True)
class MiningResult:
    """The mined examples and what happened on the way (counts, seconds)."""

    examples: list[TrainingExample]
    stats: dict[str, Any] = field(default_factory=dict)


def save_examples(path: str | os.PathLike[str], examples: Iterable[TrainingExample]) -> Path:
    """Write examples as JSONL (one `TrainingExample.to_dict()` per line), atomically."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return out


def load_examples(path: str | os.PathLike[str]) -> list[TrainingExample]:
    """Read examples written by `save_examples` (or any JSONL with query/positive/negatives)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"load_examples(path={str(p)!r}): no such file")
    out: list[TrainingExample] = []
    with open(p, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{p}:{lineno} is not valid JSON ({exc.msg})") from exc
            if not isinstance(data, dict):
                raise InvalidInputError(f"{p}:{lineno} must be a JSON object")
            out.append(TrainingExample.from_dict(data, where=f"{p}:{lineno}"))
    return out


# --------------------------------------------------------------------------------------
# Pairs and hard-negative mining
# --------------------------------------------------------------------------------------


def pairs_from_qrels(qrels: Mapping[str, Mapping[str, int]], *, max_pairs: int | None = None,
                     max_pairs_per_query: int | None = None, seed: int = 0
                     ) -> list[tuple[str, str]]:
    """(query id, relevant doc id) pairs, spread over as many queries as possible.

    Each query's relevant documents are taken highest grade first (ties in a seeded random
    order). With `max_pairs`, pairs are drawn round-robin over the queries (in a seeded
    random order): every query's first positive, then every query's second, and so on.
    """
    v.integer("max_pairs", max_pairs, optional=True, error=InvalidInputError)
    v.integer("max_pairs_per_query", max_pairs_per_query, optional=True,
              error=InvalidInputError)
    rng = random.Random(seed)
    per_query: list[tuple[str, list[str]]] = []
    for qid in sorted(qrels):
        rel = [(d, g) for d, g in sorted(qrels[qid].items()) if g > 0]
        rng.shuffle(rel)
        rel.sort(key=lambda dg: -dg[1])  # stable: seeded order within a grade
        docs = [d for d, _ in rel][:max_pairs_per_query]
        if docs:
            per_query.append((qid, docs))
    rng.shuffle(per_query)
    out: list[tuple[str, str]] = []
    depth = max((len(d) for _, d in per_query), default=0)
    for i in range(depth):
        for qid, docs in per_query:
            if i < len(docs):
                out.append((qid, docs[i]))
                if max_pairs is not None and len(out) >= max_pairs:
                    return out
    return out


def _dense_scores(retriever: HybridRetriever, qvec: np.ndarray, ids: Sequence[str]
                  ) -> dict[str, float]:
    """Cosine of the query vector with each document (its best chunk), from the stored vectors."""
    if not ids:
        return {}
    out: dict[str, float] = {}
    q = np.asarray(qvec, dtype=np.float32)
    for parent, vec in retriever.stored_vectors(list(ids)):
        # with a funnel the store holds only the leading dims: compare on those
        qd = q[:vec.shape[0]]
        sim = float(vec @ qd / ((np.linalg.norm(qd) * np.linalg.norm(vec)) or 1.0))
        if sim > out.get(parent, -math.inf):
            out[parent] = sim
    return out


def mine_hard_negatives(retriever: HybridRetriever, queries: Mapping[str, str],
                        qrels: Mapping[str, Mapping[str, int]],
                        pairs: Sequence[tuple[str, str]] | None = None, *,
                        corpus: Mapping[str, str] | None = None,
                        config: MiningConfig | None = None,
                        progress: bool | None = None) -> MiningResult:
    """Mine hard negatives for (query, positive) pairs with `retriever`.

    Args:
        retriever: a `HybridRetriever` whose store holds the training corpus under the
            same document ids as `qrels`.
        queries: query id -> text.
        qrels: query id -> {doc id: grade}; every document with grade > 0 counts as relevant
            to that query and is never used as its negative.
        pairs: the (query id, positive doc id) pairs to mine for (default: every relevant
            pair of `qrels`, see `pairs_from_qrels`).
        corpus: doc id -> text used for the rows; default: the documents from the store.
        config: mining settings (`MiningConfig`).
        progress: a tqdm bar over queries (default: when stderr is a terminal).

    Returns:
        One `TrainingExample` per pair that found `num_negatives` negatives, and counts:
        pairs asked for, examples, pairs skipped for lack of negatives or of a stored
        positive, candidates dropped as relevant or inside `skip_top` (per query), and
        (pair, candidate) checks failed by `margin` (per pair: a candidate too close to one
        positive may still serve a higher-scoring positive of the same query).
    """
    from tqdm.auto import tqdm

    cfg = config or MiningConfig()
    if not isinstance(cfg, MiningConfig):
        raise InvalidInputError(f"config must be a MiningConfig, got {type(cfg).__name__}")
    if pairs is None:
        pairs = pairs_from_qrels(qrels)
    grouped: dict[str, list[str]] = {}
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise InvalidInputError(f"pairs[{i}]={pair!r}: give (query_id, doc_id) tuples")
        qid, did = str(pair[0]), str(pair[1])
        if qid not in queries:
            raise InvalidInputError(f"pairs[{i}] names query {qid!r}, which has no text in "
                                    "queries")
        grouped.setdefault(qid, []).append(did)
    stats: dict[str, Any] = {
        "mode": cfg.mode, "queries": len(grouped), "pairs": len(pairs), "examples": 0,
        "skipped_no_positive_in_store": 0, "skipped_positive_below_depth": 0,
        "skipped_too_few_negatives": 0,
        "dropped_relevant": 0, "dropped_skip_top": 0, "dropped_margin": 0,
        "dropped_same_text": 0}
    # ids as str, as the pairs' (int query keys found nothing: judged documents became
    # negatives)
    judged = {str(q): {str(d) for d, g in (docs or {}).items() if g > 0}
              for q, docs in qrels.items()}
    k = cfg.skip_top + cfg.depth
    k_search = max(k, cfg.positive_depth or 0)
    n_cand = max(cfg.candidates or 0, k_search)
    rng = random.Random(cfg.seed)
    show = sys.stderr.isatty() if progress is None else bool(progress)
    start = time.perf_counter()
    examples: list[TrainingExample] = []
    for qid in tqdm(list(grouped), desc="mine hard negatives", unit="q", disable=not show):
        text = queries[qid]
        # the query's own document too (a BEIR corpus may hold one under the query's id,
        # which the evaluation leaves out)
        relevant = judged.get(qid, set()) | set(grouped[qid]) | {qid}
        qvec = retriever.embedder.embed_query(text)
        hits = retriever.search(text, k=k_search, mode=cfg.mode, rerank=False,
                                candidates=n_cand, query_vector=qvec)
        hit_rank = {hit.id: rank for rank, hit in enumerate(hits, start=1)}
        cands: list[tuple[int, str]] = []
        for rank, hit in enumerate(hits[:k], start=1):
            if hit.id in relevant:
                stats["dropped_relevant"] += 1
            elif rank <= cfg.skip_top:
                stats["dropped_skip_top"] += 1
            else:
                cands.append((rank, hit.id))
        scores = _dense_scores(retriever, qvec, [d for _, d in cands] + grouped[qid])
        texts: dict[str, str] = {}
        if corpus is None:
            wanted = [d for _, d in cands] + grouped[qid]
            texts = {d.id: d.text for d in retriever.get(wanted)}
        else:
            texts = corpus  # type: ignore[assignment]
        for pos in grouped[qid]:
            pos_score = scores.get(pos)
            if pos_score is None or pos not in texts:
                stats["skipped_no_positive_in_store"] += 1
                continue
            if cfg.positive_depth is not None and hit_rank.get(pos, math.inf) > \
                    cfg.positive_depth:
                stats["skipped_positive_below_depth"] += 1
                continue
            chosen: list[tuple[int, str]] = []
            order = cands if cfg.sampling == "top" else rng.sample(cands, len(cands))
            for rank, did in order:
                s = scores.get(did)
                if cfg.margin is not None and s is not None and s >= pos_score - cfg.margin:
                    stats["dropped_margin"] += 1
                    continue
                if did not in texts:
                    continue
                if texts[did].strip() in (texts[pos].strip(), text.strip()):
                    stats["dropped_same_text"] += 1  # labelled relevant and not at once
                    continue
                chosen.append((rank, did))
                if len(chosen) == cfg.num_negatives:
                    break
            if len(chosen) < cfg.num_negatives:
                stats["skipped_too_few_negatives"] += 1
                continue
            chosen.sort()  # best rank first, whichever way they were drawn
            examples.append(TrainingExample(
                query_id=qid, query=text, positive_id=pos, positive=texts[pos],
                negative_ids=tuple(d for _, d in chosen),
                negatives=tuple(texts[d] for _, d in chosen),
                positive_score=pos_score,
                negative_scores=tuple(scores.get(d) for _, d in chosen),
                negative_ranks=tuple(r for r, _ in chosen)))
    stats["examples"] = len(examples)
    stats["seconds"] = round(time.perf_counter() - start, 2)
    logger.info("mined hard negatives: %s", stats)
    return MiningResult(examples=examples, stats=stats)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def _require_training_deps() -> None:
    missing = []
    for mod in ("torch", "sentence_transformers", "datasets", "accelerate"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise MissingDependencyError(
            f"fine-tuning needs {', '.join(missing)}: {_INSTALL}")


def _check_examples(examples: Sequence[TrainingExample]) -> int:
    """Number of negatives every row can supply (the smallest count over the rows)."""
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
        raise InvalidInputError("examples must be a list of TrainingExample "
                                "(see mine_hard_negatives / load_examples)")
    if not examples:
        raise InvalidInputError("examples is empty: nothing to train on; mine more pairs "
                                "(raise max_pairs or depth, lower margin or skip_top)")
    for i, ex in enumerate(examples):
        if not isinstance(ex, TrainingExample):
            raise InvalidInputError(f"examples[{i}] must be a TrainingExample, got "
                                    f"{type(ex).__name__}")
    n = min(len(ex.negatives) for ex in examples)
    if n == 0:
        i = next(i for i, ex in enumerate(examples) if not ex.negatives)
        raise InvalidInputError(f"examples[{i}] has no negatives: every row's would go unused "
                                "(rows train with as many as the poorest has); drop it")
    if n < max(len(ex.negatives) for ex in examples):
        logger.warning("examples carry different numbers of negatives; using the first %d of "
                       "each row", n)
    return n


def _tuple_columns(examples: Sequence[TrainingExample], n_neg: int) -> dict[str, list[Any]]:
    """Columns query, positive, negative_1..negative_n (the trainers read them in order)."""
    columns: dict[str, list[Any]] = {"query": [ex.query for ex in examples],
                                     "positive": [ex.positive for ex in examples]}
    for j in range(n_neg):
        columns[f"negative_{j + 1}"] = [ex.negatives[j] for ex in examples]
    return columns


def _prepare_out(out_dir: str | os.PathLike[str], overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"out_dir={str(out)!r} exists and is not empty; choose another "
                          "directory or pass overwrite=True")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    """Swap the freshly saved model in; a crash leaves the old directory or the new one."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _training_args(cls: Any, cfg: TrainConfig, work: str, n_rows: int, show: bool,
                   **extra: Any) -> Any:
    steps = cfg.max_steps if cfg.max_steps is not None else \
        cfg.epochs * math.ceil(n_rows / cfg.batch_size)
    kwargs: dict[str, Any] = dict(
        output_dir=work, per_device_train_batch_size=cfg.batch_size,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps if cfg.max_steps else -1,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, bf16=cfg.bf16,
        seed=cfg.seed, data_seed=cfg.seed,
        save_strategy="no", report_to="none", disable_tqdm=not show,
        logging_strategy="steps", logging_steps=max(1, steps // 20),
        dataloader_num_workers=0, **extra)
    import torch
    import transformers

    # transformers 5 takes the warmup ratio as a float warmup_steps (warmup_ratio is deprecated)
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["warmup_steps"] = float(cfg.warmup_ratio)
    else:  # pragma: no cover - transformers 4
        kwargs["warmup_ratio"] = float(cfg.warmup_ratio)
    if cfg.device == "cpu" or (cfg.device is None and not torch.cuda.is_available()):
        kwargs.update(use_cpu=True, dataloader_pin_memory=False)
    return cls(**kwargs)


def _callbacks(max_seconds: float | None) -> list[Any]:
    """Trainer callbacks: the loss to our logger (INFO), and a wall-time limit if any."""
    from transformers import TrainerCallback

    class LogLoss(TrainerCallback):
        def __init__(self) -> None:
            self.start = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
                   **kwargs: Any) -> Any:
            if logs and "loss" in logs:
                logger.info("step %d/%d: loss %.4f, lr %.2e, %.0fs", state.global_step,
                            state.max_steps, float(logs["loss"]),
                            float(logs.get("learning_rate", 0.0)),
                            time.perf_counter() - self.start)
            return control

    if max_seconds is None:
        return [LogLoss()]

    class StopAfter(TrainerCallback):
        def __init__(self) -> None:
            self.start = time.perf_counter()
            self.stopped_at: int | None = None

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if time.perf_counter() - self.start > max_seconds:
                if self.stopped_at is None:
                    logger.warning("training stopped by max_seconds=%s after %d of %d steps",
                                   max_seconds, state.global_step, state.max_steps)
                    self.stopped_at = state.global_step
                control.should_training_stop = True
            return control

    return [LogLoss(), StopAfter()]


def _quiet(trainer: Any) -> Any:
    """Without progress bars the trainer prints each log dict; our logger has them instead."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def _train_and_save(kind: str, model: Any, trainer_cls: Any, args_cls: Any,
                    columns: Mapping[str, list[Any]], loss: Any, cfg: TrainConfig, out: Path,
                    progress: bool | None, *, info: Mapping[str, Any],
                    before_save: Any = None, **extra_args: Any) -> Path:
    """Train `model` on `columns`, save it beside `out`, then swap it into place."""
    from datasets import Dataset

    show = sys.stderr.isatty() if progress is None else bool(progress)
    start = time.perf_counter()
    n_rows = len(next(iter(columns.values())))
    with tempfile.TemporaryDirectory(prefix=".rk-train-", dir=out.parent) as work:
        args = _training_args(args_cls, cfg, work, n_rows, show, **extra_args)
        trainer = _quiet(trainer_cls(model=model, args=args, loss=loss,
                                     train_dataset=Dataset.from_dict(dict(columns)),
                                     callbacks=_callbacks(cfg.max_seconds)))
        result = trainer.train()
        if before_save is not None:
            before_save()
        tmp = Path(work) / "model"
        model.save(str(tmp))
        record = {"kind": kind, **info, "config": cfg.to_dict(), "rows": n_rows,
                  "steps": int(result.global_step),
                  "planned_steps": int(trainer.state.max_steps),
                  "train_loss": float(result.training_loss),
                  "seconds": round(time.perf_counter() - start, 1)}
        (tmp / TRAINING_INFO_FILE).write_text(json.dumps(record, indent=2, default=str),
                                              encoding="utf-8")
        _move_into_place(tmp, out)
    logger.info("trained %s %s in %.0fs (%d steps)", kind, out, time.perf_counter() - start,
                result.global_step)
    return out


def train_embedder(examples: Sequence[TrainingExample], out_dir: str | os.PathLike[str], *,
                   base: str | None = None, config: TrainConfig | None = None,
                   overwrite: bool = False, progress: bool | None = None) -> Path:
    """Fine-tune a sentence-transformers embedder on (query, positive, negatives) rows.

    Loss: MultipleNegativesRankingLoss (each query against its positive, its hard negatives
    and every other document of the batch, ``scale = 1 / temperature``), wrapped in
    MatryoshkaLoss when `config.matryoshka_dims` is set. Batches never hold the same text
    twice (NO_DUPLICATES sampler), so a repeated query cannot be its own false negative.
    The model's query/document prefixes are used as training prompts and saved with it.

    Args:
        examples: rows from `mine_hard_negatives` or `load_examples`.
        out_dir: where the model is saved (a directory loadable by path).
        base: starting model (hub name or directory; default the bundled MiniLM).
        config: `TrainConfig`.
        overwrite: replace an existing non-empty `out_dir`.
        progress: progress bar and loss logging (default: when stderr is a terminal).

    Returns:
        The model directory.

    Raises:
        MissingDependencyError: torch / sentence-transformers / datasets / accelerate missing.
        ConfigError: bad settings (e.g. a Matryoshka dim larger than the model's).
        InvalidInputError: no or malformed examples.
    """
    from .embedding import DEFAULT_MODEL, Embedder

    cfg = config or TrainConfig()
    n_neg = _check_examples(examples)
    out = _prepare_out(out_dir, overwrite)
    _require_training_deps()
    from sentence_transformers import (SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses)
    from sentence_transformers.base.sampler import BatchSamplers

    base = base or DEFAULT_MODEL
    emb = Embedder(model=base, device=cfg.device)
    model = emb.model  # loads with retrievekit's resolution (packaged copy, local dir, hub)
    prefixes = emb.prefixes
    full_dim = emb.model_dim
    if cfg.matryoshka_dims and max(cfg.matryoshka_dims) > full_dim:
        raise ConfigError(f"matryoshka_dims={list(cfg.matryoshka_dims)}: the largest must be "
                          f"<= the model dimension {full_dim} of {base!r}")
    original_len = model.max_seq_length
    if cfg.max_seq_length is not None:
        model.max_seq_length = min(cfg.max_seq_length, original_len or cfg.max_seq_length)
    columns = _tuple_columns(examples, n_neg)
    prompts = None
    if prefixes.query or prefixes.document:
        prompts = {c: (prefixes.query if c == "query" else prefixes.document) for c in columns}
    loss: Any = losses.MultipleNegativesRankingLoss(model, scale=float(cfg.scale))
    if cfg.matryoshka_dims:
        loss = losses.MatryoshkaLoss(
            model, loss, matryoshka_dims=list(cfg.matryoshka_dims),
            matryoshka_weights=list(cfg.matryoshka_weights) if cfg.matryoshka_weights else None)

    def before_save() -> None:
        model.max_seq_length = original_len
        model.prompts = {**dict(getattr(model, "prompts", {}) or {}),
                         "query": prefixes.query, "document": prefixes.document}

    return _train_and_save(
        "embedder", model, SentenceTransformerTrainer, SentenceTransformerTrainingArguments,
        columns, loss, cfg, out, progress,
        info={"base": base, "examples": len(examples), "negatives_per_example": n_neg,
              "loss": "MatryoshkaLoss(MultipleNegativesRankingLoss)" if cfg.matryoshka_dims
              else "MultipleNegativesRankingLoss"},
        before_save=before_save, batch_sampler=BatchSamplers.NO_DUPLICATES, prompts=prompts)


def train_reranker(examples: Sequence[TrainingExample], out_dir: str | os.PathLike[str], *,
                   base: str | None = None, config: TrainConfig | None = None,
                   overwrite: bool = False, progress: bool | None = None) -> Path:
    """Fine-tune a cross-encoder reranker on the same positives and hard negatives.

    `base` may be a cross-encoder or a plain encoder checkpoint (such as the bundled
    MiniLM): it is loaded as ``CrossEncoder(path, num_labels=1)``, so a missing
    classification head starts fresh. Loss per `config.reranker_loss`: "bce" scores every
    (query, positive) pair as 1 and every (query, negative) pair as 0; "mnrl" asks the
    positive to outscore its hard negatives and other rows' documents.

    Returns:
        The model directory (load it with ``Reranker(model=dir)``).
    """
    from .embedding import DEFAULT_MODEL
    from .models import model_not_found, resolve_model

    cfg = config or TrainConfig()
    n_neg = _check_examples(examples)
    out = _prepare_out(out_dir, overwrite)
    _require_training_deps()
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.cross_encoder import (CrossEncoder, CrossEncoderTrainer,
                                                     CrossEncoderTrainingArguments, losses)

    base = base or DEFAULT_MODEL
    resolved = resolve_model(base)
    try:
        model = CrossEncoder(resolved.load_from, num_labels=1, max_length=cfg.max_seq_length,
                             device=cfg.device, local_files_only=resolved.is_local)
    except Exception as exc:
        raise model_not_found(base, resolved, exc) from exc
    if cfg.reranker_loss == "bce":
        rows: dict[str, list[Any]] = {"query": [], "passage": [], "label": []}
        for ex in examples:
            for text, label in [(ex.positive, 1.0)] + [(t, 0.0) for t in ex.negatives[:n_neg]]:
                rows["query"].append(ex.query)
                rows["passage"].append(text)
                rows["label"].append(label)
        loss: Any = losses.BinaryCrossEntropyLoss(model)
        extra: dict[str, Any] = {}
    else:
        rows = _tuple_columns(examples, n_neg)
        loss = losses.MultipleNegativesRankingLoss(model)
        extra = {"batch_sampler": BatchSamplers.NO_DUPLICATES}
    if cfg.head_learning_rate is not None:
        if any("classifier" in name for name, _ in model.named_parameters()):
            extra["learning_rate_mapping"] = {r"classifier": float(cfg.head_learning_rate)}
        else:
            logger.warning("head_learning_rate is ignored: %r has no parameters named "
                           "'classifier'", base)
    return _train_and_save(
        "reranker", model, CrossEncoderTrainer, CrossEncoderTrainingArguments, rows, loss, cfg,
        out, progress,
        info={"base": base, "examples": len(examples), "negatives_per_example": n_neg,
              "loss": {"bce": "BinaryCrossEntropyLoss",
                       "mnrl": "MultipleNegativesRankingLoss"}[cfg.reranker_loss]},
        **extra)


# --------------------------------------------------------------------------------------
# The whole flow: mine, train, evaluate before/after, keep or discard
# --------------------------------------------------------------------------------------


_ROW_METRICS = ("ndcg@10", "recall@100", "mrr@10", "map@10")


def _eval_rows(results: Mapping[str, Any], label: str) -> dict[str, float]:
    """{"<label> nDCG@10": v, ...} from one `evaluate_modes` mode result."""
    return {f"{label} {m}": float(results.metrics[m]) for m in _ROW_METRICS
            if m in results.metrics}


def format_comparison(before: Mapping[str, float], after: Mapping[str, float],
                      before_label: str = "base", after_label: str = "fine-tuned") -> str:
    """A Markdown table of the metrics side by side with their difference."""
    rows = [f"| metric | {before_label} | {after_label} | delta |", "|---|---:|---:|---:|"]
    for name in before:
        if name in after:
            b, a = before[name], after[name]
            rows.append(f"| {name} | {b:.4f} | {a:.4f} | {a - b:+.4f} |")
    return "\n".join(rows)


def _evaluate(retriever: Any, dataset: Any, modes: Sequence[str], progress: bool | None
              ) -> dict[str, Any]:
    from .report import evaluate_modes

    return evaluate_modes(retriever, dataset, modes, k=10, progress=progress)


#: Reranker weights tried on the tuning split (`RerankConfig.weight`; 1.0 = its order alone).
BLEND_WEIGHTS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)


@dataclass
class _RerankedRuns:
    """Per judged query: the hybrid ranking and the reranker scores of its head."""

    ids: dict[str, list[str]]
    scores: dict[str, np.ndarray]

    def run(self, weight: float | None, rrf_k: float) -> dict[str, list[str]]:
        """query id -> ranked ids: hybrid alone (weight None) or reranked with `weight`."""
        from .rerank import blend_order

        if weight is None:
            return self.ids
        out = {}
        for qid, ids in self.ids.items():
            sc = self.scores[qid]
            order, _, _ = blend_order(sc, weight, rrf_k)
            out[qid] = [ids[i] for i in order] + ids[len(sc):]
        return out


def _score_reranked(retriever: Any, reranker: Any, dataset: Any, candidates: int,
                    progress: bool | None) -> _RerankedRuns:
    """The hybrid top 100 of every judged query, its first `candidates` scored by `reranker`
    once, so that any number of weights can be evaluated without scoring again."""
    from tqdm.auto import tqdm

    from .report import RECALL_DEPTH, mode_search_fn

    search = mode_search_fn(retriever, "hybrid")
    show = sys.stderr.isatty() if progress is None else bool(progress)
    ids: dict[str, list[str]] = {}
    scores: dict[str, np.ndarray] = {}
    for qid in tqdm(sorted(dataset.qrels), desc=f"rerank {dataset.name}/{dataset.split}",
                    unit="q", disable=not show):
        text = dataset.queries.get(qid)
        if text is None:
            raise InvalidInputError(f"split {dataset.split!r} judges query {qid!r} but "
                                    "queries.jsonl has no text for it")
        n = max(RECALL_DEPTH, candidates) + (1 if qid in dataset.corpus else 0)
        hits = [h for h in search(text, n) if h.id != qid]  # BEIR: never the query itself
        ids[qid] = [h.id for h in hits]
        head = hits[:candidates]
        scores[qid] = reranker.score(text, [h.document.text for h in head])
    return _RerankedRuns(ids, scores)


def _run_rows(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]],
              label: str, per_query: dict[str, float] | None = None) -> dict[str, float]:
    """Metric rows of a run; `per_query` (if given) receives each query's nDCG@10."""
    from .evaluation import evaluate_run

    res = evaluate_run(run, qrels, ks=(10, 100), metrics=("ndcg", "recall", "mrr", "map"))
    if per_query is not None:
        per_query.update({q: v["ndcg@10"] for q, v in res.per_query.items()})
    return {f"{label} {m}": float(res.means[m]) for m in _ROW_METRICS}


def paired_p_value(before: Mapping[str, float], after: Mapping[str, float], *,
                   resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of the mean per-query difference ``after - before`` under the
    paired permutation (randomization) test, the usual significance test for IR runs
    (`scipy.stats.permutation_test`, ``permutation_type="samples"``). 1.0 when nothing
    differs."""
    from scipy.stats import permutation_test

    qids = sorted(set(before) & set(after))
    a = np.array([before[q] for q in qids], dtype=np.float64)
    b = np.array([after[q] for q in qids], dtype=np.float64)
    if len(qids) < 2 or np.allclose(a, b):
        return 1.0
    res = permutation_test((a, b), lambda x, y, axis: np.mean(y - x, axis=axis),
                           permutation_type="samples", n_resamples=resamples,
                           vectorized=True, random_state=seed, alternative="two-sided")
    return float(res.pvalue)


def _tune_weight(runs: _RerankedRuns, qrels: Mapping[str, Mapping[str, int]],
                 weights: Sequence[float], rrf_k: float) -> tuple[float, dict[str, float]]:
    """The weight with the best nDCG@10 on the tuning queries (ties: the larger weight)."""
    by_weight = {f"{w:g}": _run_rows(runs.run(w, rrf_k), qrels, "x")["x ndcg@10"]
                 for w in weights}
    best = max(weights, key=lambda w: (round(by_weight[f"{w:g}"], 12), w))
    return float(best), by_weight


def _check_dims(model: str, matryoshka_dims: Sequence[int], eval_dims: Sequence[int]
                ) -> None:
    """Refuse dimensions past the base model's before anything is indexed or written (they
    were refused only after indexing, mining and the base's evaluation)."""
    from .embedding import Embedder

    dim = Embedder(model=model).model_dim
    for name, dims in (("training.matryoshka_dims", matryoshka_dims),
                       ("eval_dims", eval_dims)):
        if dims and max(int(d) for d in dims) > dim:
            raise ConfigError(f"{name}={list(dims)}: the largest must be <= the dimension "
                              f"of {model!r} ({dim})")


def run_finetune(kind: str, data: str | os.PathLike[str], *, out: str | os.PathLike[str],
                 split: str = "train", eval_split: str = "test", base: str | None = None,
                 retriever_model: str | None = None, max_pairs: int | None = None,
                 max_pairs_per_query: int | None = None, max_eval_queries: int | None = None,
                 mining: MiningConfig | None = None, training: TrainConfig | None = None,
                 eval_dims: Sequence[int] | None = None, rerank_candidates: int = 30,
                 tune_split: str | None = "dev",
                 blend_weights: Sequence[float] = BLEND_WEIGHTS,
                 cache_dir: str | os.PathLike[str] | None = None, dtype: str = "float32",
                 base_dtype: str | None = None, min_gain: float = 0.0,
                 keep_discarded: bool = False, progress: bool | None = None,
                 echo: bool = True) -> dict[str, Any]:
    """Mine, train, evaluate against the base, and keep the model only if it improved.

    Layout of `out`: ``store/`` (the base model's evaluation store, one collection per
    truncate_dim, reused by later runs), ``hard_negatives.jsonl``, ``model/`` (removed on
    "discard" unless `keep_discarded`), ``store-finetuned/`` and ``cache-finetuned/`` (the
    fine-tuned embedder's store and passage vectors, rebuilt on every run), ``cache/`` (the
    base model's passage vectors unless `cache_dir` is given) and ``report.json``.

    Args:
        kind: "embedder" or "reranker".
        data: a BEIR-layout directory; `split` trains, `eval_split` evaluates (same corpus).
        base: the model to start from: an embedder for "embedder" (also the baseline),
            a cross-encoder or encoder checkpoint for "reranker". Default: bundled MiniLM.
        retriever_model: the embedder of the first stage in the reranker flow (default
            the bundled MiniLM); ignored for "embedder".
        max_pairs / max_pairs_per_query: limit the training pairs (`pairs_from_qrels`).
        mining: default: dense, 1 negative from the top 100 with margin 0.05 (embedder);
            hybrid, 3 negatives drawn from the top `rerank_candidates`, positives within the
            same depth, no margin (reranker).
        max_eval_queries: evaluate a seeded sample of this many queries.
        eval_dims: also evaluate the embedders truncated to these dims (truncated-only dense
            search, no rescoring); default: the Matryoshka dims below the full dimension.
        rerank_candidates: fused hits the reranker reorders in the evaluation.
        tune_split: reranker: the qrels split on which its weight (`RerankConfig.weight`,
            the share of the reranker's order against the hybrid order) is chosen from
            `blend_weights`; never the evaluation split. None, or a split the collection
            does not have: weight 1.0 (the reranker's order alone). The test split is then
            evaluated once at weight 1.0 and once at the chosen weight; the chosen one
            decides keep/discard.
        cache_dir: embedding cache for the *base* model's passages (default ``out/cache``).
        dtype / base_dtype: precision of the fine-tuned model (embedder or reranker) / of
            the base embedder in the evaluation (base_dtype defaults to dtype; an embedding
            cache does not record precision).
        min_gain: keep only when the criterion improves by more than this.

    Returns:
        The report (also written to ``out/report.json``).
    """
    from .cache import EmbeddingCache
    from .embedding import DEFAULT_MODEL
    from .evaluation import dataset_documents, load_beir
    from .report import index_dataset, open_eval_retriever, sample_queries

    if kind not in ("embedder", "reranker"):
        raise InvalidInputError(f"kind={kind!r}: choose 'embedder' or 'reranker'")
    v.integer("rerank_candidates", rerank_candidates, error=InvalidInputError)
    if split == eval_split:
        raise InvalidInputError(
            f"split={split!r} is the evaluation split (eval_split): a model trained on the "
            "queries it is judged on overstates the gain; train on another split (train)")
    if tune_split is not None and tune_split == split and kind == "reranker":
        raise InvalidInputError(
            f"tune_split={tune_split!r} is the training split: the reranker weight would be "
            "chosen on the queries it trained on; use another split (dev) or None for 1.0")
    if tune_split is not None and tune_split == eval_split:
        raise InvalidInputError(
            f"tune_split={tune_split!r} is the evaluation split: choosing the reranker weight "
            "on the queries it is judged on overstates the gain; use another split (dev) or "
            "None for weight 1.0")
    blend_weights = tuple(blend_weights)
    if not blend_weights:
        v.fail("blend_weights", "numbers in (0, 1]", blend_weights, "e.g. (1.0, 0.7, 0.5)",
               error=InvalidInputError)
    for i, w in enumerate(blend_weights):
        v.number(f"blend_weights[{i}]", w, 0, 1, low_open=True, error=InvalidInputError,
                 fix="e.g. (1.0, 0.7, 0.5)")
    v.integer("max_eval_queries", max_eval_queries, optional=True, error=InvalidInputError)
    training = training or TrainConfig()
    mining = mining or (MiningConfig(mode="dense") if kind == "embedder" else MiningConfig(
        mode="hybrid", num_negatives=3, depth=rerank_candidates, margin=None,
        positive_depth=rerank_candidates, sampling="random"))
    base_model = base or DEFAULT_MODEL
    first_stage = base_model if kind == "embedder" else (retriever_model or DEFAULT_MODEL)
    base_dtype = base_dtype or dtype
    if kind == "embedder" and (training.matryoshka_dims or eval_dims):
        _check_dims(base_model, training.matryoshka_dims or (), eval_dims or ())
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    store_dir = out_dir / "store"
    model_dir = out_dir / "model"  # the kept model; an earlier run's stays until one wins
    trained_dir = out_dir / "model.new"  # this run's, until the decision
    new_store_dir = out_dir / "store-finetuned"
    new_cache_dir = out_dir / "cache-finetuned"
    timings: dict[str, float] = {}

    train_ds = load_beir(data, split=split)
    eval_ds = load_beir(data, split=eval_split)
    if eval_ds.corpus.keys() != train_ds.corpus.keys():  # pragma: no cover - one corpus file
        raise InvalidInputError("the train and eval splits must share one corpus")
    evaluated = sample_queries(eval_ds, max_eval_queries)
    # a query judged in both splits is not trained on: the gain is measured on queries
    # the model did not see
    shared = set(map(str, train_ds.qrels)) & set(map(str, eval_ds.qrels))
    train_qrels = {q: d for q, d in train_ds.qrels.items() if str(q) not in shared}
    pairs = pairs_from_qrels(train_qrels, max_pairs=max_pairs,
                             max_pairs_per_query=max_pairs_per_query, seed=training.seed)
    corpus = dict(dataset_documents(train_ds))
    if eval_dims is not None:
        eval_dims = sorted({int(d) for d in eval_dims}, reverse=True)
    base_cache = Path(cache_dir) if cache_dir is not None else out_dir / "cache"

    def say(msg: str) -> None:
        logger.info(msg)
        if echo:
            print(msg, flush=True)

    before: dict[str, float] = {}
    after: dict[str, float] = {}
    # 1. the base: index the corpus, mine with it, measure it
    t0 = time.perf_counter()
    with EmbeddingCache(base_cache / "embeddings.sqlite") as cache:
        with open_eval_retriever(store_dir, train_ds.name, model=first_stage,
                                 dtype=base_dtype) as r:
            stats = index_dataset(r, train_ds, cache=cache, progress=progress)
            say(f"indexed {stats['documents']} documents with {first_stage} "
                f"({stats['encoded']} passages encoded)")
            timings["index_base_s"] = round(time.perf_counter() - t0, 1)
            if kind == "reranker":
                eval_dims = []
            elif eval_dims is None:  # the Matryoshka dims below the full one
                eval_dims = [d for d in training.matryoshka_dims or ()
                             if d < r.embedder.model_dim]
            t0 = time.perf_counter()
            mined = mine_hard_negatives(r, train_ds.queries, train_ds.qrels, pairs,
                                        corpus=corpus, config=mining, progress=progress)
            save_examples(out_dir / "hard_negatives.jsonl", mined.examples)
            timings["mine_s"] = round(time.perf_counter() - t0, 1)
            say(f"mined {len(mined.examples)} training rows from {len(pairs)} pairs of split "
                f"{split!r} ({mining.mode}, {mining.num_negatives} negatives, skip_top="
                f"{mining.skip_top}, margin={mining.margin}) -> "
                f"{out_dir / 'hard_negatives.jsonl'}" + (
                    f"; {len(shared)} queries judged in split {eval_split!r} too were left "
                    "out" if shared else ""))
            t0 = time.perf_counter()
            base_modes = ["dense"] if kind == "embedder" else ["hybrid"]
            res = _evaluate(r, evaluated, base_modes, progress)
            before.update(_eval_rows(res[base_modes[0]], base_modes[0]))
            before_pq = {q: v["ndcg@10"] for q, v in res[base_modes[0]].per_query.items()}
        for dim in eval_dims:
            with open_eval_retriever(store_dir, train_ds.name, model=first_stage,
                                     truncate_dim=dim, dtype=base_dtype) as r:
                index_dataset(r, train_ds, cache=cache, progress=progress)
                res = _evaluate(r, evaluated, ["dense"], progress)
                before.update(_eval_rows(res["dense"], f"dense@{dim}"))
        timings["eval_base_s"] = round(time.perf_counter() - t0, 1)

    # 2. train
    t0 = time.perf_counter()
    trainer = train_embedder if kind == "embedder" else train_reranker
    trainer(mined.examples, trained_dir, base=base_model, config=training, overwrite=True,
            progress=progress)
    timings["train_s"] = round(time.perf_counter() - t0, 1)
    say(f"trained {kind} from {base_model} on {len(mined.examples)} rows in "
        f"{timings['train_s']:.0f}s -> {trained_dir}")

    # 3. measure the new model the same way
    t0 = time.perf_counter()
    if kind == "embedder":
        # a fresh store and cache: a retrained model has the same path but other weights,
        # and a store made with the old ones would refuse it
        for stale in (new_store_dir, new_cache_dir):
            shutil.rmtree(stale, ignore_errors=True)
        with EmbeddingCache(new_cache_dir / "embeddings.sqlite") as cache:
            for dim in [None, *eval_dims]:
                with open_eval_retriever(new_store_dir, train_ds.name, model=str(trained_dir),
                                         truncate_dim=dim, dtype=dtype) as r:
                    index_dataset(r, train_ds, cache=cache, progress=progress)
                    res = _evaluate(r, evaluated, ["dense"], progress)
                    if dim is None:
                        after_pq = {q: v["ndcg@10"] for q, v in res["dense"].per_query.items()}
                    after.update(_eval_rows(res["dense"],
                                            "dense" if dim is None else f"dense@{dim}"))
        criterion = "dense ndcg@10"
    else:
        from .rerank import Reranker

        reranker = Reranker(model=str(trained_dir), candidates=rerank_candidates,
                            max_length=training.max_seq_length, device=training.device,
                            dtype=dtype)
        rrf_k = reranker.config.rrf_k
        tune_ds = None
        if tune_split is not None:
            try:
                tune_ds = sample_queries(load_beir(data, split=tune_split), max_eval_queries)
            except InvalidInputError as exc:
                say(f"no tuning split {tune_split!r} ({exc}); reranker weight 1.0")
        with open_eval_retriever(store_dir, train_ds.name, model=first_stage,
                                 dtype=base_dtype) as r:
            weight = 1.0
            if tune_ds is not None:
                tuned = _score_reranked(r, reranker, tune_ds, rerank_candidates, progress)
                weight, by_weight = _tune_weight(tuned, tune_ds.qrels, blend_weights, rrf_k)
                tuning = {"split": tune_split, "queries": len(tuned.ids),
                          "hybrid ndcg@10": _run_rows(tuned.run(None, rrf_k), tune_ds.qrels,
                                                      "x")["x ndcg@10"],
                          "ndcg@10 by weight": by_weight, "weight": weight}
                say(f"reranker weight tuned on split {tune_split!r} ({len(tuned.ids)} "
                    f"queries): {weight:g} (nDCG@10 hybrid alone "
                    f"{tuning['hybrid ndcg@10']:.4f}; by weight " + ", ".join(
                        f"{w}: {v:.4f}" for w, v in by_weight.items()) + ")")
            else:
                tuning = {"split": None, "weight": 1.0}
            runs = _score_reranked(r, reranker, evaluated, rerank_candidates, progress)
        after_pq: dict[str, float] = {}
        after.update(_run_rows(runs.run(weight, rrf_k), evaluated.qrels, "hybrid", after_pq))
        reranker_alone = _run_rows(runs.run(1.0, rrf_k), evaluated.qrels, "hybrid")
        criterion = "hybrid ndcg@10"
        if trained_dir.exists():  # the chosen weight travels with the model
            info_path = trained_dir / TRAINING_INFO_FILE
            info = json.loads(info_path.read_text(encoding="utf-8"))
            info["recommended_weight"] = weight
            info["weight_tuning"] = tuning
            info_path.write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    timings["eval_finetuned_s"] = round(time.perf_counter() - t0, 1)

    gain = after[criterion] - before[criterion]
    p_value = paired_p_value(before_pq, after_pq)
    decision = "keep" if gain > min_gain else "discard"
    if decision == "keep":  # replaces the model an earlier run kept
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(trained_dir, model_dir)
    elif keep_discarded:  # beside a kept one, never over it
        model_dir = out_dir / "model-discarded"
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(trained_dir, model_dir)
    else:
        shutil.rmtree(trained_dir, ignore_errors=True)
    after_label = "fine-tuned" if kind == "embedder" else "+ fine-tuned reranker"
    table = format_comparison(before, after, "base" if kind == "embedder" else "hybrid alone",
                              after_label)
    report: dict[str, Any] = {
        "kind": kind, "dataset": train_ds.name, "data": str(data), "split": split,
        "eval_split": eval_split, "eval_queries": len(evaluated.qrels),
        "base": base_model, "first_stage": first_stage, "dtype": dtype,
        "base_dtype": base_dtype,
        "model_dir": str(model_dir) if decision == "keep" or keep_discarded else None,
        "mining": {**asdict(mining), **mined.stats, "eval_queries_left_out": len(shared)},
        "training": training.to_dict(),
        "before": before, "after": after, "criterion": criterion, "gain": gain,
        "p_value": p_value, "min_gain": min_gain, "decision": decision, "timings": timings}
    if kind == "reranker":
        report["reranker_weight"] = weight
        report["weight_tuning"] = tuning
        report["after_weight_1"] = reranker_alone
    tmp = out_dir / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2), encoding="utf-8")
    os.replace(tmp, out_dir / "report.json")
    if echo:
        print(f"\n{train_ds.name}, split {eval_split!r}: {report['eval_queries']} queries")
        print(table)
        if kind == "reranker":
            a1 = reranker_alone[criterion]
            print(f"reranker weight {weight:g} (chosen on split {tuning['split']!r}); the "
                  f"reranker's order alone (weight 1): {criterion} {a1:.4f} "
                  f"({a1 - before[criterion]:+.4f} vs hybrid alone)")
        verdict = (f"{decision}: {criterion} {before[criterion]:.4f} -> "
                   f"{after[criterion]:.4f} ({gain:+.4f}, needs > {min_gain:+.4f}; paired "
                   f"permutation test over {len(after_pq)} queries p={p_value:.3g})")
        if decision == "discard":
            verdict += "; " + ("model kept for inspection at " + str(model_dir)
                               if keep_discarded else "model removed")
        elif kind == "reranker":
            verdict += (f"; use Reranker(model={str(model_dir)!r}, weight={weight:g}, "
                        f"max_length={training.max_seq_length})")
        else:
            verdict += f"; model at {model_dir}"
        print(verdict)
        print(f"wrote {out_dir / 'report.json'}")
    return report


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _number_list(cast: Any, example: str) -> Any:
    """An argparse type: comma-separated positive numbers, e.g. ``384,256,128``."""
    import argparse

    def parse(text: str) -> tuple[Any, ...]:
        try:
            values = tuple(cast(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: give comma-separated numbers, e.g. {example}") from None
        if not values or any(not x > 0 for x in values):
            raise argparse.ArgumentTypeError(f"{text!r}: every value must be positive")
        return values

    parse.__name__ = f"list of {cast.__name__}"
    return parse


def cmd_finetune(args: argparse.Namespace) -> int:
    """`retrievekit finetune embedder|reranker ...`"""
    training = TrainConfig(
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        learning_rate=args.lr, max_seq_length=args.max_seq_length, scale=args.scale,
        matryoshka_dims=args.matryoshka_dims, matryoshka_weights=args.matryoshka_weights,
        reranker_loss=args.loss, head_learning_rate=args.head_lr, bf16=args.bf16,
        max_seconds=None if args.max_minutes is None else args.max_minutes * 60,
        seed=args.seed, device=args.device)
    rr = args.kind == "reranker"
    margin = args.margin if args.margin is not None else (None if rr else 0.05)
    mining = MiningConfig(
        mode=args.mine_mode or ("hybrid" if rr else "dense"),
        num_negatives=(3 if rr else 1) if args.num_negatives is None else args.num_negatives,
        depth=(args.rerank_candidates if rr else 100) if args.mine_depth is None
        else args.mine_depth,
        skip_top=args.skip_top, margin=None if args.no_margin else margin,
        positive_depth=None if args.positive_depth == 0 else (
            args.positive_depth or (args.rerank_candidates if rr else None)),
        sampling=args.sampling or ("random" if rr else "top"))
    run_finetune(args.kind, args.data, out=args.out, split=args.split,
                 eval_split=args.eval_split, base=args.base,
                 retriever_model=args.retriever_model, max_pairs=args.max_pairs,
                 max_pairs_per_query=args.max_pairs_per_query,
                 max_eval_queries=args.max_eval_queries, mining=mining, training=training,
                 eval_dims=args.eval_dims, rerank_candidates=args.rerank_candidates,
                 tune_split=None if args.tune_split in ("", "none") else args.tune_split,
                 blend_weights=args.rerank_weights,
                 cache_dir=args.cache_dir, dtype=args.dtype, min_gain=args.min_gain,
                 keep_discarded=args.keep_discarded,
                 progress=False if args.quiet else None)
    return 0


def add_cli(subparsers: Any) -> None:
    """Add ``retrievekit finetune embedder|reranker`` to the command's subparsers."""
    sp = subparsers.add_parser(
        "finetune", help="fine-tune an embedder or a reranker on a BEIR-layout collection, "
        "then keep it only if it beats the base",
        description="Mine hard negatives with the retriever, train, evaluate before/after on "
        "another split, and keep the model only if it improved.")
    sp.add_argument("kind", choices=["embedder", "reranker"])
    sp.add_argument("--data", required=True,
                    help="BEIR-layout directory (corpus.jsonl[.gz], queries.jsonl, qrels/)")
    sp.add_argument("--out", required=True, help="output directory (model/, report.json, ...)")
    sp.add_argument("--split", default="train", help="qrels split to train on")
    sp.add_argument("--eval-split", default="test", help="qrels split to evaluate on")
    sp.add_argument("--base", default=None,
                    help="starting model (default: the bundled all-MiniLM-L6-v2)")
    sp.add_argument("--retriever-model", default=None,
                    help="reranker flow: the first-stage embedder (default: bundled MiniLM)")
    sp.add_argument("--matryoshka-dims", type=_number_list(int, "384,256,128,64"), default=None,
                    help="embedder: wrap the loss in MatryoshkaLoss, e.g. 384,256,128,64")
    sp.add_argument("--matryoshka-weights", type=_number_list(float, "1,1,2,1"), default=None,
                    help="embedder: loss weight per Matryoshka dim, e.g. 1,1,2,1")
    sp.add_argument("--eval-dims", type=_number_list(int, "128,64"), default=None,
                    help="embedder: also evaluate truncated to these dims "
                    "(default: the Matryoshka dims below the full one)")
    sp.add_argument("--epochs", type=int, default=1)
    sp.add_argument("--max-steps", type=int, default=None)
    sp.add_argument("--max-pairs", type=int, default=None,
                    help="train on at most this many (query, positive) pairs")
    sp.add_argument("--max-pairs-per-query", type=int, default=None)
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--lr", type=float, default=3e-5, help="learning rate")
    sp.add_argument("--max-seq-length", type=int, default=256,
                    help="tokens per text (per pair for a reranker) while training")
    sp.add_argument("--scale", type=float, default=20.0,
                    help="embedder: MultipleNegativesRankingLoss scale (1/temperature)")
    sp.add_argument("--loss", choices=list(RERANKER_LOSSES), default="bce",
                    help="reranker: bce (pos=1/neg=0) or mnrl (listwise over negatives)")
    sp.add_argument("--head-lr", type=float, default=None,
                    help="reranker: learning rate of the (new) classification head")
    sp.add_argument("--bf16", action="store_true", help="bfloat16 autocast while training")
    sp.add_argument("--max-minutes", type=float, default=None,
                    help="stop training after this many minutes (evaluation still runs)")
    sp.add_argument("--device", default=None)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--mine-mode", choices=["dense", "hybrid"], default=None,
                    help="retriever mode for mining (default: dense for an embedder, "
                    "hybrid for a reranker)")
    sp.add_argument("--num-negatives", type=int, default=None,
                    help="negatives per pair (default 1 for an embedder, 3 for a reranker)")
    sp.add_argument("--mine-depth", type=int, default=None,
                    help="candidates per query considered as negatives (default 100 for an "
                    "embedder; --rerank-candidates for a reranker)")
    sp.add_argument("--positive-depth", type=int, default=None,
                    help="keep a pair only when its positive is in the retriever's top N "
                    "(default: off for an embedder, --rerank-candidates for a reranker, so it "
                    "learns from the lists it will reorder); 0: off")
    sp.add_argument("--sampling", choices=["top", "random"], default=None,
                    help="negatives: the highest-ranked (top, embedder default) or drawn "
                    "within the depth (random, reranker default)")
    sp.add_argument("--skip-top", type=int, default=0,
                    help="never take ranks 1..N as negatives")
    sp.add_argument("--margin", type=float, default=None,
                    help="drop candidates whose cosine is within this of the positive's "
                    "(default 0.05 for an embedder, off for a reranker)")
    sp.add_argument("--no-margin", action="store_true", help="switch the margin filter off")
    sp.add_argument("--max-eval-queries", type=int, default=None)
    sp.add_argument("--rerank-candidates", type=int, default=30,
                    help="reranker evaluation: fused hits the reranker reorders")
    sp.add_argument("--tune-split", default="dev",
                    help="reranker: qrels split on which the reranker's weight against the "
                    "hybrid order is chosen (default dev; 'none': weight 1)")
    sp.add_argument("--rerank-weights", type=_number_list(float, "1,0.7,0.5"),
                    default=BLEND_WEIGHTS,
                    help="reranker: weights tried on the tuning split (default "
                    + ",".join(f"{w:g}" for w in BLEND_WEIGHTS) + ")")
    sp.add_argument("--cache-dir", default=None,
                    help="embedding cache of the base model's passages (default <out>/cache)")
    sp.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"],
                    default="float32", help="precision when encoding for the evaluation")
    sp.add_argument("--min-gain", type=float, default=0.0,
                    help="keep only if the criterion improves by more than this")
    sp.add_argument("--keep-discarded", action="store_true",
                    help="keep the model directory even when the verdict is discard")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(func=cmd_finetune)
