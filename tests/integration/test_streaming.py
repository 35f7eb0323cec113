"""Streamed `add_documents`: an iterable is read, chunked, encoded and written in batches of
at most `batch_records` records, never held whole; ids come back in input order; a repeated
id with other content is refused; a bad document found mid-stream leaves the batches before
it written and whole, and the error says which document and how many were written. A list is
still validated whole before any write.

Batches are observed in the real store: every record carries the sequence number of the
change-log entry (= Chroma batch) that wrote it, and the generators below look at Chroma's
count while they are being read.
"""

from __future__ import annotations

from collections import Counter

import pytest

from retrievekit import writer
from retrievekit.chunking import token_lengths
from retrievekit.errors import InvalidInputError
from retrievekit.pipeline import HybridRetriever
from retrievekit.records import PARENT_KEY, SEQ_KEY
from retrievekit.types import Document, text_id

CHUNKED = {"chunking": {"max_tokens": 16, "overlap_tokens": 2}}


#: one model token each
WORDS = ("river", "stone", "cloud", "engine", "garden", "signal", "copper", "lantern",
         "harbor", "meadow", "glacier", "orbit", "violin", "pepper", "canyon", "saddle")


def _doc(i: int, chunks: int = 1) -> Document:
    """A document of exactly `chunks` records under CHUNKED (14 tokens a chunk; one record,
    not chunked, for 1)."""
    words = " ".join(WORDS[(i + k) % 16] for k in range(14 * chunks - 2))
    return Document(text=f"number {i} {words}", id=f"d{i:03d}", metadata={"i": i})


def _batches(r: HybridRetriever) -> Counter:
    """Records per writing log entry (each Chroma batch claims one)."""
    seqs: Counter = Counter()
    for batch in r.store.iter_records(include=["metadatas"]):
        for meta in batch["metadatas"]:
            seqs[meta[SEQ_KEY]] += 1
    return seqs


def _parents_of(r: HybridRetriever) -> set[str]:
    return {m[PARENT_KEY] for b in r.store.iter_records(include=["metadatas"])
            for m in b["metadatas"]}


def test_a_generator_is_written_batch_by_batch_within_the_bound(tmp_path, tiny_embedder):
    sizes = [1] * 40
    sizes[3], sizes[11], sizes[12], sizes[20], sizes[27] = 3, 2, 4, 10, 5  # records each
    docs = [_doc(i, c) for i, c in enumerate(sizes)]
    written_when_read: list[int] = []  # Chroma's record count as each document is read
    with HybridRetriever(path=str(tmp_path / "s"), embedder=tiny_embedder, config=CHUNKED) as r:
        def stream():
            for d in docs:
                written_when_read.append(r.store.count())
                yield d

        ids = r.add_documents(stream(), batch_records=5)
        assert ids == [d.id for d in docs]
        assert r.count() == sum(sizes) and r.verify()["ok"]
        # every Chroma batch within the bound but the one of the 10-record document alone
        per_batch = sorted(_batches(r).values())
        assert per_batch[-1] == 10 and per_batch[-2] <= 5 and sum(per_batch) == sum(sizes)
        # never read ahead of the writes by more than the batch being filled (at most 5
        # records, or the one longer document) and the group of 5 documents being
        # tokenized: held at once is bounded, not the whole input
        for i, seen in enumerate(written_when_read):
            group = sum(sizes[5 * (i // 5):i])
            assert sum(sizes[:i]) - seen <= 10 + group, (i, seen)
        assert {d.id: d.text for d in r.get(ids)} == {d.id: d.text for d in docs}


def test_the_default_bound_is_one_chroma_batch(tmp_path, tiny_embedder):
    with HybridRetriever(path=str(tmp_path / "s"), embedder=tiny_embedder) as r:
        bound = r.store.max_batch  # 5,461 with chromadb 1.x embedded
        n = bound + 300
        docs = (Document(f"short text {i} word{i % 17}", id=f"s{i}") for i in range(n))
        assert len(r.add_documents(docs)) == n
        assert sorted(_batches(r).values()) == [300, bound]
        assert r.last_add_stats == {"written": n, "unchanged": 0, "removed": 0}


def test_ids_in_input_order_with_repeats_and_generated_ids(tmp_path, tiny_embedder):
    items = ["first text", Document("second text", id="b"), {"text": "third text"},
             Document("second text", id="b"), "first text", Document("fourth", id="a")]
    want = [text_id("first text"), "b", text_id("third text"), "b", text_id("first text"), "a"]
    with HybridRetriever(path=str(tmp_path / "s"), embedder=tiny_embedder) as r:
        assert r.add_documents(iter(items), batch_records=2) == want
        assert r.count() == 4 and r.verify()["ok"]
        assert r.add_documents(items, batch_records=2) == want
        assert r.last_add_stats["written"] == r.last_add_stats["removed"] == 0


def test_a_repeated_id_with_other_content_across_batches(tmp_path, tiny_embedder):
    docs = [_doc(i) for i in range(6)] + [Document("other content", id="d000")]
    with HybridRetriever(path=str(tmp_path / "s"), embedder=tiny_embedder) as r:
        # a list: refused before any write, however far apart the two are
        with pytest.raises(InvalidInputError) as err:
            r.add_documents(docs, batch_records=2)
        assert "documents[6]" in str(err.value) and "'d000'" in str(err.value)
        assert "streamed" not in str(err.value) and r.store.count() == 0
        # a generator: found when reached, after the batches before it
        with pytest.raises(InvalidInputError) as err:
            r.add_documents(iter(docs), batch_records=2)
        msg = str(err.value)
        assert "documents[6]" in msg and "'d000'" in msg and "unique" in msg
        assert "documents[0:4]" in msg and "were written" in msg
        assert _parents_of(r) == {"d000", "d001", "d002", "d003"}
        assert r.get(["d000"])[0].text == docs[0].text  # the first version stays
        assert r.verify()["ok"]


@pytest.mark.parametrize("bad, words", [
    (Document("", id="e"), ["documents[7].text", "non-empty str"]),
    (Document("t", id="n", metadata={"tags": []}), ["documents[7].metadata['tags']"]),
    (42, ["documents[7]", "Document, a str or a dict"]),
])
def test_a_bad_document_mid_stream_leaves_earlier_batches_whole(tmp_path, tiny_embedder,
                                                                bad, words):
    good = [_doc(i, chunks=1 + i % 3) for i in range(7)]  # 1-3 chunks each
    with HybridRetriever(path=str(tmp_path / "s"), embedder=tiny_embedder, config=CHUNKED) as r:
        with pytest.raises(InvalidInputError) as err:
            r.add_documents(good + [bad] + [_doc(8)], batch_records=4)
        assert r.store.count() == 0 and "streamed" not in str(err.value)

        with pytest.raises(InvalidInputError) as err:
            r.add_documents(iter(good + [bad] + [_doc(8)]), batch_records=4)
        msg = str(err.value)
        for w in words:
            assert w in msg, (w, msg)
        stored = _parents_of(r)
        written = int(msg.split("documents[0:")[1].split("]")[0])
        assert 0 < written < 7 and stored == {d.id for d in good[:written]}
        for doc in r.get(sorted(stored)):  # each whole: every chunk of its text is there
            assert doc.text == good[int(doc.id[1:])].text
        assert r.verify()["ok"]
        # the documented fix: add the whole input again (without the bad one)
        r.add_documents(iter(good + [_doc(8)]), batch_records=4)
        assert _parents_of(r) == {d.id for d in good} | {"d008"}
        assert r.last_add_stats["unchanged"] == sum(1 + int(d.id[1:]) % 3 for d in
                                                    good[:written])


def test_too_long_with_chunking_off_list_refused_first_generator_after(tmp_path,
                                                                       tiny_embedder):
    long = Document(" ".join(f"word{i}" for i in range(400)), id="long")
    docs = [_doc(i) for i in range(5)] + [long]
    with HybridRetriever({"chunking": {"enabled": False}}, path=str(tmp_path / "s"),
                         embedder=tiny_embedder) as r:
        with pytest.raises(InvalidInputError) as err:
            r.add_documents(docs, batch_records=2)
        assert "documents[5]" in str(err.value) and "'long'" in str(err.value)
        assert r.store.count() == 0
        with pytest.raises(InvalidInputError) as err:
            r.add_documents(iter(docs), batch_records=2)
        # found when its group of 2 is tokenized: [0, 1] written, [2, 3] waiting, not written
        assert "documents[5]" in str(err.value) and "documents[0:2]" in str(err.value)
        assert _parents_of(r) == {"d000", "d001"} and r.verify()["ok"]


def test_each_text_is_tokenized_once_before_encoding(tmp_path, tiny_embedder, monkeypatch):
    """The length check and the chunk split share one tokenizer pass per text (the encoder,
    which reads the texts of the records, tokenizes on its own)."""
    docs = [_doc(i, chunks=1 + i % 4) for i in range(12)]
    with HybridRetriever(path=str(tmp_path / "s"), embedder=tiny_embedder, config=CHUNKED) as r:
        tok = r.embedder.tokenizer
        seen: Counter = Counter()
        real = type(tok).__call__

        def counting(self, text, *args, **kwargs):
            if kwargs.get("add_special_tokens") is False:  # not the encoder's own calls
                for t in [text] if isinstance(text, str) else text:
                    seen[t] += 1
            return real(self, text, *args, **kwargs)

        def lengths(tokenizer, texts, window):  # its own copy of the tokenizer's backend
            for t in texts:
                seen[t] += 1
            return token_lengths(tokenizer, texts, window)

        monkeypatch.setattr(type(tok), "__call__", counting)
        monkeypatch.setattr(writer, "token_lengths", lengths)
        r.add_documents(docs, batch_records=6)
        assert all(seen[d.text] == 1 for d in docs), [seen[d.text] for d in docs]
        assert r.count() > len(docs)  # the long ones were chunked


def test_progress_bar_over_documents(tmp_path, tiny_embedder, capsys):
    docs = [Document(f"text number {i}", id=f"p{i}") for i in range(300)]
    with HybridRetriever(path=str(tmp_path / "s"), embedder=tiny_embedder) as r:
        r.add_documents(docs, batch_records=100)  # stderr is not a terminal here: no bar
        assert "add_documents" not in capsys.readouterr().err
        r.add_documents([Document(d.text + " v2", id=d.id) for d in docs], progress=True,
                        batch_records=100)
        err = capsys.readouterr().err
        assert "add_documents" in err and "300/300" in err and "Batches" not in err


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "10"])
def test_bad_batch_records(tmp_path, tiny_embedder, value):
    with HybridRetriever(path=str(tmp_path / "s"), embedder=tiny_embedder) as r:
        with pytest.raises(InvalidInputError, match="batch_records must be an int >= 1"):
            r.add_documents(["a text"], batch_records=value)
        assert r.store.count() == 0


def test_a_failing_generator_says_what_was_written(tmp_path, tiny_embedder):
    def stream():
        for i in range(7):
            yield _doc(i)
        raise OSError("the source went away")

    with HybridRetriever(path=str(tmp_path / "s"), embedder=tiny_embedder) as r:
        with pytest.raises(OSError, match="went away") as err:
            r.add_documents(stream(), batch_records=3)
        notes = " ".join(getattr(err.value, "__notes__", []))
        # [0:3] written; [3:6] waited for the next group, which the error ended
        assert "documents[0:3] were written" in notes
        assert _parents_of(r) == {"d000", "d001", "d002"} and r.verify()["ok"]
