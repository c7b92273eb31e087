"""Issue 31: a served store survives its own maintenance, and requests are bounded.

A server (a tiny random-weight model over a real store) keeps answering while another
handle compacts, prunes, purges, removes documents and forgets: every answer is right or a
retryable 503, never a 500 or a false "damaged"; ``/health`` tells a store it cannot read;
requests never write to the store; SQL, bodies and completions have limits; readers and
``check`` follow a compaction made by another process."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from knnstore import Store
from knnstore.adapter import KNNLM
from knnstore.cli import cli
from knnstore.config import IngestSettings
from knnstore.server import MAX_BODY_BYTES, Server

from .conftest import changed, snapshot, write_docs
from .servers import serve_app

SETTINGS = IngestSettings(window=16, stride=12, batch_size=4, commit_every=64)


def make_store(root, encoder) -> Store:
    store = Store.create(root / "store", model=encoder.name, encoder=encoder)
    store.add_corpus("a", [write_docs(root / "a", 6, repeat=6)], settings=SETTINGS)
    store.add_corpus("b", [write_docs(root / "b", 4, repeat=4, template="Other {i}: a cat sat on the mat. ")],
                     settings=SETTINGS)
    store.add_corpus("c", [write_docs(root / "c", 3, repeat=3, template="Mail {i}: jane@example.org wrote. ")],
                     settings=SETTINGS)
    store.create_index(num_partitions=2)
    return store


@pytest.fixture
def served(tmp_path, tiny_encoder):
    """A server over its own store (changed by the tests) and a second handle to change it with."""
    store = make_store(tmp_path, tiny_encoder)
    lm = KNNLM.from_store(Store.open(tmp_path / "store", encoder=tiny_encoder), lambda_=0.5)
    reader = Store.open(tmp_path / "store")
    srv = Server(lm, reader, sql_timeout_s=1.0)
    for url in serve_app(srv.app):
        srv.url = url
        yield srv, store
    reader.close()
    store.close()


def complete(srv, **extra) -> httpx.Response:
    return httpx.post(srv.url + "/v1/completions", timeout=60, json={
        "model": srv.model_id, "prompt": "Doc 1", "max_tokens": 4, "temperature": 0, **extra})


def test_maintenance_under_a_running_server(served):
    srv, store = served
    answers, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            for r in (complete(srv), httpx.post(srv.url + "/v1/store/sql", timeout=60,
                                                json={"query": "SELECT count(*) AS n FROM pairs"})):
                answers.append((r.status_code, r.json()))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        time.sleep(1.0)
        for step in (lambda: store.compact(16), lambda: store.prune("b"), lambda: store.purge(),
                     lambda: store.remove_documents("title LIKE '%1%'", corpus="a"),
                     lambda: store.forget("jane@example.org"), lambda: store.purge()):
            step()
            time.sleep(1.5)
    finally:
        stop.set()
        thread.join()
    assert len(answers) > 10
    for status, body in answers:
        assert status == 200 or (status == 503 and body["error"]["code"] == "store_changed"), body
        assert "damaged" not in str(body) and "backup" not in str(body)
    store.refresh()
    last = httpx.post(srv.url + "/v1/store/sql", json={"query": "SELECT count(*) AS n FROM pairs"}).json()
    assert last["rows"] == [[store.stats().pairs]]  # the server follows the store, now compacted and pruned
    assert complete(srv).status_code == 200
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"


def test_health_reports_a_store_it_cannot_read(served, tmp_path):
    srv, store = served
    assert httpx.get(srv.url + "/health").status_code == 200
    import shutil

    shutil.rmtree(tmp_path / "store" / "vectors")
    r = httpx.get(srv.url + "/health")
    assert r.status_code == 503 and r.json()["status"] == "unavailable" and r.json()["error"]


def test_requests_never_write(served, tmp_path):
    srv, store = served
    before = snapshot(tmp_path / "store")
    for extra in ({"adaptive": True, "knn_temperature": 2.75}, {"adaptive": True, "k": 7}):
        assert complete(srv, **extra).status_code == 200
    assert not changed(tmp_path / "store", before)
    assert store.calibrations() == []


def test_bounded_requests(served):
    srv, _ = served
    r = httpx.post(srv.url + "/v1/completions", content=b"x" * (MAX_BODY_BYTES + 1),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    for field, value in (("max_tokens", True), ("max_tokens", "4"), ("n", 1.5), ("logprobs", True),
                         ("logprobs", 3), ("max_tokens", 64 * 1000)):
        r = complete(srv, **{field: value, **({"n": 16} if field == "max_tokens" and value == 64000 else {})})
        assert r.status_code == 400, (field, value, r.text)
        assert r.json()["error"]["param"] in (field, "max_tokens", "n")
    t0 = time.monotonic()
    slow = {}
    thread = threading.Thread(target=lambda: slow.update(r=httpx.post(
        srv.url + "/v1/store/sql", timeout=60,
        json={"query": "SELECT count(*) FROM pairs a, pairs b, pairs c, pairs d"})))
    thread.start()
    time.sleep(0.2)
    assert httpx.get(srv.url + "/health", timeout=5).status_code == 200  # not blocked by the statement
    assert httpx.get(srv.url + "/v1/store/corpora", timeout=5).status_code == 200
    thread.join()
    assert slow["r"].status_code == 400 and "ran past" in slow["r"].json()["error"]["message"]
    assert time.monotonic() - t0 < 10
    truncated = httpx.post(srv.url + "/v1/store/sql", json={"query": "SELECT * FROM pairs", "max_rows": 3}).json()
    assert truncated["row_count"] == 3 and truncated["truncated"] is True


def test_readers_and_check_follow_a_compaction(tmp_path, tiny_encoder):
    store = make_store(tmp_path, tiny_encoder)
    reader = Store.open(tmp_path / "store")
    queries = np.random.default_rng(0).standard_normal((3, store.identity.dim)).astype(np.float32)
    before = reader.search(queries, k=4)
    store.compact(16)
    assert reader.moved_on()
    after = reader.search(queries, k=4)  # the old table is gone: the reader follows the catalog
    assert after.next_tokens.shape == before.next_tokens.shape and reader.table.name == store.table.name
    assert reader.sql("SELECT count(*) AS n FROM pairs").to_pylist() == [{"n": store.stats().pairs}]
    assert reader.check().ok


def test_cli_sql_limits(tmp_path, tiny_encoder):
    make_store(tmp_path, tiny_encoder).close()
    path = str(tmp_path / "store")
    runner = CliRunner()
    slow = runner.invoke(cli, ["sql", path, "SELECT count(*) FROM pairs a, pairs b, pairs c, pairs d",
                               "--timeout", "0.5"])
    assert slow.exit_code != 0 and "ran past its limit of 0.5 s" in slow.output
    cut = runner.invoke(cli, ["sql", path, "SELECT pair_id FROM pairs", "--format", "csv", "--row-limit", "5"])
    assert cut.exit_code == 0, cut.output
    assert cut.stdout.strip().splitlines()[1:] and len(cut.stdout.strip().splitlines()) == 6
    assert "cut at 5 rows" in cut.stderr
