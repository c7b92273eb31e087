"""The kNN-LM adapter: a Hugging Face causal LM plus a store.

At each position the adapter reads the key at the store's key site (the same hook the
store was built with), asks the store for the k nearest stored contexts in one batched
search per window or decoding step, turns their next tokens into p_kNN and mixes it
with the LM in log space (``knn.py``). It never patches the model: keys come from a
hook that lives only inside a ``with`` block.

Example:
    >>> lm = KNNLM.from_store("wiki-store", k=64, lambda_=0.25)        # doctest: +SKIP
    >>> out = lm.generate("The Eiffel Tower is", max_new_tokens=20, explain=True)  # doctest: +SKIP
    >>> out.text, out.tokens[0].sources[0].title                       # doctest: +SKIP

With ``model.generate`` directly, use the processor inside its ``with`` block:

    >>> with lm.logits_processor() as proc:                             # doctest: +SKIP
    ...     ids = lm.model.generate(**inputs, logits_processor=[proc], do_sample=True)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from . import adaptive, drafting, knn, mixing, policies, reading
from .config import (
    MAX_BEAMS,
    MAX_K,
    MAX_NEW_TOKENS,
    MAX_SEED,
    MAX_WINDOW,
    SCORE_WINDOW,
    KNNSettings,
    ProgressFn,
    check_number,
)
from .encoder import Encoder
from .errors import InputError
from .store import Store
from .following import DRAFT_POINTERS, MAX_POINTERS, Pointers, follow_text
from .scoring import scored_windows
from .vectors import Neighbours


@dataclass
class Source:
    """One stored neighbour of a position: where it came from and how much it weighed."""

    next_token: int
    next_token_text: str
    distance: float  # squared L2
    weight: float  # its share of p_kNN (softmax of -distance / T over the k neighbours)
    corpus: str
    document_id: int
    document: str  # the document's source (file path, path#n, external id)
    title: str | None
    position: int
    snippet: str  # the stored text around it; [[next token]] marked

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TokenExplanation:
    """One scored or generated token, its probabilities and (optionally) its sources.

    ``sources`` are the heaviest neighbours of the position, those that voted for this
    token first.
    """

    index: int  # position of the token in the sequence
    token: int
    text: str
    p_lm: float
    p_knn: float | None  # None where the step skipped the store
    p: float
    retrieved: bool
    sources: list[Source] = field(default_factory=list)
    knn_weight: float = 0.0  # the λ p_kNN was mixed with here (per token when adaptive)
    read_from: Source | None = None  # the read passage's stored pair whose next token this copies

    def top_documents(self, n: int = 3) -> list[tuple[str, float]]:
        """The documents whose neighbours carry the most weight, with their total weight."""
        totals: dict[str, float] = {}
        for s in self.sources:
            label = f"{s.corpus}: {s.title or s.document}"
            totals[label] = totals.get(label, 0.0) + s.weight
        return sorted(totals.items(), key=lambda kv: -kv[1])[:n]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sources"] = [s.to_dict() for s in self.sources]
        d["read_from"] = self.read_from.to_dict() if self.read_from is not None else None
        return d


@dataclass
class Span:
    """Consecutive tokens (``first``..``last``, their sequence indices) whose heaviest
    supporting neighbours are consecutive stored positions of one document: a passage
    the output follows, shown once as a citation instead of token by token."""

    first: int
    last: int
    text: str  # the tokens' text
    corpus: str
    document_id: int
    document: str
    title: str | None
    start_position: int  # stored positions whose next tokens these are
    end_position: int
    passage: str  # the stored text: the token at start_position and the next tokens to end_position

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def follows(t: TokenExplanation) -> Source | None:
    """The read passage's pair this token copies (``TokenExplanation.read_from``: the
    document the prompt named); else the heaviest neighbour that predicted this very token;
    None: neither."""
    if t.read_from is not None:
        return t.read_from
    return t.sources[0] if t.sources and t.sources[0].next_token == t.token else None


def span_runs(tokens: Sequence[TokenExplanation], min_length: int = 2) -> list[list[TokenExplanation]]:
    """Runs of consecutive tokens whose supporting neighbours (``follows``) are consecutive
    positions of one document, at least ``min_length`` long."""
    runs: list[list[TokenExplanation]] = []
    for t in tokens:
        src, run = follows(t), runs[-1] if runs else None
        prev = follows(run[-1]) if run else None
        if (src is not None and prev is not None and t.index == run[-1].index + 1
                and src.document_id == prev.document_id and src.position == prev.position + 1):
            run.append(t)
        else:
            runs.append([t])
    return [r for r in runs if follows(r[0]) is not None and len(r) >= min_length]


@dataclass
class Generation:
    """The result of ``KNNLM.generate``."""

    prompt: str
    text: str  # the generated continuation only
    token_ids: list[int]
    retrieved_fraction: float
    tokens: list[TokenExplanation] = field(default_factory=list)  # with explain=True
    spans: list[Span] = field(default_factory=list)  # with explain=True: copied passages
    read: list[Passage] = field(default_factory=list)  # what the model read before the prompt
    # what decoding cost (``drafting.Decoded.report``: searches per token, drafted tokens
    # proposed and accepted, ...); empty for beam search
    cost: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "text": self.text, "token_ids": self.token_ids,
                "retrieved_fraction": self.retrieved_fraction, **self.cost,
                "tokens": [t.to_dict() for t in self.tokens], "spans": [s.to_dict() for s in self.spans],
                "read": [p.to_dict() for p in self.read]}


@dataclass
class Passage:
    """A stretch of a stored document the model read before the prompt (``KNNLM.read``)."""

    corpus: str
    document_id: int
    document: str
    title: str | None
    start_position: int  # the stored positions of its first and last token
    end_position: int
    text: str
    score: float  # nats: the LM's surprise at the prompt's phrase the document spells

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Reading:
    """What the model reads before a prompt, and the prompt's own key (``KNNLM.read``)."""

    passages: list[Passage]  # best first
    context_ids: list[int]  # the passages' tokens, each followed by a blank line, the best one last
    tokens: list[tuple[int, list[int]]]  # each passage's first stored position and tokens
    key: torch.Tensor  # [dim] the key at the prompt's last position, read without the passages
    # the neighbours [1, READ_K] of the prompt's position before last (their next tokens
    # predict its last token): where a decoding starts following the store (``following``)
    lookup: Neighbours | None = None


@dataclass
class Step:
    """What one batched kNN-LM step computed, for rows [N] of a batch."""

    log_probs: torch.Tensor  # [N, V] the mixture
    lm_log_probs: torch.Tensor  # [N, V]
    retrieved: torch.Tensor  # [N] bool
    neighbours: Neighbours  # [N, k]; rows that skipped hold no neighbours
    view: mixing.View  # what the neighbours said before the rows were gated: p_kNN, signals
    lambdas: float | torch.Tensor = 0.0  # λ, or [N] per row with adaptive interpolation

    @property
    def knn_log_probs(self) -> torch.Tensor:
        """[N, V] log p_kNN (rows that skipped: all -inf)."""
        return self.view.knn

    @property
    def signals(self) -> torch.Tensor | None:
        """[N, len(adaptive.SIGNALS)] with adaptive interpolation, else None."""
        return self.view.signals

    @property
    def has_neighbours(self) -> torch.Tensor:
        """[N] bool: the rows that found at least one neighbour."""
        return torch.from_numpy(self.neighbours.next_tokens[:, 0] >= 0)

    def passed_on(self, parent: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """What this step tells the next one's skip decision (``adaptive.trail``), for next
        rows continuing rows ``parent`` [M] of this step with ``tokens`` [M]."""
        if self.signals is None:
            raise ValueError("only a step with adaptive interpolation passes a trail on")
        lambdas = self.lambdas if isinstance(self.lambdas, torch.Tensor) else torch.full(
            (len(self.retrieved),), float(self.lambdas))
        rows = parent.long()
        return adaptive.trail(self.signals[rows], lambdas[rows], self.lm_log_probs[rows, tokens],
                              self.knn_log_probs[rows, tokens], self.has_neighbours[rows], self.retrieved[rows])


class KNNLM:
    """A causal LM with a knnstore store: kNN-LM scoring, generation and provenance.

    Args:
        model: a Hugging Face causal LM; it must be the store's model (checked: tokenizer,
            weights of the key layer, dimension and key site).
        tokenizer: its tokenizer.
        store: an open ``Store`` or the path of one.
        settings: ``KNNSettings``; keyword arguments (``k``, ``lambda_``,
            ``temperature``, ``exact``, ``skip_above_prob``, ...) override its fields.
    """

    def __init__(self, model, tokenizer, store: Store | str | os.PathLike,
                 settings: KNNSettings | None = None, **overrides) -> None:
        self.store = store if isinstance(store, Store) else Store.open(store)
        ident = self.store.identity
        if self.store.encoder_loaded and self.store.encoder.model is model:  # already checked
            encoder = self.store.encoder
        else:
            encoder = Encoder(model, tokenizer, name=getattr(model, "name_or_path", "model"),
                              key_layer=ident.key_layer, key_site=ident.key_site)
            self.store.use_encoder(encoder)  # refuses another model, with what differs
        self.encoder, self.model, self.tokenizer = encoder, model, tokenizer
        base = settings or KNNSettings.resolve(lambda_=overrides.get("lambda_"), adaptive=overrides.get("adaptive"))
        self.settings = dataclasses.replace(base, **overrides) if overrides else base
        self.policy_note: str | None = None  # why the policy is what it is, where it is not the obvious
        # whether working the policy out may self-calibrate (score text, write the fit);
        # off where reads must never write (a server's requests): the cautious rule instead
        self.calibrates = True
        self._policy: adaptive.Policy | None = None
        self._hidden: Callable[[Neighbours], np.ndarray] | None = None  # ``hiding``
        self._extra = 0

    @classmethod
    def from_store(cls, store: Store | str | os.PathLike, settings: KNNSettings | None = None, *,
                   device: str = "auto", compute_dtype: str = "auto", **overrides) -> "KNNLM":
        """Open a store and load the model it was built with (a path is opened on
        ``device`` in ``compute_dtype``: see ``Store.open``; an open store keeps its own)."""
        store = store if isinstance(store, Store) else Store.open(store, device=device, compute_dtype=compute_dtype)
        enc = store.encoder
        return cls(enc.model, enc.tokenizer, store, settings, **overrides)

    def with_settings(self, **overrides) -> "KNNLM":
        """The same model and store with other kNN parameters. A λ given without
        ``adaptive`` asks for the plain kNN-LM with that λ (``KNNSettings.resolve``)."""
        clone = object.__new__(KNNLM)
        clone.__dict__.update(self.__dict__)
        clone.settings = self.settings.override(**overrides)
        if any(getattr(clone.settings, name) != getattr(self.settings, name) for name in ("adaptive", "k", "temperature")):
            clone._policy = None  # worked out again for these settings (a calibration is made at one k and T)
        return clone

    def with_policy(self, policy: adaptive.Policy) -> "KNNLM":
        """The same adapter, adaptive with ``policy`` (a ``Rule``, a ``Calibration``)
        instead of the store's calibration."""
        clone = self.with_settings(adaptive=True)
        clone._policy = policy
        return clone

    def hiding(self, hidden: Callable[[Neighbours], np.ndarray], extra: int | None = None) -> "KNNLM":
        """The same adapter with some stored pairs kept out of every search:
        ``hidden(neighbours)`` marks [Q, k + extra] the ones to drop, and each search fetches
        ``extra`` (default k) more neighbours to make up for them. Text stored in the store
        can then be scored as if it were not (``evaluate.self_records``)."""
        clone = self.with_settings()
        clone._hidden, clone._extra = hidden, self.settings.k if extra is None else extra
        return clone

    @property
    def hides(self) -> bool:
        """Whether some stored pairs are kept out of this adapter's searches (``hiding``)."""
        return self._hidden is not None

    @property
    def policy(self) -> adaptive.Policy | None:
        """The adaptive-λ policy in use (None unless ``settings.adaptive``), as
        ``resolve_policy`` worked it out. Reading it never calibrates nor writes: every entry
        point of the adapter (``generate``, ``explain``, ``evaluate``, ``step``) resolves the
        policy first; before that, reading it is an error."""
        if not self.settings.adaptive:
            return None
        if self._policy is None:
            raise RuntimeError("the adaptive policy is not worked out yet: call resolve_policy() first")
        return self._policy

    def resolve_policy(self, progress: ProgressFn | None = None) -> adaptive.Policy | None:
        """The adaptive-λ policy (None unless ``settings.adaptive``), worked out on first call
        (``policies.resolve``): the store's newest calibration made at this adapter's k and T;
        where it has none, or that is a self-calibration that no longer fits what the store
        holds, a self-calibration made now and saved (it reports to ``progress``; where this
        adapter never ``calibrates``, the cautious rule instead); where the store is too
        small for one, ``adaptive.FALLBACK``. ``policy_note`` says why, where it is not the
        obvious."""
        if not self.settings.adaptive:
            return None
        if self._policy is None:
            found = policies.resolve(self, calibrate=self.calibrates, progress=progress)
            self._policy = found.policy
            if found.note is not None:
                self.policy_note = found.note
        return self._policy

    def forget_policy(self) -> None:
        """Work the policy out again at its next use (the store's content may have changed)."""
        self._policy = None

    def needs_calibration(self) -> bool:
        """Whether ``resolve_policy`` will calibrate on the store's own text first (slow: it
        scores text with the model); a calibration that fits is kept as the policy on the way."""
        if not self.settings.adaptive or self._policy is not None:
            return False
        self._policy = policies.fitting(self)
        return self._policy is None and self.calibrates

    # --- one step --------------------------------------------------------------------

    def search(self, keys: torch.Tensor | np.ndarray, k: int | None = None) -> Neighbours:
        """The store's neighbours of keys [N, dim], with this adapter's search settings."""
        s = self.settings
        k = k or s.k
        queries = keys.detach().float().cpu().numpy() if isinstance(keys, torch.Tensor) else keys
        # adaptive: a context stored verbatim is recognised on exact distances (not where
        # pairs are hidden: a self-calibration hides what would be recognised)
        found = self.store.search(queries, k + (self._extra if self._hidden else 0), exact=s.exact,
                                  nprobes=s.nprobes, refine_factor=s.refine_factor,
                                  verify_nearest=s.adaptive and self._hidden is None)
        return found if self._hidden is None else found.without(self._hidden(found), k)

    def retrieval_mask(self, lm_log_probs: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """[N] bool: the positions that search the store (none while it holds no pairs):
        as the settings' skip options say where given, else as the policy decides
        (``previous``: each row's previous position, ``adaptive.trail``; None: none)."""
        s = self.settings
        if not self.store.searchable:
            return torch.zeros(lm_log_probs.shape[0], dtype=torch.bool)
        policy = self.resolve_policy()
        if s.skip_above_prob is None and s.skip_below_entropy is None and policy is not None:
            return policy.retrieve(lm_log_probs, previous)
        return knn.retrieval_mask(lm_log_probs, s.skip_above_prob, s.skip_below_entropy)

    @property
    def skips_by_trail(self) -> bool:
        """Whether a position's search depends on the previous position's (the policy's
        ``SkipRule``, where the settings give no skip option of their own)."""
        s = self.settings
        return (s.skip_above_prob is None and s.skip_below_entropy is None and self.policy is not None
                and self.policy.skip_rule is not None)

    def step(self, keys: torch.Tensor, lm_logits: torch.Tensor, previous: torch.Tensor | None = None,
             retrieve: torch.Tensor | None = None, found: Neighbours | None = None) -> Step:
        """The kNN-LM distribution for rows of keys [N, dim] and LM logits [N, V]
        (``previous``: what each row's previous step passed on, ``Step.passed_on``;
        ``retrieve``: [N] bool the rows to search, instead of ``retrieval_mask``'s;
        ``found``: the neighbours of the rows that retrieve, instead of a search: pairs
        followed from the previous position, ``following``)."""
        s, policy = self.settings, self.resolve_policy()
        lm_log_probs = torch.log_softmax(lm_logits.float(), dim=-1)
        n = lm_log_probs.shape[0]
        if s.lambda_ == 0.0:  # the plain LM: nothing to look up
            retrieve = torch.zeros(n, dtype=torch.bool)
        elif retrieve is None:
            retrieve = self.retrieval_mask(lm_log_probs, previous)
        neighbours = Neighbours.empty(n, s.k)
        rows = retrieve.nonzero().flatten().numpy()
        if len(rows):
            neighbours.put(rows, self.search(keys[retrieve]) if found is None else found)
        v = mixing.view(mixing.Found.of(neighbours), lm_log_probs, lambda_=s.lambda_, temperature=s.temperature,
                        policy=policy)
        lambdas: float | torch.Tensor = v.lambdas
        if policy is not None:
            lambdas = v.lambdas.to(lm_log_probs.dtype) if len(rows) else torch.zeros(n, dtype=lm_log_probs.dtype)
        return Step(mixing.mixture(lm_log_probs, v, retrieve), lm_log_probs, retrieve, neighbours, v, lambdas)

    def text_step(self, keys: torch.Tensor, lm_logits: torch.Tensor, targets: torch.Tensor,
                  previous: torch.Tensor | None = None, pointers: Pointers | None = None,
                  ) -> tuple[Step, torch.Tensor | None]:
        """``step`` for positions of one text in order, whose next tokens ``targets`` are
        known: where the policy skips by the previous position, every row is searched and
        then decided in order (``Policy.retrieval``; skipped rows get the LM alone), as
        generating the text would have. With ``pointers`` (``follower``; they carry over to
        the next call), a position scores the pairs followed from the previous one where they
        hold (``following.follow_text``). Returns the step and what its last row passes on."""
        self.resolve_policy()
        searchable = self.store.searchable and self.settings.lambda_ > 0.0
        in_order = self.skips_by_trail and searchable
        if in_order:
            retrieve = torch.ones(len(targets), dtype=torch.bool)
        else:
            retrieve = self.retrieval_mask(torch.log_softmax(lm_logits.float(), dim=-1)) if searchable else None
        found = None
        if pointers is not None and retrieve is not None and retrieve.any():
            found, _ = follow_text(pointers, keys.numpy(), self.search(keys[retrieve]), retrieve.numpy(),
                                   targets.numpy())
            found = found.rows(*retrieve.nonzero().flatten().tolist())
        if not in_order:
            return self.step(keys, lm_logits, retrieve=retrieve, found=found), None
        full = self.step(keys, lm_logits, retrieve=retrieve, found=found)
        rows = torch.arange(len(targets))
        retrieved, passed = mixing.in_order(self.policy, full.view, full.lm_log_probs[rows, targets],
                                            full.knn_log_probs[rows, targets], previous)
        lambdas = torch.where(retrieved, full.lambdas, torch.zeros_like(full.lambdas))
        return dataclasses.replace(full, log_probs=mixing.mixture(full.lm_log_probs, full.view, retrieved),
                                   retrieved=retrieved, lambdas=lambdas), passed

    def evaluate(self, text: str | list[int], **kwargs):
        """Perplexity of ``text`` with and without the store: see ``evaluate.evaluate``."""
        from .evaluate import evaluate

        return evaluate(self, text, **kwargs)

    # --- provenance ------------------------------------------------------------------

    def sources(self, neighbours: Neighbours, row: int, n: int = 5, token: int | None = None,
                snippets: bool = True) -> list[Source]:
        """The n heaviest neighbours of one row of a search result, with their documents.

        With ``token``, the neighbours whose next token is ``token`` (its support) come
        first, heaviest first, then the others.
        """
        d = torch.from_numpy(neighbours.distances[row:row + 1])
        v = torch.from_numpy(neighbours.next_tokens[row:row + 1])
        valid = knn.valid_mask(d, v)
        weights = knn.neighbour_log_weights(d, valid, self.settings.temperature,
                                            torch.from_numpy(neighbours.weights[row:row + 1])).exp()[0].numpy()
        order = [i for i in np.argsort(-weights, kind="stable") if valid[0, i]]
        if token is not None:
            order = ([i for i in order if v[0, i] == token] + [i for i in order if v[0, i] != token])
        order = order[:n]
        if not order:
            return []
        docs = self.store.document_refs([int(neighbours.document_ids[row, i]) for i in order])
        out = []
        for i in order:
            doc_id, pos = int(neighbours.document_ids[row, i]), int(neighbours.positions[row, i])
            ref = docs.get(doc_id)
            tok = int(neighbours.next_tokens[row, i])
            out.append(Source(
                next_token=tok, next_token_text=self.tokenizer.decode([tok]),
                distance=float(neighbours.distances[row, i]), weight=float(weights[i]),
                corpus=ref.corpus if ref else "?", document_id=doc_id,
                document=ref.source if ref else "?", title=ref.title if ref else None,
                position=pos, snippet=self.store.snippet(doc_id, pos) if snippets else "",
            ))
        return out

    def explain_row(self, step: Step, row: int, index: int, token: int, n_sources: int) -> TokenExplanation:
        """Row ``row`` of a step, scored for ``token`` (sequence index ``index``), with
        its ``n_sources`` heaviest supporting neighbours."""
        retrieved = bool(step.retrieved[row])
        p_knn = float(step.knn_log_probs[row, token].exp()) if retrieved else None
        lambdas = step.lambdas
        lambda_ = float(lambdas[row]) if isinstance(lambdas, torch.Tensor) else float(lambdas)
        return TokenExplanation(
            index=index, token=token, text=self.tokenizer.decode([token]),
            p_lm=float(step.lm_log_probs[row, token].exp()), p_knn=p_knn,
            p=float(step.log_probs[row, token].exp()), retrieved=retrieved,
            sources=self.sources(step.neighbours, row, n_sources, token=token) if retrieved and n_sources else [],
            knn_weight=lambda_ if retrieved else 0.0,
        )

    def explain_ids(self, text: str | Sequence[int]) -> list[int]:
        """The tokens ``explain`` scores (refused under two: nothing to explain)."""
        ids = list(text) if not isinstance(text, str) else self.encoder.tokenize(text)
        if len(ids) < 2:
            raise InputError("text to explain needs at least two tokens")
        return ids

    def explain(self, text: str | Sequence[int], n_sources: int = 3,
                window: int = SCORE_WINDOW) -> list[TokenExplanation]:
        """Score ``text`` (or its token ids) and give, for every token after the first, its sources."""
        check_number("sources", n_sources, 0, MAX_K, integer=True)
        check_number("window", window, 2, MAX_WINDOW, integer=True)
        ids = self.explain_ids(text)
        out: list[TokenExplanation] = []
        previous, pointers = None, self.follower()
        for win in scored_windows(self.encoder, ids, window=window, stride=max(1, window * 3 // 4)):
            step, previous = self.text_step(win.keys, win.logits, win.targets, previous, pointers)
            for row, (index, token) in enumerate(zip(win.indices.tolist(), win.targets.tolist())):
                out.append(self.explain_row(step, row, index, token, n_sources))
        return out

    def spans(self, tokens: Sequence[TokenExplanation], min_length: int = 2) -> list[Span]:
        """Merge explained tokens into the stored passages they follow (``span_runs``):
        "tokens 4-11 follow document D, positions 120-127", with the stored passage."""
        out = []
        for run in span_runs(tokens, min_length):
            first, last = follows(run[0]), follows(run[-1])
            left, here, nxt, right = self.store.table.tokens_around(
                first.document_id, first.position, 0, last.position - first.position + 1)
            stored = ([here] if here is not None else []) + ([nxt] if nxt is not None else []) + right
            out.append(Span(
                first=run[0].index, last=run[-1].index, text="".join(t.text for t in run), corpus=first.corpus,
                document_id=first.document_id, document=first.document, title=first.title,
                start_position=first.position, end_position=last.position,
                passage=self.tokenizer.decode(stored)))
        return out

    # --- reading ----------------------------------------------------------------------

    @torch.inference_mode()
    def read(self, ids: Sequence[int], room: int | None = None) -> Reading | None:
        """What the model reads before the prompt ``ids``: the passages of the stored
        documents that spell its rarest phrases (``reading``: every prompt position searched
        in one batch), at most ``settings.read``, best first, the later ones only where they
        spell as much of its rare wording as the first, in ``room`` tokens at most
        (None: the model's context less the prompt's). None where the settings read nothing
        (``read`` 0, or λ 0), the store cannot be searched, or no document is named."""
        s = self.settings
        if room is None:
            room = (self.encoder.max_length or len(ids) + reading.MAX_READ_TOKENS) - len(ids)
        ids = list(ids)[-reading.MAX_PROMPT:]
        if not s.read or s.lambda_ == 0.0 or not self.store.searchable or len(ids) < 3:
            return None
        keys, logits = self.encoder.forward(torch.tensor([ids]), with_logits=True)
        keys, logits = keys[0], logits[0]
        targets = torch.tensor(ids[1:])
        surprise = -torch.log_softmax(logits[:-1], dim=-1)[torch.arange(len(targets)), targets]
        found = self.search(keys[:-1], min(reading.READ_K, s.k))
        surprise = surprise.tolist()
        hits = reading.named(ids[1:], surprise, found.next_tokens, found.document_ids, found.positions,
                             reading.CANDIDATES * s.read)
        rare, candidates = reading.rare_wording(ids, surprise), []
        for h in hits:
            lo, hi = reading.window(h)
            _, here, nxt, right = self.store.table.tokens_around(h.document_id, lo, 0, hi - lo)
            if here is not None:
                read = [t for t in (here, nxt) if t is not None] + right
                candidates.append((reading.covers(rare, read), reading.mentions(rare, read), h, lo, read))
        candidates.sort(key=lambda c: (-c[0], -c[1], -c[2].score))
        refs = self.store.document_refs([c[2].document_id for c in candidates])
        blank = self.tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        passages, tokens, context = [], [], []
        for cover, _, h, lo, read in candidates:
            if len(passages) == s.read or cover < reading.SAME_WORDING * candidates[0][0]:
                break  # enough, or the rest spell less of the prompt's rare wording than the best
            if len(context) + len(read) + len(blank) > room:
                continue
            ref = refs.get(h.document_id)
            passages.append(Passage(corpus=ref.corpus if ref else "?", document_id=h.document_id,
                                    document=ref.source if ref else "?", title=ref.title if ref else None,
                                    start_position=lo, end_position=lo + len(read) - 1,
                                    text=self.tokenizer.decode(read), score=h.score))
            tokens.append((lo, read))
            context = read + blank + context  # the best passage last: next to the prompt
        return Reading(passages, context, tokens, keys[-1], found.rows(len(ids) - 2)) if passages else None

    def copied_from(self, got: Reading, prompt_ids: Sequence[int], tokens: Sequence[TokenExplanation]) -> None:
        """Set ``read_from`` of the explained generated ``tokens`` that copy a read passage
        (``reading.copies``): the passage's stored pair, as a ``Source`` (distance 0 and
        weight 0: read, not searched)."""
        at = reading.copies([t.token for t in tokens], prompt_ids, got.tokens)
        for t, where in zip(tokens, at):
            if where is None:
                continue
            passage, position = got.passages[where[0]], where[1]
            t.read_from = Source(next_token=t.token, next_token_text=t.text, distance=0.0, weight=0.0,
                                 corpus=passage.corpus, document_id=passage.document_id, document=passage.document,
                                 title=passage.title, position=position,
                                 snippet=self.store.snippet(passage.document_id, position))

    # --- generation -------------------------------------------------------------------

    def follower(self, lookup: Neighbours | None = None, last_token: int | None = None,
                 drafting: bool = False) -> Pointers | None:
        """The pairs a decoding follows (``following.Pointers``), where it follows the store
        (``settings.follow``; or, with ``drafting``, drafts from it: ``settings.draft``) and
        can (λ > 0, a searchable store, no pairs hidden from its searches); started from
        ``lookup`` [1, k'] (the neighbours of the prompt's position before last, which
        predicted ``last_token``: ``Reading.lookup``) where given. None where it does not."""
        s = self.settings
        if not (s.follow or (drafting and s.draft)) or s.lambda_ == 0.0 or not self.store.searchable or self.hides:
            return None
        pointers = Pointers(self.store.table, s.k, project=self.store.stored_keys,
                            max_pointers=MAX_POINTERS if s.follow else DRAFT_POINTERS)
        if lookup is not None and last_token is not None:
            pointers.searched(lookup)
            pointers.advance(last_token)
        return pointers

    def logits_processor(self, record: bool = False, trail: torch.Tensor | None = None,
                         prompt_keys: torch.Tensor | None = None, pointers: list | None = None,
                         ) -> "KNNLogitsProcessor":
        """A LogitsProcessor for ``model.generate``; use it inside its ``with`` block.
        ``trail``: what each row's previous step passed on (``Step.passed_on``), for rows
        that continue a decoding paused earlier. ``prompt_keys`` [rows, dim]: the keys the
        first step searches with instead of the captured ones (a row of NaN: the captured
        one): the prompts' own keys, where the model reads passages before them. ``pointers``:
        each row's followed pairs (``follower``), where it follows the store; the processor
        moves them on (``KNNLogitsProcessor.pointers`` holds them afterwards)."""
        return KNNLogitsProcessor(self, record=record, trail=trail, prompt_keys=prompt_keys, pointers=pointers)

    @torch.inference_mode()
    def generate(self, prompt: str, max_new_tokens: int = 40, *, do_sample: bool = False,
                 top_p: float | None = None, top_k: int | None = None, num_beams: int = 1,
                 seed: int | None = None, explain: bool = False, n_sources: int = 3) -> Generation:
        """Continue ``prompt`` with the kNN-LM (greedy by default).

        The kNN mixture is applied first; sampling filters (top_p, top_k) then act on it.
        With ``explain=True`` every generated token comes with its sources.
        """
        from transformers import TopKLogitsWarper, TopPLogitsWarper

        check_generation(max_new_tokens=max_new_tokens, top_p=top_p, top_k=top_k, num_beams=num_beams,
                         seed=seed, n_sources=n_sources)
        if seed is not None:
            torch.manual_seed(seed)
        prompt_ids = self.tokenizer(prompt)["input_ids"]
        if not prompt_ids:
            raise InputError("the prompt is empty: give at least one word")
        limit = self.encoder.max_length
        got = self.read(prompt_ids, None if limit is None else limit - len(prompt_ids) - max_new_tokens)
        ids = torch.tensor([(got.context_ids if got else []) + prompt_ids], device=self.encoder.device)
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        warpers = []
        if do_sample and top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if do_sample and top_p is not None and top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        if num_beams == 1:  # following the store and drafting from it (``drafting``)
            choose = drafting.greedy
            if do_sample:
                choose = drafting.sampler(lambda scores: _warped(warpers, ids, scores))
            done = drafting.decode(self, ids[0].tolist(), max_new_tokens, drafting.eos_ids(self), choose=choose,
                                   prompt_key=got.key if got else None, record=explain,
                                   pointers=self.follower(got.lookup if got else None, prompt_ids[-1], drafting=True))
            new, steps, fraction = done.token_ids, done.steps, done.retrieved / max(1, len(done.token_ids))
        else:
            pad = self.tokenizer.pad_token_id
            if pad is None:
                pad = self.tokenizer.eos_token_id
            # generate()'s own sampling warpers would run before the mixture: turn them off
            # and apply ours after it.
            sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": 0} if do_sample else {}
            follower = self.follower(got.lookup if got else None, prompt_ids[-1])
            with self.logits_processor(record=explain, prompt_keys=got.key[None] if got else None,
                                       pointers=[follower] if follower else None) as proc:
                out = self.model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
                    logits_processor=LogitsProcessorList([proc, *warpers]), pad_token_id=pad, **sampling,
                )
            new, steps, fraction, done = out[0, ids.shape[1]:].tolist(), proc.steps, proc.retrieved_fraction, None
        tokens: list[TokenExplanation] = []
        if explain and num_beams == 1:
            start = len(prompt_ids)
            for i, (tok, step) in enumerate(zip(new, steps)):
                tokens.append(self.explain_row(step, 0, start + i, tok, n_sources))
            if got is not None:
                self.copied_from(got, prompt_ids, tokens)
        return Generation(prompt=prompt, text=self.tokenizer.decode(new, skip_special_tokens=True),
                          token_ids=new, retrieved_fraction=fraction, tokens=tokens,
                          spans=self.spans(tokens), read=got.passages if got else [],
                          cost=done.report() if done is not None else {})


def _warped(warpers: list, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Sampling filters (top-k, top-p: transformers' warpers) applied to scores [1, V]."""
    for w in warpers:
        scores = w(ids, scores)
    return scores


class KNNLogitsProcessor(LogitsProcessor):
    """Mixes the store's p_kNN into the scores of each decoding step of ``generate``.

    Works with greedy search, sampling and beam search (each row of the scores is one
    sequence or beam). It reads the current key with a hook, so it must be used inside
    its ``with`` block, which adds the hook and always removes it. It returns log
    probabilities of the mixture; sampling warpers passed after it act on the mixture.
    """

    def __init__(self, knnlm: KNNLM, record: bool = False, trail: torch.Tensor | None = None,
                 prompt_keys: torch.Tensor | None = None, pointers: list | None = None) -> None:
        self.knnlm, self.record, self._trail, self._prompt_keys = knnlm, record, trail, prompt_keys
        self.steps: list[Step] = []  # every step, with record=True
        self.last: Step | None = None  # the latest step
        self._stack: contextlib.ExitStack | None = None
        self._captured: list[torch.Tensor] | None = None
        self._retrieved = self._total = 0
        self._ids: torch.Tensor | None = None  # the previous step's sequences (each row's parent)
        # each row's followed pairs (``following.Pointers``; None: not following)
        self.pointers: list | None = pointers if knnlm.settings.follow else None

    @property
    def retrieved_fraction(self) -> float:
        return self._retrieved / self._total if self._total else 0.0

    def __enter__(self) -> "KNNLogitsProcessor":
        self._stack = contextlib.ExitStack()
        self._captured = self._stack.enter_context(self.knnlm.encoder.capture())
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack, self._captured = self._stack, None, None
        if stack is not None:
            stack.close()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._captured is None:
            raise RuntimeError("use KNNLogitsProcessor inside its `with` block, so that it can "
                               "read the model's keys: `with lm.logits_processor() as proc: ...`")
        if not self._captured:
            raise RuntimeError("no key was captured for this step: is the processor's model "
                               "the one running generate()?")
        keys = self._captured[-1][:, -1, :].float().cpu()  # the last position of each row
        self._captured.clear()
        self.knnlm.resolve_policy()  # after reading the key: a self-calibration runs the model too
        if self.last is None and self._prompt_keys is not None:  # the first step: the prompts' own keys
            given = self._prompt_keys.float().cpu().expand(keys.shape[0], -1)
            keys = torch.where(given.isnan().any(dim=1, keepdim=True), keys, given)
        if keys.shape[0] != scores.shape[0]:
            raise RuntimeError(f"captured {keys.shape[0]} keys for {scores.shape[0]} rows of scores")
        now = input_ids.detach().cpu()
        parent = self._parents(now)
        previous = self._previous(parent, now) if self.knnlm.skips_by_trail else None
        if self.last is None and self._trail is not None:  # the first step of a resumed decoding
            previous = self._trail if self.knnlm.skips_by_trail else None
        retrieve = found = None
        if self.pointers is not None:
            retrieve, found = self._follow(parent, now, keys, scores.cpu(), previous)
        step = self.knnlm.step(keys, scores.cpu(), previous, retrieve=retrieve, found=found)  # on the CPU
        self._retrieved += int(step.retrieved.sum())
        self._total += int(step.retrieved.numel())
        self.last = step
        if self.record:
            self.steps.append(step)
        return step.log_probs.to(device=scores.device, dtype=scores.dtype)

    def _parents(self, now: torch.Tensor) -> torch.Tensor | None:
        """Which row of the previous step each row continues (the row holding its sequence
        less the last token: the same row when sampling, any beam in beam search; -1 where
        none does); None at the first step."""
        before, self._ids = self._ids, now
        if before is None or before.shape[1] != now.shape[1] - 1:
            return None
        same = (now[:, None, :-1] == before[None, :, :]).all(dim=-1)  # [rows now, rows before]
        return torch.where(same.any(dim=1), same.double().argmax(dim=1), torch.full((now.shape[0],), -1))

    def _previous(self, parent: torch.Tensor | None, now: torch.Tensor) -> torch.Tensor | None:
        """What the previous step passed on to each row (``Step.passed_on``); zeros where no
        row of it is continued."""
        last = self.last
        if last is None or parent is None or last.signals is None:
            return None
        out = last.passed_on(parent.clamp(min=0), now[:, -1])
        return torch.where((parent >= 0).unsqueeze(1), out, torch.zeros_like(out))

    def _follow(self, parent: torch.Tensor | None, now: torch.Tensor, keys: torch.Tensor, scores: torch.Tensor,
                previous: torch.Tensor | None) -> tuple[torch.Tensor | None, Neighbours | None]:
        """Each row's followed pairs moved on by the token that came, and the rows that
        retrieve: with their followed pairs where they hold, else from one batched search."""
        rows, old = now.shape[0], self.pointers
        if parent is not None:
            old = [copy.copy(old[int(p)]) if p >= 0 else None for p in parent]
        elif len(old) != rows:  # beams made from one prompt: each starts where the prompt left it
            old = [copy.copy(old[0]) for _ in range(rows)] if len(old) == 1 else [None] * rows
        self.pointers = [p if p is not None else self.knnlm.follower() for p in old]
        for p, token in zip(self.pointers, now[:, -1].tolist()):
            if p is not None and p.waiting:
                p.advance(token)
        lm = self.knnlm
        if lm.settings.lambda_ == 0.0 or not lm.store.searchable or any(p is None for p in self.pointers):
            return None, None
        retrieve = lm.retrieval_mask(torch.log_softmax(scores.float(), dim=-1), previous)
        chosen = retrieve.nonzero().flatten().tolist()
        found = Neighbours.empty(len(chosen), lm.settings.k)
        need = []
        for j, i in enumerate(chosen):
            got = self.pointers[i].candidates(keys[i].numpy())
            if got is None:
                need.append(j)
            else:
                found.put([j], got)
        if need:
            searched = lm.search(keys[retrieve][need])
            found.put(need, searched)
            for t, j in enumerate(need):
                self.pointers[chosen[j]].searched(searched.rows(t))
        for p in self.pointers:
            p.waiting = True
        return retrieve, found


def check_generation(*, max_new_tokens: int, top_p: float | None, top_k: int | None, num_beams: int,
                     seed: int | None, n_sources: int) -> None:
    """The generation options, each in its range (KNNLM.generate and the CLI check here)."""
    check_number("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS, integer=True)
    if top_p is not None:
        check_number("top_p", top_p, 0.0, 1.0, lo_open=True)
    if top_k is not None:
        check_number("top_k", top_k, 1, None, integer=True)
    check_number("num_beams", num_beams, 1, MAX_BEAMS, integer=True)
    if seed is not None:
        check_number("seed", seed, 0, MAX_SEED, integer=True)
    check_number("sources", n_sources, 0, MAX_K, integer=True)
