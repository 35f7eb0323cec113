"""Checks of settings and arguments, written once: each raises a retrievekit error whose
message reads "<name> must be <what>, got <value>; <fix>".

Settings are checked where their frozen config is defined (`__post_init__`), arguments at
the public call that takes them. Bools never pass as numbers, strings never as bools, NaN
and inf never as a finite number, and a str must be encodable as UTF-8 (Chroma, tantivy and
the tokenizers all refuse lone surrogates, each with its own traceback).
"""

from __future__ import annotations

import math
import os
from typing import Any, Collection, NoReturn

from .errors import ConfigError, InvalidInputError, RetrieveKitError


def shown(value: Any, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters."""
    try:
        text = repr(value)
    except RecursionError:  # e.g. a filter nested a thousand levels deep
        return f"<a {type(value).__name__} nested too deeply to show>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def fail(name: str, what: str, value: Any, fix: str = "", *,
         error: type[RetrieveKitError] = ConfigError) -> NoReturn:
    """Raise `error` with the uniform message."""
    raise error(f"{name} must be {what}, got {shown(value)}" + (f"; {fix}" if fix else ""))


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def integer(name: str, value: Any, minimum: int = 1, maximum: int | None = None, *,
            optional: bool = False, fix: str = "",
            error: type[RetrieveKitError] = ConfigError) -> Any:
    """An int in [minimum, maximum] (or None when `optional`); returns it."""
    if value is None and optional:
        return None
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        what = f"an int >= {minimum}" if maximum is None else \
            f"an int in [{minimum}, {maximum}]"
        fail(name, what + (" or None" if optional else ""), value, fix, error=error)
    return value


def number(name: str, value: Any, minimum: float | None = None,
           maximum: float | None = None, *, low_open: bool = False, optional: bool = False,
           fix: str = "", error: type[RetrieveKitError] = ConfigError) -> Any:
    """A finite int or float in [minimum, maximum] (`low_open`: minimum excluded), or None
    when `optional`; returns it."""
    if value is None and optional:
        return None
    ok = (is_number(value)
          and (minimum is None or (value > minimum if low_open else value >= minimum))
          and (maximum is None or value <= maximum))
    if not ok:
        lo = "" if minimum is None else f"{'(' if low_open else '['}{minimum:g}"
        if minimum is None and maximum is None:
            what = "a finite number"
        elif maximum is None:
            what = f"a finite number {'>' if low_open else '>='} {minimum:g}"
        elif minimum is None:
            what = f"a finite number <= {maximum:g}"
        else:
            what = f"a number in {lo}, {maximum:g}]"
        fail(name, what + (" or None" if optional else ""), value, fix, error=error)
    return value


def boolean(name: str, value: Any, *, optional: bool = False, fix: str = "",
            error: type[RetrieveKitError] = ConfigError) -> Any:
    """True or False (or None when `optional`): 0, 1 and "false" are refused."""
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        fail(name, "True, False or None" if optional else "True or False", value, fix,
             error=error)
    return value


def choice(name: str, value: Any, options: Collection[Any], *, fix: str = "",
           error: type[RetrieveKitError] = ConfigError) -> Any:
    """One of `options` (compared by type too, so 1 is not True); returns it."""
    if not any(value is o or (type(value) is type(o) and value == o) for o in options):
        fail(name, f"one of {list(options)}", value, fix, error=error)
    return value


def text(name: str, value: Any, *, optional: bool = False, empty: bool = True,
         fix: str = "", error: type[RetrieveKitError] = ConfigError) -> Any:
    """A str that UTF-8 can encode (non-empty unless `empty`), or None when `optional`."""
    if value is None and optional:
        return None
    what = ("a str" if empty else "a non-empty str") + (" or None" if optional else "")
    if not isinstance(value, str) or (not empty and not value):
        fail(name, what, value, fix, error=error)
    utf8(name, value, error=error)
    return value


def utf8(name: str, value: str, *, error: type[RetrieveKitError] = ConfigError) -> None:
    """Refuse a str holding lone surrogates (what a bad decode with 'surrogateescape'
    leaves): nothing downstream can store it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        fail(name, "valid Unicode (encodable as UTF-8)", value,
             f"character {exc.start} is a lone surrogate; decode the source bytes with "
             "errors='replace'", error=error)


def path(name: str, value: Any, *, optional: bool = False, fix: str = "",
         error: type[RetrieveKitError] = ConfigError) -> Any:
    """A non-empty str or os.PathLike path (or None when `optional`); returns it as str."""
    if value is None and optional:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value or "\x00" in value:
        fail(name, "a path (a non-empty str)" + (" or None" if optional else ""),
             value, fix, error=error)
    utf8(name, value, error=error)
    return value


def readable(name: str, value: Any, fix: str, *,
             error: type[RetrieveKitError] = InvalidInputError) -> str:
    """A str (UTF-8 encodable) holding at least one printable character that is not a space:
    a text of only whitespace, control or format characters (zero-width spaces, BOMs) gives
    the model nothing but its special tokens, so every such text would embed alike."""
    if not isinstance(value, str):
        fail(name, "a str", value, fix, error=error)
    utf8(name, value, error=error)
    if not any(c.isprintable() and not c.isspace() for c in value):
        fail(name, "a non-empty str with readable text (not only whitespace, control or "
             "format characters)", value, fix, error=error)
    return value
