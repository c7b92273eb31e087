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

``--faster`` (issue 33) runs only this: greedy continuations (``--new-tokens`` each) of
``--prompts`` prompts of three kinds, (a) text the store holds (``--stored``), (b) held-out
text of its domain (``--text``), (c) text of another domain (``--other``), with the plain
model (transformers' ``generate``, no store), the default kNN-LM without drafting, with it
(the default), and with following too: tokens/s ÷ the plain model's, searches per token,
tokens per model call, and how many outputs equal the kNN-LM's without drafting.

    python tools/bench_decode.py STORE --faster [--prompts 8] [--new-tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from knnstore.adapter import KNNLM
from knnstore.config import DEFAULT_READ

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_TEXT = DATA / "wikitext-2" / "test.txt"
DEFAULT_STORED = DATA / "wikitext-2" / "valid.txt"  # what the WikiText-2 valid store holds
DEFAULT_OTHER = DATA / "tinyshakespeare" / "test.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--text", default=str(DEFAULT_TEXT))
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--generation-only", action="store_true", help="Only the generation part.")
    parser.add_argument("--faster", action="store_true",
                        help="Only issue 33's table: stored, held-out and other-domain prompts (--stored, --text, "
                             "--other), plain model vs searching vs following vs drafting.")
    parser.add_argument("--stored", default=str(DEFAULT_STORED), help="Text the store holds (prompts (a)).")
    parser.add_argument("--other", default=str(DEFAULT_OTHER), help="Text of another domain (prompts (c)).")
    parser.add_argument("--rounds", type=int, default=2, help="With --faster: timed rounds (the best kept).")
    args = parser.parse_args()
    if args.faster:
        lm = KNNLM.from_store(args.store)  # the defaults users get: adaptive, reading
        lm.resolve_policy()
        kinds = [(name, prompts_of(lm, Path(path).read_text(encoding="utf-8"), args.prompts))
                 for name, path in (("(a) stored", args.stored), ("(b) held-out", args.text),
                                    ("(c) other", args.other))]
        where = lambda path: f"{Path(path).parent.name}/{Path(path).name}"  # noqa: E731
        print(f"store {args.store}: {lm.store.stats().pairs:,} pairs; {args.prompts} prompts of 32 tokens each from "
              f"{where(args.stored)} (a), {where(args.text)} (b), {where(args.other)} (c)")
        faster(lm, kinds, args.new_tokens, args.rounds)
        return
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


def prompts_of(lm: KNNLM, text: str, prompts: int, length: int = 32) -> list[str]:
    """``prompts`` stretches of ``length`` tokens, evenly spaced in ``text``."""
    ids = lm.encoder.tokenize(text)
    starts = [i * (len(ids) - length) // prompts for i in range(prompts)]
    return [lm.tokenizer.decode(ids[s:s + length]) for s in starts]


def generation(lm: KNNLM, text: str, prompts: int, new_tokens: int) -> None:
    """The older table (adaptive, reading): kept for ``--generation-only`` on one text."""
    texts = prompts_of(lm, text, prompts)
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


def plain_model(lm: KNNLM, prompt: str, new_tokens: int) -> list[int]:
    """The model alone: transformers' own greedy ``generate``, no store, no reading."""
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]], device=lm.encoder.device)
    out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                            do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


FASTER = (("kNN-LM, searching (--no-draft)", {"follow": False, "draft": False}),
          ("+ drafting (the default)", {"follow": False, "draft": True}),
          ("+ following and drafting (--follow)", {"follow": True, "draft": True}))


def faster(lm: KNNLM, kinds: list[tuple[str, list[str]]], new_tokens: int, rounds: int) -> None:
    """Issue 33's table: for each kind of prompt, the plain model, the kNN-LM searching at
    every step that retrieves, + drafting (the default), + following; tokens/s ÷ the plain
    model's (best of ``rounds``, each side timed over the same prompts, interleaved),
    searches per token, tokens per model call, and how many prompts' outputs are the
    searching kNN-LM's own (drafting's must all be: it never changes greedy output;
    following changes the neighbours, so its text may differ)."""
    print(f"\ngeneration: greedy, {new_tokens} new tokens per prompt, ANN search, the adaptive default "
          f"(reading: {lm.settings.read} passages)")
    print(f"{'prompts':10} {'run':44} {'tok/s':>7} {'÷ plain':>8} {'searches/tok':>12} {'tok/call':>8} "
          f"{'same tokens':>12}")
    plain_model(lm, kinds[0][1][0], 4)  # warm: the first search imports and opens what it needs
    for _, settings in FASTER:
        lm.with_settings(**settings).generate(kinds[0][1][0], max_new_tokens=4)
    for kind, texts in kinds:
        best = {name: 0.0 for name in ["plain model", *(n for n, _ in FASTER)]}
        outputs: dict[str, list[list[int]]] = {}
        costs: dict[str, dict] = {}
        for _ in range(rounds):
            t0 = time.perf_counter()
            made = sum(len(plain_model(lm, p, new_tokens)) for p in texts)
            best["plain model"] = max(best["plain model"], made / (time.perf_counter() - t0))
            for name, settings in FASTER:
                variant = lm.with_settings(**settings)
                t0, got = time.perf_counter(), []
                for p in texts:
                    got.append(variant.generate(p, max_new_tokens=new_tokens))
                elapsed = time.perf_counter() - t0
                made = sum(len(g.token_ids) for g in got)
                best[name] = max(best[name], made / elapsed)
                outputs[name] = [g.token_ids for g in got]
                searches = sum(g.cost["searches_per_token"] * len(g.token_ids) for g in got)
                calls = sum(g.cost["model_calls"] + 1 for g in got)
                costs[name] = {"searches": searches / made, "per_call": made / calls}
        plain = best["plain model"]
        print(f"{kind:10} {'plain model (transformers generate, no store)':44} {plain:7.1f} {1.0:8.3f}", flush=True)
        reference = {FASTER[1][0]: FASTER[0][0], FASTER[2][0]: FASTER[0][0]}
        for name, _ in FASTER:
            c = costs[name]
            same = ""
            if name in reference:
                ref = outputs[reference[name]]
                same = f"{sum(a == b for a, b in zip(outputs[name], ref))}/{len(ref)}"
            print(f"{kind:10} {name:44} {best[name]:7.1f} {best[name] / plain:8.3f} {c['searches']:12.3f} "
                  f"{c['per_call']:8.2f} {same:>12}", flush=True)


if __name__ == "__main__":
    main()
