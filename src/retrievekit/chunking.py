"""Token-aware chunking: split text that is longer than the model reads into overlapping
windows of model tokens, cut at token boundaries of the original text (no re-decoding)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from . import validate as v
from .errors import ConfigError


@dataclass(frozen=True)
class ChunkConfig:
    """How long documents are split.

    Args:
        max_tokens: tokens per chunk; None uses the model's max sequence length minus the
            special tokens and the document prefix.
        overlap_tokens: tokens shared by consecutive chunks.
        enabled: when False, a document longer than the model's window is an error instead
            of being chunked (it is never silently truncated).
    """

    max_tokens: int | None = None
    overlap_tokens: int = 32
    enabled: bool = True

    def __post_init__(self) -> None:
        v.integer("chunking.max_tokens", self.max_tokens, 8, optional=True,
                  fix="None uses the model's window")
        v.integer("chunking.overlap_tokens", self.overlap_tokens, 0, fix="32 is the default")
        v.boolean("chunking.enabled", self.enabled)
        if self.max_tokens is not None and self.overlap_tokens >= self.max_tokens:
            raise ConfigError(
                f"chunking.overlap_tokens ({self.overlap_tokens}) must be smaller than "
                f"chunking.max_tokens ({self.max_tokens})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_text(text: str, tokenizer: Any, max_tokens: int, overlap: int
               ) -> list[tuple[int, int]]:
    """Split `text` into chunks of at most `max_tokens` tokenizer tokens with `overlap`.

    Uses the fast tokenizer's offset mapping so each chunk is an exact slice of the input.
    Returns the (start, end) character spans; [(0, len(text))] when it fits.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                    truncation=False, verbose=False)
    return split_offsets(text, enc["offset_mapping"], max_tokens, overlap)


def split_offsets(text: str, offsets: Sequence[tuple[int, int]], max_tokens: int,
                  overlap: int) -> list[tuple[int, int]]:
    """`split_text` for a text already tokenized: `offsets` is the fast tokenizer's offset
    mapping of `text` (no special tokens), so a writer tokenizes each text once."""
    offsets = [o for o in offsets if o[1] > o[0]]
    if len(offsets) <= max_tokens:
        return [(0, len(text))]
    overlap = min(overlap, max_tokens - 1)
    step = max_tokens - overlap
    chunks = []
    start = 0
    while start < len(offsets):
        end = min(start + max_tokens, len(offsets))
        # spans run to the next token's start, so together they cover every character
        chunks.append((0 if start == 0 else offsets[start][0],
                       len(text) if end == len(offsets) else offsets[end][0]))
        if end == len(offsets):
            break
        start += step
    return chunks


def chunk_id(parent_id: str, position: int) -> str:
    """The id of chunk `position` of document `parent_id`."""
    return f"{parent_id}#chunk{position}"
