"""Files into `Document`s for `retrievekit index`: which files, their ids, their text, and
why a file (or a JSONL record) was skipped.

Ids are stable however a path is spelled: a directory given is resolved first, and a file's
id is its path relative to the directory *above* it, so `index kb`, `index /abs/kb` and
`cd kb && index .` all name kb/guide/setup.md ``kb/guide/setup.md``. A file given by name
gets the id it would get through its own directory (``kb/a.md`` for `index kb/a.md`).
Carrying the directory's name keeps two trees apart in one store (kb1/README.md,
kb2/README.md). Every document records `source` (the file's absolute path) and `root`
(the absolute directory it was found through), which `index --prune` and `delete` use.

Formats: plain text and markdown (.txt .md .markdown .rst), HTML (.html .htm: text through
the stdlib `html.parser`, without script/style), PDF (.pdf, with pypdf from the `pdf` extra)
and JSON Lines (.jsonl .ndjson: one document per object). Text is decoded as UTF-8 (a BOM
for UTF-8 or UTF-16 is honoured); a file that is not valid UTF-8 is skipped and reported,
never decoded into replacement characters: a wrong guess would index garbage that looks
fine. `encoding` names another codec (e.g. cp1252) for files known to use it.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from . import validate
from .errors import InvalidInputError, RetrieveKitError
from .records import check_document_id
from .store import clean_metadata
from .types import Document

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
HTML_SUFFIXES = (".html", ".htm")
PDF_SUFFIXES = (".pdf",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES + PDF_SUFFIXES + JSONL_SUFFIXES
#: metadata keys the loader writes itself; a JSONL field of that name is refused
OWN_KEYS = ("source", "root", "suffix", "line")
PDF_INSTALL = "pip install 'retrievekit[pdf]'"


@dataclass(frozen=True)
class LoadOptions:
    """How `load` reads files.

    Args:
        text_field: the JSONL field that holds a record's text.
        encoding: codec for text, HTML and JSONL files; None: UTF-8 (BOM-aware), and a file
            that is not valid UTF-8 is skipped.
        hidden: also index files and folders whose name starts with '.' when walking a
            directory (a file named on the command line is always read).
        exclude: directories never walked into (the store itself).
    """

    text_field: str = "text"
    encoding: str | None = None
    hidden: bool = False
    exclude: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.text_field, str) or not self.text_field:
            raise InvalidInputError(f"--text-field must be a non-empty name, got "
                                    f"{self.text_field!r}")
        if self.encoding is not None:
            try:
                codecs.lookup(self.encoding)
            except LookupError:
                raise InvalidInputError(
                    f"--encoding {self.encoding!r} is not a codec Python knows; try utf-8, "
                    "cp1252 or latin-1") from None


@dataclass(frozen=True)
class Skipped:
    """A file, or one record of a JSONL file (`line`), that was not indexed, and why.

    `kind`: "unsupported", "hidden", "empty", "encoding", "missing-extra", "unreadable",
    "invalid" (a bad record or file content) or "duplicate"."""

    path: Path
    kind: str
    reason: str
    line: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": str(self.path), "kind": self.kind, "reason": self.reason}
        if self.line is not None:
            out["line"] = self.line
        return out


#: kinds of skip after which the file is still there and its old documents are kept by
#: `index --prune` (it could not be read this time; that is no reason to forget it)
KEEP_ON_PRUNE = ("encoding", "missing-extra", "unreadable", "invalid")


@dataclass(frozen=True)
class LoadedFile:
    path: Path
    type: str
    documents: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "type": self.type, "documents": self.documents}


@dataclass
class Scope:
    """What one path argument covers, for `index --prune`: a directory's documents are those
    recorded with its `root`, a file's those recorded with its `source`."""

    path: Path
    is_dir: bool
    produced: set[str] = field(default_factory=set)
    unreadable: set[str] = field(default_factory=set)  # sources whose old documents stay

    @property
    def where(self) -> dict[str, Any]:
        return {"root": str(self.path)} if self.is_dir else {"source": str(self.path)}


@dataclass
class LoadResult:
    documents: list[Document] = field(default_factory=list)
    files: list[LoadedFile] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    scopes: list[Scope] = field(default_factory=list)


def resolve_dir(path: str | os.PathLike[str]) -> Path:
    return Path(path).resolve()


def resolve_file(path: str | os.PathLike[str]) -> Path:
    """A file's absolute path with its directory resolved (the file itself may be a link)."""
    p = Path(path)
    return p.parent.resolve() / p.name


def document_id(root: Path, file: Path) -> str:
    """The id of `file` found through the directory `root` (both absolute): its path relative
    to root's parent, with '/' separators (relative to root itself when root is '/')."""
    rel = file.relative_to(root).as_posix()
    return f"{root.name}/{rel}" if root.name else rel


def load(paths: Sequence[str | os.PathLike[str]], options: LoadOptions | None = None,
         roots: Mapping[Path, Path] | None = None) -> LoadResult:
    """Read the files under `paths` (files or directories) into documents.

    Args:
        roots: for a file named in `paths` (resolved as `resolve_file` does), the directory
            to read it through, when not its own folder: the root it was indexed through
            before, so that it keeps its ids.

    Raises:
        InvalidInputError: a path does not exist.
    """
    options = options or LoadOptions()
    result = LoadResult()
    first_source: dict[str, Path] = {}  # id -> the file that gave it first
    seen_files: dict[Path, Path] = {}  # file -> the root it was read through
    exclude = tuple(p.resolve() for p in options.exclude)
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            root = resolve_dir(p)
            scope = Scope(root, True)
            found: Iterable[tuple[Path, Skipped | None]] = _walk(root, options, exclude)
        elif p.is_file():
            file = resolve_file(p)
            root = (roots or {}).get(file, file.parent)
            scope = Scope(file, False)
            found = [(file, None)]
        else:
            raise InvalidInputError(f"PATH {str(arg)!r} does not exist; give files or "
                                    "directories")
        result.scopes.append(scope)
        for file, skip in found:
            if skip is not None:
                result.skipped.append(skip)
                continue
            if file in seen_files:
                result.skipped.append(Skipped(
                    file, "duplicate", f"already read through {seen_files[file]}"))
                continue
            seen_files[file] = root
            docs, skips, kind = _read(file, root, options)
            for s in skips:
                result.skipped.append(s)
                if s.line is None and s.kind in KEEP_ON_PRUNE:
                    scope.unreadable.add(str(file))
            kept = 0
            for doc, line in docs:
                prev = first_source.get(doc.id)
                if prev is not None:
                    result.skipped.append(Skipped(
                        file, "duplicate", f"id {doc.id!r} already given by {prev}", line))
                    continue
                first_source[doc.id] = file
                scope.produced.add(doc.id)
                result.documents.append(doc)
                kept += 1
            if kept:
                result.files.append(LoadedFile(file, kind, kept))
    return result


def _walk(root: Path, options: LoadOptions, exclude: tuple[Path, ...]
          ) -> Iterator[tuple[Path, Skipped | None]]:
    """(file, None) for each file to read under root, (path, Skipped) for each one left out."""
    errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=errors.append):
        yield from _listing_errors(errors)
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            sub = here / d
            if sub in exclude:
                continue
            if sub.is_symlink():
                yield sub, Skipped(sub, "unsupported", "a link to a folder (not followed)")
                continue
            if d.startswith(".") and not options.hidden:
                yield sub, Skipped(sub, "hidden", "hidden folder (name starts with '.'); "
                                   "--hidden includes it")
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            f = here / name
            if name.startswith(".") and not options.hidden:
                yield f, Skipped(f, "hidden", "hidden file (name starts with '.'); "
                                 "--hidden includes it")
            elif not f.is_file():
                yield f, Skipped(f, "unreadable", "a broken link or not a regular file")
            elif f.suffix.lower() not in SUPPORTED_SUFFIXES:
                yield f, Skipped(f, "unsupported", _unsupported(f.suffix.lower()))
            else:
                yield f, None
    yield from _listing_errors(errors)


def _listing_errors(errors: list[OSError]) -> Iterator[tuple[Path, Skipped]]:
    while errors:
        exc = errors.pop(0)
        path = Path(exc.filename or "?")
        yield path, Skipped(path, "unreadable", f"cannot be listed ({exc.strerror or exc})")


def _unsupported(suffix: str) -> str:
    if suffix == ".json":
        return ("JSON is not indexed: give JSON Lines (.jsonl, one object per line with a "
                "text field)")
    return (f"unsupported type {suffix or '(no suffix)'} (indexed: "
            f"{' '.join(SUPPORTED_SUFFIXES)})")


def _read(file: Path, root: Path, options: LoadOptions
          ) -> tuple[list[tuple[Document, int | None]], list[Skipped], str]:
    """The documents of one file (with their JSONL line), what was skipped, and its type."""
    suffix = file.suffix.lower()
    kind = ("html" if suffix in HTML_SUFFIXES else "pdf" if suffix in PDF_SUFFIXES
            else "jsonl" if suffix in JSONL_SUFFIXES else "text")
    if suffix == ".json":  # a file named on the command line: still not text to index
        return [], [Skipped(file, "unsupported", _unsupported(suffix))], kind
    base = {"source": str(file), "root": str(root), "suffix": suffix}
    try:
        if kind == "pdf":
            text, extra = _pdf_text(file)
        else:
            raw = file.read_bytes()
            if kind == "jsonl":
                text = _decode(raw, options.encoding, file)
                return (*_jsonl(file, root, text, base, options), kind)
            text = _decode(raw, options.encoding, file)
            if "\x00" in text:
                return [], [Skipped(file, "unsupported",
                                    "binary content (NUL bytes), not text")], kind
            extra = {}
            if kind == "html":
                text, title = html_text(text)
                if title:
                    extra["title"] = title
    except _Skip as exc:
        return [], [Skipped(file, exc.kind, exc.reason)], kind
    except OSError as exc:
        return [], [Skipped(file, "unreadable", f"cannot be read ({exc.strerror or exc})")], kind
    if not text.strip():
        what = "no extractable text (a scanned PDF needs OCR first)" if kind == "pdf" \
            else "empty (no text)"
        return [], [Skipped(file, "empty", what)], kind
    doc = Document(text=text, id=document_id(root, file), metadata={**base, **extra})
    return [(doc, None)], [], kind


class _Skip(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))


def _decode(raw: bytes, encoding: str | None, file: Path) -> str:
    codec = encoding
    if codec is None:
        codec = next((c for bom, c in _BOMS if raw.startswith(bom)), "utf-8")
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as exc:
        byte = raw[exc.start:exc.start + 1].hex()
        fix = ("convert it to UTF-8, or pass --encoding with its encoding (e.g. cp1252 or "
               "latin-1 for Western European text)") if encoding is None else \
            "check its encoding"
        raise _Skip("encoding", f"not valid {codec} (byte 0x{byte} at offset {exc.start}); "
                    f"{fix}") from None


class _TextExtractor(HTMLParser):
    """Visible text of an HTML page: no script/style/template content; block elements end
    a line; the <title> is kept apart."""

    _SKIP = frozenset({"script", "style", "noscript", "template", "head", "svg"})
    _BLOCK = frozenset({"p", "div", "br", "li", "ul", "ol", "tr", "table", "section",
                        "article", "header", "footer", "h1", "h2", "h3", "h4", "h5", "h6",
                        "pre", "blockquote", "hr", "dd", "dt", "main", "nav", "aside"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title: list[str] = []
        self._skipping: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in self._SKIP:
            self._skipping.append(tag)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs: Any) -> None:
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif self._skipping and tag == self._skipping[-1]:
            self._skipping.pop()
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title.append(data)
        elif not self._skipping:
            self.parts.append(data)


def html_text(html: str) -> tuple[str, str]:
    """(visible text, title) of an HTML document; whitespace runs within a line collapsed."""
    p = _TextExtractor()
    p.feed(html)
    p.close()
    lines = (" ".join(line.split()) for line in "".join(p.parts).splitlines())
    text = "\n".join(line for line in lines if line)
    return text, " ".join("".join(p.title).split())


def _pdf_text(file: Path) -> tuple[str, dict[str, Any]]:
    try:
        import pypdf
    except ImportError:
        raise _Skip("missing-extra", f"reading PDF needs pypdf: {PDF_INSTALL}") from None
    try:
        reader = pypdf.PdfReader(str(file))
        if reader.is_encrypted and not reader.decrypt(""):
            raise _Skip("unreadable", "encrypted PDF (needs a password)")
        pages = [page.extract_text() or "" for page in reader.pages]
    except _Skip:
        raise
    except OSError:
        raise
    except Exception as exc:  # pypdf raises many types for damaged files
        raise _Skip("invalid", f"not a readable PDF ({type(exc).__name__}: {exc})") from None
    return "\n\n".join(p.strip() for p in pages if p.strip()), {"pages": len(pages)}


_LINE_END = re.compile(r"\r\n|\r|\n")


def _jsonl(file: Path, root: Path, text: str, base: dict[str, Any], options: LoadOptions
           ) -> tuple[list[tuple[Document, int | None]], list[Skipped]]:
    field_name = options.text_field
    docs: list[tuple[Document, int | None]] = []
    skips: list[Skipped] = []
    records = 0
    missing_field = 0
    fields_seen: set[str] = set()
    file_id = document_id(root, file)
    # lines end at "\r\n", "\r" or "\n" only: JSON strings may hold U+2028, U+2029 and
    # U+0085 unescaped, where str.splitlines would cut a record in two
    for n, line in enumerate(_LINE_END.split(text), 1):
        if not line.strip():
            continue
        records += 1

        def skip(reason: str) -> None:
            skips.append(Skipped(file, "invalid", reason, n))

        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            skip(f"not JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            skip(f"a JSON {type(obj).__name__}, not an object")
            continue
        fields_seen.update(obj)
        body = obj.get(field_name)
        if body is None:
            missing_field += 1
            skip(f"no {field_name!r} field (--text-field names the text field)")
            continue
        if not isinstance(body, str) or not body.strip():
            skip(f"field {field_name!r} must be non-empty text, got {body!r:.40}")
            continue
        doc_id: Any = obj.get("id")
        if doc_id is None:
            doc_id = f"{file_id}:{n}"
        elif isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or doc_id == "":
            skip(f"'id' must be a non-empty string or an integer, got {doc_id!r:.40}")
            continue
        doc_id = str(doc_id)
        clash = [k for k in OWN_KEYS if k in obj]
        if clash:
            skip(f"field {clash[0]!r} is reserved: index records the record's "
                 f"{clash[0]} there ({', '.join(OWN_KEYS)}); rename it")
            continue
        meta = {k: v for k, v in obj.items() if k not in (field_name, "id")}
        try:  # what add_documents would refuse, refused here for this line alone
            validate.readable(f"field {field_name!r}", body, "", error=InvalidInputError)
            validate.utf8("'id'", doc_id, error=InvalidInputError)
            check_document_id(doc_id, "'id'")
            meta = clean_metadata(meta, f"line {n}")
        except RetrieveKitError as exc:
            skip(str(exc))
            continue
        docs.append((Document(text=body, id=doc_id, metadata={**meta, **base, "line": n}), n))
    if records and missing_field == records:  # every record lacks it: a wrong --text-field
        others = sorted(fields_seen - {"id"})
        return [], [Skipped(file, "invalid", f"no record has a {field_name!r} field (fields: "
                            f"{', '.join(others[:8]) or 'none'}); pass --text-field NAME")]
    if not records:
        skips.append(Skipped(file, "empty", "empty (no records)"))
    return docs, skips
