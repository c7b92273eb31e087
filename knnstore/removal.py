"""Taking documents out of a store without a rebuild (``knnstore remove-documents``), and
removed rows off the disk (``knnstore purge``).

The documents are chosen by an SQL condition over the read-only ``documents`` view, run
in the same sandbox as ``knnstore sql`` (one SELECT, no files, no writes). Under the write
lock, the removal is three steps, each safe to be killed after:

1. a ``removals`` row records the intent (the documents' ids; status ``removing``);
2. one Lance delete of their pairs: one commit, so readers see every pair of those
   documents, or none;
3. one catalog transaction deletes the documents' rows, takes their counts off their
   corpora and marks the removal ``ok``.

A removal killed after step 1 is finished by the next writer that takes the lock for a
removal, or by ``knnstore check --repair`` (``finish_removals``): steps 2 and 3 again,
both idempotent. The index is not rebuilt: deleted rows leave it as Lance deletes them.

Lance deletes are logical (deletion vectors beside the data files, older versions still
whole): ``purge`` rewrites the data files holding deleted rows, drops old versions and
vacuums the catalog (docs/forget.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from . import catalog
from .errors import InputError
from .faults import crash_point
from .results import DocumentRemoval

if TYPE_CHECKING:
    from .store import Store

DONE = "ok"
_COLUMNS = "id, corpus_id, corpus, source, title, n_tokens, n_pairs"


def select_documents(store: "Store", where: str, corpus: str | None = None) -> list[dict]:
    """The ready documents matching ``where`` (an SQL condition over the ``documents``
    view), of corpus ``corpus`` only if given, in the store's latest snapshot."""
    if not isinstance(where, str) or not where.strip():
        raise InputError("--where needs an SQL condition over the documents view, e.g. "
                         "\"path LIKE '%/2019/%'\" or \"document_id IN (3, 7)\"")
    corpus_id = store.corpus(corpus).id if corpus is not None else None
    with store.sql_session() as session:
        try:
            rows = session.execute(f"SELECT {_COLUMNS} FROM documents WHERE ({where}) ORDER BY id").to_pylist()
        except InputError as exc:
            raise InputError(f"--where {where!r} is not an SQL condition over the documents view "
                             f"({str(exc).removeprefix('SQL error: ')}); `knnstore sql STORE "
                             "\"DESCRIBE documents\"` shows its columns") from None
    return [r for r in rows if corpus_id is None or r["corpus_id"] == corpus_id]


def remove_documents(store: "Store", where: str, corpus: str | None = None,
                     dry_run: bool = False) -> DocumentRemoval:
    """Remove the documents matching ``where`` (see ``select_documents``) and their pairs;
    with ``dry_run``, only say what would go. A condition matching nothing is an error."""
    if corpus is not None and not dry_run:
        store.corpus(corpus)  # a missing corpus fails before the lock is taken
    chosen = select_documents(store, where, corpus)
    if not chosen:
        scope = f" in corpus '{corpus}'" if corpus is not None else ""
        raise InputError(f"no document{scope} matches {where!r}: nothing was removed (try it first with "
                         "`knnstore sql STORE \"SELECT id, path FROM documents WHERE ...\"`)")
    if dry_run:
        return DocumentRemoval(where, chosen, sum(d["n_pairs"] for d in chosen), dry_run=True)
    with store.write_lock():
        finish_removals(store)
        chosen = select_documents(store, where, corpus)  # again, under the lock: what is there now
        if not chosen:
            raise InputError(f"no document matches {where!r} any more: nothing was removed")
        with Session(store.engine) as s, s.begin():
            row = catalog.Removal(command="remove-documents", condition=where, corpus=corpus, status=catalog.REMOVING,
                                  n_documents=len(chosen), n_pairs=sum(d["n_pairs"] for d in chosen),
                                  document_ids=[d["id"] for d in chosen])
            s.add(row)
            s.flush()
            removal_id = row.id
        crash_point("remove_documents.after_intent")
        _finish(store, removal_id, [d["id"] for d in chosen])
    store.refresh()
    return DocumentRemoval(where, chosen, sum(d["n_pairs"] for d in chosen), dry_run=False)


def finish_removals(store: "Store") -> int:
    """Finish removals a killed writer left half done (the caller holds the write lock);
    returns how many."""
    pending = catalog.unfinished_removals(store.engine)
    for removal in pending:
        _finish(store, removal.id, list(removal.document_ids or []))
    return len(pending)


def _finish(store: "Store", removal_id: int, document_ids: list[int]) -> None:
    """Steps 2 and 3: the pairs (one Lance commit), then the catalog rows and counts (one
    transaction). Both may run again after a crash."""
    store.verify_lock()
    if document_ids:
        store.table.delete_documents(document_ids)
    crash_point("remove_documents.after_table_delete")
    D, C = catalog.Document, catalog.Corpus
    with Session(store.engine) as s, s.begin():
        gone = s.execute(select(D.corpus_id, func.count(), func.coalesce(func.sum(D.n_tokens), 0),
                                func.coalesce(func.sum(D.n_pairs), 0))
                         .where(D.id.in_(document_ids)).group_by(D.corpus_id)).all()
        for corpus_id, n_docs, n_tokens, n_pairs in gone:
            s.execute(update(C).where(C.id == corpus_id).values(
                n_documents=C.n_documents - n_docs, n_tokens=C.n_tokens - n_tokens, n_pairs=C.n_pairs - n_pairs))
        s.execute(delete(D).where(D.id.in_(document_ids)))
        s.execute(update(catalog.Removal).where(catalog.Removal.id == removal_id).values(status=DONE))


def purge(store: "Store") -> dict[str, int]:
    """``knnstore purge``: removed rows off the disk. Finishes cut-short removals, rewrites
    the table's data files that hold deleted rows and drops old table versions
    (``PairsTable.purge``), then vacuums the catalog. Returns what it did, with the store's
    bytes before and after."""
    with store.write_lock():
        finish_removals(store)
        before = store.table.nbytes()
        store.verify_lock()
        done = store.table.purge()
        crash_point("purge.after_table")
        catalog.vacuum(store.engine)
    store.refresh()
    return {**done, "bytes_before": before, "bytes_after": store.table.nbytes()}
