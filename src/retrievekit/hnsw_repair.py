"""Chroma's vector index is derived from its records: rebuilt when a crash damaged it.

Chroma (1.5.9, embedded) persists a collection's HNSW graph every `sync_threshold` (1,000)
writes: hnswlib's four files, rewritten in place, then `index_metadata.pickle` (the map from
graph labels to record ids) by a plain create-and-write. A process killed inside that write
leaves a truncated pickle, and from then on every read of the collection fails ("Error
constructing hnsw segment reader ... Error deserializing pickle file"): the store no longer
opens. A truncated `header.bin` is worse: Chroma crashes the process (SIGSEGV) on its first
read. And a folder lost otherwise makes dense search quietly miss most records.

Chroma's log no longer holds the vectors it had persisted, so the graph cannot be replayed.
The repair, on open of an embedded store:
1. finds the damage: hnswlib's files checked by their sizes before Chroma reads them (a
   truncated file would crash it), then the records' oldest vectors queried for themselves
   (`vector_problem`) and one read of the change log's collection;
2. notes the repair in a marker file beside the derived indexes, deletes the damaged folder
   with Chroma stopped, and starts Chroma again: it begins an empty graph and replays its log
   past the last persisted write;
3. upserts every record's vector again, in id order, noting progress in the marker; the
   records' ids, texts and metadata come from Chroma's SQLite tables, which the damage does
   not touch, and the vectors are encoded again from the texts with the store's model (the
   embedding cache, when configured, answers for texts it has seen). The change log's entries
   carry a constant vector.
A process killed during the repair resumes it at the next open. Nothing the user wrote is
lost; the cost is one encoding pass over the collection (measured in docs/reliability.md).
Servers are left alone: their files are the server's, and a damaged one is a `StoreError`.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .persist import write_json
from .store import ChromaStore, damaged_vectors, read_lifted

logger = logging.getLogger(__name__)

MARKER = "vector-repair.json"
#: Records re-encoded and upserted per step (and per progress note in the marker).
STEP = 1000

#: hnswlib's header.bin: PERSISTENCE_VERSION (int32), offsetLevel0, max_elements,
#: cur_element_count, size_data_per_element (size_t each), ... 100 bytes in all.
_HEADER = struct.Struct("<iQQQQ")
_HEADER_SIZE = 100

#: (texts, metadatas) -> the vectors Chroma holds for those records
Vectors = Callable[[Sequence[str], Sequence[dict[str, Any]]], np.ndarray]


def file_problem(folder: Path | None) -> str | None:
    """What is wrong with the hnswlib files in `folder`, judged by their sizes (a truncated
    file makes Chroma read past its end); None when they fit together or Chroma has not
    written them yet."""
    if folder is None or not (folder / "header.bin").exists():
        return None
    header = (folder / "header.bin").read_bytes()
    if len(header) != _HEADER_SIZE:
        return f"{folder / 'header.bin'} holds {len(header)} bytes, not {_HEADER_SIZE}"
    _, _, _, count, per_element = _HEADER.unpack_from(header)
    need = {"data_level0.bin": count * per_element, "length.bin": count * 4,
            "link_lists.bin": count * 4}
    for name, size in need.items():
        have = (folder / name).stat().st_size if (folder / name).exists() else -1
        if have < size:
            return (f"{folder / name} holds {have} bytes, fewer than the {size} its "
                    f"{count} elements need")
    return None


def _read_problem(collection: Any) -> str | None:
    try:
        collection.get(limit=1, include=[])
    except Exception as exc:
        if not damaged_vectors(exc):
            raise  # the open fails with it, as any other read would
        return f"{type(exc).__name__}: {exc}"
    return None


def repair_if_damaged(store: ChromaStore, local_dir: Path, log_name: str,
                      vectors: Vectors) -> None:
    """Rebuild the vector index of the store's collection and of its change log where it is
    damaged, or finish a repair a killed process began (module docstring)."""
    if store.config.is_server or store.config.is_memory:
        return
    marker = local_dir / MARKER
    todo: dict[str, dict[str, Any]] = json.loads(marker.read_text()) if marker.exists() else {}
    names = [store.config.collection, log_name]
    collections = {n: c for n in names if (c := _collection(store, n)) is not None}
    folders = {n: store.vector_folder(str(c.id)) for n, c in collections.items()}
    damaged = {n: p for n in collections if (p := file_problem(folders[n]))}
    for name, col in collections.items():
        if name in damaged:
            continue  # not read: a short file can crash Chroma
        problem = store.vector_problem() if name == store.config.collection \
            else _read_problem(col)  # the log's vectors are all alike: a read is the check
        if problem:
            damaged[name] = problem
    if not damaged and not todo:
        return
    for name, problem in damaged.items():
        logger.warning("the vector index of collection %r is damaged (%s); rebuilding it "
                       "from the collection's records", name, problem[:300])
        todo[name] = {"reason": problem[:1000], "done": 0}
    local_dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, todo)
    gone = [folders[n] for n in damaged if folders.get(n) is not None]
    if gone:
        store.drop_vector_folders(gone)
    for name, state in todo.items():
        col = _collection(store, name)
        if col is not None:
            encode = vectors if name == store.config.collection else _constant
            _rebuild(col, encode, state, lambda: write_json(marker, todo))
    marker.unlink()


def _collection(store: ChromaStore, name: str) -> Any:
    if name == store.config.collection:
        return store.collection
    try:
        return store.client.get_collection(name, embedding_function=None)
    except Exception:  # not made yet
        return None


def _constant(texts: Sequence[str], metas: Sequence[Any]) -> np.ndarray:
    return np.ones((len(texts), 1), dtype=np.float32)  # the change log's entries (changelog.py)


def _rebuild(col: Any, vectors: Vectors, state: dict[str, Any],
             note: Callable[[], None]) -> None:
    """Upsert every record's vector again, from `state["done"]` on in id order."""
    start = time.perf_counter()
    ids = sorted(col.get(include=[])["ids"])
    first = int(state["done"])
    for s in range(first, len(ids), STEP):
        batch = ids[s:s + STEP]
        got = read_lifted(col, ["documents", "metadatas"], ids=batch)
        col.upsert(ids=got["ids"], embeddings=vectors(got["documents"], got["metadatas"]))
        state["done"] = s + len(batch)
        note()
    logger.warning("rebuilt the vector index of collection %r: %d records in %.1f s",
                   col.name, len(ids) - first, time.perf_counter() - start)
