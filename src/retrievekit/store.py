"""The Chroma store: the truth (ids, texts, metadata, vectors) and the recorded settings.

Embedded `PersistentClient(path)` by default, `EphemeralClient` for in-memory use, or
`HttpClient(host, port)` for a Chroma server. Cosine space set explicitly, vectors always
passed in, writes batched by `get_max_batch_size()`.

A record's text is a metadata string (`TEXT_KEY`), not a Chroma document: Chroma indexes
every document in an SQLite full-text (trigram) table that nothing here queries, and that
table was ~44% of a build's writes (docs/design.md, "Where the design stops"). Stores of
format 2 keep their texts as documents (`texts_in_metadata` False); reads take either.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import re
import shutil
import traceback
import uuid
import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from . import validate as v
from .errors import (ConfigError, InvalidInputError, RetrieveKitError, StoreError,
                     StoreFullError, StoreLockedError)
from .records import PARENT_KEY, RESERVED_PREFIX, TEXT_KEY, parent_of

logger = logging.getLogger(__name__)

_SETTINGS_KEY = "rk_settings"
_OLD_MARKER_KEY = "rk_marker"  # format 1's change marker, dropped on migration
#: records one `get` reads with their metadata, at most (Chroma 1.5.9's SQLite fails past
#: 32,766: "too many SQL variables"); the change log reads its entries in such pages too
READ_PAGE = 10_000
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,510}[a-zA-Z0-9]$")
HNSW_M_MAX = 10_000


def _check_host(host: str) -> None:
    """A host name or address alone: chromadb builds its URL from host, port and ssl, so a
    scheme, port or path in the host makes a URL that fails in httpx, not here."""
    if "://" in host:
        v.fail("store.host", "a host name or address without a scheme", host,
               f"use {host.split('://', 1)[1].split('/')[0]!r}, with store.ssl = true for "
               "https")
    if any(c in host for c in "/@?#") or host != host.strip() or " " in host:
        v.fail("store.host", "a host name or address alone (no path, user or spaces)", host)
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        if host.count(":") == 1:
            name, port = host.split(":")
            v.fail("store.host", "a host name or address without a port", host,
                   f"use host {name!r} and port {port}")
        v.fail("store.host", "an IPv6 address in brackets", host, f"use '[{host}]'")


@dataclass(frozen=True)
class StoreConfig:
    """Where the vectors live and how they are indexed.

    Args:
        path: directory of the embedded store, or ":memory:" for an in-memory one.
        host, port, ssl: a Chroma server (then `path` is not used for Chroma itself).
        auth_token: a token for a server started with token authentication.
        collection: the Chroma collection name (3-512 chars of [a-zA-Z0-9._-]).
        hnsw_m, hnsw_ef_construction, hnsw_ef_search: HNSW graph settings of a new
            collection (an existing one keeps those it was made with). The defaults keep
            recall@50 >= 0.98 against exact search on real vectors in every measured run
            (docs/benchmarks.md, "HNSW settings by measured recall"); Chroma's own (M=16,
            ef 100/100) lose 4.5% of the true top 50.
        replica_dir: server clients only: a local directory where this client keeps its BM25
            index (and funnel vectors), so that a restart catches up from the change log
            instead of reading the whole collection. One client process per directory.
        timeout: server clients: seconds to wait for each request to the server (to
            connect, and between bytes of its answer) before the call fails with a
            `StoreError`; None waits forever, as chromadb's client does by itself.
        private: make the store directory (or a server client's replica_dir) 0o700 on
            every open: the files inside, Chroma's own included, are then out of other
            users' reach whatever the umask gave them (docs/reliability.md, "File
            permissions").
    """

    path: str = ".retrievekit"
    host: str | None = None
    port: int = 8000
    ssl: bool = False
    auth_token: str | None = None
    collection: str = "retrievekit"
    hnsw_m: int = 16
    hnsw_ef_construction: int = 100
    hnsw_ef_search: int = 400
    replica_dir: str | None = None
    timeout: float | None = 60.0
    private: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.collection, str) or not _NAME_RE.match(self.collection) \
                or ".." in self.collection:
            v.fail("store.collection", "3-512 characters of letters, digits, '.', '_' or "
                   "'-', starting and ending with a letter or digit", self.collection)
        object.__setattr__(self, "path", v.path("store.path", self.path,
                                                fix="e.g. '.retrievekit' or ':memory:'"))
        v.text("store.host", self.host, optional=True, empty=False,
               fix="e.g. 'localhost', or None for an embedded store")
        if self.host is not None:
            _check_host(self.host)
        v.integer("store.port", self.port, 1, 65535, fix="Chroma's default is 8000")
        v.boolean("store.ssl", self.ssl)
        # M=1 builds a graph that finds almost nothing; past 10,000 hnswlib warns of harm and
        # each record's links take 8*M bytes (Chroma then fails every add on allocation)
        v.integer("store.hnsw_m", self.hnsw_m, 2, HNSW_M_MAX, fix="16-64 is usual")
        for name in ("hnsw_ef_construction", "hnsw_ef_search"):  # Chroma stores a u64
            v.integer(f"store.{name}", getattr(self, name), 1, 2 ** 64 - 1,
                      fix="100-400 is usual")
        replica = v.path("store.replica_dir", self.replica_dir, optional=True)
        if replica is not None and self.host is None:
            v.fail("store.replica_dir", "None for an embedded store (it keeps its BM25 index "
                   "beside Chroma)", replica, "set store.host for a server client, or drop it")
        object.__setattr__(self, "replica_dir", replica)
        token = self.auth_token
        if token is not None and (not isinstance(token, str) or not token
                                  or not all(33 <= ord(c) <= 126 for c in token)):
            # the value is a secret: never echo it
            raise ConfigError(
                "store.auth_token must be a non-empty str of printable ASCII without spaces "
                "(it travels in an HTTP header); the value given is not shown")
        v.number("store.timeout", self.timeout, 0, low_open=True, optional=True,
                 fix="seconds, e.g. 60; None waits forever")
        v.boolean("store.private", self.private)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["auth_token"] = None  # never written out with the config
        return d

    @property
    def is_server(self) -> bool:
        return self.host is not None

    @property
    def is_memory(self) -> bool:
        return self.host is None and self.path == ":memory:"

    def __repr__(self) -> str:  # keep the token out of logs and tracebacks
        d = asdict(self)
        if d["auth_token"]:
            d["auth_token"] = "***"
        return "StoreConfig(" + ", ".join(f"{k}={x!r}" for k, x in d.items()) + ")"


_INT64 = (-(2 ** 63), 2 ** 63 - 1)


def _check_scalar(value: Any, where: str) -> None:
    """Refuse the scalars Chroma stores but cannot index: NaN/inf, ints outside 64 bits,
    strs that are not valid Unicode."""
    if isinstance(value, str):
        v.utf8(where, value, error=InvalidInputError)
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInputError(
            f"{where} is {value!r}; Chroma's index cannot hold NaN or inf (the store would "
            "fail on every later write): use a finite number or drop the key")
    if v.is_int(value) and not _INT64[0] <= value <= _INT64[1]:
        raise InvalidInputError(
            f"{where} is {value}, outside the 64-bit integers Chroma stores; store it as a "
            "str or a float")


def clean_metadata(metadata: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """Validate user metadata for Chroma: flat str/int/float/bool values (or non-empty lists
    of one of those types); None values are dropped. Everything Chroma would refuse or choke
    on later (NaN/inf, ints past 64 bits, reserved keys) raises InvalidInputError."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidInputError(f"{where}.metadata must be a dict, got {type(metadata).__name__}")
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        v.text(f"{where}.metadata keys", key, empty=False, error=InvalidInputError)
        if key.startswith((RESERVED_PREFIX, "$", "#", "chroma:")):
            raise InvalidInputError(
                f"{where}.metadata key {key!r} uses a reserved prefix ({RESERVED_PREFIX!r}, "
                "'$', '#' and 'chroma:' belong to retrievekit and Chroma); rename it")
        name = f"{where}.metadata[{key!r}]"
        if value is None:
            continue
        if isinstance(value, (str, bool, int, float)):
            _check_scalar(value, name)
            out[key] = _as_held(value)
        elif isinstance(value, (list, tuple)):
            if not value:
                raise InvalidInputError(
                    f"{name} is an empty list, which Chroma rejects; "
                    "drop the key or give at least one value")
            kinds = {type(x) for x in value}
            if len(kinds) != 1 or not kinds <= {str, int, float, bool}:
                raise InvalidInputError(
                    f"{name} must be a list of one scalar type "
                    f"(str, int, float or bool), got {value!r:.200}")
            for i, x in enumerate(value):
                _check_scalar(x, f"{name}[{i}]")
            out[key] = [_as_held(x) for x in value]
        else:
            raise InvalidInputError(
                f"{name} has type {type(value).__name__}; Chroma takes "
                "str, int, float, bool or a list of one of those. Flatten nested dicts "
                "(e.g. 'author.name') or json.dumps the value")
    return out


def _as_held(value: Any) -> Any:
    """A metadata value as Chroma holds and returns it: a float subclass (numpy's) as a
    float, -0.0 as 0.0; so that a document read back and added again is unchanged."""
    if isinstance(value, float):
        return float(value) + 0.0
    return value


#: directory -> (the store holding its lock in this process, where that store was opened):
#: so a second open in the same process can say what holds the directory
_HOLDERS: dict[str, tuple[weakref.ref, str]] = {}


def _caller_site() -> str:
    """The innermost frame outside retrievekit and installed libraries, as file:line."""
    package = str(Path(__file__).parent)
    for frame in reversed(traceback.extract_stack()[:-1]):
        if not frame.filename.startswith(package) and "site-packages" not in frame.filename:
            return f"{frame.filename}:{frame.lineno}"
    return "an unknown place"


#: below this much free space a failure of an embedded store is put down to a full disk
_LOW_DISK = 64 * 2 ** 20


def _is_chroma_failure(exc: BaseException) -> bool:
    """Errors of Chroma, its HTTP client or the file system, as opposed to our own bugs.
    The HTTP client raises a bare `Exception` for an error status without a Chroma body
    (e.g. a 401 from a proxy)."""
    import httpx
    from chromadb.errors import ChromaError

    return isinstance(exc, (ChromaError, httpx.HTTPError, OSError)) or type(exc) is Exception


def explain_failure(config: StoreConfig, what: str, exc: BaseException) -> str:
    """What failed, why it most likely did, and what to do about it."""
    import httpx
    from chromadb.errors import AuthorizationError, ChromaAuthError

    detail = f"{type(exc).__name__}: {v.shown(str(exc), 200)}"
    if config.is_server:
        where = f"the Chroma server at {config.host}:{config.port}"
        if isinstance(exc, (ChromaAuthError, AuthorizationError)) \
                or any(code in str(exc) for code in ("401", "403", "Unauthorized")):
            return (f"{where} refused the credentials while trying to {what} ({detail}); "
                    "check store.auth_token")
        if isinstance(exc, httpx.TimeoutException):
            return (f"{where} did not answer within store.timeout = {config.timeout:g} s "
                    f"while trying to {what} ({detail}); check that it is running and not "
                    "overloaded, or raise store.timeout (writes are idempotent: repeat the "
                    "whole call)")
        if isinstance(exc, httpx.TransportError):
            return (f"lost the connection to {where} while trying to {what} ({detail}); "
                    "retry once the server is back (writes are idempotent: repeat the "
                    "whole call)")
        return f"{where} failed to {what} ({detail}); check the server's log"
    where = "the in-memory store" if config.is_memory else f"the store at {config.path!r}"
    full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    if not config.is_memory and not full:
        try:
            full = shutil.disk_usage(Path(config.path).expanduser()).free < _LOW_DISK
        except OSError:
            pass
    if full:
        return (f"{where} could not {what}: the disk is full ({detail}); free some space, "
                "then repeat the call (writes are idempotent)")
    return (f"{where} could not {what} ({detail}); if it persists, restore the store "
            "directory from a backup")


def _set_timeout(client: Any, timeout: float | None) -> None:
    """Give a chromadb HttpClient's connection pool `timeout`: chromadb 1.5.9 makes it with
    none and has no setting for it (a stopped server would hang every call). It reaches
    into the client's private `_server._session`; a chromadb without them keeps its own."""
    import httpx

    session = getattr(getattr(client, "_server", None), "_session", None)
    if isinstance(session, httpx.Client):
        session.timeout = httpx.Timeout(timeout)


def _forget_failed_system(identifier: str) -> None:
    """Chroma caches a client's System per directory before starting it; when the start
    fails, the broken System stays cached and every later client of that directory fails
    with AttributeError ('RustBindingsAPI' object has no attribute 'bindings'). Drop it when
    no client holds it, so that a retry in this process starts afresh."""
    from chromadb.api.shared_system_client import SharedSystemClient

    if SharedSystemClient._identifier_to_refcount.get(identifier, 0) <= 0:
        SharedSystemClient._identifier_to_system.pop(identifier, None)


def damaged_vectors(exc: BaseException) -> bool:
    """Whether Chroma failed because a collection's HNSW graph is unreadable (its id map
    truncated, its files unloadable, a record missing from it), as opposed to a failure
    that says nothing about the graph (a locked or full disk)."""
    text = str(exc).lower()
    return any(sign in text for sign in ("hnsw", "pickle", "error finding id"))


@contextmanager
def chroma_errors(config: StoreConfig, what: str) -> Iterator[None]:
    """Turn a failure of Chroma into a StoreError that says what failed (the original is
    its __cause__); retrievekit's own errors and our bugs pass through."""
    try:
        yield
    except RetrieveKitError:
        raise
    except Exception as exc:
        if not _is_chroma_failure(exc) or getattr(exc, "retrievekit_caller", False):
            raise  # our bug, or the caller's own iterable failing
        if "too many SQL variables" in str(exc):  # the request, not the store
            raise InvalidInputError(
                f"Chroma could not {what}: the request holds more values than its SQLite "
                "binds at once. Most likely a where filter with long $in/$nin lists that "
                "Chroma evaluates (Chroma 1.5.9 takes ~16,000 values in all; the BM25 index "
                "evaluates longer ones unless an operand is past 2**53): split the search, "
                "or filter by a coarser key") from exc
        message = explain_failure(config, what, exc)
        kind = StoreFullError if "the disk is full" in message else StoreError
        raise kind(message) from exc


class ChromaStore:
    """One Chroma collection plus the settings recorded in its metadata."""

    def __init__(self, config: StoreConfig | None = None, *, create: bool = True) -> None:
        """Args:
            create: make the directory and the collection when missing; with False, a
                missing store is a `StoreError` and nothing is written (reads, `open`)."""
        self.config = config or StoreConfig()
        #: where records keep their text: a metadata string (format 3), or Chroma's
        #: document (stores of format 2; `settings.reconcile` sets it from the record)
        self.texts_in_metadata = True
        self._lock_file = None
        self._create = create
        #: the directory this store made (removed again by `discard` after a failed setup)
        self.created_dir: Path | None = None
        self.client = None
        try:
            self.client = self._make_client()
            self.collection = self._open_collection()
        except BaseException:
            self.discard()
            raise

    # -- connection ------------------------------------------------------------------------
    def _settings(self):
        from chromadb.config import Settings

        kwargs: dict[str, Any] = {"anonymized_telemetry": False}
        if self.config.auth_token:
            kwargs["chroma_client_auth_provider"] = \
                "chromadb.auth.token_authn.TokenAuthClientProvider"
            kwargs["chroma_client_auth_credentials"] = self.config.auth_token
        return Settings(**kwargs)

    def _make_client(self):
        import chromadb

        cfg = self.config
        if cfg.is_server:
            try:
                self._heartbeat()  # chromadb's own first requests would wait forever
                client = chromadb.HttpClient(host=cfg.host, port=cfg.port, ssl=cfg.ssl,
                                             settings=self._settings())
                _set_timeout(client, cfg.timeout)
            except Exception as exc:
                if isinstance(exc, RetrieveKitError):
                    raise
                status = self._refused_status()
                if status is not None:
                    fix = "check store.auth_token" if cfg.auth_token else \
                        "it wants a token: set store.auth_token"
                    raise StoreError(
                        f"the Chroma server at {cfg.host}:{cfg.port} refused the credentials "
                        f"(HTTP {status}); {fix}") from exc
                raise StoreError(
                    f"could not reach the Chroma server at {cfg.host}:{cfg.port} "
                    f"({type(exc).__name__}: {str(exc)[:200]}); start it with "
                    f"`chroma run --host {cfg.host} --port {cfg.port}` or fix store.host/port"
                    f"; if it is running, check store.ssl (now {cfg.ssl}: https against a "
                    "plain server, or the reverse, fails this way)") from exc
            if self.local_dir is not None:
                self.local_dir.mkdir(parents=True, exist_ok=True)
                if cfg.private:
                    Path(cfg.replica_dir).expanduser().chmod(0o700)
                self._acquire_lock(self.local_dir)
            return client
        if cfg.is_memory:
            with self._guard("open its database"):
                return chromadb.EphemeralClient(settings=self._settings())
        path = Path(cfg.path).expanduser()
        if not (path / "chroma.sqlite3").is_file():
            derived = path / "retrievekit"
            if derived.is_dir() and any(derived.iterdir()):
                raise StoreError(
                    f"the store at store.path={str(path)!r} has lost Chroma's database "
                    f"(chroma.sqlite3 is missing, while retrievekit's derived indexes in "
                    f"{str(derived)!r} are there): the texts and vectors are gone from it. "
                    "Restore the directory from a backup; to start afresh, delete it")
            if not self._create:
                raise StoreError(f"no retrievekit store at store.path={str(path)!r} (no "
                                 "chroma.sqlite3 there); check the path, or create one with "
                                 "HybridRetriever(path=...)")
        try:
            if not path.exists():
                self.created_dir = path
            path.mkdir(parents=True, exist_ok=True)
            if cfg.private:
                path.chmod(0o700)
            probe = path / f".write-probe-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StoreError(
                f"store.path={str(path)!r} is not a writable directory ({exc.strerror}); "
                "choose another path or fix its permissions") from exc
        self._acquire_lock(path)
        try:
            return self._embedded_client()
        except BaseException:
            self._release_lock()
            raise

    def _embedded_client(self):
        import chromadb

        path = str(Path(self.config.path).expanduser())
        try:
            with self._guard("open its database"):
                return chromadb.PersistentClient(path=path, settings=self._settings())
        except BaseException:
            _forget_failed_system(path)
            raise

    def _url(self, route: str) -> str:
        cfg = self.config
        return f"{'https' if cfg.ssl else 'http'}://{cfg.host}:{cfg.port}/api/v2/{route}"

    def _auth_headers(self) -> dict[str, str]:
        token = self.config.auth_token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _heartbeat(self) -> None:
        """Ask the server for its heartbeat within store.timeout."""
        import httpx

        try:
            httpx.get(self._url("heartbeat"), headers=self._auth_headers(),
                      timeout=self.config.timeout).raise_for_status()
        except httpx.TimeoutException as exc:
            raise StoreError(explain_failure(self.config, "answer its heartbeat", exc)) \
                from exc

    def _refused_status(self) -> int | None:
        """401 or 403 when the server (or a proxy in front of it) refuses our credentials."""
        import httpx

        try:
            status = httpx.get(self._url("auth/identity"), headers=self._auth_headers(),
                               timeout=10).status_code
        except httpx.HTTPError:
            return None
        return status if status in (401, 403) else None

    def _acquire_lock(self, path: Path) -> None:
        from filelock import FileLock, Timeout

        lock = FileLock(str(path / "retrievekit.lock"))
        key = str(path.resolve())
        try:
            lock.acquire(timeout=0)
        except Timeout as exc:
            holder = _HOLDERS.get(key)
            store = holder[0]() if holder is not None else None
            site = holder[1] if store is not None and store._lock_file is not None else None
            if site is not None:
                raise StoreLockedError(
                    f"the store at {str(path)!r} is already open in this process, by the "
                    f"retriever opened at {site}; close that one first (`.close()`, or open "
                    "it in a `with` block), or keep using it") from exc
            if self.config.is_server:
                raise StoreLockedError(
                    f"store.replica_dir {str(path)!r} is in use by another process; give each "
                    "client process its own replica_dir") from exc
            raise StoreLockedError(
                f"the store at {str(path)!r} is open for writing in another process; close "
                "it there, or serve the store with `chroma run --path ...` and connect every "
                "process with store.host/port") from exc
        self._lock_file = lock
        _HOLDERS[key] = (weakref.ref(self), _caller_site())

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.release()
            self._lock_file = None
            for key, (ref, _) in list(_HOLDERS.items()):
                if ref() is self:
                    del _HOLDERS[key]

    def _open_collection(self):
        cfg = self.config
        configuration = {"hnsw": {"space": "cosine", "max_neighbors": cfg.hnsw_m,
                                  "ef_construction": cfg.hnsw_ef_construction,
                                  "ef_search": cfg.hnsw_ef_search}}
        try:
            if not self._create:
                return self.client.get_collection(cfg.collection, embedding_function=None)
            return self.client.get_or_create_collection(
                cfg.collection, configuration=configuration, embedding_function=None)
        except Exception as exc:
            if not self._create:
                raise StoreError(f"no collection {cfg.collection!r} in the store; check "
                                 "store.collection (`retrievekit info` lists the store's "
                                 "settings)") from exc
            raise StoreError(f"could not open collection {cfg.collection!r}: {exc}") from exc

    def discard(self) -> None:
        """Close, and remove the directory this store created (after a failed setup)."""
        self.close()
        if self.created_dir is not None:
            import shutil

            shutil.rmtree(self.created_dir, ignore_errors=True)
            self.created_dir = None

    def close(self) -> None:
        client, self.client = self.client, None
        self.collection = None
        if client is not None and not self.config.is_memory:
            # Stop this client's Chroma System: an HttpClient holds its own connection pool,
            # and an embedded one, if kept, would serve a stale HNSW index to a later reopen
            # in this process after another process has written to the directory.
            try:
                client.close()
            except Exception as exc:  # closing must not fail a caller's cleanup
                logger.debug("closing the Chroma client failed: %s", exc)
        self._release_lock()  # last: no other process may open while our client is open

    @property
    def local_dir(self) -> Path | None:
        """Where derived state is kept: beside an embedded store, or in a server client's
        `replica_dir`; None for in-memory state."""
        cfg = self.config
        if cfg.is_server:
            if cfg.replica_dir is None:
                return None
            return Path(cfg.replica_dir).expanduser() / f"{cfg.host}-{cfg.port}" / cfg.collection
        if cfg.is_memory:
            return None
        return Path(cfg.path).expanduser() / "retrievekit" / cfg.collection

    # -- recorded settings ---------------------------------------------------------------
    def _guard(self, what: str):
        return chroma_errors(self.config, what)

    def _metadata(self) -> dict[str, Any]:
        with self._guard("read the collection's metadata"):
            if self.config.is_server:  # another client may have changed it
                self.collection = self.client.get_collection(self.config.collection,
                                                             embedding_function=None)
            return dict(self.collection.metadata or {})

    def read_settings(self) -> dict[str, Any] | None:
        raw = self._metadata().get(_SETTINGS_KEY)
        if not raw:
            return None
        try:
            settings = json.loads(raw)
        except (TypeError, ValueError) as exc:
            settings = exc
        if not isinstance(settings, dict):
            raise StoreError(f"the settings recorded in collection {self.config.collection!r} "
                             f"are damaged ({v.shown(raw)}); restore the store from a backup")
        return settings

    def write_settings(self, settings: Mapping[str, Any]) -> None:
        meta = {k: x for k, x in self._metadata().items() if k != _OLD_MARKER_KEY}
        meta[_SETTINGS_KEY] = json.dumps(settings, sort_keys=True)
        with self._guard("record its settings"):
            self.collection.modify(metadata=meta)

    # -- records ---------------------------------------------------------------------------
    @property
    def max_batch(self) -> int:
        try:
            return int(self.client.get_max_batch_size())
        except Exception:  # older servers
            return 5000

    def count(self) -> int:
        """Records held, dead ones included (see `records.py`)."""
        with self._guard("count its records"):
            return int(self.collection.count())

    def write(self, groups: Sequence[tuple[Sequence[str], np.ndarray, Sequence[str],
                                           Sequence[Mapping[str, Any]]]]) -> None:
        """Upsert groups of records (ids, vectors, texts, metadatas); a group (all records of
        one document) is never split across Chroma calls, so each document lands whole."""
        step = self.max_batch
        batch: list[tuple] = []
        size = 0
        for group in groups:
            if batch and size + len(group[0]) > step:
                self._upsert(batch)
                batch, size = [], 0
            batch.append(group)
            size += len(group[0])
        if batch:
            self._upsert(batch)

    def _upsert(self, groups: list[tuple]) -> None:
        ids = [i for g in groups for i in g[0]]
        vectors = np.concatenate([np.asarray(g[1], dtype=np.float32) for g in groups])
        texts = [t for g in groups for t in g[2]]
        metas = [dict(m) for g in groups for m in g[3]]
        extra: dict[str, Any] = {}
        if self.texts_in_metadata:
            for meta, text in zip(metas, texts):
                meta[TEXT_KEY] = text
        else:
            extra["documents"] = texts
        with self._guard(f"write {len(ids)} records"):
            self.collection.upsert(ids=ids, embeddings=vectors, metadatas=metas, **extra)

    def delete(self, ids: Sequence[str]) -> None:
        step = self.max_batch
        for s in range(0, len(ids), step):
            with self._guard(f"delete {len(ids[s:s + step])} records"):
                self.collection.delete(ids=list(ids[s:s + step]))

    def get(self, ids: Sequence[str] | None = None, where: Mapping[str, Any] | None = None,
            include: Sequence[str] = ("documents", "metadatas")) -> dict[str, Any]:
        with self._guard("read records"):
            return read_lifted(self.collection, include,
                               ids=list(ids) if ids is not None else None,
                               where=dict(where) if where else None)

    def unit_vectors(self, ids: Sequence[str], dim: int) -> tuple[list[str], np.ndarray]:
        """The vectors of those of `ids` that Chroma holds, L2-normalized (cosine by dot
        product): their ids and a float32 matrix of `dim` columns, one row each (none for
        ids deleted since the caller read them). Read 250 at a time: a get
        by ids costs ~20 us a vector in pages of 100-500, 130 us in pages of 5,000 (at 120k
        records)."""
        found: list[str] = []
        rows: list[np.ndarray] = []
        for got, matrix in self._vector_pages(ids):
            found.extend(got)
            rows.append(matrix.reshape(-1, dim))
        return found, unit_rows(np.concatenate(rows) if rows else np.zeros((0, dim), np.float32))

    def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Record id -> vector as Chroma holds it, for those of `ids` it holds."""
        return {rid: row for got, matrix in self._vector_pages(ids)
                for rid, row in zip(got, matrix)}

    def _vector_pages(self, ids: Sequence[str]) -> Iterator[tuple[list[str], np.ndarray]]:
        for s in range(0, len(ids), 250):
            got = self.get(ids=list(ids[s:s + 250]), include=["embeddings"])
            yield got["ids"], np.asarray(got["embeddings"], dtype=np.float32)

    def of_parents(self, parents: Sequence[str], include: Sequence[str] = ("documents",
                                                                           "metadatas")
                   ) -> dict[str, list]:
        """Every record (dead ones too) of these documents. Each document is read whole in
        one `get` by its parent key, so it comes back in one version, old or new (a write
        replaces a document in one upsert): listing its ids first and reading them after
        could meet a write in between and return a new version cut to the old one's
        chunks. Documents go by 1,000 and, when `include` asks for more than ids, in
        groups of at most `READ_PAGE` records, counted first (one `get` cannot read more
        than ~32k records with their metadata)."""
        out: dict[str, list] = {"ids": [], **{k: [] for k in include}}
        parents = list(dict.fromkeys(parents))
        for s in range(0, len(parents), 1000):
            group = parents[s:s + 1000]
            ids = self.get(where={PARENT_KEY: {"$in": group}}, include=[])["ids"]
            if not include:
                out["ids"].extend(ids)
                continue
            sizes = Counter(parent_of(rid) for rid in ids)
            for part in _parts([p for p in group if p in sizes], sizes, READ_PAGE):
                got = self.get(where={PARENT_KEY: {"$in": part}}, include=include)
                for key in out:
                    out[key].extend(got[key])
        return out

    def iter_records(self, include: Sequence[str] = ("documents", "metadatas"),
                     page: int = 5000, where: Mapping[str, Any] | None = None
                     ) -> Iterator[dict[str, Any]]:
        """All records in pages (ids plus `include`)."""
        offset = 0
        while True:
            with self._guard("read records"):
                batch = read_lifted(self.collection, include, limit=page, offset=offset,
                                    where=dict(where) if where else None)
            if not batch["ids"]:
                return
            yield batch
            offset += len(batch["ids"])

    def vector_problem(self, sample: int = 3) -> str | None:
        """What is wrong with this collection's vector index, or None. Queries the oldest few
        stored vectors for themselves: each must be found (or a copy of it). Chroma serves a
        collection whose HNSW folder was lost as if it were nearly empty; this notices it at
        the cost of a few reads. A Chroma failure that names the graph (`damaged_vectors`)
        is reported too; any other is raised.
        """
        try:
            with self._guard("read records"):
                ids = self.collection.get(limit=sample, include=[])["ids"]
                for rid in ids:
                    got = self.collection.get(ids=[rid], include=["embeddings"])
                    # ten, not one: a small ef_search may stop a greedy search just short of it
                    found = self.query(np.asarray(got["embeddings"][0]), 10)
                    if not found or found[0][1] < 0.99:
                        return (f"a query for the stored vector of record {rid!r} does not "
                                f"find it (best: {found[:1]}), so dense search would "
                                "silently miss records")
        except StoreError as exc:
            if not damaged_vectors(exc.__cause__ or exc):
                raise
            return str(exc.__cause__ or exc)
        return None

    def check_vectors(self) -> None:
        """Raise a StoreError when `vector_problem` finds one (a server's index, which this
        client cannot rebuild: `hnsw_repair` does that for an embedded store)."""
        problem = self.vector_problem()
        if problem is not None:
            raise StoreError(
                f"the vector index of collection {self.config.collection!r} is damaged or "
                f"missing: {v.shown(problem, 300)}; restore the store directory from a "
                "backup, or index the documents again")

    def vector_folder(self, collection_id: str) -> Path | None:
        """The folder of Chroma's HNSW segment of a collection of this embedded store (named
        by Chroma's `segments` table, read-only), or None when Chroma has not made one."""
        import sqlite3

        if self.config.is_server or self.config.is_memory:
            return None
        path = Path(self.config.path).expanduser()
        db = sqlite3.connect(f"file:{path / 'chroma.sqlite3'}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT id FROM segments WHERE collection = ? AND scope = "
                              "'VECTOR'", (collection_id,)).fetchall()
        finally:
            db.close()
        return next((path / r[0] for r in rows if (path / r[0]).is_dir()), None)

    def drop_vector_folders(self, folders: Sequence[Path]) -> None:
        """Delete HNSW folders of this embedded store with Chroma stopped, then start it again
        (this store keeps its lock throughout): Chroma then starts those graphs empty and
        replays its log past the last persisted write. Only `hnsw_repair` calls this."""
        self.client.close()
        self.client = self.collection = None
        for folder in folders:
            shutil.rmtree(folder)
        self.client = self._embedded_client()
        self.collection = self._open_collection()

    def query(self, vector: np.ndarray, n: int) -> list[tuple[str, float]]:
        """Nearest records by cosine similarity: [(id, similarity)], best first. Unfiltered:
        Chroma 1.5.9's filtered query can miss matching records (docs/reliability.md), so
        a filter is applied by the caller (searcher.py)."""
        if n <= 0:
            return []
        with self._guard("run a nearest-neighbour query"):
            res = self.collection.query(
                query_embeddings=[np.asarray(vector, dtype=np.float32)], n_results=n,
                include=["distances"])
        # Chroma's cosine space returns 1 - cos; turned back into similarity here only.
        return [(i, 1.0 - float(d)) for i, d in zip(res["ids"][0], res["distances"][0])]


def read_lifted(collection: Any, include: Sequence[str], **kwargs: Any) -> dict[str, Any]:
    """`collection.get(include=include, **kwargs)` with the texts as documents: each
    record's `TEXT_KEY` moved out of its metadata into `documents`, unless the record has a
    document (a format-2 store writes its texts there; a `TEXT_KEY` beside it would be
    stale)."""
    ask = list(include)
    if "documents" in ask and "metadatas" not in ask:
        ask.append("metadatas")  # a format-3 text is in the metadata
    got = collection.get(include=ask, **kwargs)
    metas = got.get("metadatas")
    if metas is None:
        return got
    texts = got.get("documents") or [None] * len(metas)
    for i, meta in enumerate(metas):
        if meta and TEXT_KEY in meta:
            text = meta.pop(TEXT_KEY)
            if texts[i] is None:
                texts[i] = text
    if "documents" in include:
        got["documents"] = texts
    if "metadatas" not in include:
        got["metadatas"] = None
    return got


def _parts(parents: list[str], sizes: Mapping[str, int], limit: int) -> Iterator[list[str]]:
    """`parents` in consecutive groups of at most `limit` records (`sizes`: records per
    document), a document never split."""
    part: list[str] = []
    total = 0
    for p in parents:
        if part and total + sizes[p] > limit:
            yield part
            part, total = [], 0
        part.append(p)
        total += sizes[p]
    if part:
        yield part


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """`matrix` with each row L2-normalized (cosine by dot product), as a new array."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)
