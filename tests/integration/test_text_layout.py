"""Where a record's text lives in Chroma: a metadata string in a store of format 3 (Chroma's
documents stay empty, so its full-text table is never written), Chroma's document in a store
of format 2, which keeps that layout for every later write. Reads take either."""

from __future__ import annotations

import json

from retrievekit.pipeline import HybridRetriever
from retrievekit.records import TEXT_KEY
from retrievekit.types import Document

CHUNKED = {"chunking": {"max_tokens": 16, "overlap_tokens": 2}}
LONG = " ".join(f"Sentence {i} on turbine blades and icing." for i in range(12))


def _raw(r: HybridRetriever) -> dict:
    """What Chroma itself holds, not through the store's reads."""
    return r.store.collection.get(include=["documents", "metadatas"])


def _contents(r: HybridRetriever) -> dict:
    return {d.id: (d.text, d.metadata) for d in r.get(r.document_ids())}


def test_texts_are_metadata_strings_and_read_back_whole(tmp_path, tiny_embedder):
    with HybridRetriever(path=str(tmp_path / "s"), embedder=tiny_embedder,
                         config=CHUNKED) as r:
        r.add_documents([Document(LONG, "long", {"kind": "manual"}),
                         Document("plums and pears", "short")])
        r.add_documents([Document("one short sentence now", "long", {"kind": "manual"})])
        raw = _raw(r)
        assert set(raw["documents"]) == {None}, "a text was written as a Chroma document"
        live = [m for m in raw["metadatas"] if not m.get("_rk_dead")]
        assert sorted(m[TEXT_KEY] for m in live) == ["one short sentence now",
                                                     "plums and pears"]
        assert r.store.read_settings()["format"] == 3
        assert _contents(r) == {"long": ("one short sentence now", {"kind": "manual"}),
                                "short": ("plums and pears", {})}
        for mode in ("dense", "sparse", "hybrid"):
            hit = r.search("plums", k=1, mode=mode)[0]
            assert (hit.id, hit.document.text, hit.document.metadata) == \
                ("short", "plums and pears", {})
    with HybridRetriever(path=str(tmp_path / "s"), embedder=tiny_embedder,
                         config=CHUNKED) as r:
        assert r.verify()["ok"]
        assert [h.id for h in r.search("pears", k=1, mode="sparse")] == ["short"]


def test_a_format_2_store_keeps_its_texts_as_documents(tmp_path, tiny_embedder):
    """A store made before format 3 (its texts in Chroma's documents) opens without a
    rewrite; its reads and searches see the texts, and its new writes keep the layout."""
    path = str(tmp_path / "s")
    with HybridRetriever(path=path, embedder=tiny_embedder, config=CHUNKED) as r:
        r.add_documents([Document(LONG, "long", {"kind": "manual"}),
                         Document("plums and pears", "short")])
        col = r.store.collection
        raw = col.get(include=["embeddings", "metadatas"])
        texts = [m[TEXT_KEY] for m in raw["metadatas"]]
        col.update(ids=raw["ids"], embeddings=raw["embeddings"], documents=texts,
                   metadatas=[{TEXT_KEY: None}] * len(raw["ids"]))
        settings = json.loads(col.metadata["rk_settings"])
        col.modify(metadata={"rk_settings": json.dumps({**settings, "format": 2})})
        assert all(TEXT_KEY not in m for m in _raw(r)["metadatas"])
    with HybridRetriever(path=path, embedder=tiny_embedder, config=CHUNKED) as r:
        assert r.verify()["ok"] and r.store.read_settings()["format"] == 2
        assert _contents(r) == {"long": (LONG, {"kind": "manual"}),
                                "short": ("plums and pears", {})}
        r.add_documents([Document("apples in the orchard", "new"),
                         Document("plums, pears and quinces", "short")])
        raw = _raw(r)
        assert all(TEXT_KEY not in m for m in raw["metadatas"])
        live = {i: d for i, d, m in zip(raw["ids"], raw["documents"], raw["metadatas"])
                if not m.get("_rk_dead")}
        assert live["new"] == "apples in the orchard"
        assert live["short"] == "plums, pears and quinces"
        assert [h.document.text for h in r.search("quinces", k=1)] == \
            ["plums, pears and quinces"]
    with HybridRetriever(path=path, embedder=tiny_embedder, config=CHUNKED) as r:
        assert r.store.read_settings()["format"] == 2  # a retriever's own config opens it too
        assert _contents(r)["new"] == ("apples in the orchard", {})
