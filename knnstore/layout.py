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
from .config import CATALOG_FILE, FORMAT_VERSION, MARKER_FILE, PAIRS_TABLE, VECTORS_DIR, StoreIdentity, env
from .errors import (
    CatalogError,
    InputError,
    KnnstoreError,
    ReadOnlyError,
    StoreDamagedError,
    StoreExistsError,
    StoreMismatchError,
    StoreNotFoundError,
    StorageError,
    StoreVersionError,
    first_line,
)
from .location import Location
from .lock import CatalogLock, WriteLock, on_read_only_mount
from .projection import KeyProjection
from .schema import pairs_schema
from .vectors import PairsTable


@dataclass(frozen=True)
class Marker:
    """``knnstore.json``: the store's format version, where its catalog lives (None: the
    SQLite file inside the store) and its store id (None: a store made before ids)."""

    format_version: int
    catalog_url: str | None
    store_id: str | None

    @classmethod
    def read(cls, place: Location) -> "Marker":
        marker_path = place.child(MARKER_FILE)
        try:
            data = json.loads(place.read_text(MARKER_FILE))
        except (OSError, ValueError) as exc:
            if isinstance(exc, StorageError):
                raise
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
                f"{place} has store format {version}; this knnstore reads up to {FORMAT_VERSION}: "
                "upgrade knnstore"
            )
        if url is not None and (not isinstance(url, str) or not url.strip()):
            raise StoreDamagedError(f"{marker_path} is damaged: catalog_url must be a URL string or null, "
                                    f"got {type(url).__name__}; restore it from a backup")
        if store_id is not None and not isinstance(store_id, str):
            raise StoreDamagedError(f"{marker_path} is damaged: store_id must be a string, "
                                    f"got {type(store_id).__name__}; restore it from a backup")
        return cls(version, url, store_id)

    def write(self, place: Location) -> None:
        """Atomically (``Location.write_text``): a store exists once its marker does."""
        place.write_text(MARKER_FILE, json.dumps(dataclasses.asdict(self), indent=2) + "\n")


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


def catalog_failure(exc: Exception, path: "Location | Path", url, action: str) -> KnnstoreError:
    """The one-line error for a catalog that cannot be opened or read."""
    detail = first_line(exc)
    parsed = catalog.parse_url(url)
    if parsed.password:
        detail = detail.replace(str(parsed.password), "***")
    if parsed.get_backend_name() == "sqlite":
        return StoreDamagedError(f"the catalog of {path} ({catalog.mask(url)}) is missing or damaged ({detail}): "
                                 f"restore it from a backup; `knnstore check {path}` lists what is left")
    return CatalogError(f"cannot {action} the catalog of {path} at {catalog.mask(url)} ({detail}): "
                        "check that the database server is running and the URL is right (a store never "
                        "records the catalog's password: give it in PGPASSWORD or KNNSTORE_CATALOG_URL)")


def make_dirs(path: Path) -> Path | None:
    """Create a local store directory (and missing parents); returns the top-most directory
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


def read_store_config(engine, path: Location, url, read_only: bool) -> catalog.StoreConfig:
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


def check_binding(path: Location, url, marker_id: str | None, catalog_id: str | None,
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


def check_new_store(given: "str | os.PathLike | Location", catalog_url: str | None = None,
                    storage_options: dict[str, str] | None = None) -> Location:
    """Where a new store can be made (absent, or an empty directory or prefix). A store on
    an object store needs a catalog outside it (``catalog_url``)."""
    place = Location.of(given, storage_options)
    if place.remote and catalog_url is None:
        raise InputError(f"{place} is on an object store, where the default catalog (an SQLite file "
                         "inside the store) cannot live: give --catalog-url (PostgreSQL, e.g. "
                         "postgresql+psycopg://user@host/db, to share the store between machines)")
    if place.file_exists(MARKER_FILE):
        raise StoreExistsError(f"{place} is already a knnstore store; open it, or pick another path")
    if not place.remote and place.path.exists() and not place.path.is_dir():
        raise StoreExistsError(f"{place} exists and is not an empty directory; pick another path")
    if not place.is_empty():
        raise StoreExistsError(f"{place} exists and is not an empty {'prefix' if place.remote else 'directory'}; "
                               "pick another path")
    return place


@dataclass
class StoreParts:
    """An opened store's parts, bound to each other (``open_parts``)."""

    place: Location
    catalog_url: str  # as shown (a password masked only when printed: ``catalog.mask``)
    engine: object
    identity: StoreIdentity
    table: PairsTable
    store_id: str | None  # None: made before ids, not bound yet
    own_catalog: bool  # the SQLite file inside the store (a legacy store is bindable)
    projection: KeyProjection | None = None  # reduced keys, once fitted (``projection``)

    def write_lock(self) -> "WriteLock | CatalogLock":
        """The store's one-writer lock (``knnstore.lock``): a ``flock`` on a local store's
        directory; for a store on an object store, its catalog's (a PostgreSQL advisory
        lock, or a ``flock`` on an SQLite catalog's file: one machine)."""
        if not self.place.remote:
            return WriteLock(self.place.path)
        if self.engine.dialect.name == "postgresql":
            return CatalogLock(self.engine, self.store_id or self.place.uri, str(self.place))
        return WriteLock(catalog.sqlite_file(self.engine.url))


def open_parts(given: "str | os.PathLike | Location", storage_options: dict[str, str] | None = None,
               catalog_url: str | None = None) -> StoreParts:
    """Open a store's catalog (upgraded if older; ``catalog_url``, else
    ``KNNSTORE_CATALOG_URL``, overrides the marker's, which never has a password) and
    table, after checking that they belong together (``check_binding``)."""
    place = Location.of(given, storage_options)
    if not place.file_exists(MARKER_FILE):
        if not place.exists():
            raise StoreNotFoundError(f"no store at {place}: create one with `knnstore init {place}`")
        raise StoreNotFoundError(f"{place} is not a knnstore store (it has no {MARKER_FILE})")
    marker = Marker.read(place)
    given_url = catalog_url or env("catalog_url", str, None) or marker.catalog_url
    if given_url is None and place.remote:
        raise StoreDamagedError(f"{place} records no catalog URL, and a store on an object store cannot hold "
                                "its own: set KNNSTORE_CATALOG_URL to its catalog")
    url = given_url or catalog.sqlite_url(place.path / CATALOG_FILE)  # a URL object: never re-parsed
    read_only = not place.remote and on_read_only_mount(place.path)
    engine = catalog.make_engine(url, read_only=read_only and given_url is None)
    try:
        row = read_store_config(engine, place, url, read_only)
        for _ in range(10):
            try:
                table = PairsTable.open(place.child(VECTORS_DIR), table_name(row))
                break
            except StoreDamagedError:
                if catalog.named_table(engine) == row.pairs_table:
                    raise
                row = read_store_config(engine, place, url, read_only)  # a compaction switched tables meanwhile
        identity = StoreIdentity(**{f.name: getattr(row, f.name) for f in dataclasses.fields(StoreIdentity)})
        check_binding(place, url, marker.store_id, row.store_id, table.store_id())
        projection = use_projection(place, row, table)
    except BaseException:
        engine.dispose()
        raise
    shown = url if isinstance(url, str) else url.render_as_string()
    return StoreParts(place, shown, engine, identity, table, row.store_id, own_catalog=given_url is None,
                      projection=projection)


def table_name(row: catalog.StoreConfig) -> str:
    """The name of the pairs table the catalog's row names (a compaction renames it)."""
    return row.pairs_table or PAIRS_TABLE


def open_named_table(place: Location, row: catalog.StoreConfig) -> tuple[PairsTable, KeyProjection | None]:
    """The table the catalog's row names now and its projection, checked against the row:
    what a reader re-opens when a compaction (in any process) switched the store to a new
    table (``Store.refresh``)."""
    table = PairsTable.open(place.child(VECTORS_DIR), table_name(row))
    return table, use_projection(place, row, table)


def use_projection(place: Location, row: catalog.StoreConfig, table: PairsTable) -> KeyProjection | None:
    """``check_projection``, then read the table's keys with it."""
    projection = check_projection(place, row, table)
    table.use_codec(projection)
    return projection


def check_projection(place: Location, row: catalog.StoreConfig, table: PairsTable) -> KeyProjection | None:
    """The store's key projection, after checking that the catalog's bytes, the catalog's
    sha256 and the table's (``knnstore.key_projection``) are one projection, and that the
    table's keys have the dimension it makes: a table whose keys another projection made
    would answer every query with wrong neighbours."""
    projection = None if row.key_projection is None else KeyProjection.from_bytes(row.key_projection)
    mine, theirs = None if projection is None else projection.sha256, table.key_projection()
    if row.key_dim is not None and table.count() == 0 and (mine is None or mine != theirs):
        return None  # not fitted yet, or a fit cut short before the first key was stored: fitted again
    if mine != row.key_projection_sha or mine != theirs:
        shown = lambda v: v[:12] if v else "none"  # noqa: E731
        raise StoreMismatchError(
            f"the key projection of {place} does not match: catalog {shown(row.key_projection_sha)} (its bytes "
            f"{shown(mine)}), vector table {shown(theirs)}: the table's keys were not made with "
            "the catalog's projection; restore the store from a backup; nothing was read or changed")
    want = row.route_dim or row.key_dim or row.dim
    if table.dim != want or table.quantised != (row.key_bits is not None):
        held = f"{'quantised ' if table.quantised else ''}keys of dimension {table.dim}"
        said = f"{'quantised ' if row.key_bits else ''}keys of dimension {want}"
        raise StoreMismatchError(f"the vector table of {place} holds {held}, the catalog says {said}: restore "
                                 "the store from a backup; nothing was read or changed")
    if projection is not None and (projection.bits, projection.route_dim) != (row.key_bits, row.route_dim):
        raise StoreMismatchError(f"the key projection of {place} quantises keys differently from what its catalog "
                                 "records: restore the store from a backup; nothing was read or changed")
    return projection


def create_store(place: Location, identity: StoreIdentity, vocab: list[dict], catalog_url: str | None) -> None:
    """Make a store at ``place`` (absent or empty, ``check_new_store``): its catalog (at
    ``catalog_url``, default the SQLite file inside it), its table and, last, its marker,
    all bound by a new store id. Nothing is left behind if any step fails."""
    made = None if place.remote else make_dirs(place.path)
    url = catalog_url or catalog.sqlite_url(place.path / CATALOG_FILE)
    store_id = str(uuid.uuid4())
    engine, made_catalog = None, False
    try:
        engine = catalog.make_engine(url, create=True)
        try:
            if catalog.has_catalog(engine):
                raise StoreExistsError(
                    f"the catalog at {catalog.mask(url)} already holds a store; use an empty database")
            made_catalog = True
            catalog.upgrade(engine)
        except SQLAlchemyError as exc:
            raise catalog_failure(exc, place, url, "create") from None
        fields = {f.name: getattr(identity, f.name) for f in dataclasses.fields(identity) if f.name != "created_at"}
        catalog.write_identity(engine, store_id, fields, vocab)
        PairsTable.create(place.child(VECTORS_DIR), identity.stored_dim, identity.dtype, store_id=store_id,
                          schema=pairs_schema(identity.stored_dim, identity.dtype, code_bytes=identity.code_bytes))
        marker_url = None if catalog_url is None else catalog.without_password(catalog_url)
        Marker(FORMAT_VERSION, marker_url, store_id).write(place)  # last: the store exists now
    except BaseException:
        if engine is not None:
            if made_catalog and catalog_url is not None:
                try:
                    catalog.downgrade(engine, "base")  # a server catalog this init filled: empty again
                except Exception:  # unreachable now: the error raised below says why init failed
                    pass
            engine.dispose()
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        elif place.remote:
            place.remove_all()
        else:
            for child in place.path.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    engine.dispose()


def bind_legacy(place: Location, engine, table: PairsTable) -> str:
    """Give a store made before store ids a new id, in table, catalog and marker (in that
    order: the marker last, as at creation). The caller holds the write lock and has
    checked that the catalog is the SQLite file inside the store (an outside catalog is
    never bound by guess). Returns the id."""
    store_id = str(uuid.uuid4())
    table.set_store_id(store_id)
    catalog.set_store_id(engine, store_id)
    marker = Marker.read(place)
    Marker(marker.format_version, marker.catalog_url, store_id).write(place)
    return store_id
