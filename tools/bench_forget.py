"""Taking data out of a 1M-pair store vs rebuilding it without that data, in one run.

    python tools/bench_forget.py [--pairs 1000000] [--documents 200]

Builds a store of about --pairs pairs from the Gutenberg training books cut into
--documents documents, with an e-mail address planted in every tenth one, using the default
model's tokenizer and random keys (what is timed here does not depend on the keys' values;
encoding 1M tokens with the model would take ~25 minutes on this machine). Then times, each
on its own copy of the store:

* ``remove-documents`` of 10% of the documents (``ordinal % 10 = 0``), then ``purge``;
* ``forget`` of the planted address (every pair predicting a token of it), then ``purge``;
* the rebuild they replace: adding the remaining documents to a new store, with random keys
  (a lower bound: no model), and with the default model's measured ingest rate
  (``--ingest-rate`` tokens/s, docs/performance.md; extrapolated).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from benchlib import DATA, RandomKeys

from knnstore import IngestSettings, Store

EMAIL = "jane.doe@example.com"
SETTINGS = IngestSettings(batch_size=32)


def write_documents(out: Path, tokens_wanted: int, n_docs: int, tokenize) -> list[Path]:
    """``n_docs`` files of Gutenberg text, about ``tokens_wanted`` tokens together, the
    address planted mid-way in every tenth."""
    text = (DATA / "gutenberg" / "train.txt").read_text(encoding="utf-8")
    chars = int(tokens_wanted * len(text[:200_000]) / len(tokenize(text[:200_000])))
    text = text[:chars]
    size = len(text) // n_docs
    out.mkdir(parents=True)
    files = []
    for i in range(n_docs):
        chunk = text[i * size:(i + 1) * size]
        if i % 10 == 5:
            chunk = chunk[:size // 2] + f" Write to {EMAIL} today. " + chunk[size // 2:]
        path = out / f"{i:04}.txt"
        path.write_text(chunk, encoding="utf-8")
        files.append(path)
    return files


def timed(fn):
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--documents", type=int, default=200)
    parser.add_argument("--ingest-rate", type=float, default=654.0,
                        help="the default model's ingest tokens/s on this machine (docs/scale-out.md)")
    args = parser.parse_args()
    fake = RandomKeys.default()
    work = Path(tempfile.mkdtemp(prefix="bench-forget-", dir="/work/cache" if Path("/work/cache").is_dir() else None))
    try:
        files = write_documents(work / "docs", args.pairs, args.documents, fake.tokenize)
        build_s, _ = timed(lambda: _build(work / "base", fake, files))
        base = Store.open(work / "base", encoder=fake)
        print(f"store: {base.stats().pairs:,} pairs, {args.documents} documents; built with random keys "
              f"in {build_s:.1f} s (index included)", flush=True)

        rows = []
        copy = _copy(work, "remove", fake)
        s, removal = timed(lambda: copy.remove_documents("ordinal % 10 = 0"))
        p, _ = timed(copy.purge)
        rows.append((f"remove-documents, 10% ({len(removal.documents)} docs, {removal.pairs:,} pairs)", s, p,
                     sum(d["n_pairs"] for d in removal.documents)))
        keep = [f for i, f in enumerate(files) if i % 10 != 0]
        rebuild_s, _ = timed(lambda: _build(work / "rebuild", fake, keep))
        rebuilt = Store.open(work / "rebuild", encoder=fake)
        assert rebuilt.stats().pairs == copy.stats().pairs, "the rebuild must hold what the removal left"

        copy = _copy(work, "forget", fake)
        s, done = timed(lambda: copy.forget(EMAIL))
        p, _ = timed(copy.purge)
        rows.append((f"forget ({done.occurrences} occurrences, {done.pairs_removed} pairs)", s, p, done.pairs_removed))

        model_rebuild = rebuilt.stats().pairs / args.ingest_rate
        print(f"rebuild without the 10%: {rebuild_s:.1f} s with random keys (measured, a lower bound); "
              f"{model_rebuild / 60:,.0f} min with the default model at {args.ingest_rate:,.0f} tokens/s "
              "(extrapolated)")
        for label, s, p, _ in rows:
            print(f"  {label:58} {s:6.2f} s, + purge {p:6.2f} s   "
                  f"{s / rebuild_s:.4f}x / {(s + p) / rebuild_s:.4f}x the random-key rebuild")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build(path: Path, encoder, files: list[Path]) -> None:
    store = Store.create(path, encoder=encoder)
    store.add_corpus("books", [str(f) for f in files], settings=SETTINGS)  # with the index, as a user's add
    store.close()


def _copy(work: Path, name: str, encoder) -> Store:
    shutil.copytree(work / "base", work / name)
    return Store.open(work / name, encoder=encoder)


if __name__ == "__main__":
    main()
