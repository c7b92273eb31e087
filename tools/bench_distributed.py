"""Ingest throughput: one process vs Ray workers (``add-corpus --workers N``), in one run.

    python tools/bench_distributed.py [--tokens 12000] [--tiny-tokens 200000] [--workers 1,2]

Two models, each on the same documents for every setting, alternated, best of --repeats:

* the default model (SmolLM2-135M) on --tokens tokens of WikiText-2 valid articles: what a
  user's ingest costs, where encoding dominates;
* a tiny random-weight Llama (2 layers, dim 32, built from a config) on --tiny-tokens tokens:
  encoding is nearly free, so what is left is the orchestration (starting Ray, the actors,
  moving documents, writing fragments) and the commit.

Each setting ingests into a fresh store (Ray runtime started and shut down inside the
timing, as `knnstore add-corpus --workers` does). Prints tokens/s and each Ray setting's
ratio to one process.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchlib import DATA, write_articles

from knnstore import Encoder, IngestSettings, Store

def run(label: str, model: str, docs: Path, tokens: int, workers: list[int], repeats: int,
        work: Path, settings: IngestSettings) -> None:
    encoder = Encoder.load(model, device="cpu")
    best: dict[str, float] = {}
    for r in range(repeats):
        for setting in [None, *workers]:
            name = "one process" if setting is None else f"--workers {setting}"
            path = work / f"{label}-{r}-{setting}"
            store = Store.create(path, encoder=encoder, device="cpu")
            t = time.perf_counter()
            store.add_corpus("c", [docs], settings=settings, index=False, workers=setting)
            rate = store.corpus("c").tokens / (time.perf_counter() - t)
            store.close()
            shutil.rmtree(path)
            best[name] = max(best.get(name, 0.0), rate)
            print(f"  {label} round {r + 1}: {name:12} {rate:10,.0f} tokens/s", flush=True)
    print(f"{label}: {tokens:,} tokens")
    for name, rate in best.items():
        print(f"  {name:12} {rate:10,.0f} tokens/s   {rate / best['one process']:.2f}x one process")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=str(DATA / "wikitext-2" / "valid.txt"))
    parser.add_argument("--tokens", type=int, default=12000)
    parser.add_argument("--tiny-tokens", type=int, default=200000)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.conftest import make_tiny_model

        tiny = make_tiny_model(work / "tiny")
        for label, model, tokens in (("default model", "smollm2-135m", args.tokens),
                                     ("tiny model", str(tiny), args.tiny_tokens)):
            tokenize = Encoder.load(model, device="cpu").tokenize
            docs = work / f"docs-{label.split()[0]}"
            n = write_articles(Path(args.text), docs, tokenize, tokens)
            run(label, model, docs, n, workers, args.repeats, work, IngestSettings())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
