"""The write protocol: add, resume and remove corpora (docs/reliability.md).

A corpus is created ``ingesting``; its documents are inserted ``pending`` before their
pairs are written; pairs are committed to LanceDB every ``commit_every`` pairs; documents
turn ``ready`` in the catalog transaction after the commit holding their last pair, and
the corpus turns ``ready`` last. Any failure marks it ``failed`` (invisible, resumable);
a crash leaves it ``ingesting`` with no writer, which reads as failed. Sources are read
and validated before the write lock is taken; the lock is re-checked before every commit.
Crash points (``faults.crash_point``) name every step for the kill -9 tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from . import catalog, indexing, ingest
from .catalog import FAILED, INGESTING, PENDING, READY, REMOVING
from .config import VECTORS_DIR, IngestSettings, ProgressFn, SourceOptions
from .errors import (
    CorpusExistsError,
    CorpusNotFoundError,
    DiskFullError,
    InputError,
    StorageError,
    StoreLockedError,
)
from .distributed import RayOptions, check_ray, encode_on_ray
from .faults import crash_point
from .handle import normalise_name
from .index_kinds import INDEX_TYPES, choose
from .indexing import IndexPlan, IndexPolicy, IndexWatch
from .location import storage_failure
from .projection import FIT_KEYS, KeyProjection
from .schema import key_matrix, pairs_schema, row_bytes

if TYPE_CHECKING:
    from .results import CorpusInfo
    from .handle import StoreHandle

_MAX_DOCS_PER_COMMIT = 10_000


class Writer:
    """The writes of one store (``Store.add_corpus`` and friends delegate here)."""

    def __init__(self, store: "StoreHandle") -> None:
        self.store = store

    def add_corpus(self, name: str, paths: Sequence[str | os.PathLike], *,
                   options: SourceOptions = SourceOptions(),
                   settings: IngestSettings | None = None,
                   progress: ProgressFn | None = None, index: bool = True,
                   ray: RayOptions | None = None) -> CorpusInfo:
        """``Store.add_corpus``: read and validate, then (under the lock) write and index."""
        settings = settings or IngestSettings.resolve()
        if ray is not None:
            check_ray(ray)  # installed and reachable? Before anything is read or written
        name, paths = self.check_new_corpus(name, paths)  # before the model loads in scan
        # Read and validate every source before taking the lock: a writer never waits for input.
        scan = ingest.scan(paths, options, self.store.encoder.tokenize)
        with self.store.write_lock():
            self._check_new_name(name)  # again: another writer may have taken it meanwhile
            self._check_free_space(name, scan.n_tokens)
            spec = {"paths": paths, "options": dataclasses.asdict(options),
                    "settings": dataclasses.asdict(settings),
                    "skipped": scan.skipped[:100]}
            with Session(self.store.engine) as s, s.begin():
                row = catalog.Corpus(name=name, source=" ".join(paths), spec=spec, status=INGESTING)
                s.add(row)
                s.flush()
                corpus_id = row.id
            crash_point("add.after_corpus_row")
            self._ingest(corpus_id, name, "add", scan.n_tokens, progress, ray)
            if index:
                self.maintain_index()
        return self.store.corpus(name)

    def resume_corpus(self, name: str, progress: ProgressFn | None = None, index: bool = True,
                      ray: RayOptions | None = None) -> CorpusInfo:
        """Finish an interrupted or failed add: keeps the documents already committed."""
        if ray is not None:
            check_ray(ray)
        self.store.refresh()
        info = self._resumable(name)
        with Session(self.store.engine) as s:
            spec = s.get(catalog.Corpus, info.id).spec
        # Read and validate the sources before taking the lock: a writer never waits for input.
        scan = ingest.scan(spec["paths"], SourceOptions(**spec["options"]), self.store.encoder.tokenize)
        with self.store.write_lock():
            info = self._resumable(name)
            name = info.name  # as stored: spaces around a given name are not part of it
            self._check_free_space(name, scan.n_tokens - info.tokens)
            self._ingest(info.id, name, "resume", scan.n_tokens, progress, ray)
            if index:
                self.maintain_index()
        return self.store.corpus(name)

    # --- the ANN index: trained, updated, kept by the policy (``indexing``) -----------------

    def create_index(self, num_partitions: int | None = None, num_sub_vectors: int | None = None,
                     index_type: str | None = None) -> None:
        """Train the ANN index on the stored keys; searches use it from then on.

        ``index_type``: ``ivf_rq`` (the default: IVF with 4-bit RaBitQ codes, ranked
        without re-reading keys) or ``ivf_pq`` (IVF-PQ, re-ranked with exact distances);
        see ``PairsTable.create_index``.
        """
        table = self.store.table
        self._index_build("train", lambda: table.count(), lambda: table.create_index(
            num_partitions=num_partitions, num_sub_vectors=num_sub_vectors, index_type=index_type,
            device=self.store.device))

    def update_index(self) -> int:
        """Index the rows added since the index was trained (a delta index, no retraining);
        returns how many rows it indexed."""
        table = self.store.table
        return self._index_build("update", lambda: table.index_state().unindexed_rows,
                                 lambda: table.update_index() or {})

    def _index_build(self, kind: str, new_rows: Callable[[], int], build: Callable[[], dict]) -> int:
        """Run one index build under the write lock and record it (``index_builds``);
        returns the rows it indexed (``new_rows()`` before the build)."""
        with self.store.write_lock():
            self.store.refresh()
            new = new_rows()
            crash_point("index.before")
            t0 = time.perf_counter()
            params = build()
            seconds = time.perf_counter() - t0
            crash_point("index.after")
            catalog.record_index_build(self.store.engine, kind, seconds, self.store.table.count(), new, params)
        self.store.refresh()
        return new

    def index_plan(self) -> IndexPlan:
        """What the index policy would do now (``indexing.plan``)."""
        state = self.store.table.index_state()
        trained = catalog.last_trained_rows(self.store.engine)
        if trained is None and state.has_vector_index:  # trained before builds were recorded
            trained = state.indexed_rows or None
        return indexing.plan(self.store.table.count(), state.has_vector_index, state.indexed_rows,
                             state.unindexed_rows, trained, IndexPolicy.from_env())

    def maintain_index(self, watch: IndexWatch | None = None) -> IndexPlan:
        """Apply the index policy (``index_plan``); returns the plan it carried out (a build
        runs inside ``watch(plan)``)."""
        with self.store.write_lock():
            self.store.refresh()
            plan = self.index_plan()
            with watch(plan) if watch is not None and plan.action != "none" else contextlib.nullcontext():
                if plan.action == "train":
                    self.create_index()
                elif plan.action == "retrain":  # keep the type the user chose
                    kind = self.store.table.index_type()
                    self.create_index(index_type=kind if kind in INDEX_TYPES else None)
                elif plan.action == "update":
                    self.update_index()
        return plan

    def index(self, *, rebuild: bool = False, index_type: str | None = None, num_partitions: int | None = None,
              num_sub_vectors: int | None = None, watch: IndexWatch | None = None) -> IndexPlan:
        """``knnstore index``: train an index now where asked (``rebuild``, or any of its
        parameters given, checked before anything runs: ``index_kinds.choose``), else apply
        the policy (``maintain_index``); a build runs inside ``watch(plan)``. Returns what the
        policy says afterwards."""
        if rebuild or index_type or num_partitions or num_sub_vectors:
            table = self.store.table
            kind = choose(table.count(), table.dim, index_type, num_partitions, num_sub_vectors)
            asked = dataclasses.replace(self.index_plan(), action="rebuild", reason=f"{table.count():,} rows")
            with watch(asked) if watch is not None else contextlib.nullcontext():
                self.create_index(num_partitions=num_partitions, num_sub_vectors=num_sub_vectors,
                                  index_type=kind.name)
        else:
            self.maintain_index(watch)
        return self.index_plan()

    # --- calibrations (adaptive λ): rows of their own, written under the lock ----------------

    def save_calibration(self, cal, text_source: str, n_tokens: int) -> int:
        with self.store.write_lock():
            pairs = sum(c.pairs for c in self.store.corpora() if c.status == READY)
            return catalog.add_calibration(self.store.engine, text_source=text_source, n_tokens=n_tokens,
                                           n_pairs=pairs, kind=cal.kind, fit=cal.to_dict())

    def clear_calibrations(self) -> int:
        with self.store.write_lock():
            return catalog.clear_calibrations(self.store.engine)

    def _resumable(self, name: str) -> CorpusInfo:
        info = self.store.corpus(name)
        if info.status == READY:
            raise InputError(f"corpus {info.name!r} is complete; nothing to resume")
        if info.status == REMOVING:
            raise InputError(f"corpus {info.name!r} is being removed; run `knnstore remove-corpus` again")
        if info.status == INGESTING and self.store.writer_active() and not self.store.holds_lock:
            raise StoreLockedError(f"corpus {info.name!r} is being added by another process right now; "
                                   "wait for it to finish")
        return info

    def remove_corpus(self, name: str) -> None:
        """Delete a corpus's pairs and catalog rows. The index is not rebuilt."""
        with self.store.write_lock():
            info = self.store.corpus(name)
            run = self._start_run(info.id, info.name, "remove")
            self._set_status(info.id, REMOVING)
            crash_point("remove.after_status")
            self.drop_corpus(info.id)
            self._finish_run(run, "ok", n_documents=info.documents, n_pairs=info.pairs)
        self.store.refresh()

    def drop_corpus(self, corpus_id: int) -> None:
        """Delete a corpus's pairs, then its catalog rows (the caller holds the write lock)."""
        self.store.verify_lock()
        self.store.table.delete_corpus(corpus_id)
        crash_point("remove.after_table_delete")
        with Session(self.store.engine) as s, s.begin():
            s.execute(delete(catalog.Document).where(catalog.Document.corpus_id == corpus_id))
            s.execute(delete(catalog.Corpus).where(catalog.Corpus.id == corpus_id))

    def _check_free_space(self, name: str, n_tokens: int) -> None:
        """Refuse, before writing anything, a corpus the disk cannot hold (an object store
        has no free space to ask)."""
        if self.store.location.remote:
            return
        ident = self.store.identity
        need = int(n_tokens * row_bytes(ident.stored_dim, ident.dtype, ident.code_bytes) * 1.2) + (1 << 20)
        free = shutil.disk_usage(self.store.location.path / VECTORS_DIR).free
        if free < need:
            raise DiskFullError(
                f"the disk holding {self.store.path} has {free / 2**20:,.1f} MiB free; corpus '{name}' "
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
            existing = self.store.corpus(name)
        except CorpusNotFoundError:
            return
        if existing.status == READY:
            raise CorpusExistsError(
                f"a corpus named {name!r} is already in {self.store.path}; pick another name, "
                f"or remove it first with `knnstore remove-corpus {self.store.path} {name}`"
            )
        raise CorpusExistsError(
            f"corpus {name!r} exists and is {existing.status} ({existing.error}); finish it with "
            f"`knnstore resume-corpus {self.store.path} {name}` or drop it with "
            f"`knnstore remove-corpus {self.store.path} {name}`"
        )

    def _start_run(self, corpus_id: int, name: str, kind: str) -> int:
        with Session(self.store.engine) as s, s.begin():
            run = catalog.IngestRun(corpus_id=corpus_id, corpus_name=name, kind=kind, status="running")
            s.add(run)
            s.flush()
            return run.id

    def _finish_run(self, run_id: int, status: str, **values) -> None:
        with Session(self.store.engine) as s, s.begin():
            s.execute(update(catalog.IngestRun).where(catalog.IngestRun.id == run_id)
                      .values(status=status, finished_at=catalog.utcnow(), **values))

    def _ingest(self, corpus_id: int, name: str, kind: str, total_tokens: int,
                progress: ProgressFn | None, ray: RayOptions | None = None) -> None:
        """Encode the corpus's documents not yet committed, commit by commit (or, on Ray,
        in one commit at the end).

        This handle hides the corpus from its own searches until it is ready.
        """
        self.store.refresh()
        try:
            if ray is None:
                self._ingest_documents(corpus_id, name, kind, total_tokens, progress)
            else:
                self._ingest_on_ray(corpus_id, name, kind, total_tokens, progress, ray)
        except BaseException:
            try:
                self.store.refresh()
            except Exception:  # e.g. the object store is gone: the error raised says so
                pass
            raise
        self.store.refresh()
        self.store.table.index_pairs()

    def _ingest_on_ray(self, corpus_id: int, name: str, kind: str, total_tokens: int,
                       progress: ProgressFn | None, ray: RayOptions) -> None:
        """The documents not yet committed, encoded by Ray workers into uncommitted
        fragments, then committed in one Lance commit and made ready (``distributed``)."""
        with self._run(corpus_id, name, kind) as totals:
            spec, done = self._restart(corpus_id)
            settings = IngestSettings(**spec["settings"])
            counter = _Progress(progress, total_tokens)
            pending: list[tuple[int, np.ndarray]] = []  # int32 tokens: 4 bytes a token in the driver
            for group in self._pending_groups(corpus_id, name, spec, done, counter):
                pending += [(doc_id, np.asarray(tokens, dtype=np.int32)) for doc_id, tokens in group]
                totals.tokens += sum(len(tokens) for _, tokens in group)
            crash_point("ingest.after_documents_row")
            if self._needs_projection():  # fitted here, on the driver; the workers encode them again
                pairs_so_far = np.cumsum([len(tokens) - 1 for _, tokens in pending])
                first = pending[:int(np.searchsorted(pairs_so_far, FIT_KEYS)) + 1]
                self._fit_projection([(first, list(self._raw_batches(first, corpus_id, settings, name)))])
            fragments, pairs = [], 0
            if pending:  # (a resume may find every document committed already)
                fragments, pairs = encode_on_ray(
                    pending, identity=self.store.identity, table_uri=self.store.table.table_uri,
                    schema=self.store.table.schema, settings=settings, corpus_id=corpus_id, corpus=name,
                    store_path=str(self.store.path), options=ray, device=str(self.store.device),
                    compute_dtype=self.store.compute_dtype, encoder=self.store.encoder,
                    projection=self.store.projection,
                    progress=lambda n_docs, n_pairs: counter.advance(n_pairs + n_docs))  # their tokens
            crash_point("commit.before_table_add")
            self.store.verify_lock()
            self.store.table.append_fragments(fragments)
            crash_point("commit.after_table_add")
            totals.add_commit(len(pending), pairs)
            self._mark_ready(corpus_id, [doc_id for doc_id, _ in pending])
            self._corpus_ready(corpus_id, totals, counter)

    def _ingest_documents(self, corpus_id: int, name: str, kind: str, total_tokens: int,
                          progress: ProgressFn | None) -> None:
        with self._run(corpus_id, name, kind) as totals:
            spec, done = self._restart(corpus_id)
            settings = IngestSettings(**spec["settings"])
            buffer = _CommitBuffer(self._add_pairs, functools.partial(self._commit, corpus_id),
                                   settings.commit_every)
            counter = _Progress(progress, total_tokens)
            groups = self._pending_groups(corpus_id, name, spec, done, counter)
            for group, encoded in self._encoded(groups, corpus_id, settings, name):
                crash_point("ingest.after_documents_row")
                buffer.documents += [doc_id for doc_id, _ in group]
                for batch, n_new in encoded:
                    crash_point("ingest.after_encode")
                    buffer.add(batch)
                    counter.advance(n_new)
                totals.tokens += sum(len(tokens) for _, tokens in group)
                counter.advance(len(group), report=False)  # each document's last token adds no pair
                if buffer.full():
                    totals.add_commit(*buffer.commit())
            totals.add_commit(*buffer.commit())
            self._corpus_ready(corpus_id, totals, counter)

    def _needs_projection(self) -> bool:
        """Whether the store reduces its keys and its projection is still to be fitted."""
        return self.store.identity.key_dim is not None and self.store.projection is None

    def _raw_batches(self, group, corpus_id: int, settings: IngestSettings, name: str):
        """A group's pairs with the model's own keys (float32), for fitting the projection."""
        raw = pairs_schema(self.store.identity.dim, "float32")
        forward = ingest.model_forward(self.store.encoder, name, self.store.path)
        return ingest.encode_documents(forward, group, corpus_id, settings, raw)

    def _encoded(self, groups, corpus_id: int, settings: IngestSettings, name: str):
        """(group, its (record batch, new positions)) for each group of documents. On a
        store that reduces its keys and has no projection yet, the first groups' keys (up
        to ``FIT_KEYS``) are encoded once, the projection fitted on them and recorded, and
        their batches projected; the rest are encoded with it."""
        schema = self.store.table.schema
        if self._needs_projection():
            held, n_keys = [], 0
            for group in groups:
                batches = list(self._raw_batches(group, corpus_id, settings, name))
                held.append((group, batches))
                n_keys += sum(b.num_rows for b, _ in batches)
                if n_keys >= FIT_KEYS:
                    break
            projection = self._fit_projection(held)
            for group, batches in held:
                yield group, [(ingest.with_keys(b, projection.apply(key_matrix(b.column("vector"))), schema,
                                                projection), n) for b, n in batches]
        forward = ingest.model_forward(self.store.encoder, name, self.store.path, self.store.projection)
        for group in groups:
            yield group, ingest.encode_documents(forward, group, corpus_id, settings, schema, self.store.projection)

    def _fit_projection(self, held) -> KeyProjection:
        """Fit the store's projection on the keys of ``held`` [(group, [(raw batch, n)])]:
        the first ``FIT_KEYS`` pairs of the corpus in pair-id order (its first documents,
        however they were batched: one process and Ray fit on the same keys), and record it."""
        batches = [b for _, group in held for b, _ in group]
        keys = np.concatenate([key_matrix(b.column("vector")) for b in batches])
        ids = np.concatenate([b.column("pair_id").to_numpy() for b in batches])
        keys = keys[np.argsort(ids, kind="stable")[:FIT_KEYS]]
        ident = self.store.identity
        projection = KeyProjection.fit(keys, ident.key_dim, ident.key_bits, ident.route_dim)
        self.store.set_projection(projection)
        return projection

    def _pending_groups(self, corpus_id: int, name: str, spec: dict, done: dict[int, str],
                        counter: "_Progress") -> Iterator[list[tuple[int, list[int]]]]:
        """The corpus's documents an earlier run did not commit, tokenised, in groups of about
        four batches of windows, each group inserted as pending documents first: (document
        id, tokens) per document. Documents already committed count as progress."""
        settings, options = IngestSettings(**spec["settings"]), SourceOptions(**spec["options"])
        docs = ingest.limited(ingest.iter_documents(spec["paths"], options), options.max_documents)
        for group in _groups(docs, self.store.encoder.tokenize, settings):
            fresh = _not_yet_done(group, done, name, counter)
            if fresh:
                yield list(zip(self._insert_documents(corpus_id, fresh), (tokens for _, tokens in fresh)))

    def _corpus_ready(self, corpus_id: int, totals: "_RunTotals", counter: "_Progress") -> None:
        """Every pair is committed and every document ready: the corpus turns ready."""
        crash_point("ingest.before_corpus_ready")
        self._set_status(corpus_id, READY, ready_at=catalog.utcnow())
        totals.ready = True
        crash_point("ingest.after_corpus_ready")
        counter.finish()

    def _restart(self, corpus_id: int) -> tuple[dict, dict[int, str]]:
        """Drop what an interrupted run left half-done (pairs of documents still pending)
        and mark the corpus ingesting; returns its spec and the sha256 of each ready
        document by ordinal (what a resume keeps)."""
        with Session(self.store.engine, expire_on_commit=False) as s:
            spec = s.get(catalog.Corpus, corpus_id).spec
            done = {d.ordinal: d.sha256 for d in s.scalars(
                select(catalog.Document).where(catalog.Document.corpus_id == corpus_id,
                                               catalog.Document.status == READY))}
            pending_ids = list(s.scalars(select(catalog.Document.id).where(
                catalog.Document.corpus_id == corpus_id, catalog.Document.status == PENDING)))
        self.store.table.delete_documents(pending_ids)
        if pending_ids:
            crash_point("resume.after_pending_dropped")
        with Session(self.store.engine) as s, s.begin():
            s.execute(delete(catalog.Document).where(catalog.Document.id.in_(pending_ids)))
            s.execute(update(catalog.Corpus).where(catalog.Corpus.id == corpus_id).values(status=INGESTING))
        return spec, done

    def _set_status(self, corpus_id: int, status: str, **values) -> None:
        self.store.verify_lock()
        catalog.set_corpus_status(self.store.engine, corpus_id, status, **values)

    @contextmanager
    def _run(self, corpus_id: int, name: str, kind: str) -> Iterator["_RunTotals"]:
        """One ``ingest_runs`` row around an add or resume: closed ``ok`` with the totals,
        or, on any error before the corpus is ready, ``failed`` with the corpus marked
        failed (an error after it is ready changes nothing: the corpus is whole)."""
        run, totals, started = self._start_run(corpus_id, name, kind), _RunTotals(), time.monotonic()
        try:
            yield totals
        except BaseException as exc:
            if totals.ready:
                self._finish_run(run, "ok", **totals.counts())
                raise
            message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            try:
                catalog.set_corpus_status(self.store.engine, corpus_id, FAILED)
                self._finish_run(run, "failed", error=message[:2000], **totals.counts())
            except Exception:  # e.g. the disk is full for the catalog too; it reads failed anyway
                pass
            failure = storage_failure(exc) if self.store.location.remote else None
            if failure is not None:
                raise StorageError(
                    f"the object store holding {self.store.path} failed while adding '{name}' ({failure}); "
                    f"the corpus is kept as failed and invisible. Once it is reachable again, `knnstore "
                    f"resume-corpus {self.store.path} {name}` (or `knnstore remove-corpus {self.store.path} "
                    f"{name}`)") from None
            if _is_disk_full(exc):
                raise DiskFullError(
                    f"the disk holding {self.store.path} filled up while adding '{name}'; the corpus is "
                    f"kept as failed and invisible. Free some space, then `knnstore resume-corpus "
                    f"{self.store.path} {name}` (or `knnstore remove-corpus {self.store.path} {name}`)"
                ) from None
            raise
        elapsed = max(time.monotonic() - started, 1e-9)
        self._finish_run(run, "ok", **totals.counts(), tokens_per_s=totals.tokens / elapsed)

    def _insert_documents(self, corpus_id: int, docs) -> list[int]:
        with Session(self.store.engine) as s, s.begin():
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
            self.store.verify_lock()
            schema = self.store.table.schema

            def stream():  # one commit, streamed batch by batch
                for i, batch in enumerate(batches):
                    if i == len(batches) // 2:
                        crash_point("commit.mid_table_add")
                    yield batch

            self.store.table.add(pa.RecordBatchReader.from_batches(schema, stream()))
        return sum(b.num_rows for b in batches)

    def _commit(self, corpus_id: int, batches: list[pa.RecordBatch], doc_ids: list[int]) -> int:
        """One LanceDB commit of the pending pairs, then mark their documents ready."""
        if not doc_ids:
            return 0
        n_pairs = self._add_pairs(batches)
        crash_point("commit.after_table_add")
        self._mark_ready(corpus_id, doc_ids)
        crash_point("commit.after_documents_ready")
        return n_pairs

    def _mark_ready(self, corpus_id: int, doc_ids: list[int]) -> None:
        """Documents whose pairs are all committed turn ready; the corpus's counts follow."""
        self.store.verify_lock()
        with Session(self.store.engine) as s, s.begin():
            s.execute(update(catalog.Document).where(catalog.Document.id.in_(doc_ids)).values(status=READY))
            catalog.recount_corpus(s, corpus_id)


@dataclass
class _RunTotals:
    """What one run did, for its ``ingest_runs`` row."""

    documents: int = 0
    tokens: int = 0  # tokens encoded (documents kept from an earlier run not counted)
    pairs: int = 0
    ready: bool = False  # the corpus was marked ready: nothing after it can fail the run

    def add_commit(self, documents: int, pairs: int) -> None:
        self.documents += documents
        self.pairs += pairs

    def counts(self) -> dict:
        return {"n_documents": self.documents, "n_tokens": self.tokens, "n_pairs": self.pairs}


class _CommitBuffer:
    """Encoded pairs not yet committed, and the pending documents they belong to.

    ``commit()`` is one LanceDB commit of the pairs, then the catalog transaction that
    marks the documents ready. A long document's pairs go to the table early, every
    ``commit_every`` pairs (memory stays bounded whatever its length); its document
    stays pending, so those pairs stay invisible, until the commit that marks it ready.
    """

    def __init__(self, add_pairs: Callable[[list[pa.RecordBatch]], int],
                 commit: Callable[[list[pa.RecordBatch], list[int]], int], commit_every: int) -> None:
        """``add_pairs(batches)`` writes pairs (documents stay pending); ``commit(batches,
        documents)`` writes pairs and makes documents ready; both return the pairs written."""
        self.add_pairs, self.commit_pairs, self.commit_every = add_pairs, commit, commit_every
        self.batches: list[pa.RecordBatch] = []
        self.rows = 0
        self.documents: list[int] = []  # documents not yet ready
        self.flushed = 0  # pairs of those documents already in the table

    def add(self, batch: pa.RecordBatch) -> None:
        self.batches.append(batch)
        self.rows += batch.num_rows
        if self.rows >= self.commit_every:
            self.flushed += self.add_pairs(self.batches)
            crash_point("commit.after_partial_add")
            self.batches, self.rows = [], 0

    def full(self) -> bool:
        """Bounded in pairs, and in documents (SQL parameter limits with tiny ones)."""
        return self.flushed + self.rows >= self.commit_every or len(self.documents) >= _MAX_DOCS_PER_COMMIT

    def commit(self) -> tuple[int, int]:
        """Commit everything buffered; returns (documents, pairs) made ready."""
        pairs = self.flushed + self.commit_pairs(self.batches, self.documents)
        documents = len(self.documents)
        self.batches, self.documents, self.rows, self.flushed = [], [], 0, 0
        return documents, pairs


class _Progress:
    """Tokens done of a corpus, reported to a progress callback."""

    def __init__(self, callback: ProgressFn | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def advance(self, n: int, report: bool = True) -> None:
        self.done += n
        if report and self.callback and self.done:
            self.callback(self.done, self.total)

    def finish(self) -> None:
        if self.callback:
            self.callback(self.total, self.total)


def _not_yet_done(group, done: dict[int, str], name: str, counter: _Progress) -> list:
    """The documents of a group that an earlier run did not commit; the others count as
    done, and must not have changed since."""
    fresh, kept = [], 0
    for doc, tokens in group:
        if doc.ordinal not in done:
            fresh.append((doc, tokens))
            continue
        if done[doc.ordinal] != doc.sha256:
            raise InputError(f"{doc.source} changed since corpus '{name}' was started; remove the "
                             "corpus and add it again")
        kept += len(tokens)
    counter.advance(kept)
    return fresh


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
