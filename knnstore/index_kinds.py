"""ANN index kinds of the pairs table, as small config objects (as LanceDB's own
``index.py`` does): IVF with RaBitQ codes (the default) or with product quantisation. A
kind knows its parameters, their defaults for a table of some rows, its checks, what Lance
is asked to build and what the catalog records of it; a new kind is one class here.

    >>> choose(rows=10_000, dim=64)
    IvfRq(partitions=100, bits=4)
    >>> choose(rows=10_000, dim=64, num_sub_vectors=8).params()
    {'type': 'ivf_pq', 'partitions': 100, 'sub_vectors': 8}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .config import MAX_PARTITIONS, check_number
from .errors import InputError

RQ_BITS = 4


@dataclass(frozen=True)
class IvfRq:
    """IVF with RaBitQ codes (``bits`` per dimension). Its 4-bit distances are precise enough
    to rank without re-ranking (recall@64 0.97 at nprobes 32 on a WikiText-2 store,
    docs/performance.md): ``refine`` 0 where the caller leaves it to the index."""

    partitions: int
    bits: int = RQ_BITS
    name: ClassVar[str] = "ivf_rq"
    refine: ClassVar[int] = 0

    def lance_options(self) -> dict:
        return {"num_partitions": self.partitions, "num_bits": self.bits}

    def params(self) -> dict:
        """What the catalog (``index_builds``) and ``index --json`` record of it."""
        return {"type": self.name, "partitions": self.partitions, "bits": self.bits}


@dataclass(frozen=True)
class IvfPq:
    """IVF with 8-bit product quantisation (``sub_vectors`` of the key). Its distances are not
    precise enough to rank alone (recall@64 0.77 without re-ranking, 0.96 with x4): ``refine``
    4 where the caller leaves it to the index."""

    partitions: int
    sub_vectors: int
    name: ClassVar[str] = "ivf_pq"
    refine: ClassVar[int] = 4

    def lance_options(self) -> dict:
        return {"num_partitions": self.partitions, "num_sub_vectors": self.sub_vectors}

    def params(self) -> dict:
        return {"type": self.name, "partitions": self.partitions, "sub_vectors": self.sub_vectors}


KINDS = {kind.name: kind for kind in (IvfRq, IvfPq)}
INDEX_TYPES = tuple(KINDS)
DEFAULT_INDEX_TYPE = IvfRq.name
# Re-ranking when the caller leaves it to the index (refine_factor=None), by kind.
AUTO_REFINE = {name: kind.refine for name, kind in KINDS.items()}
# A quantised store ranks refine_factor x k candidates of its routing key by their codes
# (8 when the caller leaves it to the store: 1,024 candidates at k=128, docs/compact.md).
CODES_REFINE = 8


def choose(rows: int, dim: int, index_type: str | None = None, num_partitions: int | None = None,
           num_sub_vectors: int | None = None) -> IvfRq | IvfPq:
    """The index to train on ``rows`` keys of ``dim``: ``index_type`` (default IVF-RQ; IVF-PQ
    when ``num_sub_vectors`` is given), about sqrt(rows) partitions unless given, one PQ
    sub-vector per 8 dimensions unless given; the parameters checked against the table."""
    if index_type is None:
        index_type = IvfPq.name if num_sub_vectors is not None else DEFAULT_INDEX_TYPE
    if index_type not in KINDS:
        raise InputError(f"index type must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}")
    if num_sub_vectors is not None and index_type != IvfPq.name:
        raise InputError(f"sub-vectors are IVF-PQ's: give --type ivf_pq with them, or leave them out for {index_type}")
    check_index_params(rows, dim, num_partitions, num_sub_vectors)
    partitions = default_partitions(rows) if num_partitions is None else num_partitions
    if index_type == IvfPq.name:
        return IvfPq(partitions, num_sub_vectors if num_sub_vectors is not None else (dim // 8 if dim % 8 == 0 else 1))
    return IvfRq(partitions)


def default_partitions(rows: int) -> int:
    """IVF partitions for ``rows`` keys: about sqrt(rows), so a probe scans about sqrt(rows)
    codes per partition as the store grows (uncapped up to MAX_PARTITIONS, 4.3e9 rows; a
    cap of 4,096 would leave 244k rows a partition at 10^9 rows)."""
    return max(1, min(MAX_PARTITIONS, int(round(rows ** 0.5))))


def check_index_params(rows: int, dim: int, num_partitions: int | None, num_sub_vectors: int | None) -> None:
    """Index parameters a table of ``rows`` keys of ``dim`` can be trained with."""
    if rows == 0:
        raise InputError("the store has no rows to train an index on: add a corpus first")
    if num_partitions is not None:
        check_number(f"partitions (the table has {rows:,} rows)", num_partitions, 1, min(rows, MAX_PARTITIONS), integer=True)
    if num_sub_vectors is not None:
        check_number("sub_vectors", num_sub_vectors, 1, dim, integer=True)
        if dim % num_sub_vectors:
            fits = [d for d in range(1, dim + 1) if dim % d == 0]
            raise InputError(f"sub_vectors must divide the key dimension {dim} (one of "
                             f"{', '.join(map(str, fits))}), got {num_sub_vectors}")


@dataclass(frozen=True)
class IndexInfo:
    """One index of the table (LanceDB's name and type, the columns it covers)."""

    name: str
    type: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class IndexState:
    """The table's indices, and the rows the key column's index covers and does not
    (rows added since it was trained, searched exactly until ``update_index``)."""

    indices: tuple[IndexInfo, ...]
    indexed_rows: int
    unindexed_rows: int

    @property
    def has_vector_index(self) -> bool:
        return any("vector" in i.columns for i in self.indices)

    def describe(self) -> str:
        """The key column's index types, as ``stats`` and ``index`` print them (the scalar
        index on pair_id, there on every store with pairs, is listed in ``indices`` only)."""
        return ", ".join(i.type for i in self.indices if "vector" in i.columns) or "none (exact search)"

    def to_dict(self) -> dict:
        """As ``stats --json`` shows it: indices as {name, type, columns} objects."""
        return {"indices": [{"name": i.name, "type": i.type, "columns": list(i.columns)} for i in self.indices],
                "indexed_rows": self.indexed_rows, "unindexed_rows": self.unindexed_rows}
