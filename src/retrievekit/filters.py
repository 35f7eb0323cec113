"""Chroma `where` filters evaluated inside the BM25 index, with Chroma's semantics.

Each record's user metadata is indexed as terms of one raw field: `key=s:value` (str),
`key=b:true` (bool), `key=n:<float>` (int or float: Chroma compares 1 and 1.0 as equal),
and `key[]=...` for each element of a list (matched by `$contains`). A filter becomes a
boolean query over those terms. Chroma semantics kept (checked against Chroma itself by a
random-filter test): `$ne` and `$nin` also match records that lack the key; equality never
matches a list; bools are not numbers.

Filters outside this subset (`$gt`/`$gte`/`$lt`/`$lte`, `$not_contains` on lists, integers
past 2**53, float operands with a fraction, anything unknown) compile to None: the caller then asks Chroma for the matching
ids, as before. A filter that is malformed compiles to None too, and Chroma's own
validation reports it.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

_EXACT_INT = 2 ** 53


def _value(value: Any) -> str | None:
    """The term text of one scalar, or None when the subset cannot express it exactly."""
    if isinstance(value, bool):
        return "b:true" if value else "b:false"
    if isinstance(value, int):
        return f"n:{float(value)!r}" if abs(value) <= _EXACT_INT else None
    if isinstance(value, float):
        return f"n:{value!r}"
    if isinstance(value, str):
        return "s:" + value
    return None


def metadata_terms(metadata: Mapping[str, Any]) -> list[str]:
    """The filter terms of one record's user metadata (reserved keys left out)."""
    out = []
    for key, value in metadata.items():
        if key.startswith("_rk_"):
            continue
        if isinstance(value, list):
            out.extend(f"{key}[]={t}" for t in map(_value, value) if t is not None)
        else:
            t = _value(value)
            if t is not None:
                out.append(f"{key}={t}")
    return out


class Unsupported(Exception):
    """The filter is outside what the BM25 index can evaluate exactly."""


def compile_where(where: Mapping[str, Any], tv: Any, schema: Any) -> Any | None:
    """A tantivy query matching exactly the records Chroma's `where` matches, or None."""
    try:
        return _clause(where, tv, schema)
    except Unsupported:
        return None


def _query_value(value: Any) -> str | None:
    """A filter operand's term text. Chroma matches a fractional float operand against int
    metadata after dropping its fraction ({"n": 0.5} finds n=0): such operands go to Chroma."""
    if isinstance(value, float) and not value.is_integer():
        return None
    return _value(value)


def _terms(key: str, values: Iterable[Any], tv: Any, schema: Any, *, element: bool = False):
    texts = [_query_value(v) for v in values]
    if any(t is None for t in texts) or not texts:
        raise Unsupported
    name = f"{key}[]" if element else key
    return tv.Query.term_set_query(schema, "meta", [f"{name}={t}" for t in texts])


def _everything_but(query: Any, tv: Any) -> Any:
    return tv.Query.boolean_query([(tv.Occur.Must, tv.Query.all_query()),
                                   (tv.Occur.MustNot, query)])


def _clause(where: Any, tv: Any, schema: Any) -> Any:
    if not isinstance(where, Mapping) or not where:
        raise Unsupported
    parts = []
    for key, cond in where.items():
        if key in ("$and", "$or"):
            if not isinstance(cond, list) or not cond:
                raise Unsupported
            subs = [_clause(c, tv, schema) for c in cond]
            occur = tv.Occur.Must if key == "$and" else tv.Occur.Should
            parts.append(tv.Query.boolean_query([(occur, q) for q in subs]))
        elif key.startswith("$"):
            raise Unsupported
        elif isinstance(cond, Mapping):
            if len(cond) != 1:
                raise Unsupported
            (op, arg), = cond.items()
            if op == "$eq":
                parts.append(_terms(key, [arg], tv, schema))
            elif op == "$ne":
                parts.append(_everything_but(_terms(key, [arg], tv, schema), tv))
            elif op == "$in" and isinstance(arg, list):
                parts.append(_terms(key, arg, tv, schema))
            elif op == "$nin" and isinstance(arg, list):
                parts.append(_everything_but(_terms(key, arg, tv, schema), tv))
            elif op == "$contains":
                parts.append(_terms(key, [arg], tv, schema, element=True))
            else:
                raise Unsupported
        else:
            parts.append(_terms(key, [cond], tv, schema))
    if len(parts) == 1:
        return parts[0]
    return tv.Query.boolean_query([(tv.Occur.Must, q) for q in parts])
