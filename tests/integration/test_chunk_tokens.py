"""The token lengths and offsets a write chunks by (`chunking.token_lengths`) are the
model tokenizer's own, whatever truncation an earlier encode left on its backend."""

from __future__ import annotations

from retrievekit.chunking import token_lengths

TEXTS = [
    "short",
    "caf\u00e9 na\u00efve \u4e2d\u6587 \U0001F600 emoji " * 40,
    "word " * 700,
    "\u2028line\u2029separators and a BOM \ufeff inside " * 30,
    " ",
    "x" * 3000,
]


def _reference(tok, texts):
    enc = tok(texts, add_special_tokens=False, truncation=False, verbose=False,
              return_offsets_mapping=True)
    return [(len(ids), [tuple(o) for o in offs])
            for ids, offs in zip(enc["input_ids"], enc["offset_mapping"])]


def test_lengths_and_offsets_are_the_tokenizer_s_after_a_truncating_encode(embedder):
    tok = embedder.tokenizer
    want = _reference(tok, TEXTS)
    # sentence-transformers encodes with truncation at the model's length: that setting
    # stays on the shared backend, and a bare call of it would cut every length to 16
    tok(["warm up " * 100], truncation=True, max_length=16)
    window = 20
    got = token_lengths(tok, TEXTS, window)
    assert [n for n, _ in got] == [n for n, _ in want]
    assert max(n for n, _ in got) > 600
    for (n, offs), (_, ref) in zip(got, want):
        assert (offs is None) == (n <= window)
        if offs is not None:
            assert [tuple(o) for o in offs] == ref
    # the shared tokenizer is left as it was
    assert len(tok(["word " * 100], truncation=True, max_length=16)["input_ids"][0]) == 16


def test_every_chunk_fits_the_window_when_read_on_its_own(embedder):
    """A chunk never starts on a word piece: re-tokenized on its own, such a piece became
    more tokens, and a chunk of the full window ran past what the model reads (its last
    words unseen). Random texts of long made-up words, short words and punctuation; each
    chunk, tokenized alone, fits the window, and the chunks cover the text."""
    import random

    from retrievekit.chunking import split_offsets

    tok = embedder.tokenizer
    rng = random.Random(5)
    syllables = ["tran", "script", "izz", "ly", "fran", "cis", "can", "ozo", "qua", "x"]
    window, overlap = 40, 8
    for _ in range(60):
        words = ["".join(rng.choices(syllables, k=rng.randint(1, 6))) if rng.random() < 0.4
                 else rng.choice(["a", "b", "of", "-", ",", "the"]) for _ in range(150)]
        text = " ".join(words)
        (n, offsets), = token_lengths(tok, [text], window)
        spans = split_offsets(text, offsets, window, overlap)
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        assert all(b[0] <= a[1] for a, b in zip(spans, spans[1:]))  # no gap
        for a, b in spans:
            alone = len(tok(text[a:b], add_special_tokens=False)["input_ids"])
            assert alone <= window, (text[a:b][:40], alone)
