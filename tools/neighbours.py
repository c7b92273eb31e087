"""Show the nearest stored contexts of a prompt and where they came from.

    python tools/neighbours.py STORE "The European lobster is a species of clawed" [-k 5]

Encodes the prompt with the store's model, looks up the k nearest stored keys of its
last position (squared L2) and prints each neighbour's next token, distance, corpus,
document and the source text around it.
"""

import argparse

import torch

from knnstore import Store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("prompt")
    parser.add_argument("-k", type=int, default=5)
    args = parser.parse_args()

    store = Store.open(args.store)
    enc = store.encoder
    ids = enc.tokenize(args.prompt)
    keys, logits = enc.forward(torch.tensor([ids]), with_logits=True)
    found = store.search(keys[0, -1:].numpy(), k=args.k)
    lm_top = enc.tokenizer.decode([int(logits[0, -1].argmax())])
    names = {c.id: c.name for c in store.corpora()}
    docs = {d.id: d for c in store.corpora() for d in store.documents(c.name)}
    print(f"\nPrompt: {args.prompt!r}; the model alone predicts {lm_top!r}. Nearest stored contexts:")
    for j in range(args.k):
        if found.pair_ids[0, j] < 0:
            break
        doc = docs[int(found.document_ids[0, j])]
        nxt = enc.tokenizer.decode([int(found.next_tokens[0, j])])
        print(f"  {j + 1}. next {nxt!r:14} distance {found.distances[0, j]:7.2f}  "
              f"{names[int(found.corpus_ids[0, j])]} / {doc.title or doc.source} @ {found.positions[0, j]}")
        snippet = " ".join(store.snippet(doc.id, int(found.positions[0, j])).split())
        print(f"     ...{snippet}...")


if __name__ == "__main__":
    main()
