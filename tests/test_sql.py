"""Read-only SQL over a store: views agree with the Python API, nothing can be changed.

The PostgreSQL tests start their own server on loopback (Debian's postgresql package; .ci/run
installs it) and are skipped, with the reason shown, where no server binaries exist.
"""

import json
import os

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from knnstore import InputError, ReadOnlyError, Store
from knnstore.cli import cli

from .conftest import Boom, changed, fail_after, snapshot, write_docs


@pytest.fixture
def filled(store, text_dir, tmp_path, small_settings):
    store.add_corpus("docs", [text_dir], settings=small_settings)
    more = write_docs(tmp_path / "more", 1, 5, "Speak, speak. We are resolved. ")
    store.add_corpus("it's; DROP TABLE pairs; --", [more], settings=small_settings)  # a name, not SQL
    return store


def _one(store, query):
    return store.sql(query).to_pylist()


def test_each_view_agrees_with_the_python_api(filled):
    stats = filled.stats()
    assert _one(filled, "SELECT count(*) AS n FROM pairs") == [{"n": stats.pairs}]
    by_corpus = {r["corpus"]: r["n"] for r in _one(filled, "SELECT corpus, count(*) AS n FROM pairs GROUP BY 1")}
    assert by_corpus == {c.name: c.pairs for c in filled.corpora()}
    corpora = _one(filled, "SELECT name, status, n_documents, n_pairs FROM corpora ORDER BY id")
    assert corpora == [{"name": c.name, "status": c.status, "n_documents": c.documents, "n_pairs": c.pairs}
                       for c in filled.corpora()]
    docs = _one(filled, "SELECT id, corpus, title, n_pairs FROM documents WHERE corpus = 'docs' ORDER BY ordinal")
    api = filled.documents("docs")
    assert [(d["id"], d["title"], d["n_pairs"]) for d in docs] == [(d.id, d.title, d.n_pairs) for d in api]
    per_doc = {r["document_id"]: r["n"] for r in _one(filled, "SELECT document_id, count(*) AS n FROM pairs GROUP BY 1")}
    assert per_doc == {d["id"]: d["n_pairs"] for d in _one(filled, "SELECT id, n_pairs FROM documents")}
    assert _one(filled, "SELECT count(*) AS n FROM vocab") == [{"n": filled.identity.vocab_size}]
    kinds = [r["kind"] for r in _one(filled, "SELECT kind FROM runs ORDER BY id")]
    assert kinds == ["add", "add"]


def test_token_text_agrees_with_the_tokenizer(filled, tiny_encoder):
    rows = _one(filled, "SELECT p.position, p.token, p.token_text, p.next_token, p.next_token_text "
                        "FROM pairs p JOIN documents d ON d.id = p.document_id "
                        "WHERE d.title = 'a' ORDER BY p.position")
    decode = tiny_encoder.tokenizer.decode
    assert rows and all(r["token_text"] == decode([r["token"]]) for r in rows)
    assert all(r["next_token_text"] == decode([r["next_token"]]) for r in rows)
    assert [r["position"] for r in rows] == list(range(len(rows)))
    text = "".join(r["token_text"] for r in rows) + rows[-1]["next_token_text"]
    assert text == (filled.path.parent / "docs" / "a.txt").read_text()


def test_the_key_vector_is_there_when_selected(filled):
    row = _one(filled, "SELECT pair_id, vector FROM pairs ORDER BY pair_id LIMIT 1")[0]
    stored = filled.table.take([row["pair_id"]], columns=["vector"]).column("vector")[0].as_py()
    assert len(row["vector"]) == filled.identity.dim
    assert row["vector"] == pytest.approx(stored)


def test_the_key_vector_is_never_read_unless_selected(filled, monkeypatch):
    from knnstore import sql

    asked = []
    original = sql._PairsDataset.scanner

    def spy(self, *args, **kwargs):
        scan = original(self, *args, **kwargs)
        asked.append(list(kwargs["columns"]))
        return scan

    monkeypatch.setattr(sql._PairsDataset, "scanner", spy)
    filled.sql("SELECT next_token_text, count(*) FROM pairs GROUP BY 1")
    filled.sql("SELECT * EXCLUDE (vector) FROM pairs WHERE document_id = 1")
    assert asked and all("vector" not in cols for cols in asked)
    filled.sql("SELECT vector FROM pairs LIMIT 1")
    assert "vector" in asked[-1]


def test_pairs_of_a_failed_corpus_are_invisible_even_in_the_raw_scan(store, text_dir, tmp_path, small_settings):
    store.add_corpus("ready", [text_dir], settings=small_settings)
    big = write_docs(tmp_path / "big", 12)
    with pytest.raises(Boom):
        store.add_corpus("big", [big], settings=small_settings, progress=fail_after(30))
    store.refresh()
    assert store.table.count() > store.stats().pairs  # the failed corpus's rows are in the table
    assert _one(store, "SELECT count(*) AS n FROM pairs") == [{"n": store.stats().pairs}]
    assert _one(store, "SELECT count(*) AS n FROM _pairs") == [{"n": store.stats().pairs}]
    assert _one(store, "SELECT count(*) AS n FROM documents WHERE corpus = 'big'") == [{"n": 0}]
    assert {r["name"]: r["status"] for r in _one(store, "SELECT name, status FROM corpora")} == {
        "ready": "ready", "big": "failed"}


REFUSED = [
    "INSERT INTO vocab VALUES (1, 'a', 'b')",
    "UPDATE corpora SET name = 'x'",
    "DELETE FROM pairs",
    "CREATE TABLE t AS SELECT * FROM pairs",
    "DROP VIEW pairs",
    "COPY pairs TO 'out.csv'",
    "EXPORT DATABASE 'dump'",
    "ATTACH 'other.db' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "PRAGMA enable_profiling",
    "CALL pragma_version()",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('catalog.db')",
    "SELECT * FROM 'catalog.db'",
    "SELECT 1; DELETE FROM pairs",
]


@pytest.mark.parametrize("query", REFUSED)
def test_statements_that_write_or_reach_outside_are_refused_and_change_nothing(filled, query, monkeypatch):
    monkeypatch.chdir(filled.path)
    before = snapshot(filled.path)
    with pytest.raises((ReadOnlyError, InputError)):
        filled.sql(query)
    assert changed(filled.path, before) == set()
    journals = ("-shm", "-wal")  # SQLite's, beside the catalog while a connection is open
    assert sorted(n for n in os.listdir(filled.path) if not n.endswith(journals)) == sorted({p.split("/")[0] for p in before})


def test_the_cli_prints_tables_and_writes_csv_json_and_parquet(filled, tmp_path):
    runner = CliRunner()
    s = str(filled.path)
    table = runner.invoke(cli, ["sql", s, "SELECT corpus, count(*) AS n FROM pairs GROUP BY 1 ORDER BY 1"])
    assert table.exit_code == 0, table.output
    assert "docs" in table.stdout and "it's; DROP TABLE pairs; --" in table.stdout and "2 rows" in table.stdout
    rows = json.loads(runner.invoke(cli, ["sql", s, "SELECT id, name FROM corpora ORDER BY id", "--format", "json"]).stdout)
    assert rows == [{"id": c.id, "name": c.name} for c in filled.corpora()]
    csv = runner.invoke(cli, ["sql", s, "SELECT token_id, text FROM vocab ORDER BY token_id LIMIT 3", "--format", "csv"])
    assert csv.stdout.splitlines()[0] == '"token_id","text"' and len(csv.stdout.splitlines()) == 4
    out = tmp_path / "pairs.parquet"
    result = runner.invoke(cli, ["sql", s, "SELECT * FROM pairs", "--format", "parquet", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).num_rows == filled.stats().pairs
    many = runner.invoke(cli, ["sql", s, "SELECT * FROM vocab", "--max-rows", "5"])
    assert "not shown" in many.stdout


def test_the_cli_refuses_a_write_with_one_line_and_exit_1(filled):
    before = snapshot(filled.path)
    result = CliRunner().invoke(cli, ["sql", str(filled.path), "DELETE FROM pairs"])
    assert result.exit_code == 1 and "read-only" in result.output and "Traceback" not in result.output
    assert snapshot(filled.path).keys() == before.keys()


def test_the_interactive_prompt_runs_statements_until_quit(filled):
    script = "SELECT count(*) AS n\nFROM pairs;\nDELETE FROM pairs;\nSELECT 41 + 1 AS answer;\n.quit\n"
    result = CliRunner().invoke(cli, ["sql", str(filled.path)], input=script)
    assert result.exit_code == 0, result.output
    assert str(filled.stats().pairs) in result.stdout and "42" in result.stdout
    assert "read-only" in result.output


# --- PostgreSQL catalog ----------------------------------------------------------------

@pytest.fixture(scope="module")
def postgres_url(postgres):
    """An empty database on the test PostgreSQL server (``servers.start_postgres``)."""
    return postgres.database("catalog")


def test_a_catalog_password_is_never_written_with_the_store(postgres_url, tmp_path, tiny_encoder):
    # The test server trusts loopback, so any password connects; the store must not keep it.
    from sqlalchemy import create_engine, text

    engine = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("CREATE DATABASE pwtest"))
    engine.dispose()
    postgres_url = postgres_url.rsplit("/", 1)[0] + "/pwtest"
    with_password = postgres_url.replace("knnstore@", "knnstore:s3cret-pw@")
    store = Store.create(tmp_path / "pw-store", encoder=tiny_encoder, catalog_url=with_password)
    assert "s3cret-pw" not in (tmp_path / "pw-store" / "knnstore.json").read_text()
    assert not any("s3cret-pw".encode() in p.read_bytes() for p in (tmp_path / "pw-store").rglob("*") if p.is_file())
    assert Store.open(tmp_path / "pw-store").catalog_url == postgres_url
    store.close()


def test_a_postgresql_catalog_serves_the_store_and_sql(postgres_url, tmp_path, tiny_encoder, text_dir, small_settings):
    store = Store.create(tmp_path / "pg-store", encoder=tiny_encoder, catalog_url=postgres_url)
    info = store.add_corpus("docs", [text_dir], settings=small_settings)
    assert not (tmp_path / "pg-store" / "catalog.db").exists()
    reopened = Store.open(tmp_path / "pg-store")
    assert reopened.catalog_url == postgres_url and reopened.corpus("docs").pairs == info.pairs
    assert _one(reopened, "SELECT count(*) AS n FROM pairs") == [{"n": info.pairs}]
    assert _one(reopened, "SELECT count(*) AS n FROM documents") == [{"n": 3}]
    assert _one(reopened, "SELECT count(*) AS n FROM vocab") == [{"n": tiny_encoder.tokenizer.__len__()}]
    with pytest.raises(ReadOnlyError):
        reopened.sql("DELETE FROM corpora")
    reopened.remove_corpus("docs")
    assert _one(Store.open(tmp_path / "pg-store"), "SELECT count(*) AS n FROM corpora") == [{"n": 0}]
