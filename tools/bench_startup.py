"""How long knnstore takes to start: commands without a model, model loads, a short generate.

    python tools/bench_startup.py STORE [--runs 5]

STORE is a store of the default model (e.g. the README demo's). Each figure is the median
wall time of --runs fresh processes (``knnstore ...`` as a user runs it), in one run:

* ``knnstore --help``, ``knnstore list STORE``, ``knnstore stats STORE``: no model needed;
  also whether the process imported torch or transformers (it should not need them);
* the default model's load (``Encoder.load("smollm2-135m")`` in a fresh process): the first,
  dequantising the GGUF file (with an empty model cache: ``KNNSTORE_CACHE`` pointed at a new
  directory), and after it, from the cached float32 copy (``knnstore.modelcache``);
* ``knnstore generate STORE PROMPT --max-new-tokens 8`` end to end, the model cached.

Goals (issue 20): list and stats <= 1 s, a model load after the first <= 3 s, generate of 8
tokens <= 5 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent / "knnstore"
IMPORTS = ("import runpy, sys\nsys.argv = ['knnstore', *sys.argv[1:]]\n"
           "try:\n    runpy.run_module('knnstore', run_name='__main__')\nexcept SystemExit:\n    pass\n"
           "print('IMPORTED', 'torch' in sys.modules, 'transformers' in sys.modules, file=sys.stderr)\n")
LOAD = "from knnstore import Encoder\nEncoder.load('smollm2-135m')\n"


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return seconds, proc.stderr


def median_of(runs: int, cmd: list[str], env: dict | None = None) -> float:
    return statistics.median(timed(cmd, env)[0] for _ in range(runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt", default="The tower was built in")
    args = ap.parse_args()
    rows = []
    for name, argv in (("knnstore --help", ["--help"]), ("knnstore list", ["list", args.store]),
                       ("knnstore stats", ["stats", args.store])):
        seconds = median_of(args.runs, [str(BIN), *argv])
        _, err = timed([sys.executable, "-c", IMPORTS, *argv])
        line = [ln for ln in err.splitlines() if ln.startswith("IMPORTED")][-1].split()
        rows.append((name, seconds, f"imports torch: {line[1]}, transformers: {line[2]}"))
    with tempfile.TemporaryDirectory() as empty:
        env = {**os.environ, "KNNSTORE_CACHE": empty}
        first = timed([sys.executable, "-c", LOAD], env)[0]  # dequantises, then writes the cache
        rows.append(("model load, first (empty cache)", first, "GGUF dequantised, then cached"))
        rows.append(("model load, cached", median_of(args.runs, [sys.executable, "-c", LOAD], env),
                     "float32 safetensors, manifest checked"))
        gen = median_of(args.runs, [str(BIN), "generate", args.store, args.prompt, "--max-new-tokens", "8"], env)
        rows.append(("knnstore generate, 8 tokens", gen, "model cached"))
    print(f"median of {args.runs} fresh processes each (the first load: one)")
    for name, seconds, note in rows:
        print(f"  {name:34s} {seconds:6.2f} s   {note}")


if __name__ == "__main__":
    main()
