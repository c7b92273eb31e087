"""Load test of `knnstore serve` on loopback, against the adapter in process.

    python tools/bench_serve.py STORE [--clients 8] [--requests 20] [--max-tokens 32]

STORE is a store of the default model (e.g. /work/cache/wiki-valid or the README demo's).
In one run:

1. in process: ``KNNLM.generate`` (greedy, --max-tokens) over the benchmark's prompts,
   one after another: tokens/s, measured before and after the server runs (the mean);
2. ``knnstore serve STORE`` started as its own process on 127.0.0.1, then, through the
   official ``openai`` client, one client sending the same prompts one after another, and
   --clients concurrent clients sending --requests each (greedy, --max-tokens): errors,
   latency p50/p95 per request, and tokens/s (completion tokens ÷ wall time).

Prints the ratios the issue asks for: server tokens/s with one client ÷ in-process
tokens/s (goal >= 0.8) and aggregate tokens/s with --clients clients ÷ one client (goal > 1).
Prompts are the first words of WikiText-2 test lines, each different.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import WIKI_TEST

BIN = Path(sys.executable).parent / "knnstore"


def prompts(n: int) -> list[str]:
    lines = [ln.strip() for ln in WIKI_TEST.read_text(encoding="utf-8").splitlines()
             if len(ln.split()) > 20 and not ln.strip().startswith("=")]
    return [" ".join(ln.split()[:12]) for ln in lines[:n]]


def in_process(lm, texts: list[str], max_tokens: int) -> tuple[float, int]:
    t0, tokens = time.perf_counter(), 0
    for p in texts:
        tokens += len(lm.generate(p, max_new_tokens=max_tokens).token_ids)
    return tokens / (time.perf_counter() - t0), tokens


def run_clients(base: str, model: str, batches: list[list[str]], max_tokens: int) -> dict:
    import openai

    def client(texts: list[str]) -> list[tuple[float, int, str | None]]:
        c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
        out = []
        for p in texts:
            t = time.perf_counter()
            try:
                r = c.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0)
                out.append((time.perf_counter() - t, r.usage.completion_tokens, None))
            except Exception as exc:  # noqa: BLE001  (counted and shown)
                out.append((time.perf_counter() - t, 0, f"{type(exc).__name__}: {exc}"))
        return out

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(batches)) as pool:
        results = [r for rs in pool.map(client, batches) for r in rs]
    wall = time.perf_counter() - t0
    latencies = sorted(r[0] for r in results)
    errors = [r[2] for r in results if r[2]]
    return {"requests": len(results), "errors": len(errors), "first_error": errors[0] if errors else None,
            "p50": statistics.median(latencies), "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "tokens": sum(r[1] for r in results), "tokens_per_s": sum(r[1] for r in results) / wall, "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()

    from knnstore.adapter import KNNLM

    texts = prompts(args.clients * args.requests)
    single = texts[:args.requests]
    lm = KNNLM.from_store(args.store)
    in_process(lm, texts[:2], args.max_tokens)  # warm-up: index, caches
    before, _ = in_process(lm, single, args.max_tokens)

    server = subprocess.Popen([str(BIN), "serve", args.store, "--port", str(args.port), "--max-batch",
                               str(args.clients)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{args.port}"
    try:
        import httpx

        deadline = time.monotonic() + 300
        while True:
            try:
                model = httpx.get(base + "/v1/models", timeout=5).json()["data"][0]["id"]
                break
            except (httpx.HTTPError, KeyError):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: {server.stderr.read()[-2000:]}")
                time.sleep(0.5)
        run_clients(base, model, [texts[:2]], args.max_tokens)  # warm-up
        one = run_clients(base, model, [single], args.max_tokens)
        many = run_clients(base, model, [texts[i * args.requests:(i + 1) * args.requests]
                                         for i in range(args.clients)], args.max_tokens)
    finally:
        server.terminate()
        server.wait(timeout=60)
    after, _ = in_process(lm, single, args.max_tokens)
    local = (before + after) / 2

    print(f"store {args.store}, model {model}, greedy, {args.max_tokens} tokens per request, "
          f"search settings: the server's defaults")
    print(f"in process (KNNLM.generate, one after another): {local:,.1f} tokens/s "
          f"(before {before:,.1f}, after {after:,.1f})")
    for label, r in (("1 client", one), (f"{args.clients} clients", many)):
        print(f"server, {label} x {r['requests'] // (1 if label == '1 client' else args.clients)} requests: "
              f"{r['requests']} requests, {r['errors']} errors, p50 {r['p50']:.2f} s, p95 {r['p95']:.2f} s, "
              f"{r['tokens']:,} tokens in {r['wall']:.1f} s = {r['tokens_per_s']:,.1f} tokens/s"
              + (f" (first error: {r['first_error']})" if r["errors"] else ""))
    print(f"ratio server (1 client) / in process: {one['tokens_per_s'] / local:.2f} (goal >= 0.8)")
    print(f"ratio server ({args.clients} clients) / server (1 client): "
          f"{many['tokens_per_s'] / one['tokens_per_s']:.2f} (goal > 1)")


if __name__ == "__main__":
    main()
