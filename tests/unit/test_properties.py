"""Property tests (hypothesis) for RRF fusion and the BM25 tokenizer."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from retrievekit.fusion import reciprocal_rank_fusion
from retrievekit.records import Record
from retrievekit.sparse import SparseIndex
from retrievekit.tokenize import Tokenizer, TokenizerConfig

settings.register_profile("rk", max_examples=150, deadline=None)
settings.load_profile("rk")

ids = st.sampled_from([f"d{i}" for i in range(12)])
ranked_list = st.lists(st.tuples(ids, st.floats(-10, 10, allow_nan=False)), max_size=15)
ranked_lists = st.dictionaries(st.sampled_from(["dense", "sparse", "third"]), ranked_list,
                               min_size=1, max_size=3)
rrf_k = st.one_of(st.just(60), st.floats(0, 200, allow_nan=False))


def _as_tuples(fused):
    return [(f.id, round(f.score, 12), f.ranks, f.scores) for f in fused]


def _dedup(items):
    seen, out = set(), []
    for doc_id, score in items:
        if doc_id not in seen:
            seen.add(doc_id)
            out.append((doc_id, score))
    return out


@given(ranked_lists, rrf_k)
def test_order_of_the_lists_does_not_matter_with_equal_weights(lists, k):
    forward = reciprocal_rank_fusion(lists, k=k)
    backward = reciprocal_rank_fusion(dict(reversed(list(lists.items()))), k=k)
    assert _as_tuples(forward) == _as_tuples(backward)


@given(ranked_lists, rrf_k)
def test_output_is_deduplicated_and_covers_every_input_id(lists, k):
    fused = reciprocal_rank_fusion(lists, k=k)
    out = [f.id for f in fused]
    assert len(out) == len(set(out))
    assert set(out) == {doc_id for items in lists.values() for doc_id, _ in items}
    # a repeated id inside a list counts once, at its first (best) position
    doubled = {name: items + items for name, items in lists.items()}
    assert _as_tuples(reciprocal_rank_fusion(doubled, k=k)) == _as_tuples(fused)


@given(ranked_lists, rrf_k, st.dictionaries(st.sampled_from(["dense", "sparse", "third"]),
                                            st.floats(0, 5, allow_nan=False)))
def test_scores_are_bounded_sorted_and_match_the_formula(lists, k, weights):
    weights = {n: w for n, w in weights.items() if n in lists}
    fused = reciprocal_rank_fusion(lists, k=k, weights=weights)
    total_w = sum(weights.get(n, 1.0) for n in lists)
    for f in fused:
        assert 0 <= f.score <= total_w / (k + 1) + 1e-12
        expected = sum(weights.get(n, 1.0) / (k + r) for n, r in f.ranks.items())
        assert abs(f.score - expected) <= 1e-12
        for name, r in f.ranks.items():  # ranks are 1-based positions in the deduped list
            assert _dedup(lists[name])[r - 1][0] == f.id
    assert [f.score for f in fused] == sorted((f.score for f in fused), reverse=True)


@given(ranked_lists, rrf_k, st.data())
def test_moving_a_document_up_never_lowers_its_score(lists, k, data):
    name = data.draw(st.sampled_from(sorted(lists)))
    items = _dedup(lists[name])
    if len(items) < 2:
        return
    pos = data.draw(st.integers(1, len(items) - 1))
    moved = items[:pos - 1] + [items[pos]] + [items[pos - 1]] + items[pos + 1:]
    before = {f.id: f.score for f in reciprocal_rank_fusion(lists, k=k)}
    after = {f.id: f.score for f in reciprocal_rank_fusion({**lists, name: moved}, k=k)}
    up, down = items[pos][0], items[pos - 1][0]
    assert after[up] > before[up]  # 1/(k + r - 1) > 1/(k + r)
    assert after[down] < before[down]


any_text = st.text(st.characters(codec="utf-8"), max_size=80)
mixed = st.lists(st.sampled_from([
    "Hello", "WORLD", "naïve", "Straße", "İstanbul", "ǅemal", "ΣΊΣΥΦΟΣ", "東京都", "日本語の文章",
    "한국어", "🙂", "👩‍💻", "e\u0301", "\u200b", "", " ", "\t\n", "x_y", "42", "ﬁne", "Ⅻ",
]), max_size=8).map(" ".join)
configs = st.builds(TokenizerConfig, lowercase=st.booleans(),
                    stopwords=st.sampled_from([None, "en", ("the", "a")]),
                    stemmer=st.sampled_from([None, "english", "porter", "german"]),
                    min_token_len=st.integers(1, 3))


@given(configs, st.one_of(any_text, mixed))
def test_tokenizer_never_crashes_and_gives_nonempty_tokens(config, text):
    tokens = Tokenizer(config)(text)
    assert isinstance(tokens, list)
    assert all(isinstance(t, str) and len(t) >= config.min_token_len for t in tokens)
    assert all(not t.isspace() for t in tokens)


@given(st.one_of(any_text, mixed))
def test_lowercase_is_idempotent(text):
    tok = Tokenizer(TokenizerConfig(lowercase=True, stopwords=None, stemmer=None))
    tokens = tok(text)
    assert tok(text.lower()) == tokens
    assert tok(" ".join(tokens)) == tokens  # tokens re-tokenize to themselves


@given(st.text(st.sampled_from("東京都日本語文章한국어ひらがなカタカナ"), min_size=1, max_size=20))
def test_cjk_is_split_into_characters(text):
    assert Tokenizer(TokenizerConfig(stopwords=None, stemmer=None))(text) == list(text)


def test_empty_and_symbol_only_texts():
    tok = Tokenizer()
    for text in ["", " ", "\n\t", "!!!", "🙂🙂", "___", "\u200b"]:
        assert tok(text) == []


@given(st.lists(st.one_of(any_text, mixed), min_size=1, max_size=6), st.one_of(any_text, mixed))
def test_bm25_search_on_any_text_never_crashes(texts, query):
    index = SparseIndex()
    index.replace([], [Record(f"d{i}", f"d{i}", t, {}) for i, t in enumerate(texts)])
    index.commit(1)
    hits = index.search(query, 5)
    assert len(hits) <= 5 and all(score > 0 for _, score in hits)
    assert len({d for d, _ in hits}) == len(hits)


@given(st.integers(0, 2 ** 64 - 1), st.integers(0, 2 ** 64 - 1), st.integers(0, 2 ** 64 - 1))
def test_ordered_blocks_cover_exactly_the_keys_between(a, b, probe):
    from retrievekit.filters import _LEVELS, _STEP, _blocks

    lo, hi = min(a, b), max(a, b)
    blocks = _blocks(lo, hi)
    assert len(blocks) <= _LEVELS * 2 * (2 ** _STEP - 1)
    spans = sorted((p << (_STEP * lv), ((p + 1) << (_STEP * lv)) - 1) for lv, p in blocks)
    assert spans[0][0] == lo and spans[-1][1] == hi  # contiguous, no overlap, no gap
    assert all(x[1] + 1 == y[0] for x, y in zip(spans, spans[1:]))
    for n in (probe, lo, hi, lo - 1, hi + 1):
        if 0 <= n < 2 ** 64:
            covered = sum(1 for lv, p in blocks if n >> (_STEP * lv) == p)
            assert covered == (1 if lo <= n <= hi else 0), (lo, hi, n)


@given(st.lists(st.one_of(st.integers(-(2 ** 63), 2 ** 63 - 1),
                          st.floats(allow_nan=False)), min_size=2, max_size=2))
def test_order_keys_keep_the_order_of_numbers(pair):
    from retrievekit.filters import _order_key

    x, y = pair
    if type(x) is type(y):
        assert (x < y) == (_order_key(x)[1] < _order_key(y)[1])
        assert (x == y) == (_order_key(x)[1] == _order_key(y)[1])
