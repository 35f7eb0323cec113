"""Code that runs in child processes of the reliability tests (crash, lock, two clients).

Children are forked from a multiprocessing forkserver that has imported torch,
sentence-transformers, chromadb and retrievekit once, so each child starts in well under a
second instead of ~8 s. Every child is a separate OS process with its own Chroma client,
file descriptors and locks; `Process.kill()` sends it a real SIGKILL.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import traceback
from typing import Any

import chromadb  # noqa: F401  (preloaded by the forkserver)
import sentence_transformers  # noqa: F401
import torch

from retrievekit.pipeline import HybridRetriever
from retrievekit.types import Document

_CTX = None


def mp_context():
    """The forkserver context, with the heavy imports preloaded in the server."""
    global _CTX
    if _CTX is None:
        ctx = multiprocessing.get_context("forkserver")
        # Modules importable from the default sys.path only: Python 3.11's forkserver does
        # not apply the parent's sys.path before preloading (a failed preload is silent).
        ctx.set_forkserver_preload(["torch", "sentence_transformers", "chromadb", "tantivy",
                                    "retrievekit.pipeline", "retrievekit.persist"])
        _CTX = ctx
    return _CTX


def make_docs(n: int, version: int = 0, start: int = 0) -> list[Document]:
    """`n` short documents whose ids, texts and unique terms are known to the parent."""
    words = ["river", "stone", "cloud", "engine", "garden", "signal", "copper", "lantern",
             "harbor", "meadow", "glacier", "orbit", "violin", "pepper", "canyon", "saddle"]
    out = []
    for i in range(start, start + n):
        text = (f"record {i} uniq{i}v{version} {words[i % 16]} {words[(i * 7) % 16]} "
                f"{words[(i * 11 + 3) % 16]} group{i % 13}")
        out.append(Document(text=text, id=f"d{i:05d}", metadata={"i": i, "g": i % 13}))
    return out


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill_hook(point: str) -> None:
    """SIGKILL this process at a named point of a write (child processes only)."""
    from chromadb.api.models.Collection import Collection

    import retrievekit.sparse as sparse

    def after(cls: Any, name: str) -> None:
        original = getattr(cls, name)

        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            out = original(self, *args, **kwargs)
            if not self.name.endswith("-rklog"):  # the records, not the change log
                _die()
            return out

        setattr(cls, name, call)

    if point in ("after-first-chroma-batch", "after-upsert"):
        after(Collection, "upsert")  # the records are in; dead ones not yet deleted
    elif point == "after-chroma-delete":
        after(Collection, "delete")  # Chroma has deleted; log and BM25 not yet told
    elif point == "before-sparse-commit":
        def commit(self, *args: Any, **kwargs: Any) -> None:
            _die()

        sparse.SparseIndex.commit = commit
    elif point != "none":
        raise ValueError(f"unknown kill point {point!r}")


def versioned_text(doc: str, version: int, chunks: int) -> str:
    """A text of doc `doc` at `version` that makes about `chunks` chunks of 16 tokens; every
    word names the doc and version, so a mix of two versions is visible."""
    words = " ".join(f"w{doc}v{version}n{i}" for i in range(6 * chunks))
    return f"{doc} version{version} {words}"


def crash_loop(path: str, model: str, journal: str, seed: int, started,
               local_vectors: bool = False) -> None:
    """Random updates (chunk counts change) and deletes over a pool of documents, forever;
    each op is journaled as 'begin' before and 'ack' after, flushed, so the parent knows
    after a SIGKILL which writes were acknowledged."""
    import json
    import random

    torch.set_num_threads(1)
    rng = random.Random(seed)
    r = HybridRetriever(path=path, model=model,
                        config={"embedder": {"batch_size": 64}, "local_vectors": local_vectors,
                                "chunking": {"max_tokens": 16, "overlap_tokens": 2}})
    with open(journal, "a", encoding="utf-8") as fh:
        def note(*entry: Any) -> None:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

        started.set()
        while True:
            batch = rng.sample(range(12), rng.randint(1, 4))
            if rng.random() < 0.25:
                ids = [f"p{i}" for i in batch]
                note("begin", "delete", ids, 0)
                r.delete(ids)
                note("ack", "delete", ids, 0)
            else:
                version = rng.randint(1, 10 ** 9)
                docs = [Document(text=versioned_text(f"p{i}", version, rng.randint(1, 5)),
                                 id=f"p{i}", metadata={"v": version}) for i in batch]
                note("begin", "add", [d.id for d in docs], version)
                r.add_documents(docs)
                note("ack", "add", [d.id for d in docs], version)


def crash_add(path: str, model: str, n: int, version: int, point: str, started,
              encoded) -> None:
    """Open the store, then add `n` docs; killed at `point` or by the parent. `encoded` is
    set once the documents are embedded (the writes come next)."""
    torch.set_num_threads(1)
    r = HybridRetriever(path=path, model=model, config={"embedder": {"batch_size": 256}})
    install_kill_hook(point)
    embed = r.embedder.embed_documents

    def embed_documents(*args: Any, **kwargs: Any):
        out = embed(*args, **kwargs)
        encoded.set()
        return out

    r.embedder.embed_documents = embed_documents
    started.set()
    r.add_documents(make_docs(n, version))
    encoded.set()  # also when nothing needed embedding: the parent must not wait for it
    r.close()


def hold_store(path: str, model: str, conn) -> None:
    """Open an embedded store for writing and keep it open, adding the (text, id) pairs it is
    sent, until told to close."""
    torch.set_num_threads(1)
    try:
        r = HybridRetriever(path=path, model=model)
    except Exception as exc:  # report what a second opener sees
        conn.send(("error", type(exc).__name__, str(exc)))
        return
    conn.send(("open", "", ""))
    while (msg := conn.recv()) != "close":
        r.add_documents([Document(text=msg[0], id=msg[1])])
        conn.send(("added", msg[1], ""))
    r.close()
    conn.send(("closed", "", ""))


def server_client(host: str, port: int, collection: str, model: str | None, conn,
                  pause_before_upsert: bool = False) -> None:
    """Client A of the two-client tests: runs the commands the parent sends over `conn`.

    With `pause_before_upsert`, the first Chroma upsert waits for a "go" from the parent
    after saying "paused": the write has started (the change marker is set) but its
    records are not in Chroma yet."""
    torch.set_num_threads(1)
    kwargs: dict[str, Any] = {"host": host, "port": port, "collection": collection}
    if model:
        kwargs["model"] = model
    r = HybridRetriever(**kwargs)
    if pause_before_upsert:
        from chromadb.api.models.Collection import Collection

        original = Collection.upsert
        state = {"paused": False}

        def upsert(self, *args: Any, **kw: Any) -> None:
            if not state["paused"]:
                state["paused"] = True
                conn.send(("paused", None))
                assert conn.recv() == "go"
            original(self, *args, **kw)

        Collection.upsert = upsert
    conn.send(("ready", None))
    while True:
        cmd, payload = conn.recv()
        try:
            if cmd == "add":
                result: Any = r.add_documents([Document(**d) for d in payload])
            elif cmd == "delete":
                result = r.delete(payload)
            elif cmd == "add-then-die":  # SIGKILLed after the records upsert, mid-write
                install_kill_hook("after-upsert")
                result = r.add_documents([Document(**d) for d in payload])
            elif cmd == "quit":
                r.close()
                conn.send(("ok", None))
                return
            else:
                raise ValueError(cmd)
            conn.send(("ok", result))
        except Exception:
            conn.send(("error", traceback.format_exc()))


def run_ops(path: str, model: str, ops: list, point: str, config: dict) -> None:
    """Apply `ops` [("add", [doc dicts]) | ("delete", [ids])]; the kill hook `point` is armed
    before the last one."""
    torch.set_num_threads(1)
    r = HybridRetriever(path=path, model=model, config=config)
    for i, (op, payload) in enumerate(ops):
        if i == len(ops) - 1:
            install_kill_hook(point)
        if op == "add":
            r.add_documents([Document(**d) for d in payload])
        else:
            r.delete(payload)
    r.close()
