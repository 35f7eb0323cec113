"""The change log (changelog.py) read past what one Chroma `get` can return."""

from __future__ import annotations

import json
import time
import uuid

import chromadb
from chromadb.config import Settings

from retrievekit import changelog as CL


def _filled(n: int, state: str = "done") -> tuple[chromadb.api.ClientAPI, str]:
    """A log of entries 1..n written in bulk, in the format `begin` / `finish` write."""
    client = chromadb.EphemeralClient(settings=Settings(anonymized_telemetry=False))
    name = f"c-{uuid.uuid4().hex[:8]}"
    log = CL.ChangeLog(client, name)
    now = time.time()
    for start in range(1, n + 1, 5000):
        seqs = range(start, min(n + 1, start + 5000))
        log._col.add(ids=[f"{q:020d}" for q in seqs], embeddings=[[1.0]] * len(seqs),
                     documents=[json.dumps([f"d{q}"]) for q in seqs],
                     metadatas=[{"seq": q, "state": state, "writer": "w", "ts": now}
                                for q in seqs])
    return client, name


def test_more_entries_than_one_get_returns_are_all_read():
    """Past 32,766 entries one `get` of them fails in Chroma 1.5.9 ("too many SQL
    variables"): every open (which asks for the log's head) then failed, before the log
    was long enough to be trimmed (40,000)."""
    client, name = _filled(33_000)
    log = CL.ChangeLog(client, name)
    assert log.head() == 33_000
    entries = log.since(100)
    assert [e.seq for e in entries] == list(range(101, 33_001))
    assert entries[-1].parents == ("d33000",)


def test_paged_reads_keep_order_across_gaps(monkeypatch):
    monkeypatch.setattr(CL, "READ_PAGE", 7)
    client, name = _filled(40)
    log = CL.ChangeLog(client, name)
    log._col.delete(ids=[f"{q:020d}" for q in range(10, 30)])  # a gap wider than a page
    assert [e.seq for e in log.since(0)] == list(range(1, 10)) + list(range(30, 41))
    assert [e.seq for e in log.since(35)] == list(range(36, 41))
    assert log.since(40) == []


def test_the_records_of_documents_with_many_chunks_are_all_read():
    """`of_parents` (the writer's read before every write and delete, and a reader's
    catch-up) asked for 1,000 documents at once with their metadata: 1,000 documents of 40
    chunks are past the 32,766 records one such `get` can return, so writing, deleting or
    catching up on them failed, for good."""
    from retrievekit.store import ChromaStore, StoreConfig

    store = ChromaStore(StoreConfig(path=":memory:", collection=f"c-{uuid.uuid4().hex[:8]}"))
    n = 34_000
    for start in range(0, n, 5000):
        rows = range(start, min(n, start + 5000))
        store.collection.add(ids=[f"p{i % 850}#chunk{i // 850}" for i in rows], embeddings=[[1.0, 0.0]] * len(rows),
                             metadatas=[{"_rk_parent": f"p{i % 850}"} for i in rows])
    got = store.of_parents([f"p{i}" for i in range(850)], include=["metadatas"])
    assert sorted(got["ids"]) == sorted(f"p{i % 850}#chunk{i // 850}" for i in range(n))
    assert {m["_rk_parent"] for m in got["metadatas"]} == {f"p{i}" for i in range(850)}
    assert len(store.of_parents(["p1", "p2"], include=[])["ids"]) == 80
    store.close()


def test_a_pending_entry_is_abandoned_after_the_lease_by_the_readers_own_clock(monkeypatch):
    """The lease was measured against the writer's timestamp: a reader whose clock runs
    ahead of the writer's (another machine) took a live write as abandoned at once, and
    moved its watermark past it. Now it counts how long it has itself seen it pending."""
    client, name = _filled(3)
    log = CL.ChangeLog(client, name)
    skewed = time.time() - 3600  # the writer's clock, an hour behind the reader's
    log._col.update(ids=[f"{3:020d}"], metadatas=[{"state": "pending", "ts": skewed}])
    monkeypatch.setattr(CL, "LEASE_S", 0.3)
    first = log.since(0)
    assert not first[-1].abandoned and CL.advance(0, first) == 2
    time.sleep(0.4)
    later = log.since(0)
    assert later[-1].abandoned and CL.advance(0, later) == 3
    # done entries are forgotten
    log._col.update(ids=[f"{3:020d}"], metadatas=[{"state": "done"}])
    assert log.since(2)[0].state == "done" and not log._first_seen


def test_a_trim_cut_short_never_leaves_a_gap_a_lagging_reader_cannot_see(monkeypatch):
    """A trim deletes old entries and raises the floor: a writer killed between the two
    left the entries gone and the floor not raised, so a reader behind the cut caught up
    past the lost entries and stayed stale for good. Whichever write it dies at now, a
    reader at watermark 1 either reads every entry after it or sees the floor past it."""
    from chromadb.api.models.Collection import Collection

    class Killed(Exception):
        pass

    for dies_at in (1, 2):
        client, name = _filled(10)
        log = CL.ChangeLog(client, name)
        log._head = 10
        writes = []
        for method in ("delete", "modify"):
            real = getattr(Collection, method)

            def write(self, *a, _real=real, **k):
                if self.name == CL.log_name(name):
                    writes.append(1)
                    if len(writes) == dies_at:
                        raise Killed
                return _real(self, *a, **k)

            monkeypatch.setattr(Collection, method, write)
        try:
            log.trim(keep=2)
        except Killed:
            pass
        monkeypatch.undo()
        reader = CL.ChangeLog(client, name)
        entries = reader.since(1)
        assert [e.seq for e in entries][:1] == [2] or reader.floor() > 1, dies_at
