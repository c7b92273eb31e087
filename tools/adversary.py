"""An adversarial run against the CLI: hostile names, paths, damaged stores, hostile SQL,
second writers, and random SIGKILL / SIGTERM during every kind of write.

    python tools/adversary.py --work /tmp/adversary [--kills 40] [--seed 0]

Every case runs `knnstore` as a user would (a subprocess, a tiny random-weight model) and
is judged by what a user must be able to rely on: no traceback; a refused command exits
non-zero and leaves the store's bytes unchanged; after any kill the store opens, `check
--repair` leaves it OK, ready corpora keep their pairs, and one command (resume or remove)
finishes the interrupted work. Prints one line per finding and a summary; exits 1 if
anything was found.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import make_tiny_model, snapshot, write_docs  # noqa: E402

KNN = [sys.executable, "-m", "knnstore"]
ENV = {**os.environ, "KNNSTORE_WINDOW": "16", "KNNSTORE_STRIDE": "12", "KNNSTORE_BATCH_SIZE": "1",
       "HF_HUB_OFFLINE": "1"}


class Run:
    def __init__(self) -> None:
        self.cases = 0
        self.findings: list[str] = []

    def cli(self, *args, timeout=300, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*KNN, *map(str, args)], capture_output=True, text=True, env=ENV,
                              timeout=timeout, **kw)

    def refused(self, what: str, store: Path | None, *args) -> None:
        """A command that must fail cleanly and change nothing."""
        self.cases += 1
        before = _bytes(store) if store else None
        proc = self.cli(*args)
        out = proc.stdout + proc.stderr
        if proc.returncode == 0:
            self.found(f"{what}: accepted (exit 0): {' '.join(map(str, args))[:120]}")
        if "Traceback" in out:
            self.found(f"{what}: traceback: {out.strip().splitlines()[-1][:200]}")
        if "\x1b" in out:
            self.found(f"{what}: an escape character reached the terminal")
        if store and _bytes(store) != before:
            self.found(f"{what}: the store changed")

    def found(self, finding: str) -> None:
        self.findings.append(finding)
        print("FINDING", finding, flush=True)

    def ok(self, what: str, *args) -> subprocess.CompletedProcess:
        proc = self.cli(*args)
        if proc.returncode != 0 or "Traceback" in proc.stderr:
            self.found(f"{what}: failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}")
        return proc


def _bytes(store: Path) -> dict:
    snap = snapshot(store) if store.exists() else {}
    return {k: v for k, v in snap.items() if not (k.endswith(("-wal", "-shm")) and not v)}


def _ready(run: Run, store: Path) -> dict:
    proc = run.cli("list", store, "--json")
    return {c["name"]: c["pairs"] for c in json.loads(proc.stdout) if c["status"] == "ready"} if proc.returncode == 0 else {}


def hostile_inputs(run: Run, work: Path, model: Path, docs: Path) -> None:
    store = work / "base"
    run.ok("init", "init", store, "--model", model)
    run.ok("add", "add-corpus", store, "keep", docs)
    fifo = work / "fifo"
    os.mkfifo(fifo)
    (work / "surrogate.jsonl").write_text('{"text": "a \\ud800 b"}\n')
    (work / "bad.jsonl").write_text('{"text": 1}\n')
    names = ["", "  ", "keep", "x" * 300, "a\x1b[31mb", "tab\there", "bell\x07", "new\nline"]
    for name in names:
        run.refused(f"add-corpus name {name[:12]!r}", store, "add-corpus", store, name, docs)
        run.refused(f"remove-corpus name {name[:12]!r}", store, "remove-corpus", store, name + "-missing")
    for source in ["/dev/zero", "/dev/null", fifo, "/nonexistent", work / "surrogate.jsonl", work / "bad.jsonl",
                   store / "catalog.db", "/proc/self/mem"]:
        run.refused(f"add-corpus source {source}", store, "add-corpus", store, "src", source)
        if source.suffix != ".jsonl" if isinstance(source, Path) else True:  # a .jsonl is fine text to score
            run.refused(f"eval --text {source}", store, "eval", store, "--text", source)
    for out in [store / "catalog.db", store / "knnstore.json", store / "vectors" / "x", store, "/dev/null",
                "/nonexistent/x.csv"]:
        run.refused(f"sql --output {out}", store, "sql", store, "SELECT 1", "--output", out)
    link = work / "link.csv"
    link.symlink_to(store / "catalog.db")
    run.refused("sql --output symlink into the store", store, "sql", store, "SELECT 1", "--output", link)
    for query in ["DELETE FROM pairs", "DROP VIEW pairs", "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
                  "EXPLAIN (FORMAT JSON) DELETE FROM corpora", "ATTACH 'x.db'", "COPY pairs TO 'x.csv'",
                  "SELECT * FROM read_text('knnstore.json')", "INSTALL httpfs", "SET threads = 1",
                  "PRAGMA database_list", "SELECT 1; DROP VIEW pairs", "CALL pragma_version()",
                  "SELECT * FROM glob('/etc/*')", "CREATE MACRO m() AS 1", "EXPORT DATABASE 'd'",
                  "SELECT * FROM sniff_csv('/etc/passwd')", "LOAD 'x'", "CHECKPOINT", "VACUUM", "",
                  "SELECT getenv('HOME')", "DETACH memory", "USE system"]:
        run.refused(f"sql {query[:30]!r}", store, "sql", store, query)
    for args in (["generate", store, "x", "--num-beams", "0"], ["generate", store, "x", "--top-p", "1.5"],
                 ["generate", store, "x", "--sources", "-1"], ["eval", store, "--text", docs / "00.txt", "--k", "50000000"],
                 ["eval", store, "--text", docs / "00.txt", "--skip-below-entropy", "nan"],
                 ["eval", store, "--text", docs / "00.txt", "--window", "0"],
                 ["eval", store, "--text", docs / "00.txt", "--max-tokens", "0"],
                 ["index", store, "--sub-vectors", "7"], ["index", store, "--sub-vectors", "1000"],
                 ["index", store, "--partitions", "0"], ["sql", store, "SELECT 1", "--max-rows", "-1"],
                 ["init", work / "n1", "--model", model, "--key-layer", "100"],
                 ["init", work / "base" / "knnstore.json" / "x", "--model", model],
                 ["init", "/proc/x/y", "--model", model],
                 ["init", work / "n2", "--model", model, "--catalog-url", "postgresql://u:pw@127.0.0.1:1/x"],
                 ["init", work / "n3", "--model", model, "--catalog-url", "%%%"],
                 ["init", work / "q?x", "--model", model]):
        run.refused(" ".join(map(str, args[:1] + args[2:]))[:60], store, *args)
    if any(p.exists() for p in (work / "n1", work / "n2", work / "n3", work / "q")):
        run.found("a refused init left a directory behind")
    # another store's catalog
    other = work / "other"
    run.ok("init other", "init", other, "--model", model)
    ENV["KNNSTORE_CATALOG_URL"] = f"sqlite:///{store / 'catalog.db'}"
    for args in (["list", other], ["check", other, "--repair"], ["remove-corpus", other, "keep"]):
        run.refused(f"{args[0]} with another store's catalog", other, *args)
        run.refused(f"{args[0]} with another store's catalog (that store)", store, *args)
    del ENV["KNNSTORE_CATALOG_URL"]


def damaged_stores(run: Run, work: Path, model: Path, docs: Path) -> None:
    base = work / "base"
    damages = {
        "catalog truncated": lambda s: (s / "catalog.db").write_bytes((s / "catalog.db").read_bytes()[:64]),
        "catalog missing": lambda s: (s / "catalog.db").unlink(),
        "vectors missing": lambda s: shutil.rmtree(s / "vectors"),
        "data file missing": lambda s: next((s / "vectors" / "pairs.lance" / "data").iterdir()).unlink(),
        "manifest missing": lambda s: shutil.rmtree(s / "vectors" / "pairs.lance" / "_versions"),
        "marker format 0": lambda s: _marker(s, format_version=0),
        "marker format -7": lambda s: _marker(s, format_version=-7),
        "marker format 1.9": lambda s: _marker(s, format_version=1.9),
        "marker format 99": lambda s: _marker(s, format_version=99),
        "marker catalog_url 5": lambda s: _marker(s, catalog_url=5),
        "marker store_id other": lambda s: _marker(s, store_id="0" * 36),
        "marker garbage": lambda s: (s / "knnstore.json").write_text("[1, 2"),
    }
    for name, damage in damages.items():
        store = work / f"damaged-{name.replace(' ', '-')}"
        shutil.copytree(base, store)
        for wal in store.glob("catalog.db-*"):
            wal.unlink()
        damage(store)
        for args in (["list", store], ["stats", store], ["sql", store, "SELECT count(*) FROM pairs"],
                     ["check", store], ["check", store, "--repair"], ["remove-corpus", store, "keep"],
                     ["eval", store, "--text", docs / "00.txt"]):
            if name == "data file missing" and args[0] in ("list", "stats"):
                continue  # metadata only: they do not read data files
            run.refused(f"{name}: {args[0]}{' --repair' if '--repair' in args else ''}", store, *args)


def _marker(store: Path, **changes) -> None:
    data = json.loads((store / "knnstore.json").read_text())
    data.update(changes)
    (store / "knnstore.json").write_text(json.dumps(data))


def kills(run: Run, work: Path, model: Path, docs: Path, n: int, rng: random.Random) -> None:
    store = work / "kills"
    run.ok("init", "init", store, "--model", model)
    run.ok("add", "add-corpus", store, "keep", docs)
    keep = _ready(run, store)["keep"]
    big = write_docs(work / "big", 60, 6)
    for i in range(n):
        ready = _ready(run, store)
        name = f"c{i}"
        kind = rng.choice(["add", "add", "resume", "remove", "index", "repair"])
        failed = [c["name"] for c in json.loads(run.cli("list", store, "--json").stdout) if c["status"] != "ready"]
        if kind == "resume" and failed:
            args = ["resume-corpus", store, failed[0]]
        elif kind == "remove" and len(ready) > 1:
            args = ["remove-corpus", store, rng.choice([c for c in ready if c != "keep"])]
        elif kind == "index":
            args = ["index", store, "--rebuild", "--partitions", "2"]
        elif kind == "repair":
            args = ["check", store, "--repair"]
        else:
            args = ["add-corpus", store, name, big]
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        proc = subprocess.Popen([*KNN, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=ENV)
        time.sleep(rng.uniform(1.0, 8.0))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        run.cases += 1
        what = f"kill {i}: {args[0]} {sig.name}"
        if "Traceback" in err:
            run.found(f"{what}: traceback: {err.strip().splitlines()[-1][:200]}")
        # -15: the signal came while Python was still importing, before knnstore's handler
        # was installed and before anything was written (a shell reports it as 143 too).
        if sig == signal.SIGTERM and proc.returncode not in (0, 143, 1, -15):
            run.found(f"{what}: exit {proc.returncode} on SIGTERM")
        after = _ready(run, store)
        if after.get("keep") != keep or any(after.get(c) != p for c, p in ready.items() if args[0] != "remove-corpus"):
            run.found(f"{what}: a ready corpus changed: {ready} -> {after}")
        repair = run.cli("check", store, "--repair")
        if repair.returncode != 0 or run.cli("check", store).returncode != 0:
            run.found(f"{what}: check after repair: {repair.stdout.strip()[-300:]}")
        for c in json.loads(run.cli("list", store, "--json").stdout):
            if c["status"] == "failed" and rng.random() < 0.5:
                run.ok(f"{what}: resume", "resume-corpus", store, c["name"])
            elif c["status"] != "ready":
                run.ok(f"{what}: remove", "remove-corpus", store, c["name"])
        if run.cli("check", store).returncode != 0:
            run.found(f"{what}: check after recovery failed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--kills", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    model = make_tiny_model(args.work / "model")
    docs = write_docs(args.work / "docs", 6, 8)
    run = Run()
    t0 = time.monotonic()
    for part in (hostile_inputs, damaged_stores):
        part(run, args.work, model, docs)
        print(f"{part.__name__}: {run.cases} cases so far, {len(run.findings)} findings", flush=True)
    kills(run, args.work, model, docs, args.kills, random.Random(args.seed))
    print(f"kills: {run.cases} cases so far, {len(run.findings)} findings", flush=True)
    print(f"{run.cases} cases in {time.monotonic() - t0:.0f} s: {len(run.findings)} findings")
    sys.exit(1 if run.findings else 0)


if __name__ == "__main__":
    main()
