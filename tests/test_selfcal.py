"""Self-calibration: the store's own documents scored as if unseen (their own pairs
hidden), the adaptive-λ map fitted on that, no user text; and what it needs underneath
(stored documents read back as tokens, neighbours dropped from a search)."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from knnstore import IngestSettings
from knnstore import adaptive as adaptive_module
from knnstore.adapter import KNNLM
from knnstore.adaptive import Calibration, Records
from knnstore.cli import cli
from knnstore.evaluate import SELF_MIN_TOKENS, evaluate, self_calibrate, self_records
from knnstore.vectors import Neighbours

from .conftest import changed, snapshot

SETTINGS = IngestSettings(window=64, stride=48, batch_size=8, commit_every=4096)
PHRASES = ["the lobsters are blue", "only becoming red on cooking", "First Citizen speaks",
           "before we proceed any further", "to be or not to be", "that is the question",
           "a species of clawed lobster", "hear me speak"]


def _domain_text(rng: random.Random, sentences: int) -> str:
    """Text of one 'domain': sentences made of a few fixed phrases, in random orders."""
    return " ".join(f"{rng.choice(PHRASES)}, {rng.choice(PHRASES)}." for _ in range(sentences))


def _add_domain_corpus(store, folder, name: str, documents: int, sentences: int, seed: int) -> None:
    """A corpus of ``documents`` files of ``sentences`` sentences of the phrase domain."""
    rng = random.Random(seed)
    folder.mkdir()
    for i in range(documents):
        (folder / f"{i:03}.txt").write_text(_domain_text(rng, sentences))
    store.add_corpus(name, [folder], settings=SETTINGS)


@pytest.fixture
def domain_store(store, tmp_path):
    """A store of 12 documents of the phrase domain (about 4,000 tokens)."""
    _add_domain_corpus(store, tmp_path / "domain", "domain", 12, 40, seed=0)
    return store


def test_without_drops_marked_neighbours_and_keeps_the_order():
    nb = Neighbours.empty(2, 4)
    nb.pair_ids[:] = [[10, 11, 12, 13], [20, 21, 22, 23]]
    nb.distances[:] = [[1, 2, 3, 4], [1, 2, 3, 4]]
    dropped = np.array([[False, True, False, True], [True, True, True, True]])
    out = nb.without(dropped, 3)
    assert out.pair_ids.tolist() == [[10, 12, -1], [-1, -1, -1]]
    assert out.distances[0, :2].tolist() == [1, 3] and np.isinf(out.distances[0, 2]) and np.isinf(out.distances[1]).all()


def test_a_stored_document_reads_back_as_its_tokens(domain_store, tiny_encoder, tmp_path):
    doc = domain_store.ready_documents()[3]
    text = (tmp_path / "domain" / "003.txt").read_text()
    assert domain_store.document_tokens(doc.id).tolist() == tiny_encoder.tokenize(text)
    # pairs 9 and 10 taken out: token 10 is told by neither (pair 9's next, pair 10's own)
    pids = domain_store.table.columns(["pair_id"], where=f"document_id = {doc.id} AND position IN (9, 10)")
    domain_store.table.delete_pairs(pids.column("pair_id").to_pylist())
    ids = domain_store.document_tokens(doc.id)
    assert ids[10] == -1 and ids[11] >= 0 and ids[9] >= 0


def test_hiding_a_document_makes_its_text_unseen(domain_store, tiny_encoder, tmp_path):
    unique = tmp_path / "unique.txt"
    unique.write_text("Homarus gammarus, known as the European lobster, may grow to a length of 60 cm. " * 3)
    domain_store.add_corpus("unique", [unique], settings=SETTINGS)
    lm = KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, domain_store, k=8, lambda_=0.5, temperature=1.0,
               exact=True)
    doc = domain_store.ready_documents()[-1]
    ids = domain_store.document_tokens(doc.id).tolist()
    seen = evaluate(lm, ids)
    unseen = evaluate(lm.hiding(lambda nb: nb.document_ids == doc.id), ids)
    assert seen.knn_ppl < 0.5 * unseen.knn_ppl  # stored word for word: memorised
    assert seen.base_ppl == unseen.base_ppl
    # no neighbour of the hidden document is left in any search
    hidden = lm.hiding(lambda nb: nb.document_ids == doc.id)
    nb = hidden.search(torch.randn(5, domain_store.identity.dim))
    assert not (nb.document_ids == doc.id).any() and (nb.pair_ids >= 0).any()


def test_self_calibration_keeps_the_gain_in_domain_and_gives_lambda_zero_elsewhere(domain_store, tiny_encoder):
    lm = KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, domain_store, k=8, temperature=1.0, exact=True)
    rec = self_records(lm, tokens=2048)
    assert len(rec) >= SELF_MIN_TOKENS and rec.has.all()
    cal = self_calibrate(lm, tokens=2048)
    assert isinstance(cal, Calibration) and cal.metrics["source"] == "self"
    assert cal.metrics["content"] == domain_store.content()
    # new text of the store's domain: the calibrated mixture keeps the store's gain
    fresh = _domain_text(random.Random(99), 40)
    base = evaluate(lm.with_settings(lambda_=0.0), fresh)
    adaptive = lm.with_settings(adaptive=True)
    adaptive._policy = cal
    ours = adaptive.evaluate(fresh)
    best = min(evaluate(lm.with_settings(lambda_=lam), fresh).knn_ppl for lam in (0.1, 0.2, 0.3, 0.5))
    assert best < base.base_ppl
    assert (base.base_ppl - ours.knn_ppl) >= 0.8 * (base.base_ppl - best)
    # unrelated text (characters the store never saw together): λ 0 nearly everywhere, nothing lost
    rng = random.Random(5)
    noise = " ".join("".join(rng.choice("xqzjkvw0123456789") for _ in range(rng.randint(2, 7))) for _ in range(300))
    parts: list[Records] = []
    evaluate(lm, noise, records=parts)
    far = Records.concat(parts)
    lambdas = cal.lambdas(far.signals)
    assert float(lambdas.median()) < 1e-3 and float(lambdas.mean()) < 0.1  # 0 at most positions
    off = adaptive.evaluate(noise)  # (a random-weight model's keys are a weak signal: docs/domains.md measures real ones)
    assert off.knn_ppl - off.base_ppl < 0.5 * (off.fixed_knn_ppl - off.base_ppl)


def test_a_store_of_many_short_documents_calibrates_on_itself(store, tiny_encoder, tmp_path):
    # 90 records of a few sentences each (like the fact benchmark's): a chunk of 512 tokens
    # finds one short document, so more documents are drawn until the positions are found
    _add_domain_corpus(store, tmp_path / "notes", "notes", 90, 3, seed=3)
    sizes = [d.n_tokens for d in store.ready_documents()]
    assert max(sizes) < 200 and sum(sizes) > 2 * SELF_MIN_TOKENS
    lm = KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, store, k=8, temperature=1.0, exact=True)
    rec = self_records(lm, tokens=2048)
    assert 2048 <= len(rec) < 2048 + max(sizes) and rec.has.all() and rec.knn_sharp is not None
    assert self_calibrate(lm, tokens=2048).sharp is None  # the sharp view only where asked for, for now
    local = self_calibrate(lm, tokens=2048, local=0.5, sharp=True)
    assert local.sharp is not None and "sharpened" in local.describe()


def test_too_small_a_store_has_no_self_calibration(store, tiny_encoder, tmp_path):
    (tmp_path / "one.txt").write_text("The European lobster is a species of clawed lobster. " * 4)
    store.add_corpus("one", [tmp_path / "one.txt"], settings=SETTINGS)
    lm = KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, store, k=8, exact=True)
    assert self_calibrate(lm) is None
    before = snapshot(store.path)
    result = CliRunner().invoke(cli, ["calibrate", str(store.path), "--exact"])
    assert result.exit_code == 1 and "too little text to calibrate on itself" in result.output
    assert changed(store.path, before) == set()


def test_cli_calibrates_on_the_store_itself(domain_store):
    path = str(domain_store.path)
    result = CliRunner().invoke(cli, ["calibrate", path, "--k", "8", "--temperature", "1", "--exact",
                                      "--max-tokens", "2048", "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["metrics"]["source"] == "self" and d["metrics"]["holdout"]["tokens"] > 0
    assert domain_store.calibration().metrics["source"] == "self"


def test_the_default_calibrates_once_and_again_when_the_content_changes(domain_store, tiny_encoder, tmp_path):
    lm = KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, domain_store, k=8, temperature=1.0, exact=True)
    assert lm.settings.adaptive and lm.needs_calibration() and domain_store.calibration() is None
    with pytest.raises(RuntimeError, match="resolve_policy"):  # a property read never calibrates
        lm.policy
    assert domain_store.calibration() is None
    first = lm.resolve_policy()  # the default: a self-calibration, made now and saved
    assert isinstance(first, Calibration) and first.metrics["source"] == "self"
    assert lm.policy_note == "calibrated on the store's own text (saved in the store)"
    saved = domain_store.calibration()
    assert saved.to_dict() == first.to_dict() and saved.metrics["content"] == domain_store.content()
    again = KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, domain_store, k=8, temperature=1.0, exact=True)
    assert not again.needs_calibration() and again.policy.to_dict() == first.to_dict()  # reused, not redone
    assert not lm.with_settings(lambda_=0.2).needs_calibration()  # a fixed λ: the plain kNN-LM, no policy
    # another corpus: what the calibration was made on is no longer what the store holds
    more = tmp_path / "more"
    more.mkdir()
    (more / "x.txt").write_text(_domain_text(random.Random(7), 40))
    domain_store.add_corpus("more", [more], settings=SETTINGS)
    assert saved.stale_for(domain_store.content())
    later = KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, domain_store, k=8, temperature=1.0, exact=True)
    assert later.needs_calibration()
    assert later.resolve_policy().metrics["content"] == domain_store.content() != first.metrics["content"]
    assert domain_store.calibration().metrics["content"] == domain_store.content()


def test_a_self_calibration_goes_stale_only_when_the_content_moves_enough():
    cal = Calibration(kind="logistic", mean=[0.0], std=[1.0], params={}, k=8, temperature=1.0)
    cal.metrics = {"source": "self", "content": {"corpora": [1, 2], "pairs": 1000}}
    assert not cal.stale_for({"corpora": [2, 1], "pairs": 1000})
    assert not cal.stale_for({"corpora": [1, 2], "pairs": 1090})  # a few documents more or less
    assert cal.stale_for({"corpora": [1, 2], "pairs": 1200}) and cal.stale_for({"corpora": [1, 2], "pairs": 800})
    assert cal.stale_for({"corpora": [1], "pairs": 1000}) and cal.stale_for({"corpora": [1, 2, 3], "pairs": 1000})
    cal.metrics["source"] = "text"  # fitted on the user's held-out text: theirs to redo
    assert not cal.stale_for({"corpora": [3], "pairs": 5})


def test_a_store_too_small_to_calibrate_on_itself_uses_the_cautious_rule_and_says_so(store, tiny_encoder, tmp_path):
    (tmp_path / "one.txt").write_text("The European lobster is a species of clawed lobster. " * 4)
    store.add_corpus("one", [tmp_path / "one.txt"], settings=SETTINGS)
    lm = KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, store, k=8, exact=True)
    assert lm.resolve_policy() is adaptive_module.FALLBACK and "cautious rule" in lm.policy_note
    assert store.calibration() is None  # nothing to save
    result = CliRunner().invoke(cli, ["eval", str(store.path), "--text", str(tmp_path / "one.txt"), "--exact"])
    assert result.exit_code == 0, result.output
    assert "too little text to calibrate on itself" in result.output and "kNN-LM, adaptive λ" in result.output


def test_a_read_only_store_calibrates_for_the_run_without_saving(domain_store, tmp_path):
    from .conftest import read_only_view

    text = tmp_path / "fresh.txt"
    text.write_text(_domain_text(random.Random(99), 20))
    with read_only_view(domain_store.path, tmp_path / "ro") as where:
        result = CliRunner().invoke(cli, ["eval", str(where), "--text", str(text), "--k", "8", "--temperature", "1",
                                          "--exact", "--json"])
        assert result.exit_code == 0, result.output
        assert "calibrated on the store's own text (not saved:" in result.output
        assert json.loads(result.stdout)["adaptive"].startswith("calibrated")
    assert domain_store.calibration() is None


def test_the_server_never_calibrates_and_follows_calibrations_made_elsewhere(domain_store, tiny_encoder, tmp_path):
    import httpx

    from knnstore import Store
    from knnstore.adaptive import FALLBACK
    from knnstore.server import REFRESH_S, Server

    from .servers import serve_app

    lm = KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, domain_store, k=8, temperature=1.0, exact=True)
    first = lm.resolve_policy()  # what `knnstore serve` does before it listens
    srv = Server(lm, Store.open(domain_store.path))
    body = {"model": srv.model_id, "prompt": "the lobsters are", "max_tokens": 4, "temperature": 0}
    for url in serve_app(srv.app):
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
        assert lm.policy is first
        more = tmp_path / "more"
        more.mkdir()
        (more / "x.txt").write_text(_domain_text(random.Random(7), 40))
        Store.open(domain_store.path).add_corpus("more", [more], settings=SETTINGS)  # another writer
        saved = len(domain_store.calibrations())
        time.sleep(REFRESH_S + 0.1)
        assert httpx.post(url + "/v1/completions", json=body, timeout=120).status_code == 200
        # its self-calibration no longer fits: the cautious rule, and nothing written by a request
        assert lm.policy is FALLBACK and "never calibrates" in lm.policy_note
        assert len(domain_store.calibrations()) == saved and len(lm.store.corpora()) == 2
        # `knnstore calibrate` in another process: the server picks the new calibration up
        elsewhere = KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, Store.open(domain_store.path), k=8,
                          temperature=1.0, exact=True)
        made = elsewhere.resolve_policy()
        time.sleep(REFRESH_S + 0.1)
        assert httpx.post(url + "/v1/completions", json=body, timeout=120).status_code == 200
        assert lm.policy.to_dict() == made.to_dict() and made.metrics["content"] == lm.store.content()


def test_a_calibration_is_used_only_at_the_k_and_temperature_it_was_made_at(domain_store, tiny_encoder):
    def adapter(**settings):
        return KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, domain_store, exact=True, **settings)

    at_8 = adapter(k=8, temperature=1.0).resolve_policy()
    assert (at_8.k, at_8.temperature) == (8, 1.0) and at_8.made_for(8, 1.0) and not at_8.made_for(8, 3.0)
    other = adapter(k=4, temperature=2.0)
    assert other.needs_calibration()  # the store's calibration is for other settings
    at_4 = other.resolve_policy()
    assert (at_4.k, at_4.temperature) == (4, 2.0) and len(domain_store.calibrations()) == 2
    assert domain_store.calibration().to_dict() == at_4.to_dict()  # the newest ...
    back = adapter(k=8, temperature=1.0)
    assert not back.needs_calibration() and back.policy.to_dict() == at_8.to_dict()  # ... is not used at k=8
    # a clone at other settings works its policy out again; at the same ones it keeps it
    assert back.with_settings(exact=False).policy is back.policy
    assert back.with_settings(k=4, temperature=2.0).resolve_policy().to_dict() == at_4.to_dict()
