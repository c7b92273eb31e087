"""lance-ray's distributed index build vs knnstore's one-process build, on a copy of a
store's table, in one run (why knnstore does not use lance-ray for index builds yet:
docs/scale-out.md).

    pip install lance-ray          # not a knnstore dependency
    python tools/bench_lance_ray.py STORE [--workers 2] [--queries 200]

Both build IVF-RQ (4 bits, sqrt(rows) partitions) over the same rows: lance-ray's
``create_index(..., num_workers=N)`` on a local Ray runtime (Lance trains the centroids on
the driver, the workers assign and encode groups of fragments, one index segment each),
and knnstore's build (``PairsTable.create_index``: knnstore's k-means, then Lance assigns
and encodes). Prints build seconds and recall@10 of held-out-ish queries (stored keys plus
noise) against the exact neighbours, at nprobes 16 and 32.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from knnstore import Store
from knnstore.index_kinds import default_partitions
from knnstore.schema import key_matrix
from knnstore.vectors import PairsTable


def recall(ds, queries: np.ndarray, exact: list[set], nprobes: int) -> float:
    hits = 0
    for q, truth in zip(queries, exact):
        found = ds.to_table(nearest={"column": "vector", "q": q, "k": 10, "nprobes": nprobes},
                            columns=["pair_id"]).column("pair_id").to_numpy()
        hits += len(truth & set(found.tolist()))
    return hits / (10 * len(queries))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    import lance
    import lance_ray
    import ray

    source = Store.open(args.store).table
    work = Path(tempfile.mkdtemp(prefix="bench-lance-ray-"))
    copy = work / "vectors"
    try:
        shutil.copytree(Path(str(source.uri)), copy)
        table = PairsTable.open(copy)
        ds = table.dataset()
        rows, dim = ds.count_rows(), source.schema.field("vector").type.list_size
        partitions = default_partitions(rows)
        rng = np.random.default_rng(3)
        keys = torch.from_numpy(key_matrix(ds.to_table(columns=["vector"]).column("vector").combine_chunks()))
        ids = ds.to_table(columns=["pair_id"]).column("pair_id").to_numpy()
        pick = rng.choice(rows, args.queries, replace=False)
        queries = keys[pick].numpy() + rng.normal(0, 0.05, (args.queries, dim)).astype(np.float32)
        nearest = torch.cdist(torch.from_numpy(queries), keys).topk(10, largest=False).indices.numpy()
        exact = [set(ids[row].tolist()) for row in nearest]
        del keys
        print(f"{rows:,} rows, dim {dim}, IVF-RQ 4 bits, {partitions} partitions, {args.queries} queries")

        ray.init(num_cpus=max(args.workers, 1), include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
        t = time.perf_counter()
        lance_ray.create_index(str(table.table_uri), "vector", "IVF_RQ", num_workers=args.workers,
                               num_partitions=partitions, num_bits=4)
        ray_s = time.perf_counter() - t
        ray.shutdown()
        ds = lance.dataset(str(table.table_uri))
        segments = len(ds.list_indices())
        print(f"  lance-ray {args.workers} workers  build {ray_s:6.1f} s  {segments} segments  recall@10 "
              f"nprobes 16 {recall(ds, queries, exact, 16):.3f}, 32 {recall(ds, queries, exact, 32):.3f}")

        table = PairsTable.open(copy)
        t = time.perf_counter()
        table.create_index(num_partitions=partitions)
        own_s = time.perf_counter() - t
        ds = table.dataset()
        print(f"  knnstore one process  build {own_s:6.1f} s  1 segment   recall@10 "
              f"nprobes 16 {recall(ds, queries, exact, 16):.3f}, 32 {recall(ds, queries, exact, 32):.3f}")
        print(f"  lance-ray / knnstore build speed: {own_s / ray_s:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
