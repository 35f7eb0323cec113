"""Every file of the derived vector copy (funnel / local_vectors) damaged every way: on open
it is rebuilt from Chroma, with the same search results; never a wrong answer. Damage that
keeps a file well formed (negated vectors, ids in another order) was served as it was, for
good, until each folder held its files' checksums (found by an attack)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from retrievekit.pipeline import HybridRetriever

DOCS = [{"text": f"record {i} " + ("river stone" if i % 2 else "cloud engine"), "id": f"d{i}",
         "metadata": {"bucket": i % 40}} for i in range(200)]


def _folder(root):
    """The base or delta folder holding the most vectors (the records may sit in a delta)."""
    m = json.loads((root / "manifest.json").read_text())
    return max([root / f for f in [m["base"], *m["deltas"]]],
               key=lambda f: len(json.loads((f / "ids.json").read_text())))


def _damage(root, name, how):
    path = root / "manifest.json" if name == "manifest" else _folder(root) / name
    if how == "deleted":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b"\x93NUMPY garbage {" * 7)
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif how == "wrong dtype":
        np.save(path, np.load(path).astype(np.float64))
    elif how == "wrong shape":
        np.save(path, np.load(path)[:, :10])
    elif how == "NaN":
        a = np.load(path)
        a[:, 5] = np.nan  # every row: the searched subset meets it
        np.save(path, a)
    elif how == "negated":  # same size, shape, dtype, finite: served as they were
        np.save(path, -np.load(path))
    elif how == "reversed":  # same size, all strings: rows under the wrong ids
        path.write_text(json.dumps(json.loads(path.read_text())[::-1]))
    elif how == "ints as ids":
        path.write_text(json.dumps(list(range(len(json.loads(path.read_text()))))))
    elif how == "count off":
        m = json.loads(path.read_text())
        m["count"] += 1
        path.write_text(json.dumps(m))
    elif how.startswith("watermark "):  # well-formed JSON, the watermark not a number
        m = json.loads(path.read_text())
        m["watermark"] = json.loads(how.split(" ", 1)[1])
        path.write_text(json.dumps(m))


CASES = [("vectors.npy", h) for h in ("deleted", "empty", "garbage", "truncated",
                                       "wrong dtype", "wrong shape", "NaN", "negated")] + \
        [("ids.json", h) for h in ("deleted", "empty", "garbage", "truncated", "ints as ids",
                                   "reversed")] + \
        [("manifest", h) for h in ("deleted", "empty", "garbage", "count off",
                                   "watermark null", 'watermark "abc"', "watermark [3]")]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_embedder):
    path = tmp_path_factory.mktemp("vectors") / "s"
    cfg = {"store": {"path": str(path)}, "local_vectors": True}
    with HybridRetriever(cfg, embedder=tiny_embedder) as r:
        r.add_documents(DOCS)
        q = tiny_embedder.embed_query("river stone")
        expected = [(h.id, round(h.score, 5)) for h in
                    r.search("x", 5, mode="dense", where={"bucket": 3}, query_vector=q)]
    return path, cfg, q, expected


@pytest.mark.parametrize("name,how", CASES, ids=[f"{n}-{h}" for n, h in CASES])
def test_damaged_vector_copy_is_rebuilt(built, tmp_path, tiny_embedder, name, how):
    src, cfg, q, expected = built
    path = tmp_path / "s"
    shutil.copytree(src, path)
    root = next(path.glob("retrievekit/*/funnel"))
    _damage(root, name, how)
    with HybridRetriever({**cfg, "store": {"path": str(path)}}, embedder=tiny_embedder) as r:
        report = r.verify()
        assert report["ok"] and report["funnel_ids"] == report["chroma_ids"]
        got = [(h.id, round(h.score, 5)) for h in
               r.search("x", 5, mode="dense", where={"bucket": 3}, query_vector=q)]
        assert got == expected  # the exact scan runs on the rebuilt copy
