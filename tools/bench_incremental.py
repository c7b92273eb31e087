"""Incremental add and remove vs rebuilding, in one process.

    python tools/bench_incremental.py [--base-chars 200000] [--queries 256] [--k 64] [--work DIR]

Part 1 (the default model, real text): a store of the first --base-chars characters of
WikiText-2 valid.txt (one document per article) with an IVF-PQ index; then

* add: a corpus of 10% of its size (WikiText-2 test.txt) with ``add_corpus``, which
  indexes the new rows incrementally (a delta index), timed end to end;
* rebuild: a fresh store of both corpora with a freshly trained index, timed end to end;
* recall@k of the ANN search (default nprobes / refine factor) against exact search,
  for the incremental store and the rebuilt one, with queries from held-out text
  (Tiny Shakespeare valid.txt keys, so neither corpus contains them);
* remove: ``remove_corpus`` of the added corpus, timed; recall again, and a check that no
  removed row comes back.

Part 2 (random keys, the real tokenizer and catalog): a store of the ten Gutenberg books
(~1.3M pairs) plus a small corpus; ``remove_corpus`` of the 1.3M-pair corpus, timed.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from benchlib import DATA, RandomKeys, held_out_queries, timed
from benchlib import recall as id_recall

from knnstore import Encoder, IngestSettings, SourceOptions, Store
from knnstore.config import KNNSettings

SPLIT = SourceOptions(split_on_heading=True)


def recall(store: Store, queries: np.ndarray, k: int) -> float:
    """recall@k of the store's ANN search (default settings) against exact search."""
    s = KNNSettings()
    truth = store.search(queries, k, exact=True).pair_ids
    return id_recall(store.search(queries, k, nprobes=s.nprobes, refine_factor=s.refine_factor).pair_ids, truth)


def part1(enc: Encoder, work: Path, base_chars: int, n_queries: int, k: int) -> None:
    texts = work / "texts"
    texts.mkdir()
    valid = (DATA / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:base_chars]
    (texts / "base.txt").write_text(valid[:valid.rindex("\n = ")], encoding="utf-8")
    test = (DATA / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:base_chars // 10]
    (texts / "add.txt").write_text(test[:test.rindex("\n")], encoding="utf-8")
    inc = Store.create(work / "incremental", encoder=enc)
    queries = held_out_queries(inc, DATA / "tinyshakespeare" / "valid.txt", n_queries)
    t_base, _ = timed(lambda: inc.add_corpus("base", [texts / "base.txt"], options=SPLIT, index=False))
    t_train, _ = timed(inc.create_index)
    base_pairs = inc.stats().pairs
    print(f"base store: {base_pairs:,} pairs; ingest {t_base:.1f} s, index training {t_train:.1f} s")
    t_add, info = timed(lambda: inc.add_corpus("added", [texts / "add.txt"], options=SPLIT))
    plan = inc.index_plan()
    print(f"add a corpus of {info.pairs:,} pairs ({100 * info.pairs / base_pairs:.1f}% of the store), "
          f"indexed incrementally: {t_add:.1f} s; afterwards {plan.indexed_rows:,} rows indexed, "
          f"{plan.unindexed_rows:,} not")

    fresh = Store.create(work / "rebuilt", encoder=enc)

    def rebuild():
        fresh.add_corpus("base", [texts / "base.txt"], options=SPLIT, index=False)
        fresh.add_corpus("added", [texts / "add.txt"], options=SPLIT, index=False)
        fresh.create_index()

    t_rebuild, _ = timed(rebuild)
    print(f"rebuild the store with both corpora and a fresh index: {t_rebuild:.1f} s")
    print(f"  add ÷ rebuild = {t_add / t_rebuild:.3f}   (target <= 0.15)")
    r_inc, r_fresh = recall(inc, queries, k), recall(fresh, queries, k)
    print(f"recall@{k} (nprobes {KNNSettings.nprobes}, refine factor as the index type needs) vs exact, "
          f"{len(queries)} held-out queries: incremental {r_inc:.3f}, rebuilt {r_fresh:.3f}")
    added_id = inc.corpus("added").id
    t_remove, _ = timed(lambda: inc.remove_corpus("added"))
    found = inc.search(queries, k, nprobes=KNNSettings.nprobes, refine_factor=KNNSettings.refine_factor)
    print(f"remove the added corpus ({info.pairs:,} pairs): {t_remove:.2f} s; recall@{k} after: "
          f"{recall(inc, queries, k):.3f}; removed rows returned: {int((found.corpus_ids == added_id).sum())}")


def part2(work: Path) -> None:
    fake = RandomKeys.default()
    store = Store.create(work / "random", encoder=fake)
    t_build, info = timed(lambda: store.add_corpus("gutenberg", [DATA / "gutenberg" / "docs"],
                                                   settings=IngestSettings(batch_size=32), index=False))
    store.add_corpus("small", [DATA / "tinyshakespeare" / "valid.txt"], index=False)
    t_remove, _ = timed(lambda: store.remove_corpus("gutenberg"))
    left = store.table.count()
    print(f"random-key store: {info.pairs:,} + {left:,} pairs (built in {t_build:.0f} s); "
          f"remove the {info.pairs:,}-pair corpus: {t_remove:.2f} s (target < 5 s for 1M); {left:,} rows left")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-chars", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--work", type=Path, help="Scratch directory (default: a temporary one).")
    parser.add_argument("--skip-part1", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="knnstore-bench-", dir=args.work))
    try:
        if not args.skip_part1:
            part1(Encoder.load("smollm2-135m"), work, args.base_chars, args.queries, args.k)
        part2(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
