"""Sliding windows over a token sequence, and right-padded batches of them: the one
implementation that ingest (keys of a document) and scoring (perplexity of a text) share.

Pure: no model, no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:  # imported where a batch is built: importing this module needs no torch
    import torch


def windows(n_tokens: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, keep_from) of each window over a sequence of ``n_tokens`` tokens.

    Window i covers tokens [i*stride, i*stride + window); it keeps the positions from
    ``keep_from`` (the previous window's end) to ``end``, so each position is kept once
    and, after the first window, with at least ``window - stride`` tokens of context.
    """
    if n_tokens <= 0:
        return
    begin, prev_end = 0, 0
    while True:
        end = min(begin + window, n_tokens)
        yield begin, end, prev_end
        if end >= n_tokens:
            return
        prev_end, begin = end, begin + stride


def right_padded(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one batch: input ids and attention mask [B, longest row], padded on
    the right, so every real token keeps its position."""
    return _padded(rows, pad=0, left=False)


def left_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one batch padded on the left with ``pad``, so every row's last token
    is at the end (where generation continues every row)."""
    return _padded(rows, pad=pad, left=True)


def _padded(rows: Sequence[Sequence[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask
