"""Following the store and drafting from it (issue 33), with a tiny random-weight model:
drafts never change what greedy decoding gives, followed pairs are the stored successors
scored with exact distances, sampling keeps the mixture's distribution."""

import numpy as np
import pytest
import torch

from knnstore import KNNLM, Store
from knnstore.drafting import DraftRate, context_draft, sampler
from knnstore.following import Pointers
from knnstore.schema import pair_id

from .test_adapter import CITIZEN, HAMLET, LOBSTER, _hand_written_greedy

PROMPTS = ("The European", "To be, or not", "First Citizen: Before", "whether 'tis nobler in the")


@pytest.fixture
def knn_store(store, tmp_path, small_settings):
    docs = tmp_path / "memorised"
    docs.mkdir()
    for name, text in (("lobster", LOBSTER), ("hamlet", HAMLET), ("citizen", CITIZEN)):
        (docs / f"{name}.txt").write_text(text * 3)
    store.add_corpus("memorised", [docs], settings=small_settings)
    return store


@pytest.fixture
def lm(knn_store, tiny_encoder):
    # a λ high enough for the store to steer the text, so that drafts from it are taken
    return KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, knn_store, k=32, lambda_=0.7, temperature=1.0)


@pytest.mark.parametrize("follow", [False, True])
def test_drafting_gives_exactly_the_tokens_of_decoding_without_it(lm, follow):
    drafted = followed = 0
    for prompt in PROMPTS:
        plain = lm.with_settings(follow=follow, draft=False).generate(prompt, max_new_tokens=24)
        fast = lm.with_settings(follow=follow, draft=True).generate(prompt, max_new_tokens=24)
        assert fast.token_ids == plain.token_ids, prompt
        assert plain.cost["drafted_proposed"] == 0 and plain.cost["model_calls"] == len(plain.token_ids) - 1
        drafted += fast.cost["drafted_accepted"]
        followed += fast.cost["followed_tokens"]
        assert fast.cost["model_calls"] < len(fast.token_ids)  # fewer model calls than tokens
    assert drafted > 0 and (followed > 0) == follow


def test_without_following_the_loop_is_the_hand_written_kNN_LM(lm):
    for prompt in PROMPTS[:2]:
        g = lm.with_settings(follow=False).generate(prompt, max_new_tokens=10)
        assert g.token_ids == _hand_written_greedy(lm, prompt, 10)
        # every position searched (drafted positions in one batched call per block)
        assert g.cost["searched_tokens"] == 10 and g.cost["followed_tokens"] == 0
        assert g.cost["searches_per_token"] <= 1.0


def test_following_saves_searches_on_memorised_text(lm):
    searched = lm.with_settings(follow=False, draft=False).generate("To be, or not", max_new_tokens=24)
    followed = lm.with_settings(follow=True, draft=False).generate("To be, or not", max_new_tokens=24)
    assert followed.cost["followed_tokens"] > 0
    assert followed.cost["searches_per_token"] < searched.cost["searches_per_token"]
    assert followed.retrieved_fraction == 1.0  # a followed position still uses the store


def test_followed_pairs_are_the_stored_successors_with_exact_distances(lm, knn_store):
    ids = lm.encoder.tokenize(HAMLET)
    keys, _ = lm.encoder.forward(torch.tensor([ids]))
    keys = keys[0].numpy()
    found = knn_store.search(keys[10:11], k=8)
    token = ids[11]
    pointers = Pointers(knn_store.table, k=8, min_pointers=1)  # no projection: the store keeps full keys
    pointers.searched(found)
    pointers.advance(token)
    survivors = found.pair_ids[0][found.next_tokens[0] == token]
    assert len(survivors) > 0 and pointers.count == len(survivors)
    got = pointers.candidates(keys[11])
    valid = got.pair_ids[0] >= 0
    assert set(got.pair_ids[0][valid]) == set(survivors + 1)  # the next position of each, same document
    rows = knn_store.table.take(got.pair_ids[0][valid].tolist(), ["pair_id", "vector", "next_token"])
    stored = dict(zip(rows.column("pair_id").to_pylist(), knn_store.table.keys_of(rows)))
    for pid, d in zip(got.pair_ids[0][valid], got.distances[0][valid]):
        assert d == pytest.approx(float(((stored[pid] - keys[11]) ** 2).sum()), rel=1e-5)
    assert (np.diff(got.distances[0][valid]) >= 0).all()  # nearest first
    pointers.advance(int(got.next_tokens[0, 0]))
    assert pointers.count >= 1 and pointers.draft(3)  # the stored continuation


def test_a_removed_successor_is_not_followed(lm, knn_store):
    doc = knn_store.table.columns(["document_id"]).column("document_id")[0].as_py()
    four = knn_store.table.take([int(pair_id(doc, 4))], ["pair_id", "vector"])
    knn_store.table.delete_pairs([int(pair_id(doc, 5))])
    found = Store.open(knn_store.path).search(knn_store.table.keys_of(four), k=1, exact=True)
    assert int(found.pair_ids[0, 0]) == int(pair_id(doc, 4))  # the pair itself, with its row id
    run, _ = knn_store.table.successors(found, 3)
    assert run.pair_ids[0].tolist() == [-1, int(pair_id(doc, 6)), int(pair_id(doc, 7))]  # 5 is gone
    found.row_ids[0, 0] = -1
    assert knn_store.table.successors(found, 3)[0].pair_ids[0].tolist() == [-1] * 3  # no row id: nothing read


def test_sampling_keeps_a_drafted_token_with_its_probability():
    log_probs = torch.tensor([0.5, 0.3, 0.2, 0.0]).log()
    choose = sampler(generator=torch.Generator().manual_seed(0))
    counts = np.bincount([choose(log_probs, 1) for _ in range(6000)], minlength=4) / 6000
    assert counts == pytest.approx([0.5, 0.3, 0.2, 0.0], abs=0.02)  # drafted or not, the same distribution
    assert sampler()(torch.tensor([0.0, -50.0]), 1) in (0, 1)


def test_sampling_with_drafts_runs_and_stays_in_budget(lm):
    g = lm.generate("To be, or not", max_new_tokens=16, do_sample=True, top_p=0.9, seed=1)
    assert 0 < len(g.token_ids) <= 16


def test_context_draft_and_draft_length():
    assert context_draft([1, 2, 3, 4, 5, 9, 2, 3], 3) == [4, 5, 9]
    assert context_draft([1, 2, 3, 4, 5, 9, 7, 3], 3) == []
    rate = DraftRate()
    assert rate.length(100) >= 1
    rate.drafted(8, 0)
    assert rate.length(100) <= 1
    rate.drafted(0, 0)
    for _ in range(40):
        rate.drafted(8, 8)
    assert rate.length(100) == 8 and rate.length(3) == 3


def test_a_quantised_store_is_followed_by_its_decoded_keys(tmp_path, tiny_encoder, small_settings):
    from .conftest import write_docs

    s = Store.create(tmp_path / "q", model=tiny_encoder.name, encoder=tiny_encoder, key_dim=16, key_bits=4,
                     route_dim=8)
    s.add_corpus("a", [write_docs(tmp_path / "a", 5, repeat=5)], settings=small_settings)
    lm = KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, s, k=16, lambda_=0.7, temperature=1.0)
    prompt = "Document 3: the lobsters are"
    plain = lm.with_settings(follow=True, draft=False).generate(prompt, max_new_tokens=16)
    fast = lm.with_settings(follow=True, draft=True).generate(prompt, max_new_tokens=16)
    assert fast.token_ids == plain.token_ids
    found = s.search(tiny_encoder.forward(torch.tensor([tiny_encoder.tokenize(prompt)]))[0][0, -1:].numpy(), k=4)
    run, keys = s.table.successors(found.rows(0), 3)
    assert keys.shape == (4, 3, 16)  # the decoded keys (16), not the routing key (8)
    s.close()
