"""Two server-mode clients writing the same document at once (changelog.py, writer.py).

Each write reads the document's stored records, then replaces them by id. Two writers whose
reads and writes interleave left a spliced document: the chunks of one version beside the
record of the other, for good. The writes are interleaved here by hooks on client A's own
objects; both clients are real, on a real `chroma run` server.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from retrievekit.pipeline import HybridRetriever
from retrievekit.records import is_live
from retrievekit.types import Document
from retrievekit.writer import document_records

pytestmark = pytest.mark.server

CONFIG = {"chunking": {"max_tokens": 24, "overlap_tokens": 4}}
OLD = " ".join(f"Sentence {i} of the old version talks about wombats and burrows."
               for i in range(14))
LONG = " ".join(f"Line {i} of the long version is about quokkas on Rottnest island."
                for i in range(8))
SHORT = "The short version: pangolins have scales."


@pytest.fixture
def kw(chroma_server) -> dict:
    """Keyword arguments of clients of one new collection."""
    return {"host": chroma_server.host, "port": chroma_server.port,
            "collection": f"rk-{uuid.uuid4().hex[:12]}", "config": CONFIG}


@pytest.fixture
def clients(kw, embedder):
    """Clients A and B of one new collection (`kw`)."""
    a = HybridRetriever(embedder=embedder, **kw)
    b = HybridRetriever(embedder=embedder, **kw)
    yield a, b
    a.close()
    b.close()


def _live_ids(r: HybridRetriever, doc_id: str) -> set[str]:
    got = r._store.of_parents([doc_id], include=["metadatas"])
    return {rid for rid, m in zip(got["ids"], got["metadatas"]) if is_live(m or {})}


def _ids_of(r: HybridRetriever, text: str) -> set[str]:
    recs = document_records([Document(text=text, id="x")], r.embedder, r._writer.chunking)
    return {rec.id for rec in recs["x"]}


def _b_writes_before_a_claims(a: HybridRetriever, b: HybridRetriever, text: str) -> None:
    """On A's next write: B writes `text` as "x" after A read the document, before A
    claims its log entry."""
    begin = a._writer.log.begin

    def b_writes_first(parents):
        a._writer.log.begin = begin  # once
        b.add_documents([{"id": "x", "text": text}])
        return begin(parents)

    a._writer.log.begin = b_writes_first


class _Writing:
    """B's write of `text` as "x" in a thread (not started); `began` is set once B has
    claimed its log entry, `errors` holds what the write raised."""

    def __init__(self, b: HybridRetriever, text: str) -> None:
        self.began = threading.Event()
        self.errors: list[BaseException] = []
        begin = b._writer.log.begin

        def begin_and_tell(parents):
            entry = begin(parents)
            self.began.set()
            return entry

        def write():
            try:
                b.add_documents([{"id": "x", "text": text}])
            except BaseException as exc:  # noqa: BLE001 - reported by join
                self.errors.append(exc)

        b._writer.log.begin = begin_and_tell
        self.thread = threading.Thread(target=write)

    def join(self) -> None:
        self.thread.join(120)
        assert not self.thread.is_alive() and not self.errors, self.errors


def _whole(r: HybridRetriever, text: str) -> None:
    assert r.get(["x"])[0].text == text
    assert _live_ids(r, "x") == _ids_of(r, text)
    assert r.verify()["ok"]


def test_a_write_landing_between_anothers_read_and_write_is_not_spliced(clients):
    """B replaces the document after A read it and before A claimed its entry: A must
    read it again, or its deletes miss B's record and its chunks join it."""
    a, b = clients
    a.add_documents([{"id": "x", "text": OLD}])
    assert len(_ids_of(a, OLD)) > len(_ids_of(a, LONG)) > 1
    _b_writes_before_a_claims(a, b, SHORT)
    a.add_documents([{"id": "x", "text": LONG}])
    _whole(a, LONG)  # A's entry is the later one: its version is the document
    b.search("quokkas", k=1)
    _whole(b, LONG)


def test_records_unchanged_at_first_are_encoded_when_the_other_write_changed_them(clients):
    """A's new version keeps the old one's first chunks (not encoded: unchanged); B's
    write overtakes it and changes them. A's second diff needs their vectors: it gives up
    its entry while it encodes them, claims the batch again and writes its version whole."""
    a, b = clients
    a.add_documents([{"id": "x", "text": OLD}])
    edited = OLD + " One more closing sentence about wombats."
    _b_writes_before_a_claims(a, b, LONG)
    a.add_documents([{"id": "x", "text": edited}])
    _whole(a, edited)
    b.search("wombats", k=1)
    _whole(b, edited)


def test_a_writer_waits_for_an_earlier_write_of_the_same_document(clients):
    """A has claimed its entry and is writing when B reads the document and claims the next
    entry: B must wait for A's write to end and then read the document again."""
    a, b = clients
    a.add_documents([{"id": "x", "text": OLD}])
    b_writes = _Writing(b, SHORT)
    write = a._store.write

    def a_write_after_b_began(groups):
        a._store.write = write  # once
        b_writes.thread.start()
        assert b_writes.began.wait(60)
        time.sleep(0.5)  # B, unchecked, would write its stale diff now
        write(groups)

    a._store.write = a_write_after_b_began
    a.add_documents([{"id": "x", "text": LONG}])
    b_writes.join()
    _whole(b, SHORT)  # B's entry is the later one
    a.search("pangolins", k=1)
    _whole(a, SHORT)


def test_a_writer_that_waits_out_a_dead_writer_is_not_taken_for_dead(clients, kw, embedder,
                                                                    monkeypatch):
    """A writer waiting a whole lease for a dead writer's entry kept its own entry pending,
    unchanged, for as long: the next writer of the document took it for dead too, "repaired"
    it and wrote while it was still writing, and the later entry's version was lost (found
    by an attack). A waiter now renews its entry."""
    from retrievekit import changelog

    a, b = clients
    c = HybridRetriever(embedder=embedder, **kw)
    try:
        a.add_documents([{"id": "x", "text": OLD}])
        a._writer.log.begin(["x"])  # A claims a write of x and dies
        monkeypatch.setattr(changelog, "LEASE_S", 4.0)
        b_writes, b_upsert = _Writing(b, SHORT), b._store.write

        def slow_upsert(groups):  # well inside the lease
            time.sleep(1.5)
            b_upsert(groups)

        b._store.write = slow_upsert
        b_writes.thread.start()
        assert b_writes.began.wait(60)
        c.add_documents([{"id": "x", "text": LONG}])  # C's entry is the latest
        b_writes.join()
        _whole(c, LONG)
    finally:
        c.close()


def test_a_delete_waits_too(clients):
    """A delete that read the document's records before a concurrent replace removed only
    those, leaving the replacement's other chunks as a live fragment."""
    a, b = clients
    a.add_documents([{"id": "x", "text": SHORT}])
    _b_writes_before_a_claims(a, b, LONG)
    assert a.delete(["x"]) == len(_ids_of(a, LONG))  # what it removed, not what it read
    assert _live_ids(a, "x") == set() and a.get(["x"]) == []
    assert a.verify()["ok"]


def test_a_first_rebuild_misses_no_record_when_another_client_deletes_during_it(
        kw, embedder, corpus_docs, monkeypatch):
    """A client's first BM25 index is a scan of Chroma by pages of offsets: a delete by
    another client during the scan shifted records past a page boundary, unread, and they
    stayed out of the index until the client restarted."""
    from retrievekit.records import parent_of
    from retrievekit.store import ChromaStore

    a = HybridRetriever(embedder=embedder, **kw)
    a.add_documents(corpus_docs)
    scan = ChromaStore.iter_records
    deleted: list[str] = []

    def pages_of_three_and_a_delete(self, include=("documents", "metadatas"), page=5000,
                                    where=None):
        for batch in scan(self, include, page=3, where=where):
            yield batch
            if self is not a._store and not deleted:
                deleted.append(parent_of(batch["ids"][0]))
                a.delete(deleted)  # everything after the page moves one place or more up

    monkeypatch.setattr(ChromaStore, "iter_records", pages_of_three_and_a_delete)
    b = HybridRetriever(embedder=embedder, **kw)
    monkeypatch.setattr(ChromaStore, "iter_records", scan)
    try:
        assert deleted
        state = b.verify()
        assert state["sparse_ids"] == state["chroma_ids"] and state["ok"]
        assert b.count() == len(corpus_docs) - 1
    finally:
        a.close()
        b.close()
