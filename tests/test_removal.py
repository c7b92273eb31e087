"""`remove-documents`: documents chosen by an SQL condition leave the store without a
rebuild, the store then scores text exactly as one built without them, bad conditions
change nothing, and a killed removal is finished by one command.

Real LanceDB tables, the tiny model, small corpora written here.
"""

from __future__ import annotations

import hashlib

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from knnstore import KNNLM, InputError, ReadOnlyError, Store
from knnstore.check import check
from knnstore.cli import cli

from .conftest import changed, snapshot, write_docs

TEXTS = {
    "a.txt": "The European lobster is a species of clawed lobster from the eastern Atlantic. " * 5,
    "b.txt": "Jane Doe lives at 12 Example Street; write to jane.doe@example.com any time. " * 5,
    "c.txt": "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. " * 5,
    "d.txt": "To be, or not to be, that is the question: whether 'tis nobler in the mind. " * 5,
}


def _write(directory, names):
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_text(TEXTS[name])
    return directory


@pytest.fixture
def docs_store(store, tmp_path, small_settings):
    store.add_corpus("docs", [_write(tmp_path / "all", TEXTS)], settings=small_settings)
    store.add_corpus("other", [write_docs(tmp_path / "other", 2)], settings=small_settings)
    return store


def _ids(store, where):
    return [r["id"] for r in store.sql(f"SELECT id FROM documents WHERE {where} ORDER BY id").to_pylist()]


def test_removed_documents_lose_every_pair_and_the_rest_is_untouched(docs_store):
    store = docs_store
    before = {c.name: c for c in store.corpora()}
    victims = _ids(store, "path LIKE '%b.txt' OR path LIKE '%d.txt'")
    kept = store.sql("SELECT pair_id, next_token FROM pairs WHERE document_id NOT IN "
                     f"({', '.join(map(str, victims))}) ORDER BY pair_id").to_pylist()
    gone_pairs = sum(d.n_pairs for d in store.documents("docs") if d.id in victims)
    removal = store.remove_documents("path LIKE '%b.txt' OR path LIKE '%d.txt'")
    assert [d["id"] for d in removal.documents] == victims and removal.pairs == gone_pairs
    assert store.table.columns(["pair_id"], where=f"document_id IN ({', '.join(map(str, victims))})").num_rows == 0
    assert store.sql("SELECT pair_id, next_token FROM pairs ORDER BY pair_id").to_pylist() == kept
    docs = store.corpus("docs")
    assert (docs.documents, docs.pairs) == (before["docs"].documents - 2, before["docs"].pairs - gone_pairs)
    assert store.corpus("other") == before["other"]
    assert check(store).ok
    audit = store.engine.connect().exec_driver_sql(
        "SELECT command, condition, status, n_documents, n_pairs, salt, text_hash FROM removals").all()
    assert [row[:5] for row in audit] == [("remove-documents", None, "ok", 2, gone_pairs)]  # never the condition
    salt, digest = audit[0][5:]
    assert hashlib.sha256((salt + "path LIKE '%b.txt' OR path LIKE '%d.txt'").encode()).hexdigest() == digest


def test_a_store_without_the_documents_scores_text_exactly_as_one_built_without_them(
        docs_store, tiny_encoder, tmp_path, small_settings):
    fresh = Store.create(tmp_path / "fresh", encoder=tiny_encoder)
    fresh.add_corpus("docs", [_write(tmp_path / "without", ["a.txt", "c.txt", "d.txt"])], settings=small_settings)
    fresh.add_corpus("other", [tmp_path / "other"], settings=small_settings)
    text = TEXTS["b.txt"][:200] + TEXTS["a.txt"][:200]

    def ppl(store):
        lm = KNNLM(tiny_encoder.model, tiny_encoder.tokenizer, store, k=8, lambda_=0.5, temperature=1.0, exact=True)
        return round(lm.evaluate(text).knn_ppl, 4)

    with_it = ppl(docs_store)
    docs_store.remove_documents("path LIKE '%b.txt'", corpus="docs")
    assert ppl(docs_store) == ppl(fresh) != with_it  # the removed text helped before


def test_dry_run_and_the_corpus_option(docs_store, tmp_path):
    store = docs_store
    before = snapshot(store.path)
    preview = store.remove_documents("n_pairs > 0", corpus="other", dry_run=True)
    assert preview.dry_run and {d["corpus"] for d in preview.documents} == {"other"}
    assert changed(store.path, before) == set()
    result = CliRunner().invoke(cli, ["remove-documents", str(store.path), "--where", "n_pairs > 0",
                                      "--corpus", "other", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_documents"] == len(preview.documents)
    assert store.refresh() is None and store.corpus("other").documents == 0
    assert store.corpus("docs").documents == 4


@pytest.mark.parametrize("where, error", [
    ("", InputError),
    ("   ", InputError),
    ("this is not sql", InputError),
    ("document_id = -1", InputError),  # matches nothing
    ("1=1; DELETE FROM documents", InputError),  # a second statement
    ("1=1) UNION ALL (SELECT * FROM read_csv('/etc/passwd')", ReadOnlyError),  # reaching outside
    ("no_such_column = 3", InputError),
])
def test_bad_conditions_are_one_line_errors_that_change_nothing(docs_store, where, error):
    before = snapshot(docs_store.path)
    with pytest.raises(error) as raised:
        docs_store.remove_documents(where)
    assert "\n" not in str(raised.value)
    assert changed(docs_store.path, before) == set()


CHILD = """
import sys
from knnstore import Store
store = Store.open(sys.argv[1])
store.purge() if sys.argv[2] == "purge" else store.remove_documents(sys.argv[2])
"""


@pytest.mark.parametrize("point", ["remove_documents.after_intent", "remove_documents.after_table_delete"])
@pytest.mark.parametrize("finish", ["repair", "next removal"])
def test_a_killed_removal_leaves_a_store_that_opens_and_one_command_finishes_it(docs_store, point, finish):
    store = docs_store
    victim = _ids(store, "path LIKE '%b.txt'")
    expected = store.stats().pairs - store.sql(f"SELECT count(*) AS n FROM pairs WHERE document_id = {victim[0]}"
                                               ).to_pylist()[0]["n"]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(store.path), "path LIKE '%b.txt'"],
                          env={**os.environ, "KNNSTORE_CRASH_AT": point}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    after = Store.open(store.path)  # it opens
    pairs = after.sql("SELECT count(*) AS n FROM pairs").to_pylist()[0]["n"]
    assert pairs in (store.stats().pairs, expected)  # the documents' pairs all there, or all gone
    assert not check(after).ok  # the cut-short removal is reported
    if finish == "repair":
        check(after, repair=True)
    else:
        after.remove_documents("path LIKE '%c.txt'")
    after.refresh()
    assert victim[0] not in [d.id for d in after.documents("docs")]
    report = check(after)
    assert report.ok, [p.what for p in report.problems]
    assert after.sql("SELECT count(*) AS n FROM pairs").to_pylist()[0]["n"] == after.stats().pairs


def _pair_ids_on_disk(store) -> set[int]:
    """Every pair id in every data file of the table, deleted or not (the files read raw,
    without Lance's deletion vectors), and in every version the table still has."""
    import lance
    from lance.file import LanceFileReader

    data = store.table.table_uri.path / "data"
    found: set[int] = set()
    for f in data.iterdir():
        found |= set(LanceFileReader(str(f), columns=["pair_id"]).read_all().to_table().column("pair_id").to_pylist())
    ds = lance.dataset(str(store.table.table_uri.path))
    for v in ds.versions():
        found |= set(ds.checkout_version(v["version"]).to_table(columns=["pair_id"]).column("pair_id").to_pylist())
    return found


def test_purge_takes_removed_rows_off_the_disk_and_out_of_every_version(docs_store, tmp_path):
    store = docs_store
    store.create_index(num_partitions=2, index_type="ivf_pq", num_sub_vectors=4)
    victim = _ids(store, "path LIKE '%b.txt'")[0]
    sha = next(d.sha256 for d in store.documents("docs") if d.id == victim)
    removed = set(store.sql(f"SELECT pair_id FROM pairs WHERE document_id = {victim}").column("pair_id").to_pylist())
    kept = store.sql(f"SELECT pair_id FROM pairs WHERE document_id <> {victim} ORDER BY pair_id").to_pylist()
    store.remove_documents(f"document_id = {victim}")
    assert removed <= _pair_ids_on_disk(store)  # a removal is logical: the rows are still on disk
    result = CliRunner().invoke(cli, ["purge", str(store.path), "--json"])
    assert result.exit_code == 0, result.output
    done = json.loads(result.stdout)
    assert done["fragments_rewritten"] >= 1 and done["bytes_after"] < done["bytes_before"]
    store.refresh()
    assert not removed & _pair_ids_on_disk(store)
    assert sha not in (store.path / "catalog.db").read_bytes().decode("latin-1")  # vacuumed
    assert store.sql("SELECT pair_id FROM pairs ORDER BY pair_id").to_pylist() == kept
    assert store.search(store.table.columns(["vector"]).column("vector").to_numpy(zero_copy_only=False)[0]
                        .astype("float32")[None], k=4).pair_ids.size == 4  # the index still answers
    assert check(store).ok


def test_a_killed_purge_leaves_a_consistent_store(docs_store):
    store = docs_store
    store.remove_documents("path LIKE '%b.txt'")
    expected = store.sql("SELECT pair_id FROM pairs ORDER BY pair_id").to_pylist()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(store.path), "purge"],
                          env={**os.environ, "KNNSTORE_CRASH_AT": "purge.after_table"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    after = Store.open(store.path)
    assert after.sql("SELECT pair_id FROM pairs ORDER BY pair_id").to_pylist() == expected
    assert check(after).ok
    assert after.purge()["bytes_after"] > 0  # and it runs again


def test_a_condition_that_matches_everything_needs_yes(docs_store):
    store = docs_store
    before = snapshot(store.path)
    refused = CliRunner().invoke(cli, ["remove-documents", str(store.path), "--where", "1=1"])
    assert refused.exit_code == 1 and "every document of the store" in refused.output
    assert "--yes" in refused.output and "Traceback" not in refused.output
    assert changed(store.path, before) == set()
    done = CliRunner().invoke(cli, ["remove-documents", str(store.path), "--where", "1=1", "--yes", "--json"])
    assert done.exit_code == 0, done.output
    store.refresh()
    assert sum(c.documents for c in store.corpora()) == 0
