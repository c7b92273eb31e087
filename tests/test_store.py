"""Store behaviour with a tiny random-weight model: add, search, remove, fail, resume."""

import json

import numpy as np
import pytest
import torch

from knnstore import (
    CorpusExistsError,
    CorpusNotFoundError,
    InputError,
    ModelMismatchError,
    SourceOptions,
    Store,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
    StoreVersionError,
)
from knnstore.schema import pair_id

from .conftest import Boom, fail_after, make_tiny_model, snapshot, write_docs


def _pairs(store, corpus_id=None):
    table = store.table.dataset().to_table()
    if corpus_id is not None:
        table = table.filter(table.column("corpus_id").to_numpy() == corpus_id)
    return table


def test_a_new_store_records_its_identity_and_vocabulary(store, tiny_encoder):
    ident = store.identity
    assert ident.dim == 32 and ident.key_layer == 1 and ident.key_site == "ffn_input"
    assert ident.dtype == "float16" and ident.metric == "l2sq" and ident.format_version == 1
    assert ident.vocab_size == len(tiny_encoder.tokenizer)
    reopened = Store.open(store.path)
    assert reopened.identity == ident
    from sqlalchemy import text
    with reopened.engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT token_id, text FROM vocab")).all())
    assert len(rows) == ident.vocab_size
    assert rows[tiny_encoder.tokenizer.convert_tokens_to_ids("<eos>")] == "<eos>"


def test_catalog_counts_and_table_rows_agree_after_adds(store, text_dir, tmp_path, small_settings):
    (tmp_path / "one.txt").write_text("In life the lobsters are blue, only becoming lobster red on cooking. " * 3)
    a = store.add_corpus("docs", [text_dir], settings=small_settings)
    b = store.add_corpus("one", [tmp_path / "one.txt"], settings=small_settings)
    assert (a.status, a.documents, b.documents) == ("ready", 3, 1)
    assert a.pairs == a.tokens - a.documents  # one pair per token except each document's last
    assert store.table.counts_by_corpus() == {a.id: a.pairs, b.id: b.pairs}
    docs = store.documents("docs")
    assert [d.title for d in docs] == ["a", "b", "c"]
    assert sum(d.n_pairs for d in docs) == a.pairs
    stats = store.stats()
    assert stats.pairs == a.pairs + b.pairs == stats.table_rows
    assert stats.bytes_per_pair and stats.bytes_on_disk > 0


def test_a_document_longer_than_one_commit_is_written_in_several_and_kept_whole(store, tmp_path, small_settings):
    # Memory stays bounded by commit_every pairs, not by the longest document.
    (tmp_path / "long.txt").write_text("The lobsters are blue, only becoming red on cooking. " * 40)
    version = store.table.version
    info = store.add_corpus("long", [tmp_path / "long.txt"], settings=small_settings)
    assert info.documents == 1 and info.pairs > 3 * small_settings.commit_every
    assert store.table.version - version >= 3  # one LanceDB commit per commit_every pairs at most
    positions = np.sort(store.sql("SELECT position FROM pairs").column("position").to_numpy())
    assert positions.tolist() == list(range(info.pairs))  # every position once
    assert store.documents("long")[0].n_pairs == info.pairs == store.stats().pairs


def test_every_pair_stores_the_true_next_token_and_the_key_of_its_context(store, text_dir, small_settings):
    info = store.add_corpus("docs", [text_dir], settings=small_settings)
    rows = _pairs(store).to_pydict()
    tok = store.encoder.tokenize
    docs = {d.id: d for d in store.documents("docs")}
    texts = {d.id: (text_dir / "sub" / "c.txt" if d.title == "c" else
                    next(text_dir.glob(d.title + ".*"))).read_text() for d in docs.values()}
    rng = np.random.default_rng(0)
    for i in rng.choice(len(rows["pair_id"]), size=12, replace=False):
        doc, pos = rows["document_id"][i], rows["position"][i]
        tokens = tok(texts[doc])
        assert rows["token"][i] == tokens[pos] and rows["next_token"][i] == tokens[pos + 1]
        assert rows["pair_id"][i] == pair_id(doc, pos)
        # The key saw the window the ingest used: recompute it from the same context.
        begin = max(0, ((pos - small_settings.window) // small_settings.stride + 1) * small_settings.stride)
        keys, _ = store.encoder.forward(torch.tensor([tokens[begin: pos + 1]]))
        np.testing.assert_allclose(np.asarray(rows["vector"][i], dtype=np.float32),
                                   keys[0, -1].numpy(), rtol=2e-2, atol=2e-2)
    assert sorted(set(rows["document_id"])) == sorted(docs)
    assert len(rows["pair_id"]) == len(set(rows["pair_id"])) == info.pairs


def test_search_finds_a_stored_key_itself_first_in_one_batched_call(store, text_dir, small_settings):
    store.add_corpus("docs", [text_dir], settings=small_settings)
    rows = _pairs(store).slice(0, 8).to_pydict()
    queries = np.asarray(rows["vector"], dtype=np.float32)
    found = store.search(queries, k=4)
    assert found.pair_ids.shape == (8, 4)
    # Repeated text can give identical keys; the nearest must be at distance ~0 with
    # the same next token, and distances ascend.
    assert np.all(found.distances[:, 0] < 1e-3)
    assert np.all(np.diff(found.distances, axis=1) >= 0)
    exact = found.pair_ids[:, 0] == np.asarray(rows["pair_id"])
    assert exact.mean() >= 0.5
    assert np.all(found.next_tokens[exact, 0] == np.asarray(rows["next_token"])[exact])


def test_search_pads_when_the_store_holds_fewer_than_k_pairs(store, tmp_path, small_settings):
    (tmp_path / "t.txt").write_text("lobster red")
    info = store.add_corpus("tiny", [tmp_path / "t.txt"], settings=small_settings)
    found = store.search(np.zeros((2, 32)), k=info.pairs + 3)
    assert np.all(found.pair_ids[:, info.pairs:] == -1)
    assert np.all(np.isinf(found.distances[:, info.pairs:]))


def test_a_removed_corpus_never_comes_back_from_a_lookup(store, text_dir, tmp_path, small_settings):
    (tmp_path / "one.txt").write_text("In life the lobsters are blue, only becoming lobster red. " * 3)
    gone = store.add_corpus("docs", [text_dir], settings=small_settings)
    kept = store.add_corpus("one", [tmp_path / "one.txt"], settings=small_settings)
    queries = np.asarray(_pairs(store, gone.id).column("vector").to_pylist(), dtype=np.float32)
    store.remove_corpus("docs")
    found = store.search(queries, k=kept.pairs)
    assert set(found.corpus_ids.ravel()) == {kept.id}
    assert store.table.count() == kept.pairs
    assert [c.name for c in store.corpora()] == ["one"]
    assert Store.open(store.path).search(queries, k=8).corpus_ids.max() == kept.id


def test_a_duplicate_name_is_refused_and_changes_nothing(store, text_dir, small_settings):
    store.add_corpus("docs", [text_dir], settings=small_settings)
    before = snapshot(store.path)
    with pytest.raises(CorpusExistsError, match="already in"):
        store.add_corpus("docs", [text_dir], settings=small_settings)
    assert snapshot(store.path).keys() == before.keys()
    assert store.table.count() == store.corpus("docs").pairs


@pytest.mark.parametrize("make,message", [
    (lambda d: d / "missing.txt", "no such file or directory"),
    (lambda d: (d / "e.txt").write_text("") and d / "e.txt" or d / "e.txt", "the corpus is empty"),
    (lambda d: (d / "b.txt").write_bytes(b"\x00\xff") and d / "b.txt", "binary"),
    (lambda d: (d / "l.txt").write_bytes("\xe9t\xe9".encode("latin-1")) and d / "l.txt", "not UTF-8"),
    (lambda d: (d / "m.jsonl").write_text('{"text": "ok ok ok"}\n{oops\n') and d / "m.jsonl", "malformed JSON"),
])
def test_bad_input_is_refused_and_leaves_the_store_as_it_was(store, tmp_path, small_settings, make, message):
    path = make(tmp_path)
    before_version, before_corpora = store.table.version, store.corpora()
    with pytest.raises(InputError, match=message):
        store.add_corpus("bad", [path], settings=small_settings)
    assert store.corpora() == before_corpora == []
    store.table.refresh()
    assert store.table.version == before_version


def test_an_interrupted_corpus_is_invisible_failed_and_resumable(store, tmp_path, small_settings, text_dir):
    ready = store.add_corpus("ready", [text_dir], settings=small_settings)
    big = write_docs(tmp_path / "big", 12)
    with pytest.raises(Boom):
        store.add_corpus("big", [big], settings=small_settings, progress=fail_after(30))
    info = store.corpus("big")
    assert info.status == "failed" and "simulated crash" in info.error
    partial = store.table.count(info.id)
    assert 0 < partial  # some commits landed before the crash...
    assert 0 < info.documents < 12
    # ... yet readers see only the ready corpus.
    probe = np.asarray(_pairs(store, info.id).column("vector").to_pylist()[:5], dtype=np.float32)
    assert set(store.search(probe, k=50).corpus_ids.ravel()) <= {ready.id, -1}
    assert Store.open(store.path).stats().pairs == ready.pairs
    with pytest.raises(CorpusExistsError, match="resume-corpus"):
        store.add_corpus("big", [big], settings=small_settings)
    resumed = store.resume_corpus("big")
    assert resumed.status == "ready" and resumed.documents == 12
    assert store.table.count(info.id) == resumed.pairs == resumed.tokens - 12
    ids = _pairs(store, info.id).column("pair_id").to_pylist()
    assert len(ids) == len(set(ids))  # nothing stored twice


def test_a_failed_corpus_can_be_removed_with_one_call(store, text_dir, small_settings):
    with pytest.raises(Boom):
        store.add_corpus("x", [text_dir], settings=small_settings, progress=fail_after(2))
    store.remove_corpus("x")
    assert store.corpora() == [] and store.table.count() == 0


def test_an_ingest_killed_without_cleanup_reads_as_failed(store, text_dir, small_settings):
    from sqlalchemy import update

    from knnstore import catalog

    info = store.add_corpus("docs", [text_dir], settings=small_settings)
    with store.engine.begin() as conn:  # what kill -9 mid-ingest leaves behind
        conn.execute(update(catalog.Corpus).values(status="ingesting"))
    reopened = Store.open(store.path)
    assert reopened.corpus("docs").status == "failed"
    assert reopened.stats().pairs == 0
    assert reopened.search(np.zeros((1, 32)), k=3).pair_ids.max() == -1
    assert reopened.resume_corpus("docs").pairs == info.pairs


def test_unknown_corpus_names_the_known_ones(store, text_dir, small_settings):
    store.add_corpus("docs", [text_dir], settings=small_settings)
    with pytest.raises(CorpusNotFoundError, match=r"no corpus named 'nope' .*\(corpora: docs\)"):
        store.remove_corpus("nope")


def test_a_different_model_is_refused_with_what_differs(store, tmp_path):
    other = str(make_tiny_model(tmp_path / "other", seed=7))
    with pytest.raises(ModelMismatchError, match="model_fingerprint"):
        Store.open(store.path, model=other)
    other_vocab = str(make_tiny_model(tmp_path / "other-vocab", vocab_size=280))
    with pytest.raises(ModelMismatchError, match="tokenizer_fingerprint .*vocab_size 2"):
        Store.open(store.path, model=other_vocab)


def test_missing_paths_files_and_newer_stores_are_refused(tmp_path, store):
    with pytest.raises(StoreNotFoundError, match="no store at"):
        Store.open(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreNotFoundError, match="is not a knnstore store"):
        Store.open(tmp_path / "file")
    with pytest.raises(StoreExistsError, match="already a knnstore store"):
        Store.create(store.path, encoder=store.encoder)
    marker = store.path / "knnstore.json"
    marker.write_text(json.dumps({"format_version": 99}))
    with pytest.raises(StoreVersionError, match="upgrade knnstore"):
        Store.open(store.path)


def test_a_second_writer_is_refused_while_one_writes(store, text_dir, small_settings):
    other = Store.open(store.path, encoder=store.encoder)
    seen = {}

    def progress(done, total):
        if "err" not in seen:
            try:
                other.add_corpus("second", [text_dir], settings=small_settings)
            except StoreLockedError as exc:
                seen["err"] = str(exc)

    store.add_corpus("first", [text_dir], settings=small_settings, progress=progress)
    assert "another process is writing" in seen["err"]
    assert [c.name for c in store.corpora()] == ["first"]


def test_jsonl_metadata_is_kept_on_documents(store, tmp_path, small_settings):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "the lobsters are blue " * 3, "title": "Blue", "year": 1999}) + "\n")
    store.add_corpus("j", [path], settings=small_settings)
    (doc,) = store.documents("j")
    assert doc.title == "Blue" and doc.meta == {"title": "Blue", "year": 1999}


def test_split_on_heading_option_makes_articles_documents(store, tmp_path, small_settings):
    path = tmp_path / "w.txt"
    path.write_text(" = First = \n lobsters are blue . \n = Second = \n to be or not to be . \n")
    store.add_corpus("w", [path], options=SourceOptions(split_on_heading=True), settings=small_settings)
    assert [d.title for d in store.documents("w")] == ["First", "Second"]


def test_a_catalog_url_puts_the_catalog_outside_the_store(tmp_path, tiny_encoder, text_dir, small_settings):
    url = f"sqlite:///{tmp_path / 'shared-catalog.db'}"
    store = Store.create(tmp_path / "s", catalog_url=url, encoder=tiny_encoder)
    store.add_corpus("docs", [text_dir], settings=small_settings)
    assert not (tmp_path / "s" / "catalog.db").exists() and (tmp_path / "shared-catalog.db").exists()
    reopened = Store.open(tmp_path / "s")
    assert reopened.catalog_url == url and reopened.corpus("docs").documents == 3
    with pytest.raises(StoreExistsError, match="already holds a store"):
        Store.create(tmp_path / "s2", catalog_url=url, encoder=tiny_encoder)
    assert not (tmp_path / "s2").exists()


def test_search_skips_the_corpus_filter_only_while_every_row_is_visible(store, text_dir, tmp_path, small_settings):
    store.add_corpus("a", [text_dir], settings=small_settings)
    assert not store.table.needs_filter(store.visible_corpora)
    with pytest.raises(Boom):
        store.add_corpus("b", [write_docs(tmp_path / "big", 12)], settings=small_settings, progress=fail_after(30))
    store.refresh()
    assert store.table.needs_filter(store.visible_corpora)  # b's rows are in the table, hidden
    keys = store.table.dataset().to_table().column("vector").to_pylist()
    found = store.search(np.asarray(keys, dtype=np.float32), k=8)
    assert set(found.corpus_ids.ravel()) == {store.corpus("a").id}
    store.remove_corpus("b")
    assert not store.table.needs_filter(store.visible_corpora)
