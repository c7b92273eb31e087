"""Making an existing store's keys smaller in place: ``knnstore compact STORE --key-dim D
[--key-bits B [--route-dim R]]``.

A store keeps its pairs in one LanceDB table, named by the catalog (``store_config.
pairs_table``; "pairs" unless a compaction renamed it). Compaction writes the successor
beside it and switches to it in one catalog transaction, so a crash at any point leaves a
store that opens with one whole table:

1. a projection is fitted on up to ``FIT_KEYS`` of the stored keys (drawn at random) and,
   where the store already reduces its keys, composed with its projection: queries are
   still the model's keys, projected once; with ``--key-bits``, the grid its keys are
   quantised on (``projection``), fitted on the same sample;
2. a new table ``pairs_<8 hex>`` gets every row of the current version, its key projected,
   in one commit (rows deleted earlier are not copied, nor are old versions: a compaction
   purges the table), then the store id and the projection's sha256 in its config;
3. one catalog transaction: the table's name, the key dimension, the projection;
4. the old table is dropped, and the index is trained on the new one (as before: the
   type it had; searches are exact until then).

A compaction killed before step 3 leaves the old table in use and the new one unused; one
killed after it leaves the old one unused: ``knnstore check --repair``, or the next
compaction, deletes a table the catalog does not name (``leftover_tables``).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
from sqlalchemy import update
from sqlalchemy.orm import Session

from . import catalog
from .check import leftover_tables
from .config import ProgressFn, check_number
from .errors import InputError
from .faults import crash_point
from .index_kinds import INDEX_TYPES
from .projection import FIT_KEYS, KeyProjection
from .removal import finish_removals
from .schema import CODES, key_columns, pairs_schema
from .vectors import PairsTable
from .writer import Writer

if TYPE_CHECKING:
    from .handle import StoreHandle

COPY_BATCH = 65536  # rows projected and written at a time


@dataclass
class Compaction:
    """What ``compact`` did."""

    key_dim_before: int
    key_dim: int
    rows: int
    bytes_before: int
    bytes_after: int
    seconds: float
    projection: str
    key_bits: int | None = None
    route_dim: int | None = None

    def to_dict(self) -> dict:
        return {"key_dim_before": self.key_dim_before, "key_dim": self.key_dim, "rows": self.rows,
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "seconds": round(self.seconds, 1), "projection": self.projection,
                "key_bits": self.key_bits, "route_dim": self.route_dim}


def compact(store: "StoreHandle", key_dim: int, progress: ProgressFn | None = None, *, key_bits: int | None = None,
            route_dim: int | None = None) -> Compaction:
    """Rewrite the store's keys reduced to ``key_dim`` dimensions, quantised to ``key_bits``
    per dimension if given (see the module's steps)."""
    check_number("key_dim", key_dim, 1, None, integer=True)
    route_dim = KeyProjection.check_quantisation(key_dim, key_bits, route_dim)
    t0 = time.perf_counter()
    with store.write_lock():
        old = store.table
        dim_before, rows = store.identity.search_dim, old.count()
        # bad input changes nothing: checked before any repair below
        if key_dim > dim_before or (key_dim == dim_before and (key_bits is None or old.quantised)):
            raise InputError(f"--key-dim must be below the {dim_before} dimensions the store's keys have now "
                             f"(or equal, with --key-bits, to quantise float keys), got {key_dim}: compaction "
                             "only makes keys smaller")
        if rows <= key_dim:
            raise InputError(f"the store holds {rows:,} keys: too few to fit {key_dim} dimensions on; add "
                             "corpora first")
        finish_removals(store)
        for name in leftover_tables(store):
            PairsTable.drop(old.uri, name)
        rows = old.count()  # the removals finished above may have taken some
        bytes_before = old.nbytes()
        step = KeyProjection.fit(old.sample_keys(FIT_KEYS), key_dim, key_bits, route_dim)
        projection = step if store.projection is None else step.after(store.projection)
        index_type = old.index_type() if old.has_vector_index() else None
        if index_type is not None and index_type not in INDEX_TYPES:
            index_type = None  # another type (built by hand): knnstore's default
        new = _copy(store, old, step, projection.sha256, progress)
        crash_point("compact.after_new_table")
        store.verify_lock()
        with Session(store.engine) as s, s.begin():
            s.execute(update(catalog.StoreConfig).where(catalog.StoreConfig.id == 1).values(
                pairs_table=new.name, key_dim=key_dim, key_projection=projection.to_bytes(),
                key_projection_sha=projection.sha256, key_bits=key_bits, route_dim=route_dim))
        crash_point("compact.after_switch")
        store.use_table(new, projection)
        PairsTable.drop(old.uri, old.name)
        store.table.index_pairs()
        if old.has_vector_index():
            Writer(store).create_index(index_type=index_type)
    store.refresh()
    return Compaction(dim_before, key_dim, rows, bytes_before, store.table.nbytes(),
                      time.perf_counter() - t0, projection.describe(), key_bits, route_dim)


def _copy(store: "StoreHandle", old: PairsTable, step: KeyProjection, sha: str, progress: ProgressFn | None) -> PairsTable:
    """The new table: every row of ``old`` with its key projected by ``step`` (and
    quantised, if it quantises), one commit; its config names the store and ``sha``, the
    projection from model keys to its keys."""
    dtype = store.identity.dtype
    schema = pairs_schema(step.stored_dim, dtype, weighted=old.weighted, code_bytes=step.code_bytes)
    new = PairsTable.create(old.uri, step.stored_dim, dtype, name=f"pairs_{secrets.token_hex(4)}", schema=schema)
    total, done = old.count(), 0
    copied = [name for name in schema.names if name not in ("vector", CODES)]

    def batches():
        nonlocal done
        for batch in old.batches([*copied, old.key_column], COPY_BATCH):
            keys = key_columns(schema, step.apply(old.keys_of(batch)), step)
            cols = [keys[f.name] if f.name in keys else batch.column(f.name) for f in schema]
            done += batch.num_rows
            if progress:
                progress(done, total)
            yield pa.RecordBatch.from_arrays(cols, schema=schema)

    store.verify_lock()
    new.add(pa.RecordBatchReader.from_batches(schema, batches()))
    if store.store_id is not None:
        new.set_store_id(store.store_id)
    new.set_key_projection(sha)
    return new
