"""Index build time: knnstore's k-means centroids vs LanceDB's own IVF training, same index.

    python tools/bench_index.py STORE [--rounds 2] [--queries 512] [--k 64]
                                      [--text ../shared/data/wikitext-2/test.txt]

Works on a copy of STORE (in a temporary directory beside it), so the store is untouched.
Both sides build the same index (IVF-RQ, 4 bits, knnstore's number of partitions) on the
same table, alternated in --rounds rounds, best time kept:

* "lance": LanceDB trains the partitions itself (`create_index` without centroids: what
  knnstore did before);
* "knnstore": `PairsTable.create_index` (`kmeans.kmeans` on a sample of 256 keys per
  partition, on --device, then Lance assigns and encodes every row).

After each build, recall@k at nprobes 16 and 32 against exact search over the same keys.
Prints the times, their ratio and the recalls.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from benchlib import held_out_queries, query_args, recall

from knnstore import Store
from knnstore.index_kinds import RQ_BITS, default_partitions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    query_args(parser)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where knnstore's k-means runs (auto, cpu, cuda, ...)")
    args = parser.parse_args()

    source = Path(args.store).resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-index-", dir=source.parent))
    try:
        shutil.copytree(source, work / "store")
        store = Store.open(work / "store", device=args.device)
        table = store.table
        rows = table.count()
        partitions = default_partitions(rows)
        queries = held_out_queries(store, args.text, args.queries)
        truth = store.search(queries, args.k, exact=True).pair_ids
        print(f"store {source}: {rows:,} rows, dim {store.identity.dim}; IVF-RQ {RQ_BITS} bits, "
              f"{partitions} partitions; {len(queries)} queries, k={args.k}")

        def lance_own():
            table.dataset().create_index("vector", "IVF_RQ", metric="L2", num_partitions=partitions,
                                         num_bits=RQ_BITS, replace=True)
            table.refresh()

        def knnstore_kmeans():
            table.create_index(num_partitions=partitions)

        best = {"lance": float("inf"), "knnstore": float("inf")}
        recalls: dict[str, tuple[float, float]] = {}
        for r in range(args.rounds):
            for name, build in (("lance", lance_own), ("knnstore", knnstore_kmeans)):
                t = time.perf_counter()
                build()
                seconds = time.perf_counter() - t
                best[name] = min(best[name], seconds)
                store.refresh()
                recalls[name] = tuple(recall(store.search(queries, args.k, nprobes=n).pair_ids, truth)
                                      for n in (16, 32))
                print(f"  round {r + 1}: {name:9} {seconds:6.1f} s  recall@{args.k} nprobes 16 "
                      f"{recalls[name][0]:.3f}, 32 {recalls[name][1]:.3f}", flush=True)
        for name in best:
            print(f"{name:9} build {best[name]:6.1f} s (best of {args.rounds})  recall nprobes 16 "
                  f"{recalls[name][0]:.3f}, 32 {recalls[name][1]:.3f}")
        print(f"speed-up knnstore / lance = {best['lance'] / best['knnstore']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
