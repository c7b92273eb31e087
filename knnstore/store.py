"""Store: opens a store directory and ties the catalog, the pairs table and the model.

Example:
    >>> store = Store.create("wiki-store", model="smollm2-135m")          # doctest: +SKIP
    >>> store.add_corpus("wiki", ["valid.txt"],
    ...                  options=SourceOptions(split_on_heading=True))    # doctest: +SKIP
    >>> store.stats().pairs                                               # doctest: +SKIP
    241530
    >>> store.search(keys, k=16).next_tokens.shape                        # doctest: +SKIP
    (8, 16)

Consistency: a corpus is visible to readers (search, stats' pair counts, SQL) only once
the catalog marks it ready, which happens after its last pair is committed to LanceDB.
Pairs of corpora being ingested, failed or being removed stay in the table but are
filtered out. A store handle reads a consistent snapshot; ``refresh()`` moves it on.
"""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
from sqlalchemy.orm import Session

from . import catalog
from .catalog import FAILED, INGESTING, READY
from .config import (
    CATALOG_FILE,
    DEFAULT_MODEL,
    DTYPES,
    PAIRS_TABLE,
    IngestSettings,
    ProgressFn,
    SourceOptions,
    check_number,
)
from .devices import resolve_compute_dtype, resolve_device
from .distributed import ray_options
from .errors import (
    CorpusNotFoundError,
    InputError,
    KnnstoreError,
    ModelMismatchError,
    StoreChangedError,
    StoreDamagedError,
    StoreLockedError,
)
from .indexing import IndexPlan
from .layout import (
    StoreParts,
    bind_legacy,
    check_new_store,
    create_store,
    open_named_table,
    open_parts,
    resolve_catalog_url,
)
from .projection import KeyProjection
from .results import CorpusInfo, DocumentRef, StoreStats
from .schema import row_bytes
from .vectors import ExactSearch, Neighbours, PairsTable
from .writer import Writer, normalise_name

if TYPE_CHECKING:
    import torch

    from .encoder import Encoder
    from .sql import SQLLimits, SQLSession, Views


class Store:
    """A knnstore store: a directory with a SQL catalog and a LanceDB `pairs` table."""

    def __init__(self, parts: StoreParts, encoder: Encoder | None = None, *,
                 device: str = "auto", compute_dtype: str = "auto") -> None:
        self.location = parts.place  # a local directory or an object-store prefix
        self.catalog_url, self.engine = parts.catalog_url, parts.engine
        self.identity, self.table = parts.identity, parts.table
        self.store_id = parts.store_id  # None: a store made before ids, not bound yet
        self._own_catalog = parts.own_catalog  # the SQLite file inside the store (bindable when legacy)
        self.projection = parts.projection  # reduced keys (``knnstore.projection``); None: the model's
        self._encoder = encoder
        self._rows: list[catalog.Corpus] = []  # the catalog's corpora in this snapshot
        self._visible: frozenset[int] = frozenset()  # ready corpora in this snapshot
        self._lock = parts.write_lock()
        self._writer = Writer(self)
        self._device = device  # where the model runs, and the exact search (resolved on first use)
        self.compute_dtype = compute_dtype  # the model's float type there ("auto": devices.py)
        self._exact_search: ExactSearch | None = None
        self.refresh()

    @property
    def device(self) -> "torch.device":
        """The torch device of the model and the exact search, resolved on first use (a
        store opened to be listed or queried with SQL never imports torch)."""
        if isinstance(self._device, str):
            self._device = resolve_device(self._device)
        return self._device

    @property
    def _exact(self) -> ExactSearch:
        """The exact search over this store's table (its key cache made on first use)."""
        if self._exact_search is None or self._exact_search.table is not self.table:
            self._exact_search = ExactSearch(self.table, device=self.device)
        return self._exact_search

    @property
    def path(self) -> "Path | str":
        """The store's directory (a Path); for a store on an object store, its URI (a str)."""
        return self.location.uri if self.location.remote else self.location.path

    # --- creating and opening -----------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, model: str = DEFAULT_MODEL, *, key_layer: int = -1,
               key_site: str = "ffn_input", dtype: str = "float16",
               catalog_url: str | None = None, encoder: Encoder | None = None,
               device: str = "auto", compute_dtype: str = "auto",
               storage_options: dict[str, str] | None = None, key_dim: int | None = None,
               key_bits: int | None = None, route_dim: int | None = None) -> "Store":
        """Create a store for ``model`` (alias, Hugging Face id or local path) at ``path``:
        a local directory, or ``s3://bucket/prefix`` (``gs://``, ``az://``) with a
        ``catalog_url`` outside it (PostgreSQL to share it between machines).

        ``key_dim``: store keys reduced to this many dimensions by a PCA projection fitted
        on the first corpus's keys (``knnstore.projection``); None keeps the model's keys.
        ``key_bits`` (4 or 8, with ``key_dim``): keep those keys as per-dimension codes beside
        a ``route_dim``-dimensional float routing key the index is built on (default 64).

        The model is loaded once (on ``device`` in ``compute_dtype``, see ``open``) to read
        its identity and vocabulary; pass ``encoder`` to reuse one already loaded. Nothing
        is left behind if creation fails. ``storage_options``: see ``open``.
        """
        catalog_url = resolve_catalog_url(catalog_url)
        place = check_new_store(path, catalog_url, storage_options)  # cheap checks first: before the model loads
        if dtype not in DTYPES:
            raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        resolve_compute_dtype(resolve_device(device), compute_dtype)  # before anything loads or is written
        if key_dim is not None:
            check_number("key_dim", key_dim, 1, None, integer=True)
            route_dim = KeyProjection.check_quantisation(key_dim, key_bits, route_dim)
        elif key_bits is not None or route_dim is not None:
            raise InputError("--key-bits and --route-dim quantise reduced keys: give --key-dim too")
        if encoder is None:
            from .encoder import Encoder

            encoder = Encoder.load(model, key_layer=key_layer, key_site=key_site, device=device,
                                   compute_dtype=compute_dtype)
        identity = encoder.identity(dtype)
        if key_dim is not None:
            check_number(f"key_dim (the model's keys have {identity.dim} dimensions)", key_dim, 1, identity.dim,
                         integer=True)
            identity = dataclasses.replace(identity, key_dim=key_dim, key_bits=key_bits, route_dim=route_dim)
        create_store(place, identity, catalog.vocab_rows(encoder.tokenizer), catalog_url)
        # through the URL given: the marker keeps it without its password
        return cls.open(place, encoder=encoder, device=device, compute_dtype=compute_dtype, catalog_url=catalog_url)

    @classmethod
    def open(cls, path: str | os.PathLike, *, model: str | None = None,
             encoder: Encoder | None = None, device: str = "auto", compute_dtype: str = "auto",
             storage_options: dict[str, str] | None = None, catalog_url: str | None = None) -> "Store":
        """Open a store; upgrades an older catalog. The model is loaded only when needed.

        Refuses, before reading anything else, a catalog that belongs to another store
        (``StoreMismatchError``: a ``KNNSTORE_CATALOG_URL`` left set for another store).

        Args:
            model: check now that this model is the store's (refused if it differs).
            encoder: an already loaded model to use (checked the same way).
            device: where the model is loaded and the exact search runs: ``auto`` (a GPU
                when there is one), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
            compute_dtype: the model's float type there: ``auto`` (float32 on the CPU,
                bfloat16 or float16 on a GPU), ``float32``, ``float16``, ``bfloat16``.
                Keys are stored in the store's dtype whatever this is.
            storage_options: for a store on an object store, Lance's options (e.g.
                ``aws_endpoint``, ``aws_region``, ``allow_http``); by default the standard
                environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).
                Never recorded with the store.
            catalog_url: the catalog's URL, over ``KNNSTORE_CATALOG_URL`` and the one the
                store records (which never holds a password).
        """
        if (device, compute_dtype) != ("auto", "auto"):  # a bad choice fails before anything is opened
            device = resolve_device(device)
            resolve_compute_dtype(device, compute_dtype)
        parts = open_parts(path, storage_options, catalog_url)
        store = cls(parts, device=device, compute_dtype=compute_dtype)
        if encoder is None and model is not None:
            encoder = store.load_encoder(model)
        if encoder is not None:
            store.use_encoder(encoder)
        return store

    @property
    def bound(self) -> bool:
        """Whether catalog and table carry this store's id (checked when the store opened)."""
        return self.store_id is not None

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the model ------------------------------------------------------------------

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

    # --- reading ---------------------------------------------------------------------

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

    def snippet(self, document_id: int, position: int, before: int = 24, after: int = 8) -> str:
        """Source text around one stored pair, decoded from the stored tokens.

        The pair's token (position) and next token are marked with ``[[...]]``.
        """
        left, here, nxt, right = self.table.tokens_around(document_id, position, before, after)
        if here is None:
            return ""
        decode = self.encoder.tokenizer.decode
        return f"{decode(left)}{decode([here])}[[{decode([nxt])}]]{decode(right)}"

    def stats(self) -> StoreStats:
        rows = self._rows
        ready = [c for c in rows if c.status == READY]
        pairs = sum(c.n_pairs for c in ready)
        nbytes = self.table.nbytes()
        if self._own_catalog:
            nbytes += sum(p.stat().st_size for p in self.location.path.glob(CATALOG_FILE + "*"))
        ident = self.identity
        return StoreStats(
            path=str(self.path), model=ident.model, key_layer=ident.key_layer,
            key_site=ident.key_site, dim=ident.dim, dtype=ident.dtype, metric=ident.metric,
            format_version=ident.format_version, catalog=catalog.mask(self.catalog_url),
            corpora=len(rows), documents=sum(c.n_documents for c in ready), pairs=pairs,
            table_rows=self.table.count(), bytes_on_disk=nbytes,
            bytes_per_pair=round(nbytes / pairs, 1) if pairs else None,
            index=self.table.index_state(), key_dim=ident.key_dim, key_bits=ident.key_bits,
            route_dim=ident.route_dim,
            key_projection=self.projection.describe() if self.projection is not None else None,
            tokens=sum(c.n_tokens for c in ready), weighted=self.table.weighted,
        )

    def search(self, vectors: np.ndarray, k: int = 16, *, exact: bool = False,
               nprobes: int = 32, refine_factor: int | None = None, verify_nearest: bool = False) -> Neighbours:
        """The k nearest stored pairs (squared L2) of each row of ``vectors`` [Q, dim].

        One batched search for all rows; only pairs of ready corpora are returned.
        With an ANN index (and ``exact=False``) LanceDB answers from ``nprobes``
        partitions, re-ranking ``refine_factor`` x k candidates with exact distances
        (None: as the index type needs, see ``index_kinds.AUTO_REFINE``); otherwise a
        brute-force scan (torch) gives the exact neighbours. ``verify_nearest``: rows whose
        estimated nearest stands out get exact distances (``vectors.VERIFY_NEAREST``).
        """
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if vectors.ndim != 2 or vectors.shape[1] != self.identity.dim:
            raise InputError(
                f"query vectors have dim {vectors.shape[-1]}; this store's keys have dim {self.identity.dim}"
            )

        def search() -> Neighbours:
            queries = self.stored_keys(vectors)
            if exact or not self.table.has_vector_index():
                return self._exact.search(queries, k, corpora=self._visible)
            return self.table.search(queries, k, corpora=self._visible, nprobes=nprobes,
                                     refine_factor=refine_factor, verify_nearest=verify_nearest)

        try:
            with self.following():
                return search()
        except StoreChangedError:  # a compaction, prune or purge removed what it read: follow the store
            self.refresh()
            return search()

    def stored_keys(self, keys: np.ndarray) -> np.ndarray:
        """Model keys [N, dim] as the table holds them: projected where the store reduces
        its keys (the one place queries and stored keys are made alike)."""
        if self.identity.key_dim is None:
            return keys
        if self.projection is None:
            raise InputError(f"{self.path} reduces its keys to {self.identity.key_dim} dimensions but has no "
                             "projection yet: it is fitted on the first corpus's keys; add a corpus first")
        return self.projection.apply(keys)

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

    def compact(self, key_dim: int, progress: ProgressFn | None = None, *, key_bits: int | None = None,
                route_dim: int | None = None):
        """Rewrite the store's keys reduced to ``key_dim`` dimensions by a PCA of its own
        keys, quantised to ``key_bits`` per dimension beside a ``route_dim``-dimensional
        routing key if given (``knnstore.compaction``); returns a ``Compaction``. Readers
        holding the store open must reopen it afterwards."""
        from .compaction import compact

        return compact(self, key_dim, progress, key_bits=key_bits, route_dim=route_dim)

    def check(self, repair: bool = False):
        """``knnstore check``: whether catalog and table agree (``check.CheckReport``);
        with ``repair``, fix what is safe (see ``knnstore.check``)."""
        from .check import check

        return check(self, repair=repair)

    def sql(self, query: str):
        """Run one read-only SQL query over the store's views; returns a pyarrow Table.

        Views: pairs, documents, corpora, vocab, runs (see ``knnstore.sql``). Anything
        but SELECT is refused with ReadOnlyError, and the store is never changed.
        """
        with self.sql_session() as session, self.following():
            return session.execute(query)

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

    def create_index(self, num_partitions: int | None = None, num_sub_vectors: int | None = None,
                     index_type: str | None = None) -> None:
        """Train the ANN index on the stored keys; searches use it from then on.

        ``index_type``: ``ivf_rq`` (the default: IVF with 4-bit RaBitQ codes, ranked
        without re-reading keys) or ``ivf_pq`` (IVF-PQ, re-ranked with exact distances);
        see ``PairsTable.create_index``.
        """
        self._writer.create_index(num_partitions=num_partitions, num_sub_vectors=num_sub_vectors,
                                  index_type=index_type)

    def update_index(self) -> int:
        """Index the rows added since the index was trained (a delta index, no retraining);
        returns how many rows it indexed."""
        return self._writer.update_index()

    def index_plan(self) -> IndexPlan:
        """What the index policy would do now (``indexing.plan``; ``maintain_index`` does it)."""
        return self._writer.index_plan()

    def maintain_index(self) -> IndexPlan:
        """Apply the index policy (``index_plan``); returns the plan it carried out."""
        return self._writer.maintain_index()

    def calibration(self):
        """The newest adaptive-λ calibration (``adaptive.Calibration``), or None."""
        from .adaptive import Calibration

        fit = catalog.newest_calibration_fit(self.engine)
        return Calibration.from_dict(fit) if fit is not None else None

    def newest_calibration(self) -> int | None:
        """The id of the newest calibration saved (by any process; None: none)."""
        return catalog.newest_calibration(self.engine)

    def calibrations(self) -> list:
        """Every adaptive-λ calibration (``adaptive.Calibration``), newest first."""
        from .adaptive import Calibration

        return [Calibration.from_dict(fit) for fit in catalog.calibration_fits(self.engine)]

    # --- writing ---------------------------------------------------------------------

    def save_calibration(self, cal, text_source: str, n_tokens: int) -> int:
        """Store a fitted calibration; adaptive λ at its k and T uses it from now on."""
        return self._writer.save_calibration(cal, text_source, n_tokens)

    def clear_calibrations(self) -> int:
        """Delete every calibration (``--adaptive`` falls back to the rule); returns how many."""
        return self._writer.clear_calibrations()

    @contextmanager
    def write_lock(self, wait_s: float = 5.0) -> Iterator[None]:
        """Hold the store's one-writer lock (re-entrant within one handle), on the latest
        state of the store: every write reads what it changes under the lock."""
        first = self._lock.acquire(wait_s)
        try:
            if first:
                self.table.check_complete(self.location)  # else a write would fail half way through
                if self.store_id is None and self._own_catalog:  # made before ids: bind it now
                    self.store_id = bind_legacy(self.location, self.engine, self.table)
                self.refresh()
            yield
        finally:
            self._lock.release()

    def verify_lock(self) -> None:
        """Before a commit: this handle still holds its write lock (``knnstore.lock``)."""
        self._lock.verify()

    # --- writing: the protocol lives in writer.py ----------------------------------------

    def add_corpus(self, name: str, paths: Sequence[str | os.PathLike], *,
                   options: SourceOptions = SourceOptions(),
                   settings: IngestSettings | None = None,
                   progress: ProgressFn | None = None, index: bool = True,
                   workers: int | None = None, ray_address: str | None = None) -> CorpusInfo:
        """Encode every document of ``paths`` and store its pairs as corpus ``name``.

        All sources are read and validated before anything is written: bad input raises
        InputError and leaves the store as it was. If ingestion dies part way, the corpus
        stays invisible to readers, is reported failed, and ``resume_corpus(name)`` or
        ``remove_corpus(name)`` finishes the job. Then, with ``index``, the index policy
        runs (``maintain_index``): the new rows are indexed incrementally, and the index is
        trained or retrained only past its thresholds. Searches see the new rows at once.

        With ``workers`` (or ``ray_address``), the documents are encoded by that many Ray
        workers (on a local Ray runtime, or the cluster at ``ray_address``) and committed in
        one commit at the end (``knnstore.distributed``): the same pairs as without.
        """
        return self._writer.add_corpus(name, paths, options=options, settings=settings,
                                       progress=progress, index=index, ray=ray_options(workers, ray_address))

    def resume_corpus(self, name: str, progress: ProgressFn | None = None, index: bool = True,
                      workers: int | None = None, ray_address: str | None = None) -> CorpusInfo:
        """Finish an interrupted or failed add: keeps the documents already committed
        (``workers`` / ``ray_address``: on Ray, as ``add_corpus``)."""
        return self._writer.resume_corpus(name, progress=progress, index=index,
                                          ray=ray_options(workers, ray_address))

    def remove_corpus(self, name: str) -> None:
        """Delete a corpus's pairs and catalog rows. The index is not rebuilt."""
        self._writer.remove_corpus(name)

    def remove_documents(self, where: str, corpus: str | None = None, *, dry_run: bool = False,
                         refuse_above: int | None = None):
        """Remove the documents matching ``where``, an SQL condition over the ``documents``
        view (e.g. ``"path LIKE '%/2019/%'"``, ``"document_id IN (3, 7)"``), and their pairs,
        without a rebuild; ``corpus`` limits it to one corpus; ``dry_run`` only says what
        would go. Returns a ``DocumentRemoval``. A condition that matches nothing, or is not
        a read-only SQL condition, raises and changes nothing (see ``knnstore.removal``);
        with ``refuse_above``, so does one that matches every document or more than that many."""
        from .removal import remove_documents

        return remove_documents(self, where, corpus, dry_run=dry_run, refuse_above=refuse_above)

    def forget(self, text: str, *, ignore_case: bool = False, context: int = 0, documents: bool = False,
               dry_run: bool = False):
        """Remove every pair whose next token overlaps an occurrence of ``text`` in a
        stored document, matched on the documents' decoded text (``ignore_case``: any
        case); ``context`` N: also the pairs with an occurrence token among their last N
        context tokens; ``documents``: the whole documents that contain it instead.
        ``dry_run`` only says what would go. Returns a ``Forgetting``; the catalog keeps a
        salted hash of the text, never the text. The rows leave the disk with ``purge``."""
        from .removal import forget

        return forget(self, text, ignore_case=ignore_case, context=context, documents=documents, dry_run=dry_run)

    def prune(self, corpus: str | None = None, *, neighbours: int | None = None, exact: bool = False,
              dry_run: bool = False, progress: ProgressFn | None = None):
        """Merge neighbouring pairs that share a next token into one weighted pair (greedy
        merging, ``knnstore.pruning``), in every ready corpus or in ``corpus``;
        ``neighbours`` nearest looked at per pair (default 16). Returns a ``Pruning``."""
        from .pruning import DEFAULT_NEIGHBOURS, prune

        return prune(self, corpus, neighbours=DEFAULT_NEIGHBOURS if neighbours is None else neighbours, exact=exact,
                     dry_run=dry_run, progress=progress)

    def purge(self) -> dict[str, int]:
        """Take removed rows off the disk (``knnstore purge``): rewrite the data files that
        hold deleted rows, drop old table versions, vacuum the catalog. A reader that holds
        a snapshot from before may fail to read it afterwards and must ``refresh``."""
        from .removal import purge

        return purge(self)

    def finish_removals(self) -> int:
        """Finish document removals a killed writer left half done (the caller holds the
        write lock; ``check --repair`` does); returns how many."""
        from .removal import finish_removals

        return finish_removals(self)

    def drop_corpus(self, corpus_id: int) -> None:
        """Delete a corpus's pairs, then its catalog rows (the caller holds the write lock)."""
        self._writer.drop_corpus(corpus_id)

    def check_new_corpus(self, name: str, paths: Sequence[str | os.PathLike]) -> tuple[str, list[str]]:
        """Cheap checks of an add, before any model is loaded: name free, paths present.

        Returns the normalised name and the absolute paths.
        """
        return self._writer.check_new_corpus(name, paths)

    @property
    def holds_lock(self) -> bool:
        """Whether this handle holds the store's write lock now."""
        return self._lock.held
