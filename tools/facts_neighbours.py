"""Where a fact's answer stands among the neighbours: for each probe of tools/bench_facts.py,
one exact search at the position that predicts the answer's first token.

    python tools/facts_neighbours.py STORE [--people 60] [--probe-people 20] [--within | --in-context]

STORE is a store tools/bench_facts.py built (WikiText-2 plus the fictional people of the same
--people and --seed; ``knnstore-cache/facts-store`` before its removal step). Per probe kind:
how often one of the person's own pairs that predicts the answer's first token is among the
k=128 nearest, how often it is the nearest, the median distances (squared L2: the nearest,
the 8th, the person's own), and how often the answer's first token is the top of p_kNN in
the plain view (T=3) and in the sharp view (T = 0.1 x the nearest distance,
``adaptive.SHARP``): an upper bound of what weighting the neighbours can do.

``--in-context``: no search; the base LM with the person's two documents given by hand
before each probe (what reading, docs/adapter.md, could give at best).

``--within``: the same queries searched only among the pairs of a few documents, the
nearest pair's next token taken as the answer: the person's own two documents (an oracle:
what a search that first found the entity's documents could do at best), and the two
documents that share the most rare tokens with the prompt (a lexical entity lookup: the
prompt's tokens found in at most 20 documents, weighted by their inverse document
frequency). How often the nearest pair there predicts the answer, per probe kind and
attribute.
"""

from __future__ import annotations

import argparse
import collections

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
    parser.add_argument("--within", action="store_true", help="search within documents (see above)")
    parser.add_argument("--in-context", action="store_true", help="the base LM with the documents given (see above)")
    args = parser.parse_args()
    if args.within:
        within(args)
        return
    if args.in_context:
        in_context(args)
        return
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


def in_context(args) -> None:
    """The base LM (no search) with the person's two documents given by hand before each
    probe, as reading puts them (the record, then the biography, a blank line after each):
    what reading could give at best, were every document it reads the right one."""
    people = F.make_people(args.people, seed=args.seed)
    enc = Store.open(args.store).encoder
    stated: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for p in people[:args.probe_people]:
        for q in F.probes(p, people):
            source = people[q.source_person]
            context = f"{F.record(source).text}\n\n{F.biography(source).text}\n\n"
            ids = torch.tensor([enc.tokenize(context + q.prompt)], device=enc.device)
            with torch.inference_mode():
                out = enc.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                         pad_token_id=enc.tokenizer.eos_token_id)
            ok = F.states(enc.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), q.answer)
            for key in (q.kind, f"{q.kind} {q.attribute}"):
                stated[key][0] += ok
                stated[key][1] += 1
    print(f"the base LM with the person's documents given: {args.probe_people} people, greedy, 8 new tokens")
    print("| probe | stated |\n|---|---|")
    for key in sorted(stated):
        print(f"| {key} | {stated[key][0]} of {stated[key][1]} |")


def within(args) -> None:
    people = F.make_people(args.people, seed=args.seed)
    store = Store.open(args.store)
    enc = store.encoder
    docs: dict[int, list[int]] = collections.defaultdict(list)
    for d in store.documents("facts"):
        docs[d.meta["person"]].append(d.id)
    table = store.table.columns(["token", "document_id"])
    pairs = np.unique(np.stack([table.column("token").to_numpy(), table.column("document_id").to_numpy()], 1), axis=0)
    n_docs = len(np.unique(pairs[:, 1]))
    holding: dict[int, list[int]] = collections.defaultdict(list)  # token -> documents that hold it
    for token, doc in pairs.tolist():
        holding[token].append(doc)
    cache: dict[int, tuple[torch.Tensor, np.ndarray]] = {}

    def nearest_next(doc_ids: list[int], key: torch.Tensor) -> int:
        for i in doc_ids:
            if i not in cache:
                t = store.table.columns(["vector", "codes", "next_token"] if store.table.quantised
                                        else ["vector", "next_token"], where=f"document_id = {i}")
                cache[i] = (torch.from_numpy(store.table.keys_of(t)).float(), t.column("next_token").to_numpy())
        keys = torch.cat([cache[i][0] for i in doc_ids])
        nexts = np.concatenate([cache[i][1] for i in doc_ids])
        return int(nexts[int(((keys - key) ** 2).sum(-1).argmin())])

    rows = []
    for p in people[:args.probe_people]:
        if p.index not in docs:
            continue  # removed from the store
        for q in F.probes(p, people):
            if q.kind == "P4":
                continue
            head = enc.tokenize(q.prompt)
            first = enc.tokenize(f"{q.prompt} {q.answer}")[len(head)]
            with torch.inference_mode(), enc.capture() as captured:
                enc.model(torch.tensor([head], device=enc.device))
            key = store.stored_keys(captured[-1][0, -1:].float().numpy())[0]
            key = torch.from_numpy(np.asarray(key, dtype=np.float32))
            score: collections.Counter = collections.Counter()
            for token in set(head):
                if 0 < len(holding.get(token, ())) <= 20:
                    for doc in holding[token]:
                        score[doc] += float(np.log(n_docs / len(holding[token])))
            found = [d for d, _ in score.most_common(2)]
            rows.append(dict(kind=q.kind, attribute=q.attribute, own=nearest_next(docs[p.index], key) == first,
                             found_own=any(d in docs[p.index] for d in found),
                             lexical=bool(found) and nearest_next(found, key) == first))
    print(f"{args.store}: probes of {args.probe_people} of {args.people} people; the nearest pair among a few "
          "documents' pairs")
    print("| probe | attribute | n | own documents: answer | lexical top 2: own document among them | answer |")
    print("|---|---|---|---|---|---|")
    for kind in F.KINDS[:3]:
        for attribute in (*F.ATTRIBUTES, "all"):
            r = [x for x in rows if x["kind"] == kind and attribute in (x["attribute"], "all")]
            print(f"| {kind} {F.KIND_NAMES[kind]} | {attribute} | {len(r)} | {sum(x['own'] for x in r)} | "
                  f"{sum(x['found_own'] for x in r)} | {sum(x['lexical'] for x in r)} |")


if __name__ == "__main__":
    main()
