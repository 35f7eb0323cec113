"""The `retrievekit` command: index files, search, info; errors exit 2 with a message."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

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


def index_json(argv, capsys) -> dict:
    assert main(["index", *argv, "--json", "-q"]) == 0
    return json.loads(capsys.readouterr().out)


def search_ids(store, query, capsys, k=10) -> list[str]:
    assert main(["search", query, "--store", store, "--k", str(k), "--json"]) == 0
    return [h["id"] for h in json.loads(capsys.readouterr().out)]


def test_three_spellings_one_set_of_ids_prune_and_delete(tmp_path, capsys, monkeypatch):
    kb = tmp_path / "kb"
    (kb / "guide").mkdir(parents=True)
    (kb / "fusion.md").write_text("Reciprocal rank fusion merges ranked lists.")
    (kb / "guide" / "bread.txt").write_text("Sourdough bread rises with a wild yeast starter.")
    (kb / "old.md").write_text("An obsolete page about fax machines.")
    store = str(tmp_path / "store")
    monkeypatch.chdir(tmp_path)
    first = index_json(["kb", "--store", store], capsys)
    assert first["records_after"] == 3 and first["records_written"] == 3
    again = index_json([str(kb), "--store", store], capsys)
    monkeypatch.chdir(kb)
    third = index_json([".", "--store", store], capsys)
    for report in (again, third):
        assert report["records_after"] == 3 and report["records_written"] == 0
    assert sorted(search_ids(store, "bread", capsys)) == ["kb/fusion.md", "kb/guide/bread.txt",
                                                          "kb/old.md"]

    (kb / "old.md").unlink()
    assert main(["index", ".", "--store", store, "-q"]) == 0
    out = capsys.readouterr().out
    assert "1 document indexed earlier from these paths were not found" in out
    assert "kb/old.md" in out and "--prune" in out
    assert "kb/old.md" in search_ids(store, "fax machines", capsys)  # kept until pruned
    pruned = index_json([".", "--store", store, "--prune"], capsys)
    assert pruned["pruned"] == ["kb/old.md"] and pruned["records_after"] == 2
    assert "kb/old.md" not in search_ids(store, "fax machines", capsys)

    # delete: by id, by the path of a file (even one already gone), by a directory
    assert main(["delete", "kb/fusion.md", "--store", store]) == 0
    assert "deleted 1 document" in capsys.readouterr().out
    assert main(["delete", "no-such-id", "guide", "--store", store]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: nothing in") and "'no-such-id'" in err
    assert search_ids(store, "bread", capsys) == ["kb/guide/bread.txt"]  # nothing deleted
    assert main(["delete", "guide", "--store", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == ["kb/guide/bread.txt"]
    assert search_ids(store, "bread", capsys) == []


def test_a_file_named_alone_keeps_the_id_its_tree_gave_it(tmp_path, capsys, monkeypatch):
    """Read through its own folder, it got the id guide/bread.txt beside the tree's
    kb/guide/bread.txt, and --prune deleted the tree's (the next index of the tree wrote it
    back beside the stray one)."""
    kb = tmp_path / "kb"
    (kb / "guide").mkdir(parents=True)
    (kb / "guide" / "bread.txt").write_text("Sourdough bread rises with a wild yeast starter.")
    (kb / "tea.md").write_text("Green tea has less caffeine than coffee.")
    store = str(tmp_path / "store")
    monkeypatch.chdir(tmp_path)
    index_json(["kb", "--store", store], capsys)
    (kb / "guide" / "bread.txt").write_text("Rye bread is dense and sour.")
    alone = index_json(["kb/guide/bread.txt", "--store", store, "--prune"], capsys)
    assert alone["pruned"] == [] and alone["records_after"] == 2
    assert search_ids(store, "rye bread", capsys, k=2)[0] == "kb/guide/bread.txt"
    again = index_json(["kb", "--store", store, "--prune"], capsys)
    assert again["records_after"] == 2 and again["records_written"] == 0
    # never indexed through a tree: its own folder, as before
    (tmp_path / "solo").mkdir()
    (tmp_path / "solo" / "a.md").write_text("A page of its own about kites.")
    assert index_json(["solo/a.md", "--store", store], capsys)["records_after"] == 3
    assert "solo/a.md" in search_ids(store, "kites", capsys)


def test_delete_by_file_path_and_jsonl_records(tmp_path, capsys):
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "faq.jsonl").write_text(
        json.dumps({"text": "E1042 means the lease was lost.", "id": "e1042"}) + "\n"
        + json.dumps({"text": "E2001 means the disk is full."}) + "\n")
    (kb / "note.md").write_text("A note about leases.")
    store = str(tmp_path / "store")
    assert index_json([str(kb), "--store", store], capsys)["documents"] == 3
    # a record removed from a JSONL file goes with --prune, the others stay
    (kb / "faq.jsonl").write_text(json.dumps({"text": "E1042 means the lease was lost.",
                                              "id": "e1042"}) + "\n")
    report = index_json([str(kb / "faq.jsonl"), "--store", store, "--prune"], capsys)
    assert report["pruned"] == ["kb/faq.jsonl:2"]
    assert sorted(search_ids(store, "lease", capsys)) == ["e1042", "kb/note.md"]
    assert main(["delete", str(kb / "faq.jsonl"), "--store", store]) == 0
    assert "deleted 1 document" in capsys.readouterr().out
    assert search_ids(store, "lease", capsys) == ["kb/note.md"]


def test_index_reads_formats_and_reports_every_skip(tmp_path, capsys, monkeypatch):
    from tests.unit.test_loaders import make_pdf

    pytest.importorskip("pypdf")
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "page.html").write_text("<html><head><title>T</title><script>var leaked=1"
                                  "</script></head><body><p>Green tea has catechins.</p>"
                                  "</body></html>")
    (kb / "recs.jsonl").write_text(json.dumps({"body": "Dogs are loyal.", "kind": "pet"})
                                   + "\nnot json\n")
    make_pdf(kb / "manual.pdf", ["Error E1042 means the lease was lost."])
    (kb / "latin.txt").write_bytes("café au lait".encode("latin-1"))
    (kb / "data.json").write_text("{}")
    (kb / ".secret.md").write_text("hidden")
    store = str(tmp_path / "store")
    report = index_json([str(kb), "--store", store, "--text-field", "body"], capsys)
    assert sorted(f["type"] for f in report["files"]) == ["html", "jsonl", "pdf"]
    reasons = {(Path(s["path"]).name, s.get("line")): s["kind"] for s in report["skipped"]}
    assert reasons == {("latin.txt", None): "encoding", ("data.json", None): "unsupported",
                       (".secret.md", None): "hidden", ("recs.jsonl", 2): "invalid"}
    assert search_ids(store, "catechins", capsys, k=1) == ["kb/page.html"]
    assert search_ids(store, "E1042", capsys, k=1) == ["kb/manual.pdf"]
    assert main(["search", "loyal", "--store", store, "--k", "1", "--json"]) == 0
    (hit,) = json.loads(capsys.readouterr().out)
    assert hit["id"] == "kb/recs.jsonl:1" and hit["metadata"]["kind"] == "pet"
    assert main(["search", "leaked", "--store", store, "--mode", "sparse", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []  # script text was not indexed

    # the text report names each actionable skip and counts the rest
    assert main(["index", str(kb), "--store", store, "--text-field", "body", "-q"]) == 0
    out = capsys.readouterr().out
    assert "latin.txt: not valid utf-8" in out and "--encoding" in out
    assert "recs.jsonl line 2: not JSON" in out
    assert "1 hidden" in out and "1 not indexed by type: .json (1)" in out

    # without pypdf, the PDF is skipped with the exact install, and keeps its documents
    monkeypatch.setitem(sys.modules, "pypdf", None)
    report = index_json([str(kb), "--store", store, "--text-field", "body", "--prune"], capsys)
    (pdf,) = [s for s in report["skipped"] if s["path"].endswith("manual.pdf")]
    assert pdf["kind"] == "missing-extra" and "pip install 'retrievekit[pdf]'" in pdf["reason"]
    assert report["pruned"] == []
    assert search_ids(store, "E1042", capsys, k=1) == ["kb/manual.pdf"]


def test_model_of_another_store_fails_listing_the_difference(tmp_path, capsys):
    from retrievekit.models import resolve_model

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("Alpha beta gamma.")
    store = str(tmp_path / "store")
    assert main(["index", str(docs), "--store", store, "-q"]) == 0
    capsys.readouterr()
    (docs / "b.md").write_text("Delta epsilon.")
    # the same weights under another name are another model to the store: refused
    other = resolve_model("sentence-transformers/all-MiniLM-L6-v2").load_from
    assert main(["index", str(docs), "--store", store, "--model", other, "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --model")
    assert "embedder.model: store has 'sentence-transformers/all-MiniLM-L6-v2'" in err
    assert f"--model gives {other!r}" in err and "omit --model" in err
    assert main(["info", "--store", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 1  # nothing was written
    assert main(["index", str(docs), "--store", store, "--model",
                 "sentence-transformers/all-MiniLM-L6-v2", "-q"]) == 0
    assert "1 records written" in capsys.readouterr().out


def test_a_refused_model_releases_the_store_while_its_error_is_held(tmp_path):
    """The retriever opened to compare models is closed when the model is refused, not
    left to the garbage collector: a caller that keeps the error (and so its traceback's
    frames) can open the store again."""
    from retrievekit.cli import _open, build_parser
    from retrievekit.errors import StoreMismatchError
    from retrievekit.models import resolve_model
    from retrievekit.pipeline import HybridRetriever

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("Alpha beta gamma.")
    store = str(tmp_path / "store")
    assert main(["index", str(docs), "--store", store, "-q"]) == 0
    other = resolve_model("sentence-transformers/all-MiniLM-L6-v2").load_from
    args = build_parser().parse_args(["index", str(docs), "--store", store, "--model", other])
    with pytest.raises(StoreMismatchError) as held:
        _open(args, write=True)
    with HybridRetriever.open(store) as r:  # the index writer's lock was released
        assert r.count() == 1
    assert held.value.__traceback__ is not None


def test_nothing_to_index_and_failed_index_leave_no_store(tmp_path, capsys, monkeypatch):
    from retrievekit.pipeline import HybridRetriever

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "latin.txt").write_bytes(b"caf\xe9")
    store = tmp_path / "store"
    assert main(["index", str(docs), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert "nothing to index" in err and "latin.txt: not valid utf-8" in err
    assert not store.exists()
    (docs / "ok.md").write_text("Some text.")

    def boom(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(HybridRetriever, "add_documents", boom)
    assert main(["index", str(docs), "--store", str(store)]) == 2
    assert capsys.readouterr().err == "error: [Errno 28] No space left on device\n"
    assert not store.exists()


def test_read_only_commands_with_a_config_create_no_store(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('mode = "sparse"\ncandidates = 20\n')
    typo = tmp_path / "typo"
    for argv in (["search", "x"], ["info"], ["delete", "x"]):
        assert main([*argv, "--store", str(typo), "--config", str(cfg)]) == 2, argv
        assert "no retrievekit store" in capsys.readouterr().err
        assert not typo.exists(), argv


def test_every_error_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    from retrievekit.pipeline import HybridRetriever

    assert main(["search", "x", "--k", "many", "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid int value: 'many'" in err
    assert main(["frobnicate"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("Alpha.")
    store = str(tmp_path / "s")
    assert main(["index", str(docs), "--store", store, "-q"]) == 0
    capsys.readouterr()

    def bug(self, *a, **k):
        raise TypeError("an internal bug\nover two lines")

    monkeypatch.setattr(HybridRetriever, "search", bug)
    assert main(["search", "alpha", "--store", store]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unexpected TypeError: an internal bug over two" in err
    assert "Traceback" not in err


def test_no_log_lines_without_verbose(tmp_path):
    """The real command in a child process: without -v, index and search print nothing on
    stderr (no INFO/DEBUG lines, no progress bars when not a terminal); -v logs INFO."""
    import os
    import re
    import subprocess

    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("Cats purr and hunt mice.")
    for i in range(12):  # more than a query-sized batch: bulk encoding may load torch
        (docs / f"n{i}.md").write_text(f"Note {i} about systems programming languages.")
    store = str(tmp_path / "store")

    def run(*argv: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "retrievekit.cli", *argv], env=env,
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return done

    log_line = re.compile(r"^(DEBUG|INFO)\b", re.M)
    assert run("index", str(docs), "--store", store).stderr == ""
    quiet = run("search", "which pets hunt mice", "--store", store)
    assert quiet.stderr == "" and "docs/a.md" in quiet.stdout
    loud = run("-v", "search", "which pets hunt mice", "--store", store)
    assert log_line.search(loud.stderr), loud.stderr  # the check above can see log lines


# -- a --config file's [store] and [reranker] tables, and a table given in part ---------------
def _kb(tmp_path) -> str:
    kb = tmp_path / "kb"
    kb.mkdir()
    for name, text in [("cats.txt", "Cats purr and chase mice."), ("dogs.txt", "Dogs bark."),
                       ("fish.txt", "Fish swim in the sea."), ("owls.txt", "Owls hunt mice."),
                       ("bees.txt", "Bees make honey.")]:
        (kb / name).write_text(text)
    return str(kb)


def test_config_store_table_names_the_store_and_flags_win(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kb = _kb(tmp_path)
    cfg = tmp_path / "rk.toml"
    cfg.write_text('[store]\npath = "mine"\ncollection = "mycoll"\n')
    assert main(["index", kb, "--config", str(cfg), "-q", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["collection"] == "mycoll"
    assert (tmp_path / "mine" / "chroma.sqlite3").exists()
    assert not (tmp_path / ".retrievekit").exists()  # the default store was not made
    assert main(["info", "--config", str(cfg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 5
    # a flag wins over the table: no store at "other", so the read is refused
    assert main(["info", "--config", str(cfg), "--store", "other"]) == 2
    assert "no retrievekit store" in capsys.readouterr().err


def test_config_with_a_table_in_part_keeps_the_recorded_settings(tmp_path, capsys):
    from retrievekit.pipeline import HybridRetriever

    store = str(tmp_path / "store")
    HybridRetriever({"store": {"path": store}, "sparse": {"tokenizer": {"stemmer": False}},
                     "chunking": {"max_tokens": 64}, "embedder": {"truncate_dim": 128}}
                    ).close()
    assert main(["index", _kb(tmp_path), "--store", store, "-q"]) == 0
    capsys.readouterr()
    for n, table in enumerate(['[embedder]\nbatch_size = 8\n',
                               '[sparse.tokenizer]\nmin_token_len = 1\n',
                               '[chunking]\nenabled = true\n']):
        cfg = tmp_path / f"part{n}.toml"
        cfg.write_text(table)
        assert main(["search", "mice", "--store", store, "--config", str(cfg)]) == 0, \
            capsys.readouterr().err
        assert "cats.txt" in capsys.readouterr().out
    for table in ({"embedder": {"batch_size": 8}}, {"sparse": {"tokenizer": {"lowercase": True}}},
                  {"chunking": {"enabled": True}}):
        with HybridRetriever.open(store, **table) as r:
            assert r.config.embedder.truncate_dim == 128
            assert r.config.chunking.max_tokens == 64
            assert r.config.sparse.tokenizer.stemmer is None


def test_rerank_flags_lay_over_the_config_reranker(tmp_path, capsys, tiny_cross_encoder_path):
    store = str(tmp_path / "store")
    assert main(["index", _kb(tmp_path), "--store", store, "-q"]) == 0
    capsys.readouterr()
    cfg = tmp_path / "rr.toml"
    cfg.write_text(f'[reranker]\nmodel = "{tiny_cross_encoder_path}"\ntop_n = 2\n'
                   'weight = 0.5\ncandidates = 3\n')

    def hits(*flags):
        assert main(["search", "mice", "--store", store, "--config", str(cfg), "--json",
                     *flags]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out)

    for flags in ((), ("--rerank", tiny_cross_encoder_path)):
        got = hits(*flags)  # top_n 2 and weight 0.5 (a blend) from the table either way
        assert len(got) == 2 and all("blend" in h["ranks"] for h in got)
    assert all("blend" not in h["ranks"] for h in hits("--rerank-weight", "1"))
    # a weight with no reranker to weigh is refused, not ignored; a bad one is refused
    assert main(["search", "mice", "--store", store, "--rerank-weight", "0.5"]) == 2
    assert "--rerank-weight 0.5 has no reranker" in capsys.readouterr().err
    assert main(["search", "mice", "--store", store, "--config", str(cfg),
                 "--rerank-weight", "nan"]) == 2
    assert "reranker.weight" in capsys.readouterr().err
