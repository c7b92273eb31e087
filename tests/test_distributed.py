"""Distributed ingest on Ray (``--workers``): the same store as one process, one commit per
corpus, a killed worker or driver never leaves a partial corpus, and resume finishes it.

Real Ray runtimes (local, started by the code under test), the tiny model, small corpora.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from knnstore import IngestSettings, Store, catalog

from .conftest import write_docs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="Ray is not installed: pip install 'knnstore[ray]'")

SETTINGS = IngestSettings(window=16, stride=12, batch_size=4, commit_every=64)
CLI_SETTINGS = {"KNNSTORE_WINDOW": "16", "KNNSTORE_STRIDE": "12", "KNNSTORE_BATCH_SIZE": "4"}
COLUMNS = ["pair_id", "corpus_id", "document_id", "position", "token", "next_token", "vector"]


def pairs(store: Store, corpus: str):
    """A corpus's rows, sorted by pair id."""
    corpus_id = store.corpus(corpus).id
    return store.table.columns(COLUMNS, where=f"corpus_id = {corpus_id}").sort_by("pair_id")


def by_source(store: Store, corpus: str) -> dict[str, np.ndarray]:
    """A corpus's pairs by (document ordinal, position): ids differ between stores (they
    count the store's documents), what each document holds must not."""
    ordinal = {d.id: d.ordinal for d in store.documents(corpus)}
    table = pairs(store, corpus)
    doc, pos = table.column("document_id").to_numpy(), table.column("position").to_numpy()
    assert (table.column("pair_id").to_numpy() == (doc << 32 | pos)).all()
    order = np.lexsort((pos, np.array([ordinal[d] for d in doc])))
    cols = {c: table.column(c).to_numpy() for c in ("position", "token", "next_token")}
    cols["vector"] = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    cols["ordinal"] = np.array([ordinal[d] for d in doc])
    return {c: v[order] for c, v in cols.items()}


def documents(store: Store, corpus: str) -> list[tuple]:
    return [(d.ordinal, d.source, d.sha256, d.n_tokens, d.n_pairs, d.status) for d in store.documents(corpus)]


def assert_same_corpus(a: Store, b: Store, corpus: str) -> None:
    pa_, pb = by_source(a, corpus), by_source(b, corpus)
    assert len(pa_["position"]) == len(pb["position"]) > 0
    for column in ("ordinal", "position", "token", "next_token"):
        assert np.array_equal(pa_[column], pb[column]), column
    assert np.allclose(pa_["vector"], pb["vector"], rtol=1e-3, atol=1e-3)  # within float16 rounding
    assert documents(a, corpus) == documents(b, corpus)
    ia, ib = a.corpus(corpus), b.corpus(corpus)
    assert (ia.status, ia.documents, ia.tokens, ia.pairs) == (ib.status, ib.documents, ib.tokens, ib.pairs)


def unreferenced_files(store: Store) -> set[str]:
    """Data files of the table that its current version does not name."""
    store.refresh()
    named = {f.path for frag in store.table.dataset().get_fragments() for f in frag.data_files()}
    return set(store.table.data_files()) - named


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """The corpus added by one process: what every distributed run must equal."""
    root = tmp_path_factory.mktemp("reference")
    docs = write_docs(root / "docs", 24, template="Document {i}: the lobsters are blue, red on cooking. ")
    store = Store.create(root / "single", model=str(tiny_model_dir), device="cpu")
    store.add_corpus("c", [docs], settings=SETTINGS)
    return store, docs


def cli(*args, env=None, check=True):
    result = subprocess.run([sys.executable, "-m", "knnstore", *map(str, args)], capture_output=True, text=True,
                            env={**os.environ, **CLI_SETTINGS, **(env or {})}, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_corpus_encoded_by_ray_workers_is_the_same_store_in_one_commit(tmp_path, tiny_model_dir, reference):
    single, docs = reference
    store = Store.create(tmp_path / "ray", model=str(tiny_model_dir), device="cpu")
    version = store.table.version
    store.add_corpus("c", [docs], settings=SETTINGS, workers=2)
    # every fragment of the corpus in one Lance commit, then the pair_id index's (no data)
    assert store.table.version == version + 2 and store.table.pairs_indexed()
    assert_same_corpus(single, store, "c")
    assert pairs(single, "c").column("pair_id").equals(pairs(store, "c").column("pair_id"))  # same ids too
    with Session(store.engine) as s:
        run = s.scalars(select(catalog.IngestRun)).one()
    assert (run.status, run.n_documents, run.n_pairs) == ("ok", 24, single.corpus("c").pairs)
    assert not unreferenced_files(store)


def test_a_killed_worker_is_restarted_and_the_corpus_lands_whole(tmp_path, tiny_model_dir, reference):
    single, docs = reference
    path, once = tmp_path / "s", tmp_path / "a-worker-died"
    cli("init", path, "--model", tiny_model_dir, "--device", "cpu")
    cli("add-corpus", path, "c", docs, "--workers", "2", "--device", "cpu",
        env={"KNNSTORE_CRASH_AT": "ray.worker_after_fragments", "KNNSTORE_CRASH_ONCE_FILE": str(once)})
    assert once.exists()  # a worker was killed (kill -9) after writing its shard's files
    store = Store.open(path, device="cpu")
    assert_same_corpus(single, store, "c")
    assert unreferenced_files(store)  # the dead worker's files: committed by nobody
    assert cli("check", path, "--repair").returncode == 0
    assert not unreferenced_files(Store.open(path, device="cpu"))
    assert_same_corpus(single, Store.open(path, device="cpu"), "c")


def test_a_killed_driver_leaves_the_corpus_failed_and_invisible_and_resume_finishes_it(
        tmp_path, tiny_model_dir, reference):
    single, docs = reference
    path = tmp_path / "s"
    cli("init", path, "--model", tiny_model_dir, "--device", "cpu")
    keep = write_docs(tmp_path / "keep", 5, template="Stanza {i}: the owl and the cat. ")
    cli("add-corpus", path, "keep", keep, "--device", "cpu")
    kept = pairs(Store.open(path, device="cpu"), "keep")
    # Killed after every worker wrote its files, before the one commit.
    died = cli("add-corpus", path, "c", docs, "--workers", "2", "--device", "cpu",
               env={"KNNSTORE_CRASH_AT": "commit.before_table_add"}, check=False)
    assert died.returncode == -9
    store = Store.open(path, device="cpu")
    assert store.corpus("c").status == "failed" and store.corpus("c").id not in store.visible_corpora
    assert store.table.count() == kept.num_rows  # not one pair of it in the table
    assert store.sql("SELECT count(*) AS n FROM pairs").column("n")[0].as_py() == kept.num_rows
    assert unreferenced_files(store)
    assert cli("check", path, "--repair").returncode == 0
    store = Store.open(path, device="cpu")
    assert not unreferenced_files(store) and pairs(store, "keep").equals(kept)
    cli("resume-corpus", path, "c", "--workers", "2", "--device", "cpu")
    store = Store.open(path, device="cpu")
    assert_same_corpus(single, store, "c")
    assert pairs(store, "keep").equals(kept)


def test_bad_ray_options_are_one_line_errors_that_change_nothing(tmp_path, store):
    from .conftest import changed, snapshot

    docs = write_docs(tmp_path / "d", 2)
    before = snapshot(Path(store.path))
    with pytest.raises(ValueError, match="Ray address is empty"):
        store.add_corpus("c", [docs], ray_address=" ")
    with pytest.raises(ValueError, match="workers"):
        store.add_corpus("c", [docs], workers=0)
    assert changed(Path(store.path), before) == set()


def test_workers_load_the_model_by_name_when_the_driver_runs_it_in_another_dtype(tmp_path, tiny_model_dir, reference):
    # The driver's bfloat16 model is not shipped (workers get float32 weights or none): each
    # worker loads the model itself, in the store handle's compute dtype.
    single, docs = reference
    store = Store.create(tmp_path / "bf", model=str(tiny_model_dir), device="cpu", compute_dtype="bfloat16",
                         dtype="float32")
    store.add_corpus("c", [docs], settings=SETTINGS, workers=1)
    got, want = by_source(store, "c"), by_source(single, "c")
    for column in ("ordinal", "position", "token", "next_token"):
        assert np.array_equal(got[column], want[column]), column
    diff = np.linalg.norm(got["vector"] - want["vector"], axis=1) / np.linalg.norm(want["vector"], axis=1)
    assert 0 < np.median(diff) < 0.03  # bfloat16 keys: close, and not float32's


def test_ray_workers_store_keys_reduced_by_the_projection_the_driver_fitted(tmp_path, tiny_model_dir, reference):
    single, docs = reference
    one = Store.create(tmp_path / "one", model=str(tiny_model_dir), device="cpu", key_dim=8)
    one.add_corpus("c", [docs], settings=SETTINGS)
    ray = Store.create(tmp_path / "ray", model=str(tiny_model_dir), device="cpu", key_dim=8)
    ray.add_corpus("c", [docs], settings=SETTINGS, workers=1)
    # the same documents give the same projection (fitted on the same first keys, up to the
    # float rounding of other batches) and the same keys
    assert ray.table.dim == 8 and ray.table.key_projection() == ray.projection.sha256
    np.testing.assert_allclose(ray.projection.components, one.projection.components, atol=1e-3)
    np.testing.assert_allclose(ray.projection.mean, one.projection.mean, atol=1e-4)
    assert_same_corpus(one, ray, "c")


def test_ray_workers_store_quantised_keys_with_the_codes_the_driver_fitted(tmp_path, tiny_model_dir, reference):
    from knnstore.schema import CODES

    single, docs = reference
    made = {}
    for name, workers in (("one", None), ("ray", 1)):
        made[name] = Store.create(tmp_path / name, model=str(tiny_model_dir), device="cpu", key_dim=16, key_bits=4,
                                  route_dim=8)
        made[name].add_corpus("c", [docs], settings=SETTINGS, workers=workers)
    one, ray = made["one"], made["ray"]
    assert ray.table.quantised and ray.table.dim == 8 and ray.identity.code_bytes == 8
    np.testing.assert_allclose(ray.projection.step, one.projection.step, rtol=1e-3)
    assert_same_corpus(one, ray, "c")  # the routing keys
    keys = {}
    for name, store in made.items():
        rows = store.table.columns(["pair_id", CODES])
        order = np.argsort(rows.column("pair_id").to_numpy())
        keys[name] = store.table.keys_of(rows)[order]
    # the same codes, but for a key on a level's edge that float rounding moved across it
    assert np.mean(np.abs(keys["one"] - keys["ray"]) < 1e-3) > 0.99
