"""k-means for the ANN index's partitions (Lloyd's algorithm in torch, on any device).

LanceDB trains its IVF partitions itself, but more slowly than a matrix-product k-means:
on the WikiText-2 valid store (266,918 keys, 517 partitions, 2 CPUs) its whole IVF-RQ build
took 23.0 s where these centroids (10 iterations on 256 sampled keys per partition, 5.1 s)
plus Lance's assignment and encoding (9.6 s) took 14.7 s, at the same recall@64 (0.969
vs 0.968; docs/performance.md). On a GPU the iterations run there.
"""

from __future__ import annotations

import torch

SAMPLE_PER_PARTITION = 256  # keys sampled per partition, as LanceDB and FAISS sample
ITERATIONS = 10


def kmeans(x: torch.Tensor, k: int, iterations: int = ITERATIONS, seed: int = 0,
           block: int = 65536) -> torch.Tensor:
    """``k`` centroids [k, dim] of the rows of ``x`` [n, dim] (n >= k), by Lloyd's
    algorithm from ``k`` distinct random rows; a cluster left empty is re-seeded at a
    random row. Runs on ``x``'s device; deterministic for a seed on one device."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= rows, got k={k} for {n} rows")
    gen = torch.Generator().manual_seed(seed)
    x = x.float()
    centroids = x[torch.randperm(n, generator=gen)[:k].to(x.device)].clone()
    assign = torch.empty(n, dtype=torch.long, device=x.device)
    for _ in range(iterations):
        norms = (centroids * centroids).sum(dim=1)
        for lo in range(0, n, block):  # argmin ||x - c||^2 = argmin ||c||^2 - 2 x.c, in blocks
            dist = torch.addmm(norms.unsqueeze(0), x[lo:lo + block], centroids.T, alpha=-2.0)
            assign[lo:lo + block] = dist.argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        centroids = torch.where(empty.unsqueeze(1), centroids, sums / counts.clamp(min=1).unsqueeze(1))
        if empty.any():
            rows = torch.randint(0, n, (int(empty.sum()),), generator=gen).to(x.device)
            centroids[empty] = x[rows]
    return centroids
