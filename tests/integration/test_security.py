"""Security: nothing a store writes is a pickle, opening a store runs no code from its files,
and the Chroma clients we create have anonymized telemetry off."""

from __future__ import annotations

import json
import pickle
import pickletools
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from retrievekit.pipeline import HybridRetriever
from retrievekit.types import Document


def _is_pickle(data: bytes) -> bool:
    """True when `data` parses as one complete pickle stream."""
    if not data or data[:1] != b"\x80":  # every protocol-2+ pickle starts with PROTO
        return False
    try:
        ops = list(pickletools.genops(data))
    except Exception:
        return False
    return bool(ops) and ops[-1][0].name == "STOP" and ops[-1][2] == len(data) - 1


def _sqlite_blobs(path: Path):
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in con.execute(f'SELECT * FROM "{table}"'):
                for value in row:
                    if isinstance(value, (bytes, str)):
                        yield table, value.encode() if isinstance(value, str) else value
    finally:
        con.close()


@pytest.fixture
def written_store(tmp_path, embedder, corpus_docs):
    """A store that went through the write paths: add (with a chunked document), update,
    delete, the funnel's full vectors, the embedding cache; then closed."""
    path = tmp_path / "store"
    cfg = {"funnel_dim": 128, "cache_dir": str(tmp_path / "cache")}
    with HybridRetriever(cfg, path=str(path), embedder=embedder) as r:
        r.add_documents(corpus_docs + [Document("word " * 400, id="long")])
        r.add_documents([Document("Green tea, updated.", id="tea")])
        r.delete(["cats"])
    return tmp_path


def test_no_file_a_store_writes_is_a_pickle(written_store):
    assert _is_pickle(pickle.dumps({"a": [1]})) and _is_pickle(pickle.dumps(_Evil(Path("x"))))
    files = [f for f in written_store.rglob("*") if f.is_file()]
    assert any(f.suffix == ".npy" for f in files) and any(f.suffix == ".json" for f in files)
    checked = {"npy": 0, "json": 0, "blobs": 0}
    for f in files:
        assert f.suffix not in (".pkl", ".pickle"), f
        data = f.read_bytes()
        assert not _is_pickle(data), f
        if f.suffix == ".npy":
            with open(f, "rb") as fh:
                major, _ = np.lib.format.read_magic(fh)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else \
                    np.lib.format.read_array_header_2_0
                _, _, dtype = read_header(fh)
            assert not dtype.hasobject, f
            np.load(f, allow_pickle=False)
            checked["npy"] += 1
        elif f.suffix == ".json":
            json.loads(data)
            checked["json"] += 1
        elif data[:16] == b"SQLite format 3\x00":
            for table, blob in _sqlite_blobs(f):
                assert not _is_pickle(blob), (f, table)
                checked["blobs"] += 1
    assert checked["npy"] >= 1 and checked["json"] >= 3 and checked["blobs"] > 0


class _Evil:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_opening_a_store_runs_no_code_from_its_files(written_store, embedder, caplog):
    marker = written_store / "code-ran"
    evil = np.empty(1, dtype=object)
    evil[0] = _Evil(marker)
    root = written_store / "store" / "retrievekit" / "retrievekit"
    planted = 0
    folder = root / "funnel" / json.loads((root / "funnel" / "manifest.json").read_text())["base"]
    for npy in folder.glob("*.npy"):
        np.save(npy, evil, allow_pickle=True)  # a pickle inside a .npy
        planted += 1
    (folder / "ids.json").write_bytes(pickle.dumps(_Evil(marker)))
    for name in ("meta.json", "state.json"):  # tantivy's own and ours
        (root / "sparse" / name).write_bytes(pickle.dumps(_Evil(marker)))
        planted += 1
    assert planted >= 3
    with HybridRetriever({"funnel_dim": 128, "cache_dir": str(written_store / "cache")},
                         path=str(written_store / "store"),
                         embedder=embedder) as r:
        assert not marker.exists()
        # the planted files were refused and the derived state rebuilt from Chroma
        ids = set(r.store.get(include=[])["ids"])
        assert r.verify()['sparse_ids'] == ids and len(r.verify()['funnel_ids']) == len(ids)
        assert r.search("flux capacitor", k=1)[0].id == "xq7"
    assert not marker.exists()
    assert "unreadable" in caplog.text


@pytest.mark.parametrize("kind", ["embedded", "memory",
                                  pytest.param("server", marks=pytest.mark.server)])
def test_chroma_telemetry_is_off(kind, tmp_path, embedder, monkeypatch, request):
    monkeypatch.setenv("ANONYMIZED_TELEMETRY", "True")  # our setting wins over the env
    if kind == "embedded":
        where = {"path": str(tmp_path / "store")}
    elif kind == "memory":
        where = {"path": ":memory:", "collection": "telemetry-test"}
    else:
        server = request.getfixturevalue("chroma_server")
        where = {"host": server.host, "port": server.port, "collection": "telemetry-test"}
    with HybridRetriever(embedder=embedder, **where) as r:
        assert r.store.client.get_settings().anonymized_telemetry is False
