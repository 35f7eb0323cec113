"""Matryoshka funnel: short vectors in Chroma to find, full vectors to rank."""

from __future__ import annotations

import numpy as np
import pytest

from retrievekit.errors import ConfigError
from retrievekit.funnel import FunnelVectors, short_vectors
from retrievekit.pipeline import HybridRetriever

QUERIES = ["loyal companions", "programming language memory", "fermented starter",
           "caffeine in drinks", "a sleeping cat"]


@pytest.fixture
def funnel(tmp_path, embedder, corpus_docs):
    r = HybridRetriever({"store": {"path": str(tmp_path / "f")}, "funnel_dim": 64,
                         "funnel_candidates": 1000}, embedder=embedder)
    r.add_documents(corpus_docs)
    yield r
    r.close()


def test_equals_exact_full_dim_search_when_candidates_cover_corpus(funnel, embedder,
                                                                   corpus_docs):
    full = embedder.embed_documents([d.text for d in corpus_docs])
    ids = [d.id for d in corpus_docs]
    for q in QUERIES:
        qv = embedder.embed_query(q)
        sims = full @ qv
        exact = [ids[i] for i in np.argsort(-sims)]
        hits = funnel.search(q, k=8, mode="dense")
        assert [h.id for h in hits] == exact
        np.testing.assert_allclose([h.scores["dense"] for h in hits], np.sort(sims)[::-1],
                                   atol=1e-5)
        assert all("funnel" in h.ranks for h in hits)


def test_chroma_holds_short_renormalized_vectors(funnel, embedder, corpus_docs):
    got = funnel.store.get(ids=["dogs"], include=["embeddings", "documents"])
    short = np.asarray(got["embeddings"][0])
    assert short.shape == (64,)
    assert np.linalg.norm(short) == pytest.approx(1.0, abs=1e-5)
    # encoded in one batch, as the writer did: batches of other sizes pad differently, which
    # moves bfloat16 vectors (the CPU default) by ~1e-3
    texts = [d.text for d in corpus_docs]
    full = embedder.embed_documents(texts)[texts.index(got["documents"][0])]
    np.testing.assert_allclose(short, full[:64] / np.linalg.norm(full[:64]), atol=1e-5)


def test_funnel_follows_delete_and_reopen(tmp_path, embedder, corpus_docs):
    path = str(tmp_path / "g")
    r = HybridRetriever({"store": {"path": path}, "funnel_dim": 32}, embedder=embedder)
    r.add_documents(corpus_docs)
    r.delete(["dogs"])
    assert len(r.verify()['funnel_ids']) == 7
    r.close()
    r2 = HybridRetriever.open(path)
    assert r2.config.funnel_dim == 32 and len(r2.verify()['funnel_ids']) == 7
    assert r2.search("loyal companions wolves", k=1, mode="dense")[0].id != "dogs"
    r2.close()
    # lost funnel arrays are rebuilt from the texts in Chroma
    import shutil

    shutil.rmtree(tmp_path / "g" / "retrievekit" / "retrievekit" / "funnel")
    r3 = HybridRetriever.open(path)
    assert len(r3.verify()['funnel_ids']) == 7
    r3.close()


@pytest.mark.parametrize("bad", [384, 500, 0, -3, "64"])
def test_bad_funnel_dim(tmp_path, embedder, bad):
    with pytest.raises(ConfigError, match="funnel_dim"):
        HybridRetriever({"store": {"path": str(tmp_path / "b")}, "funnel_dim": bad},
                        embedder=embedder)


def test_funnel_vectors_unit(tmp_path):
    from retrievekit.records import Record

    eye = np.eye(4, dtype=np.float32)
    encoded = []

    def encode(texts):
        encoded.extend(texts)
        return np.stack([eye[int(t)] for t in texts])

    def rec(rid, text):
        return Record(rid, rid.split("#")[0], text, {})

    fv = FunnelVectors(4, encode, tmp_path / "f")
    fv.replace([], [rec("a", "0"), rec("b#chunk0", "1"), rec("b#chunk1", "1")])
    fv.replace(["a"], [rec("a", "2")], {"a": eye[2]})  # a vector given is not re-encoded
    fv.replace(["b"], [])
    fv.replace([], [rec("c", "3")])
    assert encoded == ["0", "1", "1", "3"] and fv.ids() == {"a", "c"}
    q = np.array([0, 0, 1, 0], np.float32)
    np.testing.assert_allclose(fv.similarities(["a", "c", "zz"], q), [1, 0, -np.inf])
    fv.commit(5)
    back = FunnelVectors(4, encode, tmp_path / "f")
    assert back.watermark == 5 and back.ids() == {"a", "c"}
    np.testing.assert_allclose(back.similarities(["a", "c"], q), [1, 0])
    assert FunnelVectors(8, encode, tmp_path / "f").watermark == -1  # other dim: rebuilt


def test_funnel_commits_cost_the_change(tmp_path):
    """A commit after a small change writes a small delta, not the whole matrix again; the
    deltas are folded into a new base once they outgrow a quarter of it."""
    import json

    from retrievekit.records import Record

    rng = np.random.default_rng(0)
    vec = {f"r{i}": v for i, v in enumerate(rng.standard_normal((3000, 8)).astype(np.float32))}

    def recs(ids):
        return [Record(i, i, "t", {}) for i in ids]

    def manifest():
        return json.loads((tmp_path / "f" / "manifest.json").read_text())

    fv = FunnelVectors(8, lambda texts: None, tmp_path / "f")
    fv.replace([], recs(list(vec)[:2000]), vec)
    fv.commit(1)
    base = manifest()["base"]
    fv.replace(["r5"], recs(["r5"]), {"r5": np.ones(8, np.float32)})
    fv.replace(["r7"], [])
    fv.commit(2)
    m = manifest()
    assert m["base"] == base and len(m["deltas"]) == 1
    delta = tmp_path / "f" / m["deltas"][0]
    assert json.loads((delta / "ids.json").read_text()) == ["r5"]
    assert json.loads((delta / "removed.json").read_text()) == ["r7"]
    back = FunnelVectors(8, lambda texts: None, tmp_path / "f")
    assert back.watermark == 2 and back.ids() == set(list(vec)[:2000]) - {"r7"}
    np.testing.assert_allclose(back.similarities(["r5", "r7"], np.ones(8, np.float32)),
                               [8, -np.inf])
    fv.replace([], recs(list(vec)[2000:]), vec)  # 1,000 new rows: more than a quarter
    fv.commit(3)
    m = manifest()
    assert m["base"] != base and m["deltas"] == []
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == sorted(
        [m["base"], "manifest.json"])  # superseded folders are gone
    assert FunnelVectors(8, lambda texts: None, tmp_path / "f").ids() == set(vec) - {"r7"}
    s = short_vectors(np.array([[3, 4, 5, 6]], np.float32), 2)
    np.testing.assert_allclose(s, [[0.6, 0.8]])


def test_stage_two_ranks_by_cosine_when_vectors_are_not_unit_length(tmp_path, tiny_model):
    """Stage 2 once ranked by dot product: with an embedder that does not normalize, the
    funnel's unfiltered hits (and their scores, ~15) differed from the exact cosine order
    that a filtered exact scan of the same store returned."""
    import json
    import shutil

    from retrievekit.embedding import Embedder

    raw = tmp_path / "raw-model"
    shutil.copytree(tiny_model, raw)
    modules = json.loads((raw / "modules.json").read_text())
    (raw / "modules.json").write_text(json.dumps(
        [m for m in modules if not m["type"].endswith("Normalize")]))
    emb = Embedder(model=str(raw), batch_size=256, normalize=False)
    words = ["river", "stone", "cloud", "engine", "garden", "signal", "copper", "lantern"]
    docs = [{"text": " ".join(words[(i * 7 + j) % 8] for j in range(1 + i % 9)) + f" {i}",
             "id": f"d{i}", "metadata": {"all": 1}} for i in range(120)]
    with HybridRetriever({"store": {"path": str(tmp_path / "s")}, "funnel_dim": 16,
                          "funnel_candidates": 1000, "chunk_penalty": 0.0},
                         embedder=emb) as r:
        r.add_documents(docs)
        full = emb.embed_documents([d["text"] for d in docs])
        assert np.linalg.norm(full, axis=1).min() > 1.5  # not unit length
        q = emb.embed_query("river stone")
        cos = full @ q / np.linalg.norm(full, axis=1) / np.linalg.norm(q)
        hits = r.search("river stone", k=5, mode="dense")
        assert [h.id for h in hits] == [docs[i]["id"] for i in np.argsort(-cos)[:5]]
        np.testing.assert_allclose([h.score for h in hits], np.sort(cos)[::-1][:5], atol=1e-5)
