"""One sequence decoded with the kNN-LM, following the store and drafting from it.

``decode(lm, ids, ...)`` is the loop behind ``KNNLM.generate`` (greedy and sampling; beam
search keeps ``model.generate``). It adds two things to the kNN-LM of ``KNNLM.step``, each
of which can be turned off:

* **following** (``following.Pointers``): a position scores the stored pairs that follow the
  previous position's neighbours (same document, next position) instead of searching, where
  enough of them survive and they are near (``--no-follow``);
* **drafting** (retrieval-based speculative decoding, as REST and NEST): the stored
  continuation of the nearest followed pair is a draft of the next tokens; the model reads
  the chosen token and the draft in one forward pass (one KV-cached call), the positions
  that need a search search in one batch, and the kNN-LM's choice at each position is made
  exactly as without the draft, in order; the longest prefix of the draft it agrees with is
  kept, with its own token after it (``--no-draft``). Greedy decoding therefore gives the
  same tokens as without drafting (but where two top probabilities differ by float error:
  a forward pass over several positions rounds differently); sampling accepts a drafted
  token with its probability under the kNN-LM's (warped) mixture and otherwise samples from
  the mixture without it, the speculative-sampling rule for a draft that is one token for
  sure, so the output's distribution is the kNN-LM's.

The adapter is passed in (``lm``: a ``KNNLM``; this module sits below it).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import InputError
from .following import Pointers

MAX_DRAFT = 8  # drafted tokens per verification at most
# What one drafted position adds to a model call, as a share of a one-token call: SmolLM2-135M
# on 2 CPUs reads 1 token in ~42 ms, 4 in ~62, 8 in ~83 (KV-cached, medians; 2026-12-07). The
# draft length weighs it against the tokens a draft is expected to gain (``DraftRate.length``).
DRAFT_COST = 0.13


class DraftRate:
    """How often a drafted token is accepted, lately: a running average over drafted
    tokens (each moves it ``LEARN`` of the way to 1 or 0), drifting back towards 1/2 by
    ``RETRY`` per token made without a draft, so that a decoding that stopped drafting
    tries again once the text may have come back to something stored."""

    LEARN, RETRY = 0.2, 0.05

    def __init__(self) -> None:
        self.rate = 0.5

    def drafted(self, proposed: int, accepted: int) -> None:
        for i in range(proposed):
            self.rate += self.LEARN * (float(i < accepted) - self.rate)

    def idle(self) -> None:
        self.rate += self.RETRY * (0.5 - self.rate)

    def length(self, room: int) -> int:
        """How many tokens to draft: the length that maximises the expected tokens per unit
        of model time, (1 + a + a^2 + ... + a^L) / (1 + DRAFT_COST x L) with ``a`` the
        rate, at most ``room`` (the tokens still to make) and ``MAX_DRAFT``; 0 where no
        draft pays."""
        a = min(self.rate, 0.999)
        best, best_gain, gained = 0, 1.0, 1.0
        for n in range(1, min(MAX_DRAFT, room) + 1):
            gained += a ** n
            gain = gained / (1 + DRAFT_COST * n)
            if gain > best_gain:
                best, best_gain = n, gain
        return best


@dataclass
class Decoded:
    """What ``decode`` produced, and what it cost."""

    token_ids: list[int] = field(default_factory=list)
    steps: list = field(default_factory=list)  # with record: each token's ``Step`` (one row)
    retrieved: int = 0  # tokens whose distribution used the store (searched or followed)
    searches: int = 0  # batched search calls
    searched: int = 0  # positions whose neighbours came from a search
    followed: int = 0  # positions scored from followed pairs
    forwards: int = 0  # model calls after the prompt (one per verification step)
    proposed: int = 0  # drafted tokens proposed
    from_store: int = 0  # drafts taken from followed pairs (the others: from the context)
    accepted: int = 0  # drafted tokens accepted

    def report(self) -> dict:
        """What ``generate --json`` reports of the cost."""
        n = max(1, len(self.token_ids))
        return {"searches_per_token": round(self.searches / n, 4), "followed_tokens": self.followed,
                "searched_tokens": self.searched, "drafted_proposed": self.proposed,
                "drafted_accepted": self.accepted, "drafts_from_store": self.from_store, "model_calls": self.forwards,
                "tokens_per_model_call": round(len(self.token_ids) / max(1, self.forwards), 3)}


Choose = Callable[[torch.Tensor, int | None], int]  # (log probs [V], drafted token or None) -> token


def greedy(log_probs: torch.Tensor, drafted: int | None) -> int:
    """The kNN-LM's most probable token (the draft plays no part)."""
    return int(log_probs.argmax())


def sampler(warp: Callable[[torch.Tensor], torch.Tensor] | None = None,
            generator: torch.Generator | None = None) -> Choose:
    """Sampling from the (warped: top-k, top-p) mixture. A drafted token is kept with its
    probability p(draft); otherwise the token is drawn from p without it, renormalised:
    speculative sampling's rule for a draft that proposes one token for sure, so each token
    has the mixture's distribution whether or not it was drafted."""

    def choose(log_probs: torch.Tensor, drafted: int | None) -> int:
        scores = log_probs.float().unsqueeze(0)
        if warp is not None:
            scores = warp(scores)
        probs = torch.softmax(scores[0].double(), dim=-1)
        if drafted is not None:
            p = float(probs[drafted])
            if torch.rand((), generator=generator, dtype=torch.float64) < p:
                return drafted
            probs = probs.clone()
            probs[drafted] = 0.0
            if float(probs.sum()) <= 0.0:
                return drafted
        return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))

    return choose


def eos_ids(lm) -> list[int]:
    """The tokens that end a text: the generation config's and the tokenizer's."""
    ids = getattr(lm.model.generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if lm.tokenizer.eos_token_id is not None and lm.tokenizer.eos_token_id not in ids:
        ids.append(lm.tokenizer.eos_token_id)
    if not ids:
        raise InputError("the model has no end-of-sequence token: it cannot end a text")
    return ids


def context_draft(context: Sequence[int], n: int, longest: int = 3, shortest: int = 2) -> list[int]:
    """Up to ``n`` tokens that came after the latest earlier occurrence, in ``context``, of
    its last ``longest`` tokens (else of fewer, down to ``shortest``): the draft a text
    that repeats itself, or copies a passage read before the prompt, gives."""
    if n <= 0 or len(context) <= shortest:
        return []
    seq = np.asarray(context, dtype=np.int64)
    for m in range(min(longest, len(seq) - 1), shortest - 1, -1):
        tail = seq[-m:]
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], m)  # starts 0 .. len - 1 - m
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + m
            return seq[start:start + n].tolist()
    return []


def crop(cache, length: int) -> None:
    """Cut a KV cache back to its first ``length`` positions."""
    have = cache.get_seq_length()
    if have > length:
        cache.crop(length - have)  # a negative count: that many removed (transformers 4 and 5 alike)


class _Model:
    """The model's forward pass with a KV cache, and the keys it computed."""

    def __init__(self, lm, captured: list) -> None:
        self.lm, self.captured, self.cache = lm, captured, None
        parameters = inspect.signature(lm.model.forward).parameters
        self.cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self.keeps_logits = "logits_to_keep" in parameters
        self.device = lm.encoder.device

    def __call__(self, ids: Sequence[int], last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [n, V] and keys [n, dim] (float32, CPU) of ``ids`` after what the cache
        holds (``last_only``: the logits of the last position only, [1, V])."""
        self.captured.clear()
        x = torch.tensor([list(ids)], device=self.device)
        extra = {"logits_to_keep": 1} if last_only and self.keeps_logits else {}
        out = self.lm.model(input_ids=x, use_cache=True, **{self.cache_arg: self.cache}, **extra)
        self.cache = getattr(out, "cache", None) or out.past_key_values
        if not self.captured:
            raise RuntimeError("no key was captured: is the adapter's encoder the model's?")
        keys = self.captured[-1][0].float().cpu()
        self.captured.clear()
        return out.logits[0].float().cpu(), keys


@torch.inference_mode()
def decode(lm, ids: Sequence[int], max_new_tokens: int, eos: Sequence[int], *, choose: Choose = greedy,
           prompt_key: torch.Tensor | None = None, record: bool = False,
           pointers: Pointers | None = None) -> Decoded:
    """Continue ``ids`` (the whole context: passages read, then the prompt) by up to
    ``max_new_tokens`` tokens with the kNN-LM ``lm``, stopping after a token of ``eos``.
    ``prompt_key`` [dim]: the key the first position searches with (the prompt's own, where
    passages were read before it). ``record``: keep each token's ``Step`` (explanations).
    ``pointers``: the pairs to follow (``KNNLM.follower``; None: none), which positions score
    where ``lm.settings.follow`` and drafts come from where ``lm.settings.draft``."""
    out = Decoded()
    if max_new_tokens <= 0:
        return out
    lm.resolve_policy()
    retrieving = lm.settings.lambda_ > 0.0 and lm.store.searchable
    follow, draft = lm.settings.follow, lm.settings.draft
    rate = DraftRate()
    with lm.encoder.capture() as captured:
        model = _Model(lm, captured)
        logits, keys = model(ids, last_only=True)  # the prompt: only its last position is scored
        logits, keys = logits[-1:], keys[-1:]
        if prompt_key is not None:
            keys = prompt_key.float().cpu().reshape(1, -1)
        committed = len(ids)  # positions in the KV cache whose tokens are final
        trail = None
        drafted: list[int] = []
        first = True
        while True:
            searched_block: dict[int, object] = {}
            made = 0
            for j in range(len(logits)):
                proposal = drafted[j] if j < len(drafted) else None
                step = _position(lm, j, keys, logits, trail, pointers, follow, searched_block, retrieving, out)
                token = choose(step.log_probs[0], proposal)
                out.token_ids.append(token)
                made += 1
                if record:
                    out.steps.append(step)
                if bool(step.retrieved[0]):
                    out.retrieved += 1
                trail = (step.passed_on(torch.tensor([0]), torch.tensor([token]))
                         if lm.skips_by_trail and step.signals is not None else None)
                if pointers is not None:
                    pointers.advance(token)
                if token in eos or len(out.token_ids) >= max_new_tokens or proposal is None or token != proposal:
                    break
                out.accepted += 1
            if drafted:
                rate.drafted(len(drafted), made - 1)
            else:
                rate.idle()
            if not first:  # the block read the last token and the draft: keep what was accepted
                committed += made
                crop(model.cache, committed)
            first = False
            last = out.token_ids[-1]
            if last in eos or len(out.token_ids) >= max_new_tokens:
                return out
            room = max_new_tokens - len(out.token_ids) - 1
            drafted, wanted = [], rate.length(room) if draft else 0
            if wanted and pointers is not None:
                drafted = pointers.draft(wanted)
                out.from_store += bool(drafted)
            if wanted and not drafted:  # nothing followed: the context (passages read, prompt, text so far)
                drafted = context_draft([*ids, *out.token_ids], wanted)
            out.proposed += len(drafted)
            logits, keys = model([last, *drafted])
            out.forwards += 1


def _position(lm, j: int, keys: torch.Tensor, logits: torch.Tensor, trail, pointers: Pointers | None,
              follow: bool, searched_block: dict, retrieving: bool, out: Decoded):
    """The kNN-LM step of position ``j`` of a block (keys [n, dim], logits [n, V]): whether it
    retrieves (the policy, from the previous position's ``trail``), and with what: the
    followed pairs where they hold, else a search (all positions from ``j`` on in one batch,
    kept in ``searched_block``; the pointers learn what it found). Returns the ``Step``."""
    row_keys, row_logits = keys[j:j + 1], logits[j:j + 1]
    if not retrieving:
        return lm.step(row_keys, row_logits, retrieve=torch.zeros(1, dtype=torch.bool))
    retrieve = lm.retrieval_mask(torch.log_softmax(row_logits, dim=-1), trail)
    if not bool(retrieve[0]):
        return lm.step(row_keys, row_logits, trail, retrieve=retrieve)
    found = None
    if follow and pointers is not None:
        found = pointers.candidates(row_keys[0].numpy())
    if found is not None:
        out.followed += 1
        return lm.step(row_keys, row_logits, trail, retrieve=retrieve, found=found)
    if j not in searched_block:
        rest = lm.search(keys[j:])
        out.searches += 1
        for i in range(len(keys) - j):
            searched_block[j + i] = rest.rows(i)
    found = searched_block[j]
    out.searched += 1
    if pointers is not None:
        pointers.searched(found)
    return lm.step(row_keys, row_logits, trail, retrieve=retrieve, found=found)

