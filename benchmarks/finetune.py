"""Fine-tuning on nfcorpus: does `retrievekit finetune` make the bundled model better?

Three parts, each one training run that finishes within an hour on the shared 2-core CPU:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/finetune.py embedder     # MNRL
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/finetune.py matryoshka   # MNRL in MatryoshkaLoss
    # the other runs in docs/finetuning.md, e.g. the -w8 one:
    #   ... finetune.py matryoshka --threads 2 --max-pairs 1000000 --max-steps 500 \
    #       --train-minutes 36 --matryoshka-weights 1,1,8,1 --tag=-w8
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/finetune.py reranker     # cross-encoder, BCE

The reranker part chooses the reranker's weight against the hybrid order
(`RerankConfig.weight`) on qrels/dev.tsv and evaluates on qrels/test.tsv at weight 1 (the
cross-encoder's order alone) and at the chosen weight.

Training uses qrels/train.tsv, evaluation qrels/test.tsv (all 323 judged queries), both over
the one nfcorpus corpus read in place from --data (never copied). Each part runs
`retrievekit.finetune.run_finetune`, the code behind ``retrievekit finetune``: mine hard
negatives with the base model's HybridRetriever, train, evaluate base and fine-tuned model the
same way (`retrievekit.report.evaluate_modes`), keep or discard. The base model's passage
vectors come from the shared fp32 embedding cache (benchmarks/.cache/embeddings); the
fine-tuned model's corpus is encoded in bfloat16 into a store of its own. Work files (stores,
models, mined rows) go to benchmarks/.cache/finetune/<part>/ (gitignored); the report to
benchmarks/results/finetune-<part>.json. Targets and results: docs/finetuning.md.

Run in the background and follow the log:

    nohup env HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/finetune.py embedder \\
        > benchmarks/.cache/finetune-embedder.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
DEFAULT_DATA = Path(os.environ.get("RETRIEVEKIT_DATA", "/work/shared/data")) / "nfcorpus"

#: Per part: (training minutes, settings). The minutes cap training so that mining, the
#: base evaluation, training and encoding the corpus with the new model fit in an hour
#: on a loaded 2-core machine (one torch thread: two threads collapse under load).
PARTS: dict[str, dict[str, Any]] = {
    "embedder": {"kind": "embedder", "train_minutes": 30.0, "matryoshka_dims": None,
                 "max_pairs": 14000, "max_steps": 100, "depth": 200,
                 "batch_size": 32, "max_seq_length": 128, "lr": 5e-5,
                 "num_negatives": 1, "mine_mode": "dense", "eval_dims": [128]},
    # the best 128-dim ratio measured (95.1%, benchmarks/results/finetune-matryoshka-w4.json)
    "matryoshka": {"kind": "embedder", "train_minutes": 40.0,
                   "matryoshka_dims": (384, 256, 128, 64), "matryoshka_weights": (1.0, 1.0, 4.0, 1.0),
                   "max_pairs": 14000, "max_steps": 350, "depth": 200,
                   "batch_size": 32, "max_seq_length": 128, "lr": 8e-5,
                   "num_negatives": 1, "mine_mode": "dense", "eval_dims": [128]},
    # the reranker learns from the lists it reorders: hybrid top 30, positives judged
    # relevant inside them, 3 negatives drawn from the rest (MiningConfig.positive_depth)
    "reranker": {"kind": "reranker", "train_minutes": 40.0, "matryoshka_dims": None,
                 "max_pairs": None, "max_steps": 800, "depth": 30, "positive_depth": 30,
                 "sampling": "random", "margin": None,
                 "batch_size": 32, "max_seq_length": 128, "lr": 7e-5, "head_lr": 1e-3,
                 "num_negatives": 3, "mine_mode": "hybrid", "eval_dims": [],
                 "loss": "bce", "rerank_candidates": 30},
}


def machine_info() -> dict[str, Any]:
    import importlib.metadata as md

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh
                        if ln.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "transformers", "sentence-transformers", "datasets", "accelerate"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu, "cores": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
            "python": platform.python_version(), "versions": versions}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=list(PARTS))
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the nfcorpus BEIR directory")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--train-minutes", type=float, default=None,
                   help="cap on training wall time (default per part)")
    p.add_argument("--max-pairs", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--skip-top", type=int, default=0)
    p.add_argument("--margin", type=float, default=None,
                   help="mining margin (default per part: 0.05, none for the reranker)")
    p.add_argument("--loss", choices=["bce", "mnrl"], default=None, help="reranker loss")
    p.add_argument("--matryoshka-weights", default=None,
                   help="comma-separated loss weights of the Matryoshka dims (default per part)")
    p.add_argument("--max-eval-queries", type=int, default=None)
    p.add_argument("--work", default=None, help="work directory (default benchmarks/.cache/"
                   "finetune/<part>)")
    p.add_argument("--tag", default="", help="suffix of the results file name")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    for noisy in ("httpx", "chromadb", "sentence_transformers", "transformers", "bm25s"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from retrievekit.finetune import MiningConfig, TrainConfig, run_finetune

    cfg = dict(PARTS[args.part])
    minutes = args.train_minutes if args.train_minutes is not None else cfg["train_minutes"]
    training = TrainConfig(
        epochs=1, max_steps=args.max_steps or cfg["max_steps"],
        batch_size=args.batch_size or cfg["batch_size"],
        learning_rate=args.lr or cfg["lr"], max_seq_length=cfg["max_seq_length"],
        matryoshka_dims=cfg["matryoshka_dims"],
        matryoshka_weights=tuple(float(w) for w in args.matryoshka_weights.split(","))
        if args.matryoshka_weights else cfg.get("matryoshka_weights"),
        reranker_loss=args.loss or cfg.get("loss", "bce"), head_learning_rate=cfg.get("head_lr"),
        bf16=True, max_seconds=minutes * 60, seed=0, device="cpu")
    mining = MiningConfig(mode=cfg["mine_mode"], num_negatives=cfg["num_negatives"],
                          depth=cfg["depth"], skip_top=args.skip_top,
                          margin=args.margin if args.margin is not None
                          else cfg.get("margin", 0.05),
                          positive_depth=cfg.get("positive_depth"),
                          sampling=cfg.get("sampling", "top"))
    work = Path(args.work) if args.work else CACHE / "finetune" / args.part
    info = machine_info()
    start = time.perf_counter()
    report = run_finetune(
        cfg["kind"], args.data, out=work, split="train", eval_split="test",
        max_pairs=args.max_pairs or cfg["max_pairs"], max_eval_queries=args.max_eval_queries,
        mining=mining, training=training, eval_dims=cfg["eval_dims"],
        rerank_candidates=cfg.get("rerank_candidates", 20),
        cache_dir=CACHE / "embeddings", base_dtype="float32", dtype="bfloat16",
        progress=sys.stderr.isatty())
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    report["machine"] = info
    report["load_avg_at_end"] = os.getloadavg()
    report["part"] = args.part
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"finetune-{args.part}{args.tag}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2), encoding="utf-8")
    os.replace(tmp, out)
    print(f"{args.part}: {report['wall_seconds'] / 60:.1f} min in all; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
