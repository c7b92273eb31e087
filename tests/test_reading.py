"""Reading (knnstore/reading.py, ``KNNLM.read``): the passages of the stored documents a
prompt names, read by the model before the prompt, the prompt's own key for the first
search, and the citations of the tokens it copies; on the tiny model (a random-weight model
finds every token surprising, so any shared phrase names its document)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knnstore import reading
from knnstore.adapter import KNNLM, follows
from knnstore.config import KNNSettings
from knnstore.decoding import Row, decode

from .conftest import write_docs


def test_a_phrase_names_its_document_only_when_two_consecutive_tokens_match_and_surprise():
    tokens = np.array([[5, 9], [6, 9], [7, 9]])
    docs = np.array([[3, 4], [3, 4], [3, 4]])
    positions = np.array([[10, 0], [11, 0], [12, 0]])
    # three consecutive stored positions of document 3 spell the prompt's tokens 5 6 7
    hits = reading.named([5, 6, 7], [4.0, 4.0, 4.0], tokens, docs, positions, n=2)
    assert [(h.document_id, h.first, h.last, h.score) for h in hits] == [(3, 10, 12, 12.0)]
    # words the LM expects never name a document, however many match
    assert reading.named([5, 6, 7], [0.5, 0.5, 0.5], tokens, docs, positions, n=2) == []
    # one matched token is no phrase
    assert reading.named([5, 8, 7], [9.0, 9.0, 9.0], tokens, docs, positions, n=2) == []
    # the same tokens at positions that do not follow each other are no phrase either
    apart = np.array([[10, 0], [20, 0], [30, 0]])
    assert reading.named([5, 6, 7], [9.0, 9.0, 9.0], tokens, docs, apart, n=2) == []
    # the best phrase first, n at most
    two = reading.named([5, 6, 7], [9.0, 9.0, 0.0], np.array([[5, 5], [6, 6], [7, 7]]),
                        np.array([[3, 4], [3, 4], [3, 4]]), np.array([[10, 50], [11, 51], [40, 52]]), n=1)
    assert len(two) == 1 and two[0].score == 18.0


def test_generated_tokens_copy_where_a_run_of_two_or_more_is_spelled_by_a_passage():
    passages = [(100, [1, 2, 3, 4]), (200, [9, 2, 3, 5, 2, 3, 4, 8])]
    # after prompt token 1: "2 3 4" runs "1 2 3 4" in the first passage (4 long) and
    # "2 3 4" in the second (3 long): the longest wins; the pair before a token is cited
    assert reading.copies([2, 3, 4], [7, 1], passages) == [(0, 100), (0, 101), (0, 102)]
    assert reading.copies([3, 4, 8], [7, 2], passages) == [(1, 204), (1, 205), (1, 206)]
    # one token alone is no copy; a token no passage spells after its neighbour neither
    assert reading.copies([4], [7], passages) == [None]
    assert reading.copies([5, 6], [3], passages) == [(1, 202), None]
    # a passage's first token at a document's start has no pair whose next token it is
    assert reading.copies([1, 2], [], [(0, [1, 2])]) == [None, (0, 0)]


def test_a_passage_is_ranked_by_how_much_of_the_prompts_rare_wording_it_spells():
    # prompt "1 2 3 4": first name 1 2 (10 nats), surname 3 4 (5 nats), and 2 -> 3 (6 nats)
    prompt, surprise = [1, 2, 3, 4], [10.0, 6.0, 5.0]
    rare = reading.rare_wording(prompt, surprise)
    own, namesake = [7, 1, 2, 3, 4, 8], [7, 9, 3, 4, 8, 9, 3, 4, 8, 9, 3, 4]
    assert reading.covers(rare, own) == 1.0
    assert reading.covers(rare, namesake) == pytest.approx(5.0 / 21.0)
    # the namesake repeats the surname three times, nearly as many nats of mentions as the
    # own passage's one full name, but spells less than SAME_WORDING of what it does
    assert reading.mentions(rare, namesake) == 15.0 and reading.mentions(rare, own) == 21.0
    assert reading.covers(rare, namesake) < reading.SAME_WORDING * reading.covers(rare, own)
    assert reading.covers({}, own) == 0.0


@pytest.fixture
def people_store(store, tmp_path, small_settings):
    docs = write_docs(tmp_path / "people", 4, repeat=2,
                      template="Record {i}: Quarrow Zembleton{i} keeps bees at Ulmworth{i} mill. ")
    store.add_corpus("people", [docs], settings=small_settings)
    return store


def _default(store) -> KNNLM:
    lm = KNNLM.from_store(store, KNNSettings.resolve(exact=True))
    assert lm.settings.read == 2 and lm.settings.adaptive
    return lm


def test_the_default_reads_the_document_a_prompt_names_and_cites_what_it_copies(people_store):
    lm = _default(people_store)
    g = lm.generate("Who was Quarrow Zembleton2", max_new_tokens=6, explain=True, n_sources=1)
    assert g.read, "a prompt that spells a stored phrase reads its document"
    titles = {d.id: d.source for d in people_store.documents("people")}
    assert all(p.corpus == "people" and p.document_id in titles for p in g.read)
    first = g.read[0]
    stored = "".join(lm.tokenizer.decode(t) for t in
                     [lm.store.table.tokens_around(first.document_id, first.start_position, 0, 0)[1]])
    assert first.text.startswith(stored) and "Quarrow" in first.text
    assert g.to_dict()["read"][0]["document_id"] == first.document_id
    copied = [t for t in g.tokens if t.read_from is not None]
    for t in copied:  # a copied token cites the read passage's pair whose next token it is
        src = t.read_from
        assert follows(t) is src and src.next_token == t.token
        assert any(p.document_id == src.document_id for p in g.read)
        _, _, nxt, _ = lm.store.table.tokens_around(src.document_id, src.position, 0, 0)
        assert nxt == t.token
    # λ given (the plain kNN-LM) and read=0 read nothing
    assert lm.with_settings(lambda_=0.3).generate("Who was Quarrow Zembleton2", max_new_tokens=2).read == []
    assert lm.with_settings(read=0).generate("Who was Quarrow Zembleton2", max_new_tokens=2).read == []


def test_the_first_step_searches_with_the_prompts_own_key(people_store):
    lm = KNNLM.from_store(people_store, KNNSettings(exact=True, lambda_=0.5, read=2))  # every step searches
    ids = lm.tokenizer("Who was Quarrow Zembleton1")["input_ids"]
    got = lm.read(ids)
    assert got is not None
    own = lm.encoder.forward(torch.tensor([ids]))[0][0, -1]
    assert torch.allclose(got.key, own, atol=1e-5)
    x = torch.tensor([got.context_ids + ids])
    with lm.logits_processor(record=True, prompt_keys=got.key[None]) as proc:
        lm.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=2, do_sample=False,
                          logits_processor=[proc], pad_token_id=lm.tokenizer.eos_token_id)
    first, second = proc.steps[0], proc.steps[1]
    assert bool(first.retrieved[0]) and bool(second.retrieved[0])
    assert (first.neighbours.pair_ids[0] == lm.search(got.key[None]).pair_ids[0]).all()


def test_the_servers_decoding_reads_as_generate_does(people_store):
    lm = _default(people_store)
    prompt = "Who was Quarrow Zembleton3"
    g = lm.generate(prompt, max_new_tokens=5)
    row = Row(prompt_ids=lm.tokenizer(prompt)["input_ids"], max_tokens=5, temperature=0.0)
    other = Row(prompt_ids=lm.tokenizer("the mill")["input_ids"], max_tokens=5, temperature=0.0)
    decode(lm, [row, other])
    assert row.reading is not None and [p.document_id for p in row.reading.passages] == [p.document_id for p in g.read]
    assert row.token_ids[:len(g.token_ids)] == g.token_ids[:len(row.token_ids)]


def test_a_removed_document_is_never_read(people_store):
    lm = _default(people_store)
    g = lm.generate("Who was Quarrow Zembleton0", max_new_tokens=2)
    named = {p.document_id for p in g.read}
    assert named
    people_store.remove_documents(f"document_id IN ({', '.join(map(str, named))})", corpus="people")
    after = _default(people_store).generate("Who was Quarrow Zembleton0", max_new_tokens=2)
    assert not named & {p.document_id for p in after.read}
