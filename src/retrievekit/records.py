"""Documents as Chroma records: ids, reserved metadata keys, content hashes, reassembly.

A document becomes one record (its id is the document's) or, when longer than the model
reads, one record per chunk (`<id>#chunk<i>`, a form user ids may not take). Every record
carries reserved keys (`_rk_*`): its parent document, its position, the character span of a
chunk, a hash of its content, and the log sequence number of the write that stored it.

A write replaces a whole document in one Chroma call: its new records, plus the records of
its old version that the new one lacks, overwritten as *dead* (`_rk_dead`). Readers skip dead
records, so a crash between that call and the cleanup that deletes them never shows a mix.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .errors import InvalidInputError
from .filters import may_match_dead

RESERVED_PREFIX = "_rk_"
PARENT_KEY = "_rk_parent"
CHUNK_KEY = "_rk_chunk"
START_KEY = "_rk_start"
END_KEY = "_rk_end"
HASH_KEY = "_rk_hash"
SEQ_KEY = "_rk_seq"
DEAD_KEY = "_rk_dead"
TEXT_KEY = "_rk_text"  # the record's text (store.py: not a Chroma document)

_CHUNK_RE = re.compile(r"#chunk\d+\Z")


def chunk_id(parent_id: str, position: int) -> str:
    """The id of chunk `position` of document `parent_id`."""
    return f"{parent_id}#chunk{position}"


def chunk_position(record_id: str) -> int:
    """A record's position in its document (0 for a whole document or its first chunk)."""
    if "#chunk" not in record_id:  # most ids (a search reads 200-300): no regex
        return 0
    m = _CHUNK_RE.search(record_id)
    return int(m.group()[len("#chunk"):]) if m else 0


def parent_of(record_id: str) -> str:
    """The document id of a record id (user ids never end like a chunk id)."""
    if "#chunk" not in record_id:
        return record_id
    return _CHUNK_RE.sub("", record_id)


#: the longest document id, in UTF-8 bytes: ids are terms of the BM25 index, and tantivy
#: drops a term past 65,530 bytes (a record it then could not find to delete)
MAX_ID_BYTES = 4096


def check_document_id(doc_id: str, where: str) -> None:
    """Refuse a user id that a chunk id could take (`...#chunk<digits>`), or a longer one
    than `MAX_ID_BYTES`."""
    size = len(doc_id.encode("utf-8", "surrogatepass"))
    if size > MAX_ID_BYTES:
        raise InvalidInputError(
            f"{where} is {size:,} bytes long ({doc_id[:40]!r}...); ids may be at most "
            f"{MAX_ID_BYTES:,} bytes in UTF-8: use a shorter key, e.g. a hash of this one")
    if _CHUNK_RE.search(doc_id):
        raise InvalidInputError(
            f"{where} {doc_id!r} ends like a chunk id ('#chunk' + digits), which retrievekit "
            "reserves for the chunks of long documents; choose another id, e.g. "
            f"{doc_id.replace('#chunk', '#part')!r}")


def public_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metadata without retrievekit's reserved keys."""
    return {k: v for k, v in (metadata or {}).items() if not k.startswith(RESERVED_PREFIX)}


def content_hash(text: str, metadata: Mapping[str, Any]) -> str:
    h = hashlib.sha256(text.encode("utf-8"))
    h.update(repr(sorted(public_metadata(metadata).items())).encode("utf-8"))
    return h.hexdigest()[:24]


def is_live(metadata: Mapping[str, Any] | None) -> bool:
    return not (metadata or {}).get(DEAD_KEY)


def live_where(where: Mapping[str, Any] | None) -> dict[str, Any]:
    """A Chroma `where` for the live records among those `where` matches: a replaced
    document's dead records (lacking its keys until their delete) match `$ne`, `$nin` and
    `$not_contains`. A filter that cannot match them is returned as it is (the clause costs
    ~50 ms at 120k records)."""
    live = {DEAD_KEY: {"$ne": True}}
    if not where:
        return live
    return {"$and": [dict(where), live]} if may_match_dead(where) else dict(where)


@dataclass(frozen=True)
class Record:
    """One stored record: a whole document or one chunk of it."""

    id: str
    parent: str
    text: str
    metadata: Mapping[str, Any]  # user metadata plus the reserved keys

    @property
    def hash(self) -> str:
        return str(self.metadata.get(HASH_KEY, ""))


def make_records(doc_id: str, text: str, metadata: Mapping[str, Any],
                 spans: Sequence[tuple[int, int]] | None) -> list[Record]:
    """The records of one document: one record when `spans` is None, else one per span."""
    meta = dict(metadata)
    if spans is None:
        return [Record(doc_id, doc_id, text, {**meta, PARENT_KEY: doc_id, CHUNK_KEY: 0,
                                              HASH_KEY: content_hash(text, meta)})]
    out = []
    for pos, (begin, end) in enumerate(spans):
        piece = text[begin:end]
        out.append(Record(chunk_id(doc_id, pos), doc_id, piece,
                          {**meta, PARENT_KEY: doc_id, CHUNK_KEY: pos, START_KEY: begin,
                           END_KEY: end, HASH_KEY: content_hash(piece, meta)}))
    return out


def dead_metadata(parent: str, old: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata that overwrites a stale record as dead (Chroma merges metadata on upsert, so
    every other key is set to None, which removes it)."""
    meta: dict[str, Any] = {k: None for k in old}
    meta.update({PARENT_KEY: parent, DEAD_KEY: True})
    return meta


def from_chroma(ids: Iterable[str], texts: Iterable[str | None],
                metadatas: Iterable[Mapping[str, Any] | None]) -> list[Record]:
    """Live records out of a Chroma `get` result (dead ones skipped)."""
    return [Record(rid, str((m or {}).get(PARENT_KEY, parent_of(rid))), t or "", dict(m or {}))
            for rid, t, m in zip(ids, texts, metadatas) if is_live(m)]


def reassemble(records: Sequence[Record]) -> tuple[str, dict[str, Any]]:
    """The original text and user metadata of one document from its live records."""
    pieces = sorted(records, key=lambda r: int(r.metadata.get(CHUNK_KEY, 0)))
    text = pieces[0].text
    end = pieces[0].metadata.get(END_KEY, len(text))
    for r in pieces[1:]:
        text += r.text[end - r.metadata[START_KEY]:]
        end = r.metadata[END_KEY]
    return text, public_metadata(pieces[0].metadata)
