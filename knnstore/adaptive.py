"""Adaptive interpolation: a λ per token from how much the retrieval can be trusted.

A fixed λ helps where the store matches the text and hurts where it does not: when
the neighbours are far away and disagree, p_kNN spreads its mass over wrong tokens and
a fixed λ takes that share away from the LM. Here λ is computed for every position
from signals that cost nothing beyond the search itself (``signals``):

    log_d1          log of the nearest squared distance (how close the best match is)
    log_spread      log d_8 - log d_1 (one close match among far ones, or a crowd)
    knn_top         p_kNN of its most likely token (do the neighbours agree?)
    knn_entropy     entropy of p_kNN (nats)
    lm_entropy      entropy of p_LM (nats)
    lm_top          p_LM of its most likely token
    lm_on_knn_top   log p_LM of p_kNN's most likely token (does the LM find it plausible?)
    knn_on_lm_top   p_kNN of the LM's most likely token
    knn_top_sharp   knn_top in the sharp view (``SHARP``)
    recognised      1 where the store holds the context verbatim (``RECOGNISED_SPREAD``):
                    never fitted; every policy then takes the sharp view, λ >= 0.9

Two policies map them to λ:

* ``Rule`` (no fitting): λ_i = λ · knn_top_i², so a position whose neighbours do not
  agree on a next token gives the store little weight, and skip retrieval where the LM
  is already sure (top probability >= 0.9). Works on any store, but it cannot tell a
  close, trustworthy match from a far one, because distances depend on the model.
* ``Calibration`` (``knnstore calibrate``): λ_i = σ(f(z_i)) · knn_top_i · s_i, z the
  standardised signals and f a logistic regression or a one-hidden-layer MLP fitted by
  maximising the mixture's own log-likelihood log(σ p_kNN(y) + (1 - σ) p_LM(y)) on
  held-out text of the store's domain. Two gates are then applied on top, neither learnt:
  the neighbours' agreement knn_top (as in the rule) and the calibration's support s_i,
  1 while the nearest distance is within what the calibration text saw (its 90th
  percentile of log_d1), falling to 0 at its 99th percentile. Text of the store's own
  domain rarely shows a store that does not match, so a fit alone learns little about
  such text and extrapolates badly there (+1.3% to +3.8% perplexity on other domains,
  docs/adaptive.md); fitted *through* the gates it learns to undo them in domain.
  Applied after, they cost a few percent of the in-domain gain and keep other domains
  within ~0.5% of the base LM. The fit also picks the retrieval threshold: the most
  positions are skipped (LM top probability >= threshold) that keep ``keep`` (90%) of
  the gain of the best fixed λ on the same text (a fitted map usually gains more than
  any fixed λ, and that surplus buys skipped searches). The fit is stored in the catalog
  and used by ``--adaptive`` from then on.

Skipping can only use what is known before the search: the LM's own distribution here,
and what the previous position told (``TRAIL``: whether it searched, its λ, its
neighbours' agreement and nearest distance, how much the store helped its token, known
once that token is, and how surprised the LM was by it). A calibration fits a linear predictor of the store's gain at a
position from those (``SkipRule``) and retrieves where it reaches a cut: the most skipped
positions that cost at most ``SKIP_COST`` of perplexity on the calibration text and keep
``keep`` of the best fixed λ's gain. The decision at a position depends on the one before,
so it is made position by position (``SkipRule.sequence``, ``Policy.retrieval``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field

import torch

from . import knn
from .errors import InputError

SIGNALS = ("log_d1", "log_spread", "knn_top", "knn_entropy", "lm_entropy", "lm_top",
           "lm_on_knn_top", "knn_on_lm_top", "knn_top_sharp", "recognised")
# The sharp view of the neighbours: p_kNN at a temperature of SHARP x the nearest distance
# (``knn.relative_temperature``): the nearest context and those nearly as near decide.
SHARP = 0.1
# Whether fits learn the sharp view's share (where their records hold its targets): off
# until its effect on the domains of docs/domains.md is measured (docs/facts.md measures it
# on stored facts).
FIT_SHARP = False
# A context the store holds verbatim: the nearest stored context is at least this many times
# nearer than the eighth (log_spread >= log RECOGNISED_SPREAD; the query's own stored key is
# at distance ~0, the keys of other contexts are not). There the store knows what came next,
# so every adaptive policy mixes in the sharp view with λ at least RECOGNISED_LAMBDA: a
# prompt that begins as a stored document goes on as it does. Text the store does not hold
# is never recognised (a self-calibration hides each scored document, so it never is either).
RECOGNISED_SPREAD = 1000.0
RECOGNISED_LAMBDA = 0.9
KINDS = ("logistic", "mlp")
GATE = "knn_top"  # calibrated λ = σ(f(z)) · knn_top
_EPS = 1e-6


def signals(distances: torch.Tensor, next_tokens: torch.Tensor, lm_log_probs: torch.Tensor,
            temperature: float, weights: torch.Tensor | None = None,
            positions: torch.Tensor | None = None) -> torch.Tensor:
    """The retrieval and LM signals of each position: [N, len(SIGNALS)] float64.

    Args:
        distances, next_tokens: [N, k] the neighbours (nearest first; empty slots have
            ``next_token < 0`` or an infinite distance).
        lm_log_probs: [N, V] the LM's normalised log probabilities.
        weights: [N, k] pairs each neighbour stands for (a pruned store; None: 1).
        positions: [N, k] the neighbours' positions in their documents: a nearest at
            position 0 (a one-token context) is never ``recognised`` (None: not known).
    Rows without any neighbour get zeros in the retrieval signals.
    """
    d = torch.as_tensor(distances).double()
    nt = torch.as_tensor(next_tokens).long()
    valid = knn.valid_mask(d, nt)
    has = valid.any(dim=1)
    n, k = d.shape
    w = knn.neighbour_log_weights(d, valid, temperature, weights).exp()  # [N, k], 0 where invalid
    # p_kNN per distinct next token: sort each row's tokens and sum weights per run.
    key = torch.where(valid, nt, torch.full_like(nt, torch.iinfo(torch.long).max))
    sorted_nt, order = key.sort(dim=1)
    sorted_w = w.gather(1, order)
    starts = torch.ones_like(sorted_nt, dtype=torch.bool)
    starts[:, 1:] = sorted_nt[:, 1:] != sorted_nt[:, :-1]
    group = starts.long().cumsum(dim=1) - 1
    mass = torch.zeros(n, k, dtype=torch.float64).scatter_add_(1, group, sorted_w)
    token_of = torch.zeros(n, k, dtype=torch.long).scatter_(1, group, sorted_nt.clamp(max=2**62))
    knn_top, top_group = mass.max(dim=1)
    sharp = sharp_log_weights(d, valid, weights).exp().gather(1, order)
    knn_top_sharp = torch.zeros(n, k, dtype=torch.float64).scatter_add_(1, group, sharp).max(dim=1).values
    knn_top_token = token_of.gather(1, top_group.unsqueeze(1)).squeeze(1)
    knn_entropy = -(mass * mass.clamp(min=1e-300).log()).sum(dim=1)

    lm = lm_log_probs.double()
    lm_top, lm_top_token = lm.max(dim=1)
    lm_entropy = knn.entropy(lm)
    safe_token = torch.where(has, knn_top_token, torch.zeros_like(knn_top_token))
    lm_on_knn_top = lm.gather(1, safe_token.clamp(0, lm.shape[1] - 1).unsqueeze(1)).squeeze(1)
    knn_on_lm_top = (w * (nt == lm_top_token.unsqueeze(1))).sum(dim=1)

    d1 = torch.where(valid[:, 0], d[:, 0], torch.zeros_like(d[:, 0])).clamp(min=0)
    j = min(k, 8) - 1
    dj = torch.where(valid[:, j], d[:, j], d1).clamp(min=0)
    spread = (dj + _EPS).log() - (d1 + _EPS).log()
    # A context stored verbatim (RECOGNISED_SPREAD). Not a one-token one: at a text's first
    # position the key is the model's attention sink, nearly the same whatever the token
    # (SmolLM2: squared norm ~970 against ~90 elsewhere), so any text's first position is
    # "near" a document's first position without the store holding anything of it.
    verbatim = spread >= math.log(RECOGNISED_SPREAD)
    if positions is not None:
        verbatim &= torch.as_tensor(positions)[:, 0] > 0
    out = torch.stack([
        (d1 + _EPS).log(),
        spread,
        knn_top,
        knn_entropy,
        lm_entropy,
        lm_top.exp(),
        lm_on_knn_top.clamp(min=-30.0),
        knn_on_lm_top,
        knn_top_sharp,
        verbatim.double(),
    ], dim=1)
    # Rows without neighbours: retrieval signals are 0 (their λ is 0 whatever the policy
    # says); the LM's own signals stay, since skipping is decided on them.
    retrieval = torch.tensor([name not in ("lm_entropy", "lm_top") for name in SIGNALS])
    return torch.where(retrieval & ~has.unsqueeze(1), torch.zeros_like(out), out)


def recognised(sig: torch.Tensor) -> torch.Tensor:
    """[N] bool: the positions whose context the store holds verbatim (``RECOGNISED_SPREAD``;
    signals from before the ``recognised`` signal: by the spread alone)."""
    at = SIGNALS.index("recognised")
    if sig.shape[1] > at:
        return sig[:, at] > 0.5
    return sig[:, SIGNALS.index("log_spread")] >= math.log(RECOGNISED_SPREAD)


def sharp_log_weights(distances: torch.Tensor, valid: torch.Tensor,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """[N, k] the neighbours' log weights in the sharp view (``SHARP``)."""
    t = knn.relative_temperature(distances, valid, SHARP)
    return knn.neighbour_log_weights(distances, valid, t, weights)


def sharp_log_probs(distances: torch.Tensor, next_tokens: torch.Tensor, vocab_size: int,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """[N, V] log p_kNN in the sharp view (``knn.knn_log_probs``'s arguments)."""
    valid = knn.valid_mask(distances, next_tokens)
    return knn.knn_log_probs(distances, next_tokens, vocab_size, knn.relative_temperature(distances, valid, SHARP),
                             weights)


def sharp_target(distances: torch.Tensor, matches: torch.Tensor, valid: torch.Tensor,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """[N] log p_kNN(target) in the sharp view (``knn.knn_target_log_prob``'s arguments)."""
    return torch.logsumexp(sharp_log_weights(distances, valid, weights).masked_fill(~matches, -math.inf), dim=-1)


# What a position tells the next one's skip decision: whether it searched (1), its λ,
# knn_top, log_d1, the log-likelihood gain of the mixture on its token and log p_kNN of
# that token (all 0 where it did not search), and how surprised the LM was by its token
# (-log p_LM, known either way).
TRAIL = ("retrieved", "lambda", "knn_top", "log_d1", "gain", "knn_target", "lm_surprise")
SKIP_FEATURES = ("lm_top", "lm_entropy", *(f"previous_{name}" for name in TRAIL))
SKIP_COST = 0.008  # skipping may cost at most this share of perplexity on the calibration text
_KNOWN = torch.tensor([name == "lm_surprise" for name in TRAIL])  # known without a search


def trail(sig: torch.Tensor, lambdas: torch.Tensor, lm_target: torch.Tensor, knn_target: torch.Tensor,
          has: torch.Tensor, retrieved: torch.Tensor) -> torch.Tensor:
    """[N, len(TRAIL)] float64: what each position passes on to the next one's skip
    decision (``unsearched`` where it did not retrieve)."""
    retrieved = torch.as_tensor(retrieved, dtype=torch.bool)
    lambdas = lambdas.double()
    gain = mixture_log_prob(lm_target, knn_target, has & retrieved, lambdas) - lm_target.double()
    out = torch.stack([torch.ones_like(gain), lambdas, sig[:, SIGNALS.index("knn_top")].double(),
                       sig[:, SIGNALS.index("log_d1")].double(), gain.clamp(-1.0, 3.0),
                       knn_target.double().clamp(min=-20.0), (-lm_target.double()).clamp(max=20.0)], dim=1)
    return torch.where(retrieved.unsqueeze(1), out, unsearched(out))


def unsearched(trails: torch.Tensor) -> torch.Tensor:
    """``trails`` as positions that did not search pass them on (what only a search tells: 0)."""
    return torch.where(_KNOWN, trails, torch.zeros_like(trails))


_N_HERE = len(SKIP_FEATURES) - len(TRAIL)  # features of the position itself (the LM's)


def _lm_part(sig: torch.Tensor) -> torch.Tensor:
    """[N, _N_HERE]: the skip features of the positions themselves."""
    return torch.stack([sig[:, SIGNALS.index("lm_top")], sig[:, SIGNALS.index("lm_entropy")]], dim=1).double()


def skip_features(sig: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
    """[N, len(SKIP_FEATURES)]: each position's own signals (the LM's are enough) and what
    the position before it passed on (``previous`` [N, len(TRAIL)]; None: none)."""
    lm = _lm_part(sig)
    if previous is None:
        previous = torch.zeros(len(lm), len(TRAIL), dtype=torch.float64)
    return torch.cat([lm, previous.double()], dim=1)


def shifted(trails: torch.Tensor) -> torch.Tensor:
    """What each position of a text in order is passed on by the one before it (the
    first: nothing), from every position's ``trails``."""
    return torch.cat([torch.zeros(1, trails.shape[1], dtype=torch.float64), trails[:-1].double()])


def lm_signals(lm_log_probs: torch.Tensor) -> torch.Tensor:
    """[N, len(SIGNALS)] with only the LM's own signals filled in (what is known before a
    search): enough for ``Policy.retrieve``."""
    lm = lm_log_probs.double()
    out = torch.zeros(lm.shape[0], len(SIGNALS), dtype=torch.float64)
    out[:, SIGNALS.index("lm_top")] = lm.max(dim=1).values.exp()
    out[:, SIGNALS.index("lm_entropy")] = knn.entropy(lm)
    return out


def _last(trails: torch.Tensor, retrieved: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor | None:
    """What the last of a run of positions passes on ([1, len(TRAIL)]; ``previous`` if none)."""
    if not len(retrieved):
        return previous
    last = trails[-1:].double()
    return last if bool(retrieved[-1]) else unsearched(last)


@dataclass
class SkipRule:
    """Retrieve where a linear predictor of the store's gain at a position, from the LM's
    confidence there and the previous position's retrieval (``SKIP_FEATURES``), reaches
    ``cut``."""

    mean: list[float]
    std: list[float]
    w: list[float]
    b: float
    cut: float

    def _affine(self) -> tuple[torch.Tensor, float]:
        ww = torch.tensor(self.w, dtype=torch.float64) / torch.tensor(self.std, dtype=torch.float64)
        return ww, self.b - float((torch.tensor(self.mean, dtype=torch.float64) * ww).sum())

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        ww, c = self._affine()
        return features.double() @ ww + c

    def retrieve(self, sig: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """[N] bool for one step of N rows: ``sig`` their signals (the LM's are enough),
        ``previous`` [N, len(TRAIL)] each row's previous position (None: none)."""
        return self.scores(skip_features(sig, previous)) >= self.cut

    def sequence(self, sig: torch.Tensor, trails: torch.Tensor,
                 previous: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decide positions of one text in order: ``trails`` [N, len(TRAIL)] is what each
        would pass on if it retrieved (``trail`` with all retrieved), ``previous`` the
        position before the first. Returns ([N] bool retrieved, the last position's trail)."""
        ww, c = self._affine()
        here, before = ww[:_N_HERE], ww[_N_HERE:]
        trails = trails.double()
        base = (_lm_part(sig) @ here + c).tolist()
        if_searched = (trails @ before).tolist()
        if_not = (unsearched(trails) @ before).tolist()
        carry = 0.0 if previous is None else float(previous.double().reshape(-1) @ before)
        out = [False] * len(base)
        for i, a in enumerate(base):
            out[i] = a + carry >= self.cut
            carry = if_searched[i] if out[i] else if_not[i]
        retrieved = torch.tensor(out, dtype=torch.bool)
        return retrieved, _last(trails, retrieved, previous)


class Policy:
    """Maps signals to a λ per position, and says where to skip the store."""

    name: str = "fixed"
    skip_above_prob: float | None = None

    def lambdas(self, sig: torch.Tensor, lambda_: float | None = None) -> torch.Tensor:
        """[N] λ per position: the policy's own (``view_lambdas``), at least
        ``RECOGNISED_LAMBDA`` where the context is stored verbatim (``recognised``)."""
        lambdas = self.view_lambdas(sig, lambda_)
        return torch.where(recognised(sig), lambdas.clamp(min=RECOGNISED_LAMBDA), lambdas)

    def view_lambdas(self, sig: torch.Tensor, lambda_: float | None) -> torch.Tensor:
        raise NotImplementedError

    def knn_log_probs(self, distances: torch.Tensor, next_tokens: torch.Tensor, vocab_size: int,
                      temperature: float, weights: torch.Tensor | None, sig: torch.Tensor) -> torch.Tensor:
        """log p_kNN [N, V] that this policy mixes in: its own view (``view_log_probs``), the
        sharp view where the context is stored verbatim (``recognised``)."""
        out = self.view_log_probs(distances, next_tokens, vocab_size, temperature, weights, sig)
        rec = recognised(sig)
        if not bool(rec.any()):
            return out
        sharp = sharp_log_probs(distances, next_tokens, vocab_size, weights)
        return torch.where(rec.unsqueeze(-1), sharp.to(out.dtype), out)

    def view_log_probs(self, distances, next_tokens, vocab_size, temperature, weights, sig) -> torch.Tensor:
        """The policy's own log p_kNN [N, V] (here the plain one, at ``temperature``)."""
        return knn.knn_log_probs(distances, next_tokens, vocab_size, temperature, weights)

    def knn_target(self, distances: torch.Tensor, matches: torch.Tensor, valid: torch.Tensor,
                   temperature: float, weights: torch.Tensor | None, sig: torch.Tensor) -> torch.Tensor:
        """log p_kNN(target) [N] of ``knn_log_probs``, from which neighbours match the target."""
        out = self.view_target(distances, matches, valid, temperature, weights, sig)
        rec = recognised(sig)
        if not bool(rec.any()):
            return out
        return torch.where(rec, sharp_target(distances, matches, valid, weights).to(out.dtype), out)

    def view_target(self, distances, matches, valid, temperature, weights, sig) -> torch.Tensor:
        return knn.knn_target_log_prob(distances, matches, valid, temperature, weights)

    def knn_target_of(self, rec: "Records") -> torch.Tensor:
        """log p_kNN(target) [N] of the positions of ``rec`` as this policy mixes it."""
        out = self.view_target_of(rec)
        if rec.knn_sharp is None:
            return out
        return torch.where(recognised(rec.signals), rec.knn_sharp.to(out.dtype), out)

    def view_target_of(self, rec: "Records") -> torch.Tensor:
        return rec.knn_target

    @property
    def skip_rule(self) -> SkipRule | None:
        """A skip decision that uses the previous position (None: the threshold alone)."""
        return None

    def retrieve(self, lm_log_probs: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """[N] bool: which rows of one step search the store (``previous``: each row's
        previous position, ``trail``; None where there is none)."""
        if self.skip_rule is not None:
            return self.skip_rule.retrieve(lm_signals(lm_log_probs), previous)
        return knn.retrieval_mask(lm_log_probs, self.skip_above_prob)

    def retrieval(self, sig: torch.Tensor, lambdas: torch.Tensor, lm_target: torch.Tensor,
                  knn_target: torch.Tensor, has: torch.Tensor,
                  previous: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of one text decided in order, as steps of ``retrieve`` would be (all
        searched first): ([N] bool retrieved, the trail the last position passes on)."""
        full = trail(sig, lambdas, lm_target, knn_target, has, torch.ones(len(sig), dtype=torch.bool))
        if self.skip_rule is not None:
            return self.skip_rule.sequence(sig, full, previous)
        top = sig[:, SIGNALS.index("lm_top")]
        retrieved = top < self.skip_above_prob if self.skip_above_prob is not None else torch.ones_like(top, dtype=torch.bool)
        return retrieved, _last(full, retrieved, previous)


    def describe(self) -> str:
        raise NotImplementedError


@dataclass
class Rule(Policy):
    """λ_i = λ · knn_top_i ** power; skip where the LM's top probability >= skip_above_prob."""

    power: float = 2.0
    skip_above_prob: float | None = 0.9
    name: str = "rule"

    def view_lambdas(self, sig: torch.Tensor, lambda_: float | None) -> torch.Tensor:
        return lambda_ * sig[:, SIGNALS.index("knn_top")].clamp(0, 1) ** self.power

    def describe(self) -> str:
        skip = f", skip at LM top probability >= {self.skip_above_prob:g}" if self.skip_above_prob else ""
        return f"rule: λ × (neighbour agreement)^{self.power:g}{skip}"


@dataclass
class Calibration(Policy):
    """A fitted map from standardised signals to λ (see the module docstring)."""

    kind: str
    mean: list[float]
    std: list[float]
    params: dict[str, list]
    k: int
    temperature: float
    skip_above_prob: float | None = None
    metrics: dict = field(default_factory=dict)
    gate: str | None = None  # a signal λ is multiplied by ("knn_top"; None in fits saved before it)
    # (q_lo, q_hi) of log_d1 on the calibration text: λ fades from full at q_lo to 0 at q_hi
    # (None in fits saved before it).
    support: list[float] | None = None
    # ``SkipRule``'s fields: skip by the previous position too (None in fits saved before
    # it, and where no cut kept enough: then ``skip_above_prob`` alone)
    skip: dict | None = None
    # The sharp view's share α = σ(z·w + b) of p_kNN (``SHARP``): {"w": [...], "b": ...}
    # (None in fits saved before it, and in fits without the sharp view's records).
    sharp: dict | None = None
    name: str = "calibrated"

    @property
    def skip_rule(self) -> SkipRule | None:
        return SkipRule(**self.skip) if self.skip else None

    def _z(self, sig: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=torch.float64)
        std = torch.tensor(self.std, dtype=torch.float64)
        return (sig[:, :len(mean)].double() - mean) / std  # fits saved before a signal was added use the first

    def alphas(self, sig: torch.Tensor) -> torch.Tensor | None:
        """[N] the sharp view's share of p_kNN (None: the plain view alone)."""
        if self.sharp is None:
            return None
        return torch.sigmoid(self._z(sig) @ torch.tensor(self.sharp["w"], dtype=torch.float64) + self.sharp["b"])

    def view_log_probs(self, distances, next_tokens, vocab_size, temperature, weights, sig):
        plain = super().view_log_probs(distances, next_tokens, vocab_size, temperature, weights, sig)
        alpha = self.alphas(sig)
        if alpha is None:
            return plain
        sharp = sharp_log_probs(distances, next_tokens, vocab_size, weights)
        return _blend(plain, sharp, alpha.unsqueeze(-1)).to(plain.dtype)

    def view_target(self, distances, matches, valid, temperature, weights, sig):
        plain = super().view_target(distances, matches, valid, temperature, weights, sig)
        alpha = self.alphas(sig)
        if alpha is None:
            return plain
        return _blend(plain, sharp_target(distances, matches, valid, weights), alpha)

    def view_target_of(self, rec: "Records") -> torch.Tensor:
        alpha = self.alphas(rec.signals)
        if alpha is None or rec.knn_sharp is None:
            return rec.knn_target
        return _blend(rec.knn_target, rec.knn_sharp, alpha)

    def logits(self, sig: torch.Tensor) -> torch.Tensor:
        return _forward(self.kind, {k: torch.tensor(v, dtype=torch.float64) for k, v in self.params.items()},
                        self._z(sig))

    def view_lambdas(self, sig: torch.Tensor, lambda_: float | None = None) -> torch.Tensor:
        lambdas = torch.sigmoid(self.logits(sig))
        if self.gate is not None:
            gate = _gate(sig, self.gate)
            alpha = self.alphas(sig)
            if alpha is not None:  # the agreement of the blend (exact where both views top the same token)
                gate = (1 - alpha) * gate + alpha * _gate(sig, "knn_top_sharp")
            lambdas = lambdas * gate
        if self.support is not None:
            lo, hi = self.support
            d1 = sig[:, SIGNALS.index("log_d1")].double()
            lambdas = lambdas * ((hi - d1) / max(hi - lo, 1e-6)).clamp(0, 1)
        return lambdas

    def describe(self) -> str:
        skip = f", skip at LM top probability >= {self.skip_above_prob:g}" if self.skip_above_prob else ""
        if self.skip:
            skip = ", skip by the LM's confidence and the previous position's retrieval"
        gate = (" × neighbour agreement" if self.gate else "") + (" × distance support" if self.support else "")
        gate += ", nearest neighbours sharpened where they stand out" if self.sharp else ""
        own = " on the store's own text" if self.metrics.get("source") == "self" else ""
        return f"calibrated {self.kind}{gate}{own} (k={self.k}, T={self.temperature:g}){skip}"

    @property
    def tokens(self) -> int:
        """Positions the calibration was fitted and checked on (its fit and held-out parts)."""
        return self.metrics["fit"]["tokens"] + self.metrics["holdout"].get("tokens", 0)

    def made_for(self, k: int, temperature: float) -> bool:
        """Whether it was fitted at this k and kNN temperature: its signals (the neighbours'
        agreement above all) mean something else at others."""
        return int(self.k) == int(k) and math.isclose(float(self.temperature), float(temperature))

    def stale_for(self, content: dict) -> bool:
        """Whether a self-calibration no longer fits the store's content (``Store.content``):
        another set of ready corpora, or pairs changed by more than ``RECALIBRATE_CHANGE``.
        Calibrations on user text, and those saved before content was recorded, never are."""
        made_on = self.metrics.get("content")
        if self.metrics.get("source") != "self" or not made_on:
            return False
        if sorted(made_on.get("corpora", [])) != sorted(content["corpora"]):
            return True
        before = max(1, int(made_on.get("pairs", 0)))
        return abs(content["pairs"] - before) > RECALIBRATE_CHANGE * before

    def to_dict(self) -> dict:
        """JSON-ready (non-finite numbers become None)."""
        def clean(v):
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, float) and not math.isfinite(v):
                return None
            return v
        d = asdict(self)
        d.pop("name")
        d["metrics"] = clean(d["metrics"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(**{k: v for k, v in d.items() if k != "name"})


SUPPORT_QUANTILES = (0.9, 0.99)
SHARP_START = 0.05  # the sharp view's share where a fit starts
RECALIBRATE_CHANGE = 0.1  # a self-calibration is redone once the store's pairs change by more than this
# Where a store is too small to calibrate on itself: the rule with the agreement cubed, λ at
# most what the rule gives (a position whose neighbours agree less counts for less still).
FALLBACK = Rule(power=3.0)


def _support(log_d1: torch.Tensor) -> list[float] | None:
    """Where the calibration's nearest distances end: (q90, q99) of log_d1."""
    if len(log_d1) < 10:
        return None
    q = torch.quantile(log_d1.double(), torch.tensor(SUPPORT_QUANTILES, dtype=torch.float64))
    return [float(q[0]), float(q[1])]


def _blend(plain: torch.Tensor, sharp: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """log((1 - α) p_plain + α p_sharp), α in (0, 1), float64."""
    alpha = alpha.double()
    return torch.logaddexp(torch.log1p(-alpha) + plain.double(), alpha.log() + sharp.double())


def _gate(sig: torch.Tensor, name: str) -> torch.Tensor:
    return sig[:, SIGNALS.index(name)].double().clamp(0, 1)


def _forward(kind: str, p: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    if kind == "logistic":
        return z @ p["w"] + p["b"]
    return torch.tanh(z @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def mixture_log_prob(lm_target: torch.Tensor, knn_target: torch.Tensor, has: torch.Tensor,
                     lambdas: torch.Tensor) -> torch.Tensor:
    """log p(target) of the mixture with a λ per row: [N] float64."""
    return knn.interpolate(lm_target.double(), knn_target.double(), lambdas.double().clamp(0, 1),
                           has_knn=has)


@dataclass
class Records:
    """What fitting needs per position: signals, log p_LM(target), log p_kNN(target)."""

    signals: torch.Tensor  # [N, F]
    lm_target: torch.Tensor  # [N]
    knn_target: torch.Tensor  # [N] (-inf where no neighbour voted for the target)
    has: torch.Tensor  # [N] bool: the position has neighbours
    knn_sharp: torch.Tensor | None = None  # [N] log p_kNN(target) in the sharp view (SHARP)

    @classmethod
    def concat(cls, parts: list["Records"]) -> "Records":
        if not parts:
            return cls(torch.zeros(0, len(SIGNALS), dtype=torch.float64), torch.zeros(0), torch.zeros(0),
                       torch.zeros(0, dtype=torch.bool), torch.zeros(0))
        sharp = torch.cat([p.knn_sharp for p in parts]) if all(p.knn_sharp is not None for p in parts) else None
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in
                     ("signals", "lm_target", "knn_target", "has")), knn_sharp=sharp)

    def subset(self, rows) -> "Records":
        return Records(self.signals[rows], self.lm_target[rows], self.knn_target[rows], self.has[rows],
                       None if self.knn_sharp is None else self.knn_sharp[rows])

    def __len__(self) -> int:
        return len(self.lm_target)


def _ppl(log_probs: torch.Tensor) -> float:
    return knn.perplexity(-float(log_probs.double().sum()), len(log_probs))


def fit(rec: Records, *, kind: str = "logistic", k: int, temperature: float, init_lambda: float = 0.15,
        holdout: float = 0.2, keep: float = 0.9, steps: int = 500, seed: int = 0,
        sharp: bool = FIT_SHARP) -> Calibration:
    """Fit σ(f(z)) on ``rec`` by maximising the mixture's log-likelihood; the returned
    calibration's λ is that times the agreement and support gates (module docstring).
    With ``sharp`` (and records of the sharp view), p_kNN blends in the sharp view by a
    share fitted with it.

    The last ``holdout`` fraction of the positions (contiguous text) is kept out of the fit
    and reported in ``metrics`` (perplexities base / fixed λ / calibrated, on fit and
    held-out rows). The skip threshold is then chosen on all rows (``keep``).
    """
    if kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not sharp:
        rec = dataclasses.replace(rec, knn_sharp=None)
    n = len(rec)
    n_fit = max(1, int(round(n * (1 - holdout)))) if n > 1 else n
    train = rec.subset(torch.arange(n_fit))
    # Without the sharp view, λ is fitted on the signals from before it (the sharp view's
    # agreement is left out: the default's fit is what it was).
    # ``recognised`` is never fitted: it overrides the fit (Policy.lambdas).
    width = SIGNALS.index("recognised") if rec.knn_sharp is not None else SIGNALS.index("knn_top_sharp")
    sig = train.signals[train.has][:, :width]
    mean = sig.mean(dim=0) if len(sig) else torch.zeros(width, dtype=torch.float64)
    std = sig.std(dim=0).nan_to_num(1.0).clamp(min=1e-3) if len(sig) > 1 else torch.ones(width, dtype=torch.float64)
    params = _initial_params(kind, init_lambda, seed, width)
    sharp = None
    if rec.knn_sharp is not None:  # fit the sharp view's share too, from the same signals
        sharp = {"w": torch.zeros(len(mean), dtype=torch.float64),
                 "b": torch.tensor(math.log(SHARP_START / (1 - SHARP_START)), dtype=torch.float64)}
    _maximise_likelihood(kind, params, (sig - mean) / std, train.lm_target[train.has].double(),
                         train.knn_target[train.has].double().clamp(min=-1e4), steps, sharp,
                         None if sharp is None else train.knn_sharp[train.has].double().clamp(min=-1e4))
    cal = Calibration(kind=kind, mean=mean.tolist(), std=std.tolist(),
                      params={name: v.detach().tolist() for name, v in params.items()},
                      k=k, temperature=temperature, gate=GATE,
                      support=_support(rec.signals[rec.has][:, SIGNALS.index("log_d1")]),
                      sharp=None if sharp is None else {"w": sharp["w"].detach().tolist(), "b": float(sharp["b"].detach())})
    cal.metrics = {"fit": _report(cal, train, init_lambda),
                   "holdout": _report(cal, rec.subset(torch.arange(n_fit, n)), init_lambda),
                   "fixed_lambda": init_lambda}
    best_lambda, best_gain = best_fixed(rec)
    mixed = dataclasses.replace(rec, knn_target=cal.knn_target_of(rec))  # p_kNN as the policy blends it
    rule, retained = fit_skip(mixed, cal.lambdas(rec.signals), keep, reference_gain=best_gain, seed=seed)
    if rule is not None:
        cal.skip = asdict(rule)
    else:
        cal.skip_above_prob, retained = choose_skip(mixed, cal, keep, reference_gain=best_gain)
    cal.metrics.update(retrieved_fraction=retained, best_fixed_lambda=best_lambda,
                       best_fixed_ppl=_ppl(rec.lm_target.double()) * math.exp(-best_gain / max(1, n)))
    return cal


def _initial_params(kind: str, init_lambda: float, seed: int, f: int) -> dict[str, torch.Tensor]:
    """Parameters of f (over ``f`` signals) at the start of the fit: every position at
    λ = ``init_lambda``."""
    b0 = math.log(init_lambda / (1 - init_lambda))
    if kind == "logistic":
        params = {"w": torch.zeros(f, dtype=torch.float64), "b": torch.tensor(b0, dtype=torch.float64)}
    else:
        gen, h = torch.Generator().manual_seed(seed), 16
        params = {"w1": torch.randn(f, h, generator=gen, dtype=torch.float64) * 0.3,
                  "b1": torch.zeros(h, dtype=torch.float64),
                  "w2": torch.zeros(h, dtype=torch.float64),
                  "b2": torch.tensor(b0, dtype=torch.float64)}
    for p in params.values():
        p.requires_grad_(True)
    return params


def _maximise_likelihood(kind: str, params: dict[str, torch.Tensor], z: torch.Tensor,
                         lm_t: torch.Tensor, knn_t: torch.Tensor, steps: int,
                         sharp: dict[str, torch.Tensor] | None = None, knn_s: torch.Tensor | None = None) -> None:
    """Adam on the mean log-likelihood of the mixture σ(f(z)) p_kNN + (1 - σ(f(z))) p_LM of
    the targets (a little L2 on the weights), in place. With ``sharp`` (and the sharp view's
    targets ``knn_s``), p_kNN is (1 - α) p_kNN + α p_sharp, α = σ(z·w + b) fitted with it.
    Works inside ``torch.inference_mode`` too (a fit made while generating): it copies what
    it differentiates out of it."""
    with torch.inference_mode(False), torch.enable_grad():
        z, lm_t, knn_t = z.clone(), lm_t.clone(), knn_t.clone()
        for group in (params, sharp or {}):
            for name in group:
                group[name] = group[name].detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([*params.values(), *(sharp or {}).values()], lr=0.05)
        for _ in range(steps if len(z) else 0):
            opt.zero_grad()
            logit = _forward(kind, params, z)
            knn_mix = knn_t
            if sharp is not None:
                a = z @ sharp["w"] + sharp["b"]
                knn_mix = torch.logaddexp(torch.nn.functional.logsigmoid(-a) + knn_t,
                                          torch.nn.functional.logsigmoid(a) + knn_s)
            ll = torch.logaddexp(torch.nn.functional.logsigmoid(logit) + knn_mix,
                                 torch.nn.functional.logsigmoid(-logit) + lm_t)
            weights = [v for name, v in params.items() if name.startswith("w")]
            if sharp is not None:
                weights.append(sharp["w"])
            loss = -ll.mean() + 1e-3 * sum((v ** 2).sum() for v in weights)
            loss.backward()
            opt.step()


def _report(cal: Calibration, part: Records, fixed_lambda: float) -> dict:
    """Perplexities of ``part``: base LM, fixed λ, calibrated λ; and the mean calibrated λ."""
    if not len(part):
        return {}
    lambdas = cal.lambdas(part.signals)
    fixed = torch.full((len(part),), fixed_lambda, dtype=torch.float64)
    return {"tokens": len(part), "base_ppl": _ppl(part.lm_target.double()),
            "fixed_ppl": _ppl(mixture_log_prob(part.lm_target, part.knn_target, part.has, fixed)),
            "calibrated_ppl": _ppl(mixture_log_prob(part.lm_target, cal.knn_target_of(part), part.has, lambdas)),
            "mean_lambda": float(lambdas[part.has].mean()) if part.has.any() else 0.0}


SKIP_CANDIDATES = (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98)
FIXED_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6)


def best_fixed(rec: Records) -> tuple[float, float]:
    """The fixed λ of ``FIXED_GRID`` with the highest total log-likelihood gain over the
    LM on ``rec``, and that gain (nats, summed over positions)."""
    def gain(lambda_: float) -> float:
        fixed = torch.full((len(rec),), lambda_, dtype=torch.float64)
        return float((mixture_log_prob(rec.lm_target, rec.knn_target, rec.has, fixed) - rec.lm_target.double()).sum())

    gains = {lambda_: gain(lambda_) for lambda_ in FIXED_GRID}
    best = max(gains, key=gains.get)
    return best, gains[best]


def choose_skip(rec: Records, cal: Policy, keep: float = 0.9, lambda_: float | None = None,
                reference_gain: float | None = None) -> tuple[float | None, float]:
    """The lowest LM-top-probability threshold whose retrieved positions keep ``keep`` of
    a reference log-likelihood gain: ``reference_gain`` (e.g. the best fixed λ's) when
    given, capped at the policy's own gain when it always retrieves; returns (threshold or
    None for never skip, fraction retrieved)."""
    lambdas = cal.lambdas(rec.signals, lambda_)
    gain = mixture_log_prob(rec.lm_target, rec.knn_target, rec.has, lambdas) - rec.lm_target.double()
    total = float(gain.sum())
    target = keep * (total if reference_gain is None else min(total, reference_gain))
    top = rec.signals[:, SIGNALS.index("lm_top")]
    for t in SKIP_CANDIDATES:
        retrieve = top < t
        if float(gain[retrieve].sum()) >= target:
            return t, float(retrieve.double().mean())
    return None, 1.0


SKIP_MISSING = 0.3  # share of fitting rows shown as if the previous position had not searched


def fit_skip(rec: Records, lambdas: torch.Tensor, keep: float = 0.9, reference_gain: float | None = None,
             cost: float = SKIP_COST, seed: int = 0) -> tuple[SkipRule | None, float]:
    """A ``SkipRule`` for a policy with per-position ``lambdas`` on ``rec`` (positions of
    text in order), and the fraction of positions it retrieves at; (None, 1.0) where no cut
    skips anything within ``cost`` (perplexity, relative) and ``keep`` of ``reference_gain``
    (or of the policy's own gain, if lower).

    The predictor is a linear least-squares fit of each position's gain (log-likelihood of the
    mixture minus the LM's, clipped to ±3 nats) on ``SKIP_FEATURES``; the previous
    position is shown as not searched in ``SKIP_MISSING`` of the rows, as it will be where
    the rule skipped it. Candidate cuts are quantiles of its scores, each tried position
    by position (``SkipRule.sequence``); the highest that meets both bounds is kept."""
    n = len(rec)
    if n < 10:
        return None, 1.0
    lambdas = lambdas.double()
    gain = mixture_log_prob(rec.lm_target, rec.knn_target, rec.has, lambdas) - rec.lm_target.double()
    full = trail(rec.signals, lambdas, rec.lm_target, rec.knn_target, rec.has, torch.ones(n, dtype=torch.bool))
    previous = shifted(full)
    hidden = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) < SKIP_MISSING
    x = skip_features(rec.signals, torch.where(hidden.unsqueeze(1), unsearched(previous), previous))
    mean, std = x.mean(dim=0), x.std(dim=0).nan_to_num(1.0).clamp(min=1e-6)
    z = torch.cat([(x - mean) / std, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(z, gain.clamp(-3.0, 3.0).unsqueeze(1)).solution.squeeze(1)
    rule = SkipRule(mean=mean.tolist(), std=std.tolist(), w=solution[:-1].tolist(), b=float(solution[-1]),
                    cut=-math.inf)
    total = float(gain.sum())
    need = keep * (total if reference_gain is None else min(total, reference_gain))
    budget = math.log1p(cost) * n
    scores = rule.scores(x)
    chosen: tuple[float, float] | None = None
    for q in range(2, 92, 2):
        cut = float(torch.quantile(scores, q / 100))
        retrieved, _ = dataclasses.replace(rule, cut=cut).sequence(rec.signals, full)
        kept = float(gain[retrieved].sum())
        if total - kept > budget or kept < need:
            break
        chosen = cut, float(retrieved.double().mean())
    if chosen is None:
        return None, 1.0
    return dataclasses.replace(rule, cut=chosen[0]), chosen[1]
