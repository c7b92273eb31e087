"""Adaptive interpolation: signals, the rule, fitting a calibration, and their use in the
adapter, evaluate() and the CLI (tiny random-weight models)."""

import dataclasses
import json
import math

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from knnstore import KNNLM, InputError, knn
from knnstore.adaptive import (SIGNALS, SKIP_COST, SKIP_FEATURES, TRAIL, Calibration, Records, Rule, SkipRule, recognised,
                               RECOGNISED_LAMBDA,
                               best_fixed, choose_skip, fit, mixture_log_prob, signals, unsearched)
from knnstore.cli import cli
from knnstore.evaluate import calibrate

from .conftest import changed, snapshot
from .test_adapter import CITIZEN, HAMLET, LOBSTER, knn_store  # noqa: F401  (fixture)

OTHER = ("Quarterly revenue rose four percent while operating margins narrowed, according to "
         "the filing published on Tuesday by the company's auditors. ")


def col(name):
    return SIGNALS.index(name)


def test_signals_of_a_hand_made_example():
    d = torch.tensor([[0.0, 1.0, math.inf], [math.inf, math.inf, math.inf]])
    nt = torch.tensor([[7, 7, -1], [-1, -1, -1]])
    lm = torch.log_softmax(torch.zeros(2, 10), dim=-1)  # uniform over 10 tokens
    s = signals(d, nt, lm, temperature=1.0)
    assert s.shape == (2, len(SIGNALS))
    assert s[0, col("knn_top")] == pytest.approx(1.0)
    assert s[0, col("knn_entropy")] == pytest.approx(0.0, abs=1e-9)
    assert s[0, col("lm_entropy")] == pytest.approx(math.log(10))
    assert s[0, col("lm_top")] == pytest.approx(0.1)
    assert s[0, col("lm_on_knn_top")] == pytest.approx(math.log(0.1))
    assert s[0, col("log_d1")] == pytest.approx(math.log(1e-6))
    # No neighbours: retrieval signals are 0, the LM's own are kept (skipping uses them).
    assert s[1, col("knn_top")] == 0 and s[1, col("log_d1")] == 0
    # the nearest at distance 0, the eighth at 1: a context stored verbatim...
    d8 = torch.tensor([[0.0] + [1.0] * 7, [0.5] + [1.0] * 7])
    nt8 = torch.full((2, 8), 7)
    assert recognised(signals(d8, nt8, lm, temperature=1.0)).tolist() == [True, False]
    # ...unless the nearest is a document's first position (a one-token context: the
    # attention sink's key, about the same for any first token)
    first = signals(d8, nt8, lm, temperature=1.0, positions=torch.tensor([[0] + [5] * 7] * 2))
    later = signals(d8, nt8, lm, temperature=1.0, positions=torch.tensor([[4] + [5] * 7] * 2))
    assert recognised(first).tolist() == [False, False] and recognised(later).tolist() == [True, False]
    assert s[1, col("lm_top")] == pytest.approx(0.1)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 12), st.floats(0.3, 5.0))
def test_agreement_signals_equal_those_of_the_full_knn_distribution(seed, k, temperature):
    g = torch.Generator().manual_seed(seed)
    n, vocab = 5, 9
    d = torch.rand(n, k, generator=g).sort(dim=1).values * 4
    nt = torch.randint(0, vocab, (n, k), generator=g)
    nt[0, -1] = -1  # an empty slot
    lm = torch.log_softmax(torch.randn(n, vocab, generator=g), dim=-1)
    s = signals(d, nt, lm, temperature)
    p = knn.knn_log_probs(d, nt, vocab, temperature).double().exp()
    assert torch.allclose(s[:, col("knn_top")], p.max(dim=1).values, atol=1e-6)
    assert torch.allclose(s[:, col("knn_entropy")], knn.entropy(p.log()), atol=1e-5)
    assert torch.allclose(s[:, col("knn_on_lm_top")], p.gather(1, lm.argmax(1, keepdim=True)).squeeze(1),
                          atol=1e-6)


def test_the_rule_weighs_agreeing_neighbours_fully_and_split_votes_little():
    d = torch.zeros(2, 4)
    nt = torch.tensor([[3, 3, 3, 3], [1, 2, 3, 4]])
    s = signals(d, nt, torch.log_softmax(torch.zeros(2, 6), -1), 1.0)
    lam = Rule().lambdas(s, 0.4)
    assert lam[0] == pytest.approx(0.4) and lam[1] == pytest.approx(0.4 / 16)


def _synthetic(n: int, seed: int, helpful: bool) -> Records:
    """Positions whose kNN target probability is high when the nearest distance is small."""
    g = torch.Generator().manual_seed(seed)
    sig = torch.randn(n, len(SIGNALS), generator=g, dtype=torch.float64)
    sig[:, col("recognised")] = 0.0  # nothing stored verbatim
    close = sig[:, col("log_d1")] < 0
    # Close neighbours agree on a token (knn_top 1); far ones split their votes.
    sig[:, col("knn_top")] = torch.where(close, 1.0, 0.5 * torch.rand(n, generator=g, dtype=torch.float64))
    lm_t = torch.full((n,), math.log(0.1), dtype=torch.float64)
    good = math.log(0.9) if helpful else math.log(1e-4)
    knn_t = torch.where(close, torch.tensor(good, dtype=torch.float64), torch.tensor(math.log(1e-4), dtype=torch.float64))
    return Records(sig, lm_t, knn_t, torch.ones(n, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_a_fit_trusts_close_neighbours_and_beats_a_fixed_lambda_on_held_out_rows(kind):
    cal = fit(_synthetic(4000, 0, helpful=True), kind=kind, k=8, temperature=1.0, init_lambda=0.15)
    test = _synthetic(1000, 1, helpful=True)
    lam = cal.lambdas(test.signals)
    d1 = test.signals[:, col("log_d1")]
    assert float(lam[d1 < -1].mean()) > 0.8 and float(lam[d1 > 1].mean()) < 0.05
    h = cal.metrics["holdout"]
    assert h["calibrated_ppl"] < h["fixed_ppl"] < h["base_ppl"]
    assert cal.metrics["holdout"]["tokens"] == 800 and cal.metrics["fit"]["tokens"] == 3200


def test_a_store_that_never_helps_gets_lambda_near_zero():
    cal = fit(_synthetic(3000, 0, helpful=False), k=8, temperature=1.0, init_lambda=0.15)
    h = cal.metrics["holdout"]
    assert h["fixed_ppl"] > 1.1 * h["base_ppl"]  # a fixed λ hurts
    assert h["calibrated_ppl"] < 1.005 * h["base_ppl"]  # the fitted one does not
    assert h["mean_lambda"] < 0.01


def test_the_skip_threshold_keeps_the_asked_share_of_the_gain():
    rec = _synthetic(2000, 3, helpful=True)
    rec.signals[:, col("lm_top")] = torch.rand(2000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cal = fit(rec, k=8, temperature=1.0)
    threshold, retrieved = choose_skip(rec, cal, keep=0.9)
    assert threshold is not None and retrieved < 1.0
    lam = cal.lambdas(rec.signals)
    gain = mixture_log_prob(rec.lm_target, rec.knn_target, rec.has, lam) - rec.lm_target
    kept = gain[rec.signals[:, col("lm_top")] < threshold].sum() / gain.sum()
    assert kept >= 0.9
    assert retrieved == pytest.approx(float((rec.signals[:, col("lm_top")] < threshold).double().mean()))

    # Against a smaller reference gain (a fixed λ's), it may skip more, never less.
    lower, retrieved_lower = choose_skip(rec, cal, keep=0.9, reference_gain=0.5 * float(gain.sum()))
    assert lower <= threshold and retrieved_lower <= retrieved
    assert gain[rec.signals[:, col("lm_top")] < lower].sum() >= 0.9 * 0.5 * gain.sum()


def test_fit_reports_the_best_fixed_lambda_and_keeps_its_gain():
    rec = _synthetic(2000, 5, helpful=True)
    rec.signals[:, col("lm_top")] = torch.rand(2000, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    cal = fit(rec, k=8, temperature=1.0, keep=0.9)
    lam, best_gain = best_fixed(rec)
    assert cal.metrics["best_fixed_lambda"] == lam and best_gain > 0
    ada = cal.lambdas(rec.signals)
    retrieve, _ = cal.retrieval(rec.signals, ada, rec.lm_target, rec.knn_target, rec.has)
    kept = (mixture_log_prob(rec.lm_target, rec.knn_target, rec.has & retrieve, ada) - rec.lm_target).sum()
    assert kept >= 0.9 * best_gain


def test_a_calibration_survives_the_catalog_unchanged(knn_store):  # noqa: F811
    cal = fit(_synthetic(500, 0, helpful=True), kind="mlp", k=8, temperature=1.0)
    assert knn_store.calibration() is None
    knn_store.save_calibration(cal, text_source="held-out.txt", n_tokens=500)
    back = knn_store.calibration()
    assert isinstance(back, Calibration) and back.to_dict() == cal.to_dict()
    sig = torch.randn(7, len(SIGNALS), dtype=torch.float64)
    sig[:, col("recognised")] = 0.0  # nothing stored verbatim
    assert torch.equal(back.lambdas(sig), cal.lambdas(sig))
    assert knn_store.clear_calibrations() == 1 and knn_store.calibration() is None


@pytest.fixture
def lm(knn_store, tiny_encoder):  # noqa: F811
    return KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, knn_store, k=8, lambda_=0.5, temperature=1.0)


def test_adaptive_eval_uses_a_lambda_per_token_and_reports_the_fixed_one_beside_it(lm):
    fixed = lm.evaluate(LOBSTER + OTHER)
    assert fixed.adaptive is None and "adaptive" not in fixed.to_dict()
    ada = lm.with_policy(Rule()).with_settings(skip_above_prob=1.0).evaluate(LOBSTER + OTHER)
    assert ada.adaptive.startswith("rule")
    assert ada.fixed_knn_ppl == pytest.approx(fixed.knn_ppl, rel=1e-9)
    assert ada.base_ppl == fixed.base_ppl and ada.knn_ppl != fixed.knn_ppl
    assert 0 < ada.mean_lambda < 0.5
    d = ada.to_dict()
    for key in ("base_ppl", "knn_ppl", "retrieved_fraction", "adaptive", "fixed_knn_ppl", "mean_lambda"):
        assert key in d


def test_adaptive_eval_equals_scoring_its_records_offline(lm):
    parts = []
    # searching every position: a followed position sees only the pairs that continue (all
    # verbatim here), so none of them stands out as the text's own stored context
    ada = lm.with_policy(Rule()).with_settings(skip_above_prob=1.0, follow=False)
    r = ada.evaluate(HAMLET + CITIZEN, records=parts)
    rec = Records.concat(parts)
    lam = Rule().lambdas(rec.signals, 0.5)
    offline = math.exp(-float(mixture_log_prob(rec.lm_target, Rule().knn_target_of(rec), rec.has, lam).mean()))
    assert r.knn_ppl == pytest.approx(offline, rel=1e-9)
    assert bool(recognised(rec.signals).any())  # the text is stored: some contexts are stored verbatim


def test_adaptive_generation_mixes_with_the_rule_and_lambda_zero_stays_the_plain_lm(lm):
    # (not a stored document's beginning: see the next test for what happens there)
    g = lm.with_policy(Rule()).with_settings(skip_above_prob=1.0).generate("So the European", max_new_tokens=5,
                                                                             explain=True)
    assert len(g.tokens) == 5 and g.retrieved_fraction == 1.0
    assert all(0.0 <= t.knn_weight <= 0.5 for t in g.tokens)
    plain = lm.with_settings(lambda_=0.0).generate("The European", max_new_tokens=5)
    off = lm.with_settings(lambda_=0.0, adaptive=True).generate("The European", max_new_tokens=5)
    assert off.token_ids == plain.token_ids and off.retrieved_fraction == 0.0


def test_a_prompt_that_begins_as_a_stored_document_goes_on_as_it_does(lm):
    # The prompt is the start of the stored lobster document: its context is stored verbatim
    # (within the store's first window of 16 tokens, where the stored keys saw exactly this),
    # so every adaptive policy takes the sharp view with λ >= RECOGNISED_LAMBDA there.
    prompt = "The Euro"
    rule = lm.with_policy(Rule()).with_settings(skip_above_prob=1.0)
    g = rule.generate(prompt, max_new_tokens=4, explain=True)
    assert LOBSTER.startswith(prompt + g.text)
    assert all(t.knn_weight >= RECOGNISED_LAMBDA - 1e-6 and t.p_knn > 0.99 for t in g.tokens)
    plain = lm.with_settings(lambda_=0.0).generate(prompt, max_new_tokens=4)
    assert not LOBSTER.startswith(prompt + plain.text)  # the model alone does not know it
    # elsewhere nothing is recognised: λ stays the rule's
    other = rule.generate("Quarterly revenue of the European", max_new_tokens=4, explain=True)
    assert all(t.knn_weight <= 0.5 for t in other.tokens)


def test_calibrate_fits_on_text_and_adaptive_then_uses_the_calibration(lm):
    cal = calibrate(lm, (LOBSTER + OTHER + HAMLET) * 6, kind="logistic")
    assert cal.k == 8 and cal.temperature == 1.0 and set(cal.metrics) >= {"fit", "holdout", "retrieved_fraction"}
    lm.store.save_calibration(cal, text_source="t", n_tokens=100)
    fresh = KNNLM(lm.model, lm.tokenizer, lm.store, k=8, lambda_=0.5, temperature=1.0, adaptive=True)
    assert isinstance(fresh.resolve_policy(), Calibration)
    r = fresh.evaluate(LOBSTER + OTHER)
    assert r.adaptive.startswith("calibrated")
    with pytest.raises(InputError, match="at least 100 tokens"):
        calibrate(lm, LOBSTER)


def test_cli_calibrate_then_eval_adaptive_and_clear(knn_store, tmp_path):  # noqa: F811
    runner = CliRunner()
    path = str(knn_store.path)
    text = tmp_path / "held-out.txt"
    text.write_text((LOBSTER + OTHER + CITIZEN) * 6)
    result = runner.invoke(cli, ["calibrate", path, "--text", str(text), "--k", "8", "--temperature", "1",
                                 "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["id"] == 1 and d["kind"] == "logistic" and d["metrics"]["holdout"]["tokens"] > 0
    result = runner.invoke(cli, ["eval", path, "--text", str(text), "--k", "8", "--temperature", "1",
                                 "--adaptive", "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["adaptive"].startswith("calibrated") and r["fixed_knn_ppl"] > 0
    assert 0.0 <= r["retrieved_fraction"] <= 1.0 and r["base_ppl"] > 0 and r["knn_ppl"] > 0
    result = runner.invoke(cli, ["eval", path, "--text", str(text), "--adaptive", "--lambda", "0.1,0.3",
                                 "--sweep-out", str(tmp_path / "sw"), "--json"])
    assert result.exit_code == 0, result.output
    assert all(p["adaptive_ppl"] > 0 for p in json.loads(result.stdout)["sweep"])
    result = runner.invoke(cli, ["generate", path, "The European", "--adaptive", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "1 calibration" in runner.invoke(cli, ["calibrate", path, "--clear"]).output


@pytest.mark.parametrize("args, message", [
    (["--text", "{short}"], "at least 100 tokens"),
    (["--text", "{binary}"], "not UTF-8 text"),
    (["--text", "{text}", "--keep", "0"], "keep must be in (0, 1]"),
    (["--text", "{text}", "--max-tokens", "5"], "must be at least 100"),
])
def test_cli_calibrate_refuses_bad_input_and_leaves_the_store_as_it_was(knn_store, tmp_path, args, message):  # noqa: F811
    files = {"short": tmp_path / "short.txt", "binary": tmp_path / "b.txt", "text": tmp_path / "t.txt"}
    files["short"].write_text(LOBSTER)
    files["binary"].write_bytes(b"\xff\xfe\x00\x01" * 50)
    files["text"].write_text(LOBSTER * 10)
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    before = snapshot(knn_store.path)
    result = CliRunner().invoke(cli, ["calibrate", str(knn_store.path), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert changed(knn_store.path, before) == set()


def test_the_calibrated_lambda_is_gated_by_agreement_and_support_and_old_fits_load_ungated():
    cal = fit(_synthetic(1000, 7, helpful=True), k=8, temperature=1.0)
    assert cal.gate == "knn_top" and "agreement" in cal.describe()
    lo, hi = cal.support  # the calibration's 90th and 99th percentiles of log_d1
    assert lo < hi
    sig = _synthetic(50, 8, helpful=True).signals
    support = ((hi - sig[:, col("log_d1")]) / (hi - lo)).clamp(0, 1)
    assert torch.allclose(cal.lambdas(sig), torch.sigmoid(cal.logits(sig)) * sig[:, col("knn_top")] * support)
    far = sig.clone()
    far[:, col("log_d1")] = hi + 1  # nearest neighbours farther than the calibration ever saw
    assert (cal.lambdas(far) == 0).all()
    old = {k: v for k, v in cal.to_dict().items() if k not in ("gate", "support")}  # saved before both
    assert torch.allclose(Calibration.from_dict(old).lambdas(sig), torch.sigmoid(cal.logits(sig)))


def test_the_fixed_lambda_beside_an_adaptive_eval_is_the_plain_knn_lm(lm):
    parts = []
    fixed = lm.evaluate(LOBSTER + OTHER, records=parts)
    median_top = float(Records.concat(parts).signals[:, col("lm_top")].median())
    ada = lm.with_policy(Rule(skip_above_prob=median_top)).evaluate(LOBSTER + OTHER)
    assert 0.0 < ada.retrieved_fraction < 1.0  # the policy skips some positions...
    assert ada.fixed_knn_ppl == pytest.approx(fixed.knn_ppl, rel=1e-9)  # ...the fixed λ beside it none


def _bursty(n: int, seed: int) -> Records:
    """Text where the store helps in runs of ~20 positions, and the LM's own confidence
    says nothing about where: only the previous position's retrieval does."""
    g = torch.Generator().manual_seed(seed)
    sig = torch.randn(n, len(SIGNALS), generator=g, dtype=torch.float64)
    sig[:, col("recognised")] = 0.0  # nothing stored verbatim
    sig[:, col("lm_top")] = torch.rand(n, generator=g, dtype=torch.float64)
    run = torch.zeros(n, dtype=torch.bool)
    i = 0
    while i < n:
        length = int(torch.randint(10, 30, (1,), generator=g))
        run[i:i + length] = bool(torch.rand(1, generator=g) < 0.4)
        i += length
    sig[:, col("knn_top")] = torch.where(run, 1.0, 0.3)
    sig[:, col("log_d1")] = torch.where(run, -2.0, 2.0) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    lm_t = torch.full((n,), math.log(0.1), dtype=torch.float64)
    knn_t = torch.where(run, math.log(0.9), math.log(1e-4)).double()
    return Records(sig, lm_t, knn_t, torch.ones(n, dtype=torch.bool))


def test_skipping_by_the_previous_position_skips_where_the_lm_alone_cannot():
    rec = _bursty(6000, 0)
    cal = fit(rec, k=8, temperature=1.0, keep=0.9)
    assert cal.skip_rule is not None and "previous position" in cal.describe()
    lam = cal.lambdas(rec.signals)
    retrieved, _ = cal.retrieval(rec.signals, lam, rec.lm_target, rec.knn_target, rec.has)
    gain = mixture_log_prob(rec.lm_target, rec.knn_target, rec.has, lam) - rec.lm_target
    cost = math.exp((float(gain.sum()) - float(gain[retrieved].sum())) / len(rec)) - 1
    assert cost <= SKIP_COST + 1e-9 and float(gain[retrieved].sum()) >= 0.9 * best_fixed(rec)[1]
    assert cal.metrics["retrieved_fraction"] == pytest.approx(float(retrieved.double().mean()))
    # The LM's confidence alone cannot tell the helpful runs: at the same cost a threshold
    # on it skips far less.
    top = rec.signals[:, col("lm_top")]
    threshold_skipped = max(float((top >= t).double().mean()) for t in torch.linspace(0.0, 1.01, 102).tolist()
                            if math.exp(float(gain[top >= t].sum()) / len(rec)) - 1 <= SKIP_COST)
    assert 1 - float(retrieved.double().mean()) > threshold_skipped + 0.1
    # On new text of the same kind it still skips, within the cost.
    test = _bursty(3000, 1)
    lam = cal.lambdas(test.signals)
    retrieved, _ = cal.retrieval(test.signals, lam, test.lm_target, test.knn_target, test.has)
    gain = mixture_log_prob(test.lm_target, test.knn_target, test.has, lam) - test.lm_target
    assert float(retrieved.double().mean()) < 0.9
    assert math.exp((float(gain.sum()) - float(gain[retrieved].sum())) / len(test)) - 1 < 2 * SKIP_COST


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_deciding_a_text_in_order_equals_deciding_it_step_by_step(seed):
    g = torch.Generator().manual_seed(seed)
    n, f = 40, len(SKIP_FEATURES)
    rule = SkipRule(mean=torch.randn(f, generator=g).tolist(), std=(torch.rand(f, generator=g) + 0.5).tolist(),
                    w=torch.randn(f, generator=g).tolist(), b=float(torch.randn(1, generator=g)), cut=0.0)
    sig = torch.randn(n, len(SIGNALS), generator=g, dtype=torch.float64)
    sig[:, col("recognised")] = 0.0  # nothing stored verbatim
    trails = torch.randn(n, len(TRAIL), generator=g, dtype=torch.float64)
    start = torch.randn(1, len(TRAIL), generator=g, dtype=torch.float64)
    together, last = rule.sequence(sig, trails, start)
    previous = start
    for i in range(n):
        here = bool(rule.retrieve(sig[i:i + 1], previous)[0])
        assert here == bool(together[i])
        previous = trails[i:i + 1] if here else unsearched(trails[i:i + 1])
    assert torch.equal(last, previous)


def _alternating(lm) -> KNNLM:
    """The adapter with a policy that retrieves exactly where the previous position did not."""
    cal = fit(_synthetic(500, 0, helpful=True), k=8, temperature=1.0)
    f = len(SKIP_FEATURES)
    w = [0.0] * f
    w[SKIP_FEATURES.index("previous_retrieved")] = -2.0
    cal.skip = dataclasses.asdict(SkipRule(mean=[0.0] * f, std=[1.0] * f, w=w, b=1.0, cut=0.0))
    return lm.with_policy(cal)


def test_generation_eval_and_explain_pass_the_previous_position_on(lm):
    alt = _alternating(lm)
    assert alt.skips_by_trail and not alt.with_settings(skip_above_prob=0.9).skips_by_trail
    g = alt.generate("The European", max_new_tokens=6, explain=True)
    assert [t.retrieved for t in g.tokens] == [True, False, True, False, True, False]
    beams = alt.generate("The European", max_new_tokens=4, num_beams=2)
    assert beams.retrieved_fraction == 0.5  # every beam continues one of the step before
    # eval decides the positions in order, across windows too
    ids = lm.encoder.tokenize(HAMLET + CITIZEN + LOBSTER)
    r = alt.evaluate(ids, window=16, stride=8)
    assert r.tokens > 16 and r.retrieved_fraction == pytest.approx(math.ceil(r.tokens / 2) / r.tokens)
    explained = alt.explain(HAMLET, n_sources=1, window=16)
    assert [t.retrieved for t in explained] == [i % 2 == 0 for i in range(len(explained))]
    assert all(t.knn_weight == 0.0 and not t.sources for t in explained if not t.retrieved)


def test_batched_decoding_carries_each_rows_own_previous_position(lm):
    from knnstore.decoding import Row, decode

    alt = _alternating(lm)
    rows = [Row(prompt_ids=lm.tokenizer(p)["input_ids"], max_tokens=5, temperature=0.0)
            for p in ("The European lobster", "Hamlet")]  # left-padded to one length
    decode(alt, rows)
    for r in rows:
        assert r.token_ids and r.retrieved == math.ceil(len(r.token_ids) / 2), (r.token_ids, r.retrieved)


def test_the_sharp_view_follows_a_context_stored_word_for_word_and_ignores_the_distance_scale():
    d = torch.tensor([[0.0, 2.0, 2.5, 3.0], [10.0, 11.0, 30.0, 40.0]])
    nt = torch.tensor([[7, 1, 2, 3], [5, 6, 6, 6]])
    valid = knn.valid_mask(d, nt)
    t = knn.relative_temperature(d, valid, 0.1)
    assert t[0, 0] == knn.MIN_TEMPERATURE and t[1, 0] == pytest.approx(1.0)
    p = knn.knn_log_probs(d, nt, 10, t).exp()
    assert p[0, 7] == pytest.approx(1.0)  # the crowd at 2-3 has no say next to a verbatim match
    assert p[1, 5] > 0.7  # 10% farther than the nearest weighs e^-1 as much
    plain = knn.knn_log_probs(d, nt, 10, 3.0).exp()
    assert plain[0, 7] < 0.5
    scaled = knn.knn_log_probs(d * 7, nt, 10, knn.relative_temperature(d * 7, valid, 0.1)).exp()
    assert torch.allclose(scaled[1], p[1], atol=1e-6)  # the same whatever the model's distances are
    sig = signals(d, nt, torch.log_softmax(torch.zeros(2, 10), dim=-1), temperature=3.0)
    assert sig[0, col("knn_top_sharp")] == pytest.approx(1.0) and sig[0, col("knn_top")] < 0.5


def _sharp_records(n: int, seed: int) -> Records:
    """Positions where the target is the nearest neighbour's, which stands out from a crowd
    (``gap``): the sharp view gives it 0.95, the plain one 0.2; elsewhere the crowd is right
    as often as the nearest and the plain view is the better one."""
    gen = torch.Generator().manual_seed(seed)
    sig = torch.randn(n, len(SIGNALS), generator=gen, dtype=torch.float64)
    sig[:, col("recognised")] = 0.0  # nothing stored verbatim
    gap = torch.rand(n, generator=gen) < 0.5
    sig[:, col("log_spread")] = torch.where(gap, 2.0, 0.1) + 0.1 * sig[:, col("log_spread")]
    lm_t = torch.full((n,), math.log(0.01), dtype=torch.float64)
    plain = torch.where(gap, math.log(0.2), math.log(0.3)).double()
    sharp = torch.where(gap, math.log(0.95), math.log(0.01)).double()
    return Records(sig, lm_t, plain, torch.ones(n, dtype=torch.bool), sharp)


def test_a_fit_uses_the_sharp_view_where_the_nearest_stands_out_and_old_fits_ignore_it():
    rec = _sharp_records(3000, 0)
    cal = fit(rec, k=8, temperature=1.0, sharp=True)
    test = _sharp_records(500, 1)
    gap = test.signals[:, col("log_spread")] > 1
    alpha = cal.alphas(test.signals)
    assert float(alpha[gap].mean()) > 0.8 and float(alpha[~gap].mean()) < 0.2
    blended = cal.knn_target_of(test)
    assert (blended[gap] > math.log(0.7)).all()
    without = fit(rec, k=8, temperature=1.0, sharp=False)
    assert without.sharp is None and torch.equal(without.knn_target_of(test), test.knn_target)
    assert len(without.mean) == SIGNALS.index("knn_top_sharp")  # λ fitted on the signals from before the sharp view
    assert cal.metrics["holdout"]["calibrated_ppl"] < without.metrics["holdout"]["calibrated_ppl"]
    # a fit saved before the sharp view (and its signal) existed: its first signals, the plain view
    old = without.to_dict()
    old.pop("sharp")
    old["mean"], old["std"], old["params"]["w"] = old["mean"][:-1], old["std"][:-1], old["params"]["w"][:-1]
    again = Calibration.from_dict(old)
    assert again.alphas(test.signals) is None and again.lambdas(test.signals).shape == (500,)


def test_the_adapter_mixes_the_blended_knn_distribution_it_reports(lm):
    cal = fit(_sharp_records(2000, 2), k=lm.settings.k, temperature=lm.settings.temperature, sharp=True)
    assert cal.sharp is not None
    ada = lm.with_policy(cal)
    for t in ada.explain(LOBSTER, n_sources=0):
        if t.retrieved:
            assert t.p == pytest.approx(t.knn_weight * t.p_knn + (1 - t.knn_weight) * t.p_lm, rel=1e-4, abs=1e-7)
    parts = []
    r = ada.with_settings(skip_above_prob=1.0).evaluate(HAMLET + CITIZEN, records=parts)
    rec = Records.concat(parts)
    assert rec.knn_sharp is not None
    offline = math.exp(-float(mixture_log_prob(rec.lm_target, cal.knn_target_of(rec), rec.has,
                                               cal.lambdas(rec.signals)).mean()))
    assert r.knn_ppl == pytest.approx(offline, rel=1e-6)
