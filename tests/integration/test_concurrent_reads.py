"""Reads that meet a write (or a close) half-way, on a real embedded store.

Each test puts the other thread's step at the worst moment of the read, deterministically:
between the two reads the old code made (a search's candidates and its hits' contents; the
ids of a document's chunks and the chunks; two pages of ids), or while a call is under way
when another thread closes the retriever. A stress test at the end does the same with real
threads and no placement."""

from __future__ import annotations

import threading
import time

import pytest

from retrievekit.errors import StoreError
from retrievekit.pipeline import HybridRetriever
from retrievekit.types import Document

WORDS = "lighthouse keepers log the tides and the fog every night"


def _open(tmp_path, embedder, **config):
    return HybridRetriever(config={"store": {"path": str(tmp_path / "store")}, **config},
                           embedder=embedder)


def _tenant_docs():
    docs = [Document(f"{WORDS}, note {i} of tenant {t}", id=f"{t}{i}",
                     metadata={"tenant": t, "rank": 1 if t == "A" else -1})
            for t in "AB" for i in range(4)]
    return docs + [Document(f"{WORDS}, the moving note", id="x",
                            metadata={"tenant": "A", "rank": 1})]


MOVED = Document("a different text about tides, now of tenant B", id="x",
                 metadata={"tenant": "B", "rank": -1})


@pytest.mark.parametrize("mode", ["sparse", "dense", "hybrid"])
@pytest.mark.parametrize("where", [{"tenant": "A"}, {"rank": {"$gt": 0}}],
                         ids=["bm25-index-filter", "chroma-filter"])
def test_a_write_during_a_filtered_search_shows_no_hit_outside_the_filter(
        tmp_path, embedder, monkeypatch, mode, where):
    """A document moves out of the filter after the search found it: its hit shows the
    version that passed (the search's snapshot) or no hit, never the moved version (the
    hits were read from the newest state of the BM25 index: tenant B's text in tenant A's
    results)."""
    r = _open(tmp_path, embedder)
    try:
        r.add_documents(_tenant_docs())
        engine = r._searcher.engine
        ranked = engine.ranked

        def then_move(request):
            out = ranked(request)
            r.add_documents([MOVED])
            return out

        monkeypatch.setattr(engine, "ranked", then_move)
        hits = r.search(f"{WORDS} moving note", k=5, where=where, mode=mode)
        assert hits
        for h in hits:
            assert h.document.metadata["tenant"] == "A", (h.id, h.document.metadata)
            assert "tenant B" not in h.document.text
        assert r.get(["x"])[0].metadata["tenant"] == "B"  # the move did happen
    finally:
        r.close()


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
@pytest.mark.parametrize("where", [{"tenant": "A"}, {"tenant": {"$ne": "B"}}],
                         ids=["eq", "ne"])
def test_a_filtered_search_during_a_write_finds_k_hits(tmp_path, tiny_embedder, mode, where):
    """Another thread's add is in Chroma but not yet in the BM25 index when a filtered
    search runs: the search still finds k of the 30 matching documents, none of which the
    write touches (the post-filter stopped widening at the BM25 snapshot's record count,
    and the new records, all nearer the query and all outside the filter, filled that many
    neighbours: 0 hits)."""
    r = _open(tmp_path, tiny_embedder)
    query = "zebra crossing at the harbour"
    try:
        r.add_documents([Document(f"{WORDS} {i}", id=f"a{i}", metadata={"tenant": "A"})
                         for i in range(30)])
        follower = r._writer.follower
        catch_up = follower.catch_up
        paused, resume = threading.Event(), threading.Event()

        def pause_then_catch_up(*args, **kwargs):
            paused.set()
            resume.wait(30)
            return catch_up(*args, **kwargs)

        follower.catch_up = pause_then_catch_up
        writer = threading.Thread(target=r.add_documents, args=(
            [Document(query, id=f"b{i}", metadata={"tenant": "B"}) for i in range(40)],))
        writer.start()
        try:
            assert paused.wait(30)
            hits = r.search(query, k=10, where=where, mode=mode)
        finally:
            resume.set()
            writer.join(60)
            follower.catch_up = catch_up
        assert len(hits) == 10
        assert {h.document.metadata["tenant"] for h in hits} == {"A"}
    finally:
        r.close()


def _long(word: str, n: int) -> str:
    return " ".join(f"{word}{i}" for i in range(n))


def test_get_meets_a_write_between_listing_and_reading_chunks(tmp_path, tiny_embedder,
                                                              monkeypatch):
    """A document read while a write makes it longer comes back whole, old or new: listing
    its chunk ids, then reading them, returned the new version cut to the old one's chunks
    (the write in between)."""
    r = _open(tmp_path, tiny_embedder, chunking={"max_tokens": 16, "overlap_tokens": 4})
    old, new = _long("old", 40), _long("new", 120)
    try:
        r.add_documents([Document(old, id="doc")])
        collection = r._store.collection
        get = collection.get
        state = {"written": False}

        def get_then_write(*args, **kwargs):
            out = get(*args, **kwargs)
            if not state["written"] and kwargs.get("where") and kwargs.get("include") == []:
                state["written"] = True
                r.add_documents([Document(new, id="doc")])
            return out

        monkeypatch.setattr(collection, "get", get_then_write)
        text = r.get(["doc"])[0].text
        assert state["written"]
        assert text in (old, new), f"a torn document of {len(text)} chars"
        monkeypatch.undo()
        assert r.get(["doc"])[0].text == new
    finally:
        r.close()


def test_document_ids_meets_deletes_between_its_reads(tmp_path, tiny_embedder, monkeypatch):
    """Listing documents while others are deleted lists every document that stays: pages
    of 5,000 records by offset skipped the records a delete before them shifted."""
    r = _open(tmp_path, tiny_embedder)
    ids = [f"d{i}" for i in range(6000)]
    try:
        r.add_documents([Document(f"note {i} on tides", id=d) for i, d in enumerate(ids)],
                        progress=False)
        collection = r._store.collection
        get = collection.get
        gone = ids[:200]
        state = {"deleted": False}

        def get_then_delete(*args, **kwargs):
            out = get(*args, **kwargs)
            if not state["deleted"]:
                state["deleted"] = True
                r.delete(gone)
            return out

        monkeypatch.setattr(collection, "get", get_then_delete)
        listed = r.document_ids()
        assert state["deleted"]
        missed = set(ids[200:]) - set(listed)
        assert not missed, f"{len(missed)} documents missed, e.g. {sorted(missed)[:3]}"
        monkeypatch.undo()
        assert sorted(r.document_ids()) == sorted(ids[200:])
    finally:
        r.close()


def test_document_ids_leaves_out_dead_records(tmp_path, tiny_embedder):
    """A `$ne` filter matches records that lack the key, as the dead records of a replaced
    document do (their keys removed) until the write deletes them: they are not listed."""
    r = _open(tmp_path, tiny_embedder)
    try:
        r.add_documents([Document("first version", id="d", metadata={"lang": "en"})])
        dead = {"_rk_parent": "d", "_rk_dead": True}
        r._store.collection.upsert(ids=["d#chunk0"], embeddings=[[1.0] + [0.0] * 31],
                                   documents=[""], metadatas=[dead])
        assert r.document_ids({"lang": {"$ne": "en"}}) == []
        assert r.document_ids() == ["d"]
    finally:
        r.close()


CALLS = {
    "search": (lambda r: r.search("tides", k=3, mode="hybrid"), "query"),
    # its inner search returns before its own read of the hits' vectors
    "search_mmr": (lambda r: r.search_mmr("tides", k=2, fetch_k=5), "query"),
    "get": (lambda r: r.get(["d1"]), "get"),
    "add": (lambda r: r.add_documents([Document("one more note", id="more")]), "upsert"),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_close_waits_for_a_call_under_way(tmp_path, tiny_embedder, monkeypatch, call):
    """`close()` from another thread while a call is in Chroma waits for the call, which
    returns its answer; later calls are a StoreError (close released the store under the
    call: a TypeError or AttributeError from its parts, or nothing found)."""
    r = _open(tmp_path, tiny_embedder)
    r.add_documents([Document(f"note {i} on tides", id=f"d{i}") for i in range(20)])
    run, chroma_method = CALLS[call]
    closed = threading.Event()
    closer = threading.Thread(target=lambda: (r.close(), closed.set()))
    collection = r._store.collection
    inner = getattr(collection, chroma_method)

    def close_meanwhile(*args, **kwargs):
        if not closer.is_alive() and not closed.is_set():
            closer.start()
            time.sleep(0.3)  # the old close was done by then
        return inner(*args, **kwargs)

    monkeypatch.setattr(collection, chroma_method, close_meanwhile)
    try:
        assert run(r) is not None
        assert closer.is_alive() and not closed.is_set()  # the close is waiting
    finally:
        closer.join(30) if closer.ident else r.close()
    assert closed.is_set()
    with pytest.raises(StoreError, match="closed"):
        r.search("tides")


def test_close_waits_for_a_call_whose_inner_call_starts_later(tmp_path, tiny_embedder,
                                                              monkeypatch):
    """`search_mmr` encodes the query, then searches (a public call inside a public call):
    a close that begins in between waits, and the inner search runs and returns (it was
    refused as if it were a new call: StoreError inside a call under way)."""
    r = _open(tmp_path, tiny_embedder)
    r.add_documents([Document(f"note {i} on tides", id=f"d{i}") for i in range(20)])
    closed = threading.Event()
    closer = threading.Thread(target=lambda: (r.close(), closed.set()))
    encode = r.embedder.embed_query

    def close_meanwhile(*args, **kwargs):
        if closer.ident is None:
            closer.start()
            time.sleep(0.3)
        return encode(*args, **kwargs)

    monkeypatch.setattr(r.embedder, "embed_query", close_meanwhile)
    try:
        assert len(r.search_mmr("tides", k=2, fetch_k=5)) == 2
        assert closer.is_alive() and not closed.is_set()
    finally:
        closer.join(30) if closer.ident else r.close()
    assert closed.is_set()


def test_close_from_inside_a_call_is_refused(tmp_path, tiny_embedder):
    """A generator that `add_documents` reads closes the retriever: the close is refused,
    and the add stops with that error, its batches whole (the close went through, and the
    add went on over the released store with an AttributeError)."""
    r = _open(tmp_path, tiny_embedder)

    def docs():
        yield Document("first note on tides", id="a")
        r.close()
        yield Document("second note on tides", id="b")

    try:
        with pytest.raises(StoreError, match="inside one of its own calls"):
            r.add_documents(docs())
        assert r.document_ids() == []  # the first batch was not written either
        r.add_documents([Document("a later note on tides", id="c")])
        assert r.verify()["ok"]
    finally:
        r.close()
    with pytest.raises(StoreError, match="closed"):
        r.count()


def test_searches_and_reads_during_moves_and_deletes(tmp_path, tiny_embedder):
    """Threads: one moves documents between tenants and deletes and re-adds others, three
    search with a tenant filter, get and list, for a few seconds. No hit outside the filter,
    no torn document, no document that was never deleted missing from a listing."""
    r = _open(tmp_path, tiny_embedder, chunking={"max_tokens": 16, "overlap_tokens": 4})
    versions = {t: Document(f"{_long('tenant' + t, 30 if t == 'A' else 60)} {WORDS}", id="m",
                            metadata={"tenant": t}) for t in "AB"}
    stable = [Document(f"{WORDS} steady {i}", id=f"s{i}", metadata={"tenant": "A"})
              for i in range(30)]
    r.add_documents(stable + [versions["A"]])
    stop = threading.Event()
    problems: list[str] = []
    errors: list[BaseException] = []

    def writer():
        try:
            n = 0
            while not stop.is_set():
                r.add_documents([versions["AB"[n % 2]]])
                r.delete([f"t{n % 5}"])
                r.add_documents([Document(f"{WORDS} transient {n}", id=f"t{n % 5}",
                                          metadata={"tenant": "B"})])
                n += 1
        except BaseException as exc:
            errors.append(exc)

    def reader(n):
        try:
            texts = {d.text for d in versions.values()}
            while not stop.is_set():
                mode = ("sparse", "dense", "hybrid")[n]
                for h in r.search(f"{WORDS} tenantA1", k=5, where={"tenant": "A"}, mode=mode):
                    if h.document.metadata.get("tenant") != "A" or "tenantB" in h.document.text:
                        problems.append(f"{mode}: {h.id} outside the filter")
                got = r.get(["m"])
                if got and got[0].text not in texts:
                    problems.append(f"torn get of {len(got[0].text)} chars")
                missing = {d.id for d in stable} - set(r.document_ids({"tenant": "A"}))
                if missing:
                    problems.append(f"listing missed {sorted(missing)[:3]}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(n,))
                                                   for n in range(3)]
    try:
        for t in threads:
            t.start()
        time.sleep(4)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        r.close()
    assert errors == []
    assert problems == []
