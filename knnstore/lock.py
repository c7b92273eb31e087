"""The one-writer rule: an exclusive ``flock`` on the store directory itself, or, for a
store on an object store, a lock its catalog holds (``CatalogLock``).

A lock *file* can be deleted or replaced under a writer (a second writer then creates a
new file and locks that one); the directory cannot be swapped without moving the whole
store, and ``verify()`` notices even that: it compares the directory at the store's path
with the one locked, before every commit. Readers never take the lock; they only probe
it (``writer_active``) to tell a live ingest from one whose process died.

A local ``flock`` does not reach other machines: a store on an object store is locked in
its catalog instead. With a PostgreSQL catalog that is a session advisory lock (every
machine sharing the store asks the same server; the server drops it when the writer's
connection dies, so a killed writer never leaves it held); with an SQLite catalog (one
machine), a ``flock`` on the catalog file. A store on a network file system without
flock is not protected (docs/reliability.md, Limits).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from pathlib import Path

from .errors import ReadOnlyError, StoreLockedError, first_line


def on_read_only_mount(path: Path) -> bool:
    """Whether ``path`` lies on a file system mounted read-only (nobody can write it)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def is_read_only(path: Path) -> bool:
    """Whether the store directory cannot be written: a read-only mount, or no permission."""
    return on_read_only_mount(path) or not os.access(path, os.W_OK)


def _open_dir(path: Path) -> int:
    """A descriptor to ``flock``: the store directory, or a file (an SQLite catalog's)."""
    return os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0))


def writer_active(path: Path) -> bool:
    """Whether another process holds the write lock of the store at ``path`` now."""
    try:
        fd = _open_dir(path)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


class _ReentrantLock:
    """Re-entrant within one handle: taken once (``_open``, then ``_try`` until it holds
    or ``wait_s`` passes), released when the outermost holder lets go (``_close``)."""

    poll_s = 0.05
    path: object  # what the messages name

    def __init__(self) -> None:
        self._handle = None  # the open descriptor / connection while the lock is held
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self, wait_s: float = 5.0) -> bool:
        """Take the lock, waiting briefly (a reader's probe holds it for microseconds).
        Returns True where this call took it (False: this handle held it already)."""
        if self._handle is not None:
            self._depth += 1
            return False
        handle = self._open()
        deadline = time.monotonic() + wait_s
        try:
            while not self._try(handle):
                if time.monotonic() > deadline:
                    raise StoreLockedError(self._busy_message())
                time.sleep(self.poll_s)
        except BaseException:
            self._close(handle, locked=False)
            raise
        self._handle, self._depth = handle, 1
        return True

    def release(self) -> None:
        if self._handle is None:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        handle, self._handle = self._handle, None
        self._close(handle, locked=True)

    def _not_held(self) -> StoreLockedError:
        return StoreLockedError(f"writing to {self.path} without its write lock (a bug in knnstore)")

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class WriteLock(_ReentrantLock):
    """The write lock of one store directory (or of the one file standing for a store
    elsewhere: ``CatalogLock``); re-entrant within one handle."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)

    def _open(self) -> int:
        if is_read_only(self.path):
            raise ReadOnlyError(
                f"{self.path} is read-only (a read-only mount, or no write permission): this "
                "command writes to the store; list, stats, sql, check and eval only read it"
            )
        return _open_dir(self.path)

    def _try(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _busy_message(self) -> str:
        return f"another process is writing to {self.path}; wait for it to finish and retry"

    def _close(self, fd: int, locked: bool) -> None:
        if locked:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def verify(self) -> None:
        """Refuse to go on unless this handle still holds the lock of the directory at the
        store's path (it was not moved away and replaced while we wrote)."""
        if self._handle is None:
            raise self._not_held()
        held = os.fstat(self._handle)
        try:
            here = os.stat(self.path)
        except OSError:
            here = None
        if here is None or (here.st_dev, here.st_ino) != (held.st_dev, held.st_ino):
            raise StoreLockedError(
                f"the directory at {self.path} was moved or replaced while this process wrote to "
                "it; stopped before committing anything more. Run `knnstore check` on both copies"
            )

    def active_elsewhere(self) -> bool:
        """Whether another process holds this lock now."""
        return writer_active(self.path)


def lock_key(name: str) -> int:
    """A PostgreSQL advisory lock key (signed 64-bit) for a store id."""
    digest = hashlib.sha256(f"knnstore.write:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class CatalogLock(_ReentrantLock):
    """The write lock of a store whose catalog is a PostgreSQL server: a session advisory
    lock held on one connection for as long as the lock is, keyed by the store id (so two
    stores sharing a server never block each other). Same interface as ``WriteLock``."""

    poll_s = 0.1

    def __init__(self, engine, store_id: str, shown: str) -> None:
        super().__init__()
        self.engine, self.key, self.path = engine, lock_key(store_id), shown

    def _open(self):
        from sqlalchemy.exc import SQLAlchemyError

        try:
            return self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except SQLAlchemyError as exc:
            raise StoreLockedError(f"cannot take the write lock of {self.path} in its catalog "
                                   f"({first_line(exc)}): check that the catalog's server is running") from None

    def _ask(self, conn, sql: str) -> bool:
        from sqlalchemy import text

        unsigned = self.key & 0xFFFFFFFFFFFFFFFF  # pg_locks shows a bigint key as two oids
        params = {"k": self.key, "hi": unsigned >> 32, "lo": unsigned & 0xFFFFFFFF}
        return bool(conn.execute(text(sql), params).scalar())

    def _try(self, conn) -> bool:
        return self._ask(conn, "SELECT pg_try_advisory_lock(:k)")

    def _busy_message(self) -> str:
        return (f"another process (maybe on another machine) is writing to {self.path}; wait for it "
                "to finish and retry")

    def _close(self, conn, locked: bool) -> None:
        try:
            if locked:
                self._ask(conn, "SELECT pg_advisory_unlock(:k)")
        except Exception:  # the connection is gone: the server released the lock with it
            pass
        finally:
            conn.close()

    def verify(self) -> None:
        """Refuse to go on unless this handle's connection, and so its lock, is alive (the
        server drops a session's locks with the session)."""
        if self._handle is None:
            raise self._not_held()
        try:
            held = self._ask(self._handle, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                           "AND pid = pg_backend_pid() AND granted AND "
                                           "classid::bigint = :hi AND objid::bigint = :lo AND objsubid = 1")
        except Exception as exc:
            raise StoreLockedError(f"lost the connection to the catalog holding the write lock of {self.path} "
                                   f"({first_line(exc)}); stopped before committing anything more. "
                                   "`knnstore resume-corpus` finishes the work once it is back") from None
        if not held:
            raise StoreLockedError(f"the write lock of {self.path} was released while this process wrote "
                                   "to it; stopped before committing anything more")

    def active_elsewhere(self) -> bool:
        if self._handle is not None:
            return False
        try:
            conn = self._open()
        except StoreLockedError:
            return False
        with conn:
            if self._ask(conn, "SELECT pg_try_advisory_lock_shared(:k)"):
                self._ask(conn, "SELECT pg_advisory_unlock_shared(:k)")
                return False
            return True
