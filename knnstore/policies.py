"""The adaptive policy's life cycle, in one place: find the store's calibration made for an
adapter's k and T, check that it still fits what the store holds, calibrate on the
store's own text where none does (saved where this process may write), or fall back to
the cautious rule; and, for a long-lived adapter (the server), tell when to work it out
again.

Working a policy out can score 16k tokens and write to the catalog, so it is a call, never
a property read: ``KNNLM.resolve_policy`` (which every entry point of the adapter calls
first: generate, explain, evaluate, a decoding step) and the server's ``Watch``.

    >>> found = resolve(lm, calibrate=False)       # doctest: +SKIP
    >>> found.policy.describe(), found.note        # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from . import adaptive
from .config import ProgressFn
from .errors import InputError, KnnstoreError
from .evaluate import SELF_MIN_TOKENS, SELF_SOURCE, SELF_TOKENS, Scorer, self_calibrate
from .evaluate import calibrate as fit_on_text
from .writer import Writer

TEXT_TOKENS = 20000  # tokens of held-out text a calibration fits on, unless told


class Adapter(Scorer, Protocol):
    """What a policy's life cycle needs of an adapter (``adapter.KNNLM`` is one): a ``Scorer``
    that can be told to work its policy out again."""

    def forget_policy(self) -> None: ...


@dataclass(frozen=True)
class Resolved:
    """The policy an adapter uses, and why, where that is not the obvious (None)."""

    policy: adaptive.Policy
    note: str | None = None


def fitting(lm: Adapter) -> adaptive.Calibration | None:
    """The store's newest calibration made at the adapter's k and T (``Calibration.made_for``),
    unless it was made on other content than the store holds now (``Calibration.stale_for``)."""
    s = lm.settings
    made = [cal for cal in lm.store.calibrations() if cal.made_for(s.k, s.temperature)]
    return None if not made or made[0].stale_for(lm.store.content()) else made[0]


def resolve(lm: Adapter, *, calibrate: bool = True, progress: ProgressFn | None = None) -> Resolved:
    """The adapter's policy: the calibration that ``fitting`` finds; where there is none, a
    self-calibration made now (``calibrate``: else the cautious rule, ``adaptive.FALLBACK``,
    as where the store is too small for one)."""
    found = fitting(lm)
    if found is not None:
        return Resolved(found)
    s = lm.settings
    if not calibrate:
        return Resolved(adaptive.FALLBACK, f"no calibration of this store fits k={s.k}, T={s.temperature:g} (and "
                                           f"this adapter never calibrates): adaptive λ uses the cautious rule; "
                                           f"`knnstore calibrate` makes one")
    return calibrate_self(lm, progress)


def calibrate_self(lm: Adapter, progress: ProgressFn | None = None) -> Resolved:
    """Calibrate on the store's own text (``evaluate.self_calibrate``) and save the fit where
    this process may write (else it serves this adapter only); the cautious rule where the
    store is too small."""
    cal = self_calibrate(lm, progress=progress)
    if cal is None:
        return Resolved(adaptive.FALLBACK, f"the store holds too little text to calibrate on itself "
                                           f"({SELF_MIN_TOKENS:,} positions needed): adaptive λ uses the "
                                           f"cautious rule")
    try:
        Writer(lm.store).save_calibration(cal, text_source=SELF_SOURCE, n_tokens=cal.tokens)
    except KnnstoreError as exc:  # read-only, or another process writing: used, not saved
        return Resolved(cal, f"calibrated on the store's own text (not saved: {exc})")
    return Resolved(cal, "calibrated on the store's own text (saved in the store)")


def calibrate(lm: Adapter, text: str | None = None, *, source: str | None = None, kind: str = "logistic",
              keep: float = 0.9, max_tokens: int | None = None,
              progress: ProgressFn | None = None) -> tuple[int, adaptive.Calibration]:
    """``knnstore calibrate``: fit the adaptive-λ map on held-out ``text`` of the store's
    domain (its first ``max_tokens``, default ``TEXT_TOKENS``; ``source`` names it in the
    catalog), or without text on the store's own text (``max_tokens`` positions, default
    ``SELF_TOKENS``), and save it. Returns its id in the catalog and the calibration;
    refuses, before anything is saved, a store with no pairs or too little text of its own."""
    if not lm.store.searchable:
        raise InputError("the store has no pairs: add a corpus before calibrating")
    if text is not None:
        cal = fit_on_text(lm, text, kind=kind, max_tokens=max_tokens or TEXT_TOKENS, keep=keep, progress=progress)
        source = source or "(text)"
    else:
        cal = self_calibrate(lm, kind=kind, keep=keep, tokens=max_tokens or SELF_TOKENS, progress=progress)
        if cal is None:
            raise InputError(f"the store holds too little text to calibrate on itself ({SELF_MIN_TOKENS:,} "
                             f"positions outside the one being scored are needed): give held-out text with "
                             f"--text; nothing was saved")
        source = SELF_SOURCE
    return Writer(lm.store).save_calibration(cal, text_source=source, n_tokens=cal.tokens), cal


class Watch:
    """For an adapter that lives long (the server): whether the policy it worked out may no
    longer be the one to use, because the store's content or its newest calibration (made by
    `knnstore calibrate`, or another process) changed since it was last asked."""

    def __init__(self, lm: Adapter) -> None:
        self.lm = lm
        self._calibration = lm.store.newest_calibration()
        self._seen = (lm.store.content(), self._calibration)

    def look(self) -> None:
        """Read the store's newest calibration again (after the store handle was refreshed)."""
        self._calibration = self.lm.store.newest_calibration()

    def stale(self) -> bool:
        """Whether the store changed since the last call (a search may have followed it too):
        then the adapter forgets its policy, worked out again at its next step."""
        seen = (self.lm.store.content(), self._calibration)
        if seen == self._seen:
            return False
        self._seen = seen
        self.lm.forget_policy()
        return True
