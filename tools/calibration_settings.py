"""A calibration is made at one k and kNN temperature: what it does at others.

    python tools/calibration_settings.py [--store DIR] [--k 16] [--temperature 1] [--tokens 3000]

On a store of tools/domains.py (default: its WikiText-2 store, whose newest calibration is
its self-calibration at k=128, T=3), scores the first --tokens tokens of each test set
(WikiText-2, Tiny Shakespeare, Python source) at --k and --temperature, exact search, with
that calibration and with a self-calibration made at those settings (kept in memory, not
saved), beside the base model and the fixed λ=0.15 kNN-LM. Adaptive λ uses a calibration
only at its own k and T (``Calibration.made_for``): this is why.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from domains import prepare_texts  # noqa: E402

from knnstore import Store  # noqa: E402
from knnstore.adapter import KNNLM  # noqa: E402
from knnstore.evaluate import self_calibrate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=str(REPO.parent / "knnstore-cache"))
    parser.add_argument("--store", default=None, help="A store (default: the cache's domain-wiki).")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--tokens", type=int, default=3000)
    args = parser.parse_args()
    cache = Path(args.cache)
    paths = prepare_texts(cache)
    store = Store.open(args.store or cache / "domain-wiki")
    saved = store.calibration()
    if saved is None:
        sys.exit("the store has no calibration: run tools/domains.py (or knnstore calibrate) first")
    lm = KNNLM.from_store(store, k=args.k, temperature=args.temperature, exact=True)
    t0 = time.perf_counter()
    own = self_calibrate(lm)
    print(f"the store's calibration: {saved.describe()}")
    print(f"made now in {time.perf_counter() - t0:.0f} s: {own.describe()}\n")
    print(f"| test ({args.tokens:,} tokens, k={args.k}, T={args.temperature:g}) | base | fixed λ=0.15 "
          f"| calibration at k={saved.k}, T={saved.temperature:g} | calibration at k={args.k}, T={args.temperature:g} |")
    print("|---|---|---|---|---|")
    for domain in ("wiki", "shakespeare", "python"):
        text = paths["test"][domain].read_text()
        other = lm.with_policy(saved).evaluate(text, max_tokens=args.tokens)
        made = lm.with_policy(own).evaluate(text, max_tokens=args.tokens)
        rel = lambda ppl: f"{ppl:.2f} ({ppl / other.base_ppl - 1:+.1%})"  # noqa: E731
        print(f"| {domain} | {other.base_ppl:.2f} | {rel(other.fixed_knn_ppl)} | {rel(other.knn_ppl)} | "
              f"{rel(made.knn_ppl)} |", flush=True)


if __name__ == "__main__":
    main()
