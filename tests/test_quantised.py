"""Quantised keys (`--key-bits`): reduced keys kept as per-dimension codes beside a small
float routing key the index is built on. Distances (and so p_kNN) are over the decoded
codes, in the exact reference search and in the ANN search alike.

Real LanceDB tables and the tiny model (keys of dim 64).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import update
from sqlalchemy.orm import Session

from knnstore import KNNLM, InputError, Store
from knnstore import catalog
from knnstore.check import check
from knnstore.cli import cli
from knnstore.errors import StoreMismatchError
from knnstore.projection import KeyProjection
from knnstore.schema import CODES

from .conftest import changed, snapshot, write_docs


@pytest.fixture
def quantised(tmp_path, tiny_encoder, small_settings):
    s = Store.create(tmp_path / "q", model=tiny_encoder.name, encoder=tiny_encoder, key_dim=16, key_bits=4,
                     route_dim=8)
    s.add_corpus("a", [write_docs(tmp_path / "a", 5, repeat=5)], settings=small_settings)
    yield s
    s.close()


def _model_key(encoder, text: str, position: int) -> np.ndarray:
    ids = encoder.tokenize(text)
    keys, _ = encoder.forward(torch.tensor([ids[:16]]), torch.ones(1, 16, dtype=torch.long))
    return keys[0, position].numpy()


def test_codes_round_trip_within_half_a_step_and_pack_two_to_a_byte():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2000, 12)) * np.linspace(4, 0.5, 12)
    for bits, width in ((4, 4), (8, 8)):
        proj = KeyProjection.fit(keys, 8, bits, 8)
        assert (proj.code_bytes, proj.route_dim, proj.stored_dim) == (width, 8, 8)
        projected = proj.apply(keys)
        route, codes = proj.encode(projected)
        assert route.shape == (2000, 8) and codes.shape == (2000, width) and codes.dtype == np.uint8
        np.testing.assert_array_equal(route, projected[:, :8])  # the leading principal axes
        inside = (projected >= proj.lo) & (projected <= proj.lo + proj.step * (2**bits - 1))
        err = np.abs(proj.decode(codes) - projected)
        assert (err <= np.broadcast_to(proj.step / 2 + 1e-5, err.shape))[inside].all()
        assert inside.mean() > 0.99  # the grid spans the 0.1%..99.9% quantiles
        back = KeyProjection.from_bytes(proj.to_bytes())
        assert back.sha256 == proj.sha256 and (back.bits, back.route_dim) == (bits, 8)
        np.testing.assert_array_equal(back.decode(codes), proj.decode(codes))
    # 4 bits: dimension 0 in the high nibble of byte 0, dimension 1 in the low one
    proj = KeyProjection.fit(keys, 8, 4)
    assert proj.route_dim == 8  # the default: a multiple of 8, about half the key, at most 64
    one = proj.lo + proj.step * np.array([3, 12, 0, 15, 1, 2, 3, 4], dtype=np.float32)
    assert proj.encode(one[None])[1][0].tolist() == [0x3C, 0x0F, 0x12, 0x34]
    for bits, dim, route, match in ((3, 8, None, "key-bits"), (4, 7, None, "even"), (4, 8, 9, "route-dim"),
                                     (4, 12, 4, "multiple of 8")):
        with pytest.raises(InputError, match=match):
            KeyProjection.fit(keys, dim, bits, route)


def test_a_quantised_store_stores_codes_and_searches_by_them(quantised, tiny_encoder, tmp_path, small_settings):
    store = quantised
    proj = store.projection
    assert (proj.bits, proj.route_dim, proj.key_dim) == (4, 8, 16)
    assert store.table.quantised and store.table.dim == 8
    assert store.table.schema.field(CODES).type.byte_width == 8
    assert (store.identity.key_bits, store.identity.route_dim, store.identity.code_bytes) == (4, 8, 8)
    text = (tmp_path / "a" / "00.txt").read_text()
    key = _model_key(tiny_encoder, text, 3)
    doc = store.documents("a")[0]
    row = store.table.columns(["vector", CODES], where=f"document_id = {doc.id} AND position = 3")
    stored = store.table.keys_of(row)[0]
    projected = proj.apply(key[None])[0]
    assert np.abs(stored - projected).max() <= proj.step.max()  # the codes stand for the projected key
    np.testing.assert_allclose(np.asarray(row.column("vector")[0].as_py(), dtype=np.float32), projected[:8],
                               atol=2e-2, rtol=1e-2)  # the routing key: float16 of its leading dimensions
    # the exact search is exact over the codes: its distance is the decoded key's
    exact = store.search(key[None], k=5, exact=True)
    own = np.flatnonzero((exact.document_ids[0] == doc.id) & (exact.positions[0] == 3))
    assert len(own) == 1  # (repeated text: other documents' pairs may be as near)
    np.testing.assert_allclose(exact.distances[0, own[0]], ((stored - projected) ** 2).sum(), rtol=1e-4, atol=1e-5)
    assert (np.diff(exact.distances[0]) >= 0).all()
    # LanceDB's search (no index yet: every row by the routing key) re-ranked by the codes
    ann = store.search(key[None], k=5)
    np.testing.assert_allclose(ann.distances[0], exact.distances[0], rtol=1e-4, atol=1e-5)
    # with the index built on the routing key
    store.create_index(num_partitions=2)
    assert store.table.has_vector_index()
    ann = store.search(key[None], k=5, nprobes=2, refine_factor=40)
    np.testing.assert_allclose(ann.distances[0], exact.distances[0], rtol=1e-4, atol=1e-5)
    # reopened: the same projection; a later corpus is quantised with it
    again = Store.open(store.location.path, encoder=tiny_encoder)
    assert again.projection.sha256 == proj.sha256 and again.table.quantised
    again.add_corpus("b", [write_docs(tmp_path / "b", 2, template="Other {i}: a cat sat on the mat. ")],
                     settings=small_settings)
    assert check(again).ok
    stats = again.stats()
    assert (stats.key_dim, stats.key_bits, stats.route_dim) == (16, 4, 8) and "4-bit" in stats.key_projection
    result = KNNLM.from_store(again).with_settings(k=8).evaluate(text)
    assert np.isfinite(result.knn_ppl) and result.knn_ppl < result.base_ppl  # the store still helps its text
    rows = again.sql("SELECT pair_id, vector, codes FROM pairs LIMIT 3").to_pylist()
    assert len(rows[0]["vector"]) == 8 and len(rows[0]["codes"]) == 8  # SQL: the routing key and the codes


def test_compact_quantises_a_float_store_and_search_follows(two_corpora, tiny_encoder):
    store = two_corpora
    before = store.sql("SELECT pair_id, next_token, weight FROM pairs ORDER BY pair_id").to_pylist()
    full = {r["pair_id"]: np.asarray(r["vector"], dtype=np.float32)
            for r in store.sql("SELECT pair_id, vector FROM pairs").to_pylist()}
    done = store.compact(32, key_bits=8, route_dim=16)
    assert (done.key_dim, done.key_bits, done.route_dim) == (32, 8, 16)
    assert store.table.quantised and store.table.dim == 16 and store.identity.code_bytes == 32
    assert store.sql("SELECT pair_id, next_token, weight FROM pairs ORDER BY pair_id").to_pylist() == before
    assert check(store).ok
    pid = before[5]["pair_id"]
    found = store.search(full[pid][None], k=3, exact=True)
    assert pid in found.pair_ids[0] and found.distances[0, 0] < 1e-2  # 8 bits: nearly the float key
    # quantising the float keys as they are (same dimension) is a compaction too
    again = Store.open(store.location.path, encoder=tiny_encoder)
    assert again.table.quantised and again.projection.sha256 == store.projection.sha256
    with pytest.raises(InputError, match="below"):
        again.compact(32, key_bits=4)  # already quantised at 32: only smaller


def test_bad_quantisation_input_changes_nothing(two_corpora, tmp_path, tiny_encoder):
    store = two_corpora
    before = snapshot(store.location.path)
    for args, match in (((16,), {"key_bits": 3}), ((15,), {"key_bits": 4}), ((16,), {"key_bits": 4, "route_dim": 17}),
                        ((16,), {"route_dim": 4})):
        with pytest.raises(InputError):
            store.compact(*args, **match)
    assert changed(store.location.path, before) == set()
    with pytest.raises(InputError, match="--key-dim"):
        Store.create(tmp_path / "n", model=tiny_encoder.name, encoder=tiny_encoder, key_bits=4)
    assert not (tmp_path / "n").exists()
    result = CliRunner().invoke(cli, ["compact", str(store.location.path), "--key-dim", "16", "--key-bits", "5"])
    assert result.exit_code != 0 and "key-bits" in result.output
    assert changed(store.location.path, before) == set()


def test_a_catalog_that_says_other_bits_is_refused(quantised):
    path = quantised.location.path
    with Session(quantised.engine) as s, s.begin():
        s.execute(update(catalog.StoreConfig).values(key_bits=8))
    quantised.close()
    with pytest.raises(StoreMismatchError, match="quantis"):
        Store.open(path)


def test_prune_and_compact_json_on_a_quantised_store(quantised, tmp_path):
    store = quantised
    pairs = store.stats().pairs
    done = store.prune(neighbours=4)
    assert done.pairs_after < pairs and store.stats().pairs == done.pairs_after and check(store).ok
    store.close()
    result = CliRunner().invoke(cli, ["compact", str(tmp_path / "q"), "--key-dim", "8", "--key-bits", "8",
                                      "--route-dim", "8", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["key_dim_before"], out["key_dim"], out["key_bits"], out["route_dim"]) == (16, 8, 8, 8)
    reopened = Store.open(tmp_path / "q")
    assert reopened.table.dim == 8 and reopened.identity.code_bytes == 8 and check(reopened).ok
