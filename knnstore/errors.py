"""One exception hierarchy for everything a user can get wrong.

The CLI catches :class:`KnnstoreError` once, prints its message on one line and exits
non-zero; any other exception is a bug and keeps its traceback. Every message says what
happened, to what, and what to do about it.
"""

from __future__ import annotations


class KnnstoreError(Exception):
    """Base class of every error knnstore raises on purpose."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else self.__class__.__name__


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (a database driver's own, where SQLAlchemy
    wraps one), or its class name: the detail a one-line error quotes."""
    text = str(getattr(exc, "orig", exc) or "").strip()
    return (text.splitlines() or [type(exc).__name__])[0]


class StoreNotFoundError(KnnstoreError, FileNotFoundError):
    """The path is missing or is not a knnstore store."""


class StoreExistsError(KnnstoreError, FileExistsError):
    """`init` was asked to create a store where one (or other files) already is."""


class StoreVersionError(KnnstoreError):
    """The store was written by a newer knnstore (format or catalog revision)."""


class StoreLockedError(KnnstoreError):
    """Another process is writing to the store."""


class ModelLoadError(KnnstoreError):
    """A model or tokenizer could not be loaded (unknown id, offline, corrupt files)."""


class ModelRunError(KnnstoreError):
    """The model itself failed while encoding (bad weights, out of memory on a device)."""


class ModelMismatchError(KnnstoreError):
    """The model given differs from the one the store was built with."""


class UnsupportedModelError(KnnstoreError):
    """The key site (decoder layers, feed-forward block) cannot be found in this model."""


class CorpusExistsError(KnnstoreError, ValueError):
    """A corpus of that name is already in the store."""


class CorpusNotFoundError(KnnstoreError, KeyError):
    """No corpus of that name is in the store."""


class InputError(KnnstoreError, ValueError):
    """Bad input: missing path, empty corpus, binary or non-UTF-8 file, malformed record."""


class ReadOnlyError(KnnstoreError):
    """A write was attempted through a read-only interface."""


class DiskFullError(KnnstoreError, OSError):
    """The disk holding the store has no room for what was asked."""


class StoreDamagedError(KnnstoreError):
    """A part of the store (marker, catalog, vector table) is missing or unreadable."""


class StoreChangedError(KnnstoreError):
    """A read lost its snapshot to a change of the store (a compaction, prune, purge or
    removal replaced the files it read): retry it; nothing is damaged."""


class StoreMismatchError(KnnstoreError):
    """The catalog and the vector table belong to different stores (their store ids differ)."""


class CatalogError(KnnstoreError):
    """The catalog URL is malformed, its driver is missing, or its server cannot be reached."""


class StorageError(KnnstoreError, OSError):
    """The object store holding the store cannot be reached, or refused a request."""
