"""Knowledge the model lacks: does a store make the model state facts it holds, cite them,
and drop them when they are removed? Seeded, generated offline (tools/facts.py).

    python tools/bench_facts.py [--people 60] [--cache DIR] [--base-store STORE] [--out docs/facts]

The store: WikiText-2 valid.txt (one document per article) plus a corpus ``facts`` of
fictional people, each stated in two documents of two writing styles (a prose biography and
a registry record). Probes, greedy, exact search, the default model:

* P1 the stored wording up to the answer ("X was born in"), P2 a paraphrase ("The
  birthplace of X is the town of"), P3 a question ("Question: In which town was X born?
  Answer:"), P4 a two-hop question (the town of X's teacher: a negative control);
  per kind, exact match of the greedy answer, the answer's log-probability (first token and
  the rest, scored with the answer given), and the answer tokens' retrieved fraction and λ;
  for the base LM, a fixed λ and the default (adaptive, self-calibrated).
* Attribution: for each probe answered with the store, the top source of its answer tokens
  (the heaviest neighbour that voted for the token) must be one of the person's documents:
  precision over the probes with a citation, recall over the probes answered; spans.
* C1: real facts the base model states (the first 100 of tools/facts.py's list) must still
  be stated; C2: WikiText-2 test perplexity with the fact store within +1% of the base LM;
  C3: after ``remove-documents`` of the documents of 20 people, their probes score exactly
  as with those documents hidden from the search before the removal (as if never stored),
  and the other people's answers are unchanged; C4: a fact stated in two documents, one
  removed (the biography of 10 other people): what the remaining record still gives.

Writes OUT.md, OUT.png and OUT.json. The base store is built once in --cache (or copied
from --base-store, a store of WikiText-2 valid.txt with --split-on-heading).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

import facts as F
from knnstore import SourceOptions, Store
from knnstore.adapter import KNNLM, follows
from knnstore.config import KNNSettings
from knnstore.evaluate import evaluate, self_calibrate

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
WIKI = DATA / "wikitext-2"


def log(msg: str) -> None:
    print(msg, flush=True)


def build_stores(cache: Path, base_store: str | None, people: list[F.Person]) -> Path:
    """The base store (WikiText-2 valid, built once) and a fresh copy with the facts added."""
    base = cache / "facts-base"
    if not base.exists():
        if base_store:
            shutil.copytree(base_store, base)
        else:
            t0 = time.perf_counter()
            s = Store.create(base)
            s.add_corpus("wiki", [WIKI / "valid.txt"], options=SourceOptions(split_on_heading=True))
            s.close()
            log(f"built {base} in {time.perf_counter() - t0:.0f} s")
    work = cache / "facts-store"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(base, work)
    jsonl = cache / "facts.jsonl"
    F.write_documents(people, jsonl)
    s = Store.open(work)
    s.clear_calibrations()  # the default self-calibrates on what this store holds
    t0 = time.perf_counter()
    info = s.add_corpus("facts", [jsonl])
    log(f"added {info.documents} fact documents, {info.pairs:,} pairs in {time.perf_counter() - t0:.0f} s")
    s.close()
    return work


def answer_tokens(lm: KNNLM, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt + " " + answer and where the answer's tokens start."""
    full = lm.encoder.tokenize(f"{prompt} {answer}")
    head = lm.encoder.tokenize(prompt)
    return full, len(head)


def run_probe(lm: KNNLM, probe: F.Probe, own_titles: set[str]) -> dict:
    """One probe with one adapter: the greedy answer (with its sources) and the answer's
    log-probability when it is given."""
    ids, start = answer_tokens(lm, probe.prompt, probe.answer)
    got = lm.read(ids[:start])  # what generate reads before the prompt (the default: passages it names)
    if got is not None:  # scored with them in front, as the model reads them
        ids, start = got.context_ids + ids, start + len(got.context_ids)
    scored = lm.explain(ids, n_sources=0)  # scored[i] is token i + 1
    ans = scored[start - 1:]
    lp = [math.log(max(t.p, 1e-300)) for t in ans]
    gen = lm.generate(probe.prompt, max_new_tokens=len(ids) - start + 2, explain=True, n_sources=1)
    correct = F.states(gen.text, probe.answer)
    row = dict(person=probe.person, kind=probe.kind, attribute=probe.attribute, answer=probe.answer,
               generated=gen.text, correct=correct, first_lp=lp[0], rest_lp=sum(lp[1:]),
               retrieved=float(np.mean([t.retrieved for t in ans])), lam=float(np.mean([t.knn_weight for t in ans])),
               answer_tokens=len(ans), read=[p.title or p.document for p in gen.read])
    if correct:
        at = gen.text.lower().find(probe.answer.lower())
        pos, cited = 0, []
        for t in gen.tokens:  # the generated tokens whose text overlaps the answer
            lo, pos = pos, pos + len(t.text)
            if pos > at and lo < at + len(probe.answer):
                src = follows(t)  # a read passage's pair it copies, else a neighbour that searched
                if src is not None and (t.retrieved or t.read_from is not None):
                    cited.append(src.title or src.document)
        row["citation"] = cited[0] if cited else None
        row["cited_own"] = bool(cited) and cited[0] in own_titles
        row["answer_cited_tokens"] = len(cited)
        row["answer_own_tokens"] = sum(c in own_titles for c in cited)
        spans = [s for s in gen.spans if s.title in own_titles]
        row["spans"] = len(gen.spans)
        row["own_spans"] = len(spans)
    return row


def run_probes(lm: KNNLM, probes: list[F.Probe], titles: dict[int, set[str]], label: str) -> list[dict]:
    t0 = time.perf_counter()
    rows = []
    for i, p in enumerate(probes):
        rows.append(run_probe(lm, p, titles[p.source_person]))
        if (i + 1) % 100 == 0:
            log(f"  {label}: {i + 1}/{len(probes)} probes, {time.perf_counter() - t0:.0f} s")
    log(f"  {label}: {len(probes)} probes in {time.perf_counter() - t0:.0f} s")
    return rows


def summarise(rows: list[dict]) -> dict:
    out = {}
    for kind in F.KINDS:
        r = [x for x in rows if x["kind"] == kind]
        if not r:
            continue
        out[kind] = dict(n=len(r), exact_match=sum(x["correct"] for x in r) / len(r),
                         first_lp=float(np.mean([x["first_lp"] for x in r])),
                         rest_lp=float(np.mean([x["rest_lp"] for x in r])),
                         retrieved=float(np.mean([x["retrieved"] for x in r])),
                         lam=float(np.mean([x["lam"] for x in r])))
    return out


def attribution(rows: list[dict], base_rows: list[dict]) -> dict:
    """Citations of the probes answered with the store (P1-P3) that the base LM did not answer."""
    base_ok = {(x["person"], x["kind"], x["attribute"]) for x in base_rows if x["correct"]}
    answered = [x for x in rows if x["correct"] and x["kind"] != "P4"
                and (x["person"], x["kind"], x["attribute"]) not in base_ok]
    cited = [x for x in answered if x["citation"] is not None]
    own = [x for x in cited if x["cited_own"]]
    tokens = sum(x["answer_cited_tokens"] for x in answered)
    return dict(answered=len(answered), cited=len(cited), own=len(own),
                precision=len(own) / len(cited) if cited else float("nan"),
                recall=len(own) / len(answered) if answered else float("nan"),
                token_precision=sum(x["answer_own_tokens"] for x in answered) / tokens if tokens else float("nan"),
                with_span=sum(x["own_spans"] > 0 for x in answered),
                one_span=sum(x["own_spans"] == 1 and x["spans"] == 1 for x in answered))


def real_fact_control(lms: dict[str, KNNLM], n: int) -> dict:
    """C1: the first ``n`` real facts the base LM states, and how many each setting states."""
    kept = []
    for prompt, answer in F.real_facts():
        gen = lms["base"].generate(prompt, max_new_tokens=len(lms["base"].encoder.tokenize(" " + answer)) + 2)
        if F.states(gen.text, answer):
            kept.append((prompt, answer))
        if len(kept) == n:
            break
    out = {"facts": len(kept)}
    for name, lm in lms.items():
        stated = [F.states(lm.generate(p, max_new_tokens=len(lm.encoder.tokenize(" " + a)) + 2).text, a)
                  for p, a in kept]
        out[name] = sum(stated)
    return out


def removal_controls(lm: KNNLM, people: list[F.Person], probes: list[F.Probe], before: list[dict],
                     seed: int, n_remove: int, n_half: int) -> dict:
    """C3 and C4 with the default adapter (exact search)."""
    rng = random.Random(seed + 1)
    n_remove = min(n_remove, len(people) // 3)  # leave people whose answers must not change
    n_half = min(n_half, (len(people) - n_remove) // 2)
    order = list(range(len(people)))
    rng.shuffle(order)
    removed, half = set(order[:n_remove]), set(order[n_remove:n_remove + n_half])
    docs = {(d.person_id, d.kind): d.document_id for d in _fact_documents(lm.store)}
    gone = [docs[p, k] for p in removed for k in ("biography", "record")] + [docs[p, "biography"] for p in half]
    hidden_ids = np.array(gone)
    asked = [p for p in probes if p.source_person in removed]
    titles = _titles(people)
    hide = lm.hiding(lambda nb: np.isin(nb.document_ids, hidden_ids), extra=4 * lm.settings.k)
    reference = run_probes(hide, asked, titles, "C3 reference (documents hidden)")
    t0 = time.perf_counter()
    removal = lm.store.remove_documents(f"document_id IN ({', '.join(map(str, gone))})", corpus="facts")
    took = time.perf_counter() - t0
    after = run_probes(lm, probes, titles, "after the removal")
    by_key = lambda rows: {(x["person"], x["kind"], x["attribute"]): x for x in rows}  # noqa: E731
    ref, aft, bef = by_key(reference), by_key(after), by_key(before)
    diffs = [max(abs(aft[key]["first_lp"] - r["first_lp"]), abs(aft[key]["rest_lp"] - r["rest_lp"]))
             for key, r in ref.items()]
    removed_rows = [aft[key] for key in ref]
    # probes about someone none of whose documents went (a two-hop probe: nor their teacher's)
    source = {(p.person, p.kind, p.attribute): p.source_person for p in probes}
    others = [key for key in aft if key[0] not in removed | half and source[key] not in removed | half]
    changed = [key for key in others if aft[key]["correct"] != bef[key]["correct"]]
    c4 = [key for key in aft if key[0] in half and key[1] != "P4"]
    return dict(removed_people=len(removed), removed_documents=len(removal.documents), removed_pairs=removal.pairs,
                seconds=took, max_abs_diff_vs_hidden=max(diffs) if diffs else 0.0,
                removed_correct_before=sum(bef[k]["correct"] for k in ref),
                removed_correct_after=sum(x["correct"] for x in removed_rows),
                removed_probes=len(ref), others=len(others), others_changed=len(changed),
                changed_examples=[f"{k[1]} {k[2]} of person {k[0]}: {bef[k]['generated']!r} -> {aft[k]['generated']!r}"
                                  for k in changed[:5]],
                c4_people=len(half), c4_probes=len(c4),
                c4_correct_before=sum(bef[k]["correct"] for k in c4),
                c4_correct_after=sum(aft[k]["correct"] for k in c4),
                c4_by_kind={kind: [sum(bef[k]["correct"] for k in c4 if k[1] == kind),
                                   sum(aft[k]["correct"] for k in c4 if k[1] == kind),
                                   sum(1 for k in c4 if k[1] == kind)] for kind in ("P1", "P2", "P3")})


class _Doc:
    def __init__(self, document_id: int, person_id: int, kind: str) -> None:
        self.document_id, self.person_id, self.kind = document_id, person_id, kind


def _fact_documents(store: Store) -> list[_Doc]:
    out = []
    for d in store.documents("facts"):
        meta = d.meta or {}
        out.append(_Doc(d.id, int(meta["person"]), meta["kind"]))
    return out


def _titles(people: list[F.Person]) -> dict[int, set[str]]:
    return {p.index: {f"{p.name} (biography)", f"{p.name} (record)"} for p in people}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=str(REPO.parent / "knnstore-cache"))
    parser.add_argument("--base-store", help="A WikiText-2 valid store to copy instead of building one.")
    parser.add_argument("--real-facts", type=int, default=100)
    parser.add_argument("--test-tokens", type=int, default=8000, help="WikiText-2 test tokens for C2.")
    parser.add_argument("--remove", type=int, default=20,
                        help="C3: people whose documents are removed (at most a third of them).")
    parser.add_argument("--half", type=int, default=10,
                        help="C4: other people whose biography alone is removed (at most half of the rest).")
    parser.add_argument("--fixed-lambda", type=float, default=KNNSettings.lambda_)
    parser.add_argument("--sharp", action="store_true",
                        help="Also probe with a self-calibration that fits the sharp view of the neighbours "
                             "(self_calibrate(sharp=True, local=--local)), beside the default.")
    parser.add_argument("--local", type=float, default=0.5,
                        help="With --sharp: share of the self-calibration's chunks scored with only their own "
                             "stretch hidden (the rest of their document visible).")
    parser.add_argument("--out", default=str(REPO / "docs" / "facts"))
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    people = F.make_people(args.people, seed=args.seed)
    probes = [q for p in people for q in F.probes(p, people)]
    path = build_stores(cache, args.base_store, people)
    store = Store.open(path)
    enc = store.encoder
    lms = {"base": KNNLM(enc.model, enc.tokenizer, store, KNNSettings(exact=True, lambda_=0.0)),
           "fixed": KNNLM(enc.model, enc.tokenizer, store, KNNSettings(exact=True, lambda_=args.fixed_lambda)),
           "default": KNNLM(enc.model, enc.tokenizer, store, KNNSettings.resolve(exact=True))}
    t0 = time.perf_counter()
    policy = lms["default"].resolve_policy()
    log(f"default policy ({time.perf_counter() - t0:.0f} s): {policy.describe()}; {lms['default'].policy_note}")
    if args.sharp:  # beside the default: its self-calibration made with the sharp view (not saved)
        t0 = time.perf_counter()
        cal = self_calibrate(lms["default"], sharp=True, local=args.local)
        lms["sharp"] = lms["default"].with_policy(cal)
        log(f"sharp policy ({time.perf_counter() - t0:.0f} s): {cal.describe()}")
    titles = _titles(people)
    rows = {name: run_probes(lm, probes, titles, name) for name, lm in lms.items()}
    results = {"args": vars(args), "policy": policy.describe(), "policy_note": lms["default"].policy_note,
               "sharp_policy": lms["sharp"].policy.describe() if args.sharp else None,
               "pairs": store.stats().pairs,
               "facts_pairs": store.corpus("facts").pairs,
               "probes": {name: summarise(r) for name, r in rows.items()},
               "attribution": {name: attribution(rows[name], rows["base"]) for name in lms if name != "base"}}
    log(json.dumps(results["probes"], indent=1))
    log(json.dumps(results["attribution"], indent=1))
    results["c1"] = real_fact_control(lms, args.real_facts)
    log(f"C1 {results['c1']}")
    test = (WIKI / "test.txt").read_text(encoding="utf-8")
    results["c2"] = {}
    for name in [n for n in lms if n not in ("base", "fixed")]:
        r = evaluate(lms[name], test, max_tokens=args.test_tokens)
        results["c2"][name] = dict(tokens=r.tokens, base=r.base_ppl, fixed=r.fixed_knn_ppl, adaptive=r.knn_ppl,
                                   change=r.knn_ppl / r.base_ppl - 1, retrieved=r.retrieved_fraction)
    log(f"C2 {results['c2']}")
    results["c3"] = removal_controls(lms["default"], people, probes, rows["default"], args.seed, args.remove,
                                     args.half)
    log(f"C3/C4 {results['c3']}")
    results["seconds"] = time.perf_counter() - t_start
    results["rows"] = rows
    write_report(results, Path(args.out))


LABELS = {"base": "base LM", "fixed": "fixed λ", "default": "default", "sharp": "sharp view (opt-in)"}


def by_attribute(results: dict) -> list[str]:
    """P1 and P2 exact match per attribute: the town and year of P1 are asked in the words
    that begin a biography (the store holds that context verbatim), trade and teacher in
    the words that begin a later sentence (the stored key also saw the sentences before)."""
    names = list(results["rows"])
    lines = ["Exact match by attribute (P1: town and year begin a biography's text; trade and teacher "
             "begin a later sentence of it):", "",
             "| probe | attribute | n | " + " | ".join(LABELS[n] for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for kind in ("P1", "P2"):
        for attribute in F.ATTRIBUTES:
            cells = [[r for r in results["rows"][n] if r["kind"] == kind and r["attribute"] == attribute]
                     for n in names]
            lines.append(f"| {kind} | {attribute} | {len(cells[0])} | "
                         + " | ".join(f"{sum(r['correct'] for r in c) / max(1, len(c)):.0%}" for c in cells) + " |")
    return lines


def write_report(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=float) + "\n", encoding="utf-8")
    a = results["args"]
    cmd = "python tools/bench_facts.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in a.items() if k in ("people", "seed", "real_facts", "test_tokens"))
    cmd += f" --sharp --local {a['local']}" if a.get("sharp") else ""
    pr = results["probes"]
    names = list(pr)
    lines = [f"Command: `{cmd}` ({results['seconds'] / 60:.0f} min on 2 CPUs; exact search, greedy, the default model)",
             "",
             f"Store: WikiText-2 valid.txt plus {a['people']} fictional people in two documents each "
             f"({results['facts_pairs']:,} of {results['pairs']:,} pairs). Default policy: {results['policy']}."
             + (f" Sharp view: {results['sharp_policy']}." if results.get("sharp_policy") else ""),
             "",
             "Exact match of the greedy answer, and the answer's mean log-probability (first token / the rest):",
             "",
             "| probe | n | " + " | ".join(LABELS[n] for n in names) + " | "
             + " | ".join(f"log p, {LABELS[n]}" for n in names) + " |",
             "|---|---|" + "---|" * (2 * len(names))]
    for kind in F.KINDS:
        row = [pr[n][kind] for n in names]
        lines.append(f"| {kind} {F.KIND_NAMES[kind]} | {row[0]['n']} | "
                     + " | ".join(f"{r['exact_match']:.0%}" for r in row) + " | "
                     + " | ".join(f"{r['first_lp']:.2f} / {r['rest_lp']:.2f}" for r in row) + " |")
    adaptive_names = [n for n in names if n not in ("base", "fixed")]
    lines += ["", *by_attribute(results)]
    lines += ["", "The answer tokens' retrieval (fraction of them that searched, mean λ): "
              + "; ".join(f"{LABELS[n]}: " + ", ".join(f"{k} {pr[n][k]['retrieved']:.0%} λ {pr[n][k]['lam']:.2f}"
                                                       for k in F.KINDS) for n in names if n != "base") + ".",
              "", "Attribution (P1-P3 answered with the store and not by the base LM; the top source of the "
              "answer's tokens):", "",
              "| setting | answered | cited | own document | precision | recall | token precision | one span, own |",
              "|---|---|---|---|---|---|---|---|"]
    for name, at in results["attribution"].items():
        lines.append(f"| {LABELS[name]} | {at['answered']} | {at['cited']} | {at['own']} | {at['precision']:.1%} | "
                     f"{at['recall']:.1%} | {at['token_precision']:.1%} | {at['one_span']} |")
    c1, c2, c3 = results["c1"], results["c2"], results["c3"]
    lines += ["", "Controls:", "",
              f"* C1 real facts the base LM states: {c1['facts']}; stated with the store: "
              + ", ".join(f"{LABELS[n]} {c1[n]}" for n in names if n != "base") + ".",
              *(f"* C2 WikiText-2 test ({c['tokens']:,} tokens), {LABELS[n]}: base {c['base']:.2f}, fixed λ "
                f"{c['fixed']:.2f}, adaptive {c['adaptive']:.2f} ({c['change']:+.2%}), retrieved at {c['retrieved']:.0%}."
                for n, c in c2.items()),
              f"* C3 (default) `remove-documents` of {c3['removed_people']} people ({c3['removed_documents']} "
              f"documents with C4's, {c3['removed_pairs']:,} pairs, {c3['seconds']:.2f} s): their "
              f"{c3['removed_probes']} probes' answer log-probabilities differ from those with the documents hidden "
              f"before the removal by at most {c3['max_abs_diff_vs_hidden']:.2e}; answers stated "
              f"{c3['removed_correct_before']} before, {c3['removed_correct_after']} after; the other people's "
              f"{c3['others']} probes: {c3['others_changed']} changed.",
              f"* C4 (default) a fact in two documents, the biography removed ({c3['c4_people']} people, P1-P3): "
              f"stated {c3['c4_correct_before']} of {c3['c4_probes']} before, {c3['c4_correct_after']} after (the "
              "record still holds them): " + ", ".join(f"{k} {v[0]} -> {v[1]} of {v[2]}"
                                                      for k, v in c3["c4_by_kind"].items()),
              ""]
    out.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    plot(results, out.with_suffix(".png"))
    log("\n".join(lines))


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["probes"])
    fig, ax = plt.subplots(figsize=(7.5, 4), dpi=120)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [results["probes"][name][k]["exact_match"] * 100 for k in F.KINDS]
        ax.bar(np.arange(len(F.KINDS)) + (i - (len(names) - 1) / 2) * width, vals, width, label=LABELS[name])
    ax.set_xticks(np.arange(len(F.KINDS)), [f"{k}\n{F.KIND_NAMES[k]}" for k in F.KINDS])
    ax.set_ylabel("exact match of the greedy answer (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Facts the store holds, stated by the model")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
