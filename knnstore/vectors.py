"""The LanceDB table `pairs`: schema, add, delete, batched nearest-neighbour search.

One row per stored pair: the key vector, the next token and where the pair came from.
Every ``add`` is one atomic LanceDB commit. Searches run on a pinned snapshot of the
table (``refresh`` moves it forward), so a reader never sees a write half-done.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import lancedb
import numpy as np
import pyarrow as pa

from .config import PAIRS_TABLE
from .ingest import pairs_schema

# Columns a search returns besides the distance.
_RESULT_COLUMNS = ["pair_id", "next_token", "corpus_id", "document_id", "position"]


@dataclass
class Neighbours:
    """The k nearest stored pairs of each query, nearest first; arrays of shape [Q, k].

    ``distances`` are squared L2 distances. Where a store holds fewer than k visible
    pairs, the missing slots have pair_id -1 and distance +inf.
    """

    pair_ids: np.ndarray
    next_tokens: np.ndarray
    distances: np.ndarray
    corpus_ids: np.ndarray
    document_ids: np.ndarray
    positions: np.ndarray

    @classmethod
    def empty(cls, n_queries: int, k: int) -> "Neighbours":
        ints = lambda: np.full((n_queries, k), -1, dtype=np.int64)  # noqa: E731
        return cls(ints(), ints(), np.full((n_queries, k), np.inf, dtype=np.float32),
                   ints(), ints(), ints())


def directory_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:  # removed while we walked (a concurrent cleanup)
                pass
    return total


class PairsTable:
    """The `pairs` table of one store."""

    def __init__(self, uri: Path, table) -> None:
        self.uri, self._table = uri, table

    @classmethod
    def create(cls, uri: Path, dim: int, dtype: str) -> "PairsTable":
        db = lancedb.connect(str(uri))
        return cls(uri, db.create_table(PAIRS_TABLE, schema=pairs_schema(dim, dtype)))

    @classmethod
    def open(cls, uri: Path) -> "PairsTable":
        db = lancedb.connect(str(uri))
        return cls(uri, db.open_table(PAIRS_TABLE))

    @property
    def schema(self) -> pa.Schema:
        return self._table.schema

    @property
    def version(self) -> int:
        return self._table.version

    def refresh(self) -> None:
        """Move this handle's snapshot to the latest committed version."""
        self._table.checkout_latest()

    def add(self, data: pa.Table) -> None:
        """Append rows in one atomic commit."""
        self._table.add(data)

    def delete_corpus(self, corpus_id: int, document_ids: Collection[int] | None = None) -> None:
        """Delete a corpus's rows, or only those of some of its documents."""
        where = f"corpus_id = {int(corpus_id)}"
        if document_ids is not None:
            if not document_ids:
                return
            where += f" AND document_id IN ({', '.join(str(int(d)) for d in document_ids)})"
        self._table.delete(where)

    def count(self, corpus_id: int | None = None) -> int:
        return self._table.count_rows(None if corpus_id is None else f"corpus_id = {int(corpus_id)}")

    def counts_by_corpus(self) -> dict[int, int]:
        col = self._table.to_lance().to_table(columns=["corpus_id"]).column("corpus_id")
        ids, counts = np.unique(col.to_numpy(), return_counts=True)
        return {int(i): int(c) for i, c in zip(ids, counts)}

    def take(self, pair_ids: Collection[int], columns: list[str] | None = None) -> pa.Table:
        """Rows by pair id (any order)."""
        ids = ", ".join(str(int(p)) for p in pair_ids)
        ds = self._table.to_lance()
        return ds.to_table(columns=columns, filter=f"pair_id IN ({ids})")

    def nbytes(self) -> int:
        """Bytes on disk, including old versions not yet cleaned up."""
        return directory_bytes(self.uri)

    def index_state(self) -> dict:
        indices = self._table.list_indices()
        state = {"indices": [], "indexed_rows": 0, "unindexed_rows": self._table.count_rows()}
        for index in indices:
            stats = self._table.index_stats(index.name)
            state["indices"].append({"name": index.name, "type": str(index.index_type),
                                     "columns": list(index.columns)})
            if stats is not None and "vector" in index.columns:
                state["indexed_rows"] = stats.num_indexed_rows
                state["unindexed_rows"] = stats.num_unindexed_rows
        return state

    def search(self, queries: np.ndarray, k: int, exclude_corpora: Collection[int] = ()) -> Neighbours:
        """The k nearest pairs of each query row, in one batched search.

        Args:
            queries: [Q, dim] float array.
            k: neighbours per query.
            exclude_corpora: corpus ids whose rows must not be returned.
        """
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        n_queries = queries.shape[0]
        out = Neighbours.empty(n_queries, k)
        if n_queries == 0 or k <= 0:
            return out
        query = self._table.search(queries if n_queries > 1 else queries[0]).limit(k)
        if exclude_corpora:
            ids = ", ".join(str(int(c)) for c in sorted(exclude_corpora))
            query = query.where(f"corpus_id NOT IN ({ids})", prefilter=True)
        result = query.select(_RESULT_COLUMNS + ["_distance"]).to_arrow()
        if result.num_rows == 0:
            return out
        qi = (result.column("query_index").to_numpy() if "query_index" in result.column_names
              else np.zeros(result.num_rows, dtype=np.int64))
        dist = result.column("_distance").to_numpy()
        order = np.lexsort((dist, qi))  # by query, then nearest first
        qi = qi[order]
        starts = np.searchsorted(qi, qi, side="left")
        rank = np.arange(len(qi)) - starts
        keep = rank < k
        rows, cols = qi[keep], rank[keep]
        out.distances[rows, cols] = dist[order][keep]
        for name, target in (("pair_id", out.pair_ids), ("next_token", out.next_tokens),
                             ("corpus_id", out.corpus_ids), ("document_id", out.document_ids),
                             ("position", out.positions)):
            target[rows, cols] = result.column(name).to_numpy()[order][keep]
        return out
