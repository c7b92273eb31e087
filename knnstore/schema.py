"""The `pairs` table's format, its one home (docs/storage.md): the columns and their Arrow
types, the key columns (a float vector; on a quantised store a routing key and codes), the
optional weight column, pair ids, and record batches built by column name.

    >>> pairs_schema(576, "float16").names[:3]
    ['pair_id', 'corpus_id', 'document_id']
    >>> int(pair_id(3, 5)) == (3 << 32) | 5
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from .errors import InputError

if TYPE_CHECKING:
    from .projection import KeyProjection


# Every column but the key, with its Arrow type, in table order; `vector` comes last.
PAIR_COLUMNS = {
    "pair_id": pa.int64(),      # pair_id(document_id, position): stable, unique in the store
    "corpus_id": pa.int32(),
    "document_id": pa.int64(),
    "position": pa.int32(),     # t, the token position in the document
    "token": pa.int32(),        # the token at t
    "next_token": pa.int32(),   # the token at t+1: the value
}
VECTOR_TYPES = {"float16": pa.float16(), "float32": pa.float32()}
VECTOR_NUMPY = {pa.float16(): np.float16, pa.float32(): np.float32}
# How many pairs of its corpus a row stands for: 1, unless ``knnstore prune`` merged
# neighbours with the same next token into it (p_kNN then adds log(weight) to its logit).
# Added to a table by its first prune; a table without it weighs every row 1.
WEIGHT = "weight"
# A quantised store's keys (``projection``): ``code_bytes`` bytes of per-dimension codes a
# row, beside a small float ``vector`` (the routing key) that the index is built on.
CODES = "codes"


def pairs_schema(dim: int, dtype: str, weighted: bool = False, code_bytes: int = 0) -> pa.Schema:
    """Arrow schema of the LanceDB table `pairs`: the columns above and the key vector
    (``dim``: the routing key's dimension on a quantised store), the ``codes`` of a quantised
    store (``code_bytes`` > 0), then (``weighted``: a table some corpus of which was pruned)
    the ``weight`` column, where ``add_weight_column`` puts it."""
    fields = [pa.field(name, kind, nullable=False) for name, kind in PAIR_COLUMNS.items()]
    fields.append(pa.field("vector", pa.list_(VECTOR_TYPES[dtype], dim), nullable=False))
    if code_bytes:
        fields.append(pa.field(CODES, pa.binary(code_bytes), nullable=False))
    if weighted:
        fields.append(pa.field(WEIGHT, pa.int32(), nullable=False))
    return pa.schema(fields)


def pair_id(document_id, position):
    """Stable pair id: document id in the high 32 bits, position in the low 32."""
    return (np.asarray(document_id, dtype=np.int64) << 32) | np.asarray(position, dtype=np.int64)


def row_bytes(dim: int, dtype: str, code_bytes: int = 0) -> int:
    """Bytes one row takes at its stored width (before LanceDB's own overhead)."""
    return (sum(kind.bit_width // 8 for kind in PAIR_COLUMNS.values()) + dim * VECTOR_TYPES[dtype].bit_width // 8
            + code_bytes)


def key_columns(schema: pa.Schema, keys: np.ndarray, codec: "KeyProjection | None" = None) -> dict[str, pa.Array]:
    """The key columns of ``schema`` for ``keys`` [n, key dim] (as the store searches them):
    ``vector`` alone; or, on a quantised store, ``codec``'s routing key and codes."""
    vtype = schema.field("vector").type
    out = {}
    if CODES in schema.names:
        if codec is None or not codec.quantised:
            raise InputError("this table keeps quantised keys: its key projection is needed to write them")
        keys, codes = codec.encode(keys)
        ctype = schema.field(CODES).type
        out[CODES] = pa.Array.from_buffers(ctype, len(codes), [None, pa.py_buffer(codes.tobytes())])
    flat = pa.array(np.asarray(keys).astype(VECTOR_NUMPY[vtype.value_type], copy=False).reshape(-1),
                    vtype.value_type)
    out["vector"] = pa.FixedSizeListArray.from_arrays(flat, vtype.list_size)
    return out


def pairs_batch(schema: pa.Schema, *, document_id, position, corpus_id: int, token, next_token,
                vector: np.ndarray, codec: "KeyProjection | None" = None) -> pa.RecordBatch:
    """One record batch of pairs, built by column name (``pair_id`` is derived; the key
    columns by ``key_columns``)."""
    n = len(position)
    columns = {"pair_id": pair_id(document_id, position), "corpus_id": np.full(n, corpus_id),
               "document_id": document_id, "position": position, "token": token, "next_token": next_token}
    keys = key_columns(schema, vector, codec)
    return pa.RecordBatch.from_arrays(
        [keys[f.name] if f.name in keys else pa.array(np.asarray(columns[f.name]), f.type) for f in schema],
        schema=schema)


# What a search returns of each neighbour besides the distance: column -> Neighbours field.
RESULT_FIELDS = {"pair_id": "pair_ids", "next_token": "next_tokens", "corpus_id": "corpus_ids",
                 "document_id": "document_ids", "position": "positions"}
ROW_ID = "_rowid"  # Lance's row id column, returned by a search where asked (``Neighbours.row_ids``)


def key_matrix(column: pa.FixedSizeListArray) -> np.ndarray:
    """A key column as float32 [rows, dim] (zero-copy and read-only for a float32 store)."""
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(column), column.type.list_size).astype(np.float32, copy=False)
