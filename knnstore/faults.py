"""Fault injection for the crash tests (tests/test_crash.py, docs/reliability.md).

With ``KNNSTORE_CRASH_AT=<point>`` (or ``<point>:<n>``: the n-th time it is reached) in
the environment, the process kills itself with SIGKILL when it reaches that point: what
kill -9, the OOM killer or a power cut would do there. With ``KNNSTORE_CRASH_ONCE_FILE=PATH``
too, only the first process to get there dies (it creates PATH): a Ray worker that is
restarted then goes on. Without it, a point costs one
environment lookup. The points, in the order a write reaches them:
"""

from __future__ import annotations

import os
import signal

from .config import env

POINTS = (
    "add.after_corpus_row",          # the corpus row exists (ingesting), nothing else
    "ingest.after_documents_row",    # documents inserted as pending, no pairs yet
    "ingest.after_encode",           # a batch of keys encoded, not written
    "commit.before_table_add",       # pairs in memory, about to go to LanceDB
    "commit.mid_table_add",          # half of one LanceDB commit streamed
    "commit.after_partial_add",      # part of long documents' pairs committed, documents pending
    "commit.after_table_add",        # pairs committed to LanceDB, documents still pending
    "commit.after_documents_ready",  # a commit fully done, more to come
    "ingest.before_corpus_ready",    # every pair committed, corpus not yet ready
    "ingest.after_corpus_ready",     # corpus ready, its run not yet closed
    "resume.after_pending_dropped",  # resume dropped the pairs of pending documents
    "remove.after_status",           # corpus marked removing, nothing deleted
    "remove.after_table_delete",     # pairs deleted, catalog rows still there
    "index.before",                  # about to train the index
    "index.after",                   # index trained and committed
    "ray.worker_after_fragments",    # a Ray worker wrote a shard's fragments, not yet returned them
    "remove_documents.after_intent",        # the removal row written, nothing deleted
    "remove_documents.after_table_delete",  # the documents' pairs deleted, catalog rows still there
    "purge.after_table",                    # data files rewritten, old versions dropped, catalog not vacuumed
)

_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = env("crash_at")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        once = env("crash_once_file")  # crash in one process only (a worker Ray restarts would again)
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)
