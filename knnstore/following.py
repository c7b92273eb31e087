"""Pointer following (RetoMaton, Alon et al., ICML 2022): a neighbour is a position in a
stored document, so the store knows what came next there. After a position, the neighbours
whose stored next token is the token that came are advanced to their successors (same
document, next position); the next position scores those followed pairs against its own
key instead of searching, and searches only where too few survive or they are far.

``Pointers`` holds the followed pairs of one sequence. Their successors are read ahead in
runs (``AHEAD`` pairs after each, by row id: ``PairsTable.successors``), so most followed
positions read nothing; the same runs are the stored continuation a draft is taken from
(``drafting``).

    >>> pointers = Pointers(store.table, k=128)                         # doctest: +SKIP
    >>> found = pointers.candidates(query)      # None: search instead   # doctest: +SKIP
    >>> if found is None: pointers.searched(found := store.search(...))  # doctest: +SKIP
    >>> pointers.advance(token)                 # the token that came     # doctest: +SKIP
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .vectors import Neighbours, PairsTable

AHEAD = 8  # successors read at once after each followed pair
MAX_POINTERS = 16  # pairs followed at most: the nearest survivors
DRAFT_POINTERS = 4  # where pairs are followed only for drafts (a draft takes the nearest's continuation)
MIN_POINTERS = 8  # fewer followed pairs than this at a position: it searches (RetoMaton's min_knns)
# (at least 8: ``adaptive.recognised`` compares the nearest with the eighth)
# a position follows only where its nearest followed pair is no farther than this times the
# median distance of the last search's neighbours (the store's own scale here; farther, the
# text has left what the followed documents say, and a search finds nearer pairs)
FAR = 1.0


class Pointers:
    """The stored pairs one decoding (or one text being scored) follows, and what comes
    after each of them in its document.

    ``run`` [n, AHEAD] holds, for each followed pair, the pairs after it; column ``col`` is
    where the sequence is now: the candidates of the next position to score.
    """

    def __init__(self, table: PairsTable, k: int, project: Callable[[np.ndarray], np.ndarray] | None = None,
                 min_pointers: int | None = None, max_pointers: int = MAX_POINTERS) -> None:
        self.table, self.k, self.max_pointers = table, k, max_pointers
        self.project = project  # model keys -> keys as the table holds them (``Store.stored_keys``)
        # never fewer than MIN_POINTERS (k smaller than that: never): the adaptive policy reads
        # a context stored verbatim off its nearest standing out from the eighth
        self.min_pointers = MIN_POINTERS if min_pointers is None else min_pointers
        self.run: Neighbours | None = None
        self.keys: np.ndarray | None = None  # [n, AHEAD, key dim]
        self.col = 0
        self.radius = np.inf  # FAR x the median neighbour distance of the last search
        self.pending: Neighbours | None = None  # the current position's searched neighbours (``searched``)
        # a position was scored and the token that came after it is not known yet: a
        # decoding that learns it one call later (``KNNLogitsProcessor``) advances first
        self.waiting = False

    @property
    def count(self) -> int:
        """Pairs followed at the current position."""
        if self.run is None:
            return 0
        return int((self.run.pair_ids[:, self.col] >= 0).sum())

    def candidates(self, key: np.ndarray) -> Neighbours | None:
        """The followed pairs as the neighbours [1, k] of the current position's model key
        ``key`` [dim], with exact squared distances, nearest first; None where fewer than
        ``min_pointers`` are followed or the nearest is farther than ``radius`` (the
        position searches)."""
        if self.count < self.min_pointers:
            return None
        query = np.asarray(key, dtype=np.float32).reshape(1, -1)
        if self.project is not None:
            query = self.project(query)
        live = np.flatnonzero(self.run.pair_ids[:, self.col] >= 0)
        keys = self.keys[live, self.col]
        d = ((keys - query) ** 2).sum(axis=1)
        if not d.min() <= self.radius:
            return None
        by_distance = np.argsort(d, kind="stable")
        self.run, self.keys = _part(self.run, live[by_distance]), self.keys[live[by_distance]]  # nearest first
        shown = min(self.k, len(live))
        out = Neighbours.empty(1, self.k)
        for name in _FIELDS:
            getattr(out, name)[0, :shown] = getattr(self.run, name)[:shown, self.col]
        out.distances[0, :shown] = d[by_distance][:shown]
        return out

    def searched(self, found: Neighbours) -> None:
        """The current position searched instead: its neighbours [1, k], the pairs to follow
        from (``advance``) and the scale ``candidates`` measures followed pairs against."""
        d = found.distances[0][np.isfinite(found.distances[0]) & (found.pair_ids[0] >= 0)]
        self.radius = FAR * float(np.median(d)) if len(d) else np.inf
        self.pending = found

    def advance(self, token: int) -> None:
        """Move to the next position, ``token`` having come: where the current position
        ``searched``, the pairs after each of its neighbours whose next token is ``token``
        (the nearest ``MAX_POINTERS``); where it followed, or skipped the store, the pairs
        already followed whose next token is ``token``."""
        searched, self.pending, self.waiting = self.pending, None, False
        if searched is None:
            self._step(token)
            return
        row = searched.pair_ids[0]
        keep = np.flatnonzero((searched.next_tokens[0] == token) & (row >= 0) & (searched.row_ids[0] >= 0))
        keep = keep[:self.max_pointers]
        self._read(_transposed(_part(searched, slice(0, 1), keep)))

    def draft(self, n: int) -> list[int]:
        """Up to ``n`` tokens that the nearest followed pair's document has next: the
        stored continuation after the current position's next token (empty where nothing is
        followed). Where the runs read so far hold fewer, they are read further first."""
        if self.run is None or n <= 0:
            return []
        if self.run.pair_ids.shape[1] - self.col < n:
            self._extend()
        live = np.flatnonzero(self.run.pair_ids[:, self.col] >= 0)
        if len(live) == 0:
            return []
        row = self.run.next_tokens[live[0], self.col:]  # the nearest survivor first (``advance`` keeps the order)
        ok = (self.run.pair_ids[live[0], self.col:] >= 0) & (row >= 0)
        stop = int(np.argmin(ok)) if not ok.all() else len(row)
        return row[:min(stop, n)].tolist()

    def _step(self, token: int) -> None:
        """Advance the followed pairs whose next token is ``token`` by one position."""
        if self.run is None:
            return
        nxt = self.run.next_tokens[:, self.col]
        alive = np.flatnonzero((nxt == token) & (self.run.pair_ids[:, self.col] >= 0))
        if len(alive) == 0:
            self.run = self.keys = None
            return
        if self.col + 1 < self.run.pair_ids.shape[1]:
            self.run, self.keys = _part(self.run, alive), self.keys[alive]
            self.col += 1
            return
        self._read(_part(self.run, alive, slice(self.col, self.col + 1)))  # the end of the runs: read on

    def _extend(self) -> None:
        """Runs that start at the current column and go ``AHEAD`` pairs past it."""
        here = _part(self.run, slice(None), slice(self.col, self.col + 1))
        run, keys = self.table.successors(here, AHEAD)
        for name in _ALL:
            setattr(run, name, np.concatenate([getattr(here, name), getattr(run, name)], axis=1))
        self.run, self.keys = run, np.concatenate([self.keys[:, self.col:self.col + 1], keys], axis=1)
        self.col = 0

    def _read(self, pairs: Neighbours) -> None:
        """Follow ``pairs`` [n, 1]: read the runs after them."""
        if pairs.pair_ids.shape[0] == 0:
            self.run = self.keys = None
            return
        self.run, self.keys = self.table.successors(pairs, AHEAD)
        self.col = 0


def follow_text(pointers: Pointers, keys: np.ndarray, searched: Neighbours, retrieves: np.ndarray,
                targets: np.ndarray) -> tuple[Neighbours, np.ndarray]:
    """The neighbours N positions of a text (in order; the next tokens ``targets`` known)
    score with where they follow the store: at each position that ``retrieves`` [N] bool,
    the followed pairs where they hold, else its row of ``searched`` [M, k'] (one row per
    such position, in order: a batch search of all of them, made before, as ``evaluate``
    does); ``pointers`` carries over to the next call. Returns the neighbours [N, k']
    (empty where a position does not retrieve) and which positions followed [N] bool."""
    n, width = len(targets), searched.pair_ids.shape[1]
    out, followed = Neighbours.empty(n, width), np.zeros(n, dtype=bool)
    at = np.cumsum(retrieves) - 1  # each retrieving position's row of ``searched``
    for i, token in enumerate(np.asarray(targets).tolist()):
        if retrieves[i]:
            got = pointers.candidates(keys[i])
            if got is None:
                got = searched.rows(int(at[i]))
                pointers.searched(got)
            else:
                followed[i] = True
            shown = min(width, got.pair_ids.shape[1])
            for name in _ALL:
                getattr(out, name)[i, :shown] = getattr(got, name)[0, :shown]
        pointers.advance(int(token))
    return out, followed


_FIELDS = ("pair_ids", "next_tokens", "corpus_ids", "document_ids", "positions", "weights", "row_ids")
_ALL = (*_FIELDS, "distances")


def _part(n: Neighbours, rows, cols=slice(None)) -> Neighbours:
    """Rows and then columns of ``n`` (index arrays or slices), as a ``Neighbours`` of their own."""
    picked = {name: np.array(getattr(n, name)[rows][:, cols]) for name in _ALL}
    return Neighbours(**picked)


def _transposed(n: Neighbours) -> Neighbours:
    """A [1, m] ``Neighbours`` as m rows of one."""
    return Neighbours(**{name: np.ascontiguousarray(getattr(n, name).T) for name in _ALL})
