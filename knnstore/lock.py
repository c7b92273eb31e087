"""The one-writer rule: an exclusive ``flock`` on the store directory itself.

A lock *file* can be deleted or replaced under a writer (a second writer then creates a
new file and locks that one); the directory cannot be swapped without moving the whole
store, and ``verify()`` notices even that: it compares the directory at the store's path
with the one locked, before every commit. Readers never take the lock; they only probe
it (``writer_active``) to tell a live ingest from one whose process died.

A local ``flock``: it does not protect a store on object storage or on a network file
system without flock (docs/reliability.md, Limits).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from .errors import ReadOnlyError, StoreLockedError


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
    return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


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


class WriteLock:
    """The write lock of one store directory; re-entrant within one handle."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait_s: float = 5.0) -> bool:
        """Take the lock, waiting briefly (a reader's probe holds it for microseconds).
        Returns True where this call took it (False: this handle held it already)."""
        if self._fd is not None:
            self._depth += 1
            return False
        if is_read_only(self.path):
            raise ReadOnlyError(
                f"{self.path} is read-only (a read-only mount, or no write permission): this "
                "command writes to the store; list, stats, sql, check and eval only read it"
            )
        fd = _open_dir(self.path)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise StoreLockedError(
                        f"another process is writing to {self.path}; wait for it to finish and retry"
                    ) from None
                time.sleep(0.05)
        self._fd, self._depth = fd, 1
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        fd, self._fd = self._fd, None
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def verify(self) -> None:
        """Refuse to go on unless this handle still holds the lock of the directory at the
        store's path (it was not moved away and replaced while we wrote)."""
        if self._fd is None:
            raise StoreLockedError(f"writing to {self.path} without its write lock (a bug in knnstore)")
        held = os.fstat(self._fd)
        try:
            here = os.stat(self.path)
        except OSError:
            here = None
        if here is None or (here.st_dev, here.st_ino) != (held.st_dev, held.st_ino):
            raise StoreLockedError(
                f"the directory at {self.path} was moved or replaced while this process wrote to "
                "it; stopped before committing anything more. Run `knnstore check` on both copies"
            )

    def __enter__(self) -> "WriteLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
