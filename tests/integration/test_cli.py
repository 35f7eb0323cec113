"""The `retrievekit` command: index files, search, info; errors exit 2 with a message."""

from __future__ import annotations

import json

from retrievekit.cli import main


def test_index_search_info(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "fusion.md").write_text("# Fusion\nReciprocal rank fusion merges ranked lists.")
    (docs / "bread.txt").write_text("Sourdough bread rises with a wild yeast starter.")
    (docs / "ignored.bin").write_bytes(b"\x00\x01")
    store = str(tmp_path / "store")
    assert main(["index", str(docs), "--store", store, "-q"]) == 0
    out = capsys.readouterr().out
    assert "2 records written" in out
    assert main(["index", str(docs), "--store", store, "-q"]) == 0
    assert "0 records written, 2 unchanged" in capsys.readouterr().out

    assert main(["search", "wild yeast", "--store", store, "--k", "1", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["id"].endswith("bread.txt") and hits[0]["metadata"]["suffix"] == ".txt"
    assert set(hits[0]["ranks"]) >= {"dense", "sparse", "fused"}

    assert main(["search", "merges ranked lists", "--store", store, "--mode", "sparse"]) == 0
    assert "fusion.md" in capsys.readouterr().out

    assert main(["info", "--store", store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["records"] == 2 and info["bm25_records"] == 2
    assert info["settings"]["embedder"]["model"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_errors_exit_2_with_message(tmp_path, capsys):
    assert main(["search", "x", "--store", str(tmp_path / "none")]) == 2
    assert "no retrievekit store" in capsys.readouterr().err
    assert main(["index", str(tmp_path / "missing"), "--store", str(tmp_path / "s")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_where_json_is_one_line_error(tmp_path, capsys):
    from retrievekit.cli import main

    assert main(["search", "x", "--where", "{bad json", "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --where") and "Traceback" not in err
