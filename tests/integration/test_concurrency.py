"""Concurrency: searches in 8 threads while another thread adds and deletes; two processes
opening one embedded store for writing."""

from __future__ import annotations

import threading
import uuid

import pytest

from conftest import CORPUS, MODEL
from retrievekit.errors import StoreLockedError
from retrievekit.pipeline import HybridRetriever
from retrievekit.types import Document

EXTRA = {f"extra{i}": f"Extra note {i} about lighthouses, tides and sea fog number {i}."
         for i in range(12)}


@pytest.fixture(params=["embedded", pytest.param("server", marks=pytest.mark.server)])
def live(request, tmp_path, embedder, corpus_docs):
    """A filled retriever over an embedded store, or over a collection on the server (where
    every search first checks the change marker and may catch up)."""
    if request.param == "embedded":
        r = HybridRetriever(path=str(tmp_path / "store"), embedder=embedder)
    else:
        server = request.getfixturevalue("chroma_server")
        r = HybridRetriever(host=server.host, port=server.port,
                            collection=f"rk-{uuid.uuid4().hex[:12]}", embedder=embedder)
    r.add_documents(corpus_docs)
    yield r
    r.close()


def test_searches_during_writes_never_fail_or_tear(live):
    retriever = live
    known = {i: t for i, t, _ in CORPUS} | EXTRA
    errors: list[BaseException] = []
    torn: list[tuple[str, str]] = []
    searches = [0] * 8
    writing = threading.Event()
    writing.set()
    queries = ["lighthouses and sea fog", "cats purr", "programming language", "tea caffeine"]

    def searcher(n: int) -> None:
        modes = ("hybrid", "dense", "sparse")
        try:
            while writing.is_set() or searches[n] < 3:
                q = queries[searches[n] % len(queries)]
                for h in retriever.search(q, k=5, mode=modes[(n + searches[n]) % 3]):
                    if known.get(h.id) != h.document.text:
                        torn.append((h.id, h.document.text))
                searches[n] += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    def writer() -> None:
        try:
            ids = list(EXTRA)
            for s in range(0, len(ids), 3):
                retriever.add_documents([Document(EXTRA[i], id=i) for i in ids[s:s + 3]])
                if s:
                    retriever.delete(ids[s - 3:s])
            retriever.delete(["cats"])
        except BaseException as exc:
            errors.append(exc)
        finally:
            writing.clear()

    threads = [threading.Thread(target=searcher, args=(n,)) for n in range(8)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert errors == []
    assert torn == []
    assert min(searches) >= 3
    # afterwards both sides hold exactly what Chroma holds
    stored = set(retriever.store.get(include=[])["ids"])
    expected = ({i for i, _, _ in CORPUS} - {"cats"}) | {"extra9", "extra10", "extra11"}
    assert stored == expected == retriever.verify()['sparse_ids']


def test_second_process_is_refused_at_once_with_store_locked(tmp_path, embedder):
    from rk_children import hold_store, mp_context

    path = str(tmp_path / "store")
    with HybridRetriever(path=path, embedder=embedder) as r:  # this process opened it before
        r.add_documents([Document("A first note about kites.", id="kites")])
    ctx = mp_context()
    conn, child_end = ctx.Pipe()
    proc = ctx.Process(target=hold_store, args=(path, MODEL,
                                                child_end), daemon=True)
    proc.start()
    try:
        assert conn.poll(120) and conn.recv()[0] == "open"
        # the child holds it: this process is refused, with the way out in the message
        with pytest.raises(StoreLockedError) as err:
            HybridRetriever(path=path, embedder=embedder)
        msg = str(err.value)
        assert path in msg and "close it there" in msg and "chroma run" in msg
        conn.send(("Zebras have black and white stripes.", "zebra"))
        assert conn.poll(120) and conn.recv()[0] == "added"
        conn.send("close")
        assert conn.poll(60) and conn.recv()[0] == "closed"
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    # once closed there, it opens here and sees the other process's write on both sides
    # (a Chroma client kept from the first open would serve a stale vector index); and a
    # second process is refused the other way round
    with HybridRetriever(path=path, embedder=embedder) as r:
        for mode in ("dense", "sparse"):
            assert r.search("zebra stripes", k=1, mode=mode)[0].id == "zebra"
        conn, child_end = ctx.Pipe()
        proc = ctx.Process(target=hold_store, args=(path, MODEL,
                                                    child_end), daemon=True)
        proc.start()
        try:
            assert conn.poll(120)
            status, kind, _ = conn.recv()
            assert (status, kind) == ("error", "StoreLockedError")
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        assert r.count() == 2


def test_second_open_in_the_same_process_is_refused(tmp_path, embedder):
    path = str(tmp_path / "store")
    with HybridRetriever(path=path, embedder=embedder):
        with pytest.raises(StoreLockedError):
            HybridRetriever(path=path, embedder=embedder)
    HybridRetriever(path=path, embedder=embedder).close()  # free again after close()
