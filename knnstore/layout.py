"""The store directory: its marker file, the paths and URLs it is reached by, and the
binding of its catalog to its vector table (docs/storage.md).

A store is a directory holding ``knnstore.json`` (the marker: format version, where the
catalog lives, the store id), ``catalog.db`` (unless the catalog is a server) and
``vectors/``. The same store id in marker, catalog and table binds them; a store made
before ids is bound at its first write (``Store``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from . import catalog
from .config import FORMAT_VERSION, MARKER_FILE
from .errors import (
    CatalogError,
    InputError,
    KnnstoreError,
    ReadOnlyError,
    StoreDamagedError,
    StoreMismatchError,
    StoreVersionError,
)


@dataclass(frozen=True)
class Marker:
    """``knnstore.json``: the store's format version, where its catalog lives (None: the
    SQLite file inside the store) and its store id (None: a store made before ids)."""

    format_version: int
    catalog_url: str | None
    store_id: str | None

    @classmethod
    def read(cls, path: Path) -> "Marker":
        marker_path = path / MARKER_FILE
        try:
            data = json.loads(marker_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreDamagedError(f"{marker_path} is damaged ({exc.__class__.__name__}): it is not "
                                    "a knnstore marker; restore it from a backup") from None
        if not isinstance(data, dict):
            raise StoreDamagedError(f"{marker_path} is damaged: it holds no JSON object; restore it from a backup")
        version, url, store_id = data.get("format_version"), data.get("catalog_url"), data.get("store_id")
        if type(version) is not int or version < 1:
            raise StoreDamagedError(f"{marker_path} is damaged: format_version must be a whole number "
                                    f"from 1, got {version!r}; restore it from a backup")
        if version > FORMAT_VERSION:
            raise StoreVersionError(
                f"{path} has store format {version}; this knnstore reads up to {FORMAT_VERSION}: "
                "upgrade knnstore"
            )
        if url is not None and (not isinstance(url, str) or not url.strip()):
            raise StoreDamagedError(f"{marker_path} is damaged: catalog_url must be a URL string or null, "
                                    f"got {type(url).__name__}; restore it from a backup")
        if store_id is not None and not isinstance(store_id, str):
            raise StoreDamagedError(f"{marker_path} is damaged: store_id must be a string, "
                                    f"got {type(store_id).__name__}; restore it from a backup")
        return cls(version, url, store_id)

    def write(self, path: Path) -> None:
        """Atomically (temp file + rename): a store exists once its marker does."""
        tmp = path / (MARKER_FILE + ".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        tmp.replace(path / MARKER_FILE)


def resolve_catalog_url(url: str | None) -> str | None:
    """A catalog URL as the marker keeps it: a relative SQLite file made absolute, once, at
    init (later commands may run from any directory)."""
    if url is None:
        return None
    parsed = catalog.parse_url(url)
    path = catalog.sqlite_file(parsed)
    if path is None:
        return url
    return parsed.set(database=str(path.resolve())).render_as_string(hide_password=False)


def catalog_failure(exc: Exception, path: Path, url, action: str) -> KnnstoreError:
    """The one-line error for a catalog that cannot be opened or read."""
    detail = str(getattr(exc, "orig", exc) or exc.__class__.__name__).strip().splitlines()[0]
    parsed = catalog.parse_url(url)
    if parsed.password:
        detail = detail.replace(str(parsed.password), "***")
    if parsed.get_backend_name() == "sqlite":
        return StoreDamagedError(f"the catalog of {path} ({catalog.mask(url)}) is missing or damaged ({detail}): "
                                 f"restore it from a backup; `knnstore check {path}` lists what is left")
    return CatalogError(f"cannot {action} the catalog of {path} at {catalog.mask(url)} ({detail}): "
                        "check that the database server is running and the URL is right")


def usable_path(path: str | os.PathLike) -> Path:
    """A store path, refused if LanceDB would read it as a URL: it takes a '?' for the start
    of a query string and would write the table somewhere else (the catalog, opened by
    path, has no such limit)."""
    path = Path(path)
    if "?" in str(path.absolute()):
        raise InputError(f"{path}: a store path cannot contain '?' (LanceDB reads it as the start of a "
                         "URL query and would write elsewhere); pick a path without it")
    return path


def make_dirs(path: Path) -> Path | None:
    """Create the store directory (and missing parents); returns the top-most directory
    made, for a failed init to remove, or None if ``path`` was already there."""
    top = None
    for parent in reversed([path, *path.parents]):
        if not parent.exists():
            top = parent
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise InputError(f"cannot create a store at {path} ({exc.strerror or exc}): pick a path in a "
                         "directory you can write") from None
    return top


def read_store_config(engine, path: Path, url, read_only: bool) -> catalog.StoreConfig:
    """The catalog's identity row, after bringing an older catalog to this knnstore's schema."""
    try:
        if catalog.current_revision(engine) != catalog.head_revision():
            if read_only:
                raise ReadOnlyError(f"the catalog of {path} was written by an older knnstore and needs an "
                                    "upgrade, which needs write access: open it once where it is writable")
            catalog.upgrade(engine)
        with Session(engine, expire_on_commit=False) as s:
            row = s.get(catalog.StoreConfig, 1)
    except (OperationalError, DBAPIError) as exc:
        raise catalog_failure(exc, path, url, "open") from None
    if row is None:
        raise StoreDamagedError(f"the catalog of {path} ({catalog.mask(url)}) holds no store: restore it "
                                "from a backup, or unset KNNSTORE_CATALOG_URL if it points elsewhere")
    return row


def check_binding(path: Path, url, marker_id: str | None, catalog_id: str | None,
                   table_id: str | None) -> None:
    """Refuse a catalog and a table (and marker) that do not carry one store id.

    All three None is a store made before ids (bound at its next write, see
    ``Store._bind_legacy``); anything else must agree exactly.
    """
    ids = {"marker": marker_id, "catalog": catalog_id, "vector table": table_id}
    if len(set(ids.values())) == 1:
        return
    shown = ", ".join(f"{part} {value or 'none'}" for part, value in ids.items())
    raise StoreMismatchError(
        f"the catalog at {catalog.mask(url)} does not belong to the store at {path} (store ids: {shown}): "
        "check KNNSTORE_CATALOG_URL and the store's catalog_url; nothing was read or changed"
    )
