"""The classes of faults an adversarial run found (issue 15), each pinned at its root:
a catalog bound to its table, paths that are not URLs, outputs kept out of stores, one
snapshot per read, EXPLAIN classified, bounded resources, a lock that cannot be swapped,
read-only and damaged stores, user text printed literally, and what used to end in a
traceback."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from knnstore import (
    CatalogError,
    InputError,
    KNNSettings,
    ReadOnlyError,
    Store,
    StoreDamagedError,
    StoreLockedError,
    StoreMismatchError,
)
from knnstore.check import check
from knnstore.cli import cli
from knnstore.lock import WriteLock
from knnstore.outputs import atomic_output

from .conftest import changed, interrupted_cli_ingest, read_only_view, snapshot


def _run(*args, env=None):
    result = CliRunner().invoke(cli, [str(a) for a in args], env=env)
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture
def filled(store, text_dir, small_settings):
    store.add_corpus("keep", [text_dir], settings=small_settings)
    return store


# --- 1. a catalog that belongs to another store -------------------------------------


def test_a_catalog_of_another_store_is_refused_before_anything_is_read_or_repaired(filled, tmp_path, tiny_encoder):
    other = Store.create(tmp_path / "other", encoder=tiny_encoder)
    before = snapshot(other.path)
    env = {"KNNSTORE_CATALOG_URL": f"sqlite:///{filled.path / 'catalog.db'}"}
    for command in (["list", other.path], ["check", other.path, "--repair"], ["sql", other.path, "SELECT 1"]):
        result = _run(*command, env=env)
        assert result.exit_code == 1 and "does not belong to the store" in result.output, result.output
    assert changed(other.path, before) == set()
    os.environ["KNNSTORE_CATALOG_URL"] = env["KNNSTORE_CATALOG_URL"]
    try:
        with pytest.raises(StoreMismatchError, match="store ids"):
            Store.open(other.path)
    finally:
        del os.environ["KNNSTORE_CATALOG_URL"]


def test_a_percent_sign_in_the_path_does_not_open_a_sibling_store(tmp_path, tiny_encoder, text_dir, small_settings):
    plain = Store.create(tmp_path / "mixA", encoder=tiny_encoder)
    plain.add_corpus("a-only", [text_dir], settings=small_settings)
    odd = Store.create(tmp_path / "mix%41", encoder=tiny_encoder)
    assert odd.corpora() == [] and (tmp_path / "mix%41" / "catalog.db").exists()
    assert check(Store.open(tmp_path / "mix%41")).ok
    assert [c.name for c in Store.open(tmp_path / "mixA").corpora()] == ["a-only"]


def test_repair_of_a_store_made_before_ids_binds_it_first_and_only_then_deletes(filled, tmp_path):
    # An old store: no ids anywhere; its own catalog is bound at the first write.
    marker = json.loads((filled.path / "knnstore.json").read_text())
    marker.pop("store_id")
    (filled.path / "knnstore.json").write_text(json.dumps(marker))
    with sqlite3.connect(filled.path / "catalog.db") as db:
        db.execute("UPDATE store_config SET store_id = NULL")
    filled.table.dataset().delete_config_keys(["knnstore.store_id"])
    old = Store.open(filled.path)
    assert not old.bound and old.table.store_id() is None
    assert check(old, repair=True).ok
    again = Store.open(filled.path)
    assert again.bound and again.table.store_id() == again.store_id == json.loads(
        (filled.path / "knnstore.json").read_text())["store_id"]


# --- 2. paths are not URLs ----------------------------------------------------------


def test_a_question_mark_in_a_store_path_is_refused_and_nothing_is_written(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in (["init", "qm?a", "--model", tiny_model_dir], ["list", "odd?x"]):
        result = _run(*command)
        assert result.exit_code == 1 and "cannot contain '?'" in result.output
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["hash#b", "pct%2Fc", "sp ace", "pl+us"])
def test_odd_characters_in_a_store_path_keep_the_catalog_inside_the_store(tmp_path, tiny_model_dir, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    assert _run("init", name, "--model", tiny_model_dir).exit_code == 0
    assert sorted(os.listdir(tmp_path)) == [name]
    assert (tmp_path / name / "catalog.db").is_file()
    assert _run("list", name).exit_code == 0 and sorted(os.listdir(tmp_path)) == [name]


def test_a_read_never_creates_a_catalog(filled):
    (filled.path / "catalog.db").unlink()
    for wal in filled.path.glob("catalog.db-*"):
        wal.unlink()
    for command in ("list", "stats", "check"):
        result = _run(command, filled.path)
        assert result.exit_code == 1 and "catalog" in result.output and "missing or damaged" in result.output
        assert not (filled.path / "catalog.db").exists()


def test_a_relative_sqlite_catalog_url_is_resolved_once_at_init(tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert _run("init", tmp_path / "s", "--model", tiny_model_dir, "--catalog-url", "sqlite:///rel.db").exit_code == 0
    monkeypatch.chdir(tmp_path)
    assert (tmp_path / "here" / "rel.db").is_file()
    result = _run("stats", tmp_path / "s", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["catalog"] == f"sqlite:///{tmp_path / 'here' / 'rel.db'}"
    assert not (tmp_path / "rel.db").exists()


# --- 3. outputs into the store ------------------------------------------------------


def test_an_output_inside_a_store_is_refused_and_the_store_is_unchanged(filled, tmp_path):
    before = snapshot(filled.path)
    link = tmp_path / "innocent.csv"
    link.symlink_to(filled.path / "catalog.db")
    for target in (filled.path / "catalog.db", filled.path / "vectors" / "x.csv", link, filled.path):
        result = _run("sql", filled.path, "SELECT 1 AS one", "--output", target)
        assert result.exit_code != 0, target
    assert changed(filled.path, before) == set()


def test_outputs_are_written_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as f:
            f.write(b"half")
            raise RuntimeError("the writer died")
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["out.csv"]
    with pytest.raises(InputError, match="does not exist"):
        with atomic_output(tmp_path / "missing" / "out.csv"):
            pass


# --- 5. EXPLAIN ---------------------------------------------------------------------


@pytest.mark.parametrize("query", [
    "EXPLAIN ANALYZE CREATE TABLE t AS SELECT * FROM pairs",
    "EXPLAIN DROP VIEW pairs",
    "/* c */ explain (FORMAT JSON) INSERT INTO vocab VALUES (1, 'a', 'b')",
    "EXPLAIN ANALYZE COPY pairs TO 'x.csv'",
])
def test_explain_is_judged_by_the_statement_it_explains(filled, query):
    with pytest.raises(ReadOnlyError):
        filled.sql(query)


def test_explain_of_a_select_still_runs(filled):
    assert filled.sql("EXPLAIN ANALYZE SELECT count(*) FROM pairs").num_rows >= 1


# --- 6. resources -------------------------------------------------------------------


def test_k_is_bounded(filled):
    with pytest.raises(InputError, match="k must be at least 1 and at most 4,096"):
        KNNSettings(k=50_000_000)
    assert _run("eval", filled.path, "--text", __file__, "--k", "50000000").exit_code == 2


def test_a_fifo_or_a_device_is_refused_without_taking_the_lock(filled, tmp_path, small_settings):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    before = snapshot(filled.path)
    for source in (fifo, "/dev/zero"):
        t0 = time.monotonic()
        with pytest.raises(InputError, match="not a regular file"):
            filled.add_corpus("x", [source], settings=small_settings)
        assert time.monotonic() - t0 < 5
        result = _run("eval", filled.path, "--text", source)
        assert result.exit_code != 0 and "regular file" in result.output
    assert changed(filled.path, before) == set()


# --- 7. the lock --------------------------------------------------------------------

HOLD = """
import sys, time
from knnstore.lock import WriteLock
lock = WriteLock(sys.argv[1]); lock.acquire()
print("held", flush=True); time.sleep(60)
"""


def test_the_write_lock_holds_whatever_happens_to_files_in_the_store(filled, text_dir, small_settings):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(filled.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for stray in ("write.lock", "catalog.db-shm"):  # whatever a user deletes, the lock stays
            (filled.path / stray).unlink(missing_ok=True)
        with pytest.raises(StoreLockedError, match="another process is writing"):
            filled.remove_corpus("keep")
        assert filled.writer_active()
    finally:
        holder.kill()
        holder.wait()
    assert filled.corpus("keep").status == "ready"


def test_a_writer_stops_before_committing_into_a_directory_swapped_under_it(tmp_path, filled):
    lock = WriteLock(filled.path)
    lock.acquire()
    lock.verify()
    filled.path.rename(tmp_path / "moved")
    filled.path.mkdir()
    with pytest.raises(StoreLockedError, match="moved or replaced"):
        lock.verify()
    lock.release()


# --- 8. read-only stores ------------------------------------------------------------


@pytest.fixture
def read_only_copy(filled, tmp_path):
    with read_only_view(filled.path, tmp_path / "ro") as where:
        yield where


def test_a_read_only_store_can_be_read_and_refuses_writes_plainly(read_only_copy, filled, text_dir):
    listed = _run("list", read_only_copy, "--json")
    assert listed.exit_code == 0 and json.loads(listed.output)[0]["name"] == "keep"
    assert _run("stats", read_only_copy).exit_code == 0
    sql = _run("sql", read_only_copy, "SELECT count(*) AS n FROM pairs", "--format", "json")
    assert sql.exit_code == 0 and json.loads(sql.output) == [{"n": filled.corpus("keep").pairs}]
    assert _run("check", read_only_copy).exit_code == 0
    result = _run("remove-corpus", read_only_copy, "keep")
    assert result.exit_code == 1 and "read-only" in result.output
    with pytest.raises(ReadOnlyError):
        Store.open(read_only_copy).clear_calibrations()


# --- 9. damaged stores --------------------------------------------------------------


def _damage(store_path, how):
    if how == "truncated catalog":
        (store_path / "catalog.db").write_bytes((store_path / "catalog.db").read_bytes()[:100])
        for wal in store_path.glob("catalog.db-*"):
            wal.unlink()
    elif how == "no vectors":
        shutil.rmtree(store_path / "vectors")
    elif how.startswith("format "):
        marker = json.loads((store_path / "knnstore.json").read_text())
        marker["format_version"] = json.loads(how.split(" ", 1)[1])
        (store_path / "knnstore.json").write_text(json.dumps(marker))
    elif how == "catalog_url 5":
        marker = json.loads((store_path / "knnstore.json").read_text())
        marker["catalog_url"] = 5
        (store_path / "knnstore.json").write_text(json.dumps(marker))
    elif how == "marker not json":
        (store_path / "knnstore.json").write_text("{nope")


@pytest.mark.parametrize("how", ["truncated catalog", "no vectors", "format 0", "format -7", "format 1.9",
                                 'format "1"', "format true", "catalog_url 5", "marker not json"])
def test_a_damaged_store_gets_one_line_naming_the_part_from_every_command(filled, how):
    _damage(filled.path, how)
    before = snapshot(filled.path)
    for command in (["list"], ["stats"], ["sql", "{s}", "SELECT 1"], ["check"], ["remove-corpus", "{s}", "keep"]):
        args = [a.replace("{s}", str(filled.path)) for a in command] if len(command) > 1 else [*command, filled.path]
        result = _run(*args)
        assert result.exit_code == 1, (command, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        if command == ["check"]:  # a finding, then the verdict
            assert lines[-1].startswith("PROBLEMS FOUND") and lines[0].startswith("error: ")
            lines = lines[:-1]
        assert len(lines) == 1 and any(w in lines[0] for w in ("damaged", "missing", "knnstore.json")), lines
    assert changed(filled.path, before) == set()


def test_a_missing_data_file_is_a_finding_of_check_and_a_one_line_error_elsewhere(filled):
    data = sorted((filled.path / "vectors" / "pairs.lance" / "data").iterdir())
    data[0].unlink()
    result = _run("check", filled.path, "--repair")
    assert result.exit_code == 1 and "data file(s) of the pairs table are missing" in result.output
    with pytest.raises(StoreDamagedError, match="damaged"):
        Store.open(filled.path).search(np.zeros((1, 32), np.float32), k=4, exact=True)


# --- 10. user text printed literally ------------------------------------------------


def test_a_name_with_markup_is_added_listed_and_removed_literally(tmp_path, tiny_model_dir, text_dir):
    s = tmp_path / "s"
    assert _run("init", s, "--model", tiny_model_dir).exit_code == 0
    added = _run("add-corpus", s, "a[/]b [red]x", text_dir, "--window", "16", "--stride", "12")
    assert added.exit_code == 0 and "a[/]b [red]x" in added.output
    listed = _run("list", s)
    assert listed.exit_code == 0 and "a[/]b [red]x" in listed.output and "ready" in listed.output
    assert _run("remove-corpus", s, "  a[/]b [red]x ").exit_code == 0  # names are normalised alike


def test_control_characters_never_reach_the_terminal(filled, text_dir):
    result = _run("add-corpus", filled.path, "evil\x1b[31m", text_dir)
    assert result.exit_code == 1 and "\x1b" not in result.output and "\\x1b" in result.output
    result = _run("remove-corpus", filled.path, "no\x1b]0;title\x07")
    assert result.exit_code == 1 and "\x1b" not in result.output and "\x07" not in result.output


# --- 12. what used to end in a traceback --------------------------------------------


@pytest.mark.parametrize("url,shown", [
    ("postgresql+psycopg://knn:s3cret@127.0.0.1:1/db", "unreachable"),
    ("nope://u:s3cret@h/db", "unknown database"),
    ("::not a url s3cret", "not a SQLAlchemy URL"),
    ("sqlite://", "in-memory"),
])
def test_a_bad_catalog_url_is_one_line_with_the_password_masked(tmp_path, tiny_model_dir, url, shown):
    result = _run("init", tmp_path / "s", "--model", tiny_model_dir, "--catalog-url", url)
    assert result.exit_code == 1 and "s3cret" not in result.output, result.output
    assert shown == "unreachable" or shown in result.output
    assert not (tmp_path / "s").exists()


def test_init_where_the_parent_is_a_file_or_proc_leaves_nothing(tmp_path, tiny_model_dir):
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "file" / "s", "/proc/knnstore-test/s"):
        result = _run("init", target, "--model", tiny_model_dir)
        assert result.exit_code == 1 and "cannot create a store" in result.output
    assert os.listdir(tmp_path) == ["file"]
    with pytest.raises(CatalogError):
        Store.create(tmp_path / "t", model=str(tiny_model_dir), catalog_url="nope://x")


def test_a_jsonl_line_with_a_lone_surrogate_is_named(filled, tmp_path, small_settings):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken \\ud800 here"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: holds a lone surrogate"):
        filled.add_corpus("x", [bad], settings=small_settings)


def test_an_empty_store_retrieves_nothing(store, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The European lobster is a species of clawed lobster. " * 4)
    result = _run("eval", store.path, "--text", text, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["retrieved_fraction"] == 0.0


def test_an_error_after_a_corpus_is_ready_leaves_it_ready(store, text_dir, small_settings):
    def fail_at_the_end(done, total):
        if done >= total:
            raise RuntimeError("the progress display broke")

    with pytest.raises(RuntimeError):
        store.add_corpus("x", [text_dir], settings=small_settings, progress=fail_at_the_end)
    assert store.corpus("x").status == "ready" and check(store).problems == []


def test_sigterm_is_handled_like_ctrl_c_and_repair_closes_dead_runs(tmp_path, tiny_model_dir):
    proc, err, s = interrupted_cli_ingest(tmp_path, tiny_model_dir, signal.SIGTERM)
    if proc.returncode == 0:
        pytest.skip("the ingest finished before the signal arrived")
    assert proc.returncode == 143 and "Terminated" in err and "Traceback" not in err
    store = Store.open(s)
    assert store.corpus("many").status == "failed"
    # A run left `running` by a process killed outright is closed by repair.
    with sqlite3.connect(s / "catalog.db") as db:
        db.execute("UPDATE ingest_runs SET status = 'running', finished_at = NULL")
    report = check(Store.open(s), repair=True)
    assert any("recorded as running" in p.what and p.repaired for p in report.problems)
    with sqlite3.connect(s / "catalog.db") as db:
        assert db.execute("SELECT count(*) FROM ingest_runs WHERE status = 'running'").fetchone() == (0,)


def test_a_model_that_fails_while_encoding_is_one_line_and_a_resumable_corpus(filled, text_dir, small_settings, monkeypatch):
    from knnstore import ModelRunError

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    with monkeypatch.context() as m:
        m.setattr(filled.encoder, "forward", broken)
        with pytest.raises(ModelRunError, match=r"failed while encoding corpus 'x' \(RuntimeError: CUDA out"):
            filled.add_corpus("x", [text_dir], settings=small_settings)
    assert filled.corpus("x").status == "failed" and filled.stats().pairs == filled.corpus("keep").pairs
    filled.resume_corpus(" x ")  # names are normalised alike by every command
    assert filled.corpus("x").status == "ready" and check(filled).problems == []


def test_a_write_to_a_table_with_a_missing_data_file_changes_nothing(filled, tmp_path):
    next((filled.path / "vectors" / "pairs.lance" / "data").iterdir()).unlink()
    before = snapshot(filled.path)
    result = _run("remove-corpus", filled.path, "keep")
    assert result.exit_code == 1 and "data file(s) missing" in result.output
    assert changed(filled.path, before) == set() and Store.open(filled.path).corpus("keep").status == "ready"
    assert _run("sql", filled.path, "SELECT count(*) FROM pairs").exit_code == 1


def test_a_text_that_cannot_be_read_is_one_line(filled):
    result = _run("eval", filled.path, "--text", "/proc/self/mem")
    assert result.exit_code == 1 and "cannot read /proc/self/mem" in result.output


def test_a_store_whose_corpora_hold_no_pairs_retrieves_nothing(store, tmp_path, small_settings):
    """A ready corpus whose documents were all removed holds no pair: nothing is searched,
    so nothing is said to have been retrieved (issue 31)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The lobster sat on the rock. " * 6)
    store.add_corpus("docs", [docs], settings=small_settings)
    store.remove_documents("1=1")
    assert store.corpus("docs").pairs == 0 and store.corpus("docs").status == "ready"
    text = tmp_path / "t.txt"
    text.write_text("The European lobster is a species of clawed lobster. " * 4)
    result = _run("eval", store.path, "--text", text, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["retrieved_fraction"] == 0.0
