"""Chroma `where` filters evaluated inside the BM25 index, with Chroma's semantics.

Each record's user metadata is indexed as terms of one raw field: `key=s:value` (str),
`key=b:true` (bool), `key=n:<float>` (int or float: Chroma compares 1 and 1.0 as equal),
and `key[]=...` for each element of a list (matched by `$contains`, which tells an int
from a float: `i:1` / `f:1.0`); a term too long for tantivy is indexed as its hash. A
scalar int or float also gets ordered terms, `r<key hash>i<level><hex>` (`f` for a float):
the value as an order-keeping unsigned 64-bit number, and its prefixes of 60, 56, ... 4
bits, so that `$gt`/`$gte`/`$lt`/`$lte` become a set of at most ~500 terms (`_ordered`). A
filter becomes a boolean query over those terms. Chroma semantics kept (checked against
Chroma itself by a random-filter test): `$ne`, `$nin` and `$not_contains` also match
records that lack the key (and `$not_contains` every scalar); equality never matches a
list; bools are not numbers; a comparison never matches a list or a bool; an int compares
with a float operand's integer part (Chroma 1.5.9: `{"n": {"$lt": 0.7}}` does not find
n=0, `{"n": 0.5}` does), a list's int element does not (`$contains: 0.5` finds only 0.5);
a float operand is read as Chroma reads it (`_as_chroma_reads`: 0.9999999999999999 is 1.0).

Filters outside this subset (operands past 2**53) compile to None: the caller then asks
Chroma for the matching ids. Every filter is first checked by `validate_where`, stricter
than Chroma's own check (which lets `{"$in": [1]}`, NaN or lone surrogates through to fail
in its Rust core as "Invalid where clause").
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Any, Iterable, Mapping

from . import validate as v
from .errors import InvalidInputError

_EXACT_INT = 2 ** 53
#: tantivy's longest term is 65,530 bytes; a longer one is indexed as its hash (`_term`)
_TERM_BYTES = 65_000
#: how deep `$and` / `$or` may nest (a deeper filter is refused, not a RecursionError)
_MAX_DEPTH = 64
_INT64 = (-(2 ** 63), 2 ** 63 - 1)
_LOGICAL = ("$and", "$or")
_COMPARE = ("$gt", "$gte", "$lt", "$lte")
_SCALAR_OPS = ("$eq", "$ne", "$contains", "$not_contains")
_LIST_OPS = ("$in", "$nin")
_OPERATORS = _SCALAR_OPS + _COMPARE + _LIST_OPS


def validate_where(where: Any) -> None:
    """Refuse a `where` filter that Chroma would refuse or fail on, with InvalidInputError
    naming the bad part and the fix. `{}` and None mean no filter."""
    if where is None:
        return
    if not isinstance(where, Mapping):
        raise InvalidInputError(
            f"where must be a dict in Chroma's filter syntax, e.g. {{'lang': 'en'}}, got "
            f"{type(where).__name__}")
    if where:
        try:
            _check_clause(where, "where", 0)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{exc} (where={v.shown(dict(where), 200)} is not a valid "
                                    "Chroma filter)") from None


def _bad(name: str, what: str, value: Any, fix: str = "") -> None:
    v.fail(name, what, value, fix, error=InvalidInputError)


def may_match_dead(where: Mapping[str, Any]) -> bool:
    """Whether a (valid) filter can match a dead record, which holds reserved keys only
    (records.dead_metadata): through `$ne`, `$nin` or `$not_contains`, which match records
    without the key. Other filters need no live-records clause (`records.live_where`)."""
    (key, cond), = where.items()
    if key in _LOGICAL:
        return any(may_match_dead(sub) for sub in cond)
    return isinstance(cond, Mapping) and next(iter(cond)) in ("$ne", "$nin", "$not_contains")


def _check_clause(clause: Any, name: str, depth: int) -> None:
    if depth > _MAX_DEPTH:
        _bad("where", f"at most {_MAX_DEPTH} levels of '$and' / '$or'", f"{depth} levels",
             "flatten the filter: '$and' and '$or' take any number of conditions")
    if not isinstance(clause, Mapping) or len(clause) != 1:
        _bad(name, "a dict with exactly one key (a field, '$and' or '$or')", clause,
             "combine conditions with {'$and': [{...}, {...}]}")
    (key, cond), = clause.items()
    if not isinstance(key, str) or not key:
        _bad(f"{name} key", "a non-empty str (a metadata field, '$and' or '$or')", key)
    v.utf8(f"{name} key", key, error=InvalidInputError)
    here = f"{name}[{key!r}]"
    if key in _LOGICAL:
        if not isinstance(cond, list) or len(cond) < 2:
            _bad(here, "a list of at least two filters", cond,
                 f"for one condition drop {key!r} and give the filter itself")
        for i, sub in enumerate(cond):
            _check_clause(sub, f"{here}[{i}]", depth + 1)
    elif key.startswith("$"):
        _bad(f"{name} key", "a metadata field, '$and' or '$or'", key,
             f"operators go inside a field: {{'field': {{{key!r}: ...}}}}")
    elif key.startswith("_rk_"):  # internals: their layout differs between store formats
        _bad(f"{name} key", "a metadata field of your documents", key,
             "keys starting with '_rk_' are retrievekit's own bookkeeping, which documents "
             "cannot hold; filter on your metadata")
    elif isinstance(cond, Mapping):
        if len(cond) != 1:
            _bad(here, "one operator and its operand", cond,
                 "combine several with {'$and': [...]}")
        (op, arg), = cond.items()
        if op not in _OPERATORS:
            _bad(f"{here} operator", f"one of {list(_OPERATORS)}", op)
        _check_operand(f"{here}[{op!r}]", op, arg)
    else:
        _check_operand(here, "$eq", cond)


def _check_operand(name: str, op: str, arg: Any) -> None:
    if op in _LIST_OPS:
        if not isinstance(arg, list) or not arg or len({type(a) for a in arg}) != 1:
            _bad(name, "a non-empty list of one scalar type (str, int, float or bool)", arg)
        for i, a in enumerate(arg):
            _check_scalar(f"{name}[{i}]", a)
    elif op in _COMPARE:
        v.number(name, arg, fix=f"{op} compares numbers only", error=InvalidInputError)
        _check_scalar(name, arg)
    else:
        if isinstance(arg, list):
            _bad(name, "a str, int, float or bool", arg,
                 "to match any of several values use {'$in': [...]}")
        _check_scalar(name, arg)


def _check_scalar(name: str, value: Any) -> None:
    if isinstance(value, str):
        v.utf8(name, value, error=InvalidInputError)
    elif isinstance(value, float):
        if not math.isfinite(value):
            _bad(name, "a finite number", value)
    elif v.is_int(value):
        if not _INT64[0] <= value <= _INT64[1]:
            _bad(name, "a 64-bit integer", value, "stored metadata never holds larger ones")
    elif not isinstance(value, bool):
        _bad(name, "a str, int, float or bool", value)


def _value(value: Any, *, element: bool = False) -> str | None:
    """The term text of one scalar, or None when the subset cannot express it exactly. A
    list element keeps its number type (`i:` / `f:`): Chroma's `$contains` tells 1 from
    1.0, where its `$eq` does not."""
    if isinstance(value, bool):
        return "b:true" if value else "b:false"
    if isinstance(value, int):
        if element:
            return f"i:{int(value)}"
        return f"n:{float(value)!r}" if abs(value) <= _EXACT_INT else None
    if isinstance(value, float):  # float(): a numpy float's repr is not a float's
        number = repr(float(value) + 0.0)  # + 0.0: -0.0 is 0.0, as Chroma compares them
        return f"f:{number}" if element else f"n:{number}"
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
            out.extend(_term(key, t, element=True) for t in
                       (_value(x, element=True) for x in value) if t is not None)
            continue
        t = _value(value)
        if t is not None:
            out.append(_term(key, t))
        out += _ordered_terms(key, value)
    return out


def _order_key(value: Any) -> tuple[str, int] | None:
    """A scalar number's type ("i" or "f") and its place in an order-keeping unsigned
    64-bit space: ints shifted by 2**63, floats by their IEEE bits (sign flipped, or every
    bit flipped for a negative one; -0.0 is 0.0). None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return ("i", value + 2 ** 63) if _INT64[0] <= value <= _INT64[1] else None
    if isinstance(value, float) and not math.isnan(value):
        bits, = struct.unpack(">Q", struct.pack(">d", float(value) + 0.0))
        return "f", (bits ^ 0xFFFF_FFFF_FFFF_FFFF) if bits >> 63 else bits | 2 ** 63
    return None


def _ordered_prefix(key: str) -> str:
    """The ordered terms' prefix of one key: `r` and a hash of the key (no other term
    starts with `r`)."""
    return "r" + hashlib.blake2b(key.encode("utf-8", "surrogatepass"),
                                 digest_size=16).hexdigest()


def _term(key: str, value: str, *, element: bool = False) -> str:
    """One indexed term: the key as a JSON string (so no key or value can read as another
    key's: {"a=s:b": "c"} is not {"a": "b=s:c"}), `[]` for a list element, then the value.
    A term longer than tantivy keeps (65,530 bytes) is its hash (no term starts with `#`)."""
    term = f"{json.dumps(key, ensure_ascii=False)}{'[]' if element else ''}={value}"
    data = term.encode("utf-8", "surrogatepass")
    if len(data) > _TERM_BYTES:
        return "#" + hashlib.blake2b(data, digest_size=32).hexdigest()
    return term


class Unsupported(Exception):
    """The filter is outside what the BM25 index can evaluate exactly."""


def compile_where(where: Mapping[str, Any], tv: Any, schema: Any) -> Any | None:
    """A tantivy query matching exactly the records Chroma's `where` matches, or None."""
    try:
        return _clause(_as_chroma_reads(where), tv, schema)
    except Unsupported:
        return None


#: the powers of ten serde_json multiplies or divides by (its table of f64 literals)
_POW10 = [float(f"1e{k}") for k in range(309)]


def _as_chroma_reads(value: Any) -> Any:
    """A filter with each float operand as Chroma 1.5.9 reads it. Its client sends the
    filter as JSON (Python's shortest repr), which serde_json parses without exact float
    rounding: the digits as an integer, then one multiplication or division by a power of
    ten. That moves ~1 float in 6 with 16-17 significant digits by an ulp or two
    (0.9999999999999999 is read as 1.0; measured on 913 values, this emulation matched
    every one). Stored metadata goes the same way, but the BM25 index reads it back from
    Chroma, so only operands need it."""
    if isinstance(value, Mapping):
        return {k: _as_chroma_reads(x) for k, x in value.items()}
    if isinstance(value, list):
        return [_as_chroma_reads(x) for x in value]
    if not isinstance(value, float) or not math.isfinite(value):
        return value
    text = repr(float(value))
    mantissa, _, exp = text.lstrip("-").partition("e")
    whole, _, fraction = mantissa.partition(".")
    exponent = (int(exp) if exp else 0) - len(fraction)
    f = float(int(whole + fraction))
    while True:
        if abs(exponent) < len(_POW10):
            f = f * _POW10[exponent] if exponent >= 0 else f / _POW10[-exponent]
            break
        if f == 0.0:
            break
        f, exponent = f / 1e308, exponent + 308  # below 1e-308: as serde_json does
    return -f if text.startswith("-") else f


def _query_terms(key: str, value: Any, element: bool) -> list[str]:
    """The terms a record matches an equality (or `$contains`) operand by. Chroma matches a
    fractional float against int metadata after dropping its fraction ({"n": 0.5} finds
    n=0 and n=0.5), but not against a list's int elements: such an operand is two ordered
    terms, the int of its integer part and the float. Past 2**53 an int metadata value has
    no number term (`_value`), so such operands go to Chroma (Unsupported)."""
    if isinstance(value, float) and abs(value) > _EXACT_INT:
        raise Unsupported
    if isinstance(value, float) and not value.is_integer() and not element:
        return [f"{_ordered_prefix(key)}{kind}0{_order_key(x)[1]:x}"
                for kind, x in (("i", math.trunc(value)), ("f", float(value)))]
    text = _value(value, element=element)
    if text is None:
        raise Unsupported
    return [_term(key, text, element=element)]


def _terms(key: str, values: Iterable[Any], tv: Any, schema: Any, *, element: bool = False):
    terms = [t for x in values for t in _query_terms(key, x, element)]
    if not terms:
        raise Unsupported
    return tv.Query.term_set_query(schema, "meta", terms)


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
            elif op == "$not_contains":  # also every record without such a list
                parts.append(_everything_but(_terms(key, [arg], tv, schema, element=True), tv))
            elif op in _COMPARE:
                parts.append(_ordered(key, op, arg, tv, schema))
            else:
                raise Unsupported
        else:
            parts.append(_terms(key, [cond], tv, schema))
    if len(parts) == 1:
        return parts[0]
    return tv.Query.boolean_query([(tv.Occur.Must, q) for q in parts])


_U64 = 2 ** 64 - 1
#: ordered terms of a number: one for each prefix of its 64-bit key that is a multiple of
#: `_STEP` bits long (`_LEVELS` of them)
_STEP = 4
_LEVELS = 64 // _STEP


def _ordered_terms(key: str, value: Any) -> list[str]:
    """A scalar number's ordered terms: its key at each level (the top 64 - 4*level bits),
    so that a range is the union of at most ~30 terms a level (`_blocks`), as Lucene's
    numeric fields were before its points (NumericRangeQuery)."""
    ordered = _order_key(value)
    if ordered is None:
        return []
    kind, u = ordered
    prefix = _ordered_prefix(key) + kind
    return [f"{prefix}{level:x}{u >> (_STEP * level):x}" for level in range(_LEVELS)]


def _ordered(key: str, op: str, x: Any, tv: Any, schema: Any) -> Any:
    """`{key: {op: x}}` for a comparison: the ints whose value compares with x's integer
    part, and the floats that compare with x, as one term set over the key's ordered terms."""
    if isinstance(x, bool) or abs(x) > _EXACT_INT:
        raise Unsupported
    bound = {"i": _order_key(math.trunc(x)), "f": _order_key(float(x))}
    lowest = {"i": 0, "f": _order_key(-math.inf)[1]}
    highest = {"i": _U64, "f": _order_key(math.inf)[1]}
    terms = []
    for kind in ("i", "f"):
        b = bound[kind][1]
        lo, hi = {"$gt": (b + 1, highest[kind]), "$gte": (b, highest[kind]),
                  "$lt": (lowest[kind], b - 1), "$lte": (lowest[kind], b)}[op]
        prefix = _ordered_prefix(key) + kind
        terms += [f"{prefix}{level:x}{block:x}" for level, block in _blocks(lo, hi)]
    if not terms:
        return tv.Query.empty_query()
    return tv.Query.term_set_query(schema, "meta", terms)


def _blocks(lo: int, hi: int) -> list[tuple[int, int]]:
    """The fewest (level, prefix) blocks that cover the keys lo..hi exactly: a block of
    level L holds the keys that share their top 64 - L * _STEP bits. At most
    2**_STEP - 1 at each end of each level (~480 for 4-bit steps)."""
    out: list[tuple[int, int]] = []
    level, full = 0, (1 << _STEP) - 1
    while lo <= hi:
        up_lo, up_hi = (lo + full) >> _STEP, ((hi + 1) >> _STEP) - 1  # whole blocks a level up
        if level == _LEVELS - 1 or up_lo > up_hi:
            out += [(level, b) for b in range(lo, hi + 1)]
            break
        out += [(level, b) for b in range(lo, up_lo << _STEP)]
        out += [(level, b) for b in range((up_hi + 1) << _STEP, hi + 1)]
        lo, hi, level = up_lo, up_hi, level + 1
    return out
