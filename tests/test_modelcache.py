"""The cache of dequantised GGUF models (``knnstore.modelcache``): the first load writes a
complete directory, later loads read it, a damaged or partial one is rebuilt, never used,
and a cache that cannot be written costs only the speed-up.

The unit tests stand a tiny random-weight model in for the dequantised GGUF (any file's
bytes stand for the GGUF file: the cache is keyed by its sha256); the last test loads the
real default model through the cache.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from knnstore import Encoder
from knnstore import modelcache
from knnstore.config import cache_root
from knnstore.modelcache import MANIFEST, is_complete, load_cached, model_dir


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KNNSTORE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF stand-in " * 1000)
    return path


class Loads:
    """load_gguf / load_dir for load_cached, counting their calls."""

    def __init__(self, model_dir_):
        self.source, self.from_gguf, self.from_dir = model_dir_, 0, 0

    def gguf(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.from_gguf += 1
        self.last_gguf = AutoModelForCausalLM.from_pretrained(self.source)
        return self.last_gguf, AutoTokenizer.from_pretrained(self.source)

    def directory(self, path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.from_dir += 1
        return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _weights(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_the_first_load_caches_and_later_loads_read_the_cache(cache, gguf, tiny_model_dir):
    loads = Loads(tiny_model_dir)
    first, tok = load_cached(gguf, loads.gguf, loads.directory, cache_root())
    directory = model_dir(gguf, cache_root())
    assert directory.parent == cache / "models" and directory.name == modelcache.file_sha256(gguf)
    assert is_complete(directory) and (loads.from_gguf, loads.from_dir) == (1, 0)
    manifest = json.loads((directory / MANIFEST).read_text())
    assert "model.safetensors" in manifest["files"] and manifest["source"] == "model.gguf"
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".tmp")]  # nothing left behind
    again, tok2 = load_cached(gguf, loads.gguf, loads.directory, cache_root())
    assert (loads.from_gguf, loads.from_dir) == (1, 1)
    want, got = _weights(first), _weights(again)
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)  # float32, exact
    assert tok2("the lobsters are blue")["input_ids"] == tok("the lobsters are blue")["input_ids"]
    # another GGUF file is another model
    other = gguf.with_name("other.gguf")
    other.write_bytes(b"another stand-in")
    load_cached(other, loads.gguf, loads.directory, cache_root())
    assert loads.from_gguf == 2 and model_dir(other, cache_root()) != directory


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "drop the manifest", "drop a file"])
def test_a_damaged_cache_is_found_and_rebuilt_never_used(cache, gguf, tiny_model_dir, damage, caplog):
    loads = Loads(tiny_model_dir)
    load_cached(gguf, loads.gguf, loads.directory, cache_root())
    directory = model_dir(gguf, cache_root())
    weights = directory / "model.safetensors"
    if damage == "flip a byte":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "drop the manifest":
        (directory / MANIFEST).unlink()
    else:
        weights.unlink()
    assert not is_complete(directory)
    with caplog.at_level(logging.WARNING, logger="knnstore.modelcache"):
        model, _ = load_cached(gguf, loads.gguf, loads.directory, cache_root())
    # rebuilt from the GGUF file; a copy whose sizes are wrong is not even read, one whose
    # bytes are wrong is read while it is hashed, and dropped
    assert (loads.from_gguf, loads.from_dir) == (2, 1 if damage == "flip a byte" else 0)
    assert model is loads.last_gguf
    assert "damaged or incomplete" in caplog.text and is_complete(directory)
    assert torch.isfinite(next(model.parameters())).all()


def test_a_half_written_cache_is_never_read(cache, gguf, tiny_model_dir):
    # a writer killed before its rename leaves only a temporary directory: not the cache
    loads = Loads(tiny_model_dir)
    tmp = cache / "models" / f".tmp-{modelcache.file_sha256(gguf)[:16]}-1-abcd"
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"partial")
    load_cached(gguf, loads.gguf, loads.directory, cache_root())
    assert (loads.from_gguf, loads.from_dir) == (1, 0) and is_complete(model_dir(gguf, cache_root()))


def test_an_unwritable_cache_costs_only_the_speed_up(tmp_path, gguf, tiny_model_dir, monkeypatch, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache would go")
    monkeypatch.setenv("KNNSTORE_CACHE", str(blocker))
    loads = Loads(tiny_model_dir)
    with caplog.at_level(logging.WARNING, logger="knnstore.modelcache"):
        model, tok = load_cached(gguf, loads.gguf, loads.directory, cache_root())
    assert model is not None and loads.from_gguf == 1 and "KNNSTORE_CACHE" in caplog.text


def test_the_cache_root_honours_knnstore_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("KNNSTORE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "knnstore"
    monkeypatch.setenv("KNNSTORE_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("KNNSTORE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "knnstore"


@pytest.mark.slow
def test_the_default_model_loads_the_same_from_its_cache(cache):
    first = Encoder.load("smollm2-135m")  # dequantised from the GGUF file, then cached
    cached = [p for p in (cache / "models").iterdir() if not p.name.startswith(".")]
    assert len(cached) == 1 and is_complete(cached[0])
    second = Encoder.load("smollm2-135m")  # from the cache
    assert second.identity("float16") == first.identity("float16")  # fingerprints: the same model
    ids = torch.tensor([first.tokenize("The European lobster is a species of clawed lobster.")])
    mask = torch.ones_like(ids)
    k1, l1 = first.forward(ids, mask, with_logits=True)
    k2, l2 = second.forward(ids, mask, with_logits=True)
    assert torch.equal(k1, k2) and torch.equal(l1, l2)
