"""Chroma's vector index, damaged by a crash or lost, is rebuilt at open (hnsw_repair.py).

Chroma rewrites `index_metadata.pickle` in place each time it persists a graph; a process
killed inside that write left a store that no longer opened (seen in CI: a random kill of
test_crash_random.py landed there). Each test damages a closed store the way a crash or an
accident does, opens it, and checks that nothing was lost:
- every record's vector is back: a dense query for each text finds that record first;
- the texts, metadata, BM25 index and counts are as before, and `verify()` is clean;
- the repair is logged, leaves no marker, and the next open does not repeat it.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retrievekit.hnsw_repair import MARKER
from retrievekit.pipeline import HybridRetriever
from rk_children import make_docs, mp_context

pytestmark = pytest.mark.slow

N = 1500  # past Chroma's sync threshold (1,000): it has persisted the graph to disk


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_embedder):
    path = tmp_path_factory.mktemp("repair") / "store"
    with HybridRetriever(path=str(path), embedder=tiny_embedder) as r:
        r.add_documents(make_docs(N), progress=False)
        r.delete(["d00007"])
    return path


@pytest.fixture
def store(built, tmp_path):
    """Each test damages a copy of its own."""
    return Path(shutil.copytree(built, tmp_path / "store"))


def _folder(path: Path, collection: str = "retrievekit") -> Path:
    """The folder of a collection's persisted HNSW graph (Chroma's `segments` table)."""
    import sqlite3

    db = sqlite3.connect(path / "chroma.sqlite3")
    (seg,), = db.execute("SELECT s.id FROM segments s JOIN collections c ON s.collection = "
                         "c.id WHERE c.name = ? AND s.scope = 'VECTOR'", (collection,))
    db.close()
    assert (path / seg / "header.bin").exists()
    return path / seg


def _truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep)])


def _check_whole(path: Path, embedder) -> None:
    docs = {d.id: d for d in make_docs(N)}
    del docs["d00007"]
    with HybridRetriever(path=str(path), embedder=embedder) as r:
        assert r.count() == N - 1 and r.verify()["ok"]
        got = {d.id: d for d in r.get(sorted(docs))}
        assert got.keys() == docs.keys()
        assert all(got[i].text == d.text and got[i].metadata == d.metadata
                   for i, d in docs.items())
        vectors = r.embedder.embed_documents([d.text for d in docs.values()], progress=False)
        for doc_id, vec in zip(docs, vectors):  # every vector is back, and is the right one
            assert r.store.query(vec, 1)[0][0] == doc_id
        assert r.search("uniq42v0", k=1, mode="sparse")[0].id == "d00042"
    assert not (path / "retrievekit" / "retrievekit" / MARKER).exists()


def test_truncated_id_map_is_rebuilt(store, tiny_embedder, caplog):
    """The CI failure: the pickle cut short by a kill; every read of Chroma failed."""
    folder = _folder(store)
    _truncate(folder / "index_metadata.pickle")
    _check_whole(store, tiny_embedder)
    assert "is damaged" in caplog.text and "Error deserializing pickle" in caplog.text
    assert f"rebuilt the vector index of collection 'retrievekit': {N - 1} records" \
        in caplog.text
    caplog.clear()
    _check_whole(store, tiny_embedder)
    assert "damaged" not in caplog.text  # once repaired, it stays so


def test_lost_vector_folder_is_rebuilt(store, tiny_embedder, caplog):
    """Formerly a StoreError ('restore from a backup'): the texts were there all along."""
    shutil.rmtree(_folder(store))
    _check_whole(store, tiny_embedder)
    assert "does not find it" in caplog.text or "Error finding id" in caplog.text


def test_truncated_hnsw_header_does_not_crash_the_process(store, tiny_model, tiny_embedder):
    """Chroma reads a short header.bin past its end and dies of SIGSEGV; the sizes are
    checked before Chroma reads them. The open runs in a child: a crash must not take the
    test run with it."""
    folder = _folder(store)
    _truncate(folder / "header.bin")
    code = ("import sys; from retrievekit.pipeline import HybridRetriever\n"
            "from retrievekit.embedding import Embedder\n"
            "with HybridRetriever(path=sys.argv[1], embedder=Embedder(model=sys.argv[2])) as r:"
            "\n    print(r.count())\n")
    res = subprocess.run([sys.executable, "-c", code, str(store), tiny_model],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == str(N - 1) and "header.bin holds 50 bytes" in res.stderr
    _check_whole(store, tiny_embedder)


def test_short_graph_data_is_rebuilt_not_served(store, tiny_embedder, caplog):
    """A cut data_level0.bin: Chroma would serve a graph of garbage vectors, silently."""
    folder = _folder(store)
    _truncate(folder / "data_level0.bin", 0.3)
    _check_whole(store, tiny_embedder)
    assert "data_level0.bin holds" in caplog.text


def test_damaged_change_log_index_is_rebuilt(tmp_path, tiny_embedder, caplog):
    """The change log is a Chroma collection too (two writes per entry): past 500 writes its
    graph is persisted, and a cut pickle there stopped the store from opening just the same."""
    path = tmp_path / "store"
    docs = make_docs(520)
    with HybridRetriever(path=str(path), embedder=tiny_embedder) as r:
        for d in docs:
            r.add_documents([d], progress=False)
    folder = _folder(path, "retrievekit-rklog")
    assert (folder / "index_metadata.pickle").exists()
    _truncate(folder / "index_metadata.pickle")
    with HybridRetriever(path=str(path), embedder=tiny_embedder) as r:
        assert r.count() == 520 and r.verify()["ok"]
        r.add_documents(make_docs(1, start=600), progress=False)  # the log takes entries
        assert r.search("uniq600v0", k=1, mode="sparse")[0].id == "d00600"
    assert "collection 'retrievekit-rklog' is damaged" in caplog.text


def _repair_child(path: str, model: str, started) -> None:
    import retrievekit.hnsw_repair as hnsw_repair
    from retrievekit.embedding import Embedder

    hnsw_repair.STEP = 50  # many progress notes: a kill lands between them or inside one
    note = hnsw_repair.write_json

    def noting(*args):  # tell the parent once the repair is under way
        note(*args)
        started.set()

    hnsw_repair.write_json = noting
    HybridRetriever(path=path, embedder=Embedder(model=model)).close()
    started.set()  # nothing (left) to repair


def test_repair_killed_at_random_moments_resumes(store, tiny_model, tiny_embedder):
    """SIGKILL the process doing the repair at a random moment after it began, several
    times; the next open finishes it."""
    folder = _folder(store)
    _truncate(folder / "index_metadata.pickle")
    marker = store / "retrievekit" / "retrievekit" / MARKER
    rng = random.Random(7)
    ctx = mp_context()
    killed_during = 0
    for _ in range(4):
        started = ctx.Event()
        proc = ctx.Process(target=_repair_child, args=(str(store), tiny_model, started))
        proc.start()
        assert started.wait(120)
        time.sleep(rng.uniform(0.0, 0.8))
        proc.kill()
        proc.join(30)
        killed_during += marker.exists()
    print(f"4 kills, {killed_during} during the repair")
    assert killed_during >= 2  # the kills did land inside the repair
    _check_whole(store, tiny_embedder)


def test_only_damage_to_the_graph_starts_a_repair():
    """A read that fails for another reason (a locked database, a full disk) fails the open
    as before: a repair would re-encode the whole collection for nothing."""
    from retrievekit.store import damaged_vectors

    seen = ["Error executing plan: Error sending backfill request to compactor: Error "
            "constructing hnsw segment reader: Error creating hnsw segment reader: Error "
            "deserializing pickle file: eval error at offset 24063: EOF while parsing",
            "Error executing plan: Internal error: Error finding id"]
    assert all(damaged_vectors(Exception(m)) for m in seen)
    assert not any(damaged_vectors(Exception(m)) for m in (
        "database is locked", "No space left on device", "Collection [x] does not exist"))
