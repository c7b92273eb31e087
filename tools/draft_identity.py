"""Does the default (drafting) generate exactly what decoding without drafts generates, and
what generate gave before it had its own loop (``model.generate`` with the kNN-LM's logits
processor)? On the fact probes of a fact store (tools/bench_facts.py), greedy.

    python tools/draft_identity.py FACT_STORE [--people 4] [--seed 0] [--new-tokens 8]

FACT_STORE holds tools/facts.py's people of ``--seed`` (e.g. the store bench_facts builds).
Prints how many probes (P1-P3 of the first ``--people`` people) agree each way and how many
drafted tokens were kept.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LogitsProcessorList

import facts as F
from knnstore.adapter import KNNLM
from knnstore.config import KNNSettings


def processor_path(lm: KNNLM, prompt: str, n: int) -> list[int]:
    """Greedy decoding through ``model.generate`` and ``KNNLogitsProcessor``, reading first."""
    ids = lm.tokenizer(prompt)["input_ids"]
    got = lm.read(ids, None)
    x = torch.tensor([(got.context_ids if got else []) + ids])
    with lm.logits_processor(prompt_keys=got.key[None] if got else None) as proc:
        out = lm.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                logits_processor=LogitsProcessorList([proc]), pad_token_id=lm.tokenizer.eos_token_id)
    return out[0, x.shape[1]:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--people", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    lm = KNNLM.from_store(args.store, KNNSettings.resolve(exact=True))
    lm.resolve_policy()
    people = F.make_people(60, seed=args.seed)
    probes = [pr for p in people[:args.people] for pr in F.probes(p, people) if pr.kind in ("P1", "P2", "P3")]
    same_draft = same_processor = kept = proposed = 0
    for pr in probes:
        fast = lm.generate(pr.prompt, max_new_tokens=args.new_tokens)
        plain = lm.with_settings(draft=False).generate(pr.prompt, max_new_tokens=args.new_tokens)
        same_draft += fast.token_ids == plain.token_ids
        same_processor += plain.token_ids == processor_path(lm, pr.prompt, args.new_tokens)
        kept, proposed = kept + fast.cost["drafted_accepted"], proposed + fast.cost["drafted_proposed"]
    print(f"{len(probes)} probes: drafting = no drafts on {same_draft}, no drafts = the processor path on "
          f"{same_processor}; {kept} of {proposed} drafted tokens kept")


if __name__ == "__main__":
    main()
