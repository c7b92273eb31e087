"""Datastore pruning (``knnstore prune``): greedy merging of neighbouring pairs that share
a next token, after efficient-knnlm (He, Neubig and Berg-Kirkpatrick, EMNLP 2021).

Every pair of a corpus, in pair-id order, looks at its ``neighbours`` nearest pairs of the
same corpus (the store's own search: its ANN index, or exact without one). Those of the
same document that are still there, stand for no other pair yet and predict the same next
token are merged into it: they leave the table and its ``weight`` grows by theirs. p_kNN then counts a neighbour
``weight`` times (log weight is added to its logit, ``knn``), so a merged pair votes as the
pairs it replaced would have, from the position of the one kept.

Why merging rather than dropping pairs "that never change a prediction": dropping needs a
held-out text to say which predictions count, and a pair that helps no held-out token
today may be the one that matters for tomorrow's text; merging needs nothing but the
store, and keeps each merged pair's vote. Measured on the WikiText-2 store (266,918
pairs; docs/compact.md): 16 neighbours remove 36% of the pairs for +0.4% perplexity, 32
remove 41% for +0.5%.

Merging stays within a document (neighbours of other documents are not merged), so
removing a document, or its corpus, removes exactly the votes it cast, as on a store
never pruned. The merged pairs' keys are gone from the disk once ``purge`` has run, and
their tokens with them: a pruned corpus's documents show gaps in snippets and in the text
``forget`` searches, so ``forget`` names the pruned corpora where the text may still be
carried unseen (and never says "nothing was removed" while there are any).

Per corpus, under the write lock: an intent row in ``removals`` (command ``prune``), one
Lance commit that replaces the corpus's rows by the kept ones with their weights (a merge
insert: updated weights and deleted merged pairs land together), then one catalog
transaction that recounts the documents and closes the intent; then the rewritten rows
are added to the index (``update_index``: the trained partitions, no retraining). A prune
killed after the intent is finished (the counts) by the next removal or ``check
--repair``, like a removal; rows it left unindexed are indexed by ``knnstore index``.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from . import catalog, removal
from .config import MAX_K, ProgressFn, check_number
from .errors import InputError
from .faults import crash_point
from .schema import WEIGHT
from .vectors import ExactSearch
from .writer import Writer

if TYPE_CHECKING:
    from .handle import StoreHandle

DEFAULT_NEIGHBOURS = 16
SEARCH_BATCH = 4096  # pairs searched at once while pruning



@dataclass
class CorpusPruning:
    """What pruning did to one corpus (or would do, in a dry run)."""

    corpus: str
    pairs_before: int
    pairs_after: int
    seconds: float = 0.0

    @property
    def removed_fraction(self) -> float:
        return 1 - self.pairs_after / self.pairs_before if self.pairs_before else 0.0

    def to_dict(self) -> dict:
        return {"corpus": self.corpus, "pairs_before": self.pairs_before, "pairs_after": self.pairs_after,
                "removed_fraction": round(self.removed_fraction, 4), "seconds": round(self.seconds, 2)}


@dataclass
class Pruning:
    """``knnstore prune``'s result: one entry per corpus pruned."""

    neighbours: int
    dry_run: bool
    corpora: list[CorpusPruning] = field(default_factory=list)

    @property
    def pairs_before(self) -> int:
        return sum(c.pairs_before for c in self.corpora)

    @property
    def pairs_after(self) -> int:
        return sum(c.pairs_after for c in self.corpora)

    def to_dict(self) -> dict:
        before, after = self.pairs_before, self.pairs_after
        return {"neighbours": self.neighbours, "dry_run": self.dry_run, "pairs_before": before,
                "pairs_after": after, "removed_fraction": round(1 - after / before, 4) if before else 0.0,
                "corpora": [c.to_dict() for c in self.corpora]}


def greedy_merge(next_tokens: np.ndarray, weights: np.ndarray, neighbours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy merging over rows 0..n-1 in order.

    Args:
        next_tokens: [n] each row's value.
        weights: [n] pairs each row stands for already (1 for a pair never merged).
        neighbours: [n, m] row numbers of each row's nearest rows, nearest first (-1: none;
            the row itself may be among them).
    Returns:
        (kept [n] bool, weights [n]: a kept row's weight plus those merged into it).

    A row still kept takes every neighbour that has its next token and is neither merged
    already nor a centre: a row that stands for others (it took some, here or in an
    earlier prune: weight > 1) stays where it is. A row already merged takes nothing.
    Weights always add up to what they were: no vote is lost.

    (Letting a later row take a centre, weight and all, moves votes ever further from
    where they were cast: on WikiText-2, 16 neighbours then cost +1.34% perplexity for
    46.9% of the pairs, against +0.53% for 43.2% with centres kept; docs/compact.md.)
    """
    n = len(next_tokens)
    kept = np.ones(n, dtype=bool)
    out = np.asarray(weights, dtype=np.int64).copy()
    centre = out > 1
    for i in range(n):
        if not kept[i]:
            continue
        row = neighbours[i]
        row = row[(row >= 0) & (row != i)]
        row = row[kept[row] & ~centre[row] & (next_tokens[row] == next_tokens[i])]
        if len(row):
            kept[row] = False
            out[i] += out[row].sum()
            centre[i] = True
    return kept, out


def mergeable(pair_ids: np.ndarray, document_ids: np.ndarray, near_ids: np.ndarray,
              near_documents: np.ndarray) -> np.ndarray:
    """``greedy_merge``'s ``neighbours``: for rows ``pair_ids`` [n] (sorted) of documents
    ``document_ids`` [n], and their nearest pairs' ids [n, m] (-1: none) and documents
    [n, m], the row numbers of the neighbours that may merge into them: only pairs of the
    same document (-1 elsewhere), so that removing a document takes exactly its own votes."""
    rows = np.searchsorted(pair_ids, near_ids).clip(max=len(pair_ids) - 1)
    same = near_documents == document_ids[:, None]
    return np.where((near_ids >= 0) & (pair_ids[rows] == near_ids) & same, rows, -1)


def prune(store: "StoreHandle", corpus: str | None = None, *, neighbours: int = DEFAULT_NEIGHBOURS,
          exact: bool = False, nprobes: int = 32, dry_run: bool = False,
          progress: ProgressFn | None = None) -> Pruning:
    """Merge each ready corpus's (or ``corpus``'s) neighbouring pairs that share a next
    token (``greedy_merge``), ``neighbours`` nearest looked at per pair; ``exact`` searches
    by brute force even where the store has an index. ``dry_run`` only says how many
    pairs would go."""
    check_number("neighbours", neighbours, 1, MAX_K - 1, integer=True)
    named = store.corpus(corpus) if corpus is not None else None  # a missing corpus fails here
    result = Pruning(neighbours, dry_run)
    with nullcontext() if dry_run else store.write_lock():  # a dry run reads its snapshot only
        if not dry_run:
            removal.finish_removals(store)
        ready = [c for c in store.corpora() if c.status == catalog.READY and (named is None or c.id == named.id)]
        if named is not None and not ready:
            raise InputError(f"corpus '{named.name}' is {named.status}, not ready: only a ready corpus can be "
                             "pruned (finish it with `knnstore resume-corpus` first)")
        for info in ready:
            t0 = time.perf_counter()
            kept = _plan(store, info.id, neighbours, exact, nprobes, progress)
            before, after = int(info.pairs), kept.num_rows
            if not dry_run and after < before:
                _commit(store, info, kept)
            result.corpora.append(CorpusPruning(info.name, before, after, time.perf_counter() - t0))
    store.refresh()
    return result


def _plan(store: "StoreHandle", corpus_id: int, neighbours: int, exact: bool, nprobes: int,
          progress: ProgressFn | None) -> pa.Table:
    """The rows of one corpus that stay, with their new weights (columns pair_id, weight)."""
    table = store.table
    where = f"corpus_id = {int(corpus_id)}"
    ids, docs, values, weights, found, found_docs = [], [], [], [], [], []
    searcher = ExactSearch(table, device=store.device) if exact or not table.has_vector_index() else None
    total, done = table.count(corpus_id), 0
    for keys, meta in table.scan_vectors(SEARCH_BATCH, where=where):
        if searcher is not None:
            near = searcher.search(keys, neighbours + 1, corpora=[corpus_id])
        else:
            near = table.search(keys, neighbours + 1, corpora=[corpus_id], nprobes=nprobes)
        ids.append(meta["pair_id"])
        docs.append(meta["document_id"])
        found_docs.append(near.document_ids)
        values.append(meta["next_token"])
        weights.append(meta[WEIGHT] if WEIGHT in meta else np.ones(len(keys), dtype=np.int64))
        found.append(near.pair_ids)
        done += len(keys)
        if progress:
            progress(done, total)
    if not ids:
        return pa.table({"pair_id": pa.array([], pa.int64()), WEIGHT: pa.array([], pa.int32())})
    pair_ids = np.concatenate(ids)
    order = np.argsort(pair_ids, kind="stable")  # rows in pair-id order: a stable, documented order
    pair_ids = pair_ids[order]
    rows = mergeable(pair_ids, np.concatenate(docs)[order], np.concatenate(found)[order],
                     np.concatenate(found_docs)[order])
    kept, new_weights = greedy_merge(np.concatenate(values)[order], np.concatenate(weights)[order], rows)
    return pa.table({"pair_id": pa.array(pair_ids[kept], pa.int64()),
                     WEIGHT: pa.array(new_weights[kept], pa.int32())})


def _commit(store: "StoreHandle", info, kept: pa.Table) -> None:
    """The intent, one Lance commit (weights and deletions together), then the counts."""
    store.verify_lock()
    store.table.add_weight_column()
    intent = removal.record(store, command=removal.PRUNE, corpus=info.name, n_documents=0,
                            n_pairs=int(info.pairs) - kept.num_rows, document_ids=[info.id])
    store.verify_lock()
    store.table.merge_pairs(kept, [info.id])
    crash_point("prune.after_table")
    removal.finish(store, intent)
    if store.table.has_vector_index():
        # the merge rewrote the corpus's kept rows: index them (into the trained partitions,
        # no retraining), else every search scans them
        Writer(store).update_index()
    store.table.index_pairs()  # the rewritten rows, found by id again
