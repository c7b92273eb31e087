"""The store handle: the parts of one open store (location, catalog engine, table, identity,
key projection, write lock, the model once loaded) and what every operation reads through
them: the consistent snapshot of catalog and table (``read_snapshot``), the corpora it
shows, documents, the write lock, the SQL views.

The operations (``writer``, ``check``, ``removal``, ``pruning``, ``compaction``) take a
``StoreHandle``, pass it on and call one another directly; ``store.Store``, the facade users
get, is a handle with those operations as methods. Nothing here writes pairs: the few
writes a handle makes are the catalog's and table's own bookkeeping under the write lock
(binding a store made before ids, recording the key projection, following a compaction).
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
from sqlalchemy.orm import Session

from . import catalog
from .catalog import FAILED, INGESTING, READY
from .config import PAIRS_TABLE
from .devices import resolve_device
from .errors import (
    CorpusNotFoundError,
    InputError,
    KnnstoreError,
    ModelMismatchError,
    StoreChangedError,
    StoreDamagedError,
    StoreLockedError,
)
from .layout import StoreParts, bind_legacy, open_named_table
from .projection import KeyProjection
from .results import CorpusInfo, DocumentRef
from .schema import row_bytes
from .vectors import PairsTable

if TYPE_CHECKING:
    import torch

    from .encoder import Encoder
    from .sql import SQLLimits, SQLSession, Views

MAX_NAME_CHARS = 256


class StoreHandle:
    """One open store: its parts and its reader snapshot (``refresh`` moves it on)."""

    def __init__(self, parts: StoreParts, encoder: Encoder | None = None, *,
                 device: str = "auto", compute_dtype: str = "auto") -> None:
        self.location = parts.place  # a local directory or an object-store prefix
        self.catalog_url, self.engine = parts.catalog_url, parts.engine
        self.identity, self.table = parts.identity, parts.table
        self.store_id = parts.store_id  # None: a store made before ids, not bound yet
        self.own_catalog = parts.own_catalog  # the SQLite file inside the store (bindable when legacy)
        self.projection = parts.projection  # reduced keys (``knnstore.projection``); None: the model's
        self._encoder = encoder
        self._rows: list[catalog.Corpus] = []  # the catalog's corpora in this snapshot
        self._visible: frozenset[int] = frozenset()  # ready corpora in this snapshot
        self._lock = parts.write_lock()
        self._device = device  # where the model runs, and the exact search (resolved on first use)
        self.compute_dtype = compute_dtype  # the model's float type there ("auto": devices.py)
        self.refresh()

    @property
    def device(self) -> "torch.device":
        """The torch device of the model and the exact search, resolved on first use (a
        store opened to be listed or queried with SQL never imports torch)."""
        if isinstance(self._device, str):
            self._device = resolve_device(self._device)
        return self._device

    @property
    def path(self) -> "Path | str":
        """The store's directory (a Path); for a store on an object store, its URI (a str)."""
        return self.location.uri if self.location.remote else self.location.path

    @property
    def bound(self) -> bool:
        """Whether catalog and table carry this store's id (checked when the store opened)."""
        return self.store_id is not None

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "StoreHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def use_encoder(self, encoder: Encoder) -> None:
        """Use an already loaded model, after checking it is the store's."""
        theirs = encoder.identity(self.identity.dtype)
        diffs = self.identity.differences(theirs)
        if diffs:
            raise ModelMismatchError(
                f"{self.path} was built with model {self.identity.model} (dim {self.identity.dim}, "
                f"layer {self.identity.key_layer} {self.identity.key_site}); {encoder.name} differs in "
                f"{'; '.join(diffs)}. Open the store with its own model"
            )
        self._encoder = encoder

    @property
    def encoder(self) -> Encoder:
        """The store's model, loaded on first use (on the store handle's device)."""
        if self._encoder is None:
            self.use_encoder(self.load_encoder(self.identity.model))
        return self._encoder

    @property
    def encoder_loaded(self) -> bool:
        return self._encoder is not None

    def load_encoder(self, model: str) -> Encoder:
        """Load ``model`` at this store's key site, on its device and compute dtype."""
        from .encoder import Encoder

        return Encoder.load(model, key_layer=self.identity.key_layer, key_site=self.identity.key_site,
                            device=self.device, compute_dtype=self.compute_dtype)

    def refresh(self) -> None:
        """Move this handle to the latest committed state of the store (``read_snapshot``)."""
        self.read_snapshot()

    def read_snapshot(self, read: Callable[[Session], object] | None = None):
        """Move this handle to one consistent moment of catalog and table, and return what
        ``read(session)`` reads of the catalog at that moment.

        Catalog, then table, then catalog again (in one read transaction, where ``read``
        runs too), repeated until the corpora's statuses did not change across the table's
        snapshot: then every corpus ready in the catalog was ready before the table
        snapshot (all its pairs are in it) and not yet being removed after it (none gone).
        Writers change statuses a few times per corpus, so this settles at once.
        """
        delay = 0.001
        for _ in range(200):
            before = catalog.corpus_states(self.engine)
            if not self._follow_table():
                continue  # the catalog switched tables while this looked: read it again
            with catalog.snapshot_session(self.engine) as s:
                rows = catalog.corpora(s)
                result = read(s) if read is not None else None
            if {c.id: c.status for c in rows} == before:
                self._rows = rows
                self._visible = frozenset(c.id for c in rows if c.status == READY)
                return result
            time.sleep(delay)
            delay = min(0.05, delay * 2)
        raise StoreLockedError(f"{self.path} changed too often to read a consistent state of it; retry")

    def _follow_table(self) -> bool:
        """Bring this handle to the latest version of the table the catalog names, re-opening
        it where a compaction (in any process) switched the store to a new one, so that a
        long-lived reader (a server, a SQL session, an eval) follows the store instead of
        reading a dropped table. False: the catalog switched again meanwhile (read again)."""
        named = catalog.named_table(self.engine) or PAIRS_TABLE
        try:
            if named != self.table.name:
                table, projection = open_named_table(self.location, catalog.store_config(self.engine))
                self._switch_table(table, projection)
            self.table.refresh()
        except StoreDamagedError:
            if (catalog.named_table(self.engine) or PAIRS_TABLE) != named:
                return False  # dropped by the compaction that replaced it: not damage
            raise
        return True

    def moved_on(self) -> bool:
        """Whether the store has changed past this handle's snapshot: the catalog names
        another table, or the table has a newer version (what a read that finds its files
        gone after a compaction, prune or purge checks before calling the store damaged)."""
        named = catalog.named_table(self.engine) or PAIRS_TABLE
        return named != self.table.name or self.table.latest_version() != self.table.version

    @contextmanager
    def following(self) -> Iterator[None]:
        """Around a read of this handle's snapshot: where it fails because the store moved
        on and removed the files it was reading (``moved_on``), a ``StoreChangedError``
        (retry: the store is fine) instead of a ``StoreDamagedError``."""
        try:
            yield
        except StoreDamagedError as exc:
            try:
                moved = self.moved_on()
            except KnnstoreError:
                moved = False
            if moved:
                raise StoreChangedError(f"{self.path} changed while it was read (a compaction, prune, purge or "
                                        "removal replaced the files being read): retry; the store is not "
                                        "damaged") from exc
            raise

    @property
    def searchable(self) -> bool:
        """Whether a search can find anything: a ready corpus holds pairs in this snapshot
        (ready corpora of documents too short for a pair hold none)."""
        return any(c.n_pairs for c in self._rows if c.id in self._visible)

    @property
    def visible_corpora(self) -> frozenset[int]:
        """Ids of the corpora readers see in this snapshot (the ready ones)."""
        return self._visible

    def writer_active(self) -> bool:
        """Whether a process (this one included) holds the store's write lock now."""
        return self._lock.held or self._lock.active_elsewhere()

    def _info(self, c: catalog.Corpus, writer_active: bool) -> CorpusInfo:
        status, error = c.status, None
        if status == INGESTING and not writer_active:
            status = FAILED  # its writer is gone: killed or crashed
        if status == FAILED:
            error = catalog.last_run_error(self.engine, c.id) or "interrupted"
        return CorpusInfo(
            id=c.id, name=c.name, status=status, source=c.source, documents=c.n_documents,
            tokens=c.n_tokens, pairs=c.n_pairs,
            bytes=c.n_pairs * row_bytes(self.identity.stored_dim, self.identity.dtype, self.identity.code_bytes),
            created_at=c.created_at, ready_at=c.ready_at, error=error,
            skipped=[list(x) for x in (c.spec or {}).get("skipped", [])],
        )

    def corpora(self) -> list[CorpusInfo]:
        """Every corpus of this handle's snapshot, in the order it was added, with its
        status and counts (``refresh`` moves the snapshot on)."""
        writer = self.writer_active()
        return [self._info(c, writer) for c in self._rows]

    def corpus(self, name: str) -> CorpusInfo:
        """One corpus of this handle's snapshot, by name (spaces around it ignored)."""
        name = normalise_name(name)
        row = next((c for c in self._rows if c.name == name), None)
        if row is None:
            known = ", ".join(c.name for c in self._rows) or "none"
            raise CorpusNotFoundError(f"no corpus named {name!r} in {self.path} (corpora: {known})")
        return self._info(row, self.writer_active())

    def documents(self, corpus: str) -> list[catalog.Document]:
        """The ready documents of a corpus, in source order."""
        return catalog.ready_documents(self.engine, self.corpus(corpus).id)

    def ready_documents(self) -> list[catalog.Document]:
        """Every ready document of the corpora this snapshot shows, corpus by corpus."""
        return [d for c in self._rows if c.id in self._visible for d in catalog.ready_documents(self.engine, c.id)]

    def content(self) -> dict:
        """What this snapshot holds, as a calibration records it: the ready corpora's ids
        and their pairs."""
        ready = [c for c in self._rows if c.id in self._visible]
        return {"corpora": sorted(c.id for c in ready), "pairs": sum(c.n_pairs for c in ready)}

    def document_tokens(self, document_id: int) -> np.ndarray:
        """A stored document's token ids by position, read back from its pairs (each pair
        gives its token and the next): int64 [positions]; -1 where no stored pair tells
        (the pairs there were pruned or forgotten)."""
        rows = self.table.columns(["position", "token", "next_token"], where=f"document_id = {int(document_id)}")
        pos = rows.column("position").to_numpy().astype(np.int64)
        out = np.full(int(pos.max()) + 2 if len(pos) else 0, -1, dtype=np.int64)
        if len(pos):
            out[pos + 1] = rows.column("next_token").to_numpy()
            out[pos] = rows.column("token").to_numpy()
        return out

    def document_refs(self, document_ids: Sequence[int]) -> dict[int, DocumentRef]:
        """Corpus name, source and title of documents, by id (unknown ids are left out)."""
        ids = sorted({int(d) for d in document_ids})
        if not ids:
            return {}
        return {r[0]: DocumentRef(*r) for r in catalog.document_sources(self.engine, ids)}

    def set_projection(self, projection: KeyProjection) -> None:
        """Record the store's key projection, fitted on its first corpus (the caller holds
        the write lock; the table is still empty). Catalog first, then the table's config; a
        crash between the two leaves an empty store whose projection is not fitted yet
        (``layout.check_projection``), fitted again by the next add."""
        if self.table.count() != 0 or self.projection is not None:
            raise InputError(f"{self.path} already has keys or a projection: a projection is fitted once")
        self.verify_lock()
        catalog.write_projection(self.engine, projection.to_bytes(), projection.sha256)
        self.table.set_key_projection(projection.sha256)
        self.table.use_codec(projection)
        self.projection = projection
        self.identity = dataclasses.replace(self.identity, key_projection_sha=projection.sha256)

    def use_table(self, table: PairsTable, projection: KeyProjection | None) -> None:
        """Read and write ``table`` from now on, its keys made by ``projection`` (after a
        compaction switched the catalog to it; the caller holds the write lock)."""
        self._switch_table(table, projection)
        self.refresh()

    def _switch_table(self, table: PairsTable, projection: KeyProjection | None) -> None:
        self.table, self.projection = table, projection
        table.use_codec(projection)
        self.identity = dataclasses.replace(
            self.identity, key_dim=None if projection is None else projection.key_dim,
            key_projection_sha=None if projection is None else projection.sha256,
            key_bits=None if projection is None else projection.bits,
            route_dim=None if projection is None else projection.route_dim)

    def sql_session(self, limits: "SQLLimits | None" = None) -> "SQLSession":
        """A read-only SQL session over the latest consistent snapshot (``sql_views``),
        each statement within ``limits`` (``sql.SQLLimits``; None: the defaults); close it
        when done (it is a context manager)."""
        from .sql import SQLSession

        return SQLSession(self.sql_views(), limits)

    def sql_views(self) -> "Views":
        """What the SQL views show, read at one moment (``read_snapshot``)."""
        from .sql import Views, read_catalog

        rows = self.read_snapshot(read_catalog)
        return Views(rows=rows, statuses={c.id: c.status for c in self.corpora()},
                     dataset=self.table.dataset(), visible=self.visible_corpora)

    @contextmanager
    def write_lock(self, wait_s: float = 5.0) -> Iterator[None]:
        """Hold the store's one-writer lock (re-entrant within one handle), on the latest
        state of the store: every write reads what it changes under the lock."""
        first = self._lock.acquire(wait_s)
        try:
            if first:
                self.table.check_complete(self.location)  # else a write would fail half way through
                if self.store_id is None and self.own_catalog:  # made before ids: bind it now
                    self.store_id = bind_legacy(self.location, self.engine, self.table)
                self.refresh()
            yield
        finally:
            self._lock.release()

    def verify_lock(self) -> None:
        """Before a commit: this handle still holds its write lock (``knnstore.lock``)."""
        self._lock.verify()

    @property
    def holds_lock(self) -> bool:
        """Whether this handle holds the store's write lock now."""
        return self._lock.held

    def calibration(self):
        """The newest adaptive-λ calibration (``adaptive.Calibration``), or None."""
        from .adaptive import Calibration  # torch: only where a calibration is read

        fit = catalog.newest_calibration_fit(self.engine)
        return Calibration.from_dict(fit) if fit is not None else None

    def newest_calibration(self) -> int | None:
        """The id of the newest calibration saved (by any process; None: none)."""
        return catalog.newest_calibration(self.engine)

    def calibrations(self) -> list:
        """Every adaptive-λ calibration (``adaptive.Calibration``), newest first."""
        from .adaptive import Calibration

        return [Calibration.from_dict(fit) for fit in catalog.calibration_fits(self.engine)]

    @property
    def catalog_rows(self) -> list[catalog.Corpus]:
        """The catalog's corpora in this snapshot, ready or not (``corpora`` describes them)."""
        return self._rows


def normalise_name(name: str) -> str:
    """A corpus name as every command reads it: spaces around it dropped; empty names,
    control characters and names over 256 characters refused."""
    name = str(name).strip()
    if not name:
        raise InputError("a corpus needs a non-empty name")
    if len(name) > MAX_NAME_CHARS:
        raise InputError(f"a corpus name has at most {MAX_NAME_CHARS} characters, got {len(name):,}")
    if any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in name):
        raise InputError(f"corpus name {name!r} holds control characters: use printable text")
    return name
