"""Atomic documents under SIGKILL: the defects Engine v2 fixed, and kills at random moments.

A child process writes (updates that change a document's chunk count, deletes) and is killed;
the parent reopens the store and checks, after every kill:
- `get(id)` returns exactly one version that was written, never a splice of two;
- an acknowledged write is never lost, a deleted document never comes back;
- every search mode finds only live records, with their current text;
- BM25 holds exactly Chroma's live records, no dead record or unfinished log entry is left.
"""

from __future__ import annotations

import json
import random
import time

import pytest

from retrievekit.pipeline import HybridRetriever
from retrievekit.types import Document
from rk_children import crash_loop, mp_context, run_ops, versioned_text

pytestmark = pytest.mark.slow

CHUNKED = {"chunking": {"max_tokens": 16, "overlap_tokens": 2}}


def _child(target, *args, kill_after: float | None = None) -> int:
    ctx = mp_context()
    proc = ctx.Process(target=target, args=args)
    proc.start()
    if kill_after is not None:
        time.sleep(kill_after)
        proc.kill()
    proc.join(180)
    if proc.is_alive():
        proc.kill()
        proc.join(10)
        raise AssertionError("the child hung")
    return proc.exitcode


def _doc(i: str, version: int, chunks: int) -> dict:
    return {"text": versioned_text(i, version, chunks), "id": i, "metadata": {"v": version}}


def _check_store(r: HybridRetriever, allowed: dict[str, set[int | None]]) -> dict[str, int | None]:
    """Each document holds one allowed version (None: absent) whole; every search mode agrees
    with `get`; derived state equals Chroma. Returns the version found per document."""
    state = r.verify()
    assert state["ok"], {k: v for k, v in state.items() if k != "chroma_ids"}
    found: dict[str, int | None] = {}
    docs = {d.id: d for d in r.get(sorted(allowed))}
    for doc_id, versions in allowed.items():
        doc = docs.get(doc_id)
        if doc is None:
            found[doc_id] = None
        else:
            v = int(doc.metadata["v"])
            assert doc.text in {versioned_text(doc_id, v, c) for c in range(1, 6)}, \
                f"{doc_id}: a splice of versions: {doc.text[:200]}"
            found[doc_id] = v
        assert found[doc_id] in versions, (doc_id, found[doc_id], versions)
    for doc_id, v in found.items():
        for mode in ("sparse", "dense", "hybrid"):
            hits = r.search(f"{doc_id} version{v}" if v else doc_id, k=20, mode=mode)
            for h in hits:  # every hit is live and shows its document's current version
                assert found.get(h.id) is not None, (mode, h.id, "deleted but found")
                assert h.document.metadata["v"] == found[h.id], (mode, h.id)
                assert h.document.text in versioned_text(h.id, found[h.id], 5), (mode, h.id)
        if v is not None:
            # the version word sits in the first chunk, whole (chunks cut inside long words)
            top = r.search(f"{doc_id} version{v}", k=1, mode="sparse")
            assert top and top[0].id == doc_id
    return found


def test_delete_killed_after_chroma_never_comes_back(tmp_path, tiny_model, tiny_embedder):
    """Defect 2: killed between Chroma's delete and the BM25 update; formerly the deleted
    records stayed in BM25 for good."""
    path = str(tmp_path / "store")
    docs = [_doc(f"p{i}", 1, 1 + i % 3) for i in range(6)]
    ops = [("add", docs), ("delete", ["p1", "p4"])]
    assert _child(run_ops, path, tiny_model, ops, "after-chroma-delete", CHUNKED) == -9
    allowed = {d["id"]: {1} for d in docs}
    allowed.update(p1={None}, p4={None})
    with HybridRetriever(path=path, embedder=tiny_embedder, config=CHUNKED) as r:
        _check_store(r, allowed)
    with HybridRetriever(path=path, embedder=tiny_embedder, config=CHUNKED) as r:
        assert _check_store(r, allowed)["p1"] is None  # and it stays so


@pytest.mark.parametrize("before, after", [(4, 1), (1, 4), (3, 2)])
def test_update_changing_chunk_count_killed_before_cleanup(tmp_path, tiny_model,
                                                           tiny_embedder, before, after):
    """Defect 3: killed between the chunk upsert and the stale-chunk delete; formerly get()
    spliced old and new text and BM25 found the old text."""
    path = str(tmp_path / "store")
    ops = [("add", [_doc("a", 1, before), _doc("b", 1, 2)]),
           ("add", [_doc("a", 2, after), _doc("b", 2, 3)])]
    assert _child(run_ops, path, tiny_model, ops, "after-upsert", CHUNKED) == -9
    with HybridRetriever(path=path, embedder=tiny_embedder, config=CHUNKED) as r:
        found = _check_store(r, {"a": {2}, "b": {2}})  # one upsert call: landed whole
        assert found == {"a": 2, "b": 2}
        assert r.search("version1", k=5, mode="sparse") == []  # the old text is gone


def test_chunk_ids_cannot_collide_with_user_ids(tmp_path, tiny_embedder):
    """Defect 5: a user id equal to a chunk id overwrote a chunk of another document."""
    from retrievekit.errors import InvalidInputError

    with HybridRetriever(path=str(tmp_path / "s"), embedder=tiny_embedder, config=CHUNKED) as r:
        r.add_documents([_doc("A", 1, 3)])
        before = r.get(["A"])
        with pytest.raises(InvalidInputError, match="chunk id"):
            r.add_documents([{"text": "intruder", "id": "A#chunk1"}])
        assert r.get(["A"]) == before and r.verify()["ok"]
        r.add_documents([{"text": "fine", "id": "A#chunk1x"}, {"text": "fine", "id": "A#part1"}])


def test_ids_too_long_for_the_bm25_index_are_refused(tmp_path, tiny_embedder):
    """An id past tantivy's term limit (65,530 bytes) was indexed without its id and parent
    terms: a delete then left its record in the BM25 index, and the store refused to open
    ("Chroma's database lost records"). Ids are refused past 4 KiB, the store unchanged."""
    from retrievekit.errors import InvalidInputError
    from retrievekit.records import MAX_ID_BYTES

    with HybridRetriever(path=str(tmp_path / "s"), embedder=tiny_embedder) as r:
        r.add_documents([{"text": "kept", "id": "x"}])
        for long_id in ("a" * 65_531, "é" * (MAX_ID_BYTES // 2 + 1)):
            with pytest.raises(InvalidInputError, match="at most 4,096 bytes"):
                r.add_documents([{"text": "too long", "id": long_id}])
        r.add_documents([{"text": "fits", "id": "b" * MAX_ID_BYTES}])
        assert r.delete(["b" * MAX_ID_BYTES]) == 1
        assert r.verify()["ok"] and r.count() == 1
    with HybridRetriever(path=str(tmp_path / "s"), embedder=tiny_embedder) as r:
        assert r.verify()["ok"] and [d.id for d in r.get(["x"])] == ["x"]


@pytest.mark.parametrize("local_vectors", [False, True], ids=["default", "local_vectors"])
def test_random_kills_over_updates_and_deletes(tmp_path, tiny_model, tiny_embedder,
                                               local_vectors):
    """Many SIGKILLs at random moments of a writer that keeps updating (chunk counts 1-5)
    and deleting; after each, the invariants above hold, then the next trial goes on. With
    local_vectors the vector copy and its graph (saved with each new base) are killed too,
    and must hold exactly Chroma's live records after each reopen (`verify`)."""
    path = str(tmp_path / "store")
    journal = tmp_path / "journal.jsonl"
    rng = random.Random(1234)
    last_ack: dict[str, int | None] = {}   # version acknowledged last (None: deleted)
    trials = 8 if local_vectors else 12
    config = {**CHUNKED, "local_vectors": local_vectors}
    killed_mid_write = 0
    for trial in range(trials):
        ctx = mp_context()
        started = ctx.Event()
        proc = ctx.Process(target=crash_loop, args=(path, tiny_model, str(journal), trial,
                                                    started, local_vectors))
        proc.start()
        assert started.wait(120)
        time.sleep(rng.uniform(0.05, 2.5))
        proc.kill()
        proc.join(30)
        entries = [json.loads(line) for line in journal.read_text().splitlines()]
        journal.write_text("")
        allowed: dict[str, set[int | None]] = {f"p{i}": {last_ack.get(f"p{i}")}
                                               for i in range(12)}
        for kind, op, ids, version in entries:
            value = None if op == "delete" else version
            for i in ids:
                if kind == "ack":
                    last_ack[i] = value
                    allowed[i] = {value}
                else:  # begun: it may or may not have landed
                    allowed[i] = allowed[i] | {value}
        if entries and entries[-1][0] == "begin":
            killed_mid_write += 1
        with HybridRetriever(path=path, embedder=tiny_embedder, config=config) as r:
            found = _check_store(r, allowed)
            if local_vectors:
                state = r.verify()
                assert state["graph_ids"] == state["chroma_ids"]
        for i, v in found.items():  # what the store now holds is the baseline of the next
            last_ack[i] = v
    print(f"{trials} kills, {killed_mid_write} with a write under way")
    assert killed_mid_write >= trials // 3  # the kills did land inside writes


def test_collection_made_anew_under_the_same_name_is_not_caught_up_from(tmp_path, embedder):
    """Derived state belongs to one change log: after the collection is deleted and made
    again, the old BM25 index (watermark 2) must not survive against the new log."""
    path = str(tmp_path / "s")
    with HybridRetriever(path=path, embedder=embedder) as r:
        r.add_documents([{"text": "old apples", "id": "a"}])
        r.add_documents([{"text": "old pears", "id": "b"}])
        client = r.store.client
        client.delete_collection("retrievekit")
        client.delete_collection("retrievekit-rklog")
    with HybridRetriever(path=path, embedder=embedder) as r:
        assert r.count() == 0 and r.search("apples", k=3, mode="sparse") == []
        r.add_documents([{"text": "new plums", "id": "c"}])
        assert r.verify()["ok"] and r.verify()["sparse_ids"] == {"c"}


def test_index_behind_the_trimmed_log_is_rebuilt(tmp_path, embedder, monkeypatch):
    """The log keeps the newest entries only; a BM25 index whose watermark fell below the
    trimmed floor (here: an old copy of it put back) is rebuilt from a scan, not caught up
    from a log that no longer holds what it missed."""
    import shutil

    from retrievekit import changelog

    monkeypatch.setattr(changelog, "KEEP", 2)
    path = tmp_path / "s"
    sparse = path / "retrievekit" / "retrievekit" / "sparse"
    with HybridRetriever(path=str(path), embedder=embedder) as r:
        r.add_documents([{"text": "apple orchard", "id": "d0"}])
        shutil.copytree(sparse, tmp_path / "old-sparse")  # watermark 1
        for i in range(1, 10):
            r.add_documents([{"text": f"pear number{i}", "id": f"d{i}"}])
        r.delete(["d0"])
        log = r.store.client.get_collection("retrievekit-rklog")
        assert log.count() <= 5 and (log.metadata or {}).get("rk_floor", 0) > 1
    shutil.rmtree(sparse)
    shutil.copytree(tmp_path / "old-sparse", sparse)
    with HybridRetriever(path=str(path), embedder=embedder) as r:
        assert r.verify()["ok"] and r.count() == 9
        assert r.search("apple orchard", k=3, mode="sparse") == []
        assert [h.id for h in r.search("number7", k=1, mode="sparse")] == ["d7"]


def test_format_1_store_is_upgraded_on_open(tmp_path, embedder, caplog):
    """A store of retrievekit 0.1 (same records; settings with format 1 and bm25s
    parameters, a change marker, no change log, derived files of the old layout) opens: its
    settings are rewritten and BM25 is rebuilt once. Checked by hand against a store made
    by 0.1 itself (commit 509015d)."""
    import json
    import logging
    import shutil

    path = tmp_path / "s"
    with HybridRetriever(path=str(path), embedder=embedder, config=CHUNKED) as r:
        r.add_documents([_doc("a", 1, 3), _doc("b", 1, 1)])
        col = r.store.collection
        settings = json.loads(col.metadata["rk_settings"])
        settings.update(format=1, sparse={"format": 1, "engine": "bm25s", "k1": 1.5,
                                          "b": 0.75, "method": "lucene",
                                          "tokenizer": settings["sparse"]["tokenizer"]})
        del settings["written_with"]
        col.modify(metadata={"rk_settings": json.dumps(settings), "rk_marker": "abc"})
        r.store.client.delete_collection("retrievekit-rklog")
    shutil.rmtree(path / "retrievekit")
    (path / "retrievekit" / "retrievekit" / "sparse").mkdir(parents=True)
    (path / "retrievekit" / "retrievekit" / "sparse" / "current.json").write_text("{}")
    caplog.set_level(logging.WARNING)
    with HybridRetriever.open(str(path)) as r:
        assert "upgraded from format 1" in caplog.text
        assert r.store.read_settings()["format"] == 2
        assert _check_store(r, {"a": {1}, "b": {1}}) == {"a": 1, "b": 1}
    caplog.clear()
    with HybridRetriever.open(str(path)) as r:
        assert "upgraded" not in caplog.text and r.verify()["ok"]


def test_a_new_bm25_file_format_rebuilds_the_index_not_refuses_the_store(tmp_path, embedder,
                                                                        monkeypatch, caplog):
    """The BM25 index is derived: a retrievekit with a newer index format rebuilds it from
    Chroma on open; the store's recorded settings do not name the index format."""
    import logging

    from retrievekit import sparse

    path = str(tmp_path / "s")
    with HybridRetriever(path=path, embedder=embedder) as r:
        r.add_documents([{"text": "plums and pears", "id": "a"}])
        assert "format" not in r.store.read_settings()["sparse"]
    monkeypatch.setattr(sparse, "FORMAT_VERSION", sparse.FORMAT_VERSION + 1)
    caplog.set_level(logging.INFO)
    with HybridRetriever(path=path, embedder=embedder) as r:
        assert "rebuilt" in caplog.text and r.verify()["ok"]
        assert [h.id for h in r.search("plums", k=1, mode="sparse")] == ["a"]


def test_a_failed_write_is_repaired_at_once(tmp_path, tiny_embedder, monkeypatch):
    """Chroma fails the cleanup delete of an update (the records are in, the dead ones not
    yet gone): the error reaches the caller, and the store and BM25 agree right away, with
    the document whole in its new version; no reopen needed."""
    from chromadb.api.models.Collection import Collection

    with HybridRetriever(path=str(tmp_path / "s"), embedder=tiny_embedder, config=CHUNKED) as r:
        r.add_documents([_doc("a", 1, 4)])
        original = Collection.delete

        def failing(self, *args, **kwargs):
            if not self.name.endswith("-rklog"):
                monkeypatch.setattr(Collection, "delete", original)  # once
                raise RuntimeError("disk full")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Collection, "delete", failing)
        with pytest.raises(RuntimeError, match="disk full"):
            r.add_documents([_doc("a", 2, 1)])
        assert _check_store(r, {"a": {2}}) == {"a": 2}
        assert r.search("version1", k=5, mode="sparse") == []


def test_an_edit_that_moves_later_chunks_rewrites_their_places(tmp_path, tiny_embedder):
    """A later chunk whose text is unchanged but whose place in the document moved (a
    longer first word) was skipped as unchanged and kept its old span: `get` put the
    document back together garbled ('word6 wordd8'), for good."""
    cfg = {"store": {"path": str(tmp_path / "s")},
           "chunking": {"max_tokens": 16, "overlap_tokens": 2}}
    tail = " ".join(f"word{i}" for i in range(60))
    with HybridRetriever(cfg, embedder=tiny_embedder) as r:
        r.add_documents([{"text": "cat " + tail, "id": "d"}])
        assert r.count() > 3  # chunked
        r.add_documents([{"text": "elephant " + tail, "id": "d"}])  # one token either way
        assert r.get(["d"])[0].text == "elephant " + tail
    with HybridRetriever(cfg, embedder=tiny_embedder) as r:
        assert r.get(["d"])[0].text == "elephant " + tail and r.verify()["ok"]


def test_a_document_read_back_and_added_again_is_unchanged(tmp_path, tiny_embedder):
    """Metadata is kept as Chroma holds it (a numpy float as a float, -0.0 as 0.0): the
    hash of what `get` returned once differed from the stored one, so adding it again
    encoded and wrote it again."""
    import numpy as np

    with HybridRetriever(path=str(tmp_path / "s"), embedder=tiny_embedder) as r:
        r.add_documents([{"text": "a river stone", "id": "a",
                          "metadata": {"x": np.float64(1.5), "z": -0.0, "l": [-0.0, 2.5]}}])
        back = r.get(["a"])
        assert back[0].metadata == {"x": 1.5, "z": 0.0, "l": [0.0, 2.5]}
        r.add_documents(back)
        assert r.last_add_stats["written"] == 0 and r.last_add_stats["unchanged"] == 1


def test_a_document_of_more_chunks_than_one_chroma_batch_is_refused(tmp_path, tiny_embedder,
                                                                    monkeypatch):
    """A document is written whole in one Chroma batch: one of more chunks failed inside
    Chroma with a StoreError that said to restore the store from a backup. It is refused
    by name; documents before it in the same batch are not written either."""
    from retrievekit.errors import InvalidInputError
    from retrievekit.store import ChromaStore

    monkeypatch.setattr(ChromaStore, "max_batch", property(lambda self: 6))
    cfg = {"store": {"path": str(tmp_path / "s")},
           "chunking": {"max_tokens": 16, "overlap_tokens": 2}}
    long = " ".join(f"word{i}" for i in range(80))
    with HybridRetriever(cfg, embedder=tiny_embedder) as r:
        r.add_documents([{"text": "kept", "id": "k"}])
        with pytest.raises(InvalidInputError, match=r"documents\[0\] \('long'\) makes \d+ "
                                                    r"chunks, more than Chroma writes"):
            r.add_documents([{"text": long, "id": "long"}])
        assert r.count() == 1 and r.verify()["ok"]
        with pytest.raises(InvalidInputError, match=r"documents\[1\] \('long'\)"):
            r.add_documents([{"text": "first", "id": "f"}, {"text": long, "id": "long"}])
        assert r.document_ids() == ["k"] and r.verify()["ok"]


def test_a_document_of_one_chroma_batch_less_one_can_be_replaced_both_ways(
        tmp_path, tiny_embedder, monkeypatch):
    """A document is written with the stale records of its old version in the same batch: a
    document of exactly one Chroma batch of chunks was accepted, and replacing a short
    version by it (its chunks plus the old record, one more than a batch) then failed inside
    Chroma. The longest document is one batch less one record."""
    from retrievekit.errors import InvalidInputError
    from retrievekit.store import ChromaStore
    from retrievekit.writer import document_records

    monkeypatch.setattr(ChromaStore, "max_batch", property(lambda self: 6))
    upsert = ChromaStore._upsert

    def at_most_one_batch(self, groups):  # what Chroma's own limit refuses (at 5,461)
        assert sum(len(g[0]) for g in groups) <= self.max_batch
        upsert(self, groups)

    monkeypatch.setattr(ChromaStore, "_upsert", at_most_one_batch)
    cfg = {"store": {"path": str(tmp_path / "s")},
           "chunking": {"max_tokens": 16, "overlap_tokens": 2}}
    with HybridRetriever(cfg, embedder=tiny_embedder) as r:
        def text_of(chunks: int) -> str:
            for n in range(1, 200):
                text = " ".join(f"word{i}" for i in range(n))
                got = document_records([Document(text=text, id="x")], r.embedder,
                                       r._writer.chunking)["x"]
                if len(got) == chunks:
                    return text
            raise AssertionError(chunks)

        short, five, six = "a short version", text_of(5), text_of(6)
        for text in (short, five, short, five, short):
            r.add_documents([{"text": text, "id": "x"}])
            assert r.get(["x"])[0].text == text and r.verify()["ok"]
        with pytest.raises(InvalidInputError, match=r"makes 6 chunks, more than Chroma "
                                                    r"writes in one batch \(5 and"):
            r.add_documents([{"text": six, "id": "x"}])  # over the short one: 6 + 1
        assert r.get(["x"])[0].text == short and r.verify()["ok"]
