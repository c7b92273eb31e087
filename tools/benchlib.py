"""What the benchmarks in tools/ share: data paths, timing, recall, random-key encoders,
held-out queries and the FAISS IVF-PQ baseline. (Run the benchmarks as
``python tools/NAME.py``: this directory is then on the import path.)"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from knnstore import Encoder, SourceOptions, Store
from knnstore.adapter import scored_windows
from knnstore.ingest import iter_documents

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI_TEST = DATA / "wikitext-2" / "test.txt"


class RandomKeys(Encoder):
    """The default model's tokenizer and identity, random keys (no forward pass): for
    benchmarks whose cost does not depend on the keys' values (SQL, bytes, removal)."""

    def forward(self, input_ids, attention_mask=None, with_logits=False):
        gen = torch.Generator().manual_seed(int(input_ids.sum()))
        return torch.randn(*input_ids.shape, self.dim, generator=gen), None

    @classmethod
    def default(cls) -> "RandomKeys":
        enc = Encoder.load("smollm2-135m")
        return cls(enc.model, enc.tokenizer, enc.name)


def query_args(parser, queries: int = 512) -> None:
    """The arguments of a benchmark that searches a store with held-out queries: STORE,
    --text, --queries, --k."""
    parser.add_argument("store")
    parser.add_argument("--text", default=str(WIKI_TEST))
    parser.add_argument("--queries", type=int, default=queries)
    parser.add_argument("--k", type=int, default=64)


def timed(fn):
    """(seconds, result) of one call."""
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def best_time(fn, repeat: int):
    """Best of ``repeat`` timed calls after a warm-up call (caches, page cache, index load)."""
    fn()
    best, out = float("inf"), None
    for _ in range(repeat):
        t, out = timed(fn)
        best = min(best, t)
    return best, out


def time_rounds(methods, truth: np.ndarray, n_queries: int, rounds: int) -> list[tuple[str, float, float]]:
    """(name, queries/s, recall) of each (name, search) in methods, where search() returns
    [Q, k] pair ids. One untimed call each (warm-up and recall), then `rounds` rounds over
    all of them, best time kept: a burst of load from other jobs costs one round of one
    method rather than a whole side of the comparison."""
    recalls = {name: recall(search(), truth) for name, search in methods}
    best = {name: float("inf") for name, _ in methods}
    for _ in range(rounds):
        for name, search in methods:
            best[name] = min(best[name], timed(search)[0])
    return [(name, n_queries / best[name], recalls[name]) for name, _ in methods]


def faiss_search(index, queries: np.ndarray, k: int, pair_ids: np.ndarray, *settings):
    """A search for time_rounds: the pair ids of index's k nearest rows to each query, after
    setting each (object, attribute, value) of settings (e.g. (ivfpq, "nprobe", 16))."""
    def run():
        for obj, attr, value in settings:
            setattr(obj, attr, value)
        return pair_ids[index.search(queries, k)[1]]
    return run


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true neighbour ids that were found ([Q, k] id arrays)."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def held_out_queries(store: Store, text_path: str | Path, n: int) -> np.ndarray:
    """The store model's keys of the first n positions of a text: [n, dim] float32."""
    enc = store.encoder
    ids = enc.tokenize(Path(text_path).read_text(encoding="utf-8"))[: n + 1]
    return np.ascontiguousarray(torch.cat([w.keys for w in scored_windows(enc, ids)]).numpy(), dtype=np.float32)


def table_keys(table, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Every key ([rows, dim] of dtype) and pair id of a PairsTable, in one pass, filled in
    place: 5M keys are 11.5 GB as float32 (5.8 GB as float16, the store's own precision),
    and a list of batches plus their concatenation would be twice that."""
    rows = table.count()
    dim = table.codec.key_dim if table.quantised else table.dim  # the keys searched: decoded codes if quantised
    xb = np.empty((rows, dim), dtype)
    pids = np.empty(rows, np.int64)
    at = 0
    for vectors, meta in table.scan_vectors():
        xb[at:at + len(vectors)] = vectors
        pids[at:at + len(vectors)] = meta["pair_id"]
        at += len(vectors)
    if at != rows:
        raise RuntimeError(f"the table changed while it was read ({at:,} rows, expected {rows:,})")
    return xb, pids


def _training_sample(xb: np.ndarray, train_rows: int | None) -> np.ndarray:
    """xb, or a fixed random sample of train_rows of its rows, as float32."""
    if train_rows is not None and train_rows < len(xb):
        xb = xb[np.sort(np.random.default_rng(0).choice(len(xb), train_rows, replace=False))]
    return np.ascontiguousarray(xb, dtype=np.float32)


def _add_in_chunks(index, xb: np.ndarray, chunk: int = 262_144) -> None:
    """index.add(xb) a chunk at a time, each as float32: FAISS's IVF add computes every
    residual of its input at once, another copy of xb (11.5 GB at 5M keys)."""
    for lo in range(0, len(xb), chunk):
        index.add(np.ascontiguousarray(xb[lo:lo + chunk], dtype=np.float32))


def refine_fp16(base_index, xb: np.ndarray):
    """An IndexRefine that re-ranks base_index's candidates from a float16 copy of xb (the
    precision the store keeps its keys in, so the distances are the same as from float32
    keys decoded from it, at half the memory of IndexRefineFlat's float32 copy)."""
    import faiss

    store = faiss.IndexScalarQuantizer(xb.shape[1], faiss.ScalarQuantizer.QT_fp16)
    _add_in_chunks(store, xb)
    return faiss.IndexRefine(base_index, store)


def faiss_ivfpq(xb: np.ndarray, n_list: int, m: int, train_rows: int | None = None):
    """FAISS IndexIVFPQ (8-bit codes) trained on xb (or a random sample of train_rows of it)
    and filled with it. (faiss-cpu is a benchmark-only dependency: pip install -e ".[bench]".)"""
    import faiss

    ivfpq = faiss.IndexIVFPQ(faiss.IndexFlatL2(xb.shape[1]), xb.shape[1], n_list, m, 8)
    ivfpq.train(_training_sample(xb, train_rows))
    _add_in_chunks(ivfpq, xb)
    return ivfpq


def faiss_rabitq(xb: np.ndarray, n_list: int, bits: int = 4, train_rows: int | None = None):
    """FAISS IndexIVFRaBitQ (the algorithm of knnstore's default LanceDB index) with
    ``bits`` per dimension and 8-bit query quantisation, trained and filled with xb."""
    import faiss

    index = faiss.IndexIVFRaBitQ(faiss.IndexFlatL2(xb.shape[1]), xb.shape[1], n_list, faiss.METRIC_L2, True, bits)
    index.train(_training_sample(xb, train_rows))
    _add_in_chunks(index, xb)
    index.qb = 8
    return index


def write_articles(src: Path, out: Path, tokenize, tokens: int) -> int:
    """Whole WikiText articles up to about ``tokens`` tokens, one file each; returns tokens."""
    out.mkdir(parents=True)
    total = 0
    for doc in iter_documents([src], SourceOptions(split_on_heading=True)):
        (out / f"{doc.ordinal:04}.txt").write_text(doc.text)
        total += len(tokenize(doc.text))
        if total >= tokens:
            break
    return total
