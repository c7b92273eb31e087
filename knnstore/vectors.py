"""The LanceDB table `pairs` (its format: ``schema``; its index kinds: ``index_kinds``): add,
delete, index, batched nearest-neighbour search.

One row per stored pair: the key vector, the next token and where the pair came from.
Every ``add`` is one atomic LanceDB commit. Searches run on a pinned snapshot of the
table (``refresh`` moves it forward), so a reader never sees a write half-done.
``PairsTable.search`` is LanceDB's search (IVF-RQ or IVF-PQ once an index exists);
``ExactSearch`` is the brute-force reference (torch, streaming over the table).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Collection, Iterator

import numpy as np
import pyarrow as pa

from .config import PAIRS_TABLE, available_cpus
from .errors import StorageError, StoreDamagedError, first_line
from .index_kinds import AUTO_REFINE, CODES_REFINE, IndexInfo, IndexState, choose
from .location import Location, storage_failure
from .schema import CODES, RESULT_FIELDS, ROW_ID, WEIGHT, key_matrix, pair_id, pairs_schema

PAIR_INDEX = "pair_id_idx"  # the scalar index on pair_id (``PairsTable.index_pairs``)

if TYPE_CHECKING:  # torch is imported where keys are computed on: opening a table needs none
    import torch

    from .projection import KeyProjection


def lance_settings() -> None:
    """knnstore's LanceDB and Lance settings, applied before either is first used.

    Each is set only where the user has not set it, before LanceDB is first imported (it
    reads its log level then) and runs anything (it sizes its CPU pool then); importing
    knnstore changes no environment variable:

    * ``LANCEDB_LOG=error`` and ``LANCE_LOG`` (Lance's own) the same: the index builder
      warns once per partition ("partition N is empty, skipping", "visited_generator_queue
      is full": thousands of lines at millions of rows), which tells a knnstore user
      nothing; errors still show. Set ``LANCEDB_LOG=warn`` to see them again (Lance's
      follow it unless ``LANCE_LOG`` is set too).
    * ``LANCE_CPU_THREADS`` = every CPU: Lance runs the CPU work of searches and index
      builds on max(1, CPUs - 2) threads (two kept for I/O, which matters for object
      stores, not a local one): one thread on a 2-CPU machine. A batch search then runs as
      concurrent sub-batches (``search_parts``).
    * ``LANCE_INCLUDE_VECTOR_CENTROIDS=false``: index statistics without the partitions'
      centroids (Lance warns otherwise; knnstore reads only the row counts).
    """
    os.environ.setdefault("LANCEDB_LOG", "error")
    os.environ.setdefault("LANCE_LOG", os.environ["LANCEDB_LOG"])
    os.environ.setdefault("LANCE_CPU_THREADS", str(available_cpus()))
    os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")


def connect(place: Location):
    """A LanceDB connection at ``place`` (``lance_settings`` applied first)."""
    lance_settings()
    import lancedb

    return lancedb.connect(place.uri, storage_options=place.lance_options())


def open_dataset(place: Location, name: str):
    """Table ``name`` of the LanceDB database at ``place`` as a Lance dataset, at its latest
    version (``lance_settings`` applied first). Importing Lance alone takes a fraction of
    LanceDB's import, which is what lets commands that only read (``list``, ``stats``,
    ``sql``) start in well under a second."""
    lance_settings()
    import lance

    return lance.dataset(place.child(name + ".lance").uri, storage_options=place.lance_options())


class EventLoop:
    """An asyncio loop on a daemon thread, for LanceDB's public async API: the concurrent
    sub-batches of a big search run on it (``PairsTable.search``). One per process."""

    _current: "EventLoop | None" = None

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="knnstore-lancedb", daemon=True).start()

    @classmethod
    def get(cls) -> "EventLoop":
        if cls._current is None or cls._current.pid != os.getpid():  # none yet, or a forked child
            cls._current = cls()
        return cls._current

    def run(self, coro):
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


STORE_ID_KEY = "knnstore.store_id"  # the table's config entry binding it to its catalog
PROJECTION_KEY = "knnstore.key_projection"  # sha256 of the projection that made its keys



def _raise_storage_error(uri: Location, exc: BaseException, action: str) -> None:
    """A remote table's object store failing, as one StorageError (other errors: nothing)."""
    failure = storage_failure(exc) if uri.remote else None
    if failure is not None and "credentials" in failure:
        raise StorageError(f"cannot {action} the pairs table under {uri}: the object store's credentials are "
                           f"missing or refused ({failure.split(':')[0]}): set AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY (or --storage-option); the store is not damaged") from None
    if failure is not None:
        raise StorageError(f"cannot {action} the pairs table under {uri} ({failure}): check that the object "
                           "store is reachable and retry") from None


@contextmanager
def damage_errors(uri: Location) -> Iterator[None]:
    """Lance's errors about files it cannot read (a data file deleted or cut short) as one
    StoreDamagedError that names the table; other errors pass through unchanged."""
    try:
        yield
    except (OSError, ValueError, RuntimeError) as exc:
        _raise_storage_error(uri, exc, "read")
        text = str(exc)
        if "LanceError(IO)" not in text and "Not found" not in text and not isinstance(exc, OSError):
            raise
        detail = text.split("Not found:")[-1].split(",")[0].strip() if "Not found:" in text else first_line(exc)
        raise StoreDamagedError(f"the pairs table under {uri} is damaged (cannot read {detail}): "
                                "run `knnstore check` on the store, and restore it from a backup") from None


# Index estimates are off by ~0.1 in squared distance (IVF-RQ on the default model's keys),
# which hides a context the table holds verbatim (its own key at ~1e-4: adaptive.recognised).
# So where the caller asks (verify_nearest) and the estimates were returned as they are, the
# queries whose estimated nearest is within 1 / VERIFY_NEAREST of their eighth are searched
# again with their k re-ranked by exact distances: few on text the store does not hold,
# most positions of text it does.
VERIFY_NEAREST = 10.0
# One LanceDB multi-vector query runs on one thread; a batch is split into up to
# search_parts() sub-batches of at least MIN_PART_QUERIES queries, searched at the same time
# (measured on 2 CPUs: 2.0x the queries/s of one batch, docs/performance.md).
SEARCH_PARTS: int | None = None  # None: one per thread of Lance's CPU pool
MIN_PART_QUERIES = 16
# A batch smaller than this (a decoding step, a draft's verification) is searched through
# Lance's own nearest-neighbour query on the dataset: the same index and the same neighbours
# (distances agree with LanceDB's to ~1e-4), without importing LanceDB, which costs a
# process ~1-4 s at its first search (issue 33). Bigger batches go through LanceDB, whose
# async API runs their sub-batches at the same time (Lance's own query on a thread pool
# answered 512-query batches at 0.57x its queries/s, 2026-12-07).
DIRECT_MAX = 2 * MIN_PART_QUERIES


def search_parts() -> int:
    """How many sub-batches a big batch search is split into."""
    if SEARCH_PARTS is not None:
        return SEARCH_PARTS
    return max(1, int(os.environ.get("LANCE_CPU_THREADS") or available_cpus()))


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
    weights: np.ndarray  # pairs each neighbour stands for (``WEIGHT``); 1 where not pruned
    # where each neighbour lies in the table's snapshot (Lance's row id; -1: not known): its
    # successor is most often the next row (``PairsTable.successors``)
    row_ids: np.ndarray

    @classmethod
    def empty(cls, n_queries: int, k: int) -> "Neighbours":
        ints = lambda: np.full((n_queries, k), -1, dtype=np.int64)  # noqa: E731
        return cls(ints(), ints(), np.full((n_queries, k), np.inf, dtype=np.float32),
                   ints(), ints(), ints(), np.ones((n_queries, k), dtype=np.int64), ints())

    def rows(self, *rows: int) -> "Neighbours":
        """These rows, as a ``Neighbours`` of their own."""
        picked = list(rows)
        return Neighbours(**{f.name: getattr(self, f.name)[picked] for f in dataclasses.fields(Neighbours)})

    def put(self, rows, other: "Neighbours") -> None:
        """Set ``rows`` (indices, or a mask) of every field to ``other``'s rows, in order (in place)."""
        for f in dataclasses.fields(Neighbours):
            getattr(self, f.name)[rows] = getattr(other, f.name)

    def without(self, dropped: np.ndarray, k: int) -> "Neighbours":
        """The first ``k`` neighbours of each row that ``dropped`` [Q, k'] does not mark,
        still nearest first (slots past what is left are empty)."""
        n = self.pair_ids.shape[0]
        out = Neighbours.empty(n, k)
        order = np.argsort(dropped, axis=1, kind="stable")[:, :k]  # kept ones first, in their order
        kept = ~np.take_along_axis(dropped, order, axis=1)
        width = order.shape[1]
        for f in dataclasses.fields(Neighbours):
            source, target = getattr(self, f.name), getattr(out, f.name)
            target[:, :width] = np.where(kept, np.take_along_axis(source, order, axis=1), target[:, :width])
        return out


def in_list(column: str, ids: Collection[int]) -> str:
    """A Lance filter: ``column IN (ids)`` (whole numbers only, so nothing else gets in)."""
    return f"{column} IN ({', '.join(str(int(i)) for i in ids)})"


def value_counts(values: np.ndarray) -> dict[int, int]:
    """How often each whole number occurs in ``values``."""
    ids, counts = np.unique(values, return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts)}


class PairsTable:
    """The `pairs` table of one store."""

    def __init__(self, uri: Location, table, name: str = PAIRS_TABLE, dataset=None) -> None:
        # The LanceDB table (searches and writes) is opened when first needed (``_table``);
        # until then this handle reads the Lance dataset ``dataset`` (one of the two is given).
        self.uri, self._lancedb, self._ds, self.name = uri, table, dataset, name
        self._pinned = False  # the LanceDB table is checked out at an older version
        # A quantised table's projection (``use_codec``): decodes its codes for every read of keys.
        self.codec: KeyProjection | None = None
        self._has_index: tuple[int, bool] | None = None
        self._index_type: tuple[int, str | None] | None = None
        self._corpus_ids: tuple[int, frozenset[int]] | None = None
        self._fragments: tuple[int, dict[int, int]] | None = None  # ``_fragment_rows``
        self._reader = None  # the Lance dataset at the LanceDB table's version (``_lance``)
        self._async_table = None  # the same table through LanceDB's async API (split searches)
        self._async_version: int | None = None

    @classmethod
    def create(cls, uri: "Location | str | os.PathLike", dim: int, dtype: str, *,
               store_id: str | None = None, name: str = PAIRS_TABLE,
               schema: pa.Schema | None = None) -> "PairsTable":
        """A new, empty table ``name`` (``pairs``; a compaction writes its successor under
        another name) of the pairs schema for ``dim`` and ``dtype``, or of ``schema``."""
        uri = Location.of(uri)
        db = connect(uri)
        table = cls(uri, db.create_table(name, schema=schema or pairs_schema(dim, dtype)), name)
        if store_id is not None:
            table.set_store_id(store_id)
        return table

    @classmethod
    def open(cls, uri: "Location | str | os.PathLike", name: str = PAIRS_TABLE) -> "PairsTable":
        """Open the table; a missing or unreadable one is a StoreDamagedError."""
        uri = Location.of(uri)
        if not uri.exists():
            raise StoreDamagedError(f"the vector table directory {uri} is missing: restore the store from "
                                    "a backup (the catalog alone cannot rebuild the keys)")
        try:
            return cls(uri, None, name, dataset=open_dataset(uri, name))
        except Exception as exc:  # Lance raises ValueError / OSError / RuntimeError here
            _raise_storage_error(uri, exc, "open")
            raise StoreDamagedError(f"the vector table {uri.child(name + '.lance')} cannot be opened "
                                    f"({first_line(exc)}): restore the store from a backup") from None

    @staticmethod
    def table_names(uri: "Location | str | os.PathLike") -> list[str]:
        """The tables in the LanceDB database at ``uri`` (the store's own, and any a
        compaction cut short left behind)."""
        return list(connect(Location.of(uri)).table_names())

    @staticmethod
    def drop(uri: "Location | str | os.PathLike", name: str) -> None:
        """Delete table ``name`` and its files (a table the store no longer uses)."""
        connect(Location.of(uri)).drop_table(name)

    @property
    def _table(self):
        """The LanceDB table, opened on first use at this handle's version (a handle moves
        to the latest version only by ``refresh`` or its own writes)."""
        if self._lancedb is None:
            table = connect(self.uri).open_table(self.name)
            if table.version != self._ds.version:
                table.checkout(self._ds.version)
                self._pinned = True
            self._lancedb, self._ds = table, None
        return self._lancedb

    def _writable(self):
        """The LanceDB table for a write (on the latest version: a checked-out one refuses writes)."""
        table = self._table
        if self._pinned:
            table.checkout_latest()
            self._pinned = False
        return table

    def _lance(self):
        """The Lance dataset at this handle's version (through an open LanceDB table: opened
        once per version, since searches read it)."""
        if self._lancedb is None:
            return self._ds
        if self._reader is None or self._reader.version != self._lancedb.version:
            self._reader = self._lancedb.to_lance()
        return self._reader

    def store_id(self) -> str | None:
        """The id of the store this table belongs to (in the table's config; None: unbound)."""
        return self._lance().config().get(STORE_ID_KEY)

    def key_projection(self) -> str | None:
        """The sha256 of the key projection this table's keys were made with (None: the
        model's keys as they are)."""
        return self._lance().config().get(PROJECTION_KEY)

    def set_key_projection(self, sha: str) -> None:
        self._lance().update_config({PROJECTION_KEY: sha})
        self.refresh()

    def use_codec(self, codec: "KeyProjection | None") -> None:
        """Read this table's keys with ``codec`` (the store's projection; needed when the
        table keeps quantised keys, ``quantised``)."""
        self.codec = codec

    @property
    def quantised(self) -> bool:
        """Whether the table keeps its keys as codes (and ``vector`` is a routing key)."""
        return CODES in self.schema.names

    def _codec(self) -> "KeyProjection":
        if self.codec is None or not self.codec.quantised:
            raise StoreDamagedError(f"the vector table at {self.uri} keeps quantised keys but the store has no "
                                    "quantising key projection for it: restore the store from a backup")
        return self.codec

    def keys_of(self, batch: pa.RecordBatch | pa.Table) -> np.ndarray:
        """The keys of ``batch``'s rows as the store searches them, float32 [rows, key dim]:
        ``vector``, or the decoded ``codes`` of a quantised table."""
        if self.quantised:
            return self._codec().decode(self._codes(batch))
        column = batch.column("vector")
        return key_matrix(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column)

    def _codes(self, batch: pa.RecordBatch | pa.Table) -> np.ndarray:
        """The ``codes`` of ``batch``'s rows, uint8 [rows, code bytes] (zero-copy)."""
        column = batch.column(CODES)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        width = column.type.byte_width
        raw = np.frombuffer(column.buffers()[1], dtype=np.uint8, count=(column.offset + len(column)) * width)
        return raw[column.offset * width:].reshape(len(column), width)

    @property
    def key_column(self) -> str:
        """The column the store's keys are read from (``codes`` on a quantised table)."""
        return CODES if self.quantised else "vector"

    @property
    def dim(self) -> int:
        """The dimension of the float key column ``vector`` (a quantised table's routing key)."""
        return self.schema.field("vector").type.list_size

    def set_store_id(self, store_id: str) -> None:
        self._lance().update_config({STORE_ID_KEY: store_id})
        self.refresh()

    @property
    def schema(self) -> pa.Schema:
        return self._ds.schema if self._lancedb is None else self._lancedb.schema

    @property
    def version(self) -> int:
        return self._ds.version if self._lancedb is None else self._lancedb.version

    def refresh(self) -> None:
        """Move this handle's snapshot to the latest committed version."""
        with damage_errors(self.uri):
            if self._lancedb is None:
                self._ds = open_dataset(self.uri, self.name)
            else:
                self._lancedb.checkout_latest()
                self._pinned = False

    def latest_version(self) -> int:
        """The table's latest committed version (this handle stays where it is)."""
        with damage_errors(self.uri):
            return open_dataset(self.uri, self.name).version

    def add(self, data: pa.Table | pa.RecordBatchReader) -> None:
        """Append rows in one atomic commit (a reader streams its batches into it)."""
        self._writable().add(data)

    def delete_corpus(self, corpus_id: int) -> None:
        """Delete a corpus's rows, in one commit."""
        self._writable().delete(f"corpus_id = {int(corpus_id)}")

    def delete_documents(self, document_ids: Collection[int]) -> None:
        """Delete every row of these documents (ids are unique in the store), in one commit."""
        if document_ids:
            self._writable().delete(in_list("document_id", document_ids))

    def delete_pairs(self, pair_ids: Collection[int]) -> None:
        """Delete these pairs, in one commit."""
        if pair_ids:
            self._writable().delete(in_list("pair_id", pair_ids))

    def counts_by_document(self, document_ids: Collection[int]) -> dict[int, int]:
        """Rows of each of these documents (absent: none)."""
        if not document_ids:
            return {}
        return value_counts(self.columns(["document_id"], where=in_list("document_id", document_ids))
                            .column("document_id").to_numpy())

    def counts_by_document_of_corpus(self, corpus_id: int) -> dict[int, int]:
        """Rows of each document of one corpus (absent: none)."""
        return value_counts(self.columns(["document_id"], where=f"corpus_id = {int(corpus_id)}")
                            .column("document_id").to_numpy())

    def cleanup(self) -> int:
        """Drop old versions and data files no version references (a killed add leaves
        some). Run it only under the write lock: a reader pinned to an old version loses it.
        Returns how many old versions went."""
        from datetime import timedelta

        stats = self._lance().cleanup_old_versions(older_than=timedelta(0), delete_unverified=True)
        self.refresh()
        return int(getattr(stats, "old_versions", 0) or 0)

    def purge(self) -> dict[str, int]:
        """Take deleted rows off the disk: rewrite every data file that holds one (Lance
        compaction, which also merges small fragments and remaps the index), then drop the
        old versions that still name the old files (``cleanup``). Under the write lock."""
        self.refresh()
        with damage_errors(self.uri):
            metrics = self._lance().optimize.compact_files(
                materialize_deletions=True, materialize_deletions_threshold=1e-9)
        self.refresh()
        return {"fragments_rewritten": int(metrics.fragments_removed), "fragments_written": int(metrics.fragments_added),
                "versions_dropped": self.cleanup()}

    def dataset(self):
        """The Lance dataset at this handle's pinned version (for scans such as SQL's)."""
        return self._lance()

    @property
    def table_uri(self) -> Location:
        """The Lance dataset's own directory (``pairs.lance``)."""
        return self.uri.child(self.name + ".lance")

    def append_fragments(self, fragments: list) -> None:
        """Commit data fragments written by other processes (``lance.fragment.write_fragments``)
        in one commit, on top of this handle's version (the caller holds the write lock)."""
        import lance

        if fragments:
            lance.LanceDataset.commit(self.table_uri.uri, lance.LanceOperation.Append(fragments),
                                      read_version=self.version, storage_options=self.uri.lance_options())
        self.refresh()

    def data_files(self) -> dict[str, int]:
        """The table's data files on disk (or object store): name -> bytes, whether or not
        a version names them (one listing)."""
        return self.table_uri.files("data")

    def missing_files(self) -> list[str]:
        """Data files the table's current version names but the disk does not hold."""
        present = self.data_files()
        return [f.path for frag in self._lance().get_fragments() for f in frag.data_files()
                if f.path not in present]

    def check_complete(self, store_path: Location) -> None:
        """Refuse (StoreDamagedError) a table whose data files are not all there: a write
        would fail half way through (a removal would be left ``removing``)."""
        missing = self.missing_files()
        if missing:
            raise StoreDamagedError(
                f"the pairs table of {store_path} is damaged ({len(missing)} data file(s) missing, "
                f"e.g. {missing[0]}): nothing was changed; `knnstore check {store_path}` lists "
                "the damage, restore the store from a backup")

    def columns(self, names: list[str], where: str | None = None) -> pa.Table:
        """Some columns of every row (of the rows matching ``where``), from this snapshot."""
        with damage_errors(self.uri):
            return self._lance().to_table(columns=names, filter=where)

    def count(self, corpus_id: int | None = None) -> int:
        where = None if corpus_id is None else f"corpus_id = {int(corpus_id)}"
        if self._lancedb is None:
            return self._ds.count_rows(filter=where)
        return self._lancedb.count_rows(where)

    def counts_by_corpus(self) -> dict[int, int]:
        return value_counts(self.columns(["corpus_id"]).column("corpus_id").to_numpy())

    def take(self, pair_ids: Collection[int], columns: list[str] | None = None) -> pa.Table:
        """Rows by pair id (any order)."""
        return self.columns(columns, where=in_list("pair_id", pair_ids))

    def successors(self, neighbours: "Neighbours", ahead: int) -> tuple["Neighbours", np.ndarray]:
        """The ``ahead`` pairs that follow each of n stored pairs in its document (positions
        +1 to +ahead): ``Neighbours`` [n, ahead] (distances +inf: not measured yet) and their
        keys as the store searches them, float32 [n, ahead, key dim]. ``neighbours`` is a
        ``Neighbours`` [n] row (or flattened rows) with pair and row ids, as a search gives.

        Read by row id, not by the pair-id index (one random read per row, ~10x cheaper at
        these sizes): a document's pairs are written in order, so a pair's successor is
        almost always the next row. A successor that is not (another fragment, removed, past
        the document's end, a row id this snapshot does not hold) is missing (pair id -1)."""
        pair_ids, row_ids = neighbours.pair_ids.reshape(-1), neighbours.row_ids.reshape(-1)
        n = len(pair_ids)
        out, keys = Neighbours.empty(n, ahead), np.zeros((n, ahead, self.dim), dtype=np.float32)
        steps = np.arange(1, ahead + 1, dtype=np.int64)
        wanted = np.where(((pair_ids >= 0) & (row_ids >= 0))[:, None], row_ids[:, None] + steps, -1)
        fragment, offset = wanted >> 32, wanted & 0xFFFFFFFF
        sizes = self._fragment_rows()
        limit = np.array([sizes.get(int(f), 0) for f in fragment.ravel()], dtype=np.int64).reshape(fragment.shape)
        take = np.unique(wanted[(wanted >= 0) & (offset < limit)])
        if len(take) == 0:
            return out, keys
        fields = self.result_fields()
        with damage_errors(self.uri):
            # Lance's take by row id (marked unstable in pylance: the one place it is used)
            rows = self._lance()._take_rows(take.astype(np.uint64).tolist(), columns=[self.key_column, *fields])
        got = rows.column("pair_id").to_numpy()
        order = np.argsort(got)
        expected = np.where(wanted >= 0, pair_ids[:, None] + steps, -1)
        at = np.clip(np.searchsorted(got, expected, sorter=order), 0, len(got) - 1)
        found = (expected >= 0) & (got[order[at]] == expected)
        source = order[at][found]
        for name, field in {**fields, ROW_ID: None}.items():
            if field is None:
                out.row_ids[found] = wanted[found]
            else:
                getattr(out, field)[found] = rows.column(name).to_numpy().astype(np.int64)[source]
        decoded = self.keys_of(rows)  # a quantised table's keys are wider than its routing key
        keys = np.zeros((n, ahead, decoded.shape[1]), dtype=np.float32)
        keys[found] = decoded[source]
        return out, keys

    def _fragment_rows(self) -> dict[int, int]:
        """Each fragment's addressable rows (removed ones included) in this snapshot, by id."""
        version = self.version
        if self._fragments is None or self._fragments[0] != version:
            self._fragments = (version, {f.fragment_id: f.metadata.physical_rows
                                         for f in self._lance().get_fragments()})
        return self._fragments[1]

    def tokens_around(self, document_id: int, position: int, before: int,
                      after: int) -> tuple[list[int], int | None, int | None, list[int]]:
        """A stored pair's document tokens around it, from the stored pairs: up to ``before``
        tokens before ``position``, its token and next token (None, None if the pair is not
        stored), and the tokens after the next one, up to ``position + after``."""
        lo = max(0, position - before)
        ids = pair_id(document_id, np.arange(lo, position + after + 1))
        rows = self.take(ids.tolist(), columns=["position", "token", "next_token"]).to_pydict()
        by_pos = dict(zip(rows["position"], zip(rows["token"], rows["next_token"])))
        here, nxt = by_pos.get(position, (None, None))
        left = [by_pos[p][0] for p in range(lo, position) if p in by_pos]
        right = [by_pos[p][0] for p in range(position + 2, position + after + 1) if p in by_pos]
        return left, here, nxt, right

    def nbytes(self) -> int:
        """Bytes on disk (or object store) of the table's database directory (a table a
        cut-short compaction left there included), old versions not yet cleaned up too."""
        return sum(self.uri.files().values())

    def index_state(self) -> "IndexState":
        """The table's indices and how many rows the key column's index covers."""
        indices, indexed, unindexed = [], 0, self.count()
        for info, (n_indexed, n_unindexed) in self._indices(stats=True):
            indices.append(info)
            if "vector" in info.columns:
                indexed, unindexed = n_indexed, n_unindexed
        return IndexState(tuple(indices), indexed, unindexed)

    def _indices(self, stats: bool = False) -> list[tuple["IndexInfo", tuple[int, int]]]:
        """The table's indices, with (indexed, unindexed) rows where ``stats`` (else 0, 0);
        through LanceDB once it is open, else through Lance (its type names made LanceDB's:
        IVF_RQ -> IvfRq)."""
        out = []
        if self._lancedb is not None:
            for index in self._lancedb.list_indices():
                s = self._lancedb.index_stats(index.name) if stats else None
                out.append((IndexInfo(index.name, str(index.index_type), tuple(index.columns)),
                            (s.num_indexed_rows, s.num_unindexed_rows) if s is not None else (0, 0)))
            return out
        for index in self._ds.list_indices():
            kind = "".join(part.capitalize() for part in str(index["type"]).split("_"))
            s = self._ds.stats.index_stats(index["name"]) if stats else None
            out.append((IndexInfo(index["name"], kind, tuple(index["fields"])),
                        (int(s["num_indexed_rows"]), int(s["num_unindexed_rows"])) if s else (0, 0)))
        return out

    def has_vector_index(self) -> bool:
        """Whether the key column has an ANN index (asked once per table version: every
        decoding step searches)."""
        version = self.version
        if self._has_index is None or self._has_index[0] != version:
            found = any("vector" in info.columns for info, _ in self._indices())
            self._has_index = (version, found)
        return self._has_index[1]

    def corpus_ids(self) -> frozenset[int]:
        """The corpus ids that have rows in this version of the table (read once per version)."""
        version = self.version
        if self._corpus_ids is None or self._corpus_ids[0] != version:
            self._corpus_ids = (version, frozenset(self.counts_by_corpus()))
        return self._corpus_ids[1]

    def needs_filter(self, corpora: Collection[int] | None) -> bool:
        """Whether a search limited to ``corpora`` must filter: not when every row is theirs.
        (A LanceDB prefilter makes an IVF-PQ search about 4x slower.)"""
        return corpora is not None and not self.corpus_ids() <= frozenset(corpora)

    def create_index(self, num_partitions: int | None = None, num_sub_vectors: int | None = None,
                     index_type: str | None = None, device: torch.device | None = None) -> dict:
        """Train an ANN index (squared L2) on the vectors; replaces any previous one.
        Returns the parameters used.

        ``index_type``: ``ivf_rq`` (default; RaBitQ, 4 bits per dimension) or ``ivf_pq``
        (8-bit product quantisation; implied by ``num_sub_vectors``). Defaults: about
        sqrt(rows) partitions; for PQ one sub-vector per 8 dimensions. The partitions'
        centroids are trained by ``kmeans`` on ``device`` (a GPU when the store has one)
        from a sample of the keys; Lance assigns every row and encodes it.
        """
        kind = choose(self.count(), self.dim, index_type, num_partitions, num_sub_vectors)
        options = {"metric": "L2", "replace": True, **kind.lance_options(),
                   "ivf_centroids": self.train_centroids(kind.partitions, device).cpu().numpy()}
        with damage_errors(self.uri):
            self._lance().create_index("vector", kind.name.upper(), **options)
        self.refresh()
        return kind.params()

    def train_centroids(self, partitions: int, device: torch.device | None = None, seed: int = 0) -> torch.Tensor:
        """IVF centroids [partitions, dim] of a random sample of the keys (``kmeans``:
        ``SAMPLE_PER_PARTITION`` keys per partition, or every key of a smaller table)."""
        import torch

        from .kmeans import SAMPLE_PER_PARTITION, kmeans

        rows = self._sample(SAMPLE_PER_PARTITION * partitions, seed, "vector")
        keys = np.require(key_matrix(rows.column("vector").combine_chunks()), requirements="W")  # the indexed column
        return kmeans(torch.from_numpy(keys).to(device or "cpu"), partitions, seed=seed)

    def sample_keys(self, n: int, seed: int = 0) -> np.ndarray:
        """Up to ``n`` keys drawn at random without replacement (every key of a smaller
        table): float32 [min(n, rows), key dim] (``keys_of``)."""
        return self.keys_of(self._sample(n, seed, self.key_column))

    def _sample(self, n: int, seed: int, column: str) -> pa.Table:
        ds = self._lance()
        rows = ds.count_rows()
        picked = np.sort(np.random.default_rng(seed).choice(rows, min(rows, n), replace=False))
        with damage_errors(self.uri):
            return ds.take(picked, columns=[column])

    def batches(self, columns: list[str], batch_rows: int = 32768, where: str | None = None,
                with_row_ids: bool = False) -> Iterator[pa.RecordBatch]:
        """Every row of this snapshot (matching ``where``), these columns (and ``_rowid``
        where asked), in record batches."""
        with damage_errors(self.uri):
            for batch in self._lance().to_batches(columns=columns, batch_size=batch_rows, filter=where,
                                                  with_row_id=with_row_ids or None):
                if batch.num_rows:
                    yield batch

    def index_type(self) -> str | None:
        """``ivf_rq`` / ``ivf_pq`` (or another Lance type, lower case) of the key column's
        index; None without one (asked once per table version)."""
        version = self.version
        if self._index_type is None or self._index_type[0] != version:
            kinds = [info.type for info, _ in self._indices() if "vector" in info.columns]
            name = None
            if kinds:
                raw = kinds[0].replace("_", "").lower()  # "IvfRq" / "IVF_RQ" -> "ivfrq"
                name = {"ivfrq": "ivf_rq", "ivfpq": "ivf_pq"}.get(raw, raw)
            self._index_type = (version, name)
        return self._index_type[1]

    def index_pairs(self) -> None:
        """Keep the scalar index on ``pair_id`` (``PAIR_INDEX``, a BTREE) over every row, so
        that pairs by id (``take``: a neighbour's successor, explain's stored context) are
        found by the index at any store size instead of a scan: made where the table has
        rows and no such index, brought up to date where rows came since (an add, a prune's
        rewrite). One commit, no data changed; under the write lock."""
        if self.count() == 0:
            return
        with damage_errors(self.uri):
            missing = self._rows_outside_pair_index()
            if missing is None:
                self._lance().create_scalar_index("pair_id", "BTREE", name=PAIR_INDEX)
            elif missing:
                self._lance().optimize.optimize_indices(index_names=[PAIR_INDEX])
        self.refresh()

    def pairs_indexed(self) -> bool:
        """Whether every row is in the scalar index on pair_id (``index_pairs``)."""
        missing = self._rows_outside_pair_index()
        return self.count() == 0 if missing is None else missing == 0

    def _rows_outside_pair_index(self) -> int | None:
        """Rows the scalar index on pair_id does not cover yet; None: the table has none."""
        ds = self._lance()
        if PAIR_INDEX not in {index["name"] for index in ds.list_indices()}:
            return None
        return int(ds.stats.index_stats(PAIR_INDEX)["num_unindexed_rows"])

    def update_index(self) -> None:
        """Add the rows written since the index was trained to it, without retraining: a
        delta index (rows are assigned to the existing partitions and PQ-encoded)."""
        self._lance().optimize.optimize_indices(num_indices_to_merge=0)
        self.refresh()

    @property
    def weighted(self) -> bool:
        """Whether the table has the ``weight`` column (a corpus of it was pruned)."""
        return WEIGHT in self.schema.names

    def result_fields(self) -> dict[str, str]:
        """The columns a search returns of each neighbour -> their ``Neighbours`` field."""
        return {**RESULT_FIELDS, WEIGHT: "weights"} if self.weighted else RESULT_FIELDS

    def add_weight_column(self) -> None:
        """Give the table its ``weight`` column, 1 on every row (one commit; a no-op once
        it has one)."""
        if not self.weighted:
            with damage_errors(self.uri):
                self._writable().add_columns({WEIGHT: "CAST(1 AS INT)"})
            self.refresh()

    def merge_pairs(self, kept: pa.Table, corpus_ids: Collection[int]) -> dict[str, int]:
        """One commit: set the weights of ``kept`` (columns pair_id, weight) and delete every
        other row of ``corpus_ids`` (the pairs merged into them). ``kept`` must hold every
        row of those corpora that stays."""
        with damage_errors(self.uri):
            result = (self._writable().merge_insert("pair_id").when_matched_update_all()
                      .when_not_matched_by_source_delete(in_list("corpus_id", sorted(corpus_ids)))
                      .execute(kept))
        self.refresh()
        return {"updated": int(result.num_updated_rows), "deleted": int(result.num_deleted_rows)}

    def scan_vectors(self, batch_rows: int = 32768, where: str | None = None, with_row_ids: bool = False,
                     ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Every row's key (float32 [n, key dim], ``keys_of``) and result columns (of the
        rows matching ``where``; with ``with_row_ids``, ``_rowid`` too), streamed in batches."""
        fields = [*self.result_fields(), *([ROW_ID] if with_row_ids else [])]
        for batch in self.batches([self.key_column, *self.result_fields()], batch_rows, where, with_row_ids):
            yield self.keys_of(batch), {name: batch.column(name).to_numpy() for name in fields}

    def search(self, queries: np.ndarray, k: int, corpora: Collection[int] | None = None, *,
               nprobes: int = 32, refine_factor: int | None = None, verify_nearest: bool = False) -> Neighbours:
        """The k nearest pairs of each query row, by LanceDB (a big batch as concurrent sub-batches).

        Uses the ANN index when there is one (rows added since are searched exactly).
        ``refine_factor`` > 0 re-ranks refine_factor x k candidates with exact distances
        (read from the table: the costly part of a search); 0 ranks by the index's own
        distance estimates, which are then what is returned; None lets the index type
        decide (``AUTO_REFINE``). With ``verify_nearest``, rows whose estimated nearest
        stands out are searched again with exact distances (``VERIFY_NEAREST``).

        On a quantised table the index (or, without one, LanceDB's exact search) finds
        ``refine_factor`` x k candidates (None: ``CODES_REFINE``) by the routing key, and they
        are ranked by the distances of their decoded codes, which are what is returned.

        Args:
            queries: [Q, key dim] float array.
            k: neighbours per query.
            corpora: only rows of these corpus ids are returned (None: every row).
        """
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        n_queries = queries.shape[0]
        out = Neighbours.empty(n_queries, k)
        if n_queries == 0 or k <= 0:
            return out
        where = None
        if self.needs_filter(corpora):
            if not corpora:
                return out
            where = in_list("corpus_id", sorted(corpora))
        indexed = self.has_vector_index()
        quantised = self.quantised
        if quantised:
            limit = k * (CODES_REFINE if refine_factor is None else max(1, refine_factor))
            with damage_errors(self.uri):
                result, qi = self._run(queries[:, :self._codec().route_dim], limit, nprobes if indexed else None,
                                       0, where, [CODES])
        else:
            if indexed and refine_factor is None:
                refine_factor = AUTO_REFINE.get(self.index_type(), 4)
            with damage_errors(self.uri):
                result, qi = self._run(queries, k, nprobes if indexed else None, refine_factor, where)
        if result.num_rows == 0:
            return out
        dist = self._code_distances(result, queries, qi) if quantised else result.column("_distance").to_numpy()
        order = np.lexsort((dist, qi))  # by query, then nearest first
        qi = qi[order]
        starts = np.searchsorted(qi, qi, side="left")
        rank = np.arange(len(qi)) - starts
        keep = rank < k
        rows, cols = qi[keep], rank[keep]
        out.distances[rows, cols] = dist[order][keep]
        for name, field in {**self.result_fields(), ROW_ID: "row_ids"}.items():
            getattr(out, field)[rows, cols] = result.column(name).to_numpy().astype(np.int64)[order][keep]
        if verify_nearest and indexed and not quantised and not refine_factor and k >= 8:
            self._verify_nearest(out, queries, corpora, nprobes)
        return out

    def _verify_nearest(self, out: Neighbours, queries: np.ndarray, corpora: Collection[int] | None,
                        nprobes: int) -> None:
        """Rows of ``out`` whose estimated nearest stands out (``VERIFY_NEAREST``) searched
        again with exact distances for their k (in place)."""
        d1, d8 = np.maximum(out.distances[:, 0], 0.0), out.distances[:, 7]
        rows = np.flatnonzero(np.isfinite(d8) & (out.next_tokens[:, 7] >= 0) & (d1 * VERIFY_NEAREST <= d8))
        if len(rows) == 0:
            return
        exact = self.search(queries[rows], out.distances.shape[1], corpora, nprobes=nprobes, refine_factor=1)
        out.put(rows, exact)

    def _code_distances(self, result: pa.Table, queries: np.ndarray, qi: np.ndarray) -> np.ndarray:
        """Squared L2 from each candidate's decoded codes to its query (float32)."""
        return self._codec().code_distances(self._codes(result), queries, qi)

    def _run(self, queries: np.ndarray, k: int, nprobes: int | None, refine_factor: int | None,
             where: str | None, extra: list[str] = ()) -> tuple[pa.Table, np.ndarray]:
        """LanceDB's rows for a batch and the query index of each row: one multi-vector query,
        or (a batch big enough to split) ``search_parts()`` of them at once through LanceDB's
        async API (each answered whole in Rust); all on the table's pinned version. ``extra``:
        columns returned besides the result fields and the distance."""
        cols = [*self.result_fields(), *extra, "_distance", ROW_ID]

        def configure(query, asynchronous: bool = False, **filter_options):  # a sync or async LanceDB vector query
            query = query.limit(k)
            query = query.with_row_id() if asynchronous else query.with_row_id(True)
            if nprobes is not None:
                query = query.nprobes(nprobes)
                if refine_factor:
                    query = query.refine_factor(refine_factor)
            if where is not None:
                query = query.where(where, **filter_options)
            return query.select(cols)

        if len(queries) < DIRECT_MAX:  # through Lance itself: see DIRECT_MAX
            nearest = {"column": "vector", "q": queries if len(queries) > 1 else queries[0], "k": k}
            if nprobes is not None:  # the index, with exactly nprobes partitions (LanceDB's nprobes)
                nearest.update(minimum_nprobes=nprobes, maximum_nprobes=nprobes)
                if refine_factor:
                    nearest["refine_factor"] = refine_factor
            else:  # no index: an exact scan
                nearest["use_index"] = False
            result = self._lance().to_table(columns=[c for c in cols if c != ROW_ID], nearest=nearest,
                                            filter=where, prefilter=where is not None, with_row_id=True)
            return result, _query_index(result)
        parts = min(search_parts(), len(queries) // MIN_PART_QUERIES)
        if parts <= 1:
            result = configure(self._table.search(queries), prefilter=True).to_arrow()
            return result, _query_index(result)
        chunks = np.array_split(queries, parts)
        version = self.version

        async def all_parts() -> list[pa.Table]:
            table = await self._async_at(version)
            # async vector queries prefilter by default, like prefilter=True above
            return await asyncio.gather(*(configure(table.query().nearest_to(list(part)), True).to_arrow()
                                          for part in chunks))

        tables = EventLoop.get().run(all_parts())
        offsets = np.cumsum([0] + [len(c) for c in chunks[:-1]])
        qi = np.concatenate([_query_index(t) + off for t, off in zip(tables, offsets)])
        return pa.concat_tables([t.select(cols) for t in tables]), qi

    async def _async_at(self, version: int):
        """The table through LanceDB's async API, checked out at ``version`` (opened once)."""
        if self._async_table is None:
            import lancedb

            db = await lancedb.connect_async(self.uri.uri, storage_options=self.uri.lance_options())
            self._async_table, self._async_version = await db.open_table(self.name), None
        if self._async_version != version:
            await self._async_table.checkout(version)
            self._async_version = version
        return self._async_table


def _query_index(result: pa.Table) -> np.ndarray:
    """Which query of a multi-vector search each row answers (a one-vector search has no
    column for it)."""
    if "query_index" in result.column_names:
        return result.column("query_index").to_numpy().astype(np.int64)
    return np.zeros(result.num_rows, dtype=np.int64)


class ExactSearch:
    """Brute-force k nearest neighbours over every visible row: the reference for the index.

    Streams the table in batches and keeps a running top-k per query (torch matmul,
    float32). The float32 keys are kept in memory between searches while they fit in
    ``cache_bytes``; a larger table is streamed again for each search, so memory stays
    bounded whatever the store's size. On a GPU (``device``) the keys are kept and the
    distances computed there.
    """

    def __init__(self, table: PairsTable, cache_bytes: int = 2 << 30,
                 batch_rows: int = 32768, query_block: int = 1024, device: torch.device | None = None) -> None:
        self.table, self.cache_bytes = table, cache_bytes
        self.device = device  # None: the CPU
        self.batch_rows, self.query_block = batch_rows, query_block
        self._cache: list | None = None
        self._cache_version: int | None = None

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]]]:
        import torch

        version = self.table.version
        if self._cache is not None and self._cache_version == version:
            yield from self._cache
            return
        cache: list | None = []
        used = 0
        for vectors, meta in self.table.scan_vectors(self.batch_rows, with_row_ids=True):
            if not vectors.flags.writeable:  # zero-copy from Arrow (float32 stores)
                vectors = vectors.copy()
            x = torch.from_numpy(np.ascontiguousarray(vectors)).to(self.device or "cpu")
            item = (x, (x * x).sum(dim=1), meta)
            if cache is not None:
                used += x.nbytes
                cache = cache + [item] if used <= self.cache_bytes else None
            yield item
        self._cache, self._cache_version = cache, (version if cache is not None else None)

    def search(self, queries: np.ndarray, k: int, corpora: Collection[int] | None = None) -> Neighbours:
        """Same contract as ``PairsTable.search``, with exact results."""
        import torch

        with torch.inference_mode():
            return self._search(queries, k, corpora)

    def _search(self, queries: np.ndarray, k: int, corpora: Collection[int] | None) -> Neighbours:
        import torch

        dev = self.device or torch.device("cpu")
        q_all = torch.from_numpy(np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)).to(dev)
        n_queries = q_all.shape[0]
        out = Neighbours.empty(n_queries, k)
        if n_queries == 0 or k <= 0:
            return out
        allowed = np.array(sorted(corpora), dtype=np.int64) if self.table.needs_filter(corpora) else None
        fields = {**self.table.result_fields(), ROW_ID: "row_ids"}
        best_d = torch.full((n_queries, k), float("inf"), device=dev)
        best_rows = {name: torch.full((n_queries, k), -1, dtype=torch.int64, device=dev) for name in fields}
        q_norm = (q_all * q_all).sum(dim=1, keepdim=True)  # [Q, 1]
        for x, x_norm, meta in self._batches():
            hidden = None if allowed is None else torch.from_numpy(~np.isin(meta["corpus_id"], allowed)).to(dev)
            cols = {name: torch.from_numpy(meta[name].astype(np.int64)).to(dev) for name in fields}
            for lo in range(0, n_queries, self.query_block):
                hi = min(n_queries, lo + self.query_block)
                # ||q - x||^2 = ||q||^2 - 2 q.x + ||x||^2, [block, n]
                d = torch.addmm(x_norm.unsqueeze(0), q_all[lo:hi], x.T, alpha=-2.0)
                d.add_(q_norm[lo:hi]).clamp_(min=0.0)
                if hidden is not None:
                    d[:, hidden] = float("inf")
                part_d, part_i = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False)
                merged_d = torch.cat([best_d[lo:hi], part_d], dim=1)
                best, order = torch.topk(merged_d, k, dim=1, largest=False)
                best_d[lo:hi] = best
                for name, target in best_rows.items():
                    merged = torch.cat([target[lo:hi], cols[name][part_i]], dim=1)
                    target[lo:hi] = torch.gather(merged, 1, order)
        missing = torch.isinf(best_d)
        out.distances[:] = best_d.cpu().numpy()
        for name, field in fields.items():
            getattr(out, field)[:] = best_rows[name].masked_fill(missing, 1 if name == WEIGHT else -1).cpu().numpy()
        return out
