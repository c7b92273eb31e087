"""Pairs by id as the store grows: ``PairsTable.take`` with and without the scalar index on
pair_id (``PairsTable.index_pairs``), in one process.

    python tools/bench_take.py [--sizes 300000,1000000,10000000] [--work DIR] [--rounds 5]

For each size, a synthetic `pairs` table (the store's schema with float16 keys of 64
dimensions: the key's width does not change a lookup by id; documents of 2,000 positions),
cached in --work. Timed on the table without the index, then with it (made on a copy of
the table's manifest: the same data files): one pair by id (a neighbour's stored context),
its successor (same document, position + 1: what pointer following asks for each step),
64 random pairs in one call (a decoding step's neighbours), and ``tokens_around`` (explain's
stored context: 33 ids). Each the best of --rounds rounds of 20 calls (ms per call), and
the ratio without ÷ with the index. Then what keeping the index costs an add: 65,536 rows
appended to the indexed table and ``index_pairs`` timed (the rows are then removed again).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from knnstore.schema import key_columns, pair_id, pairs_schema
from knnstore.vectors import PAIR_INDEX, PairsTable

DIM = 64
DOC = 2000  # positions a document


def batch(schema: pa.Schema, lo: int, n: int, corpus_id: int = 1) -> pa.RecordBatch:
    """Pairs ``lo`` .. ``lo + n`` of the synthetic store (documents of ``DOC`` positions)."""
    i = np.arange(lo, lo + n, dtype=np.int64)
    doc, pos = i // DOC, (i % DOC).astype(np.int32)
    keys = np.random.default_rng(lo).standard_normal((n, DIM), dtype=np.float32)
    return pa.record_batch({
        "pair_id": pair_id(doc, pos), "corpus_id": np.full(n, corpus_id, np.int32), "document_id": doc,
        "position": pos, "token": (i % 49152).astype(np.int32), "next_token": ((i + 1) % 49152).astype(np.int32),
        **key_columns(schema, keys),
    }, schema=schema)


def synthetic(path: Path, rows: int, chunk: int = 500_000) -> PairsTable:
    """A table of ``rows`` pairs in documents of ``DOC`` positions (deterministic), cached."""
    if path.exists():
        table = PairsTable.open(path)
        if table.count() == rows:
            return table
        shutil.rmtree(path)
    schema = pairs_schema(DIM, "float16")
    table = PairsTable.create(path, DIM, "float16", schema=schema)
    table.add(pa.RecordBatchReader.from_batches(
        schema, (batch(schema, lo, min(chunk, rows - lo)) for lo in range(0, rows, chunk))))
    return table


def per_call_ms(fn, rounds: int, calls: int = 20) -> float:
    fn()  # warm-up: the index and the files' first pages
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1000


def measure(table: PairsTable, rows: int, rounds: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    docs = rows // DOC

    def one_id():
        return pair_id(int(rng.integers(docs)), int(rng.integers(DOC - 1)))

    def successor():
        pid = one_id()
        return table.take([int(pid) + 1], columns=["pair_id", "next_token"])

    ids64 = lambda: [int(one_id()) for _ in range(64)]  # noqa: E731
    return {
        "one pair": per_call_ms(lambda: table.take([int(one_id())], columns=["pair_id", "next_token"]), rounds),
        "its successor": per_call_ms(successor, rounds),
        "64 pairs": per_call_ms(lambda: table.take(ids64(), columns=["pair_id", "next_token"]), rounds),
        "tokens_around": per_call_ms(lambda: table.tokens_around(int(rng.integers(docs)), 1000, 24, 8), rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="300000,1000000,10000000")
    parser.add_argument("--work", default=str(Path(__file__).resolve().parents[2] / "knnstore-cache" / "take-bench"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print("size        lookup           no index ms   index ms   ratio")
    for rows in (int(x) for x in args.sizes.split(",")):
        t0 = time.perf_counter()
        plain = synthetic(work / f"plain-{rows}", rows)
        built = time.perf_counter() - t0
        indexed_path = work / f"indexed-{rows}"
        if not indexed_path.exists():
            shutil.copytree(work / f"plain-{rows}", indexed_path)
        indexed = PairsTable.open(indexed_path)
        t0 = time.perf_counter()
        indexed.index_pairs()
        index_s = time.perf_counter() - t0
        assert PAIR_INDEX in {i.name for i in indexed.index_state().indices}
        without, with_ = measure(plain, rows, args.rounds), measure(indexed, rows, args.rounds)
        for name in without:
            print(f"{rows:>10,}  {name:<15} {without[name]:>12.2f} {with_[name]:>10.2f} {without[name] / with_[name]:>7.1f}x")
        indexed.add(pa.Table.from_batches([batch(indexed.schema, rows, 65_536, corpus_id=2)]))
        t0 = time.perf_counter()
        indexed.index_pairs()
        update_s = time.perf_counter() - t0
        indexed.delete_corpus(2)
        print(f"{rows:>10,}  (table built in {built:.0f} s; pair index made in {index_s:.1f} s, "
              f"brought up to date after a 65,536-row add in {update_s:.2f} s)")


if __name__ == "__main__":
    main()
