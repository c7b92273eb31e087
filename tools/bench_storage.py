"""Bytes on disk per stored pair: float16 vs float32 keys, with and without an ANN index.

    python tools/bench_storage.py [--store STORE ...] [--pairs-text FILE] [--max-chars N]

Builds two scratch stores from the same text (default: the first 2,000,000 characters of
the Gutenberg training books, ~500k pairs) with the default model's tokenizer and random
keys (bytes do not depend on the keys' values, and encoding would take ~20 minutes), one
float16 and one float32, and reports bytes per pair for the LanceDB table, the catalog, and
both after training the default index (IVF-RQ; float16 also with IVF-PQ). Any --store
given (real stores) is reported too.
The reference is the raw key: dim x 2 bytes in float16 (1,152 bytes for SmolLM2's 576).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from benchlib import DATA, RandomKeys

from knnstore import IngestSettings, Store
from knnstore.config import CATALOG_FILE


def report(label: str, store: Store) -> None:
    pairs = store.stats().pairs
    table = store.table.nbytes()
    cat = sum(p.stat().st_size for p in store.path.glob(CATALOG_FILE + "*"))
    raw = store.identity.dim * 2
    index = store.stats().index
    kind = ", ".join(i.type for i in index.indices) or "no index"
    print(f"{label:34} {pairs:>9,} pairs  {kind:14} table {table / pairs:7.1f} B/pair  "
          f"catalog {cat / pairs:5.1f} B/pair  total {(table + cat) / pairs:7.1f} B/pair "
          f"= {(table + cat) / pairs / raw:.2f}x raw fp16 key")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", nargs="*", default=[])
    parser.add_argument("--max-chars", type=int, default=2_000_000)
    args = parser.parse_args()
    for path in args.store:
        report(f"{path}", Store.open(path))
    fake = RandomKeys.default()
    work = Path(tempfile.mkdtemp(prefix="knnstore-storage-"))
    try:
        text = work / "text.txt"
        text.write_text((DATA / "gutenberg" / "train.txt").read_text(encoding="utf-8")[:args.max_chars],
                        encoding="utf-8")
        for dtype in ("float16", "float32"):
            store = Store.create(work / dtype, encoder=fake, dtype=dtype)
            store.add_corpus("text", [text], settings=IngestSettings(batch_size=32), index=False)
            store.table.cleanup()
            report(f"{dtype}", store)
            for index_type in ("ivf_rq", "ivf_pq") if dtype == "float16" else ("ivf_rq",):
                store.create_index(index_type=index_type)
                store.table.cleanup()  # the replaced index's files go too
                report(f"{dtype} + {index_type.upper().replace('_', '-')} (default params)", store)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
