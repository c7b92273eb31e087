"""Real servers the tests start on 127.0.0.1 and stop afterwards: PostgreSQL (Debian's
``postgresql`` package; .ci/run installs it) and an S3-compatible object store (moto's
server mode, from PyPI; in the dev extra).

The S3 server is reached through ``Gate``, a plain TCP forwarder on its own loopback port:
``gate.close()`` refuses every new connection and cuts the open ones, as a stopped server
does, and ``gate.open()`` brings the same address back with the bucket's objects intact
(moto keeps them in memory, so stopping moto itself would lose them).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


# --- PostgreSQL ----------------------------------------------------------------------

def _pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    return os.path.dirname(shutil.which("initdb")) if shutil.which("initdb") else None


class Postgres:
    """A throwaway PostgreSQL server; ``database()`` makes a fresh empty database."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server_url = f"postgresql+psycopg://knnstore@127.0.0.1:{port}"

    def database(self, name: str | None = None) -> str:
        from sqlalchemy import create_engine, text

        name = name or f"db_{uuid.uuid4().hex[:12]}"
        engine = create_engine(f"{self.server_url}/postgres", isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return f"{self.server_url}/{name}"


def start_postgres():
    """Yields a running ``Postgres``; skips (saying why) where the server is not installed."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'knnstore[postgres]')")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql); .ci/run installs them")
    # Not under pytest's tmp dir: that is private to root, and a root test runs the server
    # as the package's `postgres` user (initdb refuses to run as root).
    root = Path(tempfile.mkdtemp(prefix="knnstore-pg-"))
    data = root / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL")
        as_user = ["runuser", "-u", "postgres", "--"]
        os.chmod(root, 0o777)
    port = free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    run(f"{bindir}/initdb", "-D", str(data), "-U", "knnstore", "--auth=trust", "-E", "UTF8")
    run(f"{bindir}/pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-o",
        f"-c listen_addresses=127.0.0.1 -c port={port} -k {root}", "start")
    try:
        yield Postgres(port)
    finally:
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


# --- an S3-compatible server ------------------------------------------------------------

class Gate:
    """A TCP forwarder 127.0.0.1:port -> 127.0.0.1:target that can be closed and reopened."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.open()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        """Refuse new connections and cut the open ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class S3Server:
    """moto's S3 server behind a ``Gate``; ``env`` is what a client needs to reach it."""

    BUCKET = "knnstore-test"

    def __init__(self, proc: subprocess.Popen, gate: Gate) -> None:
        self.proc, self.gate = proc, gate
        self.endpoint = f"http://127.0.0.1:{gate.port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "knnstore-test",
                    "AWS_SECRET_ACCESS_KEY": "knnstore-test", "AWS_REGION": "us-east-1"}

    def uri(self, name: str | None = None) -> str:
        """A fresh, empty prefix in the test bucket."""
        return f"s3://{self.BUCKET}/{name or uuid.uuid4().hex[:12]}"

    def objects(self, prefix_uri: str) -> dict[str, int]:
        """Every object under ``prefix_uri``: key -> size."""
        import pyarrow.fs as pafs

        fs = self.filesystem()
        base = prefix_uri.split("://", 1)[1]
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return {i.path: i.size for i in infos if i.type == pafs.FileType.File}

    def filesystem(self, **options):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key="knnstore-test", secret_key="knnstore-test", region="us-east-1",
                                 endpoint_override=f"127.0.0.1:{self.gate.port}", scheme="http", **options)


def start_s3():
    """Yields a running ``S3Server`` with its bucket made; skips where moto is missing."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'knnstore[dev]')")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gate = None
    try:
        wait_for_port(port)
        gate = Gate(port)
        server = S3Server(proc, gate)
        server.filesystem(allow_bucket_creation=True).create_dir(S3Server.BUCKET)
        yield server
    finally:
        if gate is not None:
            gate.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


# --- knnstore serve ------------------------------------------------------------------


def serve_app(app):
    """Run an ASGI app (``knnstore.server.Server.app``) with uvicorn on a free loopback
    port in a thread; yields its base URL and stops it afterwards."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the knnstore server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
