"""Shared fixtures.

Unit tests use tiny random-weight models (hidden 32, 2 layers) with a small BPE tokenizer
trained here, saved to a directory so they load through the same code path as any local
model. Tests marked `slow` load the real default model (SmolLM2-135M) once per session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
from pathlib import Path

import pytest
import torch

from knnstore import Encoder, IngestSettings, Store

from . import servers

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED.exists():  # a checkout at ../main next to ../shared, or the repo itself
    SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TRAIN_TEXT = """\
The European lobster is a species of clawed lobster from the eastern Atlantic Ocean.
It is closely related to the American lobster and may grow to a length of sixty centimetres.
In life the lobsters are blue, only becoming lobster red on cooking.
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer
the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.
First Citizen: Before we proceed any further, hear me speak. All: Speak, speak.
0123456789 = Title = , . ; : ! ? ( ) " ' @-@ @.@
"""


def _train_tokenizer(directory: Path, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TRAIN_TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(directory)
    return fast


CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"


def make_tiny_model(directory: Path, seed: int = 0, vocab_size: int = 300, arch: str = "llama") -> Path:
    """A random-weight causal LM + tokenizer saved in ``directory``; returns it."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(directory, vocab_size)
    n = len(tokenizer)
    if arch == "llama":
        config = LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=n, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    else:
        config = GPTNeoXConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=256)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server on 127.0.0.1 for the session (``servers.start_postgres``)."""
    yield from servers.start_postgres()


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server on 127.0.0.1 for the session (``servers.start_s3``)."""
    yield from servers.start_s3()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model_dir) -> Encoder:
    return Encoder.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_encoder):
    """The adapter (exact search, λ 0.5) over a tiny-model store with corpora 'a' and 'b',
    and the store's path: what the server's tests serve. The tokenizer gets a chat template."""
    from knnstore.adapter import KNNLM

    root = tmp_path_factory.mktemp("serve")
    store = Store.create(root / "store", model=tiny_encoder.name, encoder=tiny_encoder)
    settings = IngestSettings(window=16, stride=12, batch_size=4, commit_every=64)
    store.add_corpus("a", [write_docs(root / "a", 6, repeat=6)], settings=settings)
    store.add_corpus("b", [write_docs(root / "b", 3, repeat=4, template="Other {i}: a cat sat on the mat. ")],
                     settings=settings)
    tiny_encoder.tokenizer.chat_template = CHAT_TEMPLATE
    lm = KNNLM.from_store(store, exact=True, lambda_=0.5)
    yield lm, root / "store"
    store.close()


@pytest.fixture
def small_settings() -> IngestSettings:
    """Small windows so that even short test documents span several windows."""
    return IngestSettings(window=16, stride=12, batch_size=4, commit_every=64)


@pytest.fixture
def store(tmp_path, tiny_encoder) -> Store:
    s = Store.create(tmp_path / "store", model=tiny_encoder.name, encoder=tiny_encoder)
    yield s
    s.close()


@pytest.fixture
def two_corpora(store, tmp_path, small_settings) -> Store:
    """The store with two small corpora: 'a' (six documents of repeated text) and 'b'."""
    store.add_corpus("a", [write_docs(tmp_path / "a", 6, repeat=6)], settings=small_settings)
    store.add_corpus("b", [write_docs(tmp_path / "b", 3, repeat=4, template="Other {i}: a cat sat on the mat. ")],
                     settings=small_settings)
    return store


@pytest.fixture
def text_dir(tmp_path) -> Path:
    """A directory tree of three small text documents."""
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("The European lobster is a species of clawed lobster. " * 6)
    (root / "b.md").write_text("To be, or not to be, that is the question. " * 8)
    (root / "sub" / "c.txt").write_text("First Citizen: Before we proceed any further, hear me speak. " * 5)
    return root


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes: the SQLite catalog with its write-ahead log
    checkpointed first, so that a write hidden in the log shows, and a checkpoint that
    happens to run meanwhile (when a connection closes) does not look like a change; the
    log, the shared-memory index and the write lock file excluded."""
    catalog = path / "catalog.db"
    if catalog.is_file():
        try:
            with contextlib.closing(sqlite3.connect(catalog)) as db:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:  # a damaged catalog is compared as it is
            pass
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "write.lock" and not p.name.endswith(("-wal", "-shm"))}


def changed(path: Path, before: dict[str, bytes]) -> set[str]:
    """The files under ``path`` added, removed or rewritten since ``before = snapshot(path)``."""
    after = snapshot(path)
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


@contextlib.contextmanager
def read_only_view(path: Path, where: Path):
    """``path`` bind-mounted read-only at ``where`` (needs root and mount; the test is
    skipped, saying so, elsewhere)."""
    import subprocess

    where.mkdir()
    proc = subprocess.run(["mount", "--bind", str(path), str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({proc.stderr.strip() or 'mount failed'})")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(where)], check=True)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def replace_settings(settings: IngestSettings, **changes) -> IngestSettings:
    return dataclasses.replace(settings, **changes)


def write_docs(directory: Path, n: int, repeat: int = 4, template: str =
               "Document {i}: the lobsters are blue, only becoming red on cooking. ") -> Path:
    """A directory of n small text documents."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (directory / f"{i:02}.txt").write_text(template.format(i=i) * repeat)
    return directory


def interrupted_cli_ingest(tmp_path: Path, model_dir: Path, signum: int):
    """`knnstore add-corpus` in a child process, sent ``signum`` once it is committing
    documents; returns (the finished process, its stderr, the store path)."""
    import os
    import subprocess
    import sys
    import time

    s = tmp_path / "s"
    knnstore = [sys.executable, "-m", "knnstore"]
    subprocess.run([*knnstore, "init", str(s), "--model", str(model_dir)], check=True, capture_output=True)
    big = write_docs(tmp_path / "many", 400, 8)
    env = {**os.environ, "KNNSTORE_WINDOW": "16", "KNNSTORE_STRIDE": "12", "KNNSTORE_BATCH_SIZE": "1"}
    proc = subprocess.Popen([*knnstore, "add-corpus", str(s), "many", str(big)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not Store.open(s).corpora():  # documents are being committed
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return proc, err, s


class Boom(Exception):
    """A simulated crash raised from inside an ingest."""


def fail_after(n_calls: int):
    """A progress callback that raises Boom on its n-th call."""
    calls = {"n": 0}

    def progress(done, total):
        calls["n"] += 1
        if calls["n"] == n_calls:
            raise Boom("simulated crash")

    return progress


def reader_view(store: Store, name: str, every: int = 7):
    """What readers see of a ready corpus: status, pairs, and the distances of the nearest
    pairs of some of its own keys (test texts repeat, so tied pair ids come back in any order)."""
    import numpy as np

    store.refresh()
    info = store.corpus(name)
    table = store.table.dataset().to_table()
    rows = table.filter(table.column("corpus_id").to_numpy() == info.id)
    queries = np.asarray(rows.column("vector").to_pylist()[::every], dtype=np.float32)
    return info.status, info.pairs, np.round(store.search(queries, k=4).distances, 4).tolist()
