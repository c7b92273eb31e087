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


def find(tokenizer, document_id: int, ids: Sequence[int], needle: str, ignore_case: bool = False) -> list[Occurrence]:
    """Every occurrence of ``needle`` in the document spelled by ``ids`` (non-overlapping,
    left to right), with the tokens each overlaps."""
    if not ids:
        return []
    text, spans = token_spans(tokenizer, ids)
    pattern = re.compile(re.escape(needle), re.IGNORECASE if ignore_case else 0)
    found = []
    for m in pattern.finditer(text):
        overlapping = np.nonzero((spans[:, 0] < m.end()) & (spans[:, 1] > m.start()))[0]
        if len(overlapping):
            found.append(Occurrence(document_id, m.start(), m.end(), int(overlapping[0]), int(overlapping[-1])))
    return found
