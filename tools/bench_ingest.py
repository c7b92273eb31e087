"""Ingest throughput vs the same model's plain forward throughput, on the same text.

    python tools/bench_ingest.py [--tokens 12000] [--repeats 2] [--model smollm2-135m] [--device cpu]

Both sides run in one process, alternated, best of --repeats each, so a shared and noisy
machine affects both alike. "forward" is model(input_ids) with the LM head over the text
in non-overlapping windows of --window tokens, batched as ingest batches; "ingest" is
Store.add_corpus into a fresh store (reading, tokenising, overlapping windows, keys, LanceDB
commits, catalog). Prints tokens/s of each, their ratio, and peak RSS.
"""

from __future__ import annotations

import argparse
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from knnstore import Encoder, IngestSettings, SourceOptions, Store
from knnstore.ingest import iter_documents

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def forward_tokens_per_s(enc: Encoder, docs: list[list[int]], window: int, batch_size: int) -> float:
    chunks = [d[i: i + window] for d in docs for i in range(0, len(d), window)]
    chunks.sort(key=len, reverse=True)
    n = sum(len(c) for c in chunks)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(chunks), batch_size):
            batch = chunks[i: i + batch_size]
            width = len(batch[0])
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, c in enumerate(batch):
                ids[r, : len(c)] = torch.tensor(c)
                mask[r, : len(c)] = 1
            enc.model(input_ids=ids.to(enc.device), attention_mask=mask.to(enc.device), use_cache=False)
    if enc.device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=str(DATA / "wikitext-2" / "valid.txt"))
    parser.add_argument("--tokens", type=int, default=12000, help="about this many tokens of whole articles")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu", help="where the model runs (auto, cpu, cuda, ...)")
    args = parser.parse_args()
    settings = IngestSettings.resolve()

    enc = Encoder.load(args.model, device=args.device)
    work = Path(tempfile.mkdtemp(prefix="knnstore-bench-"))
    try:
        # Whole articles up to --tokens, written as one file per article.
        src = work / "docs"
        src.mkdir()
        docs, total = [], 0
        for doc in iter_documents([args.text], SourceOptions(split_on_heading=True)):
            tokens = enc.tokenize(doc.text)
            (src / f"{doc.ordinal:04}.txt").write_text(doc.text)
            docs.append(tokens)
            total += len(tokens)
            if total >= args.tokens:
                break
        print(f"text: {len(docs)} articles of {args.text}, {total:,} tokens; window {settings.window}, "
              f"stride {settings.stride}, batch {settings.batch_size}; device {enc.device} {enc.compute_dtype}; "
              f"torch threads {torch.get_num_threads()}; "
              f"{platform.processor() or platform.machine()}")
        fwd, ing = [], []
        for r in range(args.repeats):
            fwd.append(forward_tokens_per_s(enc, docs, settings.window, settings.batch_size))
            store = Store.create(work / f"store{r}", encoder=enc, device=args.device)
            start = time.perf_counter()
            info = store.add_corpus("bench", [src], settings=settings)
            ing.append(info.tokens / (time.perf_counter() - start))
            store.close()
            print(f"  run {r + 1}: forward {fwd[-1]:,.0f} tok/s, ingest {ing[-1]:,.0f} tok/s")
        best_f, best_i = max(fwd), max(ing)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"forward-only  {best_f:,.0f} tokens/s (best of {args.repeats})")
        print(f"ingest        {best_i:,.0f} tokens/s (best of {args.repeats})")
        print(f"ratio ingest / forward = {best_i / best_f:.2f}  "
              f"(windows overlap by {settings.window - settings.stride} tokens: "
              f"{settings.window / settings.stride:.2f}x the forward work at most)")
        print(f"peak RSS {peak:,.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
