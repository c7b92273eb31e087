"""The kNN-LM step, written once: from the neighbours of some positions and the LM's
distribution there, p_kNN, the λ of each position and the mixture, as a fixed λ or an
adaptive policy says, and which positions of a text search the store when a policy
decides in order.

Decoding (``KNNLM.step``), scoring a text whose next tokens are known
(``KNNLM.text_step``, ``evaluate``) and every sweep point of ``evaluate`` go through
``view`` and ``mixture``; the first two with the whole vocabulary, the last with the
target tokens only (``targets``: the same numbers at the targets, without a [N, V]
distribution per position).

    >>> found = Found.of(store.search(keys, k=64))                      # doctest: +SKIP
    >>> v = view(found, lm_log_probs, lambda_=0.25, temperature=3.0, policy=None)  # doctest: +SKIP
    >>> log_probs = mixture(lm_log_probs, v, retrieved)                 # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import adaptive, knn


@dataclass(frozen=True)
class Found:
    """Neighbours of N positions as tensors [N, k], nearest first (missing slots: distance
    +inf, next token -1): the parts of a search result the mixture reads."""

    distances: torch.Tensor  # float32, squared L2
    next_tokens: torch.Tensor  # long
    weights: torch.Tensor  # long: pairs each neighbour stands for (1 where not pruned)
    positions: torch.Tensor  # long: each neighbour's position in its document

    @classmethod
    def of(cls, neighbours) -> "Found":
        """From a ``vectors.Neighbours`` (numpy arrays)."""
        return cls(torch.from_numpy(neighbours.distances), torch.from_numpy(neighbours.next_tokens),
                   torch.from_numpy(neighbours.weights), torch.from_numpy(neighbours.positions))

    def first(self, k: int) -> "Found":
        """The k nearest of each row (a prefix: the k nearest of a larger search)."""
        return Found(self.distances[:, :k], self.next_tokens[:, :k], self.weights[:, :k], self.positions[:, :k])

    @property
    def valid(self) -> torch.Tensor:
        """[N, k] bool: the slots that hold a neighbour."""
        return knn.valid_mask(self.distances, self.next_tokens)


@dataclass
class View:
    """What the neighbours of N positions say, before any position is gated: p_kNN (the
    whole vocabulary [N, V], or the targets' [N]), the λ of each position (a float, or [N]
    from a policy, clamped to [0, 1]) and the policy's signals (None without one)."""

    knn: torch.Tensor
    lambdas: float | torch.Tensor
    signals: torch.Tensor | None
    has: torch.Tensor  # [N] bool: the positions with at least one neighbour


def view(found: Found, lm_log_probs: torch.Tensor, *, lambda_: float, temperature: float,
         policy: adaptive.Policy | None, targets: torch.Tensor | None = None) -> View:
    """p_kNN and λ at N positions from their neighbours ``found`` and the LM's normalised log
    probabilities [N, V]: the plain kNN-LM at ``lambda_`` and ``temperature``, or as
    ``policy`` mixes (its signals, its view of the neighbours, a λ per position). With
    ``targets`` [N], p_kNN of the targets only."""
    d, nt, w = found.distances, found.next_tokens, found.weights
    valid = found.valid
    has = valid.any(dim=1)
    if targets is None:
        vocab = lm_log_probs.shape[1]
    else:
        matches = nt == targets.unsqueeze(1)
    if policy is None:
        p = (knn.knn_log_probs(d, nt, vocab, temperature, w) if targets is None
             else knn.knn_target_log_prob(d, matches, valid, temperature, w))
        return View(p, lambda_, None, has)
    sig = signals(found, lm_log_probs, temperature)
    p = (policy.knn_log_probs(d, nt, vocab, temperature, w, sig) if targets is None
         else policy.knn_target(d, matches, valid, temperature, w, sig))
    return at_lambda(View(p, lambda_, sig, has), lambda_, policy)


def at_lambda(v: View, lambda_: float, policy: adaptive.Policy | None) -> View:
    """The same view at another λ: ``lambda_`` itself, or the policy's λ per position from it."""
    if policy is None:
        return dataclasses.replace(v, lambdas=lambda_)
    return dataclasses.replace(v, lambdas=policy.lambdas(v.signals, lambda_).clamp(0, 1))


def signals(found: Found, lm_log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """The adaptive policy's signals of N positions (``adaptive.signals``)."""
    return adaptive.signals(found.distances, found.next_tokens, lm_log_probs, temperature, found.weights,
                            found.positions)


def sharp_target(found: Found, targets: torch.Tensor) -> torch.Tensor:
    """[N] log p_kNN of the targets in the sharp view (``adaptive.sharp_target``)."""
    return adaptive.sharp_target(found.distances, found.next_tokens == targets.unsqueeze(1), found.valid,
                                 found.weights)


def mixture(lm: torch.Tensor, v: View, retrieved: torch.Tensor) -> torch.Tensor:
    """log(λ p_kNN + (1 - λ) p_LM) at each position (``lm``: the LM's [N, V], or the
    targets' [N]); the LM alone where a position did not retrieve or found no neighbour.
    The targets' form is computed in float64 (a sum of them is a perplexity)."""
    has = v.has & retrieved
    if lm.ndim == 2:
        lambdas = v.lambdas if isinstance(v.lambdas, float) else v.lambdas.to(lm.dtype)
        return knn.interpolate(lm, v.knn, lambdas, has_knn=has)
    lambdas = v.lambdas if isinstance(v.lambdas, float) else v.lambdas.double()
    return knn.interpolate(lm.double(), v.knn.double(), lambdas, has_knn=has)


def in_order(policy: adaptive.Policy, v: View, lm_target: torch.Tensor, knn_target: torch.Tensor,
             previous: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which positions of one text (in order, every one searched, their next tokens known)
    retrieve, decided position by position as decoding the text would have (``policy``
    skips by the previous position: ``Policy.retrieval``), and what the last passes on.
    ``lm_target``, ``knn_target``: [N] log probabilities of the next tokens."""
    return policy.retrieval(v.signals, v.lambdas, lm_target, knn_target, v.has, previous)


def applied(v: View, retrieved: torch.Tensor) -> torch.Tensor:
    """[N] the λ each position was mixed with: 0 where it did not retrieve or found no
    neighbour."""
    lambdas = v.lambdas if isinstance(v.lambdas, torch.Tensor) else torch.full(retrieved.shape, float(v.lambdas))
    return torch.where(v.has & retrieved, lambdas, torch.zeros_like(lambdas))
