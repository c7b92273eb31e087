"""Reduced keys (`init --key-dim D`): a PCA projection fitted on the first corpus's keys,
applied identically at ingest and at query time, recorded in catalog and table, and a
store whose table and catalog disagree about it refused.

Real LanceDB tables and the tiny model (keys of dim 64).
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import update
from sqlalchemy.orm import Session

from knnstore import KNNLM, InputError, Store
from knnstore import catalog
from knnstore.check import check
from knnstore.cli import cli
from knnstore.errors import StoreMismatchError
from knnstore.projection import KeyProjection

from .conftest import write_docs


@pytest.fixture
def reduced(tmp_path, tiny_encoder, small_settings):
    s = Store.create(tmp_path / "reduced", model=tiny_encoder.name, encoder=tiny_encoder, key_dim=16)
    s.add_corpus("a", [write_docs(tmp_path / "a", 5, repeat=5)], settings=small_settings)
    yield s
    s.close()


def test_projection_is_fitted_on_the_first_corpus_and_applied_at_ingest_and_query(reduced, tiny_encoder, tmp_path,
                                                                                 small_settings):
    store = reduced
    proj = store.projection
    assert proj is not None and (proj.dim, proj.key_dim) == (tiny_encoder.dim, 16)
    assert store.table.dim == 16 and store.identity.key_projection_sha == proj.sha256
    assert store.table.key_projection() == proj.sha256
    # a stored key is the projection of the model's key at that position
    text = (tmp_path / "a" / "00.txt").read_text()
    ids = tiny_encoder.tokenize(text)
    import torch
    keys, _ = tiny_encoder.forward(torch.tensor([ids[:16]]), torch.ones(1, 16, dtype=torch.long))
    doc = store.documents("a")[0]
    row = store.table.columns(["vector"], where=f"document_id = {doc.id} AND position = 3").column("vector")
    stored = np.asarray(row[0].as_py(), dtype=np.float32)
    np.testing.assert_allclose(stored, proj.apply(keys[0, 3].numpy()), atol=2e-2, rtol=1e-2)  # float16
    # a query with the model's key finds that pair first, at (near) zero distance
    found = store.search(keys[0, 3].numpy()[None], k=1, exact=True)
    assert found.document_ids[0, 0] == doc.id and found.positions[0, 0] == 3
    assert found.distances[0, 0] < 1e-2
    # reopened: the same projection; later corpora use it as they are (no refit)
    again = Store.open(store.location.path, encoder=tiny_encoder)
    assert again.projection.sha256 == proj.sha256
    again.add_corpus("b", [write_docs(tmp_path / "b", 2)], settings=small_settings)
    assert again.projection.sha256 == proj.sha256 and check(again).ok
    lm = KNNLM.from_store(again)
    assert np.isfinite(lm.evaluate(text).knn_ppl)
    with pytest.raises(InputError, match="dim"):
        again.search(np.zeros((1, 16), dtype=np.float32), k=1)  # stored-dim queries are not model keys


def test_projection_fit_is_deterministic_and_round_trips():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((500, 12)) * np.linspace(5, 0.1, 12)
    a, b = KeyProjection.fit(keys, 4), KeyProjection.fit(keys.copy(), 4)
    assert a.sha256 == b.sha256
    back = KeyProjection.from_bytes(a.to_bytes())
    np.testing.assert_array_equal(back.apply(keys), a.apply(keys))
    # orthonormal axes: distances shrink, never grow
    x, y = keys[:50], keys[50:100]
    assert (((a.apply(x) - a.apply(y)) ** 2).sum(1) <= ((x - y) ** 2).sum(1) + 1e-4).all()
    with pytest.raises(InputError, match="key_dim"):
        KeyProjection.fit(keys, 13)
    with pytest.raises(InputError, match="needs more than"):
        KeyProjection.fit(keys[:3], 4)


def test_a_store_with_a_mismatched_projection_is_refused(reduced, tiny_encoder):
    store = reduced
    path = store.location.path
    other = KeyProjection.fit(np.random.default_rng(1).standard_normal((100, tiny_encoder.dim)), 16)
    with Session(store.engine) as s, s.begin():  # the catalog now holds another projection
        s.execute(update(catalog.StoreConfig).values(key_projection=other.to_bytes(), key_projection_sha=other.sha256))
    store.close()
    with pytest.raises(StoreMismatchError, match="key projection"):
        Store.open(path)


def test_bad_key_dim_is_refused_before_anything_is_written(tmp_path, tiny_encoder):
    with pytest.raises(InputError, match="key_dim"):
        Store.create(tmp_path / "s", model=tiny_encoder.name, encoder=tiny_encoder, key_dim=tiny_encoder.dim + 1)
    assert not (tmp_path / "s").exists()
    result = CliRunner().invoke(cli, ["init", str(tmp_path / "t"), "--key-dim", "0"])
    assert result.exit_code != 0 and "key-dim" in result.output


# --- compact: an existing store's keys reduced in place ---------------------------------


def _neighbours(store, queries, k=10):
    found = store.search(queries, k=k, exact=True)
    return found.pair_ids, found.distances


def test_compact_rewrites_every_key_projected_and_queries_follow(two_corpora, tiny_encoder, tmp_path):
    store = two_corpora
    before = store.sql("SELECT pair_id, corpus, document_id, position, token, next_token, weight FROM pairs "
                       "ORDER BY pair_id").to_pylist()
    full_keys = {r["pair_id"]: np.asarray(r["vector"], dtype=np.float32)
                 for r in store.sql("SELECT pair_id, vector FROM pairs").to_pylist()}
    done = store.compact(16)
    assert (done.key_dim_before, done.key_dim, done.rows) == (tiny_encoder.dim, 16, len(before))
    assert store.table.dim == 16 and store.projection.key_dim == 16 and store.identity.key_dim == 16
    # the same pairs, each key the projection of its old one
    after = store.sql("SELECT pair_id, corpus, document_id, position, token, next_token, weight FROM pairs "
                      "ORDER BY pair_id").to_pylist()
    assert after == before
    for r in store.sql("SELECT pair_id, vector FROM pairs LIMIT 20").to_pylist():
        np.testing.assert_allclose(np.asarray(r["vector"], dtype=np.float32),
                                   store.projection.apply(full_keys[r["pair_id"]]), atol=3e-2, rtol=1e-2)
    assert check(store).ok and not any(n != store.table.name for n in store.table.table_names(store.table.uri))
    assert store.table.pairs_indexed()  # the new table has its pair index from the start
    # reopened from disk: the same table and projection; a query is a model key, projected
    again = Store.open(store.location.path, encoder=tiny_encoder)
    assert again.table.name == store.table.name and again.projection.sha256 == store.projection.sha256
    key = full_keys[before[7]["pair_id"]][None]
    ids, dist = _neighbours(again, key)  # (repeated text: other documents' pairs may tie with it)
    assert before[7]["pair_id"] in ids[0, dist[0] < 1e-2]
    # reduced again: the projections compose (a query is still a model key)
    again.compact(8)
    ids, dist = _neighbours(again, key)
    assert again.table.dim == 8 and before[7]["pair_id"] in ids[0, dist[0] < 1e-2]
    with pytest.raises(InputError, match="below"):
        again.compact(8)
    text = (tmp_path / "a" / "00.txt").read_text()
    assert np.isfinite(KNNLM.from_store(again).evaluate(text).knn_ppl)


@pytest.mark.parametrize("point", ["compact.after_new_table", "compact.after_switch"])
def test_a_killed_compaction_leaves_a_store_that_opens_and_repair_cleans_up(two_corpora, point):
    import os
    import subprocess
    import sys

    store = two_corpora
    rows = store.sql("SELECT pair_id, next_token FROM pairs ORDER BY pair_id").to_pylist()
    child = "import sys\nfrom knnstore import Store\nStore.open(sys.argv[1]).compact(16)\n"
    proc = subprocess.run([sys.executable, "-c", child, str(store.path)], env={**os.environ, "KNNSTORE_CRASH_AT": point},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    after = Store.open(store.path)  # it opens, on one whole table
    assert after.sql("SELECT pair_id, next_token FROM pairs ORDER BY pair_id").to_pylist() == rows
    assert after.table.dim == (16 if point == "compact.after_switch" else store.table.dim)
    report = check(after)
    assert any("compaction" in p.what for p in report.problems)
    check(after, repair=True)
    assert check(after).ok and after.table.table_names(after.table.uri) == [after.table.name]


def test_a_pruned_reduced_store_calibrates_and_runs_adaptive_and_explains(two_corpora, tmp_path):
    from knnstore.evaluate import calibrate

    store = two_corpora
    store.prune(neighbours=4)
    store.compact(16)
    text = "".join((tmp_path / "a" / f"{i:02}.txt").read_text() for i in range(3))
    lm = KNNLM.from_store(store).with_settings(k=8)
    cal = calibrate(lm, text * 3, kind="logistic")
    store.save_calibration(cal, text_source="a", n_tokens=100)
    ada = KNNLM.from_store(store).with_settings(k=8, adaptive=True).evaluate(text)
    assert ada.adaptive and np.isfinite(ada.knn_ppl) and ada.mean_lambda is not None
    tokens = lm.explain(text[:80], n_sources=2)
    assert any(t.sources for t in tokens)
    assert all(s.weight >= 0 for t in tokens for s in t.sources)
    assert check(store).ok


def test_bad_compaction_input_changes_nothing(two_corpora):
    from .conftest import changed, snapshot

    store = two_corpora
    before = snapshot(store.location.path)
    for bad in (store.table.dim, store.table.dim + 5):
        with pytest.raises(InputError, match="below"):
            store.compact(bad)
    with pytest.raises(InputError, match="key_dim"):
        store.compact(0)
    assert changed(store.location.path, before) == set()
