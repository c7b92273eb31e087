"""Decode-time cost of the store: kNN-LM eval throughput ÷ base LM, with and without
adaptive retrieval, with the perplexity of each, in one process.

    python tools/bench_decode.py STORE [--text FILE] [--tokens 4000]

Runs ``evaluate`` on the same tokens with: full retrieval, skip-above-prob thresholds and
``--adaptive`` (the store's calibration if it has one, else the rule) with exact search,
then full retrieval and ``--adaptive`` with the ANN index if the store has one. Each row gives perplexity, the fraction of
positions that searched the store and kNN-LM tokens/s ÷ base LM tokens/s of the same pass
(the base pass is the forward pass the kNN-LM needs anyway, so the ratio is the price of
retrieval).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from knnstore.adapter import KNNLM

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--text", default=str(DEFAULT_TEXT))
    parser.add_argument("--tokens", type=int, default=4000)
    args = parser.parse_args()
    lm = KNNLM.from_store(args.store, adaptive=False)  # each setting below says what it adds
    text = Path(args.text).read_text(encoding="utf-8")
    runs = [("exact, always retrieve", {"exact": True})]
    runs += [(f"exact, skip at LM top p >= {p:g}", {"exact": True, "skip_above_prob": p}) for p in (0.9, 0.5)]
    runs.append(("exact, --adaptive", {"exact": True, "adaptive": True}))
    if lm.store.table.has_vector_index():
        runs.append(("ANN, always retrieve", {"exact": False}))
        runs.append(("ANN, --adaptive", {"exact": False, "adaptive": True}))
    print(f"store {args.store}: {lm.store.stats().pairs:,} pairs; {args.tokens:,} tokens of {Path(args.text).name}")
    print(f"{'run':36} {'ppl':>8} {'vs full':>8} {'retrieved':>9} {'kNN-LM/base tok/s':>18}")
    full = None
    for name, settings in runs:
        r = lm.with_settings(**settings).evaluate(text, max_tokens=args.tokens)
        full = full or r.knn_ppl  # "vs full": vs exact search, always retrieving
        print(f"{name:36} {r.knn_ppl:8.3f} {100 * (r.knn_ppl / full - 1):+7.2f}% {100 * r.retrieved_fraction:8.1f}% "
              f"{r.speed_ratio:10.3f} ({r.knn_tokens_per_s:.0f}/{r.base_tokens_per_s:.0f})", flush=True)
        if name == runs[0][0]:
            print(f"{'base LM':36} {r.base_ppl:8.3f}")
    print(f"policy behind --adaptive: {lm.with_settings(adaptive=True).policy.describe()}")


if __name__ == "__main__":
    main()
