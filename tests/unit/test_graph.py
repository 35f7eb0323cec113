"""The in-process HNSW graph (graph.py): exact on small sets, follows upserts and removals,
survives a save, refuses a saved graph that does not hold its snapshot's records, and still
finds records whose 64-bit keys collide."""

from __future__ import annotations

import numpy as np
import pytest

from retrievekit import graph as G
from retrievekit.graph import GraphSettings, VectorGraph

SETTINGS = GraphSettings(m=16, ef_construction=200, ef_search=400)


def _unit(rng, n, dim=16):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _exact(ids, matrix, q, n):
    return {ids[i] for i in np.argsort(-(matrix @ q))[:n]}


def test_finds_the_exact_neighbours_and_follows_changes():
    rng = np.random.default_rng(0)
    ids = [f"r{i}" for i in range(300)]
    x = _unit(rng, 300)
    g = VectorGraph(16, SETTINGS)
    g.upsert(ids, x)
    assert len(g) == 300
    for q in _unit(rng, 20):  # ef above the count: the exact 10 are among the candidates
        assert set(g.nearest(q, 10)) >= _exact(ids, x, q, 10)
    # a new vector for r0 and r1 removed: r0 is found at its new place, r1 never
    g.upsert(["r0"], x[[7]] * -1)
    g.remove(["r1", "missing"])
    assert len(g) == 299
    assert g.nearest(-x[7], 1)[0] == "r0"
    assert "r1" not in g.nearest(x[1], 299)
    g.upsert(["r1"], x[[1]])  # a removed id can come back
    assert g.nearest(x[1], 1)[0] == "r1"


def test_saved_graph_round_trips_and_refuses_a_mismatch(tmp_path):
    rng = np.random.default_rng(1)
    ids = [f"r{i}" for i in range(200)]
    x = _unit(rng, 200)
    g = VectorGraph(16, SETTINGS)
    g.upsert(ids, x)
    path = tmp_path / "graph.usearch"
    g.save(path)
    back = VectorGraph.load(path, 16, SETTINGS, ids)
    q = _unit(rng, 1)[0]
    assert back.nearest(q, 10) == g.nearest(q, 10)
    with pytest.raises(ValueError, match="holds 200 vectors, not the 199"):
        VectorGraph.load(path, 16, SETTINGS, ids[:-1])
    with pytest.raises(ValueError):  # another id set of the same size
        VectorGraph.load(path, 16, SETTINGS, ids[:-1] + ["other"])
    with pytest.raises(ValueError, match="other settings"):
        VectorGraph.load(path, 16, GraphSettings(32, 200, 400), ids)
    with pytest.raises(OSError):
        VectorGraph.load(tmp_path / "missing", 16, SETTINGS, ids)
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], b"", b"garbage" * 9, data[:64]):
        path.write_bytes(damaged)
        with pytest.raises(ValueError):
            VectorGraph.load(path, 16, SETTINGS, ids)


def test_records_whose_keys_collide_are_still_found(monkeypatch, tmp_path):
    monkeypatch.setattr(G, "key_of", lambda rid: int(rid[1:]) // 2)  # r0/r1, r2/r3 collide
    rng = np.random.default_rng(2)
    ids = [f"r{i}" for i in range(40)]
    x = _unit(rng, 40)
    g = VectorGraph(16, SETTINGS)
    g.upsert(ids, x)
    assert len(g) == 40
    for i in (1, 3, 39):
        assert f"r{i}" in g.nearest(x[i], 1)  # offered beside the graph's answer
    g.remove(["r1"])
    assert "r1" not in g.nearest(x[1], 40) and len(g) == 39
    g.save(tmp_path / "g")
    back = VectorGraph.load(tmp_path / "g", 16, SETTINGS, [i for i in ids if i != "r1"])
    assert len(back) == 39 and "r3" in back.nearest(x[3], 1)
