"""Query and document prefixes (a.k.a. prompts or instructions) for embedding models.

Resolved in one order: the user's setting, then the prompts the model ships
(config_sentence_transformers.json), then `KNOWN_FAMILIES`, then none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BGE_EN = "Represent this sentence for searching relevant passages: "

#: (pattern on the lowercased model name, query prefix, document prefix); first match wins.
KNOWN_FAMILIES: tuple[tuple[str, str, str], ...] = (
    (r"multilingual-e5-.*instruct|e5-mistral", "Instruct: Given a web search query, retrieve "
     "relevant passages that answer the query\nQuery: ", ""),
    (r"(^|/)(multilingual-)?e5-", "query: ", "passage: "),
    (r"bge-(small|base|large)-en-v1\.5", _BGE_EN, ""),
    (r"bge-(small|base|large)-en($|[^-])", _BGE_EN, ""),
    (r"bge-(small|base|large)-zh", "为这个句子生成表示以用于检索相关文章：", ""),
    (r"nomic-embed-text", "search_query: ", "search_document: "),
    (r"mxbai-embed-large", _BGE_EN, ""),
    (r"snowflake-arctic-embed", _BGE_EN, ""),
    (r"gte-", "", ""),
)

_QUERY_KEYS = ("query", "search_query", "retrieval.query")
_DOC_KEYS = ("document", "passage", "search_document", "corpus", "retrieval.passage")


@dataclass(frozen=True)
class Prefixes:
    """Resolved prefixes and where each came from ("user", "model", "table", "none")."""

    query: str
    document: str
    query_source: str = "none"
    document_source: str = "none"


def _from_prompts(prompts: dict[str, str], keys: tuple[str, ...]) -> str | None:
    """The first non-empty prompt under `keys`. An empty one is not a choice the model made:
    sentence-transformers 6 fills `{"query": "", "document": ""}` into every model's
    prompts and writes them on save, so an empty prompt would hide a prompt the model ships
    under another key (nomic's `search_query`) and the table (bge, e5)."""
    for key in keys:
        if prompts.get(key):
            return prompts[key]
    return None


def resolve_prefixes(
    model_name: str,
    *,
    query_prefix: str | None = None,
    document_prefix: str | None = None,
    model_prompts: dict[str, str] | None = None,
) -> Prefixes:
    """Resolve the query and document prefix for `model_name`.

    `None` means "not set by the user"; an empty string is a deliberate "no prefix".
    """
    table_q = table_d = None
    low = model_name.lower()
    for pattern, q, d in KNOWN_FAMILIES:
        if re.search(pattern, low):
            table_q, table_d = q, d
            break
    prompts = model_prompts or {}
    shipped_q = _from_prompts(prompts, _QUERY_KEYS)
    shipped_d = _from_prompts(prompts, _DOC_KEYS)

    def pick(user: str | None, shipped: str | None, table: str | None) -> tuple[str, str]:
        if user is not None:
            return user, "user"
        if shipped is not None:
            return shipped, "model"
        if table is not None:
            return table, "table"
        return "", "none"

    q, qs = pick(query_prefix, shipped_q, table_q)
    d, ds = pick(document_prefix, shipped_d, table_d)
    return Prefixes(q, d, qs, ds)
