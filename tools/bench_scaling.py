"""How search cost grows with the store: 0.1M to 10M synthetic keys, LanceDB vs exact vs FAISS.

    python tools/bench_scaling.py STORE [--sizes 100000,300000,1000000,2000000,5000000]
                                        [--queries 256] [--k 64] [--rounds 3] [--work DIR]
                                        [--key-dim D [--key-bits 4|8 --route-dim R]]

With ``--key-dim D`` the keys are those of a compact store (``init --key-dim D``,
docs/compact.md): the real keys and the queries projected by a ``KeyProjection`` fitted on
the real store's keys, the noise drawn in the projected space. With ``--key-bits`` too,
those keys are stored quantised (``--key-bits``, docs/compact.md): codes beside a float16
routing key of R dimensions that the index is built on; the exact reference is then the
brute-force search over the decoded codes, LanceDB's settings are (nprobes, candidates per
k re-ranked by the codes), and FAISS indexes the decoded keys. Each size also reports the
table's bytes per pair on disk (index included) and the process's peak memory.

The keys are synthetic but shaped like real ones: each is a key of STORE (a real store,
e.g. WikiText-2 valid) chosen at random, plus Gaussian noise of 0.1x the per-dimension
standard deviation, so they keep the clusters real contexts form (uniform random vectors
have none, and no index helps on them). Queries are the store model's keys of held-out
text (WikiText-2 test.txt), one batch. For each size, in one process:

* a LanceDB `pairs` table of that many rows (float16, the store's schema) and its index
  with knnstore's defaults (IVF-RQ, sqrt(rows) partitions, 4 bits), build timed;
* exact brute force (knnstore's ExactSearch: torch, keys in memory while they fit in 2 GiB,
  streamed from disk beyond);
* LanceDB search at several nprobes (ranked by the RaBitQ estimates) and with re-ranking;
* FAISS, the vectors in memory, the same partitions, trained on 256 vectors per partition
  as Lance samples: IndexIVFPQ (dim/8 sub-vectors) with exact re-ranking from a float16
  copy of the keys (IndexRefine over IndexScalarQuantizer fp16: the store's precision, and
  half the memory of IndexRefineFlat's float32 copy, which at 5M rows does not fit beside
  the rest in 23 GiB), and IndexIVFRaBitQ (4 bits).

Every search setting is timed in --rounds rounds over all of them, best time kept, so a
burst of load from other jobs costs one round of one setting rather than a whole side.
Prints recall@k and queries/s of each, and per size the speed of the fastest LanceDB and
FAISS settings that reach recall 0.95, and their ratio. Tables, their LanceDB indexes and
the FAISS indexes are kept in --work (a rerun reuses what is built; build times then read
nan).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from benchlib import (
    WIKI_TEST,
    best_time,
    faiss_ivfpq,
    faiss_rabitq,
    faiss_search,
    held_out_queries,
    refine_fp16,
    table_keys,
    time_rounds,
)

from knnstore import Store
from knnstore.projection import FIT_KEYS, KeyProjection
from knnstore.schema import key_columns, pairs_schema
from knnstore.vectors import ExactSearch, PairsTable

LANCE_SETTINGS = ((16, 0), (32, 0), (64, 0), (32, 2))  # (nprobes, refine factor) on IVF-RQ
QUANTISED_SETTINGS = ((16, 8), (32, 8), (32, 16), (64, 16))  # (nprobes, candidates per k) with --key-bits
FAISS_SETTINGS = ((16, 4), (32, 4), (32, 10), (64, 10))  # (nprobe, refine factor) on IVF-PQ
RABITQ_NPROBES = (16, 32, 64)
TARGET = 0.95


def synthetic_table(path: Path, base: np.ndarray, rows: int, dim: int, chunk: int = 200_000,
                    codec: KeyProjection | None = None) -> PairsTable:
    """A pairs table of `rows` noisy copies of `base` rows (deterministic); quantised by
    ``codec`` if it quantises."""
    if path.exists():
        table = PairsTable.open(path)
        table.use_codec(codec)
        if table.count() == rows:
            return table
        raise SystemExit(f"{path} holds {table.count():,} rows, not {rows:,}: delete it first")
    schema = pairs_schema(codec.stored_dim if codec else dim, "float16", code_bytes=codec.code_bytes if codec else 0)
    table = PairsTable.create(path, schema.field("vector").type.list_size, "float16", schema=schema)
    table.use_codec(codec)
    rng = np.random.default_rng(rows)
    scale = 0.1 * base.std(axis=0)

    def batches():
        for lo in range(0, rows, chunk):
            n = min(chunk, rows - lo)
            x = base[rng.integers(0, len(base), n)] + rng.standard_normal((n, dim), dtype=np.float32) * scale
            ids = np.arange(lo, lo + n, dtype=np.int64)
            yield pa.record_batch({
                "pair_id": ids, "corpus_id": np.ones(n, np.int32), "document_id": np.ones(n, np.int64),
                "position": (ids % 100_000).astype(np.int32), "token": (ids % 49152).astype(np.int32),
                "next_token": ((ids + 1) % 49152).astype(np.int32), **key_columns(table.schema, x, codec),
            }, schema=table.schema)

    table.add(pa.RecordBatchReader.from_batches(table.schema, batches()))
    return table


def cached_faiss(path: Path, build):
    """A FAISS index read from path, or built and written there; (index, build seconds or
    NaN when read). The 5M-row indexes take ~15 min to train on two cores."""
    import faiss

    if path.exists():
        return faiss.read_index(str(path)), float("nan")
    t0 = time.perf_counter()
    index = build()
    seconds = time.perf_counter() - t0
    faiss.write_index(index, str(path))
    return index, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", help="a real store whose keys shape the synthetic ones")
    parser.add_argument("--sizes", default="100000,300000,1000000,2000000,5000000")
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds over every method (best kept)")
    parser.add_argument("--text", default=str(WIKI_TEST))
    parser.add_argument("--work", default=str(Path(__file__).resolve().parents[2] / "knnstore-cache" / "scaling"))
    parser.add_argument("--key-dim", type=int, default=None, help="keys of a compact store of this dimension")
    parser.add_argument("--key-bits", type=int, default=None, help="those keys quantised to 4 or 8 bits")
    parser.add_argument("--route-dim", type=int, default=None, help="routing key dimensions of quantised keys")
    args = parser.parse_args()

    rounds = args.rounds
    store = Store.open(args.store)
    queries = held_out_queries(store, args.text, args.queries)
    base, _ = table_keys(store.table)
    suffix, codec = "", None
    if args.key_dim:
        sample = base[np.linspace(0, len(base) - 1, FIT_KEYS).astype(np.int64)]
        projection = KeyProjection.fit(sample, args.key_dim, args.key_bits, args.route_dim)
        base, queries = projection.apply(base), np.ascontiguousarray(projection.apply(queries))
        suffix = f"-d{args.key_dim}"
        if args.key_bits:
            codec = projection
            suffix += f"-b{args.key_bits}-r{projection.route_dim}"
    dim, k, n_q = base.shape[1], args.k, len(queries)
    print(f"base: {len(base):,} real keys of {args.store}, dim {dim}; {n_q} queries from "
          f"{Path(args.text).name}, k={k}; torch threads {torch.get_num_threads()}", flush=True)
    summary = []
    for rows in (int(s) for s in args.sizes.split(",")):
        path = Path(args.work) / f"synthetic-{rows}{suffix}"
        t0 = time.perf_counter()
        table = synthetic_table(path, base, rows, dim, codec=codec)
        t_write = time.perf_counter() - t0
        t_index = float("nan")  # reused from an earlier run
        if not table.has_vector_index():
            t0 = time.perf_counter()
            table.create_index()
            t_index = time.perf_counter() - t0
        print(f"\n{rows:,} rows: written in {t_write:.0f} s, IVF-RQ index built in {t_index:.0f} s "
              f"(on {table.dim} dims); "
              f"{table.nbytes() / rows:,.1f} bytes per pair on disk (index included)", flush=True)
        exact = ExactSearch(table)
        t_exact, truth = best_time(lambda: exact.search(queries, k), 1)
        xb, pids = table_keys(table, np.float16)  # 5.8 GB at 5M rows (11.5 as float32)
        n_list, m = int(round(rows ** 0.5)), dim // 8
        ivfpq, t_faiss = cached_faiss(path / "faiss-ivfpq.index",
                                      lambda: faiss_ivfpq(xb, n_list, m, train_rows=256 * n_list))
        rabitq, t_rabitq = cached_faiss(path / "faiss-rabitq.index",
                                        lambda: faiss_rabitq(xb, n_list, train_rows=256 * n_list))
        rabitq.qb = 8
        refined = refine_fp16(ivfpq, xb)  # its own float16 copy of the keys
        xb = None
        print(f"FAISS IVF-PQ({n_list}, {m}) built in {t_faiss:.0f} s, IVF-RaBitQ in {t_rabitq:.0f} s "
              "(nan: read from --work)", flush=True)

        def lance(nprobes, refine):
            return lambda: table.search(queries, k, nprobes=nprobes, refine_factor=refine).pair_ids

        methods = ([(f"LanceDB nprobes={p} refine={r}", lance(p, r))
                    for p, r in (QUANTISED_SETTINGS if codec else LANCE_SETTINGS)]
                   + [(f"FAISS IVF-PQ nprobe={p} refine={f}",
                       faiss_search(refined, queries, k, pids, (ivfpq, "nprobe", p), (refined, "k_factor", f)))
                      for p, f in FAISS_SETTINGS]
                   + [(f"FAISS IVF-RaBitQ nprobe={p}", faiss_search(rabitq, queries, k, pids, (rabitq, "nprobe", p)))
                      for p in RABITQ_NPROBES])
        results = [("exact (torch)", n_q / t_exact, 1.0)] + time_rounds(methods, truth.pair_ids, n_q, rounds)
        pids = ivfpq = refined = rabitq = None  # free before the next size
        for name, qps, rec in results:
            print(f"  {name:34} {qps:9,.0f} q/s  recall@{k} {rec:.3f}", flush=True)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"  peak memory of this process so far: {peak:,.1f} GiB (FAISS's in-memory copies included)", flush=True)

        def fastest(prefix):
            ok = [r for r in results if r[0].startswith(prefix) and r[2] >= TARGET]
            return max(ok, key=lambda r: r[1]) if ok else None

        summary.append((rows, results[0][1], fastest("LanceDB"), fastest("FAISS"), t_index, t_faiss))
    print(f"\nfastest setting with recall@{k} >= {TARGET} (queries/s):")
    print(f"{'rows':>10} {'exact':>8} {'LanceDB':>9} {'FAISS':>9} {'Lance/FAISS':>12} {'Lance/exact':>12} "
          f"{'index s Lance/FAISS-PQ':>23}")
    for rows, ex, lance, fa, ti, tf in summary:
        lq = lance[1] if lance else float("nan")
        fq = fa[1] if fa else float("nan")
        print(f"{rows:10,} {ex:8,.0f} {lq:9,.0f} {fq:9,.0f} {lq / fq:12.2f} {lq / ex:12.2f} {ti:9.0f}/{tf:.0f}")


if __name__ == "__main__":
    main()
