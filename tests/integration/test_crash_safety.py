"""Crash safety: a process SIGKILLed in the middle of `add_documents` of thousands of
documents leaves a store that opens, whose BM25 ids equal its Chroma ids, and where re-running
the same add completes with nothing lost and nothing duplicated.

The model is a real sentence-transformers model that is fast enough for thousands of texts
on one CPU thread: a 1-layer, 32-dim BERT with random weights and the bundled MiniLM
tokenizer, saved to disk and loaded by path (~5k short texts/s instead of ~100/s). Scores are
meaningless; identical texts still get identical vectors, which the checks use.

Kill points: named ones (a real SIGKILL sent by the child to itself from a patched function
in the child only: after the first of two Chroma batches, after Chroma's delete, before the
BM25 commit) and timing-based ones (the parent kills the child at several delays after the
add started). Random moments over updates that change chunk counts and deletes:
test_crash_random.py.
"""

from __future__ import annotations

import time

import pytest

from retrievekit.embedding import Embedder
from retrievekit.pipeline import HybridRetriever
from rk_children import crash_add, make_docs, mp_context

pytestmark = pytest.mark.slow

MEDIUM = 3000  # one Chroma batch of ~2 s: timing kills land inside it or after it
SMALL = 1200


def _run_child(path: str, model: str, n: int, version: int, point: str,
               kill_after: float | None = None) -> int:
    """Run `crash_add` in a child; returns its exit code (-9 when killed).

    `kill_after`: SIGKILL it that many seconds after its documents are embedded, i.e.
    into the Chroma write (or later, if the write is faster)."""
    ctx = mp_context()
    started, encoded = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=crash_add,
                       args=(path, model, n, version, point, started, encoded))
    proc.start()
    try:
        assert started.wait(120), "the child did not start its add"
        if kill_after is not None:
            encoded.wait(120)
            time.sleep(kill_after)
            proc.kill()  # SIGKILL
        proc.join(180)
        assert not proc.is_alive(), "the child hung"
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
    return proc.exitcode


def _chroma_ids(r: HybridRetriever) -> list[str]:
    return [i for batch in r.store.iter_records(include=[]) for i in batch["ids"]]


def _check_after_kill(path: str, embedder: Embedder, n: int, version: int) -> int:
    """The store opens; BM25 ids equal Chroma ids; every stored text is a known one; then
    the same add completes with nothing lost or duplicated. Returns the count found."""
    expected = {d.id: d.text for d in make_docs(n, version)}
    older = {d.id: d.text for d in make_docs(n, version - 1)} if version else {}
    with HybridRetriever(path=path, embedder=embedder) as r:
        ids = _chroma_ids(r)
        found = len(ids)
        assert len(set(ids)) == found
        assert r.verify()['sparse_ids'] == set(ids)
        for doc in r.get(ids):
            assert doc.text in (expected.get(doc.id), older.get(doc.id))
        r.add_documents(make_docs(n, version))
        ids = _chroma_ids(r)
        assert len(ids) == len(set(ids)) == n == r.count()
        assert set(ids) == set(expected) == r.verify()['sparse_ids']
        assert {d.id: d.text for d in r.get(sorted(expected))} == expected
        for j in (0, n // 2, n - 1):  # both sides find the right record
            doc_id, text = f"d{j:05d}", expected[f"d{j:05d}"]
            assert r.search(f"uniq{j}v{version}", k=1, mode="sparse")[0].id == doc_id
            # its stored vector is its text's: cosine 1 (near-twins may tie in HNSW order)
            dense = {h.id: h.score for h in r.search(text, k=10, mode="dense")}
            assert dense.get(doc_id, 0.0) > 0.9999
    with HybridRetriever(path=path, embedder=embedder) as r:  # saved, in step, reloadable
        state = r.verify()
        assert state["ok"] and state["sparse_ids"] == set(expected)
    return found


def test_kill_after_first_chroma_batch(tmp_path, tiny_model, tiny_embedder):
    from retrievekit.store import ChromaStore, StoreConfig

    probe = ChromaStore(StoreConfig(path=":memory:", collection="rk-batch-probe"))
    big = probe.max_batch + 139  # two Chroma batches (5,600 with chromadb 1.5.9)
    probe.close()
    path = str(tmp_path / "store")
    assert _run_child(path, tiny_model, big, 0, "after-first-chroma-batch") == -9
    found = _check_after_kill(path, tiny_embedder, big, 0)
    assert 0 < found < big  # the kill landed between the two batches


def test_kill_before_sparse_commit(tmp_path, tiny_model, tiny_embedder):
    path = str(tmp_path / "store")
    assert _run_child(path, tiny_model, SMALL, 0, "none") == 0
    # an update of every text, killed before BM25 commits: Chroma has the new texts
    assert _run_child(path, tiny_model, SMALL, 1, "before-sparse-commit") == -9
    assert _check_after_kill(path, tiny_embedder, SMALL, 1) == SMALL


def test_kills_at_several_delays(tmp_path, tiny_model, tiny_embedder):
    """Consecutive runs of the same add, each SIGKILLed by the parent at a delay after the
    embedding step, each followed by the checks; wherever a kill lands, the store stays
    consistent (a kill inside Chroma's batch transaction leaves none of that batch)."""
    path = str(tmp_path / "store")
    landed = []
    for delay in (0.05, 0.6, 1.5):
        code = _run_child(path, tiny_model, MEDIUM, 0, "none", kill_after=delay)
        with HybridRetriever(path=path, embedder=tiny_embedder) as r:
            ids = _chroma_ids(r)
            assert r.verify()['sparse_ids'] == set(ids) and len(ids) == len(set(ids))
        landed.append((delay, code, len(ids)))
    print("kill delay, exit code, records in Chroma after the kill:", landed)
    assert any(code == -9 for _, code, _ in landed)
    _check_after_kill(path, tiny_embedder, MEDIUM, 0)
