"""local_vectors answers the dense side in this process (graph.py): no Chroma query, exact
scores and (but for a near tie at the cut) the exact top k, writes followed, and a reopen
that loads the saved graph and replays only the changes since."""

from __future__ import annotations

import numpy as np
import pytest

from retrievekit import graph as G
from retrievekit.funnel import GRAPH_FILE
from retrievekit.pipeline import HybridRetriever

DOCS = [{"text": f"record {i} " + ("river stone" if i % 2 else "cloud engine"), "id": f"d{i}",
         "metadata": {"bucket": i % 40}} for i in range(300)]


def _similarities(r, q):
    """Exact cosine similarity of every live record Chroma holds, by id."""
    sims = {}
    for batch in r.store.iter_records(include=["embeddings", "metadatas"]):
        sims.update((rid, float(np.asarray(v) @ q)) for rid, v, m in
                    zip(batch["ids"], batch["embeddings"], batch["metadatas"])
                    if not m.get("_rk_dead"))
    return sims


def _check(r, hits, q, k):
    """Each hit scored with its exact cosine; the hits are the exact top k but for at most
    two near the cut (an approximate graph, 8-bit: as Chroma's, it may miss some; the
    callers bound the total). Returns how many of the exact top k were found."""
    sims = _similarities(r, q)
    for h in hits:
        assert h.score == pytest.approx(sims[h.id], abs=1e-5)
    best = sorted(sims, key=lambda i: -sims[i])[:k]
    found = len({h.id for h in hits} & set(best))
    assert len(hits) == k and found >= k - 2
    return found


def _no_chroma_query(r, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the dense side asked Chroma")

    monkeypatch.setattr(r.store, "query", refuse)


def test_dense_side_runs_in_process_with_exact_scores(tmp_path, tiny_embedder, monkeypatch):
    cfg = {"store": {"path": str(tmp_path / "s")}, "local_vectors": True}
    with HybridRetriever(cfg, embedder=tiny_embedder) as r:
        r.add_documents(DOCS)
        _no_chroma_query(r, monkeypatch)
        found = 0
        for i in range(20):  # queries near the records, as real ones are
            q = tiny_embedder.embed_query(f"record {i * 13} cloud river")
            hits = r.search("x", 10, mode="dense", query_vector=q, candidates=10)
            found += _check(r, hits, q, 10)
            assert r.search("river", 5, query_vector=q)  # hybrid too
        assert found >= 196  # recall@10 of at least 0.98
        # a broad filter is post-filtered on the graph's neighbours, still without Chroma
        hits = r.search("x", 5, mode="dense", where={"bucket": {"$in": list(range(10, 40))}},
                        query_vector=q)
        assert len(hits) == 5 and all(h.document.metadata["bucket"] >= 10 for h in hits)


def test_graph_follows_writes_and_reopens_from_its_file(tmp_path, tiny_embedder, monkeypatch):
    cfg = {"store": {"path": str(tmp_path / "s")}, "local_vectors": True}
    many = [{"text": f"entry {i} of the archive", "id": f"e{i}"} for i in range(1200)]
    with HybridRetriever(cfg, embedder=tiny_embedder) as r:
        r.add_documents(DOCS + many)  # one commit past 1,000 rows: a base, with the graph
        r.add_documents([{"text": "a lighthouse keeper's logbook", "id": "d0"}])  # deltas
        r.delete(["d1"])
    added: list[int] = []
    upsert = G.VectorGraph.upsert

    def counting(self, ids, vectors):
        added.append(len(ids))
        return upsert(self, ids, vectors)

    monkeypatch.setattr(G.VectorGraph, "upsert", counting)
    with HybridRetriever(cfg, embedder=tiny_embedder) as r:
        assert sum(added) <= 2  # the saved graph, then d0's new vector: no rebuild of 1,499
        _no_chroma_query(r, monkeypatch)
        q = tiny_embedder.embed_query("a lighthouse keeper's logbook")
        top = r.search("x", 10, mode="dense", query_vector=q, candidates=10)  # the graph
        assert top[0].id == "d0"  # found by its new vector, replayed from a delta
        _check(r, top, q, 10)
        hits = r.search("x", 1500, mode="dense", query_vector=q)  # all: an exact scan
        assert hits[0].id == "d0" and "d1" not in {h.id for h in hits}
        assert len(hits) == 1499
        exact = sorted(_similarities(r, q).values(), reverse=True)[:10]
        np.testing.assert_allclose([h.score for h in hits[:10]], exact, atol=1e-5)  # a scan


@pytest.mark.parametrize("how", ["deleted", "truncated", "garbage", "altered",
                                 "no checksum"])
def test_damaged_graph_is_built_again_once(tmp_path, tiny_embedder, monkeypatch, how, caplog):
    cfg = {"store": {"path": str(tmp_path / "s")}, "local_vectors": True}
    q = tiny_embedder.embed_query("river stone")
    with HybridRetriever(cfg, embedder=tiny_embedder) as r:
        r.add_documents(DOCS)
        expected = [(h.id, round(h.score, 5)) for h in
                    r.search("x", 10, mode="dense", query_vector=q)]
    graph, = (tmp_path / "s").glob(f"retrievekit/*/funnel/base-*/{GRAPH_FILE}")
    if how == "deleted":
        graph.unlink()
    elif how == "truncated":
        graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    elif how == "altered":  # the same size: usearch read it and crashed in a search
        data = bytearray(graph.read_bytes())
        for i in range(len(data) // 8, len(data) // 3, 97):
            data[i] ^= 0x5A
        graph.write_bytes(bytes(data))
    elif how == "no checksum":
        (graph.parent / "checksums.json").unlink()
    else:
        graph.write_bytes(b"not a usearch index" * 50)
    with HybridRetriever(cfg, embedder=tiny_embedder) as r:
        _no_chroma_query(r, monkeypatch)
        assert [(h.id, round(h.score, 5)) for h in
                r.search("x", 10, mode="dense", query_vector=q)] == expected
    assert how == "deleted" or "vector graph" in caplog.text \
        or how == "no checksum" and "funnel vectors" in caplog.text  # the whole copy
    saved = list((tmp_path / "s").glob(f"retrievekit/*/funnel/base-*/{GRAPH_FILE}"))
    assert len(saved) == 1 and saved[0] != graph or how == "deleted" and len(saved) == 1
    added: list[int] = []
    upsert = G.VectorGraph.upsert
    monkeypatch.setattr(G.VectorGraph, "upsert",
                        lambda self, ids, v: (added.append(len(ids)), upsert(self, ids, v)))
    with HybridRetriever(cfg, embedder=tiny_embedder) as r:  # saved again: not rebuilt
        assert added == []


def test_a_commit_that_fails_on_a_full_disk_keeps_its_change(tmp_path, tiny_embedder,
                                                             monkeypatch):
    """The vector copy's commit changes nothing until its manifest is written: a write it
    could not save (the disk full) goes out with the next commit. It once dropped the
    change and moved its watermark on, so that after a reopen the copy held a replaced
    document's old vector for good (and a repeat of the call skipped it as unchanged)."""
    import errno

    from retrievekit import funnel as F
    from retrievekit.errors import StoreFullError

    cfg = {"store": {"path": str(tmp_path / "s")}, "local_vectors": True}
    docs = [{"text": f"record {i} river stone", "id": f"d{i}"} for i in range(50)]
    new = {"text": "a lighthouse keeper's logbook", "id": "d0"}
    with HybridRetriever(cfg, embedder=tiny_embedder) as r:
        r.add_documents(docs)
    write_folder = F.write_folder

    def full_once(*args, **kwargs):
        monkeypatch.setattr(F, "write_folder", write_folder)
        raise OSError(errno.ENOSPC, "No space left on device")

    with HybridRetriever(cfg, embedder=tiny_embedder) as r:
        monkeypatch.setattr(F, "write_folder", full_once)
        with pytest.raises(StoreFullError):
            r.add_documents([new])
        r.add_documents([{"text": "a later document", "id": "later"}])  # space again
    with HybridRetriever(cfg, embedder=tiny_embedder) as r:
        q = np.asarray(r.store.get(ids=["d0"], include=["embeddings"])["embeddings"][0])
        hits = r.search("x", 1, mode="dense", query_vector=q)
        assert hits[0].id == "d0" and hits[0].score == pytest.approx(1.0, abs=1e-5)
