"""Server mode with more than one client, and token authentication.

Client B is this test process; client A is a separate process (forked from a forkserver, so
it has its own Chroma client, BM25 index and sockets). B must see A's writes on its next
search, through the change marker in the collection metadata, without reopening.
"""

from __future__ import annotations

import logging
import uuid

import pytest

from chroma_server import TokenAuthProxy
from retrievekit.errors import ConfigError, StoreError
from retrievekit.pipeline import HybridRetriever
from retrievekit.store import StoreConfig
from retrievekit.types import Document

pytestmark = pytest.mark.server

TOKEN = "rk-test-token-5f2c9e"


def _collection() -> str:
    return f"rk-{uuid.uuid4().hex[:12]}"


class ClientA:
    """Client A in its own process, driven over a pipe."""

    def __init__(self, server, collection: str, pause_before_upsert: bool = False) -> None:
        from rk_children import mp_context, server_client

        ctx = mp_context()
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=server_client, daemon=True,
                                args=(server.host, server.port, collection, None, child,
                                      pause_before_upsert))
        self.proc.start()
        assert self.recv(120)[0] == "ready"

    def recv(self, timeout: float = 120):
        if not self.conn.poll(timeout):
            raise AssertionError("client A did not answer")
        return self.conn.recv()

    def call(self, cmd: str, payload=None):
        self.conn.send((cmd, payload))
        status, result = self.recv()
        assert status == "ok", result
        return result

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("quit", None))
                self.recv(30)
            finally:
                self.proc.join(30)
                if self.proc.is_alive():
                    self.proc.kill()


def _ids(hits):
    return [h.id for h in hits]


def test_writes_of_another_process_are_seen_on_next_search(chroma_server, embedder,
                                                            corpus_docs):
    collection = _collection()
    b = HybridRetriever(host=chroma_server.host, port=chroma_server.port,
                        collection=collection, embedder=embedder)
    b.add_documents(corpus_docs)
    a = ClientA(chroma_server, collection)
    try:
        a.call("add", [{"text": "Zebras have black and white stripes and live in herds.",
                        "id": "zebra", "metadata": {"topic": "animals"}}])
        for mode in ("sparse", "dense", "hybrid"):
            assert _ids(b.search("zebra stripes herds", k=3, mode=mode))[0] == "zebra", mode
        assert b.verify()['sparse_ids'] == set(b.store.get(include=[])["ids"])
        # a changed text replaces the old one in B's BM25 index
        a.call("add", [{"text": "Oolong tea is partly oxidised.", "id": "tea",
                        "metadata": {"topic": "food"}}])
        assert _ids(b.search("oolong oxidised", k=1, mode="sparse")) == ["tea"]
        assert "tea" not in _ids(b.search("catechins caffeine", mode="sparse"))
        # deletes by A disappear from both of B's sides
        assert a.call("delete", ["cats", "zebra"]) == 2
        for mode in ("sparse", "dense", "hybrid"):
            got = _ids(b.search("zebra stripes cats purr mice", k=9, mode=mode))
            assert "zebra" not in got and "cats" not in got, mode
        assert b.verify()['sparse_ids'] == set(b.store.get(include=[])["ids"])
        assert b.count() == len(corpus_docs) - 1
    finally:
        a.close()
        b.close()


def test_search_during_another_clients_write_catches_up_afterwards(chroma_server, embedder,
                                                                   corpus_docs):
    """B searches after A has started a write (marker changed) but before A's records are
    in Chroma; B's next search after A finishes must still see them."""
    collection = _collection()
    b = HybridRetriever(host=chroma_server.host, port=chroma_server.port,
                        collection=collection, embedder=embedder)
    b.add_documents(corpus_docs)
    a = ClientA(chroma_server, collection, pause_before_upsert=True)
    try:
        a.conn.send(("add", [{"text": "Quokkas are small smiling marsupials.",
                              "id": "quokka"}]))
        assert a.recv()[0] == "paused"
        assert "quokka" not in _ids(b.search("quokka marsupials", k=3))  # mid-write
        a.conn.send("go")
        assert a.recv() == ("ok", ["quokka"])
        for mode in ("sparse", "dense", "hybrid"):
            assert _ids(b.search("quokka marsupials", k=3, mode=mode))[0] == "quokka", mode
        assert b.verify()['sparse_ids'] == set(b.store.get(include=[])["ids"])
    finally:
        a.close()
        b.close()


def test_writer_that_dies_mid_write_is_noticed_by_a_reader(chroma_server, embedder,
                                                           corpus_docs, monkeypatch):
    """A dies after its records are in Chroma but before its log entry is done (formerly:
    a reader that synced on the first change marker stayed stale for good). B sees what
    landed on its next search, whole; once the entry outlives the lease, B repairs it."""
    from retrievekit import changelog

    collection = _collection()
    b = HybridRetriever(host=chroma_server.host, port=chroma_server.port,
                        collection=collection, embedder=embedder)
    b.add_documents(corpus_docs)
    long_old = " ".join(["Wombats dig long burrows in the Australian bush."] * 60)
    b.add_documents([{"text": long_old, "id": "wombat"}])
    assert b.info()["records"] > len(corpus_docs) + 1  # the old wombat is chunked
    a = ClientA(chroma_server, collection)
    try:
        a.conn.send(("add-then-die", [{"text": "Wombats leave cube-shaped droppings.",
                                       "id": "wombat"},
                                      {"text": "Quokkas are small smiling marsupials.",
                                       "id": "quokka"}]))
        a.proc.join(60)
        assert a.proc.exitcode == -9
        for mode in ("sparse", "dense", "hybrid"):
            assert _ids(b.search("quokka marsupials", k=3, mode=mode))[0] == "quokka", mode
            hit = [h for h in b.search("wombat", k=8, mode=mode) if h.id == "wombat"]
            assert hit and hit[0].document.text == "Wombats leave cube-shaped droppings."
        assert b.get(["wombat"])[0].text == "Wombats leave cube-shaped droppings."
        state = b.verify()
        assert state["pending"] == 1 and state["dead"] > 0  # A never finished its write
        assert state["sparse_ids"] == state["chroma_ids"]
        monkeypatch.setattr(changelog, "LEASE_S", 0.0)  # the entry is now past its lease
        b.search("wombat", k=1)
        assert b.verify()["ok"]
    finally:
        a.close()
        b.close()


def test_replica_dir_restart_catches_up_from_the_log(chroma_server, embedder, corpus_docs,
                                                    tmp_path, caplog):
    """A server client with replica_dir keeps its BM25 index on disk: a restart reads only
    the writes made meanwhile (here by another client), never the whole collection."""
    from retrievekit.errors import StoreLockedError

    collection = _collection()
    kw = {"host": chroma_server.host, "port": chroma_server.port, "collection": collection}
    replica = {"store": {**kw, "replica_dir": str(tmp_path / "replica")}}
    with HybridRetriever(replica, embedder=embedder) as b:
        b.add_documents(corpus_docs)
        with pytest.raises(StoreLockedError, match="replica_dir"):
            HybridRetriever(replica, embedder=embedder)  # one process per replica
    with HybridRetriever(embedder=embedder, **kw) as other:
        other.add_documents([{"text": "Pangolins are covered in keratin scales.",
                              "id": "pangolin"}])
        other.delete(["tea"])
    caplog.set_level(logging.INFO)
    with HybridRetriever(replica, embedder=embedder) as b:
        assert "rebuilt" not in caplog.text
        assert "caught up with 2 writes" in caplog.text
        assert _ids(b.search("pangolin keratin scales", k=1, mode="sparse")) == ["pangolin"]
        assert "tea" not in _ids(b.search("green tea caffeine", k=8, mode="sparse"))
        assert b.verify()["ok"] and b.count() == len(corpus_docs)
        # the replica's BM25 index keeps the vector Chroma holds for the record caught up
        import numpy as np

        ids, held = b._sparse.vectors(["pangolin", "tea"], b.embedder.dim)
        chroma = b.store.get(ids=["pangolin"], include=["embeddings"])["embeddings"][0]
        assert ids == ["pangolin"]
        np.testing.assert_allclose(held[0], np.asarray(chroma, np.float32), atol=1e-7)
    with pytest.raises(ConfigError, match="replica_dir"):
        StoreConfig(path=str(tmp_path / "x"), replica_dir=str(tmp_path / "r"))


def _auth_retriever(proxy, embedder, collection, token):
    return HybridRetriever({"store": {"host": proxy.host, "port": proxy.port,
                                      "collection": collection, "auth_token": token}},
                           embedder=embedder)


def test_token_auth_through_a_proxy(chroma_server, embedder, corpus_docs, caplog):
    caplog.set_level(logging.DEBUG)
    collection = _collection()
    with TokenAuthProxy(chroma_server.host, chroma_server.port, TOKEN) as proxy:
        r = _auth_retriever(proxy, embedder, collection, TOKEN)
        r.add_documents(corpus_docs)
        assert _ids(r.search("flux capacitor", k=1)) == ["xq7"]
        assert proxy.refused == 0
        assert all(h.get("Authorization") == f"Bearer {TOKEN}" for h in proxy.seen_headers)
        texts = [repr(r), repr(r.config), str(r.config), repr(r.store.config),
                 str(r.config.to_dict()), str(r.info())]
        r.close()
        # reopening with the recorded settings works with the token too
        r2 = HybridRetriever.open(host=proxy.host, port=proxy.port, collection=collection,
                                  auth_token=TOKEN)
        assert r2.count() == len(corpus_docs)
        assert _ids(r2.search("flux capacitor", k=1)) == ["xq7"]
        texts += [repr(r2.config), str(r2.info())]
        r2.close()

        with pytest.raises(StoreError) as wrong:
            _auth_retriever(proxy, embedder, collection, "not-the-token")
        msg = str(wrong.value)
        assert "401" in msg and "store.auth_token" in msg and "not-the-token" not in msg
        with pytest.raises(StoreError) as missing:
            _auth_retriever(proxy, embedder, collection, None)
        assert "store.auth_token" in str(missing.value)
        assert proxy.refused >= 2
        texts += [msg, repr(wrong.value), str(wrong.value.__cause__)]
    for text in texts + [caplog.text]:
        assert TOKEN not in text
    assert "not-the-token" not in caplog.text


def test_auth_token_that_cannot_be_a_header_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        StoreConfig(host="127.0.0.1", auth_token="bad token\n")
    assert "store.auth_token" in str(err.value) and "bad token" not in str(err.value)


def test_unreachable_server_is_a_store_error():
    from chroma_server import free_port

    port = free_port()
    with pytest.raises(StoreError) as err:
        HybridRetriever(host="127.0.0.1", port=port, collection="rk-unreachable")
    assert f"127.0.0.1:{port}" in str(err.value) and "chroma run" in str(err.value)


def test_a_server_that_never_answers_fails_within_the_timeout(tmp_path, embedder, corpus_docs):
    """chromadb's HttpClient waits forever: a server that accepts connections but never
    answers (here a bare listening socket, then a real server stopped with SIGSTOP) hung the
    open and every search. store.timeout bounds each request."""
    import os
    import signal
    import socket
    import threading

    from chroma_server import ChromaServer, chroma_binary

    def within(seconds, call):
        done: list = []

        def run():
            try:
                call()
                done.append(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the test below
                done.append(exc)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(seconds)
        assert done, f"still waiting after {seconds} s"
        return done[0]

    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        cfg = {"store": {"host": "127.0.0.1", "port": mute.getsockname()[1],
                         "collection": _collection(), "timeout": 1}}
        err = within(60, lambda: HybridRetriever(cfg, embedder=embedder))
        assert isinstance(err, StoreError) and "store.timeout = 1 s" in str(err)

    binary = chroma_binary()
    if binary is None:
        pytest.skip("the `chroma` CLI of chromadb is not installed")
    server = ChromaServer(tmp_path / "data", binary).start()
    try:
        cfg = {"store": {"host": server.host, "port": server.port,
                         "collection": _collection(), "timeout": 2}}
        with HybridRetriever(cfg, embedder=embedder) as r:
            r.add_documents(corpus_docs)
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                err = within(90, lambda: r.search("flux capacitor", k=1, mode="dense"))
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            assert isinstance(err, StoreError) and "did not answer" in str(err)
            assert _ids(r.search("flux capacitor", k=1)) == ["xq7"]  # back once it answers
    finally:
        server.stop()


def test_a_collection_dropped_and_made_anew_beside_its_log_is_rebuilt(chroma_server, embedder,
                                                                     corpus_docs, tmp_path):
    """Dropping the collection with a plain chromadb client leaves its change log behind: a
    replica's BM25 index, caught up to that log, then served the dropped records."""
    import chromadb

    collection = _collection()
    kw = {"host": chroma_server.host, "port": chroma_server.port, "collection": collection}
    replica = {"store": {**kw, "replica_dir": str(tmp_path / "replica")}}
    with HybridRetriever(replica, embedder=embedder) as r:
        r.add_documents(corpus_docs)
    chromadb.HttpClient(host=chroma_server.host, port=chroma_server.port
                        ).delete_collection(collection)
    with HybridRetriever(embedder=embedder, **kw) as other:
        other.add_documents([{"text": "Pangolins are covered in keratin scales.",
                              "id": "pangolin"}])
    with HybridRetriever(replica, embedder=embedder) as r:
        assert r.verify()["ok"] and r.count() == 1
        assert _ids(r.search("flux capacitor", k=3, mode="sparse")) == []


@pytest.mark.parametrize("host, words", [
    ("127.0.0.1:8000", "use host '127.0.0.1' and port 8000"),
    ("http://localhost", "store.ssl"), ("::1", "'[::1]'")])
def test_a_host_with_a_port_scheme_or_bare_ipv6_is_a_config_error(host, words):
    with pytest.raises(ConfigError, match="store.host") as err:
        HybridRetriever(host=host, port=8000, collection="rk-bad-host")
    assert words in str(err.value)


def test_a_server_restored_from_a_backup_and_written_past_the_replica_is_noticed(
        embedder, tmp_path):
    """A server restored from a backup, then written past a replica's watermark before the
    replica reopened: the log's new history reuses the sequence numbers of the old one, so
    the replica caught up from its watermark and kept serving the records the restore
    undid (a deleted document back in Chroma, missing from BM25; an added one gone from
    Chroma, still found by BM25). Each derived index now keeps the writer of the entry at
    its watermark and rebuilds when the log holds another there."""
    import shutil

    from chroma_server import ChromaServer, chroma_binary

    server = ChromaServer(tmp_path / "data", chroma_binary()).start()
    try:
        collection = _collection()

        def kw():
            return {"host": server.host, "port": server.port, "collection": collection}

        replica = lambda: {"store": {**kw(), "replica_dir": str(tmp_path / "replica")}}  # noqa: E731
        docs = [{"id": "aardvark", "text": "Aardvarks dig burrows and eat termites."},
                {"id": "badger", "text": "Badgers dig setts under woodland."}]
        with HybridRetriever(replica(), embedder=embedder) as r:
            r.add_documents(docs)
        server.stop()
        shutil.copytree(tmp_path / "data", tmp_path / "backup")
        server.start(same_port=True)
        with HybridRetriever(replica(), embedder=embedder) as r:
            r.add_documents([{"id": "capybara",
                              "text": "Capybaras graze on grasses beside rivers."}])
            r.delete(["aardvark"])
            assert _ids(r.search("termites burrows", k=3, mode="sparse")) == []
        server.stop()
        shutil.rmtree(tmp_path / "data")
        shutil.copytree(tmp_path / "backup", tmp_path / "data")
        server.start(same_port=True)
        with HybridRetriever(embedder=embedder, **kw()) as other:  # two writes: past the mark
            other.add_documents([{"id": "dugong", "text": "Dugongs graze on seagrass."}])
            other.add_documents([{"id": "echidna", "text": "Echidnas lay eggs and eat ants."}])
        with HybridRetriever(replica(), embedder=embedder) as r:
            assert r.count() == 4 and r.verify()["ok"]
            assert _ids(r.search("termites burrows", k=3, mode="sparse")) == ["aardvark"]
            assert _ids(r.search("capybaras rivers", k=3, mode="sparse")) == []
            assert "echidna" in _ids(r.search("eggs ants", k=3, mode="sparse"))
    finally:
        server.stop()
