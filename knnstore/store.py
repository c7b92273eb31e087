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
import errno
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from . import catalog, indexing, ingest
from .catalog import FAILED, INGESTING, PENDING, READY, REMOVING
from .config import (
    CATALOG_FILE,
    DEFAULT_MODEL,
    DTYPES,
    FORMAT_VERSION,
    MARKER_FILE,
    VECTORS_DIR,
    IngestSettings,
    SourceOptions,
    StoreIdentity,
)
from .encoder import Encoder
from .errors import (
    CorpusExistsError,
    CorpusNotFoundError,
    DiskFullError,
    InputError,
    ModelMismatchError,
    ModelRunError,
    StoreDamagedError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
)
from .faults import crash_point
from .indexing import IndexPlan, IndexPolicy  # noqa: F401  (IndexPlan: kept importable here)
from .layout import (
    Marker,
    catalog_failure,
    check_binding,
    make_dirs,
    read_store_config,
    resolve_catalog_url,
    usable_path,
)
from .lock import WriteLock, on_read_only_mount, writer_active
from .vectors import INDEX_TYPES, ExactSearch, Neighbours, PairsTable, pair_id, row_bytes

ProgressFn = Callable[[int, int], None]  # (tokens done so far, total tokens)
_MAX_DOCS_PER_COMMIT = 10_000


@dataclass
class CorpusInfo:
    id: int
    name: str
    status: str  # ready | ingesting | failed | removing
    source: str
    documents: int
    tokens: int
    pairs: int
    bytes: int  # the corpus's rows at their stored size (index and garbage excluded)
    created_at: datetime
    ready_at: datetime | None
    error: str | None = None  # why it failed, for a failed corpus
    skipped: list = dataclasses.field(default_factory=list)  # [path, reason] of files left out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("created_at", "ready_at"):
            d[key] = d[key].isoformat() if d[key] else None
        return d


@dataclass
class StoreStats:
    path: str
    model: str
    key_layer: int
    key_site: str
    dim: int
    dtype: str
    metric: str
    format_version: int
    catalog: str
    corpora: int
    documents: int
    pairs: int  # pairs visible to readers (ready corpora)
    table_rows: int  # rows in the LanceDB table, hidden ones included
    bytes_on_disk: int
    bytes_per_pair: float | None
    index: dict

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DocumentRef:
    """Where a stored pair came from, as the catalog names it."""

    id: int
    corpus: str
    source: str
    title: str | None


class Store:
    """A knnstore store: a directory with a SQL catalog and a LanceDB `pairs` table."""

    def __init__(self, path: Path, catalog_url: str, engine, identity: StoreIdentity,
                 table: PairsTable, encoder: Encoder | None = None, *, store_id: str | None = None,
                 own_catalog: bool = True) -> None:
        self.path, self.catalog_url, self.engine = path, catalog_url, engine
        self.identity, self.table = identity, table
        self.store_id = store_id  # None: a store made before ids, not bound yet
        self._own_catalog = own_catalog  # the SQLite file inside the store (bindable when legacy)
        self._encoder = encoder
        self._rows: list[catalog.Corpus] = []  # the catalog's corpora in this snapshot
        self._visible: frozenset[int] = frozenset()  # ready corpora in this snapshot
        self._lock = WriteLock(path)
        self._exact = ExactSearch(table)
        self.refresh()

    # --- creating and opening -----------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, model: str = DEFAULT_MODEL, *, key_layer: int = -1,
               key_site: str = "ffn_input", dtype: str = "float16",
               catalog_url: str | None = None, encoder: Encoder | None = None) -> "Store":
        """Create a store for ``model`` (alias, Hugging Face id or local path).

        The model is loaded once to read its identity and vocabulary; pass ``encoder`` to
        reuse one already loaded. Nothing is left behind if creation fails.
        """
        path = usable_path(path)
        if dtype not in DTYPES:
            raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if (path / MARKER_FILE).exists():
            raise StoreExistsError(f"{path} is already a knnstore store; open it, or pick another path")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise StoreExistsError(f"{path} exists and is not an empty directory; pick another path")
        catalog_url = resolve_catalog_url(catalog_url)  # a bad URL fails before the model loads
        if encoder is None:
            encoder = Encoder.load(model, key_layer=key_layer, key_site=key_site)
        identity = encoder.identity(dtype)
        made = make_dirs(path)
        url = catalog_url or catalog.sqlite_url(path / CATALOG_FILE)
        store_id = str(uuid.uuid4())
        engine = None
        try:
            engine = catalog.make_engine(url, create=True)
            try:
                if catalog.has_catalog(engine):
                    raise StoreExistsError(
                        f"the catalog at {catalog.mask(url)} already holds a store; use an empty database"
                    )
                catalog.upgrade(engine)
            except SQLAlchemyError as exc:
                raise catalog_failure(exc, path, url, "create") from None
            with Session(engine) as s, s.begin():
                s.add(catalog.StoreConfig(id=1, created_at=catalog.utcnow(), store_id=store_id, **{
                    f.name: getattr(identity, f.name)
                    for f in dataclasses.fields(identity) if f.name != "created_at"}))
                s.execute(catalog.Vocab.__table__.insert(), _vocab_rows(encoder.tokenizer))
            PairsTable.create(path / VECTORS_DIR, identity.dim, dtype, store_id=store_id)
            Marker(FORMAT_VERSION, catalog_url, store_id).write(path)  # last: the store exists now
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
        return cls.open(path, encoder=encoder)

    @classmethod
    def open(cls, path: str | os.PathLike, *, model: str | None = None,
             encoder: Encoder | None = None) -> "Store":
        """Open a store; upgrades an older catalog. The model is loaded only when needed.

        Refuses, before reading anything else, a catalog that belongs to another store
        (``StoreMismatchError``: a ``KNNSTORE_CATALOG_URL`` left set for another store).

        Args:
            model: check now that this model is the store's (refused if it differs).
            encoder: an already loaded model to use (checked the same way).
        """
        path = usable_path(path)
        if not path.exists():
            raise StoreNotFoundError(f"no store at {path}: create one with `knnstore init {path}`")
        if not path.is_dir() or not (path / MARKER_FILE).exists():
            raise StoreNotFoundError(f"{path} is not a knnstore store (it has no {MARKER_FILE})")
        marker = Marker.read(path)
        given = os.environ.get("KNNSTORE_CATALOG_URL") or marker.catalog_url
        url = given or catalog.sqlite_url(path / CATALOG_FILE)
        read_only = on_read_only_mount(path)
        engine = catalog.make_engine(url, read_only=read_only and given is None)
        try:
            row = read_store_config(engine, path, url, read_only)
        except BaseException:
            engine.dispose()
            raise
        identity = StoreIdentity(**{f.name: getattr(row, f.name) for f in dataclasses.fields(StoreIdentity)})
        table = PairsTable.open(path / VECTORS_DIR)
        check_binding(path, url, marker.store_id, row.store_id, table.store_id())
        store = cls(path, given or catalog.sqlite_url(path / CATALOG_FILE).render_as_string(), engine, identity, table,
                    store_id=row.store_id, own_catalog=given is None)
        if encoder is None and model is not None:
            encoder = Encoder.load(model, key_layer=identity.key_layer, key_site=identity.key_site)
        if encoder is not None:
            store.use_encoder(encoder)
        return store

    @property
    def bound(self) -> bool:
        """Whether catalog and table carry this store's id (checked when the store opened)."""
        return self.store_id is not None

    def _bind_legacy(self) -> None:
        """Give a store made before store ids its id, under the write lock, when its catalog
        is the SQLite file inside it (an outside catalog is never bound by guess)."""
        if self.store_id is not None or not self._own_catalog:
            return
        store_id = str(uuid.uuid4())
        self.table.set_store_id(store_id)
        with Session(self.engine) as s, s.begin():
            s.execute(update(catalog.StoreConfig).where(catalog.StoreConfig.id == 1).values(store_id=store_id))
        marker = Marker.read(self.path)
        Marker(marker.format_version, marker.catalog_url, store_id).write(self.path)
        self.store_id = store_id

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
        """The store's model, loaded on first use."""
        if self._encoder is None:
            self.use_encoder(Encoder.load(self.identity.model, key_layer=self.identity.key_layer,
                                          key_site=self.identity.key_site))
        return self._encoder

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
            before = self._corpus_states()
            self.table.refresh()
            with catalog.snapshot_session(self.engine) as s:
                rows = list(s.scalars(select(catalog.Corpus).order_by(catalog.Corpus.id)))
                result = read(s) if read is not None else None
            if {c.id: c.status for c in rows} == before:
                self._rows = rows
                self._visible = frozenset(c.id for c in rows if c.status == READY)
                return result
            time.sleep(delay)
            delay = min(0.05, delay * 2)
        raise StoreLockedError(f"{self.path} changed too often to read a consistent state of it; retry")

    @property
    def visible_corpora(self) -> frozenset[int]:
        """Ids of the corpora readers see in this snapshot (the ready ones)."""
        return self._visible

    def _corpus_states(self) -> dict[int, str]:
        with Session(self.engine) as s:
            return dict(s.execute(select(catalog.Corpus.id, catalog.Corpus.status)).tuples().all())

    def writer_active(self) -> bool:
        """Whether a process (this one included) holds the store's write lock now."""
        return self._lock.held or writer_active(self.path)

    def _info(self, c: catalog.Corpus, writer_active: bool) -> CorpusInfo:
        status, error = c.status, None
        if status == INGESTING and not writer_active:
            status = FAILED  # its writer is gone: killed or crashed
        if status == FAILED:
            with Session(self.engine) as s:
                error = s.scalar(
                    select(catalog.IngestRun.error)
                    .where(catalog.IngestRun.corpus_id == c.id)
                    .order_by(catalog.IngestRun.id.desc()).limit(1)
                ) or "interrupted"
        return CorpusInfo(
            id=c.id, name=c.name, status=status, source=c.source, documents=c.n_documents,
            tokens=c.n_tokens, pairs=c.n_pairs,
            bytes=c.n_pairs * row_bytes(self.identity.dim, self.identity.dtype),
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
        corpus_id = self.corpus(corpus).id
        with Session(self.engine, expire_on_commit=False) as s:
            return list(s.scalars(
                select(catalog.Document)
                .where(catalog.Document.corpus_id == corpus_id, catalog.Document.status == READY)
                .order_by(catalog.Document.ordinal)
            ))

    def document_refs(self, document_ids: Sequence[int]) -> dict[int, DocumentRef]:
        """Corpus name, source and title of documents, by id (unknown ids are left out)."""
        ids = sorted({int(d) for d in document_ids})
        if not ids:
            return {}
        with Session(self.engine) as s:
            rows = s.execute(
                select(catalog.Document.id, catalog.Corpus.name, catalog.Document.source,
                       catalog.Document.title)
                .join(catalog.Corpus, catalog.Corpus.id == catalog.Document.corpus_id)
                .where(catalog.Document.id.in_(ids))
            ).all()
        return {r[0]: DocumentRef(*r) for r in rows}

    def snippet(self, document_id: int, position: int, before: int = 24, after: int = 8) -> str:
        """Source text around one stored pair, decoded from the stored tokens.

        The pair's token (position) and next token are marked with ``[[...]]``.
        """
        lo = max(0, position - before)
        ids = pair_id(document_id, np.arange(lo, position + after + 1))
        rows = self.table.take(ids.tolist(), columns=["position", "token", "next_token"]).to_pydict()
        by_pos = dict(zip(rows["position"], zip(rows["token"], rows["next_token"])))
        decode = self.encoder.tokenizer.decode
        left = [by_pos[p][0] for p in range(lo, position) if p in by_pos]
        here, nxt = by_pos.get(position, (None, None))
        right = [by_pos[p][0] for p in range(position + 2, position + after + 1) if p in by_pos]
        if here is None:
            return ""
        return f"{decode(left)}{decode([here])}[[{decode([nxt])}]]{decode(right)}"

    def stats(self) -> StoreStats:
        rows = self._rows
        ready = [c for c in rows if c.status == READY]
        pairs = sum(c.n_pairs for c in ready)
        nbytes = self.table.nbytes()
        if self.engine.dialect.name == "sqlite":
            nbytes += sum(p.stat().st_size for p in self.path.glob(CATALOG_FILE + "*"))
        ident = self.identity
        return StoreStats(
            path=str(self.path), model=ident.model, key_layer=ident.key_layer,
            key_site=ident.key_site, dim=ident.dim, dtype=ident.dtype, metric=ident.metric,
            format_version=ident.format_version, catalog=catalog.mask(self.catalog_url),
            corpora=len(rows), documents=sum(c.n_documents for c in ready), pairs=pairs,
            table_rows=self.table.count(), bytes_on_disk=nbytes,
            bytes_per_pair=round(nbytes / pairs, 1) if pairs else None,
            index=self.table.index_state(),
        )

    def search(self, vectors: np.ndarray, k: int = 16, *, exact: bool = False,
               nprobes: int = 32, refine_factor: int | None = None) -> Neighbours:
        """The k nearest stored pairs (squared L2) of each row of ``vectors`` [Q, dim].

        One batched search for all rows; only pairs of ready corpora are returned.
        With an ANN index (and ``exact=False``) LanceDB answers from ``nprobes``
        partitions, re-ranking ``refine_factor`` x k candidates with exact distances
        (None: as the index type needs, see ``vectors.AUTO_REFINE``); otherwise a
        brute-force scan (torch) gives the exact neighbours.
        """
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if vectors.ndim != 2 or vectors.shape[1] != self.identity.dim:
            raise InputError(
                f"query vectors have dim {vectors.shape[-1]}; this store's keys have dim {self.identity.dim}"
            )
        if exact or not self.table.has_vector_index():
            return self._exact.search(vectors, k, corpora=self._visible)
        return self.table.search(vectors, k, corpora=self._visible,
                                 nprobes=nprobes, refine_factor=refine_factor)

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
        from .sql import SQLSession

        session = SQLSession(self)
        try:
            return session.execute(query)
        finally:
            session.close()

    def create_index(self, num_partitions: int | None = None, num_sub_vectors: int | None = None,
                     index_type: str | None = None) -> None:
        """Train the ANN index on the stored keys; searches use it from then on.

        ``index_type``: ``ivf_rq`` (the default: IVF with 4-bit RaBitQ codes, ranked
        without re-reading keys) or ``ivf_pq`` (IVF-PQ, re-ranked with exact distances);
        see ``PairsTable.create_index``.
        """
        with self.write_lock():
            self.refresh()
            rows = self.table.count()
            crash_point("index.before")
            t0 = time.perf_counter()
            params = self.table.create_index(num_partitions=num_partitions, num_sub_vectors=num_sub_vectors,
                                             index_type=index_type)
            seconds = time.perf_counter() - t0
            crash_point("index.after")
            catalog.record_index_build(self.engine, "train", seconds, rows, rows, params)
        self.refresh()

    def update_index(self) -> int:
        """Index the rows added since the index was trained (a delta index, no retraining);
        returns how many rows it indexed."""
        with self.write_lock():
            self.refresh()
            new = self.table.index_state()["unindexed_rows"]
            crash_point("index.before")
            t0 = time.perf_counter()
            self.table.update_index()
            seconds = time.perf_counter() - t0
            crash_point("index.after")
            catalog.record_index_build(self.engine, "update", seconds, self.table.count(), new, {})
        self.refresh()
        return new

    def index_plan(self) -> IndexPlan:
        """What the index policy would do now (``indexing.plan``; ``maintain_index`` does it)."""
        state = self.table.index_state()
        has_index = any("vector" in i["columns"] for i in state["indices"])
        trained = catalog.last_trained_rows(self.engine)
        if trained is None and has_index:  # trained before builds were recorded
            trained = state["indexed_rows"] or None
        return indexing.plan(self.table.count(), has_index, state["indexed_rows"], state["unindexed_rows"],
                             trained, IndexPolicy.from_env())

    def maintain_index(self) -> IndexPlan:
        """Apply the index policy (``index_plan``); returns the plan it carried out."""
        with self.write_lock():
            self.refresh()
            plan = self.index_plan()
            if plan.action == "train":
                self.create_index()
            elif plan.action == "retrain":  # keep the type the user chose
                kind = self.table.index_type()
                self.create_index(index_type=kind if kind in INDEX_TYPES else None)
            elif plan.action == "update":
                self.update_index()
        return plan

    def calibration(self):
        """The newest adaptive-λ calibration (``adaptive.Calibration``), or None."""
        from .adaptive import Calibration

        with Session(self.engine) as s:
            row = s.scalars(select(catalog.Calibration).order_by(catalog.Calibration.id.desc()).limit(1)).first()
            return Calibration.from_dict(row.fit) if row is not None else None

    # --- writing ---------------------------------------------------------------------

    def save_calibration(self, cal, text_source: str, n_tokens: int) -> int:
        """Store a fitted calibration; ``--adaptive`` uses the newest one from now on."""
        with self.write_lock(), Session(self.engine) as s, s.begin():
            row = catalog.Calibration(text_source=text_source, n_tokens=n_tokens,
                                      n_pairs=sum(c.n_pairs for c in self._rows if c.status == READY),
                                      kind=cal.kind, fit=cal.to_dict())
            s.add(row)
            s.flush()
            return row.id

    def clear_calibrations(self) -> int:
        """Delete every calibration (``--adaptive`` falls back to the rule); returns how many."""
        with self.write_lock(), Session(self.engine) as s, s.begin():
            return s.execute(delete(catalog.Calibration)).rowcount

    @contextmanager
    def write_lock(self, wait_s: float = 5.0) -> Iterator[None]:
        """Hold the store's one-writer lock (re-entrant within one handle), on the latest
        state of the store: every write reads what it changes under the lock."""
        first = self._lock.acquire(wait_s)
        try:
            if first:
                missing = self.table.missing_files()
                if missing:  # a write would fail half way through (a removal left `removing`)
                    raise StoreDamagedError(
                        f"the pairs table of {self.path} is damaged ({len(missing)} data file(s) missing, "
                        f"e.g. {missing[0]}): nothing was changed; `knnstore check {self.path}` lists "
                        "the damage, restore the store from a backup")
                self._bind_legacy()
                self.refresh()
            yield
        finally:
            self._lock.release()

    def verify_lock(self) -> None:
        """Before a commit: this handle still holds the lock of the directory at its path."""
        self._lock.verify()

    def add_corpus(self, name: str, paths: Sequence[str | os.PathLike], *,
                   options: SourceOptions = SourceOptions(),
                   settings: IngestSettings | None = None,
                   progress: ProgressFn | None = None, index: bool = True) -> CorpusInfo:
        """Encode every document of ``paths`` and store its pairs as corpus ``name``.

        All sources are read and validated before anything is written: bad input raises
        InputError and leaves the store as it was. If ingestion dies part way, the corpus
        stays invisible to readers, is reported failed, and ``resume_corpus(name)`` or
        ``remove_corpus(name)`` finishes the job. Then, with ``index``, the index policy
        runs (``maintain_index``): the new rows are indexed incrementally, and the index is
        trained or retrained only past its thresholds. Searches see the new rows at once.
        """
        settings = settings or IngestSettings.resolve()
        name, paths = self.check_new_corpus(name, paths)  # before the model loads in scan
        # Read and validate every source before taking the lock: a writer never waits for input.
        scan = ingest.scan(paths, options, self.encoder.tokenize)
        with self.write_lock():
            self._check_new_name(name)  # again: another writer may have taken it meanwhile
            self._check_free_space(name, scan.n_tokens)
            spec = {"paths": paths, "options": dataclasses.asdict(options),
                    "settings": dataclasses.asdict(settings),
                    "skipped": scan.skipped[:100]}
            with Session(self.engine) as s, s.begin():
                row = catalog.Corpus(name=name, source=" ".join(paths), spec=spec, status=INGESTING)
                s.add(row)
                s.flush()
                corpus_id = row.id
            crash_point("add.after_corpus_row")
            self._ingest(corpus_id, name, "add", scan.n_tokens, progress)
            if index:
                self.maintain_index()
        return self.corpus(name)

    def resume_corpus(self, name: str, progress: ProgressFn | None = None, index: bool = True) -> CorpusInfo:
        """Finish an interrupted or failed add: keeps the documents already committed."""
        self.refresh()
        info = self._resumable(name)
        with Session(self.engine) as s:
            spec = s.get(catalog.Corpus, info.id).spec
        # Read and validate the sources before taking the lock: a writer never waits for input.
        scan = ingest.scan(spec["paths"], SourceOptions(**spec["options"]), self.encoder.tokenize)
        with self.write_lock():
            info = self._resumable(name)
            self._check_free_space(name, scan.n_tokens - info.tokens)
            self._ingest(info.id, name, "resume", scan.n_tokens, progress)
            if index:
                self.maintain_index()
        return self.corpus(name)

    def _resumable(self, name: str) -> CorpusInfo:
        info = self.corpus(name)
        if info.status == READY:
            raise InputError(f"corpus {info.name!r} is complete; nothing to resume")
        if info.status == REMOVING:
            raise InputError(f"corpus {info.name!r} is being removed; run `knnstore remove-corpus` again")
        if info.status == INGESTING and self.writer_active() and not self._lock.held:
            raise StoreLockedError(f"corpus {info.name!r} is being added by another process right now; "
                                   "wait for it to finish")
        return info

    def remove_corpus(self, name: str) -> None:
        """Delete a corpus's pairs and catalog rows. The index is not rebuilt."""
        with self.write_lock():
            info = self.corpus(name)
            run = self._start_run(info.id, info.name, "remove")
            self.verify_lock()
            with Session(self.engine) as s, s.begin():
                s.execute(update(catalog.Corpus).where(catalog.Corpus.id == info.id).values(status=REMOVING))
            crash_point("remove.after_status")
            self.drop_corpus(info.id)
            self._finish_run(run, "ok", n_documents=info.documents, n_pairs=info.pairs)
        self.refresh()

    def drop_corpus(self, corpus_id: int) -> None:
        """Delete a corpus's pairs, then its catalog rows (the caller holds the write lock)."""
        self.verify_lock()
        self.table.delete_corpus(corpus_id)
        crash_point("remove.after_table_delete")
        with Session(self.engine) as s, s.begin():
            s.execute(delete(catalog.Document).where(catalog.Document.corpus_id == corpus_id))
            s.execute(delete(catalog.Corpus).where(catalog.Corpus.id == corpus_id))

    def _check_free_space(self, name: str, n_tokens: int) -> None:
        """Refuse, before writing anything, a corpus the disk cannot hold."""
        need = int(n_tokens * row_bytes(self.identity.dim, self.identity.dtype) * 1.2) + (1 << 20)
        free = shutil.disk_usage(self.path / VECTORS_DIR).free
        if free < need:
            raise DiskFullError(
                f"the disk holding {self.path} has {free / 2**20:,.1f} MiB free; corpus '{name}' "
                f"needs about {need / 2**20:,.1f} MiB ({n_tokens:,} pairs): free some space or "
                "move the store to a bigger disk"
            )

    def check_new_corpus(self, name: str, paths: Sequence[str | os.PathLike]) -> tuple[str, list[str]]:
        """Cheap checks of an add, before any model is loaded: name free, paths present.

        Returns the stripped name and the absolute paths.
        """
        name = normalise_name(name)
        if not paths:
            raise InputError("give at least one PATH to read documents from")
        resolved = [str(Path(p).resolve()) for p in paths]
        for given, p in zip(paths, resolved):
            ingest.check_source_path(Path(p), given)
        self._check_new_name(name)
        return name, resolved

    def _check_new_name(self, name: str) -> None:
        try:
            existing = self.corpus(name)
        except CorpusNotFoundError:
            return
        if existing.status == READY:
            raise CorpusExistsError(
                f"a corpus named {name!r} is already in {self.path}; pick another name, "
                f"or remove it first with `knnstore remove-corpus {self.path} {name}`"
            )
        raise CorpusExistsError(
            f"corpus {name!r} exists and is {existing.status} ({existing.error}); finish it with "
            f"`knnstore resume-corpus {self.path} {name}` or drop it with "
            f"`knnstore remove-corpus {self.path} {name}`"
        )

    def _start_run(self, corpus_id: int, name: str, kind: str) -> int:
        with Session(self.engine) as s, s.begin():
            run = catalog.IngestRun(corpus_id=corpus_id, corpus_name=name, kind=kind, status="running")
            s.add(run)
            s.flush()
            return run.id

    def _finish_run(self, run_id: int, status: str, **values) -> None:
        with Session(self.engine) as s, s.begin():
            s.execute(update(catalog.IngestRun).where(catalog.IngestRun.id == run_id)
                      .values(status=status, finished_at=catalog.utcnow(), **values))

    def _ingest(self, corpus_id: int, name: str, kind: str, total_tokens: int,
                progress: ProgressFn | None) -> None:
        """Encode the corpus's documents not yet committed, commit by commit.

        This handle hides the corpus from its own searches until it is ready.
        """
        self.refresh()
        try:
            self._ingest_documents(corpus_id, name, kind, total_tokens, progress)
        finally:
            self.refresh()

    def _ingest_documents(self, corpus_id: int, name: str, kind: str, total_tokens: int,
                          progress: ProgressFn | None) -> None:
        run = self._start_run(corpus_id, name, kind)
        started, encoded_tokens, run_pairs, run_docs = time.monotonic(), 0, 0, 0
        ready = False
        try:
            with Session(self.engine, expire_on_commit=False) as s:
                corpus = s.get(catalog.Corpus, corpus_id)
                spec = corpus.spec
                done = {d.ordinal: d.sha256 for d in s.scalars(
                    select(catalog.Document).where(catalog.Document.corpus_id == corpus_id,
                                                   catalog.Document.status == READY))}
                pending_ids = list(s.scalars(select(catalog.Document.id).where(
                    catalog.Document.corpus_id == corpus_id, catalog.Document.status == PENDING)))
            # Pairs of documents whose commit never completed: drop them and redo.
            self.table.delete_corpus(corpus_id, pending_ids)
            if pending_ids:
                crash_point("resume.after_pending_dropped")
            with Session(self.engine) as s, s.begin():
                s.execute(delete(catalog.Document).where(catalog.Document.id.in_(pending_ids)))
                s.execute(update(catalog.Corpus).where(catalog.Corpus.id == corpus_id).values(status=INGESTING))
            settings = IngestSettings(**spec["settings"])
            options = SourceOptions(**spec["options"])
            schema = self.table.schema
            encoder = self.encoder

            forward = _model_forward(encoder, name, self.path)
            docs = ingest.limited(ingest.iter_documents(spec["paths"], options), options.max_documents)
            done_tokens = 0
            pending: list[pa.RecordBatch] = []  # encoded pairs not yet in the table
            pending_rows = 0
            pending_docs: list[int] = []  # documents not yet ready
            flushed = 0  # pairs of pending_docs already in the table
            for group in _groups(docs, encoder.tokenize, settings):
                fresh = []
                for doc, tokens in group:
                    if doc.ordinal in done:
                        if done[doc.ordinal] != doc.sha256:
                            raise InputError(
                                f"{doc.source} changed since corpus '{name}' was started; remove the "
                                f"corpus and add it again"
                            )
                        done_tokens += len(tokens)
                        continue
                    fresh.append((doc, tokens))
                if progress and done_tokens:
                    progress(done_tokens, total_tokens)
                if not fresh:
                    continue
                doc_ids = self._insert_documents(corpus_id, fresh)
                crash_point("ingest.after_documents_row")
                pending_docs += doc_ids
                for batch, n_new in ingest.encode_documents(
                        forward, list(zip(doc_ids, (t for _, t in fresh))), corpus_id, settings, schema):
                    crash_point("ingest.after_encode")
                    pending.append(batch)
                    pending_rows += batch.num_rows
                    done_tokens += n_new
                    if progress:
                        progress(done_tokens, total_tokens)
                    if pending_rows >= settings.commit_every:
                        # Long documents: their pairs go to the table now (memory stays bounded
                        # whatever a document's length); the documents stay pending, so
                        # their pairs stay invisible, until the commit below marks them ready.
                        flushed += self._add_pairs(pending)
                        crash_point("commit.after_partial_add")
                        pending, pending_rows = [], 0
                encoded_tokens += sum(len(t) for _, t in fresh)
                # The last token of each document adds no pair; count it as done.
                done_tokens += len(fresh)
                # Bounded in pairs, and in documents (SQL parameter limits with tiny ones).
                if (flushed + pending_rows >= settings.commit_every
                        or len(pending_docs) >= _MAX_DOCS_PER_COMMIT):
                    run_pairs += flushed + self._commit(corpus_id, pending, pending_docs)
                    run_docs += len(pending_docs)
                    pending, pending_docs, pending_rows, flushed = [], [], 0, 0
            run_pairs += flushed + self._commit(corpus_id, pending, pending_docs)
            run_docs += len(pending_docs)
            crash_point("ingest.before_corpus_ready")
            self.verify_lock()
            with Session(self.engine) as s, s.begin():
                s.execute(update(catalog.Corpus).where(catalog.Corpus.id == corpus_id)
                          .values(status=READY, ready_at=catalog.utcnow()))
            ready = True
            crash_point("ingest.after_corpus_ready")
            if progress:
                progress(total_tokens, total_tokens)
        except BaseException as exc:
            message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if ready:  # committed whole: what failed after it (e.g. a progress callback) changes nothing
                self._finish_run(run, "ok", n_documents=run_docs, n_tokens=encoded_tokens, n_pairs=run_pairs)
                raise
            try:
                with Session(self.engine) as s, s.begin():
                    s.execute(update(catalog.Corpus).where(catalog.Corpus.id == corpus_id).values(status=FAILED))
                self._finish_run(run, "failed", error=message[:2000], n_documents=run_docs,
                                 n_tokens=encoded_tokens, n_pairs=run_pairs)
            except Exception:  # e.g. the disk is full for the catalog too; it reads failed anyway
                pass
            if _is_disk_full(exc):
                raise DiskFullError(
                    f"the disk holding {self.path} filled up while adding '{name}'; the corpus is "
                    f"kept as failed and invisible. Free some space, then `knnstore resume-corpus "
                    f"{self.path} {name}` (or `knnstore remove-corpus {self.path} {name}`)"
                ) from None
            raise
        elapsed = max(time.monotonic() - started, 1e-9)
        self._finish_run(run, "ok", n_documents=run_docs, n_tokens=encoded_tokens,
                         n_pairs=run_pairs, tokens_per_s=encoded_tokens / elapsed)

    def _insert_documents(self, corpus_id: int, docs) -> list[int]:
        with Session(self.engine) as s, s.begin():
            rows = [catalog.Document(
                corpus_id=corpus_id, ordinal=doc.ordinal, source=doc.source, title=doc.title,
                sha256=doc.sha256, n_tokens=len(tokens), n_pairs=len(tokens) - 1,
                status=PENDING, meta=doc.meta) for doc, tokens in docs]
            s.add_all(rows)
            s.flush()
            return [r.id for r in rows]

    def _add_pairs(self, batches: list[pa.RecordBatch]) -> int:
        """One LanceDB commit of these pairs (their documents' status is the caller's)."""
        crash_point("commit.before_table_add")
        if batches:
            self.verify_lock()
            schema = self.table.schema

            def stream():  # one commit, streamed batch by batch
                for i, batch in enumerate(batches):
                    if i == len(batches) // 2:
                        crash_point("commit.mid_table_add")
                    yield batch

            self.table.add(pa.RecordBatchReader.from_batches(schema, stream()))
        return sum(b.num_rows for b in batches)

    def _commit(self, corpus_id: int, batches: list[pa.RecordBatch], doc_ids: list[int]) -> int:
        """One LanceDB commit of the pending pairs, then mark their documents ready."""
        if not doc_ids:
            return 0
        n_pairs = self._add_pairs(batches)
        crash_point("commit.after_table_add")
        self.verify_lock()
        with Session(self.engine) as s, s.begin():
            s.execute(update(catalog.Document).where(catalog.Document.id.in_(doc_ids)).values(status=READY))
            totals = s.execute(
                select(func.count(), func.coalesce(func.sum(catalog.Document.n_tokens), 0),
                       func.coalesce(func.sum(catalog.Document.n_pairs), 0))
                .where(catalog.Document.corpus_id == corpus_id, catalog.Document.status == READY)
            ).one()
            s.execute(update(catalog.Corpus).where(catalog.Corpus.id == corpus_id).values(
                n_documents=totals[0], n_tokens=totals[1], n_pairs=totals[2]))
        crash_point("commit.after_documents_ready")
        return n_pairs


MAX_NAME_CHARS = 256


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


def _model_forward(encoder: Encoder, corpus: str, path: Path):
    """The encoder's keys for a batch, with the model's own failures (torch's errors inside
    it: bad weights, a device out of memory) as one ModelRunError that says how to go on."""
    def forward(ids, mask):
        try:
            return encoder.forward(ids, mask)[0]
        except (RuntimeError, ValueError, IndexError) as exc:
            detail = (str(exc).strip().splitlines() or ["-"])[0]
            raise ModelRunError(
                f"the model {encoder.name} failed while encoding corpus {corpus!r} ({type(exc).__name__}: "
                f"{detail}); the corpus is kept as failed: fix the model, then "
                f"`knnstore resume-corpus {path} {corpus}`"
            ) from exc
    return forward


def _is_disk_full(exc: BaseException) -> bool:
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left" in str(exc)


def _groups(docs, tokenize, settings: IngestSettings):
    """Tokenised documents in groups of about four batches' worth of windows."""
    budget = settings.batch_size * settings.stride * 4
    group, size = [], 0
    for doc in docs:
        tokens = tokenize(doc.text)
        if len(tokens) < 2:
            continue
        group.append((doc, tokens))
        size += len(tokens)
        if size >= budget or len(group) >= 1024:
            yield group
            group, size = [], 0
    if group:
        yield group


def _vocab_rows(tokenizer) -> list[dict]:
    ids = list(range(len(tokenizer)))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    texts = tokenizer.batch_decode([[i] for i in ids])
    # SQL text cannot hold NUL (PostgreSQL refuses it): the NUL byte token reads "\x00".
    clean = lambda s: (s or "").replace("\x00", "\\x00")  # noqa: E731
    return [{"token_id": i, "piece": clean(p), "text": clean(t)} for i, p, t in zip(ids, pieces, texts)]
