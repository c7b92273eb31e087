"""The ANN index lifecycle: trained past a threshold, new rows indexed incrementally and
searchable before they are, removed corpora never returned, retrained only after growth."""

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session

from knnstore import Store, catalog
from knnstore.check import check
from knnstore.cli import cli
from knnstore.schema import pair_id

from .conftest import write_docs


def builds(store: Store) -> list[tuple[str, int]]:
    with Session(store.engine) as s:
        return [(b.kind, b.new_rows) for b in s.scalars(select(catalog.IndexBuild).order_by(catalog.IndexBuild.id))]


def key_of(store: Store, text: str) -> np.ndarray:
    enc = store.encoder
    keys, _ = enc.forward(torch.tensor([enc.tokenize(text)]))
    return keys[0].numpy()


@pytest.fixture
def policy(monkeypatch):
    monkeypatch.setenv("KNNSTORE_INDEX_MIN_ROWS", "1000")
    monkeypatch.setenv("KNNSTORE_INDEX_RETRAIN_GROWTH", "2")


def test_the_index_lifecycle_from_exact_to_incremental_to_retrained(store, tmp_path, small_settings, policy):
    small = write_docs(tmp_path / "small", 3)
    store.add_corpus("small", [small], settings=small_settings)
    assert store.index_plan().action == "none" and not store.table.has_vector_index()  # below 1,000 rows

    big = write_docs(tmp_path / "big", 60, template="Item {i} of the catalogue: a brass lamp, a green bottle. ")
    store.add_corpus("big", [big], settings=small_settings)
    rows = store.table.count()
    assert rows >= 1000 and store.table.has_vector_index()
    assert builds(store) == [("train", rows)]
    assert store.index_plan().action == "none"

    # A corpus added without indexing is searched before it is indexed...
    novel = "Zebra quartz jumps over vexing fjords while wizards box quickly. " * 4
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "n.txt").write_text(novel)
    store.add_corpus("new", [tmp_path / "new"], settings=small_settings, index=False)
    plan = store.index_plan()
    assert plan.action == "update" and plan.unindexed_rows == store.corpus("new").pairs
    query = key_of(store, novel)[-5:]
    new_id = store.corpus("new").id
    before = store.search(query, k=1, nprobes=2, refine_factor=10)
    exact = store.search(query, k=1, exact=True)
    assert (before.corpus_ids[:, 0] == new_id).all()
    assert np.allclose(before.distances, exact.distances, rtol=1e-3, atol=1e-3)

    # ...then indexed incrementally (no retraining), with the same answers.
    assert store.maintain_index().action == "update"
    assert builds(store)[-1] == ("update", store.corpus("new").pairs)
    assert [k for k, _ in builds(store)].count("train") == 1
    state = store.table.index_state()
    assert state.unindexed_rows == 0 and state.indexed_rows == store.table.count()
    after = store.search(query, k=1, nprobes=128, refine_factor=500)  # everything re-ranked: exact
    assert (after.corpus_ids[:, 0] == new_id).all()
    assert np.allclose(after.distances, exact.distances, rtol=1e-3, atol=1e-3)

    # Removing a corpus never rebuilds the index, and its rows are never returned.
    n_builds = len(builds(store))
    store.remove_corpus("new")
    assert len(builds(store)) == n_builds
    gone = store.search(query, k=5, nprobes=64, refine_factor=10)
    assert not (gone.corpus_ids == new_id).any()

    # Growing past 2x the trained rows retrains.
    more = write_docs(tmp_path / "more", 90, template="Entry {i}: a copper kettle and a silver spoon. ")
    store.add_corpus("more", [more], settings=small_settings)
    assert builds(store)[-1] == ("train", store.table.count())


def test_cli_index_status_policy_and_rebuild(tmp_path, tiny_model_dir, policy):
    runner = CliRunner()
    path = str(tmp_path / "s")
    assert runner.invoke(cli, ["init", path, "--model", str(tiny_model_dir)]).exit_code == 0
    docs = write_docs(tmp_path / "d", 4)
    small = ["--window", "16", "--stride", "12"]
    assert runner.invoke(cli, ["add-corpus", path, "d", str(docs), *small]).exit_code == 0
    status = json.loads(runner.invoke(cli, ["index", path, "--status", "--json"]).stdout)
    assert status["action"] == "none" and status["indexed_rows"] == 0 and status["min_rows"] == 1000
    text = runner.invoke(cli, ["index", path])
    assert text.exit_code == 0 and "policy: none" in text.output and "exact search" in text.output

    result = runner.invoke(cli, ["index", path, "--rebuild", "--partitions", "2", "--sub-vectors", "2"])
    assert result.exit_code == 0, result.output
    assert "Trained the index" in result.output
    more = write_docs(tmp_path / "m", 2, template="Another {i}: a quiet harbour at dawn. ")
    result = runner.invoke(cli, ["add-corpus", path, "m", str(more), *small])
    assert result.exit_code == 0, result.output
    assert "Indexing the new rows: done" in result.output
    status = json.loads(runner.invoke(cli, ["index", path, "--status", "--json"]).stdout)
    assert status["unindexed_rows"] == 0 and status["action"] == "none"
    result = runner.invoke(cli, ["add-corpus", path, "n", str(write_docs(tmp_path / "n", 1)), *small, "--no-index"])
    assert result.exit_code == 0 and "Indexing" not in result.output
    status = json.loads(runner.invoke(cli, ["index", path, "--status", "--json"]).stdout)
    assert status["action"] == "update" and status["unindexed_rows"] > 0
    # sub-vectors are IVF-PQ's: with --type ivf_rq a clear refusal, and no build recorded
    result = runner.invoke(cli, ["index", path, "--type", "ivf_rq", "--sub-vectors", "2"])
    assert result.exit_code == 1 and "sub-vectors are IVF-PQ's" in result.output


def test_the_library_runs_the_index_policy_inside_the_callers_watch(store, tmp_path, small_settings, policy):
    watched = []

    @contextlib.contextmanager
    def watch(plan):
        watched.append((plan.action, store.table.has_vector_index()))
        yield

    store.add_corpus("d", [write_docs(tmp_path / "d", 4)], settings=small_settings, index=False)
    plan = store.maintain_index(watch=watch)  # below KNNSTORE_INDEX_MIN_ROWS: nothing to watch
    assert plan.action == "none" and watched == []
    after = store.index(rebuild=True, num_partitions=2, watch=watch)
    assert watched == [("rebuild", False)] and store.table.index_type() == "ivf_rq"
    assert after.action == "none" and after.indexed_rows == store.table.count()


def test_index_types_rq_by_default_pq_on_request(store, tmp_path, small_settings):
    # Random word sequences: distinct contexts, so nearest neighbours have no ties.
    rng = np.random.default_rng(0)
    words = "lamp bottle harbour kettle spoon green brass quiet dawn river stone field light".split()
    (tmp_path / "d").mkdir()
    for i in range(40):
        (tmp_path / "d" / f"{i}.txt").write_text(" ".join(rng.choice(words, 60)) + ".\n")
    store.add_corpus("d", [tmp_path / "d"], settings=small_settings, index=False)
    keys = np.concatenate([v for v, _ in store.table.scan_vectors()])
    queries = keys[:: max(1, len(keys) // 40)][:40]
    exact = store.search(queries, k=8, exact=True)

    def recall(found):
        return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.pair_ids, exact.pair_ids)])

    store.create_index(num_partitions=4)
    assert store.table.index_type() == "ivf_rq"
    with Session(store.engine) as s:
        params = s.scalars(select(catalog.IndexBuild.params)).all()[-1]
    assert params["type"] == "ivf_rq" and params["bits"] == 4
    approx = store.search(queries, k=8, nprobes=4)  # auto: ranked by the RaBitQ estimates
    assert recall(approx) >= 0.6  # tiny keys (dim 32): coarse codes; 0.97 on real ones
    refined = store.search(queries, k=8, nprobes=4, refine_factor=20)  # re-ranked: exact distances
    assert recall(refined) >= 0.95
    assert np.allclose(np.sort(refined.distances, axis=1), exact.distances, rtol=1e-3, atol=1e-3)
    # The queries are stored keys: their own pair is at distance 0, which the estimates blur;
    # verify_nearest searches those rows again with exact distances (adaptive.recognised)
    assert np.abs(approx.distances[:, 0]).max() > 1e-3
    verified = store.search(queries, k=8, nprobes=4, verify_nearest=True)
    own = verified.distances[:, 0] <= 1e-4
    blurred = np.abs(approx.distances[:, 0]) <= 1e-4
    # (tiny keys of dim 32 give coarse codes: on real keys nearly every row is verified)
    assert own.mean() >= blurred.mean() + 0.5 and (exact.distances[own, 0] <= 1e-4).all()

    store.create_index(num_partitions=4, num_sub_vectors=4)  # sub-vectors imply PQ
    assert store.table.index_type() == "ivf_pq"
    pq = store.search(queries, k=8, nprobes=4)  # auto: re-ranked x4 with exact distances
    for q in range(len(queries)):  # every pair found in both has its exact distance
        exact_of = dict(zip(exact.pair_ids[q].tolist(), exact.distances[q].tolist()))
        for p, d in zip(pq.pair_ids[q].tolist(), pq.distances[q].tolist()):
            if p in exact_of:
                assert abs(d - exact_of[p]) <= 1e-3 * max(1.0, exact_of[p])
    with pytest.raises(ValueError, match="index type"):
        store.table.create_index(index_type="hnsw")


LANCE_WARNINGS = """
import os, sys
from pathlib import Path
import numpy as np, pyarrow as pa
import knnstore
from knnstore.schema import pairs_batch
from knnstore.vectors import PairsTable
assert os.environ.get("LANCEDB_LOG") == (sys.argv[2] if len(sys.argv) > 2 else None)  # import sets nothing
x = np.repeat(np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32), 300, axis=0)
n = len(x)
table = PairsTable.create(Path(sys.argv[1]), 16, "float32")
table.add(pa.Table.from_batches([pairs_batch(table.schema, document_id=np.zeros(n, np.int64), position=np.arange(n),
                                             corpus_id=1, token=np.zeros(n), next_token=np.zeros(n), vector=x)]))
table.create_index(num_partitions=256, num_sub_vectors=2)
"""


@pytest.mark.parametrize("env,shown", [({}, False), ({"LANCEDB_LOG": "warn"}, True)])
def test_lancedb_index_builder_warnings_are_silenced_unless_asked_for(tmp_path, env, shown):
    # 20 distinct keys in 256 partitions: LanceDB warns "partition N is empty" for most of them
    child_env = {k: v for k, v in os.environ.items() if k not in ("LANCEDB_LOG", "LANCE_LOG")} | env
    result = subprocess.run([sys.executable, "-c", LANCE_WARNINGS, str(tmp_path / "t"), *env.values()],
                            capture_output=True, text=True, env=child_env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert ("is empty" in result.stderr) == shown, result.stderr[-2000:]


@pytest.mark.parametrize("indexed", [False, True])
def test_a_big_batch_searched_as_concurrent_parts_answers_as_one_query(store, tmp_path, small_settings, policy,
                                                                       monkeypatch, indexed):
    from knnstore import vectors

    store.add_corpus("a", [write_docs(tmp_path / "a", 60)], settings=small_settings, index=indexed)
    store.add_corpus("b", [write_docs(tmp_path / "b", 5, template="Stanza {i}: the owl and the cat. ")],
                     settings=small_settings, index=indexed)
    assert store.table.has_vector_index() == indexed
    b_id = store.corpus("b").id
    queries = np.random.default_rng(0).standard_normal((67, store.identity.dim)).astype(np.float32)
    runs = []

    run = vectors.EventLoop.run

    def counting_run(loop, coro):  # the loop the parts run on, counting split searches
        runs.append(1)
        return run(loop, coro)

    monkeypatch.setattr(vectors.EventLoop, "run", counting_run)
    for corpora in (None, [b_id]):
        monkeypatch.setattr(vectors, "SEARCH_PARTS", 1)
        whole = store.table.search(queries, 8, corpora)
        monkeypatch.setattr(vectors, "SEARCH_PARTS", 3)  # 67 queries: parts of 23, 22, 22
        split = store.table.search(queries, 8, corpora)
        for name in ("pair_ids", "next_tokens", "corpus_ids", "document_ids", "positions", "distances"):
            assert np.array_equal(getattr(split, name), getattr(whole, name)), name
        assert (split.pair_ids >= 0).all()
        if corpora:
            assert (split.corpus_ids == b_id).all()
    assert len(runs) == 2  # one split search per corpora setting, none for SEARCH_PARTS=1


def test_default_partitions_follow_the_store_past_4096():
    from knnstore.config import MAX_PARTITIONS
    from knnstore.index_kinds import default_partitions

    assert default_partitions(1) == 1 and default_partitions(266_918) == 517
    assert default_partitions(16_777_216) == 4096
    assert default_partitions(10**9) == 31_623  # ~1M codes per query at nprobes 32
    assert default_partitions(10**12) == MAX_PARTITIONS


def test_pairs_are_found_by_id_through_a_scalar_index_kept_up_to_date(store, tmp_path, small_settings):
    from knnstore.vectors import PAIR_INDEX

    assert store.table.pairs_indexed()  # an empty table: nothing to index
    store.add_corpus("d", [write_docs(tmp_path / "d", 3)], settings=small_settings, index=False)
    assert PAIR_INDEX in {i.name for i in store.table.index_state().indices} and store.table.pairs_indexed()
    assert store.table.index_state().describe() == "none (exact search)"  # the ANN index is the policy's
    store.add_corpus("e", [write_docs(tmp_path / "e", 2, template="Other {i}: a quiet harbour. ")],
                     settings=small_settings, index=False)
    assert store.table.pairs_indexed()  # the new rows folded in
    first = store.documents("e")[0]
    rows = store.table.take([int(pair_id(first.id, 1))], columns=["document_id", "position"]).to_pylist()
    assert rows == [{"document_id": first.id, "position": 1}]
    assert check(store).ok
    store.remove_corpus("d")
    store.purge()  # data files rewritten: Lance remaps the index
    assert store.table.pairs_indexed() and store.table.take([int(pair_id(first.id, 1))]).num_rows == 1

