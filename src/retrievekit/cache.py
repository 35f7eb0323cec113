"""On-disk embedding cache: one SQLite file mapping a settings+text key to a float32 vector.

The key covers everything that changes the vector (model identity, resolved prefix,
``truncate_dim``, normalize flag) plus a hash of the text, so a hit is always valid for the
settings that asked for it. Vectors are stored as raw little-endian float32 bytes; a hit
returns exactly the stored values. SQLite in WAL mode with a busy timeout lets several
threads (one connection per thread) and several processes share the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from retrievekit import validate as v
from retrievekit.errors import InvalidInputError, StoreError

logger = logging.getLogger(__name__)

__all__ = ["EmbeddingCache"]

#: Bumped when the key derivation or the row format changes; part of every key.
CACHE_FORMAT_VERSION = 1
_DTYPE = np.dtype("<f4")
# Stays below SQLite's historic limit of 999 bound variables per statement.
_SELECT_BATCH = 500


class EmbeddingCache:
    """Persistent map from cache key to float32 vector, backed by one SQLite file.

    Args:
        path: the SQLite file; its parent folders are created when missing.
        timeout: seconds a writer waits for another process's lock before failing.

    Raises:
        StoreError: the file cannot be created, opened or written.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 30.0) -> None:
        self.path = Path(path)
        self._timeout = float(timeout)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"EmbeddingCache(path={str(self.path)!r}): cannot create folder "
                f"{str(self.path.parent)!r} ({exc.strerror or exc}); choose a writable path"
            ) from exc
        conn = self._conn()
        try:
            with conn:
                conn.execute("BEGIN IMMEDIATE")  # fails now, not later, on a read-only file
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS embeddings ("
                    " key TEXT PRIMARY KEY, dim INTEGER NOT NULL, vector BLOB NOT NULL"
                    ") WITHOUT ROWID"
                )
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)"
                )
                conn.execute(
                    "INSERT OR IGNORE INTO meta(name, value) VALUES ('format_version', ?)",
                    (str(CACHE_FORMAT_VERSION),),
                )
        except sqlite3.Error as exc:
            self.close()
            raise self._store_error("initialize", exc) from exc
        logger.debug("opened embedding cache %s", self.path)

    # -- keys -------------------------------------------------------------------------

    @staticmethod
    def key_for(
        model_id: str,
        prefix: str,
        truncate_dim: int | None,
        normalize: bool,
        text: str,
    ) -> str:
        """Cache key: sha256 of the encode settings and of the text (hex, 64 chars).

        Args:
            model_id: model identity (name or path, plus revision when known).
            prefix: the *resolved* prefix prepended to the text before encoding.
            truncate_dim: the output dimension after truncation, or None for the full vector.
            normalize: whether vectors are L2-normalized after truncation.
            text: the text as given by the caller, without the prefix.
        """
        if not isinstance(model_id, str) or not model_id:
            raise InvalidInputError(f"model_id={model_id!r}: must be a non-empty string")
        if not isinstance(prefix, str):
            raise InvalidInputError(f"prefix={prefix!r}: must be a string ('' for none)")
        v.integer("truncate_dim", truncate_dim, optional=True, error=InvalidInputError)
        if not isinstance(text, str):
            raise InvalidInputError(f"text={text!r}: must be a string")
        text_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
        # JSON keeps the fields unambiguous whatever characters the prefix holds.
        payload = json.dumps(
            [CACHE_FORMAT_VERSION, model_id, prefix, truncate_dim, bool(normalize), text_hash],
            ensure_ascii=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode("ascii")).hexdigest()

    # -- reads and writes -------------------------------------------------------------

    def get_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """Vectors stored under `keys`; keys not in the cache are absent from the result."""
        unique = list(dict.fromkeys(keys))
        found: dict[str, np.ndarray] = {}
        if not unique:
            return found
        conn = self._conn()
        try:
            for start in range(0, len(unique), _SELECT_BATCH):
                batch = unique[start : start + _SELECT_BATCH]
                marks = ",".join("?" * len(batch))
                rows = conn.execute(
                    f"SELECT key, dim, vector FROM embeddings WHERE key IN ({marks})", batch
                ).fetchall()
                for key, dim, blob in rows:
                    if len(blob) != dim * _DTYPE.itemsize:
                        raise StoreError(
                            f"embedding cache {str(self.path)!r}: entry {key} holds "
                            f"{len(blob)} bytes for dim={dim}; the file is corrupt, delete it"
                        )
                    found[key] = np.frombuffer(blob, dtype=_DTYPE).astype(np.float32, copy=True)
        except sqlite3.Error as exc:
            raise self._store_error("read", exc) from exc
        return found

    def put_many(self, items: Mapping[str, np.ndarray]) -> None:
        """Store vectors (1-D, finite, cast to float32) in one transaction, replacing old ones."""
        rows: list[tuple[str, int, bytes]] = []
        for key, vec in items.items():
            if not isinstance(key, str) or not key:
                raise InvalidInputError(
                    f"put_many key {key!r}: must be a non-empty string from key_for()"
                )
            arr = np.asarray(vec)
            if arr.ndim != 1 or arr.size == 0:
                raise InvalidInputError(
                    f"put_many[{key!r}] has shape {arr.shape}; store one 1-D vector per key"
                )
            if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
                raise InvalidInputError(
                    f"put_many[{key!r}] has dtype {arr.dtype}; give a float vector"
                )
            arr = arr.astype(_DTYPE, copy=False)
            if not np.isfinite(arr).all():
                raise InvalidInputError(
                    f"put_many[{key!r}] contains NaN or inf; refusing to cache a broken vector"
                )
            rows.append((key, int(arr.shape[0]), np.ascontiguousarray(arr).tobytes()))
        if not rows:
            return
        conn = self._conn()
        try:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    "INSERT INTO embeddings(key, dim, vector) VALUES (?, ?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET dim = excluded.dim, vector = excluded.vector",
                    rows,
                )
        except sqlite3.Error as exc:
            raise self._store_error("write", exc) from exc

    def __len__(self) -> int:
        try:
            (count,) = self._conn().execute("SELECT COUNT(*) FROM embeddings").fetchone()
        except sqlite3.Error as exc:
            raise self._store_error("count", exc) from exc
        return int(count)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        try:
            row = self._conn().execute("SELECT 1 FROM embeddings WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            raise self._store_error("read", exc) from exc
        return row is not None

    # -- lifecycle --------------------------------------------------------------------

    def close(self) -> None:
        """Close every connection this object opened; later calls raise StoreError."""
        with self._lock:
            self._closed = True
            conns, self._connections = self._connections, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:  # closing is best effort; the file stays consistent
                logger.debug("error closing a cache connection", exc_info=True)

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddingCache(path={str(self.path)!r})"

    # -- internals --------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection; a new one after fork (SQLite handles must not cross it)."""
        if self._closed:
            raise StoreError(f"embedding cache {str(self.path)!r} is closed; open a new one")
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        try:
            # isolation_level=None: transactions are opened explicitly (BEGIN IMMEDIATE).
            # check_same_thread=False only so close() can close every thread's handle;
            # each connection is otherwise used by the thread that opened it.
            conn = sqlite3.connect(
                str(self.path),
                timeout=self._timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise self._store_error("open", exc) from exc
        with self._lock:
            if self._closed:
                conn.close()
                raise StoreError(f"embedding cache {str(self.path)!r} is closed; open a new one")
            self._connections.append(conn)
        self._local.conn = conn
        self._local.pid = os.getpid()
        return conn

    def _store_error(self, action: str, exc: sqlite3.Error) -> StoreError:
        return StoreError(
            f"embedding cache {str(self.path)!r}: cannot {action} ({exc}); check that the "
            "path is a writable file on a local disk, or pass another path"
        )
