"""Several prompts decoded as one batch with the kNN-LM, token by token, for the server.

``decode(lm, rows, on_token)`` runs one ``model.generate`` over prompts of different
lengths (left-padded), each row with its own token budget, sampling temperature (0:
greedy), top-p and stop strings, and calls ``on_token`` after every step with each row's
new text (and, where asked, the token's explanation), so a caller can stream it. The kNN
mixture is the adapter's (``KNNLogitsProcessor``), one batched search per step for all
rows; per-row sampling comes after it (``RowSampler``). A row that is done (its budget
spent, a stop string seen, or cancelled by the caller) is ended with the end-of-sequence
token, and ``generate`` stops when every row is done.

Example:
    >>> rows = [Row(prompt_ids=lm.tokenizer("The tower")["input_ids"], max_tokens=8)]  # doctest: +SKIP
    >>> decode(lm, rows); rows[0].text, rows[0].finish_reason                           # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .adapter import KNNLM, Reading, Span, TokenExplanation
from .config import MAX_NEW_TOKENS, check_number
from .drafting import eos_ids
from .errors import InputError
from .windows import left_padded

STOP = "stop"  # the model ended the text, or a stop string was met
LENGTH = "length"  # the row's token budget was spent
CANCELLED = "cancelled"  # the caller gave up on the row (a client that went away)


@dataclass
class Row:
    """One sequence to decode and, once decoded, what came of it."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    explain: bool = False
    n_sources: int = 3
    # filled in by decode()
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # the text handed out so far (the whole text once finished)
    finish_reason: str | None = None
    tokens: list[TokenExplanation] = field(default_factory=list)  # with explain
    spans: list[Span] = field(default_factory=list)  # with explain, once finished
    retrieved: int = 0  # steps that searched the store
    trail: object = None  # what its last step passed on (a paused row resumes with it)
    reading: Reading | None = None  # what the model reads before the prompt (``KNNLM.read``)
    read_asked: bool = False  # whether ``reading`` was worked out (at the row's first decoding)
    pointers: object = None  # the stored pairs it follows (``following.Pointers``; a paused row keeps them)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise InputError("the prompt is empty: give at least one word")
        check_number("max_tokens", self.max_tokens, 1, MAX_NEW_TOKENS, integer=True)
        check_number("temperature", self.temperature, 0.0, 2.0)
        check_number("top_p", self.top_p, 0.0, 1.0, lo_open=True)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def retrieved_fraction(self) -> float:
        return self.retrieved / len(self.token_ids) if self.token_ids else 0.0


OnToken = Callable[[int, str, list[TokenExplanation]], None]  # row index, new text, new explanations


class RowSampler(LogitsProcessor):
    """Per-row sampling over the kNN mixture: greedy rows get their argmax only, the others
    their temperature and top-p; rows that are done get the end-of-sequence token only."""

    def __init__(self, rows: Sequence[Row], eos: int) -> None:
        self.rows, self.eos = rows, eos
        self.temperature = torch.tensor([[max(r.temperature, 1e-6)] for r in rows])
        self.top_p = torch.tensor([[r.top_p] for r in rows])
        self.greedy = torch.tensor([r.temperature == 0.0 for r in rows])
        self.nucleus = any(r.top_p < 1.0 for r in rows)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float() / self.temperature.to(scores.device)
        if self.nucleus:  # top-p: the smallest set of tokens whose probability reaches p
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            drop_sorted = probs.cumsum(dim=-1) - probs >= self.top_p.to(scores.device)
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        forced = torch.full_like(scores, float("-inf"))
        best = scores.argmax(dim=-1, keepdim=True)
        greedy = self.greedy.to(scores.device).unsqueeze(1)
        scores = torch.where(greedy, forced.scatter(-1, best, 0.0), scores)
        done = torch.tensor([r.done for r in self.rows], device=scores.device).unsqueeze(1)
        end = forced.clone()
        end[:, self.eos] = 0.0
        return torch.where(done, end, scores)


class _Steps(BaseStreamer):
    """generate()'s streamer: the tokens of each step, handed to ``decode``'s bookkeeping."""

    def __init__(self, on_step: Callable[[list[int]], None]) -> None:
        self.on_step, self.prompt_seen = on_step, False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call hands over the prompts
            self.prompt_seen = True
            return
        self.on_step(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class _Pause(StoppingCriteria):
    """Ends ``generate`` when ``pause()`` says so (rows not done stay unfinished)."""

    def __init__(self, pause: Callable[[], bool]) -> None:
        self.pause, self.paused = pause, False

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        self.paused = bool(self.pause())
        return torch.full((input_ids.shape[0],), self.paused, dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def decode(lm: KNNLM, rows: Sequence[Row], on_token: OnToken | None = None,
           cancelled: Callable[[int], bool] | None = None, seed: int | None = None,
           pause: Callable[[], bool] | None = None) -> bool:
    """Decode ``rows`` as one batch with the kNN-LM (see the module's docstring); each
    row's ``text``, ``finish_reason``, ``token_ids`` (and ``tokens``/``spans`` where it
    asked to be explained) are filled in. ``cancelled(i)`` is asked after every step.

    ``pause()``, asked after every step, ends the call early when it says so: the rows not
    done keep their tokens and what their last step passed on, and a later call with the
    same rows (and, where sampling, the random state restored) continues them exactly as
    one call would have. Returns whether it paused."""
    if not rows:
        return False
    if any(r.done for r in rows):
        raise ValueError("decode takes rows that are not done yet")
    eos = eos_ids(lm)
    stop_len = max((len(s) for r in rows for s in r.stop), default=0)
    decode_text = lm.tokenizer.decode
    limit = lm.encoder.max_length
    for r in rows:
        if not r.read_asked:
            room = None if limit is None else limit - len(r.prompt_ids) - r.max_tokens
            r.reading, r.read_asked = lm.read(r.prompt_ids, room), True
            r.pointers = lm.follower(r.reading.lookup if r.reading else None, r.prompt_ids[-1])
    ids, mask = left_padded([(r.reading.context_ids if r.reading else []) + r.prompt_ids + r.token_ids
                             for r in rows], pad=eos[0])
    resumed = [r.trail for r in rows if r.trail is not None]
    if resumed and len(resumed) != len(rows):
        raise ValueError("rows resumed from a pause are decoded together, without new ones")
    # a reading row's first step searches with its prompt's own key; the others with the captured one (NaN)
    own = [r.reading.key if r.reading is not None and not r.token_ids else None for r in rows]
    given = [key for key in own if key is not None]
    prompt_keys = None
    if given:
        captured = torch.full_like(given[0], float("nan"))
        prompt_keys = torch.stack([captured if key is None else key for key in own])
    following = [r.pointers for r in rows]
    proc = lm.logits_processor(trail=torch.stack(resumed) if resumed else None, prompt_keys=prompt_keys,
                               pointers=following if all(p is not None for p in following) else None)
    last_tokens: list[int] = []

    def on_step(tokens: list[int]) -> None:
        last_tokens[:] = tokens
        step = proc.last
        for i, (r, tok) in enumerate(zip(rows, tokens)):
            if r.done:
                continue
            if cancelled is not None and cancelled(i):
                r.finish_reason = CANCELLED
                continue
            explained = []
            if tok in eos:
                r.finish_reason = STOP
            else:
                if step is not None and bool(step.retrieved[i]):
                    r.retrieved += 1
                r.token_ids.append(tok)
                if r.explain and step is not None:
                    explained.append(lm.explain_row(step, i, len(r.prompt_ids) + len(r.token_ids) - 1, tok,
                                                    r.n_sources))
                    r.tokens.extend(explained)
                if len(r.token_ids) >= r.max_tokens:
                    r.finish_reason = LENGTH
            full = decode_text(r.token_ids, skip_special_tokens=True)
            for s in r.stop:
                at = full.find(s)
                if at >= 0:
                    full, r.finish_reason = full[:at], STOP
            if not r.done:  # hold back what might be a stop string's start or half a character
                full = full[:len(full) - stop_len + 1] if stop_len > 1 else full
                full = full.rstrip("\ufffd")
            new = full[len(r.text):] if full.startswith(r.text) else ""
            r.text += new
            if on_token is not None and (new or explained):
                on_token(i, new, explained)

    if seed is not None:
        torch.manual_seed(seed)
    device = lm.encoder.device
    stopper = _Pause(pause or (lambda: False))
    with proc:
        lm.model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device),
            max_new_tokens=max(r.max_tokens - len(r.token_ids) for r in rows), do_sample=True,
            temperature=1.0, top_p=1.0, top_k=0, eos_token_id=eos, pad_token_id=eos[0],
            logits_processor=LogitsProcessorList([proc, RowSampler(rows, eos[0])]),
            stopping_criteria=StoppingCriteriaList([stopper]), streamer=_Steps(on_step),
        )
    if proc.pointers is not None:
        for r, p in zip(rows, proc.pointers):
            r.pointers = p
    if stopper.paused and not all(r.done for r in rows):
        step = proc.last
        for i, r in enumerate(rows):
            r.trail = (step.passed_on(torch.tensor([i]), torch.tensor([last_tokens[i]]))[0]
                       if step is not None and step.signals is not None and lm.skips_by_trail else None)
        if any(r.trail is None for r in rows):
            for r in rows:
                r.trail = None
        return True
    for r in rows:
        r.finish_reason = r.finish_reason or LENGTH
        if r.explain:
            if r.reading is not None:  # known once the row is done: streamed tokens come without it
                lm.copied_from(r.reading, r.prompt_ids, r.tokens)
            r.spans = lm.spans(r.tokens)
    return False
