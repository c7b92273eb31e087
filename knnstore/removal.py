"""Taking data out of a store without a rebuild: documents (``knnstore remove-documents``),
a string wherever it occurs (``knnstore forget``), and removed rows off the disk
(``knnstore purge``).

``remove-documents`` chooses documents by an SQL condition over the read-only
``documents`` view, run in the same sandbox as ``knnstore sql`` (one SELECT, no files, no
writes); ``forget`` finds the string in the documents' decoded stored tokens
(``occurrences``) and chooses the pairs that predict a token of it. Under the write lock,
either removal is three steps, each safe to be killed after:

1. a ``removals`` row records the intent (the documents' ids, and for ``forget`` the
   pairs'; status ``removing``);
2. one Lance delete of their pairs: one commit, so readers see all of them, or none;
3. one catalog transaction deletes the documents' rows (or recounts their pairs), recounts
   their corpora and marks the removal ``ok``.

A removal killed after step 1 is finished by the next writer that takes the lock for a
removal, or by ``knnstore check --repair`` (``finish_removals``): steps 2 and 3 again,
both idempotent. The index is not rebuilt: deleted rows leave it as Lance deletes them.

Lance deletes are logical (deletion vectors beside the data files, older versions still
whole): ``purge`` rewrites the data files holding deleted rows, drops old versions and
vacuums the catalog (docs/forget.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from . import catalog, occurrences
from .config import MAX_WINDOW, check_number
from .errors import InputError
from .faults import crash_point
from .results import DocumentRemoval, Forgetting
from .schema import pair_id
from .vectors import in_list

if TYPE_CHECKING:
    from .handle import StoreHandle

DONE = "ok"
PRUNE = "prune"  # a removals row of ``knnstore prune`` (its corpus id in document_ids[0])
_COLUMNS = "id, corpus_id, corpus, source, title, n_tokens, n_pairs"


def select_documents(store: "StoreHandle", where: str, corpus: str | None = None) -> list[dict]:
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


def remove_documents(store: "StoreHandle", where: str, corpus: str | None = None,
                     dry_run: bool = False, refuse_above: int | None = None) -> DocumentRemoval:
    """Remove the documents matching ``where`` (see ``select_documents``) and their pairs;
    with ``dry_run``, only say what would go. A condition matching nothing is an error; with
    ``refuse_above`` (``remove-documents`` without ``--yes``), so is one matching every
    ready document of the store or more than that many."""
    chosen = select_documents(store, where, corpus)  # a missing corpus fails here, before the lock
    if not chosen:
        scope = f" in corpus '{corpus}'" if corpus is not None else ""
        raise InputError(f"no document{scope} matches {where!r}: nothing was removed (try it first with "
                         "`knnstore sql STORE \"SELECT id, path FROM documents WHERE ...\"`)")
    if refuse_above is not None and not dry_run:
        held = sum(c.documents for c in store.corpora() if c.status == catalog.READY)
        if len(chosen) == held or len(chosen) > refuse_above:
            what = f"every document of the store ({held:,})" if len(chosen) == held else f"{len(chosen):,} documents"
            raise InputError(f"--where matches {what}: check it with --dry-run, and add --yes to remove them; "
                             "nothing was removed")
    if dry_run:
        return DocumentRemoval(where, chosen, sum(d["n_pairs"] for d in chosen), dry_run=True)
    with store.write_lock():
        finish_removals(store)
        chosen = select_documents(store, where, corpus)  # again, under the lock: what is there now
        if not chosen:
            raise InputError(f"no document matches {where!r} any more: nothing was removed")
        salt = secrets.token_hex(16)  # the condition may name what is removed: kept only as a salted hash
        removal = record(store, command="remove-documents", corpus=corpus, salt=salt,
                          text_hash=hashlib.sha256((salt + where).encode("utf-8")).hexdigest(),
                          n_documents=len(chosen), n_pairs=sum(d["n_pairs"] for d in chosen),
                          document_ids=[d["id"] for d in chosen])
        crash_point("remove_documents.after_intent")
        finish(store, removal)
    store.refresh()
    return DocumentRemoval(where, chosen, sum(d["n_pairs"] for d in chosen), dry_run=False)


def finish_removals(store: "StoreHandle") -> int:
    """Finish removals a killed writer left half done (the caller holds the write lock);
    returns how many."""
    pending = catalog.unfinished_removals(store.engine)
    for removal in pending:
        finish(store, removal)
    return len(pending)


def record(store: "StoreHandle", redactions: dict | None = None, **values) -> catalog.Removal:
    """Step 1: the removal's intent row (``removing``), committed before anything goes
    (``prune`` records its own the same way), in one transaction with the ``redactions``
    of catalog fields (``_catalog_fields``): the text is never kept to redact them later."""
    with Session(store.engine, expire_on_commit=False) as s, s.begin():
        row = catalog.Removal(status=catalog.REMOVING, **values)
        s.add(row)
        for model, rows in (redactions or {}).items():
            for row_id, changes in rows.items():
                s.execute(update(model).where(model.id == row_id).values(
                    {getattr(model, name): value for name, value in changes.items()}))
    return row


def finish(store: "StoreHandle", removal: catalog.Removal) -> None:
    """Steps 2 and 3: the pairs (one Lance commit), then the catalog rows and counts (one
    transaction). Both may run again after a crash. Whole documents go with their rows;
    single pairs (``forget``) leave their documents with recounted pairs; a ``prune`` (its
    merge is one commit, done or not) has only its corpus's counts to follow."""
    store.verify_lock()
    D = catalog.Document
    if removal.command == PRUNE:
        corpus_id = removal.document_ids[0]
        counts = store.table.counts_by_document_of_corpus(corpus_id)
        with Session(store.engine) as s, s.begin():
            _set_pairs(s, counts, s.scalars(select(D.id).where(D.corpus_id == corpus_id)).all())
            catalog.recount_corpus(s, corpus_id)
            _close(s, removal)
        return
    documents, pairs = list(removal.document_ids or []), removal.pair_ids
    if pairs is None:
        store.table.delete_documents(documents)
    else:
        store.table.delete_pairs(pairs)
    crash_point("remove_documents.after_table_delete")
    store.table.refresh()
    left = {} if pairs is None else store.table.counts_by_document(documents)
    with Session(store.engine) as s, s.begin():
        corpora = s.scalars(select(D.corpus_id).where(D.id.in_(documents)).distinct()).all()
        if pairs is None:
            s.execute(delete(D).where(D.id.in_(documents)))
        else:
            _set_pairs(s, left, documents)
        for corpus_id in corpora:
            catalog.recount_corpus(s, corpus_id)
        _close(s, removal)


def _set_pairs(s: Session, counts: dict[int, int], documents) -> None:
    """Each of these documents' pair count as ``counts`` has it (absent: none)."""
    for doc in documents:
        s.execute(update(catalog.Document).where(catalog.Document.id == doc).values(n_pairs=counts.get(doc, 0)))


def _close(s: Session, removal: catalog.Removal) -> None:
    """The removal is done (its pair ids, kept only to finish it, dropped)."""
    s.execute(update(catalog.Removal).where(catalog.Removal.id == removal.id).values(status=DONE, pair_ids=None))


def forget(store: "StoreHandle", text: str, *, ignore_case: bool = False, context: int = 0,
           documents: bool = False, dry_run: bool = False) -> Forgetting:
    """Remove every pair whose next token overlaps an occurrence of ``text`` in a stored
    document (matched on the decoded text, ``occurrences``); with ``context`` N, also the
    pairs whose last N context tokens overlap one; with ``documents``, the whole documents
    that contain it. The catalog keeps a salted hash of the text, never the text."""
    if not isinstance(text, str) or not occurrences.normalised(text)[0].strip():
        raise InputError("--text needs the text to forget (e.g. an e-mail address); it was empty")
    check_number("context", context, 0, MAX_WINDOW, integer=True)
    plan, pair_ids = _forget_plan(store, text, ignore_case, context, documents)
    fields = _catalog_fields(store, text, ignore_case)
    pruned = pruned_corpora(store)
    if not plan.occurrences and not fields:
        if pruned:
            raise InputError(f"the text occurs in none of the stored tokens, titles, paths or metadata, but "
                             f"{', '.join(pruned)} {'was' if len(pruned) == 1 else 'were'} pruned: merged pairs no "
                             "longer spell their text, so it may be carried there unseen; remove the documents that "
                             "held it (remove-documents) or the corpus; nothing was removed")
        raise InputError("the text occurs in no stored document, title, path or metadata (matched after Unicode "
                         f"normalisation{', ignoring case' if ignore_case else ''}): nothing was removed")
    plan = dataclasses.replace(plan, pruned_corpora=pruned)
    if dry_run:
        return dataclasses.replace(plan, in_catalog=_counted(fields))
    seen = (store.table.version, store.visible_corpora)
    with store.write_lock():
        finish_removals(store)
        if (store.table.version, store.visible_corpora) != seen:  # the store moved on: look again
            plan, pair_ids = _forget_plan(store, text, ignore_case, context, documents)
        fields = _catalog_fields(store, text, ignore_case)  # under the lock: what is there now
        if plan.occurrences or fields:
            salt = secrets.token_hex(16)
            removal = record(
                store, command="forget", corpus=None, salt=salt,
                condition=f"ignore_case={ignore_case} context={context} documents={documents}",
                text_hash=hashlib.sha256((salt + text).encode("utf-8")).hexdigest(),
                n_occurrences=plan.occurrences, n_documents=plan.documents, n_pairs=plan.pairs_removed,
                document_ids=[d["document_id"] for d in plan.by_document],
                pair_ids=None if documents else pair_ids, redactions=fields)
            crash_point("remove_documents.after_intent")
            finish(store, removal)
    store.refresh()
    return dataclasses.replace(plan, dry_run=False, in_catalog=_counted(fields))


# Catalog fields a forgotten text is redacted from (``occurrences.redact``), by model: what
# names or describes a document (a ``--split-on-heading`` title, a path, ``.jsonl`` fields
# kept as metadata), a corpus (the paths given, and what resume re-reads) and a run's error.
CATALOG_FIELDS = {catalog.Document: ("title", "source", "meta"), catalog.Corpus: ("source", "spec"),
                  catalog.IngestRun: ("error",)}


def pruned_corpora(store: "StoreHandle") -> list[str]:
    """The ready corpora a ``prune`` merged pairs in: their documents' stored tokens have
    gaps, so a text search cannot see everything they carry."""
    with Session(store.engine) as s:
        ids = {row[0] for row in s.scalars(select(catalog.Removal.document_ids).where(
            catalog.Removal.command == PRUNE, catalog.Removal.status == DONE)) if row}
    return [c.name for c in store.corpora() if c.id in ids and c.status == catalog.READY]


def _catalog_fields(store: "StoreHandle", text: str, ignore_case: bool) -> dict:
    """Every catalog field that holds ``text``, with its redacted value:
    {model: {row id: {field: value}}} (models with no match left out)."""
    found: dict = {}
    with Session(store.engine) as s:
        for model, names in CATALOG_FIELDS.items():
            columns = [getattr(model, name) for name in names]
            for row in s.execute(select(model.id, *columns)):
                for name, value in zip(names, row[1:]):
                    new, n = occurrences.redact(value, text, ignore_case)
                    if n:
                        found.setdefault(model, {}).setdefault(row[0], {})[name] = new
    return found


def _counted(fields: dict) -> int:
    """How many catalog fields ``_catalog_fields`` redacts."""
    return sum(len(values) for rows in fields.values() for values in rows.values())


def _forget_plan(store: "StoreHandle", text: str, ignore_case: bool, context: int,
                 documents: bool) -> tuple[Forgetting, list[int]]:
    """Find ``text`` in every ready document (decoded from its stored tokens): what would
    go (as a dry run's ``Forgetting``) and the ids of the pairs that would."""
    visible = sorted(store.visible_corpora)
    by_document, pair_ids, total = [], [], 0
    if visible:
        cols = store.table.columns(["document_id", "position", "token", "next_token"],
                                   where=in_list("corpus_id", visible))
        doc, pos = cols.column("document_id").to_numpy(), cols.column("position").to_numpy()
        tok, nxt = cols.column("token").to_numpy(), cols.column("next_token").to_numpy()
        order = np.lexsort((pos, doc))
        doc, pos, tok, nxt = doc[order], pos[order], tok[order], nxt[order]
        bounds = np.flatnonzero(np.diff(doc)) + 1
        tokenizer = store.encoder.tokenizer
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(doc)]) if len(doc) else ():
            found, stored = _find_in_document(tokenizer, int(doc[lo]), pos[lo:hi], tok[lo:hi], nxt[lo:hi],
                                              text, ignore_case)
            if not found:
                continue
            total += len(found)
            if documents:
                gone = stored
            else:
                gone = set()
                for o in found:  # pair t predicts token t + 1, from a context ending at token t
                    last = o.last_token - 1 + context  # its next token, or (--context) its last N tokens
                    gone.update(range(max(0, o.first_token - 1), last + 1))
                gone &= stored
            ids = [int(pair_id(int(doc[lo]), p)) for p in sorted(gone)]
            pair_ids += ids
            by_document.append({"document_id": int(doc[lo]), "occurrences": len(found), "pairs": len(ids)})
    refs = store.document_refs([d["document_id"] for d in by_document])
    for d in by_document:
        ref = refs.get(d["document_id"])
        source = occurrences.redact(ref.source, text, ignore_case)[0] if ref else None  # shown, never the text
        d.update(corpus=ref.corpus if ref else None, source=source)
    return Forgetting(total, len(by_document), len(pair_ids), True, documents, by_document), pair_ids


def _find_in_document(tokenizer, document_id: int, pos: np.ndarray, tok: np.ndarray, nxt: np.ndarray,
                      text: str, ignore_case: bool):
    """Occurrences of ``text`` in one document, from its stored pairs: the token at each
    stored position, and the next token (the token at position + 1). Runs of known tokens
    are searched apart (a gap: tokens whose pairs an earlier ``forget`` took). Returns the
    occurrences (token positions in the document) and the set of stored positions."""
    length = int(pos.max()) + 2
    seq = np.full(length, -1, dtype=np.int64)
    seq[pos + 1] = nxt
    seq[pos] = tok
    known = seq >= 0
    found = []
    edges = np.flatnonzero(np.diff(np.r_[0, known.astype(np.int8), 0]))
    for start, end in zip(edges[::2], edges[1::2]):
        for o in occurrences.find(tokenizer, document_id, seq[start:end].tolist(), text, ignore_case):
            found.append(occurrences.Occurrence(o.document_id, o.start, o.end,
                                                o.first_token + int(start), o.last_token + int(start)))
    return found, set(int(p) for p in pos)


def purge(store: "StoreHandle") -> dict[str, int]:
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
