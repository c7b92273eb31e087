"""Devices and compute dtypes (``--device``, ``--compute-dtype``): the CPU path here, the CUDA
path where torch sees a GPU (skipped with the reason otherwise)."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from knnstore import Encoder, InputError, Store
from knnstore.cli import cli
from knnstore.devices import resolve_compute_dtype, resolve_device

from .conftest import changed, snapshot

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU here: the CUDA path runs where torch sees one "
                                                     "(tools/gpu_check.sh runs it on a GPU machine)")


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| / |b| per key."""
    return (a - b).norm(dim=-1) / b.norm(dim=-1)


def test_auto_is_a_gpu_when_there_is_one_else_the_cpu():
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "mps" if mps else "cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_compute_dtype(torch.device("cpu"), "auto") == torch.float32
    assert resolve_compute_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "tpu", "cuda:99", *([] if HAS_CUDA else ["cuda", "cuda:0"])])
def test_a_malformed_or_absent_device_is_one_clear_error(spec):
    with pytest.raises(InputError, match="device") as info:
        resolve_device(spec)
    assert "\n" not in str(info.value)


def test_an_unknown_compute_dtype_is_refused():
    with pytest.raises(InputError, match="compute dtype"):
        resolve_compute_dtype(torch.device("cpu"), "int8")


def test_a_model_in_reduced_precision_keeps_the_identity_of_its_weights(store, tiny_model_dir):
    enc = Encoder.load(str(tiny_model_dir), device="cpu", compute_dtype="bfloat16")
    assert enc.compute_dtype == torch.bfloat16 and enc.device.type == "cpu"
    assert enc.model_fingerprint() == store.identity.model_fingerprint
    reopened = Store.open(store.path, encoder=enc)  # not refused as another model
    assert reopened.encoder is enc


@pytest.mark.parametrize("dtype,median,worst", [("bfloat16", 0.03, 0.15), ("float16", 0.005, 0.02)])
def test_keys_in_reduced_precision_agree_with_float32_keys(tiny_model_dir, tiny_encoder, dtype, median, worst):
    reduced = Encoder.load(str(tiny_model_dir), device="cpu", compute_dtype=dtype)
    ids = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(0))
    k32, logits32 = tiny_encoder.forward(ids, with_logits=True)
    k16, logits16 = reduced.forward(ids, with_logits=True)
    assert k16.dtype == torch.float32 and logits16.dtype == torch.float32  # handed back as float32
    diff = rel_diff(k16, k32)
    assert float(diff.median()) < median and float(diff.max()) < worst, (diff.median(), diff.max())


def test_a_store_built_in_bfloat16_holds_the_same_pairs_and_serves_float32_queries(
        tmp_path, tiny_model_dir, text_dir, small_settings):
    built = {}
    for dtype in ("bfloat16", "float32"):
        s = Store.create(tmp_path / dtype, model=str(tiny_model_dir), device="cpu", compute_dtype=dtype,
                         dtype="float32")
        s.add_corpus("docs", [text_dir], settings=small_settings)
        built[dtype] = s.table.columns(["pair_id", "next_token", "vector"]).sort_by("pair_id")
        s.close()
    bf, fp = built["bfloat16"], built["float32"]
    assert bf.column("pair_id").equals(fp.column("pair_id"))
    assert bf.column("next_token").equals(fp.column("next_token"))
    keys_bf = torch.from_numpy(np.stack(bf.column("vector").to_numpy(zero_copy_only=False)))
    keys_fp = torch.from_numpy(np.stack(fp.column("vector").to_numpy(zero_copy_only=False)))
    assert float(rel_diff(keys_bf, keys_fp).median()) < 0.03
    # The bfloat16 store, opened on the CPU in float32: the nearest stored pair of each float32
    # key predicts that key's next token (the texts repeat, so it may be another repetition).
    s = Store.open(tmp_path / "bfloat16", device="cpu", compute_dtype="float32")
    found = s.search(keys_fp.numpy(), k=1, exact=True).next_tokens[:, 0]
    assert np.mean(found == fp.column("next_token").to_numpy()) > 0.95


def test_cli_device_options_are_checked_before_anything_changes(tmp_path, tiny_model_dir, text_dir):
    runner = CliRunner()
    path = tmp_path / "s"
    ok = runner.invoke(cli, ["init", str(path), "--model", str(tiny_model_dir), "--device", "cpu",
                             "--compute-dtype", "bfloat16"])
    assert ok.exit_code == 0, ok.output
    before = snapshot(path)
    for bad in ([] if HAS_CUDA else ["cuda"]) + ["gpu", "cuda:99"]:
        result = runner.invoke(cli, ["add-corpus", str(path), "docs", str(text_dir), "--device", bad])
        assert result.exit_code == 2 and "--device" in result.output and "Traceback" not in result.output
    assert changed(path, before) == set()
    added = runner.invoke(cli, ["add-corpus", str(path), "docs", str(text_dir), "--device", "cpu",
                                "--compute-dtype", "bfloat16", "--json"])
    assert added.exit_code == 0, added.output
    assert Store.open(path).corpus("docs").status == "ready"


@needs_cuda
def test_on_a_gpu_keys_agree_with_the_cpu_and_a_gpu_store_opens_on_the_cpu(tmp_path, tiny_model_dir, tiny_encoder,
                                                                         text_dir, small_settings):
    gpu = Encoder.load(str(tiny_model_dir), device="cuda", compute_dtype="float32")
    ids = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(0))
    assert float(rel_diff(gpu.forward(ids)[0], tiny_encoder.forward(ids)[0]).max()) < 1e-3
    s = Store.create(tmp_path / "g", model=str(tiny_model_dir), device="cuda")
    s.add_corpus("docs", [text_dir], settings=small_settings)
    queries = np.random.default_rng(0).standard_normal((5, s.identity.dim)).astype(np.float32)
    on_gpu = s.search(queries, k=4, exact=True)
    on_cpu = Store.open(tmp_path / "g", device="cpu").search(queries, k=4, exact=True)
    assert np.array_equal(on_gpu.pair_ids, on_cpu.pair_ids)
    assert np.allclose(on_gpu.distances, on_cpu.distances, rtol=1e-4, atol=1e-4)
