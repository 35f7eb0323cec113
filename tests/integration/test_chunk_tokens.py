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
