"""kNN-LM maths: p_kNN from neighbours, the log-space mixture, adaptive retrieval."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from knnstore import knn

V = 12


def _neighbours(seed: int, n: int = 5, k: int = 7):
    g = torch.Generator().manual_seed(seed)
    distances = torch.rand(n, k, generator=g) * 50
    distances, _ = distances.sort(dim=1)
    next_tokens = torch.randint(0, V, (n, k), generator=g)
    return distances, next_tokens


def test_p_knn_is_a_distribution_over_the_vocabulary():
    d, v = _neighbours(0)
    p = knn.knn_log_probs(d, v, V, temperature=3.0).exp()
    assert torch.allclose(p.sum(-1), torch.ones(len(d)), atol=1e-6)
    # only tokens some neighbour voted for get mass
    for row in range(len(d)):
        voted = set(v[row].tolist())
        assert all((p[row, t] > 0) == (t in voted) for t in range(V))


def test_p_knn_weights_neighbours_by_softmax_of_negative_distance():
    d = torch.tensor([[1.0, 2.0, 4.0]])
    v = torch.tensor([[3, 5, 3]])
    p = knn.knn_log_probs(d, v, V, temperature=2.0).exp()[0]
    w = torch.softmax(-d[0] / 2.0, dim=0)
    assert p[3].item() == pytest.approx((w[0] + w[2]).item())
    assert p[5].item() == pytest.approx(w[1].item())


def test_empty_neighbour_slots_carry_no_weight():
    d = torch.tensor([[1.0, math.inf, math.inf]])
    v = torch.tensor([[4, -1, -1]])
    p = knn.knn_log_probs(d, v, V).exp()[0]
    assert p[4].item() == pytest.approx(1.0) and p.sum().item() == pytest.approx(1.0)


def test_the_mixture_sums_to_one_and_lies_between_its_parts():
    d, v = _neighbours(1)
    lm = torch.log_softmax(torch.randn(len(d), V), -1)
    kp = knn.knn_log_probs(d, v, V, temperature=5.0)
    mixed = knn.interpolate(lm, kp, 0.3)
    assert torch.allclose(mixed.exp().sum(-1), torch.ones(len(d)), atol=1e-5)
    expected = 0.3 * kp.exp() + 0.7 * lm.exp()
    assert torch.allclose(mixed.exp(), expected, atol=1e-6)


def test_lambda_zero_is_the_plain_lm_exactly_and_lambda_one_is_knn_only():
    d, v = _neighbours(2)
    lm = torch.log_softmax(torch.randn(len(d), V), -1)
    kp = knn.knn_log_probs(d, v, V)
    assert torch.equal(knn.interpolate(lm, kp, 0.0), lm)
    assert torch.equal(knn.interpolate(lm, kp, 1.0), kp)


def test_a_row_without_neighbours_falls_back_to_the_lm():
    lm = torch.log_softmax(torch.randn(2, V), -1)
    d = torch.tensor([[1.0, 2.0], [math.inf, math.inf]])
    v = torch.tensor([[1, 2], [-1, -1]])
    mixed = knn.interpolate(lm, knn.knn_log_probs(d, v, V), 0.5)
    assert torch.equal(mixed[1], lm[1])
    assert mixed[1].exp().sum().item() == pytest.approx(1.0)


def test_the_mixture_does_not_underflow_in_log_space():
    lm = torch.full((1, V), -200.0)  # far below float32's smallest normal probability
    lm[0, 0] = 0.0
    d = torch.tensor([[0.0]])
    v = torch.tensor([[5]])
    mixed = knn.interpolate(lm, knn.knn_log_probs(d, v, V), 1e-3)
    assert torch.isfinite(mixed[0, 1]) and mixed[0, 1].item() == pytest.approx(-200.0 + math.log1p(-1e-3), abs=1e-4)


def test_target_only_log_prob_agrees_with_the_full_distribution():
    d, v = _neighbours(3)
    targets = v[:, 2].clone()
    targets[0] = (v[0].max() + 1) % V if (v[0] != (v[0].max() + 1) % V).all() else targets[0]
    full = knn.knn_log_probs(d, v, V, temperature=4.0)
    valid = knn.valid_mask(d, v)
    target = knn.knn_target_log_prob(d, v == targets[:, None], valid, temperature=4.0)
    expected = full.gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(target.float(), expected, atol=1e-5)


def test_interpolate_rejects_lambda_outside_zero_one():
    lm = torch.log_softmax(torch.randn(1, V), -1)
    with pytest.raises(ValueError, match="lambda"):
        knn.interpolate(lm, lm, 1.5)


def test_retrieval_mask_skips_confident_positions():
    confident = torch.log_softmax(torch.tensor([[10.0] + [0.0] * (V - 1)]), -1)
    unsure = torch.log_softmax(torch.zeros(1, V), -1)
    lm = torch.cat([confident, unsure])
    assert knn.retrieval_mask(lm).tolist() == [True, True]
    assert knn.retrieval_mask(lm, skip_above_prob=0.9).tolist() == [False, True]
    assert knn.retrieval_mask(lm, skip_below_entropy=1.0).tolist() == [False, True]
    assert knn.entropy(unsure)[0].item() == pytest.approx(math.log(V))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e4), st.integers(-1, V - 1)), min_size=1, max_size=16),
       st.floats(0.01, 100), st.floats(0, 1))
def test_any_neighbours_give_normalised_distributions(neighbours, temperature, lambda_):
    d = torch.tensor([[x for x, _ in neighbours]])
    v = torch.tensor([[t for _, t in neighbours]])
    kp = knn.knn_log_probs(d, v, V, temperature)
    lm = torch.log_softmax(torch.randn(1, V), -1)
    mixed = knn.interpolate(lm, kp, lambda_)
    assert mixed.exp().sum().item() == pytest.approx(1.0, abs=1e-4)
    if (v >= 0).any():
        assert kp.exp().sum().item() == pytest.approx(1.0, abs=1e-4)
