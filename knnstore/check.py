"""Consistency check of a store: the catalog and the vector table must agree.

``check(store)`` reads everything once and lists problems; ``check(store, repair=True)``
also fixes what can be fixed without touching ready corpora (under the write lock):

| problem | severity | repair |
|---|---|---|
| vector column does not match the store's dim / dtype, a column is missing | error | none |
| the store cannot be opened (damaged marker, catalog or table; a catalog of another store) | error | none: the message says what to restore |
| a data file of the table is missing or unreadable | error | none: restore from a backup |
| rows whose corpus is not in the catalog (a removal killed half way, a lost catalog row) | error | delete those rows, only while catalog and table carry the same store id |
| a corpus left `removing` (remove-corpus was killed) | error | finish the removal |
| a document removal left `removing` (remove-documents was killed) | error | finish it (before the counts are compared) |
| a corpus left `ingesting` with no writer alive | warning | mark it failed |
| a failed corpus (rows invisible, resumable) | warning | none: resume-corpus or remove-corpus |
| ready corpus: catalog pairs != table rows, or != sum of its documents | error | none |
| ready document: catalog pairs != table rows | error | none |
| rows of documents the catalog does not know, inside a known corpus | error | delete those rows (not in a ready corpus) |
| rows added since the ANN index was trained | warning | none: `knnstore index` |
| runs left `running` by a process that died | warning | mark them failed |

Repair also removes data files that no committed version references (a killed add leaves
them behind) and versions older than the latest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from . import catalog
from .catalog import FAILED, INGESTING, READY, REMOVING
from .config import DTYPES
from .errors import StoreChangedError, StoreDamagedError
from .removal import finish_removals
from .schema import CODES, VECTOR_TYPES, pairs_schema
from .vectors import PairsTable, in_list, value_counts
from .writer import Writer

if TYPE_CHECKING:
    from .handle import StoreHandle

ERROR, WARNING = "error", "warning"


@dataclass
class Problem:
    severity: str  # "error" or "warning"
    what: str
    repair: str | None = None  # what --repair does about it; None: it cannot
    repaired: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class CheckReport:
    store: str
    corpora: int = 0
    documents: int = 0
    table_rows: int = 0
    problems: list[Problem] = field(default_factory=list)
    damaged: bool = False  # the table could not be read whole

    @property
    def ok(self) -> bool:
        """No error is left (warnings are allowed)."""
        return not any(p.severity == ERROR and not p.repaired for p in self.problems)

    def to_dict(self) -> dict:
        return {"store": self.store, "ok": self.ok, "corpora": self.corpora, "documents": self.documents,
                "table_rows": self.table_rows, "problems": [p.to_dict() for p in self.problems]}


def check(store: "StoreHandle", repair: bool = False) -> CheckReport:
    """Check that the catalog and the vector table agree; with ``repair``, fix what is safe."""
    if not repair:
        return _settled(store)
    try:
        with store.write_lock():  # refused on a table with missing data files: nothing is repaired
            report = _check(store, repair=True)
            if not report.damaged:
                store.table.cleanup()
    except StoreDamagedError:
        return _check(store, repair=False)  # the damage, as findings
    store.refresh()
    return report


def _settled(store: "StoreHandle", tries: int = 5) -> CheckReport:
    """``_check`` of one state of the store: where another process (a compaction, prune,
    purge, removal) changed the store while it was read, it is read again, so that a change
    under way is never reported as damage."""
    for _ in range(tries):
        try:
            store.refresh()
            with store.following():
                report = _check(store, repair=False)
        except StoreChangedError:
            continue
        if report.ok or not store.moved_on():
            return report
    raise StoreChangedError(f"{store.path} kept changing while it was checked (another process is writing to "
                            "it): run `knnstore check` again when that work has finished")


def damaged(path: str, message: str) -> CheckReport:
    """The report of a store that could not even be opened."""
    return CheckReport(store=str(path), problems=[Problem(ERROR, message)], damaged=True)


@dataclass
class _Seen:
    """One read of the table's ids and of the catalog's corpora and documents."""

    rows_by_corpus: dict[int, int]
    rows_by_doc: dict[int, int]
    corpora: list
    docs: list

    @property
    def known(self) -> set[int]:
        return {c.id for c in self.corpora}

    def docs_of(self, corpus_id: int) -> list:
        return [d for d in self.docs if d.corpus_id == corpus_id]


def _check(store: "StoreHandle", repair: bool) -> CheckReport:
    report = CheckReport(store=str(store.path))
    store.table.refresh()
    missing = store.table.missing_files()
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        report.problems.append(Problem(ERROR, f"{len(missing)} data file(s) of the pairs table are missing: "
                                              f"{shown}; restore the store from a backup"))
        report.damaged = True
        return report
    report.problems += _schema_problems(store)
    if report.problems:
        return report
    report.problems += _unfinished_removals(store, repair)
    report.problems += _leftover_tables(store, repair)
    try:
        cols = store.table.columns(["corpus_id", "document_id"])
    except StoreDamagedError as exc:
        report.problems.append(Problem(ERROR, str(exc)))
        report.damaged = True
        return report
    with Session(store.engine) as s:
        corpora = list(s.scalars(select(catalog.Corpus).order_by(catalog.Corpus.id)))
        docs = list(s.execute(select(catalog.Document.id, catalog.Document.corpus_id,
                                     catalog.Document.n_pairs, catalog.Document.status)))
    seen = _Seen(value_counts(cols.column("corpus_id").to_numpy()),
                 value_counts(cols.column("document_id").to_numpy()),
                 corpora, docs)
    report.table_rows, report.corpora, report.documents = cols.num_rows, len(corpora), len(docs)
    writer = store.writer_active() if not repair else False  # repair holds the lock itself
    report.problems += _orphan_rows(store, seen, repair)
    report.problems += _corpus_problems(store, seen, repair, writer)
    report.problems += _stray_documents(store, seen, repair)
    if not writer:
        report.problems += _stale_runs(store, repair)
    state = store.table.index_state()
    if state.has_vector_index and state.unindexed_rows:
        report.problems.append(Problem(WARNING, f"{state.unindexed_rows:,} rows are not in the ANN index yet "
                                                "(searched exactly meanwhile): `knnstore index` folds them in"))
    return report


def _unfinished_removals(store: "StoreHandle", repair: bool) -> list[Problem]:
    """Document removals cut short (``knnstore.removal``): finished by repair, before the
    counts are compared."""
    pending = catalog.unfinished_removals(store.engine)
    if not pending:
        return []
    documents = sum(r.n_documents for r in pending)
    p = Problem(ERROR, f"{len(pending)} document removal(s) ({documents:,} documents) were cut short",
                repair="finish them")
    if repair:
        finish_removals(store)
        p.repaired = True
    return [p]


def _schema_problems(store: "StoreHandle") -> list[Problem]:
    """Columns the table lacks, or a key column that is not the store's dim and dtype (or
    codes not of the store's width)."""
    ident, schema, problems = store.identity, store.table.schema, []
    want_schema = pairs_schema(ident.stored_dim, ident.dtype, code_bytes=ident.code_bytes)
    for name in want_schema.names:
        if name not in schema.names:
            problems.append(Problem(ERROR, f"the pairs table has no '{name}' column"))
    if "vector" in schema.names:
        vtype = schema.field("vector").type
        want = VECTOR_TYPES[ident.dtype]
        if not pa.types.is_fixed_size_list(vtype) or vtype.list_size != ident.stored_dim or vtype.value_type != want:
            problems.append(Problem(ERROR, f"the vector column is {vtype}; the store records dim "
                                           f"{ident.stored_dim} {ident.dtype} ({', '.join(DTYPES)} allowed)"))
    codes_want = want_schema.field(CODES).type if CODES in want_schema.names else None
    if codes_want is not None and CODES in schema.names and schema.field(CODES).type != codes_want:
        problems.append(Problem(ERROR, f"the codes column is {schema.field(CODES).type}; the store records "
                                       f"{ident.code_bytes} bytes of {ident.key_bits}-bit codes"))
    return problems


def leftover_tables(store: "StoreHandle") -> list[str]:
    """Tables in the store's LanceDB database other than the one its catalog names (left
    by a compaction cut short, ``knnstore.compaction``)."""
    return sorted(n for n in PairsTable.table_names(store.table.uri) if n != store.table.name)


def _leftover_tables(store: "StoreHandle", repair: bool) -> list[Problem]:
    names = leftover_tables(store)
    if not names:
        return []
    if not store.bound:
        return [Problem(WARNING, f"the vector database holds tables the catalog does not name ({', '.join(names)}); "
                                 "the store carries no id, so they are left alone")]
    p = Problem(WARNING, f"the vector database holds {len(names)} table(s) the catalog does not name "
                         f"({', '.join(names)}): left by a compaction that was cut short", repair="delete them")
    if repair:
        store.verify_lock()
        for name in names:
            PairsTable.drop(store.table.uri, name)
        p.repaired = True
    return [p]


def _orphan_rows(store: "StoreHandle", seen: _Seen, repair: bool) -> list[Problem]:
    """Rows of corpora the catalog does not know."""
    problems = []
    for cid, n in sorted(seen.rows_by_corpus.items()):
        if cid in seen.known:
            continue
        # Deleting is safe only if this catalog is the table's own: else every row of the
        # real store would look like an orphan. The store refused to open on a mismatch;
        # a store made before ids (an outside catalog, not bound yet) is never cleaned.
        if store.bound:
            p = Problem(ERROR, f"{n:,} rows belong to corpus id {cid}, which the catalog does not know "
                               "(a removal that was cut short?)", repair="delete those rows")
            if repair:
                store.verify_lock()
                store.table.delete_corpus(cid)
                p.repaired = True
        else:
            p = Problem(ERROR, f"{n:,} rows belong to corpus id {cid}, which the catalog does not know; "
                               "catalog and table carry no store id, so they are not deleted (is this "
                               "the store's own catalog?)")
        problems.append(p)
    return problems


def _corpus_problems(store: "StoreHandle", seen: _Seen, repair: bool, writer: bool) -> list[Problem]:
    """Each corpus by status: removals and ingests cut short, counts of ready ones."""
    problems = []
    for c in seen.corpora:
        in_table = seen.rows_by_corpus.get(c.id, 0)
        if c.status == REMOVING:
            p = Problem(ERROR, f"corpus '{c.name}' was being removed when its writer stopped",
                        repair="finish the removal")
            if repair:
                Writer(store).drop_corpus(c.id)
                p.repaired = True
            problems.append(p)
        elif c.status == INGESTING and writer:
            continue  # being written right now: nothing to compare yet
        elif c.status in (INGESTING, FAILED):
            p = Problem(WARNING, f"corpus '{c.name}' is incomplete ({in_table:,} rows, invisible to "
                                 f"readers): `knnstore resume-corpus {store.path} {c.name}` or "
                                 f"`knnstore remove-corpus {store.path} {c.name}`")
            if c.status == INGESTING:
                p.repair = "mark it failed"
                if repair:
                    catalog.set_corpus_status(store.engine, c.id, FAILED)
                    p.repaired = True
            problems.append(p)
        else:
            problems += _ready_counts(c, in_table, seen)
    return problems


def _ready_counts(c, in_table: int, seen: _Seen) -> list[Problem]:
    """A ready corpus: catalog, documents and table must agree on every count."""
    problems, mine = [], seen.docs_of(c.id)
    if in_table != c.n_pairs:
        problems.append(Problem(ERROR, f"corpus '{c.name}': the catalog counts {c.n_pairs:,} pairs, "
                                       f"the table holds {in_table:,}"))
    if sum(d.n_pairs for d in mine) != c.n_pairs or len(mine) != c.n_documents:
        problems.append(Problem(ERROR, f"corpus '{c.name}': its {len(mine):,} documents do not add "
                                       f"up to its counts ({c.n_documents:,} documents, {c.n_pairs:,} pairs)"))
    for d in mine:
        if d.status != READY:
            problems.append(Problem(ERROR, f"corpus '{c.name}' is ready but document {d.id} is {d.status}"))
        elif seen.rows_by_doc.get(d.id, 0) != d.n_pairs:
            problems.append(Problem(ERROR, f"document {d.id} of '{c.name}': the catalog counts "
                                           f"{d.n_pairs:,} pairs, the table holds {seen.rows_by_doc.get(d.id, 0):,}"))
    return problems


def _stray_documents(store: "StoreHandle", seen: _Seen, repair: bool) -> list[Problem]:
    """Rows of documents the catalog does not know, inside known corpora (unknown corpora
    were reported as orphans)."""
    known_docs = {d.id for d in seen.docs}
    stray = {doc: n for doc, n in seen.rows_by_doc.items() if doc not in known_docs}
    if not stray:
        return []
    owners = store.table.columns(["corpus_id", "document_id"], where=in_list("document_id", sorted(stray)))
    by_doc = dict(zip(owners.column("document_id").to_pylist(), owners.column("corpus_id").to_pylist()))
    status = {c.id: c.status for c in seen.corpora}
    problems = []
    for doc, n in sorted(stray.items()):
        cid = by_doc.get(doc)
        if cid not in seen.known:
            continue
        p = Problem(ERROR, f"{n:,} rows of document id {doc} (corpus id {cid}) have no catalog row")
        if status.get(cid) != READY:
            p.repair = "delete those rows"
            if repair:
                store.verify_lock()
                store.table.delete_documents([doc])
                p.repaired = True
        problems.append(p)
    return problems


def _stale_runs(store: "StoreHandle", repair: bool) -> list[Problem]:
    """Runs recorded as running while no process writes: their process died."""
    with Session(store.engine) as s:
        stale = list(s.scalars(select(catalog.IngestRun.id).where(catalog.IngestRun.status == "running")))
    if not stale:
        return []
    p = Problem(WARNING, f"{len(stale)} run(s) are recorded as running, but no process is writing "
                         "(killed)", repair="mark them failed")
    if repair:
        with Session(store.engine) as s, s.begin():
            s.execute(update(catalog.IngestRun).where(catalog.IngestRun.id.in_(stale)).values(
                status="failed", finished_at=catalog.utcnow(),
                error=func.coalesce(catalog.IngestRun.error, "interrupted: its process died")))
        p.repaired = True
    return [p]
