"""Decode-time cost of the store, in one process.

    python tools/bench_decode.py STORE [--text FILE] [--tokens 4000] [--prompts 8] [--new-tokens 48]

Perplexity: ``evaluate`` on the same tokens with full retrieval, skip-above-prob
thresholds and the adaptive default (the store's calibration, made on its own text where
it has none) with exact search, then full retrieval and adaptive with the ANN index if the
store has one. Each row gives perplexity, the fraction of positions that searched the
store and kNN-LM tokens/s ÷ base LM tokens/s of the same pass. With a policy, eval searches
every position (the fixed-λ kNN-LM is reported beside it), so its throughput is not what
skipping saves; generation is:

Generation: greedy continuations of ``--prompts`` prompts (32 tokens each, evenly spaced in
the text), ``--new-tokens`` each, with the plain LM (λ = 0, no search), the fixed-λ kNN-LM
(every step searches), the adaptive kNN-LM without reading and the default (adaptive,
reading the passages a prompt names: docs/adapter.md), each run twice (the better kept);
generated tokens/s and its ratio to the plain LM's, the fraction of steps that searched and
of prompts that read a passage. ``--generation-only`` skips the perplexity part.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from knnstore.adapter import KNNLM
from knnstore.config import DEFAULT_READ

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--text", default=str(DEFAULT_TEXT))
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--generation-only", action="store_true", help="Only the generation part.")
    args = parser.parse_args()
    lm = KNNLM.from_store(args.store, adaptive=False)  # each setting below says what it adds
    text = Path(args.text).read_text(encoding="utf-8")
    if args.generation_only:
        generation(lm.with_settings(exact=not lm.store.table.has_vector_index()), text, args.prompts, args.new_tokens)
        return
    runs = [("exact, always retrieve", {"exact": True})]
    runs += [(f"exact, skip at LM top p >= {p:g}", {"exact": True, "skip_above_prob": p}) for p in (0.9, 0.5)]
    runs.append(("exact, adaptive (default)", {"exact": True, "adaptive": True}))
    ann = lm.store.table.has_vector_index()
    if ann:
        runs.append(("ANN, always retrieve", {"exact": False}))
        runs.append(("ANN, adaptive (default)", {"exact": False, "adaptive": True}))
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
    print(f"policy behind adaptive: {lm.with_settings(adaptive=True).resolve_policy().describe()}")
    generation(lm.with_settings(exact=not ann), text, args.prompts, args.new_tokens)


def generation(lm: KNNLM, text: str, prompts: int, new_tokens: int) -> None:
    ids = lm.encoder.tokenize(text)
    starts = [i * (len(ids) - 32) // prompts for i in range(prompts)]
    texts = [lm.tokenizer.decode(ids[s:s + 32]) for s in starts]
    runs = (("plain LM (λ=0, no search)", {"lambda_": 0.0}), ("fixed λ=0.15, every step searches", {"lambda_": 0.15}),
            ("adaptive, no reading", {"adaptive": True, "read": 0}),
            ("adaptive + reading (default)", {"adaptive": True, "read": DEFAULT_READ}))
    search = "exact" if lm.settings.exact else "ANN"
    print(f"\ngeneration: {prompts} prompts x {new_tokens} new tokens, greedy, {search} search")
    print(f"{'run':36} {'tok/s':>8} {'÷ plain':>8} {'searched':>9} {'read':>6}")
    plain = None
    for name, settings in runs:
        variant = lm.with_settings(**settings)
        variant.resolve_policy()  # a self-calibration, if one is needed, is not timed
        best, searched, read = 0.0, 0.0, 0
        for _ in range(2):
            t0, made, found, read = time.perf_counter(), 0, 0.0, 0
            for prompt in texts:
                g = variant.generate(prompt, max_new_tokens=new_tokens)
                made += len(g.token_ids)
                found += g.retrieved_fraction * len(g.token_ids)
                read += bool(g.read)
            best = max(best, made / (time.perf_counter() - t0))
            searched = found / max(1, made)
        plain = plain or best
        print(f"{name:36} {best:8.1f} {best / plain:8.3f} {100 * searched:8.1f}% {read:>3}/{len(texts)}", flush=True)


if __name__ == "__main__":
    main()
