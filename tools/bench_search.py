"""Search speed and recall on a real store: LanceDB vs exact brute force vs FAISS, side by side.

    python tools/bench_search.py STORE [--queries 512] [--k 64] [--rounds 3]
                                       [--text ../shared/data/wikitext-2/test.txt]

Queries are the keys of held-out text (the first --queries positions of --text), computed
by the store's own model, searched as one batch. Each method is called once untimed
(warm-up, recall@k against the exact neighbours), then timed in --rounds rounds over all
methods, best time kept (a burst of load from other jobs costs one round of one method).

* exact (torch): `Store.search(..., exact=True)`, the keys cached in memory as float32.
* LanceDB: `Store.search` with the store's ANN index (build it first: `knnstore index STORE
  --rebuild`) at several nprobes / refine_factor settings (refine 0: ranked by the index's
  own distance estimates; > 0: re-ranked with exact distances read from the table).
* FAISS (a benchmark-only dependency: pip install -e ".[bench]"), trained and filled with
  the same vectors (float32, in memory): IndexFlatL2; IndexIVFPQ with sqrt(rows)
  partitions and dim/8 sub-vectors, alone and with exact re-ranking (IndexRefineFlat); and
  IndexIVFRaBitQ (4 bits, the same algorithm as the default LanceDB index).

The last lines give, for each LanceDB setting, its speed over the fastest FAISS setting
that reaches at least the same recall.
"""

from __future__ import annotations

import argparse
import time

import torch
from benchlib import (
    faiss_ivfpq,
    faiss_rabitq,
    faiss_search,
    held_out_queries,
    query_args,
    table_keys,
    time_rounds,
)

from knnstore import Store

# (nprobes, refine_factor) per index type: RaBitQ ranks well without re-ranking, PQ does not.
LANCE_GRID = {"ivf_rq": ((8, 0), (16, 0), (32, 0), (64, 0), (16, 2), (32, 2)),
              "ivf_pq": ((8, 1), (8, 4), (16, 4), (32, 4), (32, 10), (64, 10))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    query_args(parser)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds over every method (best kept)")
    args = parser.parse_args()
    import faiss

    store = Store.open(args.store)
    queries = held_out_queries(store, args.text, args.queries)
    n_q, k = len(queries), args.k
    state = store.stats()
    print(f"store: {state.pairs:,} pairs, dim {state.dim}, {state.dtype}; index: "
          f"{', '.join(i.type for i in state.index.indices) or 'none'}; "
          f"{n_q} queries from {args.text}, k={k}; torch threads {torch.get_num_threads()}")

    truth = store.search(queries, k, exact=True).pair_ids

    def lance(nprobes, refine):
        return lambda: store.search(queries, k, nprobes=nprobes, refine_factor=refine).pair_ids

    kind = store.table.index_type()
    methods = [("exact, torch matmul + top-k (float32 in memory)",
                lambda: store.search(queries, k, exact=True).pair_ids)]
    if kind is not None:
        label = kind.upper().replace("_", "-")
        methods += [(f"LanceDB {label} nprobes={p} refine={r}", lance(p, r))
                    for p, r in LANCE_GRID.get(kind, LANCE_GRID["ivf_pq"])]
    else:
        print("(no ANN index: run `knnstore index STORE --rebuild` to include LanceDB)")

    xb, pids = table_keys(store.table)
    flat = faiss.IndexFlatL2(xb.shape[1])
    flat.add(xb)
    n_list = max(1, int(round(len(xb) ** 0.5)))
    m = xb.shape[1] // 8
    t0 = time.perf_counter()
    ivfpq = faiss_ivfpq(xb, n_list, m)
    refined = faiss.IndexRefineFlat(ivfpq, faiss.swig_ptr(xb))  # exact re-ranking from xb
    print(f"FAISS IVF-PQ({n_list}, {m}) trained and filled in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    rabitq = faiss_rabitq(xb, n_list)
    print(f"FAISS IVF-RaBitQ({n_list}, 4 bits) trained and filled in {time.perf_counter() - t0:.1f} s")

    def searcher(index, *settings):
        return faiss_search(index, queries, k, pids, *settings)

    faiss_methods = []
    for nprobe in (8, 16, 32, 64):
        faiss_methods.append((f"FAISS IVF-PQ nprobe={nprobe}", searcher(ivfpq, (ivfpq, "nprobe", nprobe))))
        for factor in (4, 10):
            faiss_methods.append((f"FAISS IVF-PQ nprobe={nprobe} + RefineFlat({factor})",
                                  searcher(refined, (ivfpq, "nprobe", nprobe), (refined, "k_factor", factor))))
    for nprobe in (8, 16, 32, 64):
        faiss_methods.append((f"FAISS IVF-RaBitQ(4 bits) nprobe={nprobe}",
                              searcher(rabitq, (rabitq, "nprobe", nprobe))))
    rows = time_rounds(methods + [("FAISS IndexFlatL2", searcher(flat))] + faiss_methods, truth, n_q, args.rounds)
    faiss_rows = rows[len(methods) + 1:]  # (method, queries/s, recall)

    print(f"{'method':56} {'queries/s':>10} {'recall@' + str(k):>10}")
    for name, qps, rec in rows:
        print(f"{name:56} {qps:10,.0f} {rec:10.3f}")
    print("\nLanceDB ÷ fastest FAISS setting (IVF-PQ or IVF-RaBitQ) with at least the same recall:")
    for name, qps, rec in rows:
        if not name.startswith("LanceDB"):
            continue
        rivals = [r for r in faiss_rows if r[2] >= rec]
        if rivals:
            best = max(rivals, key=lambda r: r[1])
            print(f"  {name:44} recall {rec:.3f}: {qps / best[1]:5.2f}x  ({best[0]}, recall {best[2]:.3f})")
        else:
            print(f"  {name:44} recall {rec:.3f}: no FAISS setting reaches it")


if __name__ == "__main__":
    main()
