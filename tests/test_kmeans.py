"""k-means for the index's partitions: finds real clusters, never leaves one empty, repeats."""

import pytest
import torch

from knnstore.kmeans import kmeans


def blobs(n_per: int = 200, centres: int = 8, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(centres, dim, generator=g) * 10
    points = means.repeat_interleave(n_per, dim=0) + torch.randn(centres * n_per, dim, generator=g) * 0.1
    return points, means


def test_kmeans_puts_a_centroid_on_every_cluster_and_lowers_the_error():
    x, means = blobs()
    found = kmeans(x, 16, iterations=20)  # more partitions than clusters, as an index has
    assert float(torch.cdist(means, found).min(dim=1).values.max()) < 0.5
    start = kmeans(x, 16, iterations=0)  # the random rows it starts from
    error = lambda c: float(torch.cdist(x, c).min(dim=1).values.pow(2).mean())  # noqa: E731
    assert error(found) < 0.5 * error(start)


def test_more_centroids_than_distinct_points_are_reseeded_not_left_empty():
    x = torch.tensor([[0.0, 0.0], [10.0, 10.0]]).repeat(50, 1)  # two distinct points, 100 rows
    c = kmeans(x, 5, iterations=5)
    assert c.shape == (5, 2) and torch.isfinite(c).all()
    # each centroid is one of the points (re-seeded at a row, or the mean of identical rows)
    assert all(min(float((row - p).norm()) for p in x[:2]) < 1e-6 for row in c)


def test_kmeans_is_deterministic_for_a_seed_and_checks_k():
    x, _ = blobs(seed=1)
    assert torch.equal(kmeans(x, 6, seed=3), kmeans(x, 6, seed=3))
    with pytest.raises(ValueError, match="k-means"):
        kmeans(x[:3], 4)
