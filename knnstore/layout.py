"""The store directory: its marker file, the paths and URLs it is reached by, and the
binding of its catalog to its vector table (docs/storage.md).

A store is a directory holding ``knnstore.json`` (the marker: format version, where the
catalog lives, the store id), ``catalog.db`` (unless the catalog is a server) and
``vectors/``. The same store id in marker, catalog and table binds them; a store made
before ids is bound at its first write (``bind_legacy``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from . import catalog
from .config import CATALOG_FILE, FORMAT_VERSION, MARKER_FILE, VECTORS_DIR, StoreIdentity, env
from .errors import (
    CatalogError,
    InputError,
    KnnstoreError,
    ReadOnlyError,
    StoreDamagedError,
    StoreExistsError,
    StoreMismatchError,
    StoreNotFoundError,
    StoreVersionError,
)
from .lock import on_read_only_mount
from .vectors import PairsTable


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
                        "check that the database server is running and the URL is right (a store never "
                        "records the catalog's password: give it in PGPASSWORD or KNNSTORE_CATALOG_URL)")


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
    ``bind_legacy``); anything else must agree exactly.
    """
    ids = {"marker": marker_id, "catalog": catalog_id, "vector table": table_id}
    if len(set(ids.values())) == 1:
        return
    shown = ", ".join(f"{part} {value or 'none'}" for part, value in ids.items())
    raise StoreMismatchError(
        f"the catalog at {catalog.mask(url)} does not belong to the store at {path} (store ids: {shown}): "
        "check KNNSTORE_CATALOG_URL and the store's catalog_url; nothing was read or changed"
    )


def check_new_store(path: str | os.PathLike) -> Path:
    """A path a new store can be made at (absent, or an empty directory), as a Path."""
    path = usable_path(path)
    if (path / MARKER_FILE).exists():
        raise StoreExistsError(f"{path} is already a knnstore store; open it, or pick another path")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise StoreExistsError(f"{path} exists and is not an empty directory; pick another path")
    return path


@dataclass
class StoreParts:
    """An opened store's parts, bound to each other (``open_parts``)."""

    path: Path
    catalog_url: str  # as shown (a password masked only when printed: ``catalog.mask``)
    engine: object
    identity: StoreIdentity
    table: PairsTable
    store_id: str | None  # None: made before ids, not bound yet
    own_catalog: bool  # the SQLite file inside the store (a legacy store is bindable)


def open_parts(path: str | os.PathLike) -> StoreParts:
    """Open a store's catalog (upgraded if older; ``KNNSTORE_CATALOG_URL`` overrides the
    marker's) and table, after checking that they belong together (``check_binding``)."""
    path = usable_path(path)
    if not path.exists():
        raise StoreNotFoundError(f"no store at {path}: create one with `knnstore init {path}`")
    if not path.is_dir() or not (path / MARKER_FILE).exists():
        raise StoreNotFoundError(f"{path} is not a knnstore store (it has no {MARKER_FILE})")
    marker = Marker.read(path)
    given = env("catalog_url", str, None) or marker.catalog_url
    url = given or catalog.sqlite_url(path / CATALOG_FILE)  # a URL object: never re-parsed
    read_only = on_read_only_mount(path)
    engine = catalog.make_engine(url, read_only=read_only and given is None)
    try:
        row = read_store_config(engine, path, url, read_only)
        identity = StoreIdentity(**{f.name: getattr(row, f.name) for f in dataclasses.fields(StoreIdentity)})
        table = PairsTable.open(path / VECTORS_DIR)
        check_binding(path, url, marker.store_id, row.store_id, table.store_id())
    except BaseException:
        engine.dispose()
        raise
    shown = url if isinstance(url, str) else url.render_as_string()
    return StoreParts(path, shown, engine, identity, table, row.store_id, own_catalog=given is None)


def create_store(path: Path, identity: StoreIdentity, vocab: list[dict], catalog_url: str | None) -> None:
    """Make a store at ``path`` (absent or an empty directory): its catalog (at
    ``catalog_url``, default the SQLite file inside it), its table and, last, its marker,
    all bound by a new store id. Nothing is left behind if any step fails."""
    made = make_dirs(path)
    url = catalog_url or catalog.sqlite_url(path / CATALOG_FILE)
    store_id = str(uuid.uuid4())
    engine = None
    try:
        engine = catalog.make_engine(url, create=True)
        try:
            if catalog.has_catalog(engine):
                raise StoreExistsError(
                    f"the catalog at {catalog.mask(url)} already holds a store; use an empty database")
            catalog.upgrade(engine)
        except SQLAlchemyError as exc:
            raise catalog_failure(exc, path, url, "create") from None
        fields = {f.name: getattr(identity, f.name) for f in dataclasses.fields(identity) if f.name != "created_at"}
        catalog.write_identity(engine, store_id, fields, vocab)
        PairsTable.create(path / VECTORS_DIR, identity.dim, identity.dtype, store_id=store_id)
        marker_url = None if catalog_url is None else catalog.without_password(catalog_url)
        Marker(FORMAT_VERSION, marker_url, store_id).write(path)  # last: the store exists now
    except BaseException:
        if engine is not None:
            engine.dispose()
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        else:
            for child in path.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    engine.dispose()


def bind_legacy(path: Path, engine, table: PairsTable) -> str:
    """Give a store made before store ids a new id, in table, catalog and marker (in that
    order: the marker last, as at creation). The caller holds the write lock and has
    checked that the catalog is the SQLite file inside the store (an outside catalog is
    never bound by guess). Returns the id."""
    store_id = str(uuid.uuid4())
    table.set_store_id(store_id)
    catalog.set_store_id(engine, store_id)
    marker = Marker.read(path)
    Marker(marker.format_version, marker.catalog_url, store_id).write(path)
    return store_id
