"""`retrievekit tune`: choose the query-time fusion settings on a development split.

A grid of fusion method x candidates per side x side weights is scored by hybrid nDCG@10
(MRR@10 beside it) on the judged queries of one split; the best setting is written as TOML
that `RetrieverConfig.from_toml` reads. The test split is refused: settings chosen on the
queries they are reported on would overstate them. The store and the embedding cache are
those of `retrievekit eval`, so a collection is encoded once for both.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import RetrieverConfig
from .errors import InvalidInputError
from .fusion import METHODS

_LIBRARY = RetrieverConfig()
DEFAULT = {"fusion": _LIBRARY.fusion, "candidates": _LIBRARY.candidates,
           "weights": dict(_LIBRARY.weights)}
CANDIDATES = (50, 100, 200)
WEIGHTS = ({"dense": 1.0, "sparse": 1.0}, {"dense": 1.0, "sparse": 0.5},
           {"dense": 0.5, "sparse": 1.0})


@dataclass(frozen=True)
class Trial:
    settings: Mapping[str, Any]
    ndcg: float
    mrr: float


def grid(methods: Sequence[str] = METHODS, candidates: Sequence[int] = CANDIDATES,
         weights: Sequence[Mapping[str, float]] = WEIGHTS) -> list[dict[str, Any]]:
    """Every combination, the library default first."""
    out = [dict(DEFAULT)]
    for m, c, w in itertools.product(methods, candidates, weights):
        s = {"fusion": m, "candidates": c, "weights": dict(w)}
        if s != DEFAULT:
            out.append(s)
    return out


def tune(dataset_dir: str | Path, *, split: str = "dev", out: str | Path = "tune-results",
         model: str | None = None, cache_dir: str | Path | None = None,
         settings: Sequence[Mapping[str, Any]] | None = None,
         progress: bool | None = None) -> list[Trial]:
    """Score each setting (default: `grid()`) on `split`; returns trials, best first, and
    writes `<out>/tuned.toml` (the best) and `<out>/tune.json` (every trial).

    Raises:
        InvalidInputError: for the test split, or a split the collection does not have.
    """
    from .cache import EmbeddingCache
    from .evaluation import evaluate, load_beir
    from .report import index_dataset, open_eval_retriever

    if split == "test":
        raise InvalidInputError(
            "split='test': tuning on the split the numbers are reported on would overstate "
            "them; tune on a development split (--split dev) and evaluate on test")
    dataset = load_beir(dataset_dir, split=split)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_path = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    trials: list[Trial] = []
    embedder = None
    with EmbeddingCache(cache_path / "embeddings.sqlite") as cache:
        for s in settings or grid():
            with open_eval_retriever(out_dir / "store", dataset.name, model=model,
                                     embedder=embedder, options=dict(s)) as r:
                embedder = r.embedder
                if not trials:
                    index_dataset(r, dataset, cache=cache, progress=progress)
                with r.embedder.using_cache(cache):
                    res = evaluate(lambda q, n: r.search(q, k=n, mode="hybrid"), dataset, k=10,
                                   ks=(10,), metrics=("ndcg", "mrr"), progress=False)
            trials.append(Trial(dict(s), res.means["ndcg@10"], res.means["mrr@10"]))
    ranked = sorted(trials, key=lambda t: (-t.ndcg, -t.mrr, trials.index(t)))
    (out_dir / "tune.json").write_text(json.dumps(
        {"dataset": str(dataset_dir), "split": split, "queries": len(dataset.qrels),
         "trials": [{"settings": t.settings, "ndcg@10": t.ndcg, "mrr@10": t.mrr}
                    for t in ranked]}, indent=2), encoding="utf-8")
    (out_dir / "tuned.toml").write_text(to_toml(ranked[0], trials[0], dataset.name, split),
                                        encoding="utf-8")
    return ranked


def to_toml(best: Trial, default: Trial, name: str, split: str) -> str:
    """The chosen settings as TOML for `RetrieverConfig.from_toml`, with the evidence."""
    s = best.settings
    w = s["weights"]
    return (f"# chosen by `retrievekit tune` on {name} ({split} split): hybrid nDCG@10 "
            f"{best.ndcg:.4f} (library default {default.ndcg:.4f})\n"
            f'fusion = "{s["fusion"]}"\n'
            f"candidates = {s['candidates']}\n\n"
            f"[weights]\ndense = {w['dense']}\nsparse = {w['sparse']}\n")


def table(trials: Sequence[Trial]) -> str:
    lines = ["| fusion | candidates | weights dense:sparse | nDCG@10 | MRR@10 |", "|---|---:|---|---:|---:|"]
    for t in trials:
        s = t.settings
        lines.append(f"| {s['fusion']} | {s['candidates']} | {s['weights']['dense']}:"
                     f"{s['weights']['sparse']} | {t.ndcg:.4f} | {t.mrr:.4f} |")
    return "\n".join(lines)
