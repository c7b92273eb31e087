"""Reading: the passages of the store's documents that a prompt names, put before the prompt
for the model to read (In-Context RALM, Ram et al. 2023), found through the store's own search.

A kNN-LM answers from the neighbours of the position it predicts, and the key there is the
model's view of the words just before it: "Nevette Brockridge was born in" finds the
stored sentence, but a paraphrase or a question about Nevette Brockridge does not (its key
is near other questions, docs/facts.md). What such a prompt does share with the stored
document is its rare phrase, the name. Reading finds the documents that spell the
prompt's rare phrases: every position of the prompt is searched (one batched search), and
a document is named where its neighbours predict at least two consecutive prompt tokens at
consecutive stored positions (the document holds the same phrase) whose surprise to the LM
(−log p of the prompt's token) adds up to ``MIN_SURPRISE`` nats: a phrase the model did not
expect, the store did. Common words never name a document (the LM expects them); other
text's rare words name one only where a stored document spells the same phrase.

The search names ``CANDIDATES`` documents per passage to read; their passages are ranked
by how much of the prompt's rare wording they spell (``covers``: the whole name, not a
namesake's surname), then by how often they repeat it (``mentions``: the document about
the entity before one that mentions it once), then by the search's score. A passage after
the first is read only where it covers as much as the first (``SAME_WORDING``): a second
document about the same entity, never a namesake's beside it (one read passage about
someone else is enough to make the model answer with their year or teacher, docs/facts.md).

This module is the pure part, on arrays: which documents a prompt names (``named``), the
stretch of a document to read (``window``), how much of the prompt's rare wording a passage
spells and how often (``rare_wording``, ``covers``, ``mentions``), and which read tokens the
generated ones copy (``copies``). ``KNNLM.read`` runs the search and reads the tokens from
the store.

    >>> hits = named(targets=[5, 6, 7], surprise=[9.0, 6.0, 0.1],
    ...              next_tokens=np.array([[5], [6], [7]]), document_ids=np.array([[3], [3], [4]]),
    ...              positions=np.array([[10], [11], [2]]), n=2)
    >>> [(h.document_id, h.first, h.last, h.score) for h in hits]
    [(3, 10, 11, 15.0)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

READ_K = 32  # neighbours of each prompt position looked at
MIN_SURPRISE = 8.0  # nats a matched phrase must carry to name its document
RARE = 4.0  # nats: a prompt token this surprising to the LM is rare wording (``mentions``)
CANDIDATES = 4  # documents named per one read, then ranked by their passages' wording
SAME_WORDING = 0.9  # a passage after the first: at least this share of the first's ``covers``
MAX_PROMPT = 256  # the prompt's last tokens searched
BEFORE = 32  # tokens read before the first matched position
PASSAGE_TOKENS = 192  # tokens read of one document at most
MAX_READ_TOKENS = 8 * PASSAGE_TOKENS  # what a prompt may have read before it, where the model sets no limit


@dataclass(frozen=True)
class Named:
    """A document a prompt names: its best matched phrase's stored positions and surprise."""

    document_id: int
    first: int  # the stored position of its best phrase's first matched pair
    last: int
    score: float  # nats: the LM's surprise at the prompt's tokens its phrases matched, added up


def named(targets: Sequence[int], surprise: Sequence[float], next_tokens: np.ndarray, document_ids: np.ndarray,
          positions: np.ndarray, n: int) -> list[Named]:
    """The ``n`` documents that spell the prompt's surprising phrases most, best first.

    Row i of the neighbour arrays [P, k] (``Neighbours``' fields) is the search at the
    prompt position whose next token is ``targets[i]``; ``surprise[i]`` is −log p_LM of it.
    A phrase is a run of consecutive rows matched by one document at consecutive stored
    positions (a neighbour whose next token is the row's target); it counts when it is at
    least two tokens long and carries ``MIN_SURPRISE`` nats. A document's score adds up its
    phrases (each place it spells one: a document about someone names them often, one that
    mentions them once ranks below it); ``first``/``last`` are its best phrase's."""
    chains: dict[tuple[int, int], tuple[float, int]] = {}  # (doc, first position) -> (score, last)
    runs: dict[tuple[int, int], tuple[float, int, int]] = {}  # (doc, pos) -> (score, length, first)
    for i, target in enumerate(targets):
        here: dict[tuple[int, int], tuple[float, int, int]] = {}
        for j in np.nonzero(next_tokens[i] == target)[0]:
            doc, pos = int(document_ids[i, j]), int(positions[i, j])
            if doc < 0 or (doc, pos) in here:
                continue
            score, length, first = runs.get((doc, pos - 1), (0.0, 0, pos))
            here[doc, pos] = score, length, first = (score + float(surprise[i]), length + 1, first)
            if length >= 2 and score >= MIN_SURPRISE and score > chains.get((doc, first), (0.0, 0))[0]:
                chains[doc, first] = (score, pos)
        runs = here
    phrases: dict[int, list[tuple[float, int, int]]] = {}  # doc -> its phrases' (score, first, last)
    for (doc, first), (score, last) in chains.items():
        phrases.setdefault(doc, []).append((score, first, last))
    out = []
    for doc, found in phrases.items():
        _, first, last = max(found, key=lambda phrase: phrase[0])  # the best phrase (the first of equals)
        out.append(Named(doc, first, last, sum(phrase[0] for phrase in found)))
    return sorted(out, key=lambda h: -h.score)[:n]


def rare_wording(prompt: Sequence[int], surprise: Sequence[float]) -> dict[tuple[int, int], float]:
    """The prompt's rare wording: each pair of consecutive prompt tokens whose second one
    surprised the LM by ``RARE`` nats or more (``surprise[i]`` is that of ``prompt[i + 1]``),
    with that surprise."""
    rare: dict[tuple[int, int], float] = {}
    for i in range(len(prompt) - 1):
        if surprise[i] >= RARE:
            rare[prompt[i], prompt[i + 1]] = max(rare.get((prompt[i], prompt[i + 1]), 0.0), float(surprise[i]))
    return rare


def covers(rare: dict[tuple[int, int], float], read: Sequence[int]) -> float:
    """The share of the prompt's rare wording (``rare_wording``, weighted by surprise) that a
    passage spells at least once: 1.0 where it holds the whole name, less where it holds
    only part of it (a namesake: the same surname, another first name). 0 where the prompt
    has no rare wording."""
    total = sum(rare.values())
    spelled = set(zip(read, read[1:]))
    return sum(v for pair, v in rare.items() if pair in spelled) / total if total else 0.0


def mentions(rare: dict[tuple[int, int], float], read: Sequence[int]) -> float:
    """How often a passage repeats the prompt's rare wording (``rare_wording``): each rare
    pair's surprise times the times the passage spells it. A document about someone names
    them in sentence after sentence; one that mentions them once repeats their name once."""
    return sum(rare.get(pair, 0.0) for pair in zip(read, read[1:]))


def window(hit: Named) -> tuple[int, int]:
    """The stored positions [lo, hi] of a named document to read: from ``BEFORE`` tokens
    before its phrase, ``PASSAGE_TOKENS`` at most."""
    lo = max(0, hit.first - BEFORE)
    return lo, lo + PASSAGE_TOKENS - 1


def copies(tokens: Sequence[int], before: Sequence[int],
           passages: Sequence[tuple[int, Sequence[int]]]) -> list[tuple[int, int] | None]:
    """Which read token each of ``tokens`` (generated after ``before``) copies: a token
    copies where it lies in a run of at least two consecutive tokens (the last of ``before``
    may begin it) that a passage (start position, tokens) spells; of several, the longest
    run. Per token: (passage index, the stored position whose next token it is), or None."""
    seq = list(before[-1:]) + list(tokens)
    lead = len(seq) - len(tokens)
    best: list[tuple[int, tuple[int, int] | None]] = [(0, None)] * len(tokens)
    for p, (start, read) in enumerate(passages):
        run = [0] * (len(read) + 1)  # run[j + 1]: the match length ending at seq[i], read[j]
        for i, token in enumerate(seq):
            now = [0] * (len(read) + 1)
            for j, r in enumerate(read):
                if r == token:
                    now[j + 1] = run[j] + 1
                    length = now[j + 1]
                    if length >= 2:  # the run seq[i - length + 1 .. i] = read[j - length + 1 .. j]
                        for back in range(length):
                            g, at = i - back - lead, j - back
                            if g >= 0 and length > best[g][0] and start + at > 0:
                                best[g] = (length, (p, start + at - 1))
            run = now
    return [b[1] for b in best]
