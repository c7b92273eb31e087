"""The kNN-LM adapter with a tiny random-weight model: scoring, generate(), provenance."""

import math

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from knnstore import KNNLM, InputError, ModelMismatchError, Store, knn
from knnstore.adapter import scored_windows

from .conftest import make_tiny_model

LOBSTER = ("The European lobster is a species of clawed lobster from the eastern Atlantic Ocean. "
           "It is closely related to the American lobster. ")
HAMLET = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. "
CITIZEN = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "


@pytest.fixture
def knn_store(store, tmp_path, small_settings):
    docs = tmp_path / "memorised"
    docs.mkdir()
    (docs / "lobster.txt").write_text(LOBSTER * 3)
    (docs / "hamlet.txt").write_text(HAMLET * 3)
    (docs / "citizen.txt").write_text(CITIZEN * 3)
    store.add_corpus("memorised", [docs], settings=small_settings)
    return store


@pytest.fixture
def lm(knn_store, tiny_encoder):
    return KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, knn_store, k=8, lambda_=0.5, temperature=1.0)


def _reference_ppl(encoder, text: str) -> float:
    ids = torch.tensor([encoder.tokenize(text)])
    with torch.no_grad():
        loss = encoder.model(input_ids=ids, labels=ids).loss
    return math.exp(loss.item())


def test_lambda_zero_scores_exactly_like_the_plain_lm(lm, tiny_encoder):
    r = lm.with_settings(lambda_=0.0).evaluate(HAMLET)
    assert r.knn_ppl == r.base_ppl
    assert r.base_ppl == pytest.approx(_reference_ppl(tiny_encoder, HAMLET), rel=1e-4)


def test_a_store_built_from_a_text_scores_that_text_far_better(lm):
    r = lm.evaluate(LOBSTER * 2)
    assert r.tokens == len(lm.encoder.tokenize(LOBSTER * 2)) - 1
    assert r.base_ppl > 50  # a random model knows nothing
    assert r.knn_ppl < r.base_ppl / 20
    assert r.knn_coverage > 0.9 and r.retrieved_fraction == 1.0


def test_lambda_one_is_knn_only(lm):
    r = lm.with_settings(lambda_=1.0).evaluate(CITIZEN)
    if math.isfinite(r.knn_only_ppl):
        assert r.knn_ppl == pytest.approx(r.knn_only_ppl, rel=1e-6)
    else:
        assert r.knn_ppl == math.inf


def test_a_sweep_scores_every_combination_in_one_pass(lm):
    r = lm.evaluate(LOBSTER, lambdas=[0.0, 0.5], ks=[1, 8], temperatures=[1.0, 5.0])
    assert len(r.sweep) == 8
    assert r.knn_ppl == min(p.knn_ppl for p in r.sweep)
    # a sweep over k searches at every point (which pairs survive to be followed depends on k)
    single = lm.with_settings(lambda_=0.5, k=1, temperature=5.0, follow=False).evaluate(LOBSTER)
    point = next(p for p in r.sweep if (p.lambda_, p.k, p.temperature) == (0.5, 1, 5.0))
    assert point.knn_ppl == pytest.approx(single.knn_ppl, rel=1e-9)


def test_every_token_is_scored_once_by_the_sliding_windows(tiny_encoder):
    ids = list(range(5, 105))
    seen = []
    for win in scored_windows(tiny_encoder, ids, window=16, stride=5, batch_size=3):
        assert win.keys.shape == (len(win.indices), 32)
        assert win.targets.tolist() == [ids[i] for i in win.indices]
        seen.extend(win.indices.tolist())
    assert seen == list(range(1, 100))


def test_adaptive_retrieval_that_skips_everything_is_the_plain_lm(lm):
    r = lm.with_settings(skip_above_prob=1e-9).evaluate(LOBSTER)
    assert r.retrieved_fraction == 0.0 and r.knn_ppl == r.base_ppl
    win = next(scored_windows(lm.encoder, lm.encoder.tokenize(LOBSTER)))
    median = float(knn.entropy(torch.log_softmax(win.logits, -1)).median())
    some = lm.with_settings(skip_below_entropy=median).evaluate(LOBSTER)
    assert 0.3 < some.retrieved_fraction < 0.7
    assert min(some.base_ppl, r.knn_ppl) - 1e-9 <= some.knn_ppl or some.knn_ppl < some.base_ppl


def test_exact_and_ann_search_agree_on_a_small_store(tmp_path, tiny_encoder, small_settings):
    docs = tmp_path / "many"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i}.txt").write_text(f"{LOBSTER} {HAMLET} {i} {CITIZEN} " * 2)
    s = Store.create(tmp_path / "big", model=tiny_encoder.name, encoder=tiny_encoder)
    s.add_corpus("many", [docs], settings=small_settings)
    assert s.table.count() > 3000
    keys, _ = tiny_encoder.forward(torch.tensor([tiny_encoder.tokenize(HAMLET + " 17 " + LOBSTER)]))
    exact = s.search(keys[0].numpy(), k=10)
    s.create_index(num_partitions=4, num_sub_vectors=4)
    assert s.table.has_vector_index() and s.stats().index.indexed_rows == s.table.count()
    ann = s.search(keys[0].numpy(), k=10, nprobes=4, refine_factor=50)
    # The repeated text stores many identical keys, so compare distances, not pair ids
    # (ties); Lance re-ranks in float16, hence the tolerance.
    assert np.allclose(ann.distances, exact.distances, rtol=1e-3, atol=1e-2)
    lm = KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, s, k=8, lambda_=0.5, temperature=1.0,
               nprobes=4, refine_factor=50)
    r_ann, r_exact = lm.evaluate(LOBSTER), lm.with_settings(exact=True).evaluate(LOBSTER)
    assert (r_ann.search, r_exact.search) == ("ann", "exact")
    assert r_ann.knn_ppl == pytest.approx(r_exact.knn_ppl, rel=0.02)


def _hand_written_greedy(lm, prompt: str, n: int) -> list[int]:
    ids = torch.tensor([lm.encoder.tokenize(prompt)])
    out = []
    for _ in range(n):
        keys, logits = lm.encoder.forward(ids, with_logits=True)
        step = lm.step(keys[:, -1], logits[:, -1])
        nxt = int(step.log_probs[0].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_greedy_generate_with_the_processor_matches_a_hand_written_loop(lm):
    g = lm.generate("The European", max_new_tokens=8)
    assert g.token_ids == _hand_written_greedy(lm, "The European", 8)
    assert g.retrieved_fraction == 1.0


def test_lambda_zero_generation_is_the_plain_model_and_never_searches(lm):
    g = lm.with_settings(lambda_=0.0).generate("To be, or", max_new_tokens=5)
    plain = lm.model.generate(**lm.tokenizer("To be, or", return_tensors="pt"), max_new_tokens=5,
                              do_sample=False, pad_token_id=1)
    assert g.token_ids == plain[0, -5:].tolist() and g.retrieved_fraction == 0.0


def test_the_store_steers_greedy_generation_to_the_memorised_text(lm):
    g = lm.with_settings(lambda_=0.9).generate("The European", max_new_tokens=6)
    assert g.text.startswith(" lobster is a")


def test_the_processor_works_with_model_generate_in_greedy_sampling_and_beams(lm):
    inputs = lm.tokenizer("To be, or", return_tensors="pt")
    plain = lm.model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=1)
    with lm.with_settings(lambda_=0.0).logits_processor() as proc:
        same = lm.model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=1,
                                 logits_processor=LogitsProcessorList([proc]))
    assert torch.equal(plain, same)  # λ = 0: exactly the plain model
    torch.manual_seed(0)
    with lm.logits_processor(record=True) as proc:
        sampled = lm.model.generate(**inputs, max_new_tokens=6, do_sample=True, pad_token_id=1,
                                    logits_processor=LogitsProcessorList([proc]))
    assert sampled.shape[1] == inputs["input_ids"].shape[1] + 6
    assert len(proc.steps) == 6 and proc.retrieved_fraction == 1.0
    with lm.logits_processor() as proc:
        beams = lm.model.generate(**inputs, max_new_tokens=6, num_beams=3, do_sample=False,
                                  pad_token_id=1, logits_processor=LogitsProcessorList([proc]))
    assert beams.shape[1] == inputs["input_ids"].shape[1] + 6
    assert lm.generate("To be, or", max_new_tokens=4, do_sample=True, top_p=0.9, seed=3).token_ids


def test_the_processor_outside_its_with_block_says_how_to_use_it(lm):
    proc = lm.logits_processor()
    with pytest.raises(RuntimeError, match="with"):
        proc(torch.tensor([[1, 2]]), torch.zeros(1, 300))


def test_provenance_points_to_the_document_of_a_memorised_sentence(lm):
    tokens = lm.explain(HAMLET)
    assert tokens and all(t.retrieved for t in tokens)
    top = [t.sources[0] for t in tokens[3:] if t.sources]
    hamlet = [s for s in top if s.document.endswith("hamlet.txt")]
    assert len(hamlet) / len(top) > 0.9
    s = hamlet[-1]
    assert s.corpus == "memorised" and s.title == "hamlet" and 0 < s.weight <= 1
    assert f"[[{s.next_token_text}]]" in s.snippet
    assert tokens[5].top_documents(1)[0][0] == "memorised: hamlet"


def test_generate_explains_each_generated_token(lm):
    g = lm.with_settings(lambda_=0.9).generate("The European", max_new_tokens=4, explain=True, n_sources=2)
    assert [t.token for t in g.tokens] == g.token_ids
    assert all(len(t.sources) == 2 and t.sources[0].document.endswith("lobster.txt") for t in g.tokens)
    assert all(t.p == pytest.approx(0.9 * t.p_knn + 0.1 * t.p_lm, rel=1e-4) for t in g.tokens)


def test_the_adapter_refuses_another_model_and_says_what_differs(knn_store, tmp_path):
    from knnstore import Encoder

    other = Encoder.load(str(make_tiny_model(tmp_path / "other", seed=1)))
    with pytest.raises(ModelMismatchError, match="model_fingerprint"):
        KNNLM(other.model, other.tokenizer, knn_store)


@pytest.mark.parametrize("change, message", [
    ({"lambda_": 1.5}, "lambda must be between 0 and 1"),
    ({"k": 0}, "k must be at least 1"),
    ({"temperature": 0.0}, r"temperature must be in \(0, 1000000\]"),
])
def test_bad_knn_settings_are_refused_with_what_to_change(lm, change, message):
    with pytest.raises(InputError, match=message):
        lm.with_settings(**change)


def test_a_copied_passage_is_one_span_citing_its_document(knn_store, tiny_encoder):
    """Explaining stored text: consecutive tokens follow consecutive stored positions of one
    document, merged into spans that name it and quote the stored passage."""
    lm = KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, knn_store, k=8, lambda_=0.5, temperature=1.0, exact=True)
    tokens = lm.explain(LOBSTER, n_sources=4)
    spans = lm.spans(tokens)
    assert spans and max(sp.length for sp in spans) >= 5
    ordered = sorted(spans, key=lambda sp: sp.first)
    assert all(a.last < b.first for a, b in zip(ordered, ordered[1:]))  # no token in two spans
    for sp in spans:
        assert sp.end_position - sp.start_position == sp.last - sp.first  # one stored position a token
        run = [t for t in tokens if sp.first <= t.index <= sp.last]
        assert all(t.sources[0].document_id == sp.document_id and t.sources[0].next_token == t.token for t in run)
        assert sp.text in sp.passage  # the stored passage holds what was followed
    assert sum(sp.length for sp in spans) >= len(tokens) // 2  # stored text: mostly copied
