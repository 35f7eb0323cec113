"""The texts and metadata of hits come from the BM25 index's stored copy (no Chroma `get` on
the query path), and must be exactly what Chroma holds; a record the BM25 index lacks is
still shown, read from Chroma."""

from __future__ import annotations

import pytest

from retrievekit.pipeline import HybridRetriever
from retrievekit.records import parent_of
from retrievekit.types import Document

LONG = " ".join(f"Sentence {i} about turbine blades, icing and the tail rotor." for i in range(120))
DOCS = [
    Document("Café crème and naïve résumé: ünïcödé text, emoji 🚀, a tab\there.", "u1",
             {"lang": "fr", "stars": 4, "price": 2.5, "whole": 3.0, "open": True,
              "tags": ["a", "b"]}),
    Document(LONG, "long", {"kind": "manual", "pages": 120}),
    Document("Short note on rotor icing in cold climates.", "short", {}),
    Document("Quotes \"inside\" and a backslash \\ and <html> & ampersands.", "q",
             {"note": "x\ny"}),
]


@pytest.fixture
def store(tmp_path, embedder):
    r = HybridRetriever(path=str(tmp_path / "s"), embedder=embedder)
    r.add_documents(DOCS)
    yield r
    r.close()


def _chroma(r: HybridRetriever, chunk_id: str):
    got = r._store.get(ids=[chunk_id], include=["documents", "metadatas"])
    return got["documents"][0], got["metadatas"][0]


@pytest.mark.parametrize("mode", ["hybrid", "dense", "sparse"])
def test_hits_show_what_chroma_holds(store, mode):
    seen = set()
    for q in ("rotor icing", "café résumé emoji", "backslash ampersands", "tail rotor blades"):
        for hit in store.search(q, 4, mode=mode):
            text, meta = _chroma(store, hit.chunk_id)
            assert hit.document.text == text
            public = {k: v for k, v in meta.items() if not k.startswith("_rk_")}
            assert hit.document.metadata == public
            # types survive too (an int stays an int, a float a float, a bool a bool)
            assert {k: type(v) for k, v in hit.document.metadata.items()} == \
                {k: type(v) for k, v in public.items()}
            assert hit.chunk_index == meta["_rk_chunk"]
            assert hit.id == meta["_rk_parent"]
            seen.add(hit.id)
    assert {"u1", "long", "q"} <= seen


def test_a_replaced_document_shows_its_new_text(store):
    store.add_documents([Document("Rotor icing, second edition: de-icing boots.", "short",
                                  {"ed": 2})])
    hit = next(h for h in store.search("rotor de-icing boots", 4) if h.id == "short")
    assert hit.document.text == "Rotor icing, second edition: de-icing boots."
    assert hit.document.metadata == {"ed": 2}


def test_a_record_the_bm25_index_lacks_is_read_from_chroma(store):
    chunk = next(h.chunk_id for h in store.search("turbine blades tail rotor", 3, mode="dense")
                 if h.id == "long")
    sparse = store._sparse
    # the BM25 index loses the document (as when another client wrote it and this one has
    # not caught up yet); Chroma still holds it, so the dense side still finds it
    sparse.replace([parent_of(chunk)], [])
    sparse.commit(sparse.watermark)
    assert not sparse.records([chunk])
    hit = next(h for h in store.search("turbine blades tail rotor", 3, mode="dense")
               if h.id == "long")
    assert hit.document.text == _chroma(store, hit.chunk_id)[0]
    assert hit.document.metadata == {"kind": "manual", "pages": 120}


def test_verify_compares_the_stored_copy_with_chroma(store):
    from retrievekit.records import Record

    report = store.verify()
    assert report["ok"] and report["stale"] == []
    # the BM25 index's copy of one record goes out of step with Chroma
    text, meta = _chroma(store, "short")
    sparse = store._sparse
    sparse.replace(["short"], [Record("short", "short", "an older text", meta)])
    sparse.commit(sparse.watermark)
    report = store.verify()
    assert report["stale"] == ["short"] and not report["ok"]
    assert report["sparse_ids"] == report["chroma_ids"]  # the ids alone would not show it
    store._follower.rebuild()  # what an open does when a derived index is damaged
    assert store.verify()["ok"]
    assert next(h for h in store.search("rotor icing", 4) if h.id == "short").document.text \
        == text
