"""Fixed vs adaptive interpolation across domains: three stores x three test sets.

    python tools/domains.py [--cache DIR] [--tokens 8000] [--outside] [--out docs/domains]

Stores (built once with the default model, cached in --cache; rerunning reuses them and
every per-cell result already computed):

* wiki:        WikiText-2 valid.txt, one document per article (--split-on-heading)
* shakespeare: Tiny Shakespeare train.txt
* gutenberg:   the last 100,000 characters of each Gutenberg book's training part
               (../shared/data/gutenberg/docs, ten documents)

* wiki+shakespeare, all three: the same corpora, two and three in one store (the default
  on a store that mixes domains)
* python (with --outside, a domain none of the project's data covers): this interpreter's
  standard library source of email, http, logging and urllib, one document per file

Test sets: the first --tokens tokens of WikiText-2 test.txt and of Tiny Shakespeare
test.txt, and ten evenly spaced pieces of Gutenberg test.txt (so every book is in it)
(and of the standard library's asyncio source, with --outside).

Each store is calibrated twice: on its own text, with no user text (``knnstore calibrate
STORE``: pieces of its documents scored with their own document hidden, ``--self-tokens``
positions), and on held-out text of its own domain (``knnstore calibrate STORE --text``):
the last 250,000 characters of WikiText-2 test.txt (disjoint from the scored tokens), Tiny
Shakespeare valid.txt, Gutenberg valid.txt (the standard library's unittest source); the
mixed stores only on their own text. The self-calibration is saved in the store last, so
``knnstore eval STORE --text FILE --max-tokens 8000 --exact`` (the default: adaptive)
reproduces its cells.

Every cell is one exact-search pass at k=128, T=3 that keeps each position's signals and
target probabilities; base, fixed λ (the default and the best of a grid), the rule and
the calibrated policies are all scored from it, skipping decided position by position as
eval and generation decide it. Writes OUT.md (the table) and OUT.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

from knnstore import Store, knn
from knnstore.adapter import KNNLM
from knnstore.adaptive import (SIGNALS, Calibration, Policy, Records, Rule, fit, mixture_log_prob, recognised,
                               shifted, skip_features, trail)
from knnstore.config import KNNSettings
from knnstore.encoder import Encoder
from knnstore.evaluate import SELF_SOURCE, SELF_TOKENS, evaluate, self_records

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
LAMBDAS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
DOMAINS = ("wiki", "shakespeare", "gutenberg")
# Stores that mix domains (the corpora of the single-domain stores, added one by one):
# their cells show the self-calibrated default only (no held-out text of a mixture).
MIXED = {"mix2": ("wiki", "shakespeare"), "mix3": DOMAINS}
# With --outside, a fourth domain none of the project's data covers: Python source code
# (this interpreter's standard library; the store, its test text and its held-out text
# from disjoint packages).
OUTSIDE = "python"
PYTHON_STORE = ("email", "http", "logging", "urllib")
PYTHON_TEST, PYTHON_HELDOUT = "asyncio", "unittest"
LABELS = {"mix2": "wiki+shakespeare", "mix3": "all three"}


def prepare_texts(cache: Path) -> dict[str, dict[str, Path]]:
    """Write the derived texts (test samples, held-out calibration text, Gutenberg tails)."""
    texts = cache / "texts"
    (texts / "gutenberg-tails").mkdir(parents=True, exist_ok=True)
    for book in sorted((DATA / "gutenberg" / "docs").glob("*.txt")):
        tail = book.read_text(encoding="utf-8")[-100_000:]
        tail = tail.split("\n", 1)[1] if "\n" in tail else tail  # start at a whole line
        target = texts / "gutenberg-tails" / book.name
        if not target.exists():
            target.write_text(tail, encoding="utf-8")
    wiki_test = (DATA / "wikitext-2" / "test.txt").read_text(encoding="utf-8")
    heldout = wiki_test[-250_000:]
    (texts / "wiki-heldout.txt").write_text(heldout[heldout.index("\n") + 1:], encoding="utf-8")
    (texts / "gutenberg-test.txt").write_text(pieces((DATA / "gutenberg" / "test.txt").read_text(encoding="utf-8")),
                                              encoding="utf-8")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (texts / "python-store").mkdir(exist_ok=True)
    for package in PYTHON_STORE:
        for source in sorted((stdlib / package).rglob("*.py")):
            target = texts / "python-store" / f"{package}__{'__'.join(source.relative_to(stdlib / package).parts)}.txt"
            if not target.exists():
                target.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")

    def package_text(package: str) -> str:
        return "\n".join(p.read_text(encoding="utf-8") for p in sorted((stdlib / package).rglob("*.py")))

    (texts / "python-test.txt").write_text(pieces(package_text(PYTHON_TEST)), encoding="utf-8")
    (texts / "python-heldout.txt").write_text(package_text(PYTHON_HELDOUT), encoding="utf-8")
    return {
        "store": {"wiki": DATA / "wikitext-2" / "valid.txt",
                  "shakespeare": DATA / "tinyshakespeare" / "train.txt",
                  "gutenberg": texts / "gutenberg-tails", OUTSIDE: texts / "python-store"},
        "test": {"wiki": DATA / "wikitext-2" / "test.txt",
                 "shakespeare": DATA / "tinyshakespeare" / "test.txt",
                 "gutenberg": texts / "gutenberg-test.txt", OUTSIDE: texts / "python-test.txt"},
        "calibrate": {"wiki": texts / "wiki-heldout.txt",
                      "shakespeare": DATA / "tinyshakespeare" / "valid.txt",
                      "gutenberg": DATA / "gutenberg" / "valid.txt", OUTSIDE: texts / "python-heldout.txt"},
    }


def pieces(text: str, n: int = 10, size: int = 4_000) -> str:
    """``n`` evenly spaced pieces of ``text``, each whole lines adding up to ``size`` characters."""
    lines = text.splitlines(keepends=True)
    out = []
    for i in range(n):
        piece, length = [], 0
        for line in lines[i * len(lines) // n:]:
            piece.append(line)
            length += len(line)
            if length >= size:
                break
        out.append("".join(piece))
    return "\n".join(out)


def knnstore_cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "knnstore", *args]
    print("$ knnstore " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def build_store(path: Path, sources: dict[str, Path]) -> None:
    """Build the store with the CLI, one corpus per domain (resumable: ready corpora are
    kept, one left half-added is removed and added again)."""
    if not (path / "knnstore.json").exists():
        knnstore_cli("init", str(path))
    for domain, source in sources.items():
        corpora = {c.name: c.status for c in Store.open(path).corpora()}
        if corpora.get(domain) == "ready":
            continue
        if domain in corpora:
            knnstore_cli("remove-corpus", str(path), domain)
        extra = ["--split-on-heading"] if domain == "wiki" else []
        knnstore_cli("add-corpus", str(path), domain, str(source), *extra)


def ppl(log_probs: torch.Tensor) -> float:
    return knn.perplexity(-float(log_probs.double().sum()), len(log_probs))


def score(rec: Records, policy: Policy, lambda_: float) -> tuple[float, float, float]:
    """Perplexity of the policy's mixture (λ = 0 where it skips retrieval, decided
    position by position as eval and generation do), the fraction of positions that
    retrieve, and the perplexity with every position retrieving."""
    lambdas = policy.lambdas(rec.signals, lambda_).double().clamp(0, 1)
    knn_target = policy.knn_target_of(rec)  # p_kNN as the policy mixes it (the sharp view where recognised)
    retrieve, _ = policy.retrieval(rec.signals, lambdas, rec.lm_target, knn_target, rec.has)
    lam = torch.where(retrieve, lambdas, torch.zeros_like(lambdas))
    return (ppl(mixture_log_prob(rec.lm_target, knn_target, rec.has & retrieve, lam)),
            float(retrieve.double().mean()), ppl(mixture_log_prob(rec.lm_target, knn_target, rec.has, lambdas)))


def skipped_at_cost(rec: Records, policy: Calibration, cost: float = 0.01) -> tuple[float, float]:
    """How much retrieval each way of skipping can save on ``rec`` at a given perplexity
    cost against always retrieving (the best cut on ``rec`` itself): the LM's top
    probability alone, and the policy's ``SkipRule`` (the previous position too)."""
    lambdas = policy.lambdas(rec.signals).double()
    knn_target = policy.knn_target_of(rec)
    gain = mixture_log_prob(rec.lm_target, knn_target, rec.has, lambdas) - rec.lm_target.double()
    budget, total, n = math.log1p(cost) * len(rec), float(gain.sum()), len(rec)

    def best(masks) -> float:
        return max((1 - float(r.double().mean()) for r in masks if total - float(gain[r].sum()) <= budget),
                   default=0.0)

    top = rec.signals[:, SIGNALS.index("lm_top")]
    by_top = best(top < t for t in torch.linspace(0.0, 1.0, 201)[1:].tolist() + [2.0])
    rule = policy.skip_rule
    if rule is None:
        return by_top, by_top
    full = trail(rec.signals, lambdas, rec.lm_target, knn_target, rec.has, torch.ones(n, dtype=torch.bool))
    scores = rule.scores(skip_features(rec.signals, shifted(full)))
    cuts = torch.quantile(scores, torch.linspace(0.0, 0.95, 96, dtype=torch.float64)).tolist()
    by_trail = best(dataclasses.replace(rule, cut=c).sequence(rec.signals, full)[0] for c in cuts)
    return by_top, by_trail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=str(REPO.parent / "knnstore-cache"),
                        help="Where the stores, texts and per-cell results are kept.")
    parser.add_argument("--tokens", type=int, default=8000, help="Scored tokens per test set.")
    parser.add_argument("--calibration-tokens", type=int, default=20000)
    parser.add_argument("--self-tokens", type=int, default=SELF_TOKENS,
                        help="Positions of the store's own text a self-calibration scores.")
    parser.add_argument("--kind", default="logistic", choices=("logistic", "mlp"))
    parser.add_argument("--keep", type=float, default=0.9,
                        help="Share of the best fixed λ's gain that skipping keeps (knnstore calibrate --keep).")
    parser.add_argument("--outside", action="store_true",
                        help="Add a domain the project's data does not cover: Python source code.")
    parser.add_argument("--out", default=str(REPO / "docs" / "domains"))
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    paths = prepare_texts(cache)
    domains = (*DOMAINS, OUTSIDE) if args.outside else DOMAINS
    stores = {d: cache / f"domain-{d}" for d in (*domains, *MIXED)}
    for d in domains:
        build_store(stores[d], {d: paths["store"][d]})
    for m, parts in MIXED.items():
        build_store(stores[m], {d: paths["store"][d] for d in parts})

    settings = KNNSettings(exact=True)  # k=128, λ=0.15, T=3
    encoder = None
    results = {}
    (cache / "records").mkdir(exist_ok=True)
    for sd in (*domains, *MIXED):
        store = Store.open(stores[sd])
        if encoder is None:
            encoder = Encoder.load(store.identity.model, key_layer=store.identity.key_layer,
                                   key_site=store.identity.key_site)
        lm = KNNLM(encoder.model, encoder.tokenizer, store, settings)
        store.clear_calibrations()
        cal = None
        if sd not in MIXED:
            # What `knnstore calibrate STORE --text FILE --max-tokens N --exact` does, with the
            # scored positions cached (the scoring is the slow part; the fit takes seconds).
            t0 = time.perf_counter()
            cal_rec = records(cache / "records" / f"{sd}__calibration__{args.calibration_tokens}.pt",
                              lm, paths["calibrate"][sd], args.calibration_tokens)
            cal = fit(cal_rec, kind=args.kind, k=settings.k, temperature=settings.temperature,
                      init_lambda=settings.lambda_, keep=args.keep)
            store.save_calibration(cal, text_source=str(paths["calibrate"][sd]), n_tokens=len(cal_rec))
            print(f"calibrated {sd} in {time.perf_counter() - t0:.0f} s: {cal.describe()}", flush=True)
        # What `knnstore calibrate STORE --max-tokens N --exact` (no text) does, cached the same way.
        t0 = time.perf_counter()
        self_path = cache / "records" / f"{sd}__self__{args.self_tokens}.pt"
        if self_path.exists():
            self_rec = Records(**torch.load(self_path))
        else:
            self_rec = self_records(lm, tokens=args.self_tokens)
            torch.save(vars(self_rec), self_path)
        own = fit(self_rec, kind=args.kind, k=settings.k, temperature=settings.temperature,
                  init_lambda=settings.lambda_, keep=args.keep)
        store.save_calibration(own, text_source=SELF_SOURCE, n_tokens=own.tokens)
        print(f"self-calibrated {sd} in {time.perf_counter() - t0:.0f} s: {own.describe()}", flush=True)
        for td in domains:
            rec = records(cache / "records" / f"{sd}__{td}__{args.tokens}.pt", lm, paths["test"][td], args.tokens)
            base = ppl(rec.lm_target)
            fixed = {lam: ppl(mixture_log_prob(rec.lm_target, rec.knn_target, rec.has,
                                               torch.full((len(rec),), lam, dtype=torch.float64)))
                     for lam in LAMBDAS}
            best_lam = min(fixed, key=fixed.get)
            rule_ppl, rule_ret, _ = score(rec, Rule(), settings.lambda_)
            own_ppl, own_ret, own_always = score(rec, own, settings.lambda_)
            r = dict(base=base, fixed=fixed[settings.lambda_], best=fixed[best_lam], best_lambda=best_lam,
                     rule=rule_ppl, rule_retrieved=rule_ret, own=own_ppl, own_retrieved=own_ret,
                     own_always=own_always, tokens=len(rec), in_domain=td in MIXED.get(sd, (sd,)),
                     recognised=int(recognised(rec.signals).sum()))
            if cal is not None:
                r["calibrated"], r["retrieved"], _ = score(rec, cal, settings.lambda_)
            if r["in_domain"]:
                r["skipped_by_top"], r["skipped_by_trail"] = skipped_at_cost(rec, own)
            results[sd, td] = r
            print(sd, td, {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
    write_report(results, args, stores, paths)


def records(cached: Path, lm: KNNLM, text: Path, tokens: int) -> Records:
    """Each position's signals and target log-probabilities for the first `tokens` tokens
    of `text` (one exact-search evaluate pass), cached in `cached`."""
    if cached.exists():
        return Records(**torch.load(cached))
    parts: list[Records] = []
    evaluate(lm, text.read_text(encoding="utf-8"), max_tokens=tokens, records=parts)
    rec = Records.concat(parts)
    torch.save(vars(rec), cached)
    return rec


def write_report(results, args, stores, paths) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    pct = lambda x, base: f"{100 * (x / base - 1):+.1f}%"  # noqa: E731
    lines = [
        "| store ↓ / test → | tokens | base LM | fixed λ=0.15 | best fixed λ | rule | **self-calibrated** (no user text, "
        "the default) | retrieved | skipping costs | calibrated on held-out text | retrieved |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (sd, td), r in results.items():
        b = r["base"]
        mark = " **(in-domain)**" if r["in_domain"] else ""
        held = (f"{r['calibrated']:.2f} ({pct(r['calibrated'], b)}) | {100 * r['retrieved']:.0f}%"
                if "calibrated" in r else "- | -")
        lines.append(
            f"| {LABELS.get(sd, sd)} / {td}{mark} | {r['tokens']:,} | {b:.2f} | {r['fixed']:.2f} ({pct(r['fixed'], b)}) | "
            f"{r['best']:.2f} ({pct(r['best'], b)}, λ={r['best_lambda']:g}) | {r['rule']:.2f} ({pct(r['rule'], b)}) | "
            f"**{r['own']:.2f} ({pct(r['own'], b)})** | {100 * r['own_retrieved']:.0f}% | "
            f"{pct(r['own'], r['own_always'])} | {held} |")

    def summary_line(label: str, cells: dict, key: str, retrieved: str) -> str:
        worst = max(r[key] / r["base"] - 1 for r in cells.values())
        kept = [(r["base"] - r[key]) / (r["base"] - r["best"]) for r in cells.values()
                if r["in_domain"] and r["base"] > r["best"]]
        skipped = [1 - r[retrieved] for r in cells.values() if r["in_domain"]]
        line = (f"- {label}: worst cell vs base {100 * worst:+.2f}% (target: at most +1%); in-domain share of the best "
                f"fixed-λ gain kept {', '.join(f'{100 * k:.0f}%' for k in kept)} (target: at least 90%); in-domain "
                f"retrieval skipped {', '.join(f'{100 * s:.0f}%' for s in skipped)} (target: at least 30%)")
        if key == "own":
            costs = [r["own"] / r["own_always"] - 1 for r in cells.values() if r["in_domain"]]
            line += f", costing {', '.join(f'{100 * c:+.2f}%' for c in costs)} against always retrieving (target: at most +1%)"
        return line

    single = {c: r for c, r in results.items() if c[0] not in MIXED}
    mixed = {c: r for c, r in results.items() if c[0] in MIXED}
    summary = [summary_line("self-calibrated (no user text), single-domain stores", single, "own", "own_retrieved"),
               summary_line("calibrated on held-out text, single-domain stores", single, "calibrated", "retrieved")]
    if mixed:
        summary.append(summary_line("self-calibrated (no user text), mixed stores", mixed, "own", "own_retrieved"))
    equal = [(f"{LABELS.get(sd, sd)}/{td}", r) for (sd, td), r in results.items() if "skipped_by_trail" in r]
    summary.append("- retrieval skipped at +1% perplexity against always retrieving (each way's best cut on the "
                   "cell itself): by the LM's top probability alone / with the previous position "
                   + ", ".join(f"{name} {100 * r['skipped_by_top']:.0f}% / {100 * r['skipped_by_trail']:.0f}%"
                               for name, r in equal))
    summary.append("- positions whose context the store holds verbatim (``adaptive.recognised``: the sharp view, "
                   "λ ≥ 0.9, in every policy): " + ", ".join(f"{LABELS.get(sd, sd)}/{td} {r['recognised']}"
                                                            for (sd, td), r in results.items()))
    cmd = (f"python tools/domains.py --tokens {args.tokens} --calibration-tokens {args.calibration_tokens} "
           f"--self-tokens {args.self_tokens} --kind {args.kind} --keep {args.keep:g}"
           + (" --outside" if args.outside else ""))
    md = "\n".join([f"Command: `{cmd}` (stores cached in `{args.cache}`)", "", *lines, "", *summary, ""])
    out.with_suffix(".md").write_text(md, encoding="utf-8")
    print(md)

    cells = list(results)
    fig, ax = plt.subplots(figsize=(max(9.0, 0.8 * len(cells)), 4.8), dpi=120)
    series = (("fixed", "fixed λ=0.15"), ("best", "best fixed λ per cell"), ("rule", "rule (no calibration)"),
              ("own", "self-calibrated (no user text)"), ("calibrated", "calibrated on held-out text"))
    width = 0.16
    for i, (key, label) in enumerate(series):
        ys = [100 * (results[c].get(key, results[c]["base"]) / results[c]["base"] - 1) for c in cells]
        ax.bar([j + (i - 2) * width for j in range(len(cells))], ys, width, label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axhline(1, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([f"{LABELS.get(sd, sd)}\nstore on\n{td}" for sd, td in cells], fontsize=6)
    ax.set_ylabel("perplexity change vs base LM (%)")
    ax.set_title("kNN-LM across domains: fixed vs adaptive interpolation (SmolLM2-135M, k=128, T=3)")
    ax.set_ylim(bottom=ax.get_ylim()[0] - 3)  # room for the legend below the bars
    ax.legend(fontsize=8, loc="lower left", ncol=5)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
