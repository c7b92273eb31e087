"""Result files a user names (``sql --output``, ``eval --sweep-out``): never inside a
store, and written whole or not at all (a temporary file beside the target, renamed over
it once complete; removed on any error)."""

from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from .config import MARKER_FILE
from .errors import DiskFullError, InputError


def check_output_path(path: str | os.PathLike) -> Path:
    """The resolved target of an output file (symlinks followed), after refusing one that
    lies inside a knnstore store, is a directory, or sits in a directory that is missing."""
    given = Path(path)
    target = given.resolve()
    for directory in (target, *target.parents):
        if (directory / MARKER_FILE).is_file():
            raise InputError(f"{path} is inside the knnstore store {directory}: write results outside "
                             "any store (an output there could overwrite the store's own files)")
    if target.is_dir():
        raise InputError(f"{path} is a directory: give a file name to write to")
    if target.exists() and not target.is_file():  # a device or a pipe would be replaced by a file
        raise InputError(f"{path} is not a regular file (a device, pipe or socket): give a file name to write to")
    if not target.parent.is_dir():
        raise InputError(f"cannot write {path}: the directory {given.parent} does not exist; create it first")
    return target


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: it appears only once complete."""
    target = check_output_path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise InputError(f"cannot write {path} ({exc.strerror or exc}): pick a directory you can write") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise DiskFullError(f"the disk is full: nothing was written to {path}; free some space and retry") from None
        if isinstance(exc, OSError):
            raise InputError(f"cannot write {path} ({exc.strerror or exc}); nothing was written") from None
        raise
