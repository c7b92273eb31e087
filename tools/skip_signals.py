"""How much more search could be skipped if the skip decision also used the previous
position's retrieval (issue 21, part 3: an offline estimate, not yet what the adapter does).

    python tools/skip_signals.py [--cache DIR]

Needs the records `tools/domains.py --self-tokens 16384` caches (DIR/records). For each
domain's store: the self-calibration (fitted on the store's own text, as the default is)
and two skip rules, both chosen on the store's own text only and then scored on the
in-domain test cell:

* today's: skip where the LM's top probability >= the calibration's threshold;
* with the previous step: a linear predictor of the mixture's gain at a position from
  the LM's top probability and entropy there and, at the previous position, the λ used,
  the neighbours' agreement, the nearest distance and the LM's top probability (all known
  before this position's search); skip below the highest cut that keeps 90% of the best
  fixed λ's gain on the store's own text.

Prints, per store, the share of positions skipped and of the best fixed λ's gain kept.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from domains import DOMAINS, REPO
from knnstore.adaptive import SIGNALS, Calibration, Records, best_fixed, fit, mixture_log_prob


def features(rec: Records, cal: Calibration) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, 6] skip features (this position's LM signals, the previous position's
    retrieval) and the calibrated λ of every position."""
    col = SIGNALS.index
    lam = cal.lambdas(rec.signals)

    def prev(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x[:1]), x[:-1]])

    s = rec.signals
    x = torch.stack([s[:, col("lm_top")], s[:, col("lm_entropy")], prev(lam), prev(s[:, col("knn_top")]),
                     prev(s[:, col("log_d1")]), prev(s[:, col("lm_top")])], dim=1).double()
    return x, lam


def gain(rec: Records, lam: torch.Tensor) -> torch.Tensor:
    return mixture_log_prob(rec.lm_target, rec.knn_target, rec.has, lam) - rec.lm_target.double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=str(REPO.parent / "knnstore-cache"))
    parser.add_argument("--self-tokens", type=int, default=16384)
    args = parser.parse_args()
    records = Path(args.cache) / "records"
    for domain in DOMAINS:
        own = Records(**torch.load(records / f"{domain}__self__{args.self_tokens}.pt"))
        test = Records(**torch.load(records / f"{domain}__{domain}__8000.pt"))
        cal = fit(own, k=128, temperature=3.0, init_lambda=0.15, keep=0.9)
        x, lam = features(own, cal)
        g = gain(own, lam)
        mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=0.05)
        target = g.clamp(-1, 1)
        for _ in range(400):
            opt.zero_grad()
            loss = (((x - mean) / std @ w + b - target) ** 2).mean()
            loss.backward()
            opt.step()
        predict = lambda feats: ((feats - mean) / std @ w + b).detach()  # noqa: E731
        own_pred, (_, own_best) = predict(x), best_fixed(own)
        cut = None
        for q in [i / 100 for i in range(5, 80, 5)]:
            c = float(torch.quantile(own_pred, q))
            if float(g[own_pred >= c].sum()) >= 0.9 * own_best:
                cut = c
        xt, lt = features(test, cal)
        gt, (_, best) = gain(test, lt), best_fixed(test)
        top = test.signals[:, SIGNALS.index("lm_top")]
        rules = {f"LM top probability < {cal.skip_above_prob}": top < (cal.skip_above_prob or 2.0),
                 "predicted gain with the previous step >= cut": predict(xt) >= cut if cut is not None
                 else torch.ones(len(test), dtype=torch.bool)}
        for name, retrieve in rules.items():
            print(f"{domain:12s} {name:46s} skipped {100 * (1 - float(retrieve.double().mean())):3.0f}%, "
                  f"kept {100 * float(gt[retrieve].sum()) / best:3.0f}% of the best fixed λ's gain")


if __name__ == "__main__":
    main()
