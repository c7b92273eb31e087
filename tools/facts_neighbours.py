"""Where a fact's answer stands among the neighbours: for each probe of tools/bench_facts.py,
one exact search at the position that predicts the answer's first token.

    python tools/facts_neighbours.py STORE [--people 60] [--probe-people 20]

STORE is a store tools/bench_facts.py built (WikiText-2 plus the fictional people of the same
--people and --seed; ``knnstore-cache/facts-store`` before its removal step). Per probe kind:
how often one of the person's own pairs that predicts the answer's first token is among the
k=128 nearest, how often it is the nearest, the median distances (squared L2: the nearest,
the 8th, the person's own), and how often the answer's first token is the top of p_kNN in
the plain view (T=3) and in the sharp view (T = 0.1 x the nearest distance,
``adaptive.SHARP``): an upper bound of what weighting the neighbours can do.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import facts as F
from knnstore import Store, knn
from knnstore.adapter import KNNLM
from knnstore.adaptive import SHARP
from knnstore.config import KNNSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--people", type=int, default=60)
    parser.add_argument("--probe-people", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    people = F.make_people(args.people, seed=args.seed)
    store = Store.open(args.store)
    enc = store.encoder
    lm = KNNLM(enc.model, enc.tokenizer, store, KNNSettings(exact=True))
    person_of = {d.id: d.meta["person"] for d in store.documents("facts")}
    vocab = enc.model.config.vocab_size
    rows = []
    for p in people[:args.probe_people]:
        for q in F.probes(p, people):
            head = enc.tokenize(q.prompt)
            first = enc.tokenize(f"{q.prompt} {q.answer}")[len(head)]
            with torch.inference_mode(), enc.capture() as captured:
                enc.model(torch.tensor([head], device=enc.device))
            nb = lm.search(captured[-1][0, -1:].float())
            d, nt = torch.from_numpy(nb.distances), torch.from_numpy(nb.next_tokens)
            own = np.array([person_of.get(int(x), -1) == q.source_person for x in nb.document_ids[0]])
            hit = np.flatnonzero(own & (nb.next_tokens[0] == first))
            valid = knn.valid_mask(d, nt)
            plain = knn.knn_log_probs(d, nt, vocab, 3.0)[0]
            sharp = knn.knn_log_probs(d, nt, vocab, knn.relative_temperature(d, valid, SHARP))[0]
            rows.append(dict(kind=q.kind, d1=float(d[0, 0]), d8=float(d[0, 7]),
                             own=float(d[0, hit[0]]) if len(hit) else None, found=len(hit) > 0,
                             nearest=len(hit) > 0 and hit[0] == 0, top_plain=int(plain.argmax()) == first,
                             top_sharp=int(sharp.argmax()) == first))
    print(f"{args.store}: probes of {args.probe_people} of {args.people} people, k=128, exact search")
    print("| probe | n | own pair among the 128 | the nearest | median d1 | d8 | own | answer on top: T=3 | sharp |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in F.KINDS:
        r = [x for x in rows if x["kind"] == kind]
        own = [x["own"] for x in r if x["own"] is not None]
        print(f"| {kind} {F.KIND_NAMES[kind]} | {len(r)} | {sum(x['found'] for x in r)} | "
              f"{sum(x['nearest'] for x in r)} | {np.median([x['d1'] for x in r]):.1f} | "
              f"{np.median([x['d8'] for x in r]):.1f} | {np.median(own) if own else float('nan'):.1f} | "
              f"{sum(x['top_plain'] for x in r)} | {sum(x['top_sharp'] for x in r)} |")


if __name__ == "__main__":
    main()
