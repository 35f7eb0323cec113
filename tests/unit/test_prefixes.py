from __future__ import annotations

import numpy as np
import pytest

from retrievekit.embedding import truncate_and_normalize
from retrievekit.prefixes import resolve_prefixes


@pytest.mark.parametrize("name,q,d", [
    ("intfloat/e5-base-v2", "query: ", "passage: "),
    ("intfloat/multilingual-e5-large", "query: ", "passage: "),
    ("BAAI/bge-small-en-v1.5", "Represent this sentence for searching relevant passages: ", ""),
    ("nomic-ai/nomic-embed-text-v1.5", "search_query: ", "search_document: "),
    ("mixedbread-ai/mxbai-embed-large-v1",
     "Represent this sentence for searching relevant passages: ", ""),
    ("Snowflake/snowflake-arctic-embed-m-v1.5",
     "Represent this sentence for searching relevant passages: ", ""),
    ("thenlper/gte-base", "", ""),
    ("sentence-transformers/all-MiniLM-L6-v2", "", ""),
])
def test_table(name, q, d):
    p = resolve_prefixes(name)
    assert (p.query, p.document) == (q, d)


def test_e5_instruct_form():
    p = resolve_prefixes("intfloat/multilingual-e5-large-instruct")
    assert p.query.startswith("Instruct: ") and p.query.endswith("\nQuery: ")
    assert p.document == ""


def test_order_user_then_model_then_table():
    shipped = {"query": "Q: ", "document": "D: "}
    p = resolve_prefixes("intfloat/e5-base-v2", model_prompts=shipped)
    assert (p.query, p.document, p.query_source) == ("Q: ", "D: ", "model")
    p = resolve_prefixes("intfloat/e5-base-v2", query_prefix="mine: ", model_prompts=shipped)
    assert (p.query, p.query_source, p.document_source) == ("mine: ", "user", "model")
    # an explicit empty string is a deliberate "no prefix", not "unset"
    p = resolve_prefixes("intfloat/e5-base-v2", query_prefix="", document_prefix="")
    assert (p.query, p.document, p.query_source) == ("", "", "user")
    assert resolve_prefixes("intfloat/e5-base-v2").query_source == "table"


def test_truncate_then_normalize():
    v = np.array([[3.0, 4.0, 12.0], [0.0, 0.0, 5.0]], dtype=np.float32)
    out = truncate_and_normalize(v, 2, True)
    np.testing.assert_allclose(out[0], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(out[1], [0.0, 0.0])  # a zero row stays zero, no NaN
    full = truncate_and_normalize(v, None, True)
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), [1.0, 1.0], rtol=1e-6)
    raw = truncate_and_normalize(v, 2, False)
    np.testing.assert_array_equal(raw, v[:, :2])


def test_empty_shipped_prompts_are_unset():
    """sentence-transformers 6 writes {"query": "", "document": ""} into every model it
    saves and loads: those empty prompts must not hide the table or a prompt the model
    ships under another key."""
    defaults = {"query": "", "document": ""}
    p = resolve_prefixes("BAAI/bge-small-en-v1.5", model_prompts=defaults)
    assert (p.query, p.query_source) == (
        "Represent this sentence for searching relevant passages: ", "table")
    nomic = {**defaults, "search_query": "search_query: ",
             "search_document": "search_document: "}
    p = resolve_prefixes("nomic-ai/nomic-embed-text-v1.5", model_prompts=nomic)
    assert (p.query, p.document, p.query_source) == ("search_query: ", "search_document: ",
                                                      "model")
    p = resolve_prefixes("intfloat/e5-base-v2", model_prompts={"query": "", "document": "D: "})
    assert (p.query, p.document) == ("query: ", "D: ")
