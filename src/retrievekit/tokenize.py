"""The BM25 tokenizer: NFKC, lowercase, unicode words, CJK characters one by one, optional
stopwords and Snowball stemming. Its settings are recorded in the store."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import Any, Mapping

import regex

from . import validate as v
from .errors import MissingDependencyError

#: the rules below, beside the settings: another version rebuilds a store's BM25 index
#: from Chroma on open (sparse.py, `signature`). 2: words keep their combining marks
#: (Devanagari, Tamil, Arabic vowel signs; `re`'s \w has none), text is NFKC-normalized
#: (a decomposed "café" is the composed one), stopwords match in any case
TOKENIZER_VERSION = 2

# Han, Hiragana, Katakana and Hangul have no spaces between words: index them one
# character at a time (unigrams), which is what Lucene's CJK-less analyzers fall back to.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
# a word: letters, digits and combining marks (the `regex` module's classes; ASCII text,
# which has no marks, takes `re`, 1.7x faster)
_TOKEN_RE = regex.compile(rf"[{_CJK}]|[[\p{{L}}\p{{N}}\p{{M}}]--[{_CJK}]]+", regex.V1)
_ASCII_TOKEN_RE = re.compile(r"[^\W_]+", re.ASCII)

# The English stopword list of bm25s/sklearn-style analyzers (short, common function words).
ENGLISH_STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further
had has have having he her here hers herself him himself his how i if in into is it its itself
just me more most my myself no nor not now of off on once only or other our ours ourselves out
over own same she should so some such than that the their theirs them themselves then there
these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves
""".split())

_STEMMER_LANGS = ("english", "porter", "german", "french", "spanish", "italian", "dutch",
                  "portuguese", "russian", "swedish", "norwegian", "danish", "finnish")


@dataclass(frozen=True)
class TokenizerConfig:
    """How text becomes BM25 tokens.

    Args:
        lowercase: fold case before matching.
        stopwords: None, "en" for the built-in English list, or a tuple of words.
        stemmer: None or a Snowball language for PyStemmer ("english", "porter", ...).
        min_token_len: drop tokens shorter than this (after stemming).
    """

    lowercase: bool = True
    stopwords: str | tuple[str, ...] | None = "en"
    stemmer: str | None = "english"
    min_token_len: int = 1

    def __post_init__(self) -> None:
        # TOML has no null: false (or an empty list / string) switches a step off
        if self.stopwords is False or (isinstance(self.stopwords, (list, tuple, str))
                                       and not self.stopwords):
            object.__setattr__(self, "stopwords", None)
        if self.stemmer is False or self.stemmer == "":
            object.__setattr__(self, "stemmer", None)
        if isinstance(self.stopwords, list):
            object.__setattr__(self, "stopwords", tuple(self.stopwords))
        sw = self.stopwords
        if sw is not None and not (isinstance(sw, str) and sw == "en") and not (
                isinstance(sw, tuple) and all(isinstance(w, str) and w for w in sw)):
            v.fail("tokenizer.stopwords", "None, 'en' or a list of words", sw,
                   "false switches them off")
        if isinstance(sw, tuple):
            for i, w in enumerate(sw):
                v.utf8(f"tokenizer.stopwords[{i}]", w)
        if self.stemmer is not None:
            v.choice("tokenizer.stemmer", self.stemmer, _STEMMER_LANGS,
                     fix="None or false switches it off")
        v.boolean("tokenizer.lowercase", self.lowercase)
        v.integer("tokenizer.min_token_len", self.min_token_len, fix="1 keeps every token")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TokenizerConfig":
        """Build from a dict; unknown keys are an error that lists the valid ones."""
        valid = {f.name for f in fields(cls)}
        unknown = set(data) - valid
        if unknown:
            v.fail("sparse.tokenizer", f"a dict with keys from {sorted(valid)}", dict(data),
                   f"drop {sorted(map(str, unknown))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(self.stopwords, tuple):
            d["stopwords"] = list(self.stopwords)
        return d


class Tokenizer:
    """Turns text into a list of terms according to a `TokenizerConfig`."""

    def __init__(self, config: TokenizerConfig | None = None) -> None:
        self.config = config or TokenizerConfig()

    @cached_property
    def _stopwords(self) -> frozenset[str]:
        sw = self.config.stopwords
        if sw is None:
            return frozenset()
        words = ENGLISH_STOPWORDS if sw == "en" else sw
        return frozenset(unicodedata.normalize("NFKC", w).lower() for w in words)

    @cached_property
    def _stem(self):
        if self.config.stemmer is None:
            return None
        try:
            import Stemmer  # PyStemmer
        except ImportError as exc:  # pragma: no cover - installed with the package
            raise MissingDependencyError(
                "tokenizer.stemmer needs PyStemmer: pip install PyStemmer") from exc
        return Stemmer.Stemmer(self.config.stemmer).stemWords

    @property
    def stemmer_version(self) -> str | None:
        """The version of the stemming library (PyStemmer's Snowball), None without a
        stemmer. Versions stem some words differently (PyStemmer 2.2 stems "added" to "ad",
        3.1 to "add"), so an index made with one must not be queried with another."""
        if self.config.stemmer is None:
            return None
        import Stemmer

        return str(Stemmer.version())

    def __call__(self, text: str) -> list[str]:
        if text.isascii():
            words = _ASCII_TOKEN_RE
        else:
            words, text = _TOKEN_RE, unicodedata.normalize("NFKC", text)
        if self.config.lowercase:
            text = text.lower()
        tokens = words.findall(text)
        stop = self._stopwords
        if stop:
            tokens = [t for t in tokens if t not in stop] if self.config.lowercase else \
                [t for t in tokens if t.lower() not in stop]
        if self._stem is not None and tokens:
            tokens = self._stem(tokens)
        n = self.config.min_token_len
        # a stemmer can return "" (porter: "s"): never emit an empty token
        return [t for t in tokens if len(t) >= n] if n > 1 or self._stem is not None \
            else tokens
