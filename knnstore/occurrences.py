"""Where a string occurs in stored documents, matched on their decoded text (``knnstore
forget``).

A string can be cut into tokens in different ways depending on what precedes it (" Jane"
and "Jane" are different tokens), so matching token ids misses occurrences. Each document
is decoded from its stored tokens into text with the character span of every token; the
string is searched in that text, and each occurrence is mapped back to the tokens it
overlaps. Pure: token ids and a tokenizer in, spans out.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Tokens decoded before each one, when its text is read as the difference of two decodes
# (the fallback): enough to complete any character split across byte-level tokens.
_CONTEXT_TOKENS = 8


@dataclass(frozen=True)
class Occurrence:
    """One match of the string: its document, character span in the decoded text, and the
    document's token positions it overlaps (first, last, inclusive)."""

    document_id: int
    start: int
    end: int
    first_token: int
    last_token: int


def token_spans(tokenizer, ids: Sequence[int]) -> tuple[str, np.ndarray]:
    """The decoded text of ``ids`` and each token's [start, end) character span in it.

    Where re-encoding the decoded text gives back exactly ``ids`` (a fast tokenizer's usual
    round trip), the spans are the tokenizer's own offsets. Otherwise each token's text is
    what it adds to the decode of the few tokens before it, and the text is their
    concatenation (exact for the characters a string search can match)."""
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        if list(enc["input_ids"]) == ids:
            return text, np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    pieces, spans, pos = [], np.zeros((len(ids), 2), dtype=np.int64), 0
    for i in range(len(ids)):
        lo = max(0, i - _CONTEXT_TOKENS)
        before = tokenizer.decode(ids[lo:i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        upto = tokenizer.decode(ids[lo:i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        piece = upto[len(before):] if upto.startswith(before) else upto[len(before.rstrip("\ufffd")):]
        pieces.append(piece)
        spans[i] = (pos, pos + len(piece))
        pos += len(piece)
    return "".join(pieces), spans


# Characters that change nothing a reader sees: zero-width space, non-joiner, joiner, word
# joiner, byte-order mark, soft hyphen. Dropped before matching, so that a string cannot
# hide from ``forget`` behind them.
INVISIBLE = frozenset("\u200b\u200c\u200d\u2060\ufeff\u00ad")
_ASCII_RUN = re.compile(r"[\x00-\x7f]+")


def normalised(text: str, ignore_case: bool = False) -> tuple[str, np.ndarray]:
    """``text`` as ``forget`` matches it, and for each of its characters the index of the
    character of ``text`` it came from: NFKC (full-width ``＠`` is ``@``, NFD is NFC),
    invisible characters dropped, case folded with ``ignore_case``. A base character and the
    combining marks after it are normalised together."""
    if text.isascii():  # nothing to normalise: the common case, at C speed
        return (text.lower() if ignore_case else text), np.arange(len(text) + 1, dtype=np.int64)
    out: list[str] = []
    origin: list[int] = []
    i = 0
    while i < len(text):
        run = _ASCII_RUN.match(text, i)
        if run is not None and run.end() - i > 1:  # all but its last character as they are (a mark may follow it)
            piece = text[i:run.end() - 1]
            out.append(piece.lower() if ignore_case else piece)
            origin += range(i, run.end() - 1)
            i = run.end() - 1
        j = i + 1
        while j < len(text) and unicodedata.combining(text[j]):
            j += 1
        group = "".join(c for c in text[i:j] if c not in INVISIBLE)
        piece = unicodedata.normalize("NFKC", group)
        if ignore_case:
            piece = piece.casefold()
        out.append(piece)
        origin += [i] * len(piece)
        i = j
    return "".join(out), np.asarray(origin + [len(text)], dtype=np.int64)


def matches(text: str, needle: str, ignore_case: bool = False) -> list[tuple[int, int]]:
    """The [start, end) character spans of ``text`` where ``needle`` occurs, both compared
    ``normalised`` (non-overlapping, left to right; a span takes its last character's
    combining marks and any invisible characters inside)."""
    wanted = normalised(needle, ignore_case)[0]
    if not wanted or not text:
        return []
    flat, origin = normalised(text, ignore_case)
    found, at = [], flat.find(wanted)
    while at >= 0:
        found.append((int(origin[at]), int(origin[at + len(wanted)])))
        at = flat.find(wanted, at + len(wanted))
    return found


REDACTED = "[forgotten]"


def redact(value, needle: str, ignore_case: bool = False) -> tuple[object, int]:
    """``value`` (a string, or JSON: dicts, lists, strings and scalars) with every
    occurrence of ``needle`` in its strings (dict keys too) replaced by ``REDACTED``, and
    how many were replaced."""
    if isinstance(value, str):
        spans = matches(value, needle, ignore_case)
        for start, end in reversed(spans):
            value = value[:start] + REDACTED + value[end:]
        return value, len(spans)
    if isinstance(value, list):
        parts = [redact(v, needle, ignore_case) for v in value]
        return [v for v, _ in parts], sum(n for _, n in parts)
    if isinstance(value, dict):
        out, total = {}, 0
        for key, item in value.items():
            new_key, n_key = redact(key, needle, ignore_case)
            new_item, n_item = redact(item, needle, ignore_case)
            out[new_key] = new_item
            total += n_key + n_item
        return out, total
    return value, 0


def find(tokenizer, document_id: int, ids: Sequence[int], needle: str, ignore_case: bool = False) -> list[Occurrence]:
    """Every occurrence of ``needle`` in the document spelled by ``ids`` (``matches``), with
    the tokens each overlaps; the span of an occurrence is in the decoded text as stored."""
    if not ids:
        return []
    text, spans = token_spans(tokenizer, ids)
    found = []
    for start, end in matches(text, needle, ignore_case):
        overlapping = np.nonzero((spans[:, 0] < end) & (spans[:, 1] > start))[0]
        if len(overlapping):
            found.append(Occurrence(document_id, start, end, int(overlapping[0]), int(overlapping[-1])))
    return found
