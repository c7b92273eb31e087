"""Fast start: the commands that need no model import neither torch nor transformers
(each is a fresh process, as a user runs it), and still work."""

from __future__ import annotations

import subprocess
import sys

import pytest

from knnstore import Store

from .conftest import write_docs

PROBE = ("import runpy, sys\nsys.argv = ['knnstore', *sys.argv[1:]]\n"
         "try:\n    runpy.run_module('knnstore', run_name='__main__')\nexcept SystemExit as exc:\n"
         "    code = exc.code\nelse:\n    code = 0\n"
         "print('LOADED', 'torch' in sys.modules, 'transformers' in sys.modules, code, file=sys.stderr)\n")


@pytest.fixture
def small_store(tmp_path, tiny_encoder, small_settings):
    s = Store.create(tmp_path / "s", model=tiny_encoder.name, encoder=tiny_encoder)
    s.add_corpus("a", [write_docs(tmp_path / "a", 3)], settings=small_settings)
    s.add_corpus("b", [write_docs(tmp_path / "b", 2)], settings=small_settings)
    s.close()
    return tmp_path / "s"


@pytest.mark.parametrize("argv", [["--help"], ["list", "{s}"], ["list", "{s}", "--json"], ["stats", "{s}"],
                                  ["sql", "{s}", "SELECT count(*) AS n FROM pairs"], ["check", "{s}"],
                                  ["remove-corpus", "{s}", "b"]])
def test_commands_without_a_model_import_neither_torch_nor_transformers(small_store, argv):
    args = [a.format(s=small_store) for a in argv]
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    loaded = [line.split() for line in proc.stderr.splitlines() if line.startswith("LOADED")][-1]
    assert loaded[3] in ("0", "None"), proc.stderr[-2000:]  # the command itself succeeded
    assert loaded[1:3] == ["False", "False"], f"{args}: torch, transformers imported: {loaded[1:3]}"
    if argv[0] == "remove-corpus":
        assert [c.name for c in Store.open(small_store).corpora()] == ["a"]
