"""Bytes on disk against perplexity for compact stores: reduced keys, pruning, both.

    python tools/bench_compact.py /work/cache/wiki-valid [--tokens 8000] [--out docs/results/compact]

STORE is a full store of WikiText-2 valid.txt (the default model, float16 keys), as
docs/results.md builds it. Every variant is a real LanceDB `pairs` table written by
knnstore's own code (``vectors.PairsTable``) from that store's rows, with an IVF-RQ index
built by ``PairsTable.create_index``; its bytes per pair are its files on disk, index
included. Perplexity is over the first --tokens tokens of test.txt with docs/results.md's
settings (k=128, λ=0.15, T=3), by exact search over what the variant stores
(``ExactSearch``, weights included); the LM's part is computed once. Variants:

* reduced keys: the store's ``KeyProjection`` fitted on ``FIT_KEYS`` of its keys;
* pruning: ``pruning.greedy_merge`` over each pair's nearest neighbours (the full store's
  ANN index, nprobes 32: what ``knnstore prune`` does on it), at several strengths;
* both: pruned first, then reduced (``prune``, then a store built with ``--key-dim``);
* quantised keys (``--key-bits``): the reduced keys as 4- or 8-bit codes beside a float16
  routing key of their leading dimensions, the index built on the routing key; exact
  search is over the decoded codes, ANN search ranks the routing key's candidates by them.

For each: bytes per stored pair and per pair of the full store, perplexity (exact search;
and with the variant's ANN index at nprobes 32, as ``eval`` runs by default), in-domain
gain kept (of log base - log full), ANN recall@64 at nprobes 32 against the variant's own
exact search, and q/s of both on 512 test queries. Prints a table, writes CSV and PNG.
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from knnstore import KNNLM  # noqa: E402
from knnstore import knn  # noqa: E402
from knnstore.projection import FIT_KEYS, KeyProjection  # noqa: E402
from knnstore.pruning import greedy_merge, mergeable  # noqa: E402
from knnstore.scoring import scored_windows  # noqa: E402
from knnstore.schema import WEIGHT, key_columns, key_matrix, pairs_schema  # noqa: E402
from knnstore.vectors import ExactSearch, PairsTable  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
K, LAMBDA, T = 128, 0.15, 3.0
RECALL_K, NPROBES, N_RECALL = 64, 32, 512
DIMS = (384, 256, 128, 64)
PRUNE = (4, 8, 16, 24, 32)
BOTH = ((384, 16), (256, 16), (128, 16), (64, 16))
# quantised: (key_dim, bits, routing dims, prune neighbours)
QUANTISED = ((384, 4, 64, 0), (384, 4, 32, 0), (256, 4, 64, 0), (256, 4, 32, 0), (256, 8, 64, 0), (192, 4, 64, 0),
             (128, 4, 32, 0), (384, 4, 32, 16), (320, 4, 32, 16), (256, 4, 64, 16), (256, 4, 32, 16), (256, 4, 32, 8),
             (128, 4, 32, 16))


def test_features(lm: KNNLM, tokens: int):
    text = (ROOT.parent / "shared/data/wikitext-2/test.txt").read_text()
    ids = lm.encoder.tokenize(text)[:tokens + 1]
    keys, targets, lm_lp = [], [], []
    for w in scored_windows(lm.encoder, ids):
        lp = torch.log_softmax(w.logits.float(), -1)
        keys.append(w.keys.float().numpy())
        targets.append(w.targets)
        lm_lp.append(lp.gather(1, w.targets[:, None])[:, 0].double())
    return np.concatenate(keys), torch.cat(targets), torch.cat(lm_lp)


def write_table(path: Path, rows: pa.Table, vectors: np.ndarray, weights: np.ndarray | None,
                proj: KeyProjection | None) -> PairsTable:
    """A variant's table: ``vectors`` are its keys as searched (projected); a quantising
    ``proj`` stores them as codes and a routing key, as a ``--key-bits`` store does."""
    codec = proj if proj is not None and proj.quantised else None
    dim = vectors.shape[1] if codec is None else codec.stored_dim
    schema = pairs_schema(dim, "float16", weighted=weights is not None,
                          code_bytes=0 if codec is None else codec.code_bytes)
    table = PairsTable.create(path, dim, "float16", schema=schema)
    table.use_codec(codec)
    for lo in range(0, len(vectors), 65536):
        hi = min(len(vectors), lo + 65536)
        made = key_columns(schema, vectors[lo:hi], codec)
        cols = [made[f.name] if f.name in made else (pa.array(weights[lo:hi], pa.int32()) if f.name == WEIGHT
                else rows.column(f.name).slice(lo, hi - lo).combine_chunks()) for f in schema]
        table.add(pa.Table.from_arrays(cols, schema=schema))
    return table


def perplexity(search, queries: np.ndarray, targets: torch.Tensor, lm_lp: torch.Tensor) -> float:
    """Perplexity of the kNN-LM with neighbours from ``search`` (queries -> Neighbours),
    searched 1,024 queries at a time (as the adapter searches a window's)."""
    parts = [search(queries[i:i + 1024]) for i in range(0, len(queries), 1024)]
    d = torch.from_numpy(np.concatenate([f.distances for f in parts]))
    nt = torch.from_numpy(np.concatenate([f.next_tokens for f in parts]))
    w = torch.from_numpy(np.concatenate([f.weights for f in parts]))
    valid = knn.valid_mask(d, nt)
    t = knn.knn_target_log_prob(d, nt == targets[:, None], valid, T, w)
    mixed = knn.interpolate(lm_lp, t, LAMBDA, has_knn=valid.any(1))
    return math.exp(-float(mixed.mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store")
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--out", default=str(ROOT / "docs/results/compact"))
    ap.add_argument("--work", default=None, help="scratch directory for the variant tables (default: a temp dir)")
    ap.add_argument("--variants", nargs="*", default=None,
                    help="run only the variants whose names contain one of these (and the full store)")
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = KNNLM.from_store(args.store, adaptive=False)  # the fixed-λ kNN-LM its figures are of
    src = lm.store
    t0 = time.perf_counter()
    queries, targets, lm_lp = test_features(lm, args.tokens)
    base = math.exp(-float(lm_lp.mean()))
    print(f"test features: {len(targets):,} tokens, base perplexity {base:.3f} ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    rows = src.table.columns(["pair_id", "corpus_id", "document_id", "position", "token", "next_token", "vector"])
    order = np.argsort(rows.column("pair_id").to_numpy(), kind="stable")
    rows = rows.take(order)
    keys = key_matrix(rows.column("vector").combine_chunks())
    n_full = rows.num_rows
    # each pair's nearest neighbours, once, by the full store's own index (what `prune` does)
    t0 = time.perf_counter()
    found = [src.table.search(keys[i:i + 8192], max(PRUNE) + 1, nprobes=NPROBES) for i in range(0, n_full, 8192)]
    near_rows = mergeable(rows.column("pair_id").to_numpy(), rows.column("document_id").to_numpy(),
                          np.concatenate([f.pair_ids for f in found]), np.concatenate([f.document_ids for f in found]))
    print(f"neighbours of {n_full:,} pairs: {time.perf_counter() - t0:.0f} s", flush=True)
    sample = keys[np.linspace(0, n_full - 1, min(FIT_KEYS, n_full)).astype(np.int64)]
    next_tokens = rows.column("next_token").to_numpy()

    variants = [("full fp16", None, None, None)] + [(f"key_dim {d}", d, None, None) for d in DIMS] + \
               [(f"prune {p}", None, p, None) for p in PRUNE] + \
               [(f"key_dim {d} + prune {p}", d, p, None) for d, p in BOTH] + \
               [(f"key_dim {d} {b}-bit r{r}" + (f" + prune {p}" if p else ""), d, p, (b, r))
                for d, b, r, p in QUANTISED]
    if args.variants:
        variants = [v for v in variants if v[0] == "full fp16" or any(s in v[0] for s in args.variants)]
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-compact-"))
    results, full_ppl = [], None
    for name, dim, prune_k, quant in variants:
        t0 = time.perf_counter()
        keep, weights = np.ones(n_full, dtype=bool), None
        if prune_k:
            keep, w = greedy_merge(next_tokens, np.ones(n_full, dtype=np.int64), near_rows[:, :prune_k + 1])
            weights = w[keep]
        proj = KeyProjection.fit(sample, dim, *(quant or (None, None))) if dim else None
        vecs = keys[keep] if proj is None else proj.apply(keys[keep])
        qs = queries if proj is None else proj.apply(queries)
        path = work / name.replace(" ", "_").replace("+", "and")
        shutil.rmtree(path, ignore_errors=True)
        table = write_table(path, rows.filter(pa.array(keep)), vecs, weights, proj)
        t1 = time.perf_counter()
        table.create_index()
        build_s = time.perf_counter() - t1
        nbytes = table.nbytes()
        exact = ExactSearch(table)
        ppl = perplexity(lambda q: exact.search(q, K), qs, targets, lm_lp)
        ann_ppl = perplexity(lambda q: table.search(q, K, nprobes=NPROBES), qs, targets, lm_lp)
        if full_ppl is None:
            full_ppl = ppl
        # ANN vs exact on the variant itself
        q = np.ascontiguousarray(qs[:N_RECALL])
        t1 = time.perf_counter()
        ex = exact.search(q, RECALL_K)
        exact_qps = len(q) / (time.perf_counter() - t1)
        t1 = time.perf_counter()
        ann = table.search(q, RECALL_K, nprobes=NPROBES)
        ann_qps = len(q) / (time.perf_counter() - t1)
        recall = np.mean([len(set(a) & set(b)) / RECALL_K for a, b in zip(ann.pair_ids, ex.pair_ids)])
        gain = (math.log(base) - math.log(ppl)) / (math.log(base) - math.log(full_ppl))
        r = {"variant": name, "key_dim": dim or keys.shape[1], "key_bits": quant[0] if quant else 16,
             "route_dim": quant[1] if quant else "", "prune_neighbours": prune_k or 0,
             "pairs": int(keep.sum()), "removed": round(1 - keep.mean(), 4),
             "bytes_per_pair": round(nbytes / keep.sum(), 1), "bytes_per_full_pair": round(nbytes / n_full, 1),
             "ratio_to_fp16_key": round(nbytes / n_full / (2 * keys.shape[1]), 3),
             "ppl": round(ppl, 3), "vs_full": round(ppl / full_ppl - 1, 4), "gain_kept": round(gain, 3),
             "ann_ppl": round(ann_ppl, 3),
             "recall64": round(float(recall), 3), "ann_qps": round(ann_qps), "exact_qps": round(exact_qps),
             "index_build_s": round(build_s, 1)}
        results.append(r)
        print(f"{name:24s} pairs {r['pairs']:>8,} ({100 * r['removed']:4.1f}% removed)  {r['bytes_per_pair']:7.1f} B/pair "
              f"{r['bytes_per_full_pair']:7.1f} B/full pair ({r['ratio_to_fp16_key']:.3f}x fp16 key)  ppl {ppl:.3f} "
              f"({100 * r['vs_full']:+.2f}%)  gain kept {100 * gain:5.1f}%  ANN ppl {ann_ppl:.3f}  recall@64 {recall:.3f}  "
              f"ANN {ann_qps:,.0f} q/s exact {exact_qps:,.0f} q/s  index {build_s:.0f} s  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        table = exact = None  # (their files are removed next)
        shutil.rmtree(path, ignore_errors=True)
    # the projection's own cost at ingest, per key (the model's forward runs ~700 keys/s here)
    proj = KeyProjection.fit(sample, 128)
    block = torch.from_numpy(keys[:65536])
    t1 = time.perf_counter()
    for _ in range(5):
        proj.apply(block)
    per_s = 5 * len(block) / (time.perf_counter() - t1)
    print(f"projection 576 -> 128 at ingest: {per_s:,.0f} keys/s (torch, CPU)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(results[0]))
        w.writeheader()
        w.writerows(results)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {out.with_suffix('.csv')} (no matplotlib: no plot)")
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for r in results:
        ax.scatter(r["bytes_per_full_pair"], r["ppl"], color="C3" if r["key_bits"] != 16 else
                   "C0" if not r["prune_neighbours"] else ("C1" if r["key_dim"] == keys.shape[1] else "C2"))
        ax.annotate(r["variant"], (r["bytes_per_full_pair"], r["ppl"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.axhline(full_ppl * 1.01, color="grey", linestyle=":", label="full store +1%")
    ax.axhline(base, color="black", linestyle="--", label=f"base LM ({base:.2f})")
    ax.axvline(0.15 * 2 * keys.shape[1], color="red", linestyle=":", label="0.15x the fp16 key")
    ax.set_xscale("log")
    ax.set_xlabel("bytes on disk per pair of the full store (index included)")
    ax.set_ylabel(f"perplexity, WikiText-2 test ({len(targets):,} tokens, exact search)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
