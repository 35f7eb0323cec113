"""Files into documents for `retrievekit index`: ids, formats, and every skip with its reason."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from retrievekit.errors import InvalidInputError
from retrievekit.loaders import LoadOptions, html_text, load


def make_pdf(path: Path, lines: list[str]) -> None:
    """A one-page PDF whose text pypdf extracts (Helvetica, one text line per entry),
    written byte by byte so the test needs no PDF writer."""
    ops = "BT /F1 12 Tf 72 720 Td " + " ".join(
        f"({t}) Tj 0 -16 Td" for t in lines) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        "/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        f"<< /Length {len(ops)} >>\nstream\n{ops}\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += (f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n"
            "%%EOF\n").encode()
    path.write_bytes(bytes(out))


@pytest.fixture
def kb(tmp_path: Path) -> Path:
    root = tmp_path / "kb"
    (root / "guide").mkdir(parents=True)
    (root / "a.md").write_text("# A\nAlpha text.", encoding="utf-8")
    (root / "guide" / "setup.txt").write_text("Setup steps.", encoding="utf-8")
    return root


def by_id(result) -> dict:
    return {d.id: d for d in result.documents}


def test_ids_are_the_same_for_every_spelling_of_a_directory(kb, monkeypatch):
    expected = {"kb/a.md", "kb/guide/setup.txt"}
    monkeypatch.chdir(kb.parent)
    assert set(by_id(load(["kb"]))) == expected
    assert set(by_id(load(["./kb/"]))) == expected
    assert set(by_id(load([str(kb)]))) == expected
    monkeypatch.chdir(kb)
    assert set(by_id(load(["."]))) == expected
    monkeypatch.chdir(kb / "guide")
    assert set(by_id(load([".."]))) == expected
    # a file named alone gets the id it has through its own directory
    assert set(by_id(load(["../a.md"]))) == {"kb/a.md"}
    doc = by_id(load([".."]))["kb/a.md"]
    assert doc.metadata["source"] == str(kb.resolve() / "a.md")
    assert doc.metadata["root"] == str(kb.resolve())


def test_a_link_to_the_tree_gives_the_same_ids(kb, tmp_path):
    link = tmp_path / "elsewhere"
    link.symlink_to(kb)
    assert set(by_id(load([str(link)]))) == {"kb/a.md", "kb/guide/setup.txt"}


def test_two_trees_keep_apart_and_an_overlap_is_read_once(kb, tmp_path):
    other = tmp_path / "kb2"
    other.mkdir()
    (other / "a.md").write_text("Another alpha.", encoding="utf-8")
    assert set(by_id(load([str(kb), str(other)]))) == {"kb/a.md", "kb/guide/setup.txt",
                                                        "kb2/a.md"}
    res = load([str(kb), str(kb / "guide")])
    assert set(by_id(res)) == {"kb/a.md", "kb/guide/setup.txt"}
    assert [(s.path.name, s.kind) for s in res.skipped] == [("setup.txt", "duplicate")]


def test_hidden_files_and_folders_are_left_out_unless_asked(kb):
    (kb / ".git").mkdir()
    (kb / ".git" / "notes.txt").write_text("git internals", encoding="utf-8")
    (kb / ".env.md").write_text("secret", encoding="utf-8")
    res = load([str(kb)])
    assert set(by_id(res)) == {"kb/a.md", "kb/guide/setup.txt"}
    assert sorted((s.path.name, s.kind) for s in res.skipped) == [(".env.md", "hidden"),
                                                                  (".git", "hidden")]
    assert set(by_id(load([str(kb)], LoadOptions(hidden=True)))) >= {"kb/.git/notes.txt",
                                                                      "kb/.env.md"}
    # a hidden file named on the command line is read: the user asked for it
    assert set(by_id(load([str(kb / ".env.md")]))) == {"kb/.env.md"}


def test_the_store_inside_the_tree_is_not_indexed(kb):
    (kb / "store").mkdir()
    (kb / "store" / "notes.txt").write_text("not content", encoding="utf-8")
    res = load([str(kb)], LoadOptions(exclude=(kb / "store",)))
    assert "kb/store/notes.txt" not in by_id(res) and not res.skipped


def test_non_utf8_is_skipped_with_the_fix_and_read_with_encoding(kb):
    (kb / "latin.txt").write_bytes("café crème".encode("latin-1"))
    res = load([str(kb)])
    assert "kb/latin.txt" not in by_id(res)
    (skip,) = res.skipped
    assert skip.kind == "encoding" and "not valid utf-8" in skip.reason
    assert "0xe9" in skip.reason and "--encoding" in skip.reason
    doc = by_id(load([str(kb)], LoadOptions(encoding="cp1252")))["kb/latin.txt"]
    assert doc.text == "café crème" and "\ufffd" not in doc.text
    with pytest.raises(InvalidInputError, match="--encoding 'nope'"):
        LoadOptions(encoding="nope")


def test_bom_marked_utf16_and_utf8_are_decoded(kb):
    (kb / "u16.txt").write_bytes("naïve résumé".encode("utf-16"))
    (kb / "bom.md").write_bytes(b"\xef\xbb\xbf" + "Straße".encode("utf-8"))
    docs = by_id(load([str(kb)]))
    assert docs["kb/u16.txt"].text == "naïve résumé"
    assert docs["kb/bom.md"].text == "Straße"


def test_empty_binary_json_and_unknown_types_are_reported(kb):
    (kb / "empty.txt").write_text("  \n", encoding="utf-8")
    (kb / "nul.txt").write_bytes(b"ab\x00cd")
    (kb / "data.json").write_text("{}", encoding="utf-8")
    (kb / "photo.png").write_bytes(b"\x89PNG")
    skips = {s.path.name: s for s in load([str(kb)]).skipped}
    assert skips["empty.txt"].kind == "empty"
    assert skips["nul.txt"].kind == "unsupported" and "NUL" in skips["nul.txt"].reason
    assert "JSON Lines" in skips["data.json"].reason
    assert skips["photo.png"].kind == "unsupported" and ".png" in skips["photo.png"].reason
    assert len(skips) == 4


def test_html_text_without_markup_scripts_or_styles(kb):
    (kb / "page.html").write_text(
        "<!doctype html><html><head><title>Tea &amp; coffee</title><style>p{color:red}"
        "</style><script>var hidden = 1;</script></head><body><h1>Green tea</h1><p>Has "
        "<b>catechins</b> &lt;and&gt; less caffeine.</p><script>alert(2)</script>"
        "<ul><li>one</li><li>two</li></ul></body></html>", encoding="utf-8")
    doc = by_id(load([str(kb)]))["kb/page.html"]
    assert doc.text == "Green tea\nHas catechins <and> less caffeine.\none\ntwo"
    assert doc.metadata["title"] == "Tea & coffee" and doc.metadata["suffix"] == ".html"
    assert html_text("<p>a<br>b</p>")[0] == "a\nb"


def test_jsonl_records_fields_ids_and_bad_lines(kb):
    lines = [json.dumps({"text": "Dogs are loyal.", "id": "d1", "topic": "pets"}),
             json.dumps({"text": "Bread rises.", "year": 2020}),
             "", "not json",
             json.dumps({"body": "no text field"}),
             json.dumps({"text": "nested", "author": {"name": "x"}}),
             json.dumps({"text": "reserved", "source": "web"}),
             json.dumps({"text": "Dup.", "id": "d1"}),
             json.dumps({"text": "Int id.", "id": 7})]
    (kb / "recs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    res = load([str(kb / "recs.jsonl")])
    docs = by_id(res)
    assert set(docs) == {"d1", "kb/recs.jsonl:2", "7"}
    assert docs["d1"].text == "Dogs are loyal." and docs["d1"].metadata["topic"] == "pets"
    assert docs["kb/recs.jsonl:2"].metadata["year"] == 2020
    assert docs["kb/recs.jsonl:2"].metadata["line"] == 2
    assert docs["d1"].metadata["source"] == str((kb / "recs.jsonl").resolve())
    skips = {s.line: s for s in res.skipped}
    assert sorted(skips) == [4, 5, 6, 7, 8]
    assert "not JSON" in skips[4].reason and "'text'" in skips[5].reason
    assert "author" in skips[6].reason and "'source' is reserved" in skips[7].reason
    assert skips[8].kind == "duplicate"


def test_jsonl_lines_end_at_newlines_only(kb):
    """JSON strings may hold U+2028, U+2029 and U+0085 unescaped (json.dumps with
    ensure_ascii=False writes them so); splitlines cut such a record in two."""
    recs = [{"id": "a", "text": "one\u2028still one"}, {"id": "b", "text": "x\x85y\u2029z"},
            {"id": "c", "text": "plain"}]
    (kb / "seps.jsonl").write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\r\n"
                                            for r in recs).encode("utf-8"))
    res = load([str(kb / "seps.jsonl")])
    docs = by_id(res)
    assert not res.skipped and set(docs) == {"a", "b", "c"}
    assert [docs[i].metadata["line"] for i in "abc"] == [1, 2, 3]
    (kb / "mac.jsonl").write_bytes(b'{"id": "m1", "text": "a"}\r{"id": "m2", "text": "b"}\r')
    mac = load([str(kb / "mac.jsonl")])  # old Mac line ends, as splitlines read them
    assert not mac.skipped and [by_id(mac)[i].metadata["line"] for i in ("m1", "m2")] == [1, 2]


def test_jsonl_lines_add_documents_would_refuse_are_skipped_alone(kb):
    """A line whose text is only zero-width characters or holds a lone surrogate (a JSON
    escape), or whose id does, stopped the whole index run when it was written ("documents[2]
    .text must be valid Unicode"), naming no file or line (found by an attack)."""
    lines = [json.dumps({"text": "Fine.", "id": "a"}),
             json.dumps({"text": "\u200b\u200b", "id": "zw"}),
             '{"text": "Magma \\ud800 rises.", "id": "s"}',
             '{"text": "Good text.", "id": "\\ud800"}',
             json.dumps({"text": "Also fine.", "id": "b", "#tag": "x"}),
             json.dumps({"text": "Last.", "id": "c"})]
    (kb / "odd.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    res = load([str(kb / "odd.jsonl")])
    assert set(by_id(res)) == {"a", "c"}
    skips = {s.line: s.reason for s in res.skipped}
    assert sorted(skips) == [2, 3, 4, 5]
    assert "readable text" in skips[2] and "lone surrogate" in skips[3]
    assert "'id'" in skips[4] and "'#tag'" in skips[5]


def test_jsonl_with_another_text_field(kb):
    (kb / "b.jsonl").write_text(json.dumps({"body": "Tea leaves.", "title": "T"}) + "\n",
                                encoding="utf-8")
    res = load([str(kb / "b.jsonl")])
    assert not res.documents
    (skip,) = res.skipped
    assert "no record has a 'text' field" in skip.reason and "body" in skip.reason
    assert "--text-field" in skip.reason
    docs = by_id(load([str(kb / "b.jsonl")], LoadOptions(text_field="body")))
    assert docs["kb/b.jsonl:1"].text == "Tea leaves." and docs["kb/b.jsonl:1"].metadata["title"] == "T"


def test_pdf_text_with_pypdf(kb):
    pytest.importorskip("pypdf")
    make_pdf(kb / "manual.pdf", ["Error E1042 means", "the agent lost its lease."])
    doc = by_id(load([str(kb)]))["kb/manual.pdf"]
    assert "E1042" in doc.text and "lost its lease" in doc.text
    assert doc.metadata["pages"] == 1
    (kb / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    skip = {s.path.name: s for s in load([str(kb)]).skipped}["broken.pdf"]
    assert skip.kind in ("invalid", "empty")


def test_pdf_without_pypdf_names_the_install(kb, monkeypatch):
    make_pdf(kb / "manual.pdf", ["Some text"])
    monkeypatch.setitem(sys.modules, "pypdf", None)  # what an environment without it sees
    res = load([str(kb)])
    (skip,) = res.skipped
    assert skip.kind == "missing-extra"
    assert "pip install 'retrievekit[pdf]'" in skip.reason
    assert {s.path for s in res.skipped} == {kb.resolve() / "manual.pdf"}
    assert str(kb.resolve() / "manual.pdf") in res.scopes[0].unreadable


def test_a_missing_path_is_an_error(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load([str(tmp_path / "missing")])
