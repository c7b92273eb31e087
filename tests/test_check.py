"""`knnstore check`: the catalog and the table agree, and --repair fixes what is safe."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, update

from knnstore import Store, catalog
from knnstore.check import check
from knnstore.cli import cli

from .conftest import Boom, fail_after, reader_view, write_docs


@pytest.fixture
def two(store, text_dir, tmp_path, small_settings):
    store.add_corpus("keep", [text_dir], settings=small_settings)
    other = write_docs(tmp_path / "other", 1, 4, "All: Speak, speak. First Citizen: You are all resolved. ")
    store.add_corpus("other", [other], settings=small_settings)
    return store


def _sql(store, statement):
    with store.engine.begin() as conn:
        conn.execute(statement)


def test_a_healthy_store_checks_ok(two):
    report = check(two)
    assert report.ok and report.problems == [] and report.corpora == 2
    assert report.table_rows == two.stats().pairs
    result = CliRunner().invoke(cli, ["check", str(two.path)])
    assert result.exit_code == 0 and "OK: 2 corpora" in result.output


def test_rows_without_a_corpus_are_invisible_an_error_and_deleted_by_repair(two):
    other = two.corpus("other")
    _sql(two, delete(catalog.Document).where(catalog.Document.corpus_id == other.id))
    _sql(two, delete(catalog.Corpus).where(catalog.Corpus.id == other.id))  # rows are left behind
    before = reader_view(two, "keep")
    assert other.id not in set(np.ravel(two.search(np.zeros((4, 32), np.float32), k=50).corpus_ids))
    assert two.sql("SELECT count(*) AS n FROM pairs").to_pylist() == [{"n": two.corpus("keep").pairs}]
    report = check(two)
    assert not report.ok and "which the catalog does not know" in report.problems[0].what
    result = CliRunner().invoke(cli, ["check", str(two.path), "--json"])
    assert result.exit_code == 1 and json.loads(result.stdout)["ok"] is False
    repaired = check(two, repair=True)
    assert repaired.ok and repaired.problems[0].repaired
    assert check(Store.open(two.path)).problems == []
    assert two.table.count() == two.corpus("keep").pairs
    assert reader_view(two, "keep") == before


def test_a_removal_cut_short_is_finished_by_repair(two):
    other = two.corpus("other")
    _sql(two, update(catalog.Corpus).where(catalog.Corpus.id == other.id).values(status="removing"))
    before = reader_view(two, "keep")
    assert "was being removed" in check(two).problems[0].what and not check(two).ok
    assert check(two, repair=True).ok
    assert [c.name for c in two.corpora()] == ["keep"] and check(two).problems == []
    assert reader_view(two, "keep") == before


def test_a_dead_ingest_is_a_warning_and_repair_marks_it_failed(two, text_dir, small_settings):
    with pytest.raises(Boom):
        two.add_corpus("dead", [text_dir], settings=small_settings, progress=fail_after(2))
    dead = two.corpus("dead")
    _sql(two, update(catalog.Corpus).where(catalog.Corpus.id == dead.id).values(status="ingesting"))
    report = check(two)
    assert report.ok  # incomplete, not corrupt
    (warning,) = report.problems
    assert warning.severity == "warning" and "resume-corpus" in warning.what and warning.repair == "mark it failed"
    check(two, repair=True)
    from sqlalchemy.orm import Session
    with Session(two.engine) as s:
        assert s.get(catalog.Corpus, dead.id).status == "failed"
    two.resume_corpus("dead")
    assert check(two).problems == []


def test_counts_that_disagree_in_a_ready_corpus_are_reported_and_never_repaired(two):
    keep = two.corpus("keep")
    _sql(two, update(catalog.Corpus).where(catalog.Corpus.id == keep.id).values(n_pairs=keep.pairs + 1))
    doc = two.documents("keep")[0]
    _sql(two, update(catalog.Document).where(catalog.Document.id == doc.id).values(n_pairs=doc.n_pairs - 1))
    report = check(two, repair=True)
    whats = " | ".join(p.what for p in report.problems)
    assert not report.ok and "the catalog counts" in whats and f"document {doc.id}" in whats
    assert not any(p.repaired for p in report.problems)
    assert two.table.count() == keep.pairs + two.corpus("other").pairs  # no row was touched
    assert CliRunner().invoke(cli, ["check", str(two.path), "--repair"]).exit_code == 1


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["add", "remove", "fail"]), st.integers(0, 3)), min_size=1, max_size=6))
def test_catalog_and_table_agree_after_any_sequence_of_adds_and_removes(tmp_path_factory, tiny_encoder, small_settings, ops):
    root = tmp_path_factory.mktemp("seq")
    sources = [write_docs(root / f"src{i}", 1, i + 2, f"Source {i}: the lobsters are blue. ") for i in range(4)]
    store = Store.create(root / "store", model=tiny_encoder.name, encoder=tiny_encoder)
    expected: dict[str, int] = {}
    for op, i in ops:
        name = f"c{i}"
        exists = name in {c.name for c in store.corpora()}
        if op == "add" and not exists:
            expected[name] = store.add_corpus(name, [sources[i]], settings=small_settings).pairs
        elif op == "fail" and not exists:
            with pytest.raises(Boom):
                store.add_corpus(name, [sources[i]], settings=small_settings, progress=fail_after(1))
        elif op == "remove" and exists:
            store.remove_corpus(name)
            expected.pop(name, None)
        report = check(store)
        assert report.ok and all(p.severity == "warning" for p in report.problems)
        ready = {c.name: c.pairs for c in store.corpora() if c.status == "ready"}
        assert ready == expected
        assert store.sql("SELECT count(*) AS n FROM pairs").to_pylist() == [{"n": sum(expected.values())}]


def test_the_python_twin_of_check_is_store_check(two):
    assert two.check().ok and two.check().to_dict() == check(two).to_dict()
