"""A store on local disk vs the same store on an S3-compatible server, in one run.

    python tools/bench_remote.py [--tokens 12000] [--tiny-tokens 200000] [--queries 1024]

The S3 server is moto's server mode on 127.0.0.1 (the one the tests start,
``tests/servers.py``), so the ratios show what knnstore and Lance pay for talking to an
object store through HTTP on this machine, not the latency of a real S3 region (moto is a
Python server: real S3 is further away but serves in parallel). Both stores use an SQLite
catalog on local disk, so only where the pairs table lives differs.

For each model (the default SmolLM2-135M on --tokens tokens of WikiText-2 valid, where
encoding dominates; a tiny random-weight Llama on --tiny-tokens tokens, where writing
dominates): ingest tokens/s, then batched search queries/s (--queries stored keys as
queries, k=16: the exact search streaming every key, and, after ``index``, the IVF-RQ
search, first call and warm). Best of --repeats; prints each S3 figure's ratio to local.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchlib import DATA, write_articles

from knnstore import Encoder, IngestSettings, Store

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.servers, tests.conftest


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(store: Store, docs: Path, queries: int, index: bool) -> dict[str, float]:
    figures = {}
    seconds = timed(lambda: store.add_corpus("c", [docs], settings=IngestSettings(), index=False))
    figures["ingest tokens/s"] = store.corpus("c").tokens / seconds
    keys = store.table.columns(["vector"]).column("vector")
    rng = np.random.default_rng(0)
    pick = rng.choice(len(keys), size=min(queries, len(keys)), replace=False)
    q = np.stack(keys.take(pick).to_numpy(zero_copy_only=False)).astype(np.float32)
    figures["exact search q/s"] = len(q) / timed(lambda: store.search(q, k=16, exact=True))
    if index:
        figures["index build s"] = timed(store.create_index)
        figures["ANN search q/s, first"] = len(q) / timed(lambda: store.search(q, k=16))
        figures["ANN search q/s, warm"] = len(q) / min(timed(lambda: store.search(q, k=16)) for _ in range(3))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=str(DATA / "wikitext-2" / "valid.txt"))
    parser.add_argument("--tokens", type=int, default=12000)
    parser.add_argument("--tiny-tokens", type=int, default=200000)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    from tests.conftest import make_tiny_model
    from tests.servers import start_s3

    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    servers = start_s3()
    s3 = next(servers)
    os.environ.update(s3.env)
    try:
        tiny = make_tiny_model(work / "tiny")
        for label, model, tokens, index in (("default model", "smollm2-135m", args.tokens, False),
                                            ("tiny model", str(tiny), args.tiny_tokens, True)):
            encoder = Encoder.load(model, device="cpu")
            docs = work / f"docs-{label.split()[0]}"
            n = write_articles(Path(args.text), docs, encoder.tokenize, tokens)
            best: dict[str, dict[str, float]] = {"local": {}, "s3": {}}
            for r in range(args.repeats):
                for where in ("local", "s3"):
                    if where == "local":
                        store = Store.create(work / f"{label}-{r}", encoder=encoder, device="cpu")
                    else:
                        store = Store.create(s3.uri(f"{label.split()[0]}-{r}"), encoder=encoder, device="cpu",
                                             catalog_url=f"sqlite:///{work / f'{label}-{r}-catalog.db'}")
                    for name, value in measure(store, docs, args.queries, index).items():
                        keep = min if name.endswith(" s") else max
                        best[where][name] = keep(best[where].get(name, value), value)
                    store.close()
            print(f"{label}: {n:,} tokens, {args.queries} queries, k=16")
            for name, local in best["local"].items():
                remote = best["s3"][name]
                print(f"  {name:24} local {local:10,.1f}   S3 {remote:10,.1f}   S3/local {remote / local:.2f}x",
                      flush=True)
    finally:
        servers.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
