"""`forget`: a string planted in real text (names, e-mail addresses, phone numbers in a
slice of Tiny Shakespeare) is found in the decoded documents, every pair that predicts a
token of it goes, and the store can no longer predict it from its contexts.

Real LanceDB tables, the tiny model (its small BPE cuts the planted strings into many
tokens, differently after different preceding characters), real text.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner

from knnstore import KNNLM, InputError, Store
from knnstore.check import check
from knnstore.cli import cli

from .conftest import SHARED, changed, snapshot

EMAIL, NAME, PHONE = "jane.doe@example.com", "Jane Doe", "+44 20 7946 0958"
# How each document carries the planted data: after a space, a colon, a newline, a quote
PLANTS = [
    "Write to {email} before noon, said {name}.",
    "{name}:{email}\nCall {phone} at once.",
    "\"{email}\" is the address; '{name}' the name.",
    "No data here at all, only the play.",
    "Ring {phone}; or JANE.DOE@EXAMPLE.COM in capitals.",
]


def _slice() -> list[str]:
    path = SHARED / "tinyshakespeare" / "train.txt"
    if not path.exists():
        pytest.skip(f"{path} is missing (../shared/data)")
    text = path.read_text(encoding="utf-8")[:6000]
    return [text[i * 1200:(i + 1) * 1200] for i in range(len(PLANTS))]


@pytest.fixture
def planted(tmp_path, tiny_encoder, small_settings):
    """A store of five real text slices, four with planted personal data in the middle."""
    root = tmp_path / "docs"
    root.mkdir()
    texts = {}
    for i, (chunk, plant) in enumerate(zip(_slice(), PLANTS)):
        cut = len(chunk) // 2
        texts[f"{i}.txt"] = chunk[:cut] + plant.format(email=EMAIL, name=NAME, phone=PHONE) + chunk[cut:]
        (root / f"{i}.txt").write_text(texts[f"{i}.txt"])
    store = Store.create(tmp_path / "store", encoder=tiny_encoder)
    store.add_corpus("docs", [root], settings=small_settings)
    return store, texts


def _spans(encoder, text: str, needle: str, ignore_case=False) -> list[tuple[list[int], int, int]]:
    """(token ids, first, last token) of each occurrence, from the tokenizer's own offsets
    on the original text (independent of how knnstore decodes stored tokens)."""
    enc = encoder.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], np.array(enc["offset_mapping"])
    assert ids == encoder.tokenize(text)
    hay, pin = (text.lower(), needle.lower()) if ignore_case else (text, needle)
    found, at = [], hay.find(pin)
    while at >= 0:
        hit = np.nonzero((offsets[:, 0] < at + len(pin)) & (offsets[:, 1] > at))[0]
        found.append((ids, int(hit[0]), int(hit[-1])))
        at = hay.find(pin, at + len(pin))
    return found


def _predicting(store) -> set[tuple[int, int]]:
    """(document ordinal, position of the token predicted) of every visible pair."""
    ordinal = {d.id: d.ordinal for d in store.documents("docs")}
    rows = store.sql("SELECT document_id, position FROM pairs").to_pylist()
    return {(ordinal[r["document_id"]], r["position"] + 1) for r in rows}


def test_forget_removes_every_pair_that_predicts_a_token_of_the_text(planted, tiny_encoder):
    store, texts = planted
    expected = {name: _spans(tiny_encoder, text, EMAIL) for name, text in texts.items()}
    n = sum(len(v) for v in expected.values())
    assert n == 3
    done = store.forget(EMAIL)
    assert (done.occurrences, done.documents) == (3, 3) and done.pairs_removed > 0
    predicted = _predicting(store)
    for ordinal, name in enumerate(sorted(texts)):
        for _, first, last in expected[name]:
            assert not {(ordinal, j) for j in range(max(first, 1), last + 1)} & predicted
    assert check(store).ok
    with pytest.raises(InputError):  # nothing of it can be read back from the store either
        store.forget(EMAIL, dry_run=True)


def test_contexts_that_preceded_the_text_find_no_neighbour_predicting_it(planted, tiny_encoder):
    """The issue's proof: exact search with every context that preceded a token of an
    occurrence returns no neighbour whose next token belongs to a forgotten occurrence,
    and explain gives p_kNN = 0 to the occurrence's tokens that no other stored context
    predicts."""
    store, texts = planted
    occurrences = {name: _spans(tiny_encoder, text, EMAIL) for name, text in texts.items()}
    store.forget(EMAIL)
    forgotten = {(ordinal, j) for ordinal, name in enumerate(sorted(texts))
                 for _, first, last in occurrences[name] for j in range(max(first, 1), last + 1)}
    ordinal = {d.id: d.ordinal for d in store.documents("docs")}
    still_predicted = {r["next_token"] for r in store.sql("SELECT DISTINCT next_token FROM pairs").to_pylist()}
    lm = KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, store, k=8, lambda_=0.5, temperature=1.0, exact=True)
    for name, found in occurrences.items():
        for ids, first, last in found:
            keys, _ = tiny_encoder.forward(__import__("torch").tensor([ids[:last + 1]]))
            contexts = keys[0, max(first - 1, 0):last].numpy()  # the keys that predict tokens first..last
            hits = store.search(contexts, k=8, exact=True)
            for doc, pos in zip(hits.document_ids.ravel(), hits.positions.ravel()):
                if doc >= 0:
                    assert (ordinal[int(doc)], int(pos) + 1) not in forgotten
            text = tiny_encoder.tokenizer.decode(ids[max(first - 12, 0):last + 1])
            for t in lm.explain(text, n_sources=8):
                if t.token in set(ids[first:last + 1]) and t.token not in still_predicted:
                    assert not t.p_knn  # 0 (or not retrieved)


def test_case_context_and_whole_documents(planted, tiny_encoder):
    store, texts = planted
    exact_case = store.forget(EMAIL, dry_run=True)
    any_case = store.forget(EMAIL, ignore_case=True, dry_run=True)
    assert (exact_case.occurrences, any_case.occurrences) == (3, 4)
    wider = store.forget(NAME, context=4, dry_run=True)
    narrow = store.forget(NAME, dry_run=True)
    assert wider.occurrences == narrow.occurrences == 3 and wider.pairs_removed > narrow.pairs_removed
    whole = store.forget(PHONE, documents=True)
    assert whole.documents == 2 and whole.whole_documents
    assert len(store.documents("docs")) == len(texts) - 2
    assert check(store).ok


def test_the_catalog_keeps_a_salted_hash_never_the_text(planted):
    store, _ = planted
    result = CliRunner().invoke(cli, ["forget", str(store.path), "--text", EMAIL, "--json", "--purge"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"occurrences", "documents", "pairs_removed"} <= report.keys() and report["occurrences"] == 3
    salt, digest, command = store.engine.connect().exec_driver_sql(
        "SELECT salt, text_hash, command FROM removals").one()
    assert command == "forget" and digest == hashlib.sha256((salt + EMAIL).encode()).hexdigest()
    for f in store.path.rglob("*"):
        if f.is_file():
            assert EMAIL.encode() not in f.read_bytes(), f


@pytest.mark.parametrize("text", ["", "   ", "no such words anywhere in the play 4711"])
def test_bad_text_is_a_one_line_error_that_changes_nothing(planted, text):
    store, _ = planted
    before = snapshot(store.path)
    result = CliRunner().invoke(cli, ["forget", str(store.path), "--text", text])
    assert result.exit_code == 1 and len([x for x in result.output.splitlines() if x.startswith("Error:")]) == 1
    assert changed(store.path, before) == set()


def test_a_store_with_no_pairs_left_finds_nothing_and_says_so(planted):
    store, _ = planted
    store.remove_documents("n_pairs >= 0")
    with pytest.raises(InputError, match="occurs in no stored document"):
        store.forget(EMAIL)


def test_disguised_forms_are_found_and_the_text_is_gone(tmp_path, tiny_encoder, small_settings):
    """A full-width ＠, a zero-width joiner inside, NFD instead of NFC: each is the same
    text to a reader, so each is forgotten, and no pair predicts a token of any form."""
    import unicodedata

    forms = ["jane.doe\uff20example.com", "jane.d\u200doe@example.com",
             unicodedata.normalize("NFD", "josé.doe@example.com")]
    root = tmp_path / "docs"
    root.mkdir()
    for i, (chunk, form) in enumerate(zip(_slice(), forms)):
        (root / f"{i}.txt").write_text(chunk[:600] + f" Write to {form} today. " + chunk[600:])
    store = Store.create(tmp_path / "store", encoder=tiny_encoder)
    store.add_corpus("docs", [root], settings=small_settings)
    assert store.forget(EMAIL).occurrences == 2  # the full-width and the zero-width forms
    assert store.forget("josé.doe@example.com").occurrences == 1  # NFC given, NFD stored
    with pytest.raises(InputError, match="occurs in no stored document"):  # every form is gone
        store.forget("JANE.DOE@EXAMPLE.COM", ignore_case=True, dry_run=True)


def _byte_forms(text: str, tokenizer) -> list[bytes]:
    """What would still spell ``text`` in a file: UTF-8, UTF-16 either way, and its token ids
    as 32- and 64-bit little-endian integers (as it is tokenised alone and after a space)."""
    forms = [text.encode("utf-8"), text.encode("utf-16-le"), text.encode("utf-16-be")]
    for spelled in (text, " " + text):
        ids = np.asarray(tokenizer(spelled, add_special_tokens=False)["input_ids"])
        forms += [ids.astype("<i4").tobytes(), ids.astype("<i8").tobytes()]
    return forms


def test_after_purge_no_file_of_the_store_spells_the_text(tmp_path, tiny_encoder, small_settings):
    """The address in a document's text, in a `--split-on-heading` title, in a file's name
    and in a `.jsonl` field kept as metadata: after `forget --purge`, no byte sequence of it
    (UTF-8, UTF-16, token ids) is left in any file of the store, and the audit keeps only a
    salted hash; its titles and paths read `[forgotten]`."""
    body = " ".join(_slice())[:3000]
    heading = tmp_path / "wiki"
    heading.mkdir()
    (heading / "w.txt").write_text(f" = Contact {EMAIL} = \n\n{body[:1500]}\n = Other = \n\n Write to {EMAIL} .\n")
    named = tmp_path / "named"
    named.mkdir()
    (named / f"{EMAIL}.txt").write_text(body[1500:2500])
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"text": body[2500:], "author": f"Jane <{EMAIL}>", "n": 3}) + "\n")
    store = Store.create(tmp_path / "store", encoder=tiny_encoder)
    from knnstore.config import SourceOptions

    store.add_corpus("wiki", [heading / "w.txt"], settings=small_settings,
                     options=SourceOptions(split_on_heading=True))
    store.add_corpus("named", [named], settings=small_settings)
    store.add_corpus("records", [records], settings=small_settings)
    forms = _byte_forms(EMAIL, tiny_encoder.tokenizer)
    raw = b"".join(p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file())
    assert EMAIL.encode() in raw  # the scan sees it before

    result = CliRunner().invoke(cli, ["forget", str(tmp_path / "store"), "--text", EMAIL, "--purge", "--json"])
    assert result.exit_code == 0, result.output
    done = json.loads(result.stdout)
    assert done["in_catalog"] == 4 and done["occurrences"] >= 2  # a title, two paths, a field; the text twice
    for path in (tmp_path / "store").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not [f for f in forms if f in data], f"{path} still spells the text"
    store.refresh()
    titles = [d.title for d in store.documents("wiki")]
    assert any("[forgotten]" in (t or "") for t in titles), titles
    assert all(EMAIL not in d.source for c in ("wiki", "named", "records") for d in store.documents(c))
    assert store.documents("records")[0].meta == {"author": "Jane <[forgotten]>", "n": 3}
    assert check(store).ok
