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
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import validate as v
from .config import RetrieverConfig
from .errors import InvalidInputError
from .fusion import METHODS

_LIBRARY = RetrieverConfig()
DEFAULT = {"fusion": _LIBRARY.fusion, "candidates": _LIBRARY.candidates,
           "weights": dict(_LIBRARY.weights)}
#: the settings a trial may change: those of the search, not of what the index holds
#: (model, chunking, BM25 tokenizer, store), which `retrievekit eval` compares
QUERY_TIME = ("fusion", "candidates", "weights", "rrf_k", "chunk_penalty", "collapse_chunks")
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


def check_settings(settings: Mapping[str, Any], where: str = "settings") -> dict[str, Any]:
    """`settings` as a dict, once they are query-time settings whose scores mean what they
    say (`tune` applies each trial this way, `retrievekit eval --config` a file's)."""
    s = dict(settings)
    other = sorted(set(s) - set(QUERY_TIME), key=str)
    if other:
        fix = (" (the evaluation index has no funnel)" if other == ["funnel_candidates"]
               else "; settings of the index itself need one each: compare them with "
               "`retrievekit eval` (--model, --truncate-dim, --dtype)")
        raise InvalidInputError(f"{where} {other}: tune and eval apply query-time settings "
                                f"only ({', '.join(QUERY_TIME)}) to one index{fix}")
    if s.get("collapse_chunks") is False:
        raise InvalidInputError(
            f"{where} collapse_chunks=False: hits would be chunk ids ('<id>#chunk1'), which "
            "qrels never judge, so every score would be wrong; leave collapse_chunks out")
    RetrieverConfig.from_dict(s)
    return s


def is_test_split(dataset_dir: str | Path, split: str) -> bool:
    """Whether `split` reads the test split's qrels file (by the file: a link counts)."""
    from .evaluation import split_file

    path, test = split_file(dataset_dir, split), split_file(dataset_dir, "test")
    try:
        return os.path.samefile(path, test)
    except OSError:  # one of them is missing
        return path.resolve() == test.resolve()


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

    if is_test_split(dataset_dir, split):
        raise InvalidInputError(
            f"split={split!r} reads the test split: tuning on the split the numbers are "
            "reported on would overstate them; tune on a development split (--split dev) "
            "and evaluate on test")
    v.text("model", model, optional=True, empty=False, error=InvalidInputError,
           fix="None for the default model")
    v.path("cache_dir", cache_dir, optional=True, error=InvalidInputError,
           fix="None for <out>/cache")
    trying = [dict(s) for s in (settings if settings is not None else grid())]
    if not trying:
        raise InvalidInputError("settings=[]: give at least one setting to try, or None for "
                                "the whole grid")
    for s in trying:  # refused before anything is encoded, not after the last trial
        to_toml(Trial(check_settings(s), 0.0, 0.0), None, "", split)
    dataset = load_beir(dataset_dir, split=split)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_path = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    trials: list[Trial] = []
    embedder = None
    with EmbeddingCache(cache_path / "embeddings.sqlite") as cache:
        for s in trying:
            with open_eval_retriever(out_dir / "store", dataset.name, model=model,
                                     embedder=embedder, options=dict(s)) as r:
                embedder = r.embedder
                if not trials:
                    index_dataset(r, dataset, cache=cache, progress=progress)
                with r.embedder.using_cache(cache):
                    res = evaluate(lambda q, n: r.search(q, k=n, mode="hybrid"), dataset, k=10,
                                   ks=(10,), metrics=("ndcg", "mrr"), progress=False)
            trials.append(Trial(s, res.means["ndcg@10"], res.means["mrr@10"]))
    ranked = sorted(trials, key=lambda t: (-t.ndcg, -t.mrr, trials.index(t)))
    (out_dir / "tune.json").write_text(json.dumps(
        {"dataset": str(dataset_dir), "split": split, "queries": len(dataset.qrels),
         "trials": [{"settings": t.settings, "ndcg@10": t.ndcg, "mrr@10": t.mrr}
                    for t in ranked]}, indent=2), encoding="utf-8")
    default = next((t for t in trials if t.settings == DEFAULT), None)
    (out_dir / "tuned.toml").write_text(to_toml(ranked[0], default, dataset.name, split),
                                        encoding="utf-8")
    return ranked


def to_toml(best: Trial, default: Trial | None, name: str, split: str) -> str:
    """Every setting of the chosen trial as TOML for `RetrieverConfig.from_toml`, with the
    evidence (`default`: the library default's trial, None when it was not tried). Written
    here rather than by a TOML library (the standard library reads TOML but does not write
    it): settings are scalars and tables of scalars, and the text is read back and compared
    before it is returned."""
    evidence = f"library default {default.ndcg:.4f}" if default is not None \
        else "the library default was not tried"
    shown = "".join(c if c.isprintable() else "?" for c in f"{name} ({split} split)")
    lines = [f"# chosen by `retrievekit tune` on {shown}: hybrid nDCG@10 {best.ndcg:.4f} "
             f"({evidence})"]  # a comment: any character a folder name may hold, printable

    def table(prefix: str, values: Mapping[str, Any]) -> None:
        if prefix:
            lines.extend(["", f"[{prefix}]"])
        lines.extend(f"{k} = {_toml_scalar(k, x)}" for k, x in values.items()
                     if not isinstance(x, Mapping))
        for k, x in values.items():
            if isinstance(x, Mapping):
                table(f"{prefix}.{k}" if prefix else k, x)

    table("", best.settings)
    text = "\n".join(lines) + "\n"
    try:
        same = tomllib.loads(text) == json.loads(json.dumps(best.settings))
    except tomllib.TOMLDecodeError:
        same = False
    if not same:
        raise InvalidInputError(f"settings {dict(best.settings)!r} do not round-trip as TOML; "
                                "use str, int, float, bool and tables of them")
    return text


def _toml_scalar(key: str, value: Any) -> str:
    if isinstance(value, str) and not any(0xD800 <= ord(c) < 0xE000 for c in value):
        # a basic string: every character as itself but quotes, backslashes and control
        # characters, escaped (json.dumps would write astral ones as surrogate pairs)
        return '"' + "".join(c if c not in '"\\' and ord(c) >= 0x20 and c != "\x7f"
                             else f"\\u{ord(c):04x}" for c in value) + '"'
    if isinstance(value, (bool, int)) or isinstance(value, float) and math.isfinite(value):
        return json.dumps(value)  # true / false, a number
    raise InvalidInputError(f"setting {key}={value!r}: a tuned setting must be a str "
                            "(valid Unicode), int, finite float or bool (or a table of them)")


def table(trials: Sequence[Trial]) -> str:
    """The trials as a markdown table; a setting a trial leaves out is the library's."""
    lines = ["| fusion | candidates | weights dense:sparse | other settings | nDCG@10 | MRR@10 |",
             "|---|---:|---|---|---:|---:|"]
    for t in trials:
        s = {**DEFAULT, **t.settings}
        w = {**DEFAULT["weights"], **s["weights"]}
        other = ", ".join(f"{k}={x!r}" for k, x in s.items() if k not in DEFAULT)
        lines.append(f"| {s['fusion']} | {s['candidates']} | {w['dense']}:{w['sparse']} | "
                     f"{other} | {t.ndcg:.4f} | {t.mrr:.4f} |")
    return "\n".join(lines)
