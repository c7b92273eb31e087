"""The index policy: when to train, update or retrain the ANN index. Pure (no LanceDB):
``plan`` decides from counts; ``Store.maintain_index`` carries the plan out.

* No index: train one once the table holds ``min_rows`` rows (``KNNSTORE_INDEX_MIN_ROWS``,
  default 100,000; below that an exact scan takes a few milliseconds and training would not
  pay for itself: docs/performance.md).
* An index: retrain when the table has grown to ``retrain_growth`` (``KNNSTORE_INDEX_RETRAIN_GROWTH``,
  default 2) times the rows it was trained on (the partitions no longer fit the data);
  otherwise index new rows incrementally (a delta index).

Retraining at geometric growth keeps the total training work linear in the size of the
store (amortised O(1) per added row), and adding or removing a corpus never rebuilds the
index.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ContextManager

from .config import env


@dataclass(frozen=True)
class IndexPolicy:
    min_rows: int = 100_000
    retrain_growth: float = 2.0

    @classmethod
    def from_env(cls) -> "IndexPolicy":
        """The policy with ``KNNSTORE_INDEX_MIN_ROWS`` / ``KNNSTORE_INDEX_RETRAIN_GROWTH`` applied."""
        return cls(min_rows=env("index_min_rows", int, cls.min_rows),
                   retrain_growth=env("index_retrain_growth", float, cls.retrain_growth))


@dataclass
class IndexPlan:
    """What the index policy says to do (``Store.index_plan``)."""

    action: str  # none | train | update | retrain; rebuild: a training asked for (``knnstore index --rebuild``)
    reason: str
    rows: int
    trained_rows: int | None
    indexed_rows: int
    unindexed_rows: int
    min_rows: int
    retrain_growth: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Around a build the index policy (or a user) asked for: a context manager made from the
# plan, entered while the build runs (the CLI's status line and timing).
IndexWatch = Callable[[IndexPlan], ContextManager[None]]


def plan(rows: int, has_index: bool, indexed_rows: int, unindexed_rows: int, trained_rows: int | None,
         policy: IndexPolicy) -> IndexPlan:
    """What to do with a table of ``rows`` rows (``trained_rows``: what the index was last
    trained on, None if unknown)."""
    min_rows, growth = policy.min_rows, policy.retrain_growth
    if not has_index:
        action = "train" if rows >= min_rows and rows > 0 else "none"
        reason = (f"{rows:,} rows >= {min_rows:,}" if action == "train"
                  else f"{rows:,} rows < {min_rows:,}: exact search")
    elif trained_rows and rows >= growth * trained_rows:
        action, reason = "retrain", f"{rows:,} rows >= {growth:g} x {trained_rows:,} trained on"
    elif unindexed_rows > 0:
        action, reason = "update", f"{unindexed_rows:,} rows not indexed yet"
    else:
        action, reason = "none", "every row is indexed"
    return IndexPlan(action=action, reason=reason, rows=rows, trained_rows=trained_rows,
                     indexed_rows=indexed_rows, unindexed_rows=unindexed_rows,
                     min_rows=min_rows, retrain_growth=growth)
