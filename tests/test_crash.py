"""kill -9 at every write point (knnstore.faults): the store opens, `check` passes after
`--repair`, nothing partial is visible, ready corpora are intact, one command recovers.

Each case runs the write in a child process that SIGKILLs itself at the named point.
"""

import subprocess
import sys

import numpy as np
import pytest

from knnstore import Store
from knnstore.check import check
from knnstore.faults import POINTS

from .conftest import reader_view, write_docs

CHILD = """
import sys
from knnstore import Encoder, IngestSettings, Store
path, action, arg, model_dir = sys.argv[1:5]
store = Store.open(path, encoder=Encoder.load(model_dir))
if action == "add":
    store.add_corpus("new", [arg], settings=IngestSettings(window=16, stride=12, batch_size=4, commit_every=64))
elif action == "resume":
    store.resume_corpus("new")
elif action == "remove":
    store.remove_corpus(arg)
elif action == "index":
    store.create_index(num_partitions=2, num_sub_vectors=2)
"""


def _child(store, action, arg, tiny_model_dir, crash_at):
    env = {"KNNSTORE_CRASH_AT": crash_at} if crash_at else {}
    import os

    proc = subprocess.run([sys.executable, "-c", CHILD, str(store.path), action, str(arg), str(tiny_model_dir)],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    return proc


@pytest.fixture
def crash_store(store, text_dir, tmp_path, small_settings):
    store.add_corpus("keep", [text_dir], settings=small_settings)
    gone = write_docs(tmp_path / "gone", 1, 3, "All: Speak, speak. First Citizen: You are all resolved to die. ")
    store.add_corpus("gone", [gone], settings=small_settings)
    return store, write_docs(tmp_path / "big", 8)


ADD_POINTS = [p for p in POINTS if p.split(".")[0] in ("add", "ingest", "commit")]


def _expected_pairs(encoder, directory):
    return sum(len(encoder.tokenize(f.read_text())) - 1 for f in sorted(directory.iterdir()))


def _assert_consistent_after_repair(path, keep_view, visible_pairs, others_changed=False):
    store = Store.open(path)
    view = reader_view(store, "keep")  # the ready corpus is intact
    assert view[:2] == keep_view[:2]
    if not others_changed:  # its neighbours move only if another corpus came or went
        assert np.allclose(view[2], keep_view[2], atol=2e-3)  # (an index re-ranks in float16)
    assert store.sql("SELECT count(*) AS n FROM pairs").to_pylist() == [{"n": visible_pairs}]
    check(store, repair=True)
    report = check(store)
    assert report.ok, [p.what for p in report.problems]
    return store


@pytest.mark.parametrize("point", ADD_POINTS + ["commit.after_documents_ready:2"])
def test_a_killed_add_leaves_a_store_that_opens_and_one_command_resumes(crash_store, tiny_model_dir, tiny_encoder, point):
    store, big = crash_store
    keep_view = reader_view(store, "keep")
    gone_pairs = store.corpus("gone").pairs
    proc = _child(store, "add", big, tiny_model_dir, point)
    assert proc.returncode == -9, proc.stderr[-2000:]
    visible = store.stats().pairs if point != "ingest.after_corpus_ready" else None
    after = Store.open(store.path)
    new = after.corpus("new")
    if point == "ingest.after_corpus_ready":
        assert new.status == "ready"  # committed before the kill: complete and visible
        visible = keep_view[1] + gone_pairs + new.pairs
    else:
        assert new.status == "failed"
        assert visible == keep_view[1] + gone_pairs  # nothing of "new" shows
        assert new.id not in set(np.ravel(after.search(np.zeros((2, 32), np.float32), k=64).corpus_ids))
    store = _assert_consistent_after_repair(store.path, keep_view, visible,
                                            others_changed=point == "ingest.after_corpus_ready")
    if store.corpus("new").status != "ready":
        store.resume_corpus("new")
    assert store.corpus("new").pairs == _expected_pairs(tiny_encoder, big)
    assert check(store).problems == []


def test_a_killed_resume_is_resumed_again(crash_store, tiny_model_dir, tiny_encoder):
    store, big = crash_store
    keep_view = reader_view(store, "keep")
    assert _child(store, "add", big, tiny_model_dir, "commit.after_table_add:2").returncode == -9
    proc = _child(store, "resume", "", tiny_model_dir, "resume.after_pending_dropped")
    assert proc.returncode == -9, proc.stderr[-2000:]
    store = _assert_consistent_after_repair(store.path, keep_view, keep_view[1] + store.corpus("gone").pairs)
    store.resume_corpus("new")
    assert store.corpus("new").pairs == _expected_pairs(tiny_encoder, big)
    assert check(store).problems == []


@pytest.mark.parametrize("point", ["remove.after_status", "remove.after_table_delete"])
def test_a_killed_removal_hides_the_corpus_and_one_command_finishes_it(crash_store, tiny_model_dir, point):
    store, _ = crash_store
    keep_view = reader_view(store, "keep")
    proc = _child(store, "remove", "gone", tiny_model_dir, point)
    assert proc.returncode == -9, proc.stderr[-2000:]
    after = Store.open(store.path)
    assert after.corpus("gone").status == "removing"
    assert after.stats().pairs == keep_view[1]
    assert after.sql("SELECT count(*) AS n FROM pairs").to_pylist() == [{"n": keep_view[1]}]
    after.remove_corpus("gone")  # one command finishes it
    assert [c.name for c in after.corpora()] == ["keep"]
    _assert_consistent_after_repair(store.path, keep_view, keep_view[1], others_changed=True)
    assert check(Store.open(store.path)).problems == []


@pytest.mark.parametrize("point", ["index.before", "index.after"])
def test_a_killed_index_build_changes_no_result(crash_store, tiny_model_dir, point):
    store, _ = crash_store
    keep_view = reader_view(store, "keep")
    total = store.stats().pairs
    proc = _child(store, "index", "", tiny_model_dir, point)
    assert proc.returncode == -9, proc.stderr[-2000:]
    store = _assert_consistent_after_repair(store.path, keep_view, total)
    store.create_index(num_partitions=2, num_sub_vectors=2)  # and it can be built again
    assert store.stats().pairs == total
