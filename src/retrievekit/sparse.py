"""The BM25 side: a durable, incremental sparse index derived from the records in Chroma.

Built on tantivy (segments, delete by term, atomic commits, memory-mapped files): a write of
d documents costs O(d) plus tantivy's amortized segment merges, a search never waits for a
rebuild, and opening an index rebuilds nothing. Terms come from the project's own tokenizer
(`tokenize.py`), fed to tantivy pre-tokenized, so every tokenizer setting means what it did.
docs/design.md says why tantivy and not a segmented bm25s (measured).

Each indexed record has its id (stored), its parent document id (to replace or delete a
document by one term), its terms (frequencies only, no positions) and a stored copy of its
text and metadata as Chroma holds them: the hits of a search are read from that copy, in
tantivy's memory-mapped store, instead of a `get` from Chroma (~1.9 ms a query at 100k
records, docs/benchmarks.md, Scale). With `keep_vectors`, the vector Chroma holds is stored
with them: the exact scan of a selective filter reads its records' vectors here (~10 us a
record) rather than from Chroma (~45 us: docs/benchmarks.md, Filters). The log watermark
the index has caught up to is written beside it after each commit; a crash between the two only makes the next catch-up re-apply
entries, which is idempotent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, Sequence

import numpy as np

from . import validate as v
from .errors import ConfigError, MissingDependencyError
from .filters import compile_where, metadata_terms
from .persist import write_json
from .records import Record
from .subsets import Filter, Subset, Subsets
from .tokenize import TOKENIZER_VERSION, Tokenizer, TokenizerConfig

logger = logging.getLogger(__name__)

#: 3: user metadata indexed for filters (filters.py); 4: each record's text and metadata
#: stored, so that hits are read here rather than from Chroma; 5: metadata keys quoted in
#: their terms, -0.0 indexed as 0.0; 6: list elements typed (int / float), over-long
#: metadata terms hashed, numpy floats indexed as floats; 7: ordered terms of scalar
#: numbers (comparisons evaluated here); 8: each record's vector stored too, where the index
#: keeps them (`keep_vectors`)
FORMAT_VERSION = 8
_STATE = "state.json"
_HEAP = 32_000_000  # tantivy's writer arena; it flushes a segment when full
#: compiled filters kept per index (least recently used dropped first)
COMPILED_FILTERS = 256
#: record ids a snapshot remembers by document address (a few MiB): reading an id otherwise
#: decompresses the hit's stored block, ~5 us each, 50-100 per query
_ID_MEMO = 65_536
#: up to this many ids, `_ids_query` asks for each id by its own term
_FEW_IDS = 64



class Snapshot:
    """One committed state of the index, and every read of it: its tantivy searcher, the
    record ids read from it so far, and what filters used in it matched (subsets.py). A
    search reads one snapshot throughout (`SparseIndex.reader`), so that a commit meanwhile
    cannot give it a count from one state and the ids from another. A document address
    names one record only within its searcher, so the id memo lives and goes with it (a
    commit makes a new snapshot, and carries the filter memo over, patched)."""

    __slots__ = ("searcher", "_schema", "_tokenizer", "_ids", "filters")

    def __init__(self, searcher: Any, schema: Any, tokenizer: Tokenizer) -> None:
        self.searcher = searcher
        self._schema = schema
        self._tokenizer = tokenizer
        self._ids: dict[int, str] = {}
        self.filters = Subsets(self._count, self._matching, int(searcher.num_docs))

    def __len__(self) -> int:
        return int(self.searcher.num_docs)

    def id(self, addr: Any) -> str:
        key = addr.segment_ord << 32 | addr.doc
        rid = self._ids.get(key)
        if rid is None:
            if len(self._ids) >= _ID_MEMO:
                self._ids.clear()
            rid = self._ids[key] = self.searcher.doc(addr)["id"][0]
        return rid

    def _count(self, query: Any) -> int:
        return int(self.searcher.search(query, limit=1, count=True).count)

    def _matching(self, query: Any, limit: int) -> list[str]:
        if limit < 1:
            return []
        return [self.id(addr) for _, addr in
                self.searcher.search(query, limit=limit, count=False).hits]

    def vectors(self, ids: Sequence[str], dim: int) -> tuple[list[str], np.ndarray]:
        """The vectors stored with those of `ids` held here (`keep_vectors`): their ids and
        a float32 matrix of `dim` columns, one row each, as Chroma held them when they were
        indexed. A record held without one (or of another dimension) is left out."""
        searcher = self.searcher
        found: list[str] = []
        rows: list[bytes] = []
        if ids and searcher.num_docs:
            width = 4 * dim
            for _, addr in searcher.search(self._ids_query(ids), limit=len(ids),
                                           count=False).hits:
                doc = searcher.doc(addr)
                stored = doc["vector"]
                if stored and len(stored[0]) == width:
                    found.append(doc["id"][0])
                    rows.append(stored[0])
        matrix = np.frombuffer(b"".join(rows), dtype=np.float32).reshape(len(rows), dim)
        return found, matrix

    def records(self, ids: Sequence[str]) -> dict[str, tuple[str, dict[str, Any]]]:
        """Text and metadata (reserved keys included) of those of `ids` held here, as Chroma
        held them when they were indexed."""
        searcher = self.searcher
        if not ids or searcher.num_docs == 0:
            return {}
        hits = searcher.search(self._ids_query(ids), limit=len(ids), count=False).hits
        out = {}
        for _, addr in hits:
            doc = searcher.doc(addr)
            text, meta = json.loads(doc["record"][0])
            out[doc["id"][0]] = (text, meta)
        return out

    def _ids_query(self, ids: Sequence[str]) -> Any:
        """A query matching the records `ids`: one term query each for a few (0.04 ms for
        10 ids at 7k records, against 0.2 ms for a term set), a term set for many (it
        wins past ~100)."""
        tv = _tantivy()
        if len(ids) > _FEW_IDS:
            return tv.Query.term_set_query(self._schema, "id", list(ids))
        return tv.Query.boolean_query([(tv.Occur.Should,
                                        tv.Query.term_query(self._schema, "id", rid))
                                       for rid in ids])

    # -- filters (filters.py, subsets.py) ----------------------------------------------------
    def count(self, matching: Filter) -> int:
        """How many records a compiled filter matches (counted once per snapshot)."""
        return self.filters.count(matching)

    def subset(self, matching: Filter) -> Subset | None:
        """The records a compiled filter matches, when this snapshot remembers them: from
        the second call for the filter on (one a query: the query path asks once), within
        a memory budget (subsets.py)."""
        return self.filters.subset(matching)

    def remember(self, matching: Filter) -> Subset | None:
        """The records a compiled filter matches, read and remembered now."""
        return self.filters.remember(matching)

    def claim(self, subset: Subset) -> bool:
        """Whether the caller is the first to read a subset's vectors (`Subsets.claim`)."""
        return self.filters.claim(subset)

    def can_hold(self, nbytes: int) -> bool:
        """Whether vectors of `nbytes` fit beside the subsets' (`SUBSET_VECTOR_BYTES`)."""
        return self.filters.can_hold(nbytes)

    def hold(self, subset: Subset, vectors: tuple[list[str], Any]) -> tuple[list[str], Any]:
        """Keep the vectors of a subset this snapshot remembers (see `Subsets.hold`)."""
        return self.filters.hold(subset, vectors)

    def matching(self, matching: Filter, limit: int) -> list[str]:
        """Ids of up to `limit` records a compiled filter matches."""
        return self._matching(matching.query, limit)

    def keep(self, ids: Sequence[str], matching: Filter) -> set[str]:
        """The ids among `ids` that a compiled filter matches."""
        tv = _tantivy()
        if not ids:
            return set()
        q = tv.Query.boolean_query([
            (tv.Occur.Must, self._ids_query(ids)),
            (tv.Occur.Must, matching.query)])
        hits = self.searcher.search(q, limit=len(ids), count=False).hits
        return {self.id(addr) for _, addr in hits}

    # -- BM25 ----------------------------------------------------------------------------
    def search(self, query: str, k: int, *, allowed: Collection[str] | None = None,
               matching: Filter | None = None) -> list[tuple[str, float]]:
        """Top `k` (record id, score) by BM25, best first; scores <= 0 dropped; ties by id.

        Args:
            allowed: when given, only these ids may be returned (a `where` filter that
                Chroma evaluated).
            matching: a filter compiled by `compile`, evaluated here.
        """
        tv = _tantivy()
        terms = self._tokenizer(query)
        searcher = self.searcher
        if not terms or k <= 0 or searcher.num_docs == 0 or (allowed is not None
                                                            and not allowed):
            return []
        schema = self._schema
        should = [(tv.Occur.Should, tv.Query.term_query(schema, "body", t, index_option="freq"))
                  for t in terms]
        q = tv.Query.boolean_query(should)
        only = self._ids_query(list(allowed)) if allowed is not None else \
            matching.query if matching is not None else None
        if only is not None:  # a filter adds nothing to the score
            q = tv.Query.boolean_query([(tv.Occur.Must, tv.Query.boost_query(only, 0.0)),
                                        (tv.Occur.Must, q)])
        # a few extra hits so that ties with the k-th score are broken by id exactly; while
        # the k-th score is still tied at the end of what was fetched, fetch twice as many
        # (a one-term query in a large index ties in groups: fetching every match instead
        # cost 0.3-1.9 s at 1M records, docs/benchmarks.md, Scale)
        limit = k + 16
        while True:
            hits = searcher.search(q, limit=limit, count=False).hits
            out = sorted(((self.id(a), float(s)) for s, a in hits if s > 0),
                         key=lambda x: (-x[1], x[0]))
            if len(hits) < limit or len(out) <= k or out[k - 1][1] != out[-1][1] \
                    or limit >= searcher.num_docs:
                break
            limit = min(2 * limit, searcher.num_docs)
        return out[:k]


@dataclass(frozen=True)
class SparseConfig:
    """Settings of the BM25 side.

    Args:
        tokenizer: how text becomes terms.
        k1, b: the BM25 parameters. tantivy scores with Lucene's BM25 at k1=1.2, b=0.75 and
            cannot be changed from Python; other values are refused rather than ignored.
    """

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    k1: float = 1.2
    b: float = 0.75

    def __post_init__(self) -> None:
        if isinstance(self.tokenizer, dict):
            object.__setattr__(self, "tokenizer", TokenizerConfig.from_dict(self.tokenizer))
        if not isinstance(self.tokenizer, TokenizerConfig):
            v.fail("sparse.tokenizer", "a TokenizerConfig or a dict of its settings",
                   self.tokenizer)
        if (self.k1, self.b) != (1.2, 0.75):
            raise ConfigError(
                f"sparse.k1={self.k1!r}, sparse.b={self.b!r}: the BM25 engine (tantivy) scores "
                "with k1=1.2, b=0.75 only; leave both unset")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokenizer"] = self.tokenizer.to_dict()
        return d


def _tantivy():
    try:
        import tantivy
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise MissingDependencyError("the BM25 side needs tantivy: pip install tantivy") from exc
    return tantivy


class SparseIndex:
    """BM25 over record ids, kept in step with Chroma through `replace` and `commit`.

    Args:
        config: tokenizer and BM25 settings.
        directory: where the index lives; None keeps it in memory (server clients, tests).
        keep_vectors: store with each record the vector `replace` is given for it.
    """

    def __init__(self, config: SparseConfig | None = None,
                 directory: str | os.PathLike | None = None, *,
                 keep_vectors: bool = False) -> None:
        self.config = config or SparseConfig()
        self.keep_vectors = keep_vectors
        self.tokenizer = Tokenizer(self.config.tokenizer)
        self.directory = Path(directory) if directory is not None else None
        self._lock = threading.RLock()
        self._compile_lock = threading.Lock()
        #: the change-log seq this index has caught up to; -1: nothing known, rebuild
        self.watermark = -1
        self.origin = ""
        self.tip = ""  # the writer of the log entry at the watermark (sync.py)
        self._unstage()
        self._open()

    # -- opening ---------------------------------------------------------------------------
    @staticmethod
    def describe(config: SparseConfig) -> dict[str, Any]:
        """The settings that decide what the tokens and scores mean (recorded in stores).
        The index's file format is not among them: a new format rebuilds the index, it
        never makes a store refuse to open."""
        return {"engine": "tantivy", **config.to_dict()}

    def signature(self) -> dict[str, Any]:
        """What the index on disk was made with (kept beside it, in `state.json`): another
        format or another stemmer version rebuilds it from Chroma on open (the store itself
        opens; its tokenizer settings are the same)."""
        return {"format": FORMAT_VERSION, **self.describe(self.config),
                "vectors": self.keep_vectors,
                "stemmer_version": self.tokenizer.stemmer_version,
                "tokenizer_version": TOKENIZER_VERSION}

    def _schema(self):
        tv = _tantivy()
        sb = tv.SchemaBuilder()
        sb.add_text_field("id", stored=True, tokenizer_name="raw", index_option="basic")
        sb.add_text_field("parent", stored=False, tokenizer_name="raw", index_option="basic")
        sb.add_text_field("body", stored=False, index_option="freq")
        sb.add_text_field("meta", stored=False, tokenizer_name="raw", index_option="basic")
        sb.add_bytes_field("record", stored=True, indexed=False, fast=False)
        sb.add_bytes_field("vector", stored=True, indexed=False, fast=False)
        return sb.build()

    def _open(self) -> None:
        tv = _tantivy()
        schema = self._schema()
        d = self.directory
        if d is None:
            self._index = tv.Index(schema)
        else:
            state = self._read_state()
            if state is None or state.get("signature") != self.signature():
                shutil.rmtree(d, ignore_errors=True)
                state = None
            d.mkdir(parents=True, exist_ok=True)
            try:
                self._index = tv.Index(schema, path=str(d), reuse=True)
                if state is not None:
                    self._probe(schema, int(state.get("count", -1)))
            except Exception as exc:  # damaged files: derived state, rebuilt from Chroma
                logger.warning("BM25 index at %s is unreadable (%s); rebuilding", d, exc)
                self._index = None
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
                self._index = tv.Index(schema, path=str(d), reuse=False)
                state = None
            if state is not None:
                self.watermark = int(state["watermark"])
                self.origin = str(state.get("origin", ""))
                self.tip = str(state.get("tip", ""))
        self._schema_obj = schema
        # filters compiled for this schema, by their canonical JSON, least recently used
        # first (a comparison's term set takes ~0.2-0.5 ms to build, equality ~0.05 ms);
        # not an lru_cache of a bound method: that cycle would keep a dropped index, and
        # the lock of its writer, alive until the garbage collector runs
        self._compiled: OrderedDict[str, Filter | None] = OrderedDict()
        self._writer = self._index.writer(heap_size=_HEAP, num_threads=1)
        if d is not None:
            # files of a commit a kill cut short (written, never named by meta.json): the
            # catch-up that repeats it would meet them ("FileAlreadyExists ... .del")
            self._writer.garbage_collect_files()
        self._index.reload()
        self._view = Snapshot(self._index.searcher(), self._schema_obj, self.tokenizer)

    def _probe(self, schema: Any, count: int) -> None:
        """Read a little of every part of the index: tantivy checks file footers on open,
        but a missing file of one field, or a lost meta.json, shows only when read."""
        tv = _tantivy()
        self._index.reload()
        searcher = self._index.searcher()
        if searcher.num_docs != count:
            raise ValueError(f"holds {searcher.num_docs} records, {count} were committed")
        searcher.search(tv.Query.term_query(schema, "body", "probe", index_option="freq"), 1)
        searcher.search(tv.Query.term_query(schema, "parent", "probe"), 1)
        hits = searcher.search(tv.Query.all_query(), 1).hits
        if hits:
            doc = searcher.doc(hits[0][1])
            doc["id"][0], json.loads(doc["record"][0])

    def _read_state(self) -> dict[str, Any] | None:
        assert self.directory is not None
        try:
            state = json.loads((self.directory / _STATE).read_text(encoding="utf-8"))
            int(state["watermark"])
            return state
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # -- writes (staged until commit) -------------------------------------------------------
    def replace(self, parents: Iterable[str], records: Sequence[Record],
                vectors: Mapping[str, np.ndarray] | None = None) -> None:
        """Remove every record of `parents`, then index `records` (all of them live), with
        their `vectors` (by id) where the index keeps them."""
        tv = _tantivy()
        vectors = (vectors or {}) if self.keep_vectors else {}
        with self._lock:
            for p in parents:
                self._writer.delete_documents_by_term("parent", p)
                self._staged_parents.add(p)
            for r in records:
                self._staged_ids.append(r.id)
                doc = tv.Document()
                doc.add_text("id", r.id)
                doc.add_text("parent", r.parent)
                doc.add_pre_tokenized_text("body", self._tokens(r.text))
                for term in metadata_terms(r.metadata):
                    doc.add_text("meta", term)
                doc.add_bytes("record", json.dumps([r.text, dict(r.metadata)], ensure_ascii=False,
                                                   separators=(",", ":")).encode("utf-8"))
                vector = vectors.get(r.id)
                if vector is not None:
                    doc.add_bytes("vector", np.asarray(vector, dtype=np.float32).tobytes())
                self._writer.add_document(doc)

    def _unstage(self) -> None:
        """Forget what was staged since the last commit (the filter memo's patch)."""
        self._staged_parents: set[str] = set()
        self._staged_ids: list[str] = []
        self._cleared = False

    def _tokens(self, text: str):
        tv = _tantivy()
        terms = self.tokenizer(text)
        # offsets are unused (no highlighting): positions are all BM25 needs to count terms
        return tv.PreTokenizedString("", [tv.Token(t, i, 0, 0) for i, t in enumerate(terms)])

    def clear(self) -> None:
        with self._lock:
            self._writer.delete_all_documents()
            self._cleared = True

    def commit(self, watermark: int, tip: str | None = None) -> None:
        """Make the staged changes durable and visible; record `watermark` and `tip` with
        them (None keeps the tip). The filter memo moves to the new snapshot, patched by
        the staged changes (subsets.py)."""
        with self._lock:
            old = self._view
            removed: set[str] = set()
            if old.filters and self._staged_parents and not self._cleared:  # what they replace
                replaced = _tantivy().Query.term_set_query(self._schema_obj, "parent",
                                                           list(self._staged_parents))
                removed = set(old._matching(replaced, old._count(replaced)))
            self._writer.commit()
            self._index.reload()
            view = Snapshot(self._index.searcher(), self._schema_obj, self.tokenizer)
            if not self._cleared:
                old.filters.carried(view.filters, removed, self._staged_ids, view.keep)
            self._view = view
            self._unstage()
            self.watermark = watermark
            self.tip = self.tip if tip is None else tip
            if self.directory is not None:
                write_json(self.directory / _STATE,
                           {"watermark": watermark, "origin": self.origin, "tip": self.tip,
                            "signature": self.signature(),
                            "count": int(self._view.searcher.num_docs)})

    def close(self) -> None:
        with self._lock:
            writer, self._writer = self._writer, None
            self._unstage()
            if writer is not None:
                writer.rollback()  # nothing staged survives a close; releases the lock
                del writer

    # -- reads ---------------------------------------------------------------------------
    def reader(self) -> Snapshot:
        """The committed state now, for every read of one search (a commit makes a new
        snapshot; this one stays as it was)."""
        return self._view

    def __len__(self) -> int:
        return len(self._view)

    def ids(self) -> set[str]:
        """Every indexed record id (reads them all: for checks, not for the query path)."""
        tv = _tantivy()
        searcher = self._view.searcher
        n = searcher.num_docs
        if n == 0:
            return set()
        res = searcher.search(tv.Query.all_query(), limit=n)
        return {searcher.doc(addr)["id"][0] for _, addr in res.hits}

    def vectors(self, ids: Sequence[str], dim: int) -> tuple[list[str], np.ndarray]:
        """`Snapshot.vectors` in the committed state now."""
        return self._view.vectors(ids, dim)

    def records(self, ids: Sequence[str]) -> dict[str, tuple[str, dict[str, Any]]]:
        """`Snapshot.records` in the committed state now."""
        return self._view.records(ids)

    def search(self, query: str, k: int, **options: Any) -> list[tuple[str, float]]:
        """`Snapshot.search` in the committed state now."""
        return self._view.search(query, k, **options)

    # -- filters (filters.py) ---------------------------------------------------------------
    def compile(self, where: Mapping[str, Any]) -> Filter | None:
        """`where` as a query over the indexed metadata, or None when it is outside the
        subset the index evaluates exactly (then ask Chroma)."""
        key = json.dumps(where, sort_keys=True, separators=(",", ":"))
        compiled = self._compiled
        with self._compile_lock:
            if key in compiled:
                compiled.move_to_end(key)
                return compiled[key]
        query = compile_where(where, _tantivy(), self._schema_obj)
        found = None if query is None else Filter(key, query)
        with self._compile_lock:
            compiled[key] = found
            if len(compiled) > COMPILED_FILTERS:
                compiled.popitem(last=False)
        return found
