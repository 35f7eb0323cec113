"""The core behaviours, run against both stores: embedded Chroma and a `chroma run` server.

The server is a real subprocess started once per session (`chroma_server` in conftest.py);
every test uses its own collection on it.
"""

from __future__ import annotations

import uuid

import pytest

from conftest import CORPUS
from retrievekit.errors import StoreMismatchError
from retrievekit.pipeline import HybridRetriever
from retrievekit.types import Document

TEXT = {i: t for i, t, _ in CORPUS}
META = {i: m for i, _, m in CORPUS}


class Backend:
    """Makes retrievers over one store of the given kind (one collection per test)."""

    def __init__(self, kind: str, tmp_path, embedder, request) -> None:
        self.kind = kind
        self.embedder = embedder
        self.collection = f"rk-{uuid.uuid4().hex[:12]}"
        self.path = str(tmp_path / "store")
        self.server = request.getfixturevalue("chroma_server") if kind == "server" else None
        self.opened: list[HybridRetriever] = []

    def location(self) -> dict:
        if self.server is None:
            return {"path": self.path, "collection": self.collection}
        return {"host": self.server.host, "port": self.server.port,
                "collection": self.collection}

    def make(self, **kwargs) -> HybridRetriever:
        kwargs.setdefault("embedder", self.embedder)
        r = HybridRetriever(**self.location(), **kwargs)
        self.opened.append(r)
        return r

    def open(self, **changes) -> HybridRetriever:
        loc = self.location()
        r = HybridRetriever.open(loc.pop("path", ".retrievekit"), **loc, **changes)
        self.opened.append(r)
        return r

    def close_all(self) -> None:
        for r in self.opened:
            r.close()


@pytest.fixture(params=["embedded", pytest.param("server", marks=pytest.mark.server)])
def backend(request, tmp_path, embedder):
    b = Backend(request.param, tmp_path, embedder, request)
    yield b
    b.close_all()


@pytest.fixture
def filled(backend, corpus_docs):
    r = backend.make()
    r.add_documents(corpus_docs)
    return r


def _check_hits(hits):
    for h in hits:
        assert h.document.text == TEXT[h.id]
        assert dict(h.document.metadata) == META[h.id]


@pytest.mark.parametrize("mode", ["hybrid", "dense", "sparse"])
def test_add_and_search_each_mode(filled, mode):
    assert filled.count() == len(CORPUS)
    hits = filled.search("error code XQ7-42 flux capacitor", k=3, mode=mode)
    assert hits[0].id == "xq7"
    _check_hits(hits)
    stages = set(hits[0].ranks)
    assert stages == ({"dense", "sparse", "fused"} if mode == "hybrid" else {mode})
    # k above the corpus size is clamped, not an error
    assert len(filled.search("programming language", k=100, mode="dense")) == len(CORPUS)


@pytest.mark.parametrize("mode", ["hybrid", "dense", "sparse"])
def test_where_filter_applies_to_both_sides(filled, mode):
    hits = filled.search("green tea and sourdough bread", k=8, mode=mode, where={"topic": "food"})
    assert {h.id for h in hits} == {"bread", "tea"}
    _check_hits(hits)
    both = filled.search("programming language memory", k=8, mode=mode,
                         where={"$and": [{"topic": "code"}, {"year": {"$gte": 2023}}]})
    assert {h.id for h in both} <= {"rust", "xq7"} and "rust" in {h.id for h in both}


def test_sparse_filter_that_matches_no_term_returns_nothing(filled):
    assert filled.search("cats purr and hunt mice", mode="sparse", where={"topic": "food"}) == []


def test_delete_removes_from_both_sides(filled):
    assert filled.delete(["cats"]) == 1
    assert filled.delete(["cats", "nope"]) == 0
    assert filled.count() == len(CORPUS) - 1
    for mode in ("hybrid", "dense", "sparse"):
        assert "cats" not in {h.id for h in filled.search("cats purr mice", k=8, mode=mode)}
    assert filled.get(["cats"]) == []


def test_update_replaces_text_on_both_sides(filled):
    filled.add_documents([Document("Oolong tea is partly oxidised.", id="tea",
                                    metadata={"topic": "food"})])
    assert filled.count() == len(CORPUS)
    assert filled.search("oolong oxidised", mode="sparse")[0].id == "tea"
    assert "tea" not in {h.id for h in filled.search("catechins caffeine", mode="sparse")}
    assert filled.get(["tea"])[0].metadata == {"topic": "food"}


def test_long_document_is_chunked_and_deleted_whole(backend):
    r = backend.make()
    long_text = " ".join(f"sentence {i} about glaciers and fjords." for i in range(50))
    r.add_documents([Document(long_text, id="long"), Document("a short one", id="short")])
    assert r.count() > 2  # the long one became several chunks
    assert r.get(["long"])[0].text == long_text
    hits = r.search("glaciers fjords", k=5)
    assert [h.id for h in hits].count("long") == 1  # chunks collapse to their parent
    assert r.delete(["long"]) > 1
    assert r.count() == 1 and r.verify()['sparse_ids'] == {"short"}


def test_reopen_keeps_documents_and_settings(backend, filled):
    before = filled.search("pets", k=8)
    settings = filled.info()["settings"]
    filled.close()
    r = backend.open()
    assert r.count() == len(CORPUS)
    assert r.info()["settings"] == settings
    after = r.search("pets", k=8)  # the query's engine may differ (~1e-4 in the cosines)
    assert [h.id for h in after] == [h.id for h in before]
    assert [h.score for h in after] == pytest.approx([h.score for h in before], abs=1e-3)
    assert r.verify()['sparse_ids'] == set(TEXT)


@pytest.mark.parametrize("kwargs, field", [
    ({"config": {"embedder": {"query_prefix": "query: "}}, "embedder": None},
     "embedder.query_prefix"),
    ({"truncate_dim": 128, "embedder": None}, "embedder.truncate_dim"),
    ({"config": {"sparse": {"tokenizer": {"stemmer": None}}}}, "sparse.tokenizer.stemmer"),
])
def test_mismatched_settings_are_refused(backend, filled, kwargs, field):
    count = filled.count()
    filled.close()
    with pytest.raises(StoreMismatchError) as err:
        backend.make(**kwargs)
    assert field in str(err.value) and "HybridRetriever.open" in str(err.value)
    r = backend.open()
    assert r.count() == count


def test_reads_and_failures_create_nothing(tmp_path, embedder, capsys):
    """Reading a store that is not there, or failing to make one, leaves nothing behind."""
    from retrievekit.cli import main
    from retrievekit.errors import RetrieveKitError, StoreError

    typo = tmp_path / "typo"
    with pytest.raises(StoreError, match="no retrievekit store at"):
        HybridRetriever.open(str(typo))
    assert not typo.exists()
    for argv in (["info", "--store", str(typo)], ["search", "x", "--store", str(typo)]):
        assert main(argv) == 2 and "no retrievekit store at" in capsys.readouterr().err
        assert not typo.exists(), argv
    # a failed create (a model that cannot be loaded offline) removes what it made
    assert main(["index", str(tmp_path), "--store", str(typo), "--model", "no/such-model"]) == 2
    assert not typo.exists()
    with pytest.raises(RetrieveKitError):
        HybridRetriever(path=str(typo), model="no/such-model")
    assert not typo.exists()
    # an existing store opened under a collection name it lacks: refused, nothing added
    real = tmp_path / "real"
    with HybridRetriever(path=str(real), embedder=embedder) as r:
        r.add_documents([{"text": "a thing", "id": "a"}])
    with pytest.raises(StoreError, match="no collection 'other'"):
        HybridRetriever.open(str(real), collection="other")
    with HybridRetriever.open(str(real)) as r:
        names = {c.name for c in r.store.client.list_collections()}
    assert names == {"retrievekit", "retrievekit-rklog"}
