"""Pure tensor maths of kNN-LM: neighbours -> p_kNN, and its mixture with the LM.

No I/O here. Shapes: N positions, k neighbours per position, V the vocabulary.
``distances`` are squared L2 distances. A neighbour slot that holds nothing (a store
with fewer than k visible pairs) has ``next_token < 0`` or an infinite distance and
carries no weight.

    p_kNN(y) ∝ Σ_{i : next_token_i = y} w_i exp(-d_i / T)
    p(y)     = λ p_kNN(y) + (1 - λ) p_LM(y)          (computed in log space)

``w_i`` is the number of stored pairs neighbour i stands for: 1, unless ``knnstore prune``
merged pairs with the same next token into it (efficient-knnlm's greedy merging: log w_i
is added to its logit). Every function takes ``weights`` [N, k]; None means all 1.

Example:
    >>> d = torch.tensor([[0.0, 1.0, 50.0]]); v = torch.tensor([[7, 7, 3]])
    >>> knn_log_probs(d, v, vocab_size=10, temperature=1.0).exp()[0, [3, 7]].round(decimals=4)
    tensor([0., 1.])
"""

from __future__ import annotations

import math

import torch


def _check(temperature: float | torch.Tensor) -> None:
    if not bool(torch.all(torch.as_tensor(temperature) > 0)):
        raise ValueError(f"temperature must be > 0, got {temperature}")


def relative_temperature(distances: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """[N, 1] a temperature per row proportional to its nearest distance: ``scale`` · d_1
    (at least ``MIN_TEMPERATURE``). With it p_kNN weighs a neighbour by how much farther
    it is than the nearest, relative to it: exp(-(d_i / d_1 - 1) / scale), whatever the
    model's distances are; a row whose nearest context is stored word for word (d_1 ≈ 0)
    follows that context alone."""
    d1 = torch.where(valid, distances.double(), torch.full_like(distances, math.inf, dtype=torch.float64)).min(-1).values
    d1 = torch.where(torch.isfinite(d1), d1, torch.ones_like(d1))
    return (scale * d1).clamp(min=MIN_TEMPERATURE).unsqueeze(-1)


MIN_TEMPERATURE = 1e-3


def neighbour_log_weights(distances: torch.Tensor, valid: torch.Tensor,
                          temperature: float | torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(-d / T + log w) over the valid neighbours of each row: [N, k].

    ``temperature``: a float, or [N, 1] one per row. Invalid slots get -inf; a row
    without any valid neighbour is all -inf.
    """
    _check(temperature)
    logits = -distances.double() / temperature
    if weights is not None:
        logits = logits + weights.double().clamp(min=1).log()
    logits = logits.masked_fill(~valid, -math.inf)
    norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    # A row with no neighbour: -inf - -inf would be nan; keep it -inf.
    return torch.where(valid, logits - norm.masked_fill(~valid.any(-1, keepdim=True), 0.0),
                       torch.full_like(logits, -math.inf))


def valid_mask(distances: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
    return (next_tokens >= 0) & torch.isfinite(distances)


def knn_log_probs(distances: torch.Tensor, next_tokens: torch.Tensor, vocab_size: int,
                  temperature: float | torch.Tensor = 1.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """log p_kNN over the vocabulary: [N, V] (float32; -inf where no neighbour votes).

    A row without any valid neighbour is all -inf (no kNN distribution); ``interpolate``
    then falls back to the LM alone for that row.
    """
    valid = valid_mask(distances, next_tokens)
    log_w = neighbour_log_weights(distances, valid, temperature, weights)
    n = distances.shape[0]
    probs = torch.zeros(n, vocab_size, dtype=torch.float64, device=distances.device)
    probs.scatter_add_(1, next_tokens.clamp(min=0).long(), log_w.exp())
    return probs.log().float()


def knn_target_log_prob(distances: torch.Tensor, matches: torch.Tensor,
                        valid: torch.Tensor, temperature: float | torch.Tensor = 1.0,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """log p_kNN(target) per row: [N] (float64), exact in log space.

    Args:
        distances: [N, k] squared L2, nearest first.
        matches: [N, k] bool, whether neighbour i's next token is the row's target.
        valid: [N, k] bool, whether slot i holds a neighbour.
        weights: [N, k] pairs each neighbour stands for (None: 1).
    """
    log_w = neighbour_log_weights(distances, valid, temperature, weights)
    return torch.logsumexp(log_w.masked_fill(~matches, -math.inf), dim=-1)


def _lambda_column(lambda_: float | torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    lambdas = torch.as_tensor(lambda_, dtype=like.dtype, device=like.device)
    if lambdas.ndim == 0:
        if not 0.0 <= float(lambdas) <= 1.0:
            raise ValueError(f"lambda must be in [0, 1], got {float(lambdas)}")
        lambdas = lambdas.expand(n)
    return lambdas


def interpolate(lm_log_probs: torch.Tensor, knn_log_probs: torch.Tensor,
                lambda_: float | torch.Tensor, has_knn: torch.Tensor | None = None) -> torch.Tensor:
    """log(λ p_kNN + (1 - λ) p_LM), row-wise, in log space.

    Args:
        lm_log_probs: [N, V] (the LM's normalised log probabilities), or [N] for the
            target token only.
        knn_log_probs: same shape, from ``knn_log_probs`` / ``knn_target_log_prob``.
        lambda_: a float in [0, 1], or a tensor [N] of per-row weights.
        has_knn: [N] bool, rows that have a kNN distribution; the others use the LM
            alone, whatever λ says. Default: rows of ``knn_log_probs`` [N, V] that are
            not all -inf (required for the [N] form, where -inf only means a miss).
    """
    n = lm_log_probs.shape[0]
    lambdas = _lambda_column(lambda_, n, lm_log_probs)
    if has_knn is None:
        if knn_log_probs.ndim != 2:
            raise ValueError("pass has_knn with target-only log probabilities")
        has_knn = ~torch.isneginf(knn_log_probs).all(dim=-1)
    lambdas = torch.where(has_knn, lambdas, torch.zeros_like(lambdas))
    if lm_log_probs.ndim == 2:
        lambdas = lambdas.unsqueeze(-1)
    # λ = 0 gives the LM exactly and λ = 1 the kNN distribution exactly.
    minus_inf = torch.tensor(-math.inf, dtype=lm_log_probs.dtype, device=lm_log_probs.device)
    knn_part = torch.where(lambdas > 0, knn_log_probs.to(lm_log_probs.dtype) + lambdas.log(), minus_inf)
    lm_part = torch.where(lambdas < 1, lm_log_probs + torch.log1p(-lambdas), minus_inf)
    return torch.logaddexp(knn_part, lm_part)


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of normalised log probabilities: [N]."""
    p = log_probs.exp()
    return -(p * log_probs.masked_fill(torch.isneginf(log_probs), 0.0)).sum(-1)


def retrieval_mask(lm_log_probs: torch.Tensor, skip_above_prob: float | None = None,
                   skip_below_entropy: float | None = None) -> torch.Tensor:
    """Which rows consult the store: [N] bool.

    A row skips retrieval when the LM is confident: its top probability is at least
    ``skip_above_prob``, or its entropy (nats) is at most ``skip_below_entropy``.
    With neither set, every row retrieves.
    """
    retrieve = torch.ones(lm_log_probs.shape[0], dtype=torch.bool, device=lm_log_probs.device)
    if skip_above_prob is not None:
        retrieve &= lm_log_probs.max(dim=-1).values.exp() < skip_above_prob
    if skip_below_entropy is not None:
        retrieve &= entropy(lm_log_probs) > skip_below_entropy
    return retrieve


def perplexity(nll_sum: float, n: int) -> float:
    """exp of the mean negative log-likelihood (nats) of ``n`` tokens: the one perplexity
    (nan for no token; inf past what a float holds). For log probabilities ``lp`` [N]:
    ``perplexity(-float(lp.double().sum()), len(lp))``."""
    if n == 0:
        return float("nan")
    mean = nll_sum / n
    return math.exp(mean) if mean < 700 else float("inf")
