"""Peak memory of ingest and eval as the corpus and the store grow: is it flat?

    python tools/bench_memory.py [--chars 500000,2000000,5000000] [--doc-chars 20000]
                                 [--store S ...] [--tokens 2000]

Every measurement is a fresh child process. After it has loaded the model it resets the
kernel's high-water mark of its resident memory (/proc/self/clear_refs), does the work, and
reports that phase's peak RSS next to the RSS it started from, so the model's load (float32
weights and transformers' GGUF dequantisation buffers, ~1.3 GiB) does not hide the
work's own memory.

* ingest: `Store.add_corpus` of the first N characters of the Gutenberg training books, cut
  into documents of about --doc-chars characters (after a blank line), into a fresh float16
  store, with the default model's tokenizer and random keys (RandomKeys); then the largest
  N as one single document (the tokenizer holds a whole document at once).
  The forward pass is left out on purpose: its memory is that of one batch of fixed-size
  windows whatever the corpus size, and without it the corpus can grow to a million tokens
  in minutes.
* eval: `KNNLM.evaluate` (what `knnstore eval` runs) of --tokens tokens of WikiText-2
  test.txt on each --store, once with the store's ANN index and once exact (which keeps
  up to 2 GiB of keys in memory as float32 and streams the rest from disk).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import DATA, WIKI_TEST


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measured(work) -> None:
    """(child) Print 'start RSS / peak RSS' of work(), in MiB."""
    start = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    note = work()
    print(f"RESULT {start:.0f} {_status_mib('VmHWM'):.0f} {note}")


def ingest_child(chars: int, work: Path, doc_chars: int) -> None:
    from benchlib import RandomKeys

    from knnstore import IngestSettings, Store

    fake = RandomKeys.default()
    text = (DATA / "gutenberg" / "train.txt").read_text(encoding="utf-8")[:chars]
    docs = work / "docs"
    docs.mkdir()
    at, n = 0, 0
    while at < len(text):  # documents of about doc_chars, cut after a blank line
        end = len(text) if doc_chars <= 0 else text.find("\n\n", at + doc_chars) + 2
        end = len(text) if end < 2 else end
        (docs / f"{n:06}.txt").write_text(text[at:end], encoding="utf-8")
        at, n = end, n + 1
    store = Store.create(work / "store", encoder=fake)
    measured(lambda: store.add_corpus("text", [docs], settings=IngestSettings(), index=False).pairs)


def eval_child(path: str, tokens: int, exact: bool) -> None:
    from knnstore import KNNSettings, Store
    from knnstore.adapter import KNNLM

    store = Store.open(path)
    lm = KNNLM.from_store(store, KNNSettings(exact=exact))
    text = WIKI_TEST.read_text(encoding="utf-8")

    def score() -> int:
        lm.evaluate(text, max_tokens=tokens)
        return store.stats().pairs

    measured(score)


def child(args: list[str]) -> tuple[float, float, str]:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True).stdout
    _, start, peak, note = next(line for line in out.splitlines() if line.startswith("RESULT ")).split()
    return float(start), float(peak), note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", default="500000,2000000,5000000")
    parser.add_argument("--doc-chars", type=int, default=20000, help="characters per document")
    parser.add_argument("--store", nargs="*", default=[])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "ingest":
            ingest_child(int(rest[0]), Path(rest[1]), int(rest[2]))
        else:
            eval_child(rest[0], int(rest[1]), rest[2] == "exact")
        return

    sizes = [int(c) for c in args.chars.split(",")]
    print(f"ingest (random keys), documents of ~{args.doc_chars:,} characters: RSS after loading the model "
          "-> peak while ingesting")
    for chars, doc_chars in [(c, args.doc_chars) for c in sizes] + [(max(sizes), 0)]:
        if doc_chars == 0:
            print("the largest as one single document:")
        with tempfile.TemporaryDirectory(prefix="knnstore-mem-") as work:
            start, peak, pairs = child(["--child", "ingest", str(chars), work, str(doc_chars)])
        print(f"  {chars:>10,} chars {int(pairs):>10,} pairs   {start:6,.0f} -> {peak:6,.0f} MiB "
              f"(+{peak - start:,.0f})", flush=True)
    if args.store:
        print(f"eval of {args.tokens:,} tokens of {WIKI_TEST.name}: RSS after loading the model -> peak "
              "while scoring")
    for store in args.store:
        for mode in ("ann", "exact"):
            start, peak, pairs = child(["--child", "eval", store, str(args.tokens), mode])
            print(f"  {Path(store).name:24} {int(pairs):>10,} pairs  {mode:5}  {start:6,.0f} -> {peak:6,.0f} MiB "
                  f"(+{peak - start:,.0f})", flush=True)


if __name__ == "__main__":
    main()
