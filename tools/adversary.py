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


def _serve(store: Path, port: int) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen([*KNN, "serve", str(store), "--port", str(port), "--lambda", "0.5"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not start: {proc.stderr.read()[-500:]}")


def served(run: Run, work: Path, model: Path, docs: Path) -> None:
    """Issue 31's surfaces: a served store under its own maintenance, bounded requests,
    read endpoints that never write, shutdown, forgetting metadata and disguised forms."""
    import socket
    import threading

    import httpx

    store = work / "served"
    run.ok("init served", "init", store, "--model", model)
    for name, template in (("a", "Doc {i}: the lobster sat on the rock. "), ("b", "Mail {i}: jane@example.org wrote. ")):
        run.ok(f"add {name}", "add-corpus", store, name, write_docs(work / f"served-{name}", 6, 6, template=template))
    run.ok("index", "index", store, "--partitions", "2")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = _serve(store, port)
    model_id = httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["id"]
    answers, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                for r in (httpx.post(url + "/v1/completions", timeout=60, json={
                        "model": model_id, "prompt": "Doc 1", "max_tokens": 4, "temperature": 0}),
                          httpx.post(url + "/v1/store/sql", timeout=60, json={"query": "SELECT count(*) FROM pairs"})):
                    answers.append((r.status_code, r.text))
            except httpx.HTTPError as exc:
                answers.append((0, str(exc)))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        for args in (["compact", store, "--key-dim", "16"], ["prune", store], ["purge", store],
                     ["remove-documents", store, "--where", "ordinal = 0", "--corpus", "a"],
                     ["forget", store, "--text", "jane@example.org"], ["purge", store]):
            run.cases += 1
            checker = subprocess.Popen([*KNN, "check", str(store)], env=ENV, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True) if args[0] == "compact" else None
            run.ok(f"served: {args[0]}", *args)
            if checker is not None:
                out, err = checker.communicate(timeout=300)
                if "backup" in out + err or "Traceback" in err:
                    run.found(f"check during compact: {(out + err).strip().splitlines()[-1][:200]}")
            time.sleep(1.5)
    finally:
        stop.set()
        thread.join()
    for status, text in answers:
        run.cases += 1
        if status not in (200, 503) or "damaged" in text or "backup" in text:
            run.found(f"served under maintenance: {status} {text[:160]}")
    health = httpx.get(url + "/health", timeout=5)
    run.cases += 1
    if health.status_code != 200:
        run.found(f"/health after maintenance: {health.status_code} {health.text[:160]}")
    # bounded requests; /health keeps answering
    before = _bytes(store)
    slow = threading.Thread(target=lambda: answers.append(("sql", httpx.post(
        url + "/v1/store/sql", timeout=120, json={"query": "SELECT count(*) FROM pairs a, pairs b, pairs c, pairs d"}))))
    slow.start()
    time.sleep(0.5)
    for what, request in (
            ("health during slow SQL", lambda: httpx.get(url + "/health", timeout=3)),
            ("20 MB body", lambda: httpx.post(url + "/v1/completions", content=b"x" * 20_000_000, timeout=30,
                                               headers={"content-type": "application/json"})),
            ("chunked 20 MB body", lambda: httpx.post(url + "/v1/completions", timeout=30,
                                                       content=iter([b"x" * 1_000_000] * 20))),
            ("new knn_temperature", lambda: httpx.post(url + "/v1/completions", timeout=60, json={
                "model": model_id, "prompt": "Doc", "max_tokens": 2, "adaptive": True, "knn_temperature": 7.5})),
            ("max_tokens true", lambda: httpx.post(url + "/v1/completions", timeout=60, json={
                "model": model_id, "prompt": "Doc", "max_tokens": True})),
            ("logprobs", lambda: httpx.post(url + "/v1/completions", timeout=60, json={
                "model": model_id, "prompt": "Doc", "max_tokens": 2, "logprobs": 3}))):
        run.cases += 1
        t0 = time.monotonic()
        try:
            r = request()
        except httpx.HTTPError as exc:
            run.found(f"{what}: {exc}")
            continue
        took = time.monotonic() - t0
        expected = {"health during slow SQL": 200, "new knn_temperature": 200}.get(what)
        if (expected and r.status_code != expected) or (not expected and not 400 <= r.status_code < 500):
            run.found(f"{what}: {r.status_code} {r.text[:120]}")
        if took > 10:
            run.found(f"{what}: took {took:.0f} s")
    slow.join()
    run.cases += 1
    if answers[-1][1].status_code != 400:
        run.found(f"slow SQL: {answers[-1][1].status_code}, not stopped at its limit")
    if _bytes(store) != before:
        run.found("a request wrote to the store")
    # shutdown with a statement running
    slow = threading.Thread(target=lambda: httpx.post(url + "/v1/store/sql", timeout=120, json={
        "query": "SELECT count(*) FROM pairs a, pairs b, pairs c, pairs d"}), daemon=True)
    slow.start()
    time.sleep(0.5)
    run.cases += 1
    t0 = time.monotonic()
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        run.found("SIGTERM with SQL running: the server did not stop within 20 s")
    else:
        print(f"served: SIGTERM with SQL running: stopped in {time.monotonic() - t0:.1f} s", flush=True)
    # forgetting what metadata holds, disguised forms; removals that match everything
    forms = work / "forms"
    forms.mkdir()
    (forms / "jane.doe@example.com.txt").write_text("A note. " * 40)
    (forms / "b.txt").write_text("Write to jane.doe\uff20example.com or jane.d\u200doe@example.com today. " * 8)
    (work / "forms.jsonl").write_text(json.dumps({"text": "Plain text. " * 30, "owner": "jane.doe@example.com"}) + "\n")
    fstore = work / "forms-store"
    run.ok("init forms", "init", fstore, "--model", model)
    run.ok("add forms", "add-corpus", fstore, "files", forms)
    run.ok("add jsonl", "add-corpus", fstore, "records", work / "forms.jsonl")
    run.refused("remove-documents --where 1=1", fstore, "remove-documents", fstore, "--where", "1=1")
    run.refused("add-corpus --ray-address 127.0.0.1:1", fstore, "add-corpus", fstore, "r", docs,
                "--ray-address", "127.0.0.1:1")
    run.cases += 1
    run.ok("forget --purge", "forget", fstore, "--text", "jane.doe@example.com", "--purge")
    for path in fstore.rglob("*"):
        if path.is_file() and any(f in path.read_bytes() for f in (b"jane.doe", "jane.doe".encode("utf-16-le"))):
            run.found(f"forget --purge left the text in {path.relative_to(fstore)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--kills", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["served"], help="run only this part (issue 31's surfaces)")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    model = make_tiny_model(args.work / "model")
    docs = write_docs(args.work / "docs", 6, 8)
    run = Run()
    t0 = time.monotonic()
    if args.only == "served":
        served(run, args.work, model, docs)
        print(f"{run.cases} cases in {time.monotonic() - t0:.0f} s: {len(run.findings)} findings")
        sys.exit(1 if run.findings else 0)
    for part in (hostile_inputs, damaged_stores, served):
        part(run, args.work, model, docs)
        print(f"{part.__name__}: {run.cases} cases so far, {len(run.findings)} findings", flush=True)
    kills(run, args.work, model, docs, args.kills, random.Random(args.seed))
    print(f"kills: {run.cases} cases so far, {len(run.findings)} findings", flush=True)
    print(f"{run.cases} cases in {time.monotonic() - t0:.0f} s: {len(run.findings)} findings")
    sys.exit(1 if run.findings else 0)


if __name__ == "__main__":
    main()
