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
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from . import catalog, indexing
from .catalog import FAILED, INGESTING, READY
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
    CorpusNotFoundError,
    InputError,
    ModelMismatchError,
    StoreDamagedError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
)
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
from .vectors import ExactSearch, Neighbours, PairsTable, pair_id, row_bytes
from .writer import ProgressFn, Writer, normalise_name  # noqa: F401  (normalise_name: kept importable here)



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
        self._writer = Writer(self)
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
        url = given or catalog.sqlite_url(path / CATALOG_FILE)  # a URL object: never re-parsed
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
        shown = url if isinstance(url, str) else url.render_as_string()
        store = cls(path, shown, engine, identity, table, store_id=row.store_id, own_catalog=given is None)
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
        self._writer.create_index(num_partitions=num_partitions, num_sub_vectors=num_sub_vectors,
                                  index_type=index_type)

    def update_index(self) -> int:
        """Index the rows added since the index was trained (a delta index, no retraining);
        returns how many rows it indexed."""
        return self._writer.update_index()

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
        return self._writer.maintain_index()

    def calibration(self):
        """The newest adaptive-λ calibration (``adaptive.Calibration``), or None."""
        from .adaptive import Calibration

        fit = catalog.newest_calibration_fit(self.engine)
        return Calibration.from_dict(fit) if fit is not None else None

    # --- writing ---------------------------------------------------------------------

    def save_calibration(self, cal, text_source: str, n_tokens: int) -> int:
        """Store a fitted calibration; ``--adaptive`` uses the newest one from now on."""
        with self.write_lock():
            return catalog.add_calibration(self.engine, text_source=text_source, n_tokens=n_tokens,
                                           n_pairs=sum(c.n_pairs for c in self._rows if c.status == READY),
                                           kind=cal.kind, fit=cal.to_dict())

    def clear_calibrations(self) -> int:
        """Delete every calibration (``--adaptive`` falls back to the rule); returns how many."""
        with self.write_lock():
            return catalog.clear_calibrations(self.engine)

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

    # --- writing: the protocol lives in writer.py ----------------------------------------

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
        return self._writer.add_corpus(name, paths, options=options, settings=settings,
                                       progress=progress, index=index)

    def resume_corpus(self, name: str, progress: ProgressFn | None = None, index: bool = True) -> CorpusInfo:
        """Finish an interrupted or failed add: keeps the documents already committed."""
        return self._writer.resume_corpus(name, progress=progress, index=index)

    def remove_corpus(self, name: str) -> None:
        """Delete a corpus's pairs and catalog rows. The index is not rebuilt."""
        self._writer.remove_corpus(name)

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


def _vocab_rows(tokenizer) -> list[dict]:
    ids = list(range(len(tokenizer)))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    texts = tokenizer.batch_decode([[i] for i in ids])
    # SQL text cannot hold NUL (PostgreSQL refuses it): the NUL byte token reads "\x00".
    clean = lambda s: (s or "").replace("\x00", "\\x00")  # noqa: E731
    return [{"token_id": i, "piece": clean(p), "text": clean(t)} for i, p, t in zip(ids, pieces, texts)]
