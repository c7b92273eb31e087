"""Perplexity of a text with and without the store, and sweeps over λ, k and T.

One pass over the text does everything: a sliding-window forward pass gives the LM's
log probabilities and the keys; one batched search per group of windows gives the
k_max nearest neighbours; then every (λ, k, T) of the sweep is scored from those
neighbours (the k nearest are a prefix of the k_max nearest). Only running sums are
kept, so memory does not grow with the length of the text.

Example:
    >>> lm = KNNLM.from_store("wiki-store")                         # doctest: +SKIP
    >>> r = evaluate(lm, open("test.txt").read(), max_tokens=20000)  # doctest: +SKIP
    >>> r.base_ppl, r.knn_ppl                                        # doctest: +SKIP
    (22.2, 20.8)
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import numpy as np
import torch

from . import adaptive, knn, mixing
from .config import SCORE_STRIDE, SCORE_WINDOW, KNNSettings, ProgressFn, check_number
from .errors import InputError
from .following import follow_text
from .outputs import atomic_output, check_output_path
from .scoring import check_windows, scored_windows

if TYPE_CHECKING:
    from .encoder import Encoder
    from .following import Pointers
    from .handle import StoreHandle
    from .vectors import Neighbours


class Scorer(Protocol):
    """What scoring a text needs of a kNN-LM (``adapter.KNNLM`` is one): its settings, model
    and store, its search and retrieval decisions, its policy, and clones of it."""

    settings: KNNSettings
    encoder: Encoder
    store: StoreHandle

    def search(self, keys, k: int | None = None) -> Neighbours: ...

    def retrieval_mask(self, lm_log_probs: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor: ...

    @property
    def skips_by_trail(self) -> bool: ...

    @property
    def policy(self) -> adaptive.Policy | None: ...

    def resolve_policy(self, progress: ProgressFn | None = None) -> adaptive.Policy | None: ...

    def with_settings(self, **overrides) -> "Scorer": ...

    def hiding(self, hidden: Callable[[Neighbours], np.ndarray], extra: int | None = None) -> "Scorer": ...

    def follower(self) -> Pointers | None: ...


@dataclass
class SweepPoint:
    lambda_: float
    k: int
    temperature: float
    knn_ppl: float
    adaptive_ppl: float | None = None  # with --adaptive: the adaptive λ at this k and T


@dataclass
class EvalResult:
    """Perplexities of one text, base LM vs kNN-LM, with the settings and speeds.

    ``knn_only_ppl`` is the perplexity of p_kNN alone over the positions that searched
    the store; it is infinite when some target is not the next token of any of its k
    neighbours (``knn_coverage`` is the fraction that is). With a sweep, ``knn_ppl`` and
    the settings are those of the best point.
    """

    tokens: int
    base_ppl: float
    knn_ppl: float
    knn_only_ppl: float
    knn_coverage: float
    retrieved_fraction: float
    lambda_: float
    k: int
    temperature: float
    search: str  # "exact" or "ann"
    base_tokens_per_s: float
    knn_tokens_per_s: float
    sweep: list[SweepPoint] = field(default_factory=list)
    adaptive: str | None = None
    fixed_knn_ppl: float | None = None
    mean_lambda: float | None = None
    # of the positions that retrieved, the share scored from pairs followed from the previous
    # position instead of a search's (``following``): the searches a decoding saves (eval
    # itself searches every such position in one batch, which costs less than following)
    followed_fraction: float = 0.0

    @property
    def speed_ratio(self) -> float:
        """kNN-LM eval throughput ÷ base LM eval throughput."""
        return self.knn_tokens_per_s / self.base_tokens_per_s if self.base_tokens_per_s else float("nan")

    def to_dict(self) -> dict:
        """JSON-ready: infinite or undefined numbers become None, `lambda_` is `lambda`."""
        def clean(value):
            if isinstance(value, float):
                return round(value, 4) if math.isfinite(value) else None
            return value
        d = {k: clean(v) for k, v in asdict(self).items() if k != "sweep"}
        d["lambda"] = d.pop("lambda_")
        d["speed_ratio"] = clean(self.speed_ratio)
        d["sweep"] = [{"lambda": p.lambda_, "k": p.k, "temperature": p.temperature,
                       "knn_ppl": clean(p.knn_ppl),
                       **({"adaptive_ppl": clean(p.adaptive_ppl)} if self.adaptive else {})}
                      for p in self.sweep]
        if not self.adaptive:
            for key in ("adaptive", "fixed_knn_ppl", "mean_lambda"):
                d.pop(key)
        return d


def evaluate(knnlm: Scorer, text: str | Sequence[int], *, lambdas: Sequence[float] | None = None,
             ks: Sequence[int] | None = None, temperatures: Sequence[float] | None = None,
             max_tokens: int | None = None, window: int = SCORE_WINDOW, stride: int = SCORE_STRIDE,
             batch_size: int = 4, progress: ProgressFn | None = None,
             records: list[adaptive.Records] | None = None) -> EvalResult:
    """Perplexity of ``text`` (a string or token ids) with and without the store.

    Args:
        knnlm: the adapter; its settings give λ, k and T unless a sweep overrides them,
            and whether λ is adaptive (``settings.adaptive``).
        lambdas, ks, temperatures: sweep values (default: the adapter's own).
        max_tokens: score at most this many tokens (the first ones).
        window, stride: sliding-window scoring (each token scored once, with at least
            window - stride tokens of context after the first window).
        records: if given, per-position signals and target log probabilities (at the
            adapter's k and T) are appended to it, one ``adaptive.Records`` per window
            (what ``knnstore calibrate`` fits on).
    """
    s = knnlm.settings
    check_windows(window, stride)
    ids = token_ids(knnlm, text, max_tokens)
    knnlm.resolve_policy()  # a self-calibration, where the store needs one, before the scoring
    grid = list(itertools.product(lambdas or [s.lambda_], ks or [s.k], temperatures or [s.temperature]))
    for lambda_, k, t in grid:
        dataclasses.replace(s, lambda_=lambda_, k=k, temperature=t)  # validates each point
    k_max = max([k for _, k, _ in grid] + [s.k])
    # following depends on k (how many neighbours survive): a sweep over k searches at every point
    tally = _Tally(len(grid), pointers=knnlm.follower() if len({k for _, k, _ in grid}) == 1 else None)
    windows = scored_windows(knnlm.encoder, ids, window=window, stride=stride, batch_size=batch_size)
    while True:
        t0 = time.perf_counter()
        win = next(windows, None)
        if win is None:
            break
        lm_log_probs = torch.log_softmax(win.logits.float(), dim=-1)  # [S, V]
        target_lm = lm_log_probs.gather(1, win.targets.unsqueeze(1)).squeeze(1).double()
        t1 = time.perf_counter()
        _score_window(knnlm, win, lm_log_probs, target_lm, grid, k_max, tally, t1, records)
        tally.t_base += t1 - t0
        tally.base_nll -= float(target_lm.sum())
        tally.n += len(win.targets)
        if progress:
            progress(tally.n, len(ids) - 1)
    return _result(knnlm, grid, tally)


def token_ids(knnlm: Scorer, text: str | Sequence[int], max_tokens: int | None) -> list[int]:
    """The tokens ``evaluate`` scores: the first ``max_tokens`` + 1 (the first is context
    only); refused under two."""
    if max_tokens is not None:
        check_number("max_tokens", max_tokens, 1, None, integer=True)
    ids = list(text) if not isinstance(text, str) else knnlm.encoder.tokenize(text)
    if max_tokens is not None:
        ids = ids[:max_tokens + 1]
    if len(ids) < 2:
        raise InputError("the text to evaluate has fewer than two tokens: give a longer text")
    return ids


@dataclass
class _Tally:
    """What a scoring pass adds up, window by window (negative log likelihoods in nats)."""

    points: int
    n: int = 0
    n_retrieved: int = 0
    n_covered: int = 0
    base_nll: float = 0.0
    knn_only_nll: float = 0.0
    lambda_sum: float = 0.0
    t_base: float = 0.0
    t_knn: float = 0.0
    previous: torch.Tensor | None = None  # what the last position passed on (adaptive.trail)
    pointers: Pointers | None = None  # the pairs followed (``following``), from window to window
    n_followed: int = 0  # retrieving positions scored from followed pairs: the searches a decoding saves
    mix_nll: np.ndarray = field(init=False)  # [points]: the fixed-λ mixture at each sweep point
    ada_nll: np.ndarray = field(init=False)  # [points]: the adaptive mixture

    def __post_init__(self) -> None:
        self.mix_nll, self.ada_nll = np.zeros(self.points), np.zeros(self.points)


def _score_window(knnlm: Scorer, win, lm_log_probs: torch.Tensor, target_lm: torch.Tensor, grid: list,
                  k_max: int, tally: _Tally, t1: float, records: list | None) -> None:
    """One window: search once at the largest k, then every sweep point from those neighbours."""
    s, policy = knnlm.settings, knnlm.policy
    retrieve = knnlm.retrieval_mask(lm_log_probs)
    # With a policy every position is searched, so that the fixed λ beside it is the plain
    # kNN-LM; the adaptive mixture uses only the positions its policy retrieves at. A policy
    # that skips by the previous position decides once the neighbours are known, position
    # by position (as generation would), carrying the last one over to the next window.
    in_order = knnlm.skips_by_trail and knnlm.store.searchable
    search = retrieve if policy is None or not (retrieve.any() or in_order) else torch.ones_like(retrieve)
    rows = len(win.targets)
    d = torch.full((rows, k_max), math.inf, dtype=torch.float32)
    nt = torch.full((rows, k_max), -1, dtype=torch.long)
    w = torch.ones((rows, k_max), dtype=torch.long)
    pos = torch.full((rows, k_max), -1, dtype=torch.long)
    followed = torch.zeros(rows, dtype=torch.bool)
    if search.any():
        found = knnlm.search(win.keys[search], k=k_max)
        if tally.pointers is not None:  # where followed pairs hold, they replace the search's
            found, used = follow_text(tally.pointers, win.keys.numpy(), found, search.numpy(), win.targets.numpy())
            followed, search = torch.from_numpy(used), torch.ones(rows, dtype=torch.bool)
        d[search] = torch.from_numpy(found.distances)
        nt[search] = torch.from_numpy(found.next_tokens).long()
        w[search] = torch.from_numpy(found.weights).long()
        pos[search] = torch.from_numpy(found.positions).long()
    elif tally.pointers is not None:
        for token in win.targets.tolist():
            tally.pointers.advance(token)
    neighbours = mixing.Found(d, nt, w, pos)

    @functools.cache
    def view_at(k: int, t: float, adaptive_: bool) -> mixing.View:
        """The targets' p_kNN from the k nearest at T (at the adapter's λ): the plain kNN-LM's,
        or as the policy mixes it."""
        return mixing.view(neighbours.first(k), lm_log_probs, lambda_=s.lambda_, temperature=t,
                           policy=policy if adaptive_ else None, targets=win.targets)

    if in_order:
        v = view_at(s.k, s.temperature, True)
        retrieve, tally.previous = mixing.in_order(policy, v, target_lm, v.knn, tally.previous)
    searched = torch.ones_like(retrieve)  # the fixed λ beside a policy: the kNN-LM searching everywhere
    for i, (lambda_, k, t) in enumerate(grid):
        fixed = mixing.at_lambda(view_at(k, t, False), lambda_, None)
        tally.mix_nll[i] -= float(mixing.mixture(target_lm, fixed, searched).sum())
        if policy is not None:
            ada = mixing.at_lambda(view_at(k, t, True), lambda_, policy)
            tally.ada_nll[i] -= float(mixing.mixture(target_lm, ada, retrieve).sum())
        if i == 0:
            if policy is not None:
                tally.lambda_sum += float(mixing.applied(ada, retrieve).sum())
            tally.t_knn += time.perf_counter() - t1  # search + one mixture: the kNN-LM's extra cost
            sel = fixed.knn[retrieve]
            tally.knn_only_nll -= float(sel.sum())
            tally.n_covered += int(torch.isfinite(sel).sum())
    if records is not None:
        k, t = s.k, s.temperature
        near, plain = neighbours.first(k), view_at(k, t, False)
        sig = view_at(k, t, True).signals if policy is not None else mixing.signals(near, lm_log_probs, t)
        records.append(adaptive.Records(sig, target_lm, plain.knn, plain.has, mixing.sharp_target(near, win.targets)))
    tally.n_retrieved += int(retrieve.sum())
    tally.n_followed += int((retrieve & followed).sum())


def _result(knnlm: Scorer, grid: list, tally: _Tally) -> EvalResult:
    policy, n = knnlm.policy, tally.n
    points = [SweepPoint(lambda_, k, t, knn.perplexity(nll, n), knn.perplexity(a, n) if policy is not None else None)
              for (lambda_, k, t), nll, a in zip(grid, tally.mix_nll, tally.ada_nll)]
    best = min(points, key=lambda p: p.knn_ppl if policy is None else p.adaptive_ppl)
    t_base, t_knn = tally.t_base, tally.t_knn
    return EvalResult(
        tokens=n, base_ppl=knn.perplexity(tally.base_nll, n),
        knn_ppl=best.knn_ppl if policy is None else best.adaptive_ppl,
        knn_only_ppl=(knn.perplexity(tally.knn_only_nll, tally.n_retrieved) if tally.n_covered == tally.n_retrieved
                      else float("inf")),
        knn_coverage=tally.n_covered / tally.n_retrieved if tally.n_retrieved else 0.0,
        retrieved_fraction=tally.n_retrieved / n if n else 0.0,
        lambda_=best.lambda_, k=best.k, temperature=best.temperature,
        search="exact" if knnlm.settings.exact or not knnlm.store.table.has_vector_index() else "ann",
        base_tokens_per_s=n / t_base if t_base else float("nan"),
        knn_tokens_per_s=n / (t_base + t_knn) if t_base + t_knn else float("nan"),
        sweep=points if len(points) > 1 else [],
        adaptive=policy.describe() if policy is not None else None,
        fixed_knn_ppl=best.knn_ppl if policy is not None else None,
        mean_lambda=tally.lambda_sum / n if policy is not None and n else None,
        followed_fraction=tally.n_followed / tally.n_retrieved if tally.n_retrieved else 0.0,
    )


def check_sweep_prefix(prefix: str | Path) -> None:
    """Refuse, before any scoring, a sweep output that ``write_sweep`` could not write."""
    prefix = Path(prefix)
    for path in (prefix.with_suffix(".csv"), prefix.with_suffix(".png")):
        check_output_path(path)


def write_sweep(result: EvalResult, prefix: str | Path) -> tuple[Path, ...]:
    """Write a sweep as CSV and, where matplotlib is installed (``pip install
    'knnstore[plot]'``), as a PNG plot (perplexity vs λ, one line per k and T). Returns the
    files written."""
    prefix = Path(prefix)
    csv_path, png_path = prefix.with_suffix(".csv"), prefix.with_suffix(".png")
    text = io.StringIO()  # a sweep is a few hundred rows: written whole below
    w = csv.writer(text)
    w.writerow(["lambda", "k", "temperature", "knn_ppl", "adaptive_ppl", "base_ppl", "tokens"])
    for p in result.sweep:
        ada = "" if p.adaptive_ppl is None else f"{p.adaptive_ppl:.4f}"
        w.writerow([p.lambda_, p.k, p.temperature, f"{p.knn_ppl:.4f}", ada, f"{result.base_ppl:.4f}",
                    result.tokens])
    with atomic_output(csv_path) as f:
        f.write(text.getvalue().encode("utf-8"))
    try:
        import matplotlib
    except ImportError:
        return (csv_path,)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    lines = sorted({(p.k, p.temperature) for p in result.sweep})
    for k, t in lines:
        pts = sorted((p.lambda_, p.knn_ppl) for p in result.sweep if p.k == k and p.temperature == t)
        line, = ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"kNN-LM, k={k}, T={t:g}")
        if result.adaptive:
            ada = sorted((p.lambda_, p.adaptive_ppl) for p in result.sweep if p.k == k and p.temperature == t)
            ax.plot([x for x, _ in ada], [y for _, y in ada], marker="s", linestyle=":", color=line.get_color(),
                    label=f"adaptive, k={k}, T={t:g}")
    ax.axhline(result.base_ppl, color="black", linestyle="--", label=f"base LM ({result.base_ppl:.2f})")
    ax.set_xlabel("λ (weight of p_kNN)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"kNN-LM perplexity on {result.tokens:,} tokens ({result.search} search)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(png_path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return csv_path, png_path


def calibrate(knnlm: Scorer, text: str | Sequence[int], *, kind: str = "logistic",
              max_tokens: int | None = None, keep: float = 0.9, holdout: float = 0.2,
              window: int = SCORE_WINDOW, stride: int = SCORE_STRIDE, sharp: bool = adaptive.FIT_SHARP,
              progress: ProgressFn | None = None) -> adaptive.Calibration:
    """Fit the adaptive-λ map on held-out text of the store's domain (see ``adaptive.fit``).

    Every position retrieves (no skipping) at the adapter's k and T; the adapter's λ is
    the starting point and the fixed-λ reference in the reported metrics. With ``sharp``,
    the share of the sharp view of the neighbours is fitted too (``adaptive.SHARP``). The
    result is not saved: ``Store.save_calibration`` does that.
    """
    if kind not in adaptive.KINDS:
        raise InputError(f"calibration kind must be one of {', '.join(adaptive.KINDS)}, got {kind!r}")
    if not 0.0 < keep <= 1.0:
        raise InputError(f"keep must be in (0, 1], got {keep}")
    s = knnlm.settings
    full = knnlm.with_settings(adaptive=False, skip_above_prob=None, skip_below_entropy=None,
                               lambda_=s.lambda_ if 0 < s.lambda_ < 1 else KNNSettings.lambda_)
    parts: list[adaptive.Records] = []
    evaluate(full, text, max_tokens=max_tokens, window=window, stride=stride, progress=progress,
             records=parts)
    rec = adaptive.Records.concat(parts)
    if len(rec) < 100:
        raise InputError(f"calibration needs at least 100 tokens of text, got {len(rec)}: give a longer text")
    return adaptive.fit(rec, kind=kind, k=s.k, temperature=s.temperature,
                        init_lambda=full.settings.lambda_, holdout=holdout, keep=keep, sharp=sharp)


SELF_TOKENS = 16384  # positions a self-calibration scores (at most the store's tokens)
SELF_CHUNK = 512  # scored in chunks of this many tokens, one document each
SELF_BAND = 4096  # a chunk's own document is hidden this many positions either side of it
SELF_MIN_TOKENS = 1000  # fewer scorable positions: no self-calibration (the store is too small)
# Share of the chunks scored with only their own stretch hidden (± SELF_MARGIN positions): the
# rest of their document stays visible, as a store that holds what a query asks about would be.
SELF_LOCAL = 0.0
SELF_MARGIN = 32
SELF_SOURCE = f"(the store's own text, its document hidden ±{SELF_BAND:,} positions)"  # as the catalog records it


def self_records(knnlm: Scorer, *, tokens: int = SELF_TOKENS, chunk: int = SELF_CHUNK, band: int = SELF_BAND,
                 local: float = SELF_LOCAL, margin: int = SELF_MARGIN, seed: int = 0,
                 progress: ProgressFn | None = None) -> adaptive.Records:
    """Per-position signals and target probabilities (``adaptive.Records``) of the store's
    own text, scored as if it were unseen: chunks of ``chunk`` tokens drawn from the
    store's documents (by their size; read back from the stored pairs), each scored with
    the pairs of its own document within ``band`` positions of it hidden from the search
    (``KNNLM.hiding``): a document no longer than that is left out whole (leave one
    document out), a long one (a book) keeps its distant parts, as held-out text of the
    same book would. Every position retrieves, at the adapter's k and T.

    A share ``local`` of the chunks (spread evenly) hides only the chunk and ``margin``
    positions either side of it: the rest of its document, with its other mentions of
    the same names and facts, stays visible, as it does for a query about a stored
    document.

    Documents shorter than a chunk (a store of many short notes or records) give fewer
    positions than a chunk each: more of them, not drawn yet, are drawn until ``tokens``
    positions are scored or every document has been."""
    store = knnlm.store
    docs = [d for d in store.ready_documents() if d.n_tokens > 16]
    if not docs:
        return adaptive.Records.concat([])
    rng = np.random.default_rng(seed)
    sizes = np.array([d.n_tokens for d in docs], dtype=np.float64)
    tokens = min(tokens, int(sizes.sum()))  # no more positions than the store holds
    n_chunks = max(1, math.ceil(tokens / chunk))
    first = rng.choice(len(docs), size=min(n_chunks, len(docs)), replace=False, p=sizes / sizes.sum())
    more = rng.choice(len(docs), size=n_chunks - len(first), replace=True, p=sizes / sizes.sum())
    order = [int(i) for i in np.concatenate([first, more])]
    drawn = set(order)
    parts: list[adaptive.Records] = []
    scored = i = 0
    while True:
        if i == len(order):  # every drawn document scored: short documents leave positions to find
            extra = _more_documents(rng, sizes, drawn, tokens - scored)
            if not extra:
                break
            order += extra
        doc = docs[order[i]]
        i += 1
        ids = store.document_tokens(doc.id)
        length = min(chunk + 1, len(ids))
        starts = [s for s in rng.permutation(max(1, len(ids) - length + 1))[:8]
                  if (ids[s:s + length] >= 0).all()]  # a stretch every token of which is stored
        if not starts or length < 17:
            continue
        start = int(starts[0])
        near = margin if math.floor(i * local) > math.floor((i - 1) * local) else band
        lo, hi = start - near, start + length + near

        def hidden(nb, doc_id=doc.id, lo=lo, hi=hi):
            return (nb.document_ids == doc_id) & (nb.positions >= lo) & (nb.positions < hi)

        evaluate(knnlm.hiding(hidden), ids[start:start + length].tolist(), records=parts)
        scored += length - 1
        if progress is not None:
            progress(min(tokens, scored), tokens)
    return adaptive.Records.concat(parts)


def _more_documents(rng: np.random.Generator, sizes: np.ndarray, drawn: set[int], missing: int) -> list[int]:
    """Documents not drawn yet (by size, without replacement), about enough to hold
    ``missing`` more positions; added to ``drawn``."""
    left = np.array([i for i in range(len(sizes)) if i not in drawn])
    if missing <= 0 or not len(left):
        return []
    n = min(len(left), max(1, math.ceil(missing / float(sizes[left].mean()))))
    chosen = [int(i) for i in rng.choice(left, size=n, replace=False, p=sizes[left] / sizes[left].sum())]
    drawn.update(chosen)
    return chosen


def self_calibrate(knnlm: Scorer, *, kind: str = "logistic", keep: float = 0.9, tokens: int = SELF_TOKENS,
                   local: float = SELF_LOCAL, sharp: bool = adaptive.FIT_SHARP, seed: int = 0,
                   progress: ProgressFn | None = None) -> adaptive.Calibration | None:
    """Fit the adaptive-λ map on the store's own text (``self_records``; ``local`` and
    ``sharp`` as there and in ``calibrate``): no user text. None where the store holds too
    little to score (fewer than ``SELF_MIN_TOKENS`` positions: a tiny store, or one
    document too short to hide a part of it)."""
    if kind not in adaptive.KINDS:
        raise InputError(f"calibration kind must be one of {', '.join(adaptive.KINDS)}, got {kind!r}")
    s = knnlm.settings
    full = knnlm.with_settings(adaptive=False, skip_above_prob=None, skip_below_entropy=None,
                               lambda_=s.lambda_ if 0 < s.lambda_ < 1 else KNNSettings.lambda_)
    rec = self_records(full, tokens=tokens, local=local, seed=seed, progress=progress)
    if len(rec) < SELF_MIN_TOKENS:
        return None
    cal = adaptive.fit(rec, kind=kind, k=s.k, temperature=s.temperature, init_lambda=full.settings.lambda_,
                       keep=keep, sharp=sharp)
    cal.metrics["source"] = "self"
    cal.metrics["content"] = knnlm.store.content()
    return cal
