"""BM25 engines side by side: bm25s (today's `BM25Index`) versus tantivy fed our own tokens.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sparse_engines.py [quality|speed|all]

quality: whole-document nDCG@10 on the five test collections. speed: a synthetic 100k-doc
Zipf corpus (seed 0): tantivy build/upsert/query/reopen/RSS, snapshot isolation, SIGKILL
during commits, the writer lock, metadata filters; bm25s rebuild/query/RSS next to it.
Indexes go to a temporary folder, never into the project. Child processes (`--child`) give
clean RSS and cold reopen numbers and play the killed / competing writer.
"""
from __future__ import annotations

import json, os, random, shutil, signal, statistics, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import COLLECTIONS, collection_texts, load_collection, md_table  # noqa: E402

import tantivy  # noqa: E402
from tantivy import Document, Occur, PreTokenizedString, Query, Token  # noqa: E402

N_DOCS, VOCAB, SEED, N_GROUPS = 100_000, 50_000, 0, 10
BASELINE = "509015d"


def bm25index():
    """`BM25Index`/`SparseConfig` of retrievekit 0.1 (commit 509015d, the last before Engine
    v2 replaced it with tantivy), read from git: the bm25s engine this decision was made
    against. Needs a clone with history."""
    import importlib.util
    name = "retrievekit._sparse_head"
    if name not in sys.modules:
        repo = Path(__file__).resolve().parents[1]
        src = subprocess.check_output(["git", "-C", str(repo), "show", f"{BASELINE}:src/retrievekit/sparse.py"])
        import retrievekit
        mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
        mod.__package__ = "retrievekit"
        sys.modules[name] = mod
        exec(compile(src, f"{BASELINE}:src/retrievekit/sparse.py", "exec"), mod.__dict__)
    return sys.modules[name].BM25Index, sys.modules[name].SparseConfig


def rss_kib(key: str = "VmRSS") -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))


def ms(seconds) -> dict[str, float]:
    a = np.asarray(seconds) * 1000
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95))}


# -- tantivy -----------------------------------------------------------------------------------
def tv_schema():
    sb = tantivy.SchemaBuilder()
    sb.add_text_field("id", stored=True, tokenizer_name="raw", index_option="basic")
    sb.add_text_field("body", tokenizer_name="raw", index_option="freq")  # our tokens, no positions
    sb.add_integer_field("grp", indexed=True, fast=True)                   # metadata: fast int
    sb.add_text_field("tag", tokenizer_name="raw", index_option="basic")   # metadata: raw term
    return sb.build()


def tv_doc(doc_id: str, tokens: list[str], grp: int = 0) -> Document:
    d = Document()
    d.add_text("id", doc_id)
    d.add_pre_tokenized_text("body", PreTokenizedString(
        "", [Token(t, i, 0, 0) for i, t in enumerate(tokens)]))
    d.add_integer("grp", grp)
    d.add_text("tag", f"g{grp}")
    return d


def tv_query(schema, tokens: list[str], filt=None):
    """OR of one term query per query token (a repeated token counts again, like bm25s)."""
    q = Query.boolean_query([(Occur.Should, Query.term_query(schema, "body", t, index_option="freq"))
                             for t in tokens])
    # a filter must not add to the score: wrap it in a zero constant score
    return q if filt is None else Query.boolean_query(
        [(Occur.Must, q), (Occur.Must, Query.const_score_query(filt, 0.0))])


def tv_search(searcher, schema, tokens, k, filt=None) -> list[tuple[str, float]]:
    if not tokens:
        return []
    hits = searcher.search(tv_query(schema, tokens, filt), k, count=False).hits
    out = [(searcher.doc(a).get_first("id"), s) for s, a in hits]
    return sorted(out, key=lambda h: (-h[1], h[0]))


def tv_build(path: str, docs, ids, groups=None, threads: int = 1):
    ix = tantivy.Index(tv_schema(), path=path)
    w = ix.writer(heap_size=256_000_000, num_threads=threads)
    for i, (d, toks) in enumerate(zip(ids, docs)):
        w.add_document(tv_doc(d, toks, groups[i] if groups is not None else 0))
    w.commit()
    ix.reload()
    return ix, w


def dir_mb(path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


# -- quality -----------------------------------------------------------------------------------
def quality() -> None:
    import logging
    from retrievekit.evaluation import evaluate
    from retrievekit.tokenize import Tokenizer

    BM25Index, SparseConfig = bm25index()
    tok = Tokenizer()
    logging.getLogger("retrievekit").setLevel(logging.ERROR)  # the doc id == query id notes
    names = ["bm25s k1=1.5 (today)", "bm25s k1=1.2", "tantivy (k1=1.2 fixed)"]
    rows, means = [], {n: [] for n in names}
    for name in COLLECTIONS:
        ds = load_collection(name)
        pairs = collection_texts(ds)  # title + "\n" + text, blank documents left out
        ids, texts = [i for i, _ in pairs], [t for _, t in pairs]
        fns = {}
        for label, k1 in zip(names[:2], (1.5, 1.2)):
            bm = BM25Index(SparseConfig(k1=k1, b=0.75, method="lucene"))
            bm.upsert(ids, texts); bm.refresh()
            fns[label] = bm.search
        tmp = tempfile.mkdtemp(prefix=f"tv-{name}-")
        ix, _ = tv_build(tmp, [tok(t) for t in texts], ids)
        s, schema = ix.searcher(), ix.schema
        fns[names[2]] = lambda q, k, s=s, schema=schema: tv_search(s, schema, tok(q), k)
        row = [name, len(ids), len(ds.queries)]
        for label in names:
            v = evaluate(fns[label], ds, k=10, ks=(10,), metrics=("ndcg",), progress=False)
            means[label].append(v.means["ndcg@10"]); row.append(v.means["ndcg@10"])
        rows.append(row + [row[5] - row[3]])
        shutil.rmtree(tmp)
    m = [float(np.mean(means[n])) for n in names]
    rows.append(["mean", "", "", *m, m[2] - m[0]])
    print("\n### Sparse nDCG@10 (test queries, whole documents, b=0.75)\n")
    print(md_table(["collection", "docs", "queries", *names, "tantivy - today"],
                   [[f"{c:.4f}" if isinstance(c, float) else c for c in r] for r in rows]))


# -- synthetic corpus --------------------------------------------------------------------------
def synthetic():
    rng = np.random.default_rng(SEED)
    p = 1.0 / np.arange(1, VOCAB + 1)
    p /= p.sum()
    vocab = [f"w{i}" for i in range(VOCAB)]
    lens = rng.integers(40, 81, N_DOCS)  # ~60 tokens
    flat = rng.choice(VOCAB, size=int(lens.sum()), p=p)
    offs = np.concatenate([[0], np.cumsum(lens)])
    docs = [[vocab[j] for j in flat[offs[i]:offs[i + 1]]] for i in range(N_DOCS)]
    ids = [f"d{i:06d}" for i in range(N_DOCS)]
    # queries: 3-5 Zipf-drawn terms, skipping the 100 commonest (stopword-like) ranks
    qp = p.copy(); qp[:100] = 0; qp /= qp.sum()
    queries = [[vocab[j] for j in rng.choice(VOCAB, size=int(rng.integers(3, 6)), p=qp)]
               for _ in range(200)]
    fresh = lambda n: [[vocab[j] for j in rng.choice(VOCAB, size=60, p=p)] for _ in range(n)]
    return vocab, docs, ids, queries, fresh, rng


def timed_queries(fn, queries) -> dict[str, float]:
    for q in queries[:10]:
        fn(q)
    spent = []
    for q in queries:
        t = time.perf_counter(); fn(q); spent.append(time.perf_counter() - t)
    return ms(spent)


def child(argv: list[str]) -> None:
    mode, path = argv[0], argv[1]
    if mode == "tv-open":
        queries = json.loads(Path(argv[2]).read_text())
        base, base_anon = rss_kib(), rss_kib("RssAnon")
        t = time.perf_counter()
        ix = tantivy.Index.open(path); s = ix.searcher()
        tv_search(s, ix.schema, queries[0], 10)
        first = time.perf_counter() - t
        r1 = rss_kib() - base
        for q in queries:
            tv_search(s, ix.schema, q, 10)
        print(json.dumps({"open_first_query_ms": first * 1000, "rss_first_mb": r1 / 1024,
                          "rss_200q_mb": (rss_kib() - base) / 1024,
                          "anon_200q_mb": (rss_kib("RssAnon") - base_anon) / 1024}))
    elif mode == "bm25-open":
        BM25Index, SparseConfig = bm25index()
        import bm25s  # noqa: F401  (its import is not the index's memory)
        queries = json.loads(Path(argv[2]).read_text())
        base = rss_kib()
        t = time.perf_counter()
        bm = BM25Index.load(path, SparseConfig()); bm.search(" ".join(queries[0]), 10)
        first = time.perf_counter() - t
        for q in queries:
            bm.search(" ".join(q), 10)
        print(json.dumps({"open_first_query_ms": first * 1000,
                          "rss_200q_mb": (rss_kib() - base) / 1024}))
    elif mode == "lock":  # another process while the parent holds the writer
        ix = tantivy.Index.open(path)
        try:
            ix.writer(); res = "second writer acquired"
        except ValueError as exc:
            res = f"refused: {str(exc)[:40]}"
        print(json.dumps({"writer": res, "reader_num_docs": ix.searcher().num_docs}))
    elif mode == "crash-writer":  # commit batches forever, report each committed count
        ix = tantivy.Index.open(path)
        w = ix.writer(heap_size=50_000_000, num_threads=1)
        rng, n, i = random.Random(os.getpid()), int(argv[2]), 0
        while True:
            for _ in range(200):
                w.add_document(tv_doc(f"c{i}", [f"w{rng.randrange(5000)}" for _ in range(60)]))
                i += 1
            if i > 400:  # also delete, so commits carry deletes
                w.delete_documents_by_term("id", f"c{i - 401}"); n -= 1
            n += 200
            print("P", n, flush=True)  # about to commit n documents
            w.commit()
            print("C", n, flush=True)


def run_child(*args, wait=True):
    cmd = [sys.executable, __file__, "--child", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def speed() -> None:
    BM25Index, SparseConfig = bm25index()

    vocab, docs, ids, queries, fresh, rng = synthetic()
    groups = [i % N_GROUPS for i in range(N_DOCS)]
    work = Path(tempfile.mkdtemp(prefix="sparse-engines-"))
    qfile = work / "queries.json"; qfile.write_text(json.dumps(queries))
    tv_path = work / "tantivy"; tv_path.mkdir()
    T: dict = {}; B: dict = {}  # tantivy, bm25s

    t = time.perf_counter()
    [tv_doc(d, toks) for d, toks in zip(ids, docs)]
    T["doc_objects_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ix, w = tv_build(str(tv_path), docs, ids, groups)
    T["build_s"] = time.perf_counter() - t
    T["disk_mb"], schema, s = dir_mb(tv_path), ix.schema, ix.searcher()
    T["segments"] = s.num_segments

    def upsert(n):
        spent = []
        for _ in range(20):
            pick, new = rng.choice(N_DOCS, n, replace=False), fresh(n)
            t = time.perf_counter()
            for j, toks in zip(pick, new):
                w.delete_documents_by_term("id", ids[j])
                w.add_document(tv_doc(ids[j], toks, groups[j]))
            w.commit(); ix.reload(); ix.searcher()
            spent.append(time.perf_counter() - t)
        return statistics.median(spent) * 1000
    T["upsert1_ms"], T["upsert100_ms"] = upsert(1), upsert(100)
    s = ix.searcher(); assert s.num_docs == N_DOCS, s.num_docs
    T["query"] = timed_queries(lambda q: tv_search(s, schema, q, 10), queries)
    T["query_no_doc_fetch"] = timed_queries(
        lambda q: s.search(tv_query(schema, q), 10, count=False), queries)
    f_fast = Query.range_query(schema, "grp", tantivy.FieldType.Integer, 3, 3)
    f_term = Query.term_query(schema, "tag", "g3")
    hits = s.search(tv_query(schema, queries[0], f_fast), 10).hits
    assert all(v == 3 for v in s.fast_field_values("grp", [a for _, a in hits]))
    T["query_filter_fast_int"] = timed_queries(lambda q: tv_search(s, schema, q, 10, f_fast), queries)
    T["query_filter_raw_term"] = timed_queries(lambda q: tv_search(s, schema, q, 10, f_term), queries)

    # snapshot isolation: a searcher taken before a commit keeps its view
    old = s
    w.delete_documents_by_term("id", ids[0]); w.add_document(tv_doc("new-doc", ["zzuniq"]))
    w.commit(); ix.reload(); new = ix.searcher()
    look = lambda sr, f, v: len(sr.search(Query.term_query(schema, f, v), 10).hits)
    T["snapshot"] = (f"old searcher: {old.num_docs} docs, deleted found={look(old, 'id', ids[0])}, "
                     f"new found={look(old, 'body', 'zzuniq')}; after reload: {new.num_docs} docs, "
                     f"deleted found={look(new, 'id', ids[0])}, new found={look(new, 'body', 'zzuniq')}")
    T["lock"] = run_child("lock", tv_path)  # parent still holds `w`
    del w; T["reopen"] = run_child("tv-open", tv_path, qfile)

    # SIGKILL during a writer loop
    crash = []
    for trial in range(10):
        p = work / f"crash{trial}"; p.mkdir()
        cix, cw = tv_build(str(p), docs[:1000], [f"s{i}" for i in range(1000)]); del cw, cix
        proc = run_child("crash-writer", p, 1000, wait=False)
        time.sleep(random.Random(trial).uniform(0.5, 3.0))
        proc.send_signal(signal.SIGKILL)
        lines = [ln.split() for ln in proc.communicate()[0].splitlines()]
        seen = [1000] + [int(n) for k, n in lines if k == "C"]
        pending = int(lines[-1][1]) if lines and lines[-1][0] == "P" else None
        try:
            rix = tantivy.Index.open(str(p)); n = rix.searcher().num_docs
            rix.writer()  # the dead writer's lock is gone
            # the commit in flight may or may not have landed; anything else is corruption
            verdict = ("ok: in-flight commit landed" if n == pending else "ok: last commit"
                       if n == seen[-1] else "ok: older commit" if n in seen else
                       f"BAD, committed {seen[-3:]}, pending {pending}")
            crash.append((len(seen) - 1, pending is not None, n, verdict))
        except Exception as exc:  # noqa: BLE001
            crash.append((len(seen) - 1, pending is not None, None, f"FAILED to reopen: {exc}"))
        shutil.rmtree(p)
    T["crash"] = crash

    # bm25s as BM25Index does it: keep term ids, rebuild the engine on every change
    bm = BM25Index(SparseConfig())
    bm._vocab = {v: i for i, v in enumerate(vocab)}  # pre-tokenized: skip the tokenizer
    bm._terms = {d: np.asarray([int(x[1:]) for x in toks], np.int32) for d, toks in zip(ids, docs)}
    bm._hashes, bm._snapshot = {d: "" for d in ids}, None
    t = time.perf_counter(); bm.refresh(); B["build_s"] = time.perf_counter() - t
    one = []
    for _ in range(3):
        j = int(rng.integers(N_DOCS))
        t = time.perf_counter(); bm.upsert([ids[j]], [" ".join(fresh(1)[0])]); bm.refresh()
        one.append(time.perf_counter() - t)
    B["upsert1_ms"] = statistics.median(one) * 1000
    B["query"] = timed_queries(lambda q: bm.search(" ".join(q), 10), queries)
    allowed = set(ids[3::N_GROUPS])
    B["query_filter_allowed"] = timed_queries(lambda q: bm.search(" ".join(q), 10, allowed=allowed),
                                              queries)
    bm.save(work / "bm25", marker="x")
    B["disk_mb"] = dir_mb(work / "bm25")
    B["reopen"] = run_child("bm25-open", work / "bm25", qfile)
    shutil.rmtree(work)
    report_speed(T, B)


def report_speed(T, B) -> None:
    q = lambda d: f"{d['p50']:.2f} / {d['p95']:.2f}"
    print(f"\n### Synthetic corpus: {N_DOCS} docs x ~60 tokens, Zipf vocabulary {VOCAB}, seed {SEED}\n")
    rows = [
        ("build (tantivy: 1 writer thread + commit; bm25s: engine from term ids) s",
         f"{T['build_s']:.1f}", f"{B['build_s']:.1f}"),
        ("  of which building Python Document/Token objects s", f"{T['doc_objects_s']:.1f}", "—"),
        ("disk MiB", f"{T['disk_mb']:.1f} ({T['segments']} segments)", f"{B['disk_mb']:.1f}"),
        ("upsert 1 doc ms (median)", f"{T['upsert1_ms']:.1f}", f"{B['upsert1_ms']:.0f} (full rebuild)"),
        ("upsert 100 docs ms (median)", f"{T['upsert100_ms']:.1f}", "same as 1 doc"),
        ("query p50 / p95 ms (top 10 + ids)", q(T["query"]), q(B["query"])),
        ("query p50 / p95 ms, no stored-id fetch", q(T["query_no_doc_fetch"]), "—"),
        ("query + filter 10%: fast int range", q(T["query_filter_fast_int"]), "—"),
        ("query + filter 10%: raw text term", q(T["query_filter_raw_term"]), "—"),
        ("query + filter 10%: allowed=10k ids (mask)", "—", q(B["query_filter_allowed"])),
        ("reopen + first query ms (fresh process)", f"{T['reopen']['open_first_query_ms']:.1f}",
         f"{B['reopen']['open_first_query_ms']:.0f} (load + rebuild)"),
        ("RSS after open + first query MiB", f"{T['reopen']['rss_first_mb']:.1f}", "—"),
        ("RSS after 200 queries MiB (fresh process)",
         f"{T['reopen']['rss_200q_mb']:.1f} (anon {T['reopen']['anon_200q_mb']:.1f})",
         f"{B['reopen']['rss_200q_mb']:.1f}"),
    ]
    print(md_table(["measure", "tantivy", "bm25s (BM25Index)"], rows))
    print(f"\nsnapshot isolation: {T['snapshot']}")
    print(f"second process, parent holding the writer: {T['lock']}")
    print("SIGKILL during writer loop (commits done, killed mid-commit?, num_docs after reopen, verdict):")
    for c in T["crash"]:
        print(f"  {c}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        what = sys.argv[1] if len(sys.argv) > 1 else "all"
        if what in ("quality", "all"):
            quality()
        if what in ("speed", "all"):
            speed()
