"""SQL inspection speed: GROUP BY queries over every pair of a store of >= 1M pairs.

    python tools/bench_sql.py [--store DIR] [--repeat 3]

The store (built once, cached in DIR, default ~/.cache/knnstore/bench-sql) holds the ten
Gutenberg training books of ../shared/data/gutenberg/docs as one corpus of ten documents:
about 1.3M real tokens of the default model's tokenizer, real documents and catalog. Its
keys are random: SQL never reads them, and encoding 1.3M tokens would take ~45 minutes
on two cores. Each query runs through `Store.sql` (a new DuckDB session over the Lance
table and the catalog each call), on an open session (as the `knnstore sql` prompt keeps
one), and, side by side, as the same computation in numpy over the Lance column (a floor
without SQL); the ratio session / numpy is printed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from benchlib import DATA, RandomKeys

from knnstore import IngestSettings, Store

BOOKS = DATA / "gutenberg" / "docs"




def build(path: Path) -> Store:
    if path.exists():
        return Store.open(path)
    fake = RandomKeys.default()
    store = Store.create(path, encoder=fake)
    t = time.perf_counter()
    store.add_corpus("gutenberg", [BOOKS], settings=IngestSettings(batch_size=32))
    print(f"built {path} in {time.perf_counter() - t:.0f} s")
    return store


def timed(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path.home() / ".cache" / "knnstore" / "bench-sql")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    store = build(args.store)
    pairs = store.stats().pairs
    ds = store.table.dataset()
    doc = store.documents("gutenberg")[3]
    print(f"store: {pairs:,} pairs, {len(store.documents('gutenberg'))} documents; best of {args.repeat}")

    def col(name):
        return ds.to_table(columns=[name]).column(name).to_numpy()

    cases = [
        ("most frequent next tokens (GROUP BY next_token, with token text)",
         "SELECT next_token, next_token_text, count(*) AS n FROM pairs GROUP BY ALL ORDER BY n DESC LIMIT 10",
         lambda: np.argsort(-np.bincount(col("next_token")))[:10]),
        ("pairs per document, joined with titles",
         "SELECT d.title, count(*) AS n FROM pairs p JOIN documents d ON d.id = p.document_id GROUP BY 1 ORDER BY n DESC",
         lambda: np.unique(col("document_id"), return_counts=True)),
        ("a corpus's share of the store",
         "SELECT corpus, count(*) * 1.0 / (SELECT count(*) FROM pairs) AS share FROM pairs GROUP BY 1",
         lambda: np.unique(col("corpus_id"), return_counts=True)),
        (f"one document's pairs in order ({doc.n_pairs:,} rows, filter pushed down)",
         f"SELECT position, token_text, next_token_text FROM pairs WHERE document_id = {doc.id} ORDER BY position",
         lambda: ds.to_table(columns=["position", "token", "next_token"], filter=f"document_id = {doc.id}")),
    ]
    session = store.sql_session()  # what the prompt and a long-lived user keep open
    print(f"{'query':72} {'Store.sql':>10} {'session':>8} {'numpy':>8} {'session/numpy':>13}")
    for name, query, baseline in cases:
        t_call, _ = timed(lambda: store.sql(query), args.repeat)
        t_session, _ = timed(lambda: session.execute(query), args.repeat)
        t_np, _ = timed(baseline, args.repeat)
        print(f"{name:72} {t_call:9.3f}s {t_session:7.3f}s {t_np:7.3f}s {t_session / t_np:12.1f}x")
    t_open, _ = timed(lambda: store.sql_session().close(), args.repeat)
    print(f"Store.sql = opening a session ({t_open:.3f} s: catalog tables read into DuckDB) + the query")


if __name__ == "__main__":
    main()
