"""Bad inputs that are not malformed files: a full disk, one enormous line; and readers that
run while a writer adds and removes corpora in another process."""

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from knnstore import DiskFullError, Store
from knnstore.check import check

from .conftest import changed, interrupted_cli_ingest, snapshot, write_docs


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs (needs root and mount; skipped, saying so, where that is not allowed)."""
    where = tmp_path / "disk"
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip() or 'mount failed'})")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _big_text(tmp_path, n_words):
    d = tmp_path / f"big-{n_words}"
    d.mkdir()
    words = " ".join(f"lobster{i % 97} is blue" for i in range(n_words // 3))
    (d / "big.txt").write_text(words)
    return d


def test_a_corpus_too_big_for_the_disk_is_refused_before_anything_is_written(small_disk, tmp_path, tiny_encoder, small_settings):
    store = Store.create(small_disk / "store", encoder=tiny_encoder)
    before = snapshot(store.path)
    with pytest.raises(DiskFullError, match="MiB free"):
        store.add_corpus("huge", [_big_text(tmp_path, 60000)], settings=small_settings)
    assert changed(store.path, before) == set() and store.corpora() == []


def test_a_disk_that_fills_during_ingest_leaves_a_failed_corpus_that_resumes(small_disk, tmp_path, tiny_encoder, small_settings, text_dir):
    store = Store.create(small_disk / "store", encoder=tiny_encoder)
    store.add_corpus("keep", [text_dir], settings=small_settings)
    filler = small_disk / "filler"

    def fill_the_disk(done, total):
        if not filler.exists():
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError:
                    pass

    docs = _big_text(tmp_path, 3000)
    with pytest.raises(DiskFullError, match="resume-corpus"):
        store.add_corpus("big", [docs], settings=small_settings, progress=fill_the_disk)
    filler.unlink()
    reopened = Store.open(store.path)
    assert reopened.corpus("big").status == "failed" and reopened.stats().pairs == reopened.corpus("keep").pairs
    assert check(reopened, repair=True).ok
    reopened.resume_corpus("big")
    assert reopened.corpus("big").status == "ready" and check(reopened).problems == []


def test_one_enormous_line_is_ingested_in_windows(store, tmp_path, small_settings, tiny_encoder):
    d = tmp_path / "line"
    d.mkdir()
    text = "To be, or not to be, that is the question " * 2000  # 86 kB, no newline
    (d / "line.txt").write_text(text)
    info = store.add_corpus("line", [d], settings=small_settings)
    assert info.pairs == len(tiny_encoder.tokenize(text)) - 1 and check(store).problems == []


READER = textwrap.dedent("""
    import json, sys, time
    from knnstore import Store
    path, out, stop = sys.argv[1:4]
    import numpy as np, os
    q = np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32)
    seen, errors, n = set(), [], 0
    while not os.path.exists(stop) or n < 3:
        try:
            s = Store.open(path)
            # One statement cross-checks three views of one snapshot: a ready corpus has all
            # its pairs and documents, any other corpus none of them.
            views = s.sql(
                "SELECT c.id, c.status, c.n_pairs, "
                "(SELECT count(*) FROM pairs p WHERE p.corpus_id = c.id) AS in_pairs, "
                "(SELECT coalesce(sum(d.n_pairs), 0) FROM documents d WHERE d.corpus_id = c.id) AS in_docs "
                "FROM corpora c").to_pylist()
            for r in views:
                want = (r["n_pairs"], r["n_pairs"]) if r["status"] == "ready" else (0, 0)
                if (r["in_pairs"], r["in_docs"]) != want:
                    errors.append(f"torn read: {r}")
            ready = {c.id: c.pairs for c in s.corpora() if c.status == "ready"}  # the same snapshot
            by = {r["id"]: r["in_pairs"] for r in views if r["in_pairs"]}
            found = set(np.ravel(s.search(q, k=16).corpus_ids).tolist()) - {-1}
            # every corpus the reader sees is complete, and only ready corpora come back
            if by != ready or not found <= set(ready) or s.stats().pairs != sum(ready.values()):
                errors.append(f"inconsistent: sql {by} ready {ready} search {sorted(found)}")
            seen.add(json.dumps(sorted(by.items())))
            n += 1
            open(out + ".ready", "w").close()
            s.close()
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    json.dump({"reads": n, "errors": errors, "states": sorted(seen)}, open(out, "w"))
""")

WRITER = textwrap.dedent("""
    import sys, time
    from knnstore import Encoder, IngestSettings, Store
    path, docs, model = sys.argv[1:4]
    s = Store.open(path, encoder=Encoder.load(model))
    settings = IngestSettings(window=16, stride=12, batch_size=4, commit_every=64)
    for round in range(3):
        s.add_corpus(f"new{round}", [docs], settings=settings)
        time.sleep(2)  # long enough for the readers to see the corpus
        s.remove_corpus(f"new{round}")
""")


def test_readers_see_only_committed_states_while_a_writer_adds_and_removes(store, text_dir, tmp_path, tiny_model_dir, small_settings):
    store.add_corpus("keep", [text_dir], settings=small_settings)
    docs = write_docs(tmp_path / "docs2", 12, 12)
    stop = tmp_path / f"stop-{uuid.uuid4().hex}"
    outs = [tmp_path / f"reader{i}.json" for i in range(3)]
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(store.path), str(o), str(stop)]) for o in outs]
    deadline = time.monotonic() + 300
    while not all(os.path.exists(f"{o}.ready") for o in outs) and time.monotonic() < deadline:
        time.sleep(0.1)  # the readers are reading before the writer starts
    writer = subprocess.run([sys.executable, "-c", WRITER, str(store.path), str(docs), str(tiny_model_dir)],
                            capture_output=True, text=True, timeout=600)
    # A second writer while none runs now succeeds; while one runs it is refused (tested in test_store).
    stop.touch()
    for r in readers:
        r.wait(timeout=600)
    assert writer.returncode == 0, writer.stderr[-2000:]
    results = [json.loads(o.read_text()) for o in outs]
    assert all(r["errors"] == [] for r in results), [r["errors"][:3] for r in results]
    assert sum(r["reads"] for r in results) >= 9
    states = {state for r in results for state in r["states"]}
    assert len(states) >= 2, states  # the readers did overlap the writer
    keep = store.corpus("keep")
    assert check(Store.open(store.path)).problems == []
    assert Store.open(store.path).stats().pairs == keep.pairs
    assert os.path.exists(store.path / "knnstore.json")


def test_ctrl_c_during_ingest_leaves_a_failed_corpus_that_resumes(store, text_dir, small_settings):
    store.add_corpus("keep", [text_dir], settings=small_settings)
    calls = {"n": 0}

    def interrupt(done, total):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.add_corpus("cut", [text_dir], settings=small_settings, progress=interrupt)
    assert store.corpus("cut").status == "failed" and store.stats().pairs == store.corpus("keep").pairs
    assert check(store).ok
    store.resume_corpus("cut")
    assert store.corpus("cut").pairs == store.corpus("keep").pairs and check(store).problems == []


def test_ctrl_c_in_the_cli_exits_130_with_what_to_do(tmp_path, tiny_model_dir, text_dir):
    """A real SIGINT to `knnstore add-corpus` while it encodes."""
    import signal

    proc, err, s = interrupted_cli_ingest(tmp_path, tiny_model_dir, signal.SIGINT)
    if proc.returncode == 0:
        pytest.skip("the ingest finished before the interrupt arrived")
    assert proc.returncode == 130 and "Interrupted" in err and "Traceback" not in err
    store = Store.open(s)
    assert store.corpus("many").status == "failed" and check(store).ok
