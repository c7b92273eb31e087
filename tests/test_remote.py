"""Stores on object storage: ``s3://`` with a PostgreSQL catalog (or, on one machine, an
SQLite one), reached from the store's URI alone; one writer across processes (the
catalog's advisory lock); an object store that stops mid-ingest loses nothing.

Real servers on 127.0.0.1 (``tests/servers.py``): moto's S3 server behind a gate that can
be closed like a stopped server, and PostgreSQL; the tiny model, small corpora.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from knnstore import Store, StoreLockedError
from knnstore.cli import cli
from knnstore.errors import StorageError

from .test_distributed import SETTINGS, assert_same_corpus, write_docs

SMALL = ["--window", "16", "--stride", "12", "--batch-size", "4"]


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The S3 server, with its endpoint and credentials in the environment (as a user sets
    them); AWS_ALLOW_HTTP is left unset: knnstore allows http for an http:// endpoint."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ALLOW_HTTP", raising=False)
    monkeypatch.delenv("KNNSTORE_CATALOG_URL", raising=False)
    return s3_server


def _cli(*args, env=None):
    """The CLI in a child process (a second writer is another process, not a thread)."""
    return subprocess.run([sys.executable, "-m", "knnstore", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def _text(tmp_path, name="docs", n=4):
    return write_docs(tmp_path / name, n)


def test_a_store_on_s3_needs_a_catalog_outside_it(s3, tmp_path, tiny_model_dir):
    uri = s3.uri()
    result = CliRunner().invoke(cli, ["init", uri, "--model", str(tiny_model_dir)])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--catalog-url" in errors[0]
    assert s3.objects(uri) == {}  # nothing written


def test_an_s3_store_with_a_postgresql_catalog_works_from_its_uri_alone(s3, postgres, tmp_path, tiny_model_dir):
    uri, db = s3.uri(), postgres.database()
    runner = CliRunner()
    created = runner.invoke(cli, ["init", uri, "--model", str(tiny_model_dir), "--catalog-url", db])
    assert created.exit_code == 0, created.output
    objects = s3.objects(uri)
    marker = uri.split("://", 1)[1] + "/knnstore.json"
    assert marker in objects and any("/vectors/pairs.lance/" in key for key in objects)
    with s3.filesystem().open_input_stream(marker) as f:
        assert json.loads(f.read())["catalog_url"] == db  # later commands need only the URI

    text = _text(tmp_path)
    added = runner.invoke(cli, ["add-corpus", uri, "docs", str(text), *SMALL])
    assert added.exit_code == 0, added.output
    listed = json.loads(runner.invoke(cli, ["list", uri, "--json"]).stdout)
    assert [(c["name"], c["status"]) for c in listed] == [("docs", "ready")]
    pairs = listed[0]["pairs"]
    stats = json.loads(runner.invoke(cli, ["stats", uri, "--json"]).stdout)
    assert stats["pairs"] == pairs and stats["bytes_on_disk"] > 0 and stats["path"] == uri
    counted = runner.invoke(cli, ["sql", uri, "SELECT count(*) AS n FROM pairs", "--format", "json"])
    assert counted.exit_code == 0 and json.loads(counted.stdout)[0]["n"] == pairs
    scored = runner.invoke(cli, ["eval", uri, "--text", str(next(text.iterdir())), "--json", *SMALL[:4]])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["knn_ppl"] > 0
    generated = runner.invoke(cli, ["generate", uri, "The European", "--max-new-tokens", "3", "--explain"])
    assert generated.exit_code == 0 and "sources" in generated.stdout.lower(), generated.output
    assert runner.invoke(cli, ["check", uri]).exit_code == 0

    # the same pairs as a local store built from the same text
    local = Store.create(tmp_path / "local", model=str(tiny_model_dir))
    local.add_corpus("docs", [text], settings=SETTINGS)
    assert_same_corpus(local, Store.open(uri), "docs")

    first = runner.invoke(cli, ["remove-documents", uri, "--where", "ordinal = 0", "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(runner.invoke(cli, ["stats", uri, "--json"]).stdout)["pairs"] == \
        pairs - json.loads(first.stdout)["n_pairs"]
    forgot = runner.invoke(cli, ["forget", uri, "--text", "lobster", "--json"])
    assert forgot.exit_code == 0, forgot.output
    assert json.loads(forgot.stdout)["occurrences"] > 0 and json.loads(forgot.stdout)["pairs_removed"] > 0
    purged = runner.invoke(cli, ["purge", uri, "--json"])  # data files rewritten on S3, VACUUM FULL
    assert purged.exit_code == 0, purged.output
    assert json.loads(purged.stdout)["fragments_rewritten"] >= 1
    assert runner.invoke(cli, ["check", uri]).exit_code == 0

    removed = runner.invoke(cli, ["remove-corpus", uri, "docs"])
    assert removed.exit_code == 0, removed.output
    assert json.loads(runner.invoke(cli, ["list", uri, "--json"]).stdout) == []
    assert runner.invoke(cli, ["check", uri]).exit_code == 0


def test_one_writer_at_a_time_across_processes_and_the_second_loses_nothing(s3, postgres, tmp_path, tiny_model_dir):
    uri = s3.uri()
    first = Store.create(uri, model=str(tiny_model_dir), catalog_url=postgres.database())
    first.add_corpus("one", [_text(tmp_path, "one", 2)], settings=SETTINGS)
    reader = Store.open(uri)
    before = s3.objects(uri)
    with first.write_lock():  # a writer in this process: the child is a second writer
        assert reader.writer_active()  # seen through the catalog, by another session
        refused = _cli("add-corpus", uri, "two", _text(tmp_path, "two", 2), *SMALL)
        assert refused.returncode == 1
        assert "another process (maybe on another machine) is writing" in refused.stderr
        assert len([line for line in refused.stderr.splitlines() if line.startswith("Error:")]) == 1
        with pytest.raises(StoreLockedError):
            reader.remove_corpus("one")
    assert s3.objects(uri) == before and not reader.writer_active()
    reader.refresh()
    assert [c.name for c in reader.corpora()] == ["one"]
    retried = _cli("add-corpus", uri, "two", tmp_path / "two", *SMALL)  # the lock is free: it lands
    assert retried.returncode == 0, retried.stderr
    reader.refresh()
    assert [(c.name, c.status) for c in reader.corpora()] == [("one", "ready"), ("two", "ready")]


def test_an_object_store_that_stops_mid_ingest_loses_nothing_and_resume_finishes(s3, postgres, tmp_path,
                                                                                tiny_model_dir):
    uri = s3.uri()
    store = Store.create(uri, model=str(tiny_model_dir), catalog_url=postgres.database())
    store.add_corpus("keep", [_text(tmp_path, "keep", 2)], settings=SETTINGS)
    kept = store.corpus("keep")
    text = _text(tmp_path, "big", 8)

    def stop_half_way(done, total):
        if done > total // 2:
            s3.gate.close()  # the server is gone: refused connections from now on

    try:
        with pytest.raises(StorageError) as raised:
            store.add_corpus("big", [text], settings=SETTINGS, progress=stop_half_way)
    finally:
        s3.gate.open()
    message = str(raised.value)
    assert "resume-corpus" in message and "\n" not in message
    store = Store.open(uri)
    assert store.corpus("big").status == "failed"
    assert store.stats().pairs == kept.pairs  # the failed corpus is invisible
    assert store.search(store.table.columns(["vector"]).column("vector").to_numpy(zero_copy_only=False)[0]
                        .astype("float32")[None], k=4).pair_ids.size > 0
    resumed = store.resume_corpus("big")
    assert resumed.status == "ready" and store.corpus("keep") == kept
    local = Store.create(tmp_path / "local", model=str(tiny_model_dir))
    local.add_corpus("keep", [tmp_path / "keep"], settings=SETTINGS)
    local.add_corpus("big", [text], settings=SETTINGS)
    assert_same_corpus(local, store, "big")
    assert store.check().ok


def test_check_repair_removes_uncommitted_fragments_from_the_object_store(s3, postgres, tmp_path, tiny_model_dir):
    import lance.fragment
    import pyarrow as pa

    uri = s3.uri()
    store = Store.create(uri, model=str(tiny_model_dir), catalog_url=postgres.database())
    store.add_corpus("docs", [_text(tmp_path, "docs", 2)], settings=SETTINGS)
    rows = store.table.columns([f.name for f in store.table.schema])
    committed = s3.objects(uri)
    # what a writer killed between writing its fragments and committing them leaves
    lance.fragment.write_fragments(pa.Table.from_batches(rows.to_batches(), store.table.schema),
                                   store.table.table_uri.uri, schema=store.table.schema, mode="append",
                                   storage_options=store.table.table_uri.lance_options())
    orphans = set(s3.objects(uri)) - set(committed)
    assert orphans
    result = CliRunner().invoke(cli, ["check", uri, "--repair"])
    assert result.exit_code == 0, result.output
    left = s3.objects(uri)
    assert not orphans & set(left)
    store = Store.open(uri)
    assert store.stats().pairs == store.corpus("docs").pairs == rows.num_rows


def test_storage_options_reach_a_store_without_the_environment(s3, postgres, tmp_path, tiny_model_dir, monkeypatch):
    uri = s3.uri()
    Store.create(uri, model=str(tiny_model_dir), catalog_url=postgres.database())
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options = [f"--storage-option=aws_endpoint={s3.endpoint}", "--storage-option=aws_region=us-east-1"]
    listed = CliRunner().invoke(cli, ["list", uri, "--json", *options])
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.stdout) == []


def test_credentials_and_passwords_are_told_apart_from_damage(s3, postgres, tmp_path, tiny_model_dir, monkeypatch):
    """init with a catalog password opens what it made through that URL (the marker keeps
    none); missing S3 credentials are a StorageError about credentials, never "restore from a
    backup"; half a key pair as --storage-option is one line."""
    uri = s3.uri()
    with_password = postgres.database().replace("knnstore@", "knnstore:s3cret@")
    store = Store.create(uri, model=str(tiny_model_dir), catalog_url=with_password)
    assert store.engine.url.password == "s3cret" and "s3cret" not in json.dumps(s3.objects(uri), default=str)
    monkeypatch.setenv("KNNSTORE_CATALOG_URL", with_password)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="credentials") as failed:
        Store.open(uri)
    assert "backup" not in str(failed.value) and "damaged" not in str(failed.value).replace("not damaged", "")
    half = CliRunner().invoke(cli, ["list", uri, "--storage-option", "aws_secret_access_key=x"])
    assert half.exit_code == 1 and "aws_access_key_id too" in half.output and "Traceback" not in half.output


def test_an_s3_store_with_an_sqlite_catalog_on_one_machine(s3, tmp_path, tiny_model_dir):
    uri = s3.uri()
    store = Store.create(uri, model=str(tiny_model_dir), catalog_url=f"sqlite:///{tmp_path / 'catalog.db'}")
    store.add_corpus("docs", [_text(tmp_path, "docs", 2)], settings=SETTINGS)
    other = Store.open(uri)
    with store.write_lock():  # a flock on the catalog file: one machine
        assert other.writer_active()
        with pytest.raises(StoreLockedError):
            other.write_lock(wait_s=0.2).__enter__()
    assert [(c.name, c.status) for c in other.corpora()] == [("docs", "ready")]


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed: pip install 'knnstore[ray]'")
def test_ray_workers_write_their_fragments_to_the_object_store(s3, postgres, tmp_path, tiny_model_dir):
    uri = s3.uri()
    store = Store.create(uri, model=str(tiny_model_dir), catalog_url=postgres.database())
    text = _text(tmp_path, "docs", 4)
    info = store.add_corpus("docs", [text], settings=SETTINGS, workers=1)
    assert info.status == "ready"
    local = Store.create(tmp_path / "local", model=str(tiny_model_dir))
    local.add_corpus("docs", [text], settings=SETTINGS)
    assert_same_corpus(local, store, "docs")
