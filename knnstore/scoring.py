"""Sliding-window scoring of a token sequence: for every token after the first, the LM's
logits and the key at the store's key site for the position before it. What perplexity
(``evaluate``), calibration and ``KNNLM.explain`` run on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .config import MAX_WINDOW, SCORE_STRIDE, SCORE_WINDOW, check_number
from .encoder import Encoder
from .windows import right_padded, windows


@dataclass
class ScoredWindow:
    """The positions one window scores: S targets, with the keys and logits before them."""

    indices: np.ndarray  # [S] position of each target token in the text
    targets: torch.Tensor  # [S] token ids
    keys: torch.Tensor  # [S, dim] key of the position before each target
    logits: torch.Tensor  # [S, V] the LM's logits for each target


def check_windows(window: int, stride: int) -> None:
    """Sliding-window scoring settings that work: a window of at least 2 tokens, and a stride
    of at least 1 that is less than the window (each token is then scored once, with at
    least window - stride tokens of context)."""
    check_number("window", window, 2, MAX_WINDOW, integer=True)
    check_number(f"stride (less than the window, {window})", stride, 1, window - 1, integer=True)


def scored_windows(encoder: Encoder, ids: list[int], window: int = SCORE_WINDOW, stride: int = SCORE_STRIDE,
                   batch_size: int = 4) -> Iterator[ScoredWindow]:
    """Sliding-window scoring of one token sequence: every token after the first exactly once.

    Windows of ``window`` tokens start ``stride`` apart; each scores only the tokens the
    previous one did not, so every scored token after the first window saw at least
    ``window - stride`` tokens of context. A window longer than the model's positions
    allow is shortened to fit.
    """
    check_windows(window, stride)
    if encoder.max_length is not None and window > encoder.max_length:
        window, stride = encoder.max_length, min(stride, encoder.max_length * 3 // 4)
    # (begin, end, first scored): token 0 has no context, so it is never a target
    spans = [(b, e, max(k, 1)) for b, e, k in windows(len(ids), window, stride) if max(k, 1) < e]
    for lo in range(0, len(spans), batch_size):
        group = spans[lo:lo + batch_size]
        batch, mask = right_padded([ids[b:e] for b, e, _ in group])
        keys, logits = encoder.forward(batch, mask, with_logits=True)
        for row, (b, e, first) in enumerate(group):
            at = torch.arange(first - 1 - b, e - 1 - b)  # positions predicting first..e-1
            yield ScoredWindow(indices=np.arange(first, e), targets=batch[row, at + 1],
                               keys=keys[row, at], logits=logits[row, at])
