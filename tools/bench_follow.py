"""Pointer following in eval, on every store/test pair of docs/domains.md (issue 33).

    python tools/bench_follow.py [--cache /work/knnstore-cache] [--tokens 4000]

For each store tools/domains.py builds (in its cache) and each domain's test text, the
default kNN-LM (adaptive, the store's own calibration) scores the first ``--tokens`` tokens
twice in one process: searching at every position that retrieves (``--no-follow``) and
following the store (the default). Prints both perplexities, the change, and the share of
retrieving positions scored from followed pairs: the searches a decoding saves. Cells are
written to ``--out`` (JSON lines) as they finish and skipped when run again (resumable).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from domains import DOMAINS, LABELS, MIXED, OUTSIDE, prepare_texts

from knnstore.adapter import KNNLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="/work/knnstore-cache", help="tools/domains.py's cache (its stores)")
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--out", default=None, help="JSON lines of finished cells [default: CACHE/follow.jsonl]")
    args = parser.parse_args()
    cache = Path(args.cache)
    out = Path(args.out) if args.out else cache / "follow.jsonl"
    texts = prepare_texts(cache)["test"]
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            cell = json.loads(line)
            done[(cell["store"], cell["text"], cell["tokens"])] = cell
    stores = [d for d in (*DOMAINS, OUTSIDE, *MIXED) if (cache / f"domain-{d}").exists()]
    print(f"{'store':18} {'text':12} {'ppl searching':>13} {'ppl following':>13} {'change':>8} {'followed':>9}")
    changes, saved = [], []
    for store in stores:
        lm = None
        for text in (*DOMAINS, OUTSIDE):
            key = (store, text, args.tokens)
            if key not in done:
                if lm is None:
                    lm = KNNLM.from_store(cache / f"domain-{store}")
                    lm.resolve_policy()
                source = Path(texts[text]).read_text(encoding="utf-8")
                t0 = time.perf_counter()
                searching = lm.with_settings(follow=False).evaluate(source, max_tokens=args.tokens)
                following = lm.with_settings(follow=True).evaluate(source, max_tokens=args.tokens)
                done[key] = {"store": store, "text": text, "tokens": args.tokens,
                             "searching": searching.knn_ppl, "following": following.knn_ppl,
                             "retrieved": following.retrieved_fraction,
                             "followed": following.followed_fraction, "seconds": time.perf_counter() - t0}
                with out.open("a") as f:
                    f.write(json.dumps(done[key]) + "\n")
            cell = done[key]
            change = 100 * (cell["following"] / cell["searching"] - 1)
            changes.append(change)
            saved.append(cell["followed"])
            print(f"{LABELS.get(store, store):18} {text:12} {cell['searching']:13.3f} {cell['following']:13.3f} "
                  f"{change:+7.2f}% {100 * cell['followed']:8.1f}%", flush=True)
    if changes:
        print(f"worst change {max(changes):+.2f}%, followed {100 * min(saved):.1f}%-{100 * max(saved):.1f}% "
              f"(mean {100 * sum(saved) / len(saved):.1f}%) of the retrieving positions")


if __name__ == "__main__":
    main()
