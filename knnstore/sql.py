"""Read-only SQL over a store: DuckDB over the Lance `pairs` table and the catalog.

Views (``knnstore sql STORE "SELECT ..."`` or ``Store.sql(query)``):

* ``pairs``: pair_id, corpus, corpus_id, document_id, position, token, token_text,
  next_token, next_token_text, weight, vector. Only pairs of ready corpora. The Lance table
  is scanned in place, with projections and filters pushed down; ``vector`` (float32) is
  read only when a query selects it, and is the key as stored: on a store with reduced
  keys (``init --key-dim``), the projected key; on a store with quantised keys
  (``--key-bits``), the routing key (the leading dimensions of the projected key) and a
  ``codes`` column (BLOB) with the packed codes searches use. ``weight``: how many pairs
  the row stands for (1 unless ``knnstore prune`` merged others into it).
* ``documents``: the ready documents of ready corpora (id, corpus, corpus_id, ordinal,
  source, title, sha256, n_tokens, n_pairs, status, metadata as JSON text; and id again as
  document_id, source again as path).
* ``corpora``: every corpus with its status (as ``knnstore list`` shows them).
* ``vocab``: token_id, piece, text.
* ``runs``: the history of adds, resumes and removals.

Read-only and contained: only SELECT (and DESCRIBE, SHOW, and EXPLAIN of what may run:
EXPLAIN ANALYZE runs the statement it explains) statements run; the
DuckDB connection is in memory, cannot read or write files (``enable_external_access``
off, configuration locked), and never touches the catalog database except to read it
through SQLAlchemy before the query runs.

Example:
    >>> store.sql("SELECT next_token_text, count(*) AS n FROM pairs "
    ...           "GROUP BY 1 ORDER BY n DESC LIMIT 3")                  # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass

import duckdb
import lance
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
from sqlalchemy import select
from sqlalchemy.orm import Session

from . import catalog
from .catalog import READY
from .config import SQL_MAX_ROWS, SQL_MEMORY, SQL_TIMEOUT_S, check_number
from .errors import InputError, ReadOnlyError, StoreDamagedError, first_line

_ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
VIEWS = ("pairs", "documents", "corpora", "vocab", "runs")
# Columns a view shows under a second name too: `document_id` as in `pairs`, and `path`
# for the source (what `remove-documents --where` conditions naturally name).
_ALIASES = {"documents": ", id AS document_id, source AS path"}


class _PairsDataset(lance.LanceDataset):
    """The Lance dataset as DuckDB should see it: only rows of visible corpora, and
    ``vector`` as float32 (DuckDB cannot read float16), converted only in scans that ask
    for it. DuckDB's projection and filter are pushed down to Lance."""

    @classmethod
    def of(cls, dataset: lance.LanceDataset, visible: set[int]) -> "_PairsDataset":
        view = cls.__new__(cls)
        view.__dict__.update(dataset.__dict__)  # same dataset, same pinned version
        view.visible_filter = pc.field("corpus_id").isin(sorted(visible))
        return view

    @property
    def schema(self) -> pa.Schema:
        schema = super().schema
        i = schema.get_field_index("vector")
        dim = schema.field("vector").type.list_size
        return schema.set(i, pa.field("vector", pa.list_(pa.float32(), dim)))

    def scanner(self, *args, **kwargs):
        columns = kwargs.get("columns") or self.schema.names
        kwargs["columns"] = list(columns)
        given = kwargs.get("filter")
        kwargs["filter"] = self.visible_filter if given is None else (given & self.visible_filter)
        scan = super().scanner(*args, **kwargs)
        if "vector" not in columns:
            return scan
        target = pa.schema([self.schema.field(c) for c in columns])

        def batches():
            for batch in scan.to_batches():
                yield pa.RecordBatch.from_arrays(
                    [batch.column(c).cast(target.field(c).type) for c in columns], schema=target)

        return pds.Scanner.from_batches(batches(), schema=target)


@dataclass(frozen=True)
class Views:
    """What a session shows, read at one moment of a store (``Store.sql_views``).

    Attributes:
        rows: the catalog rows (``read_catalog``), read in the snapshot's transaction.
        statuses: each corpus's status as ``knnstore list`` shows it (dead writers: failed).
        dataset: the Lance dataset of the pairs table, pinned at the snapshot's version.
        visible: the ids of the corpora readers see (the ready ones).
    """

    rows: dict
    statuses: dict[int, str]
    dataset: lance.LanceDataset
    visible: frozenset[int]


def read_catalog(s: Session) -> dict:
    """The catalog rows the views show, read in the snapshot's one transaction."""
    C, D, R, V = catalog.Corpus, catalog.Document, catalog.IngestRun, catalog.Vocab
    corpora = s.execute(select(
        C.id, C.name, C.status, C.source, C.n_documents, C.n_tokens, C.n_pairs,
        C.created_at, C.ready_at).order_by(C.id)).all()
    ready = sorted(r.id for r in corpora if r.status == READY)
    docs = s.execute(select(
        D.id, D.corpus_id, D.ordinal, D.source, D.title, D.sha256, D.n_tokens, D.n_pairs,
        D.status, D.meta).where(D.corpus_id.in_(ready), D.status == READY)
        .order_by(D.corpus_id, D.ordinal)).all()
    runs = s.execute(select(
        R.id, R.corpus_id, R.corpus_name, R.kind, R.status, R.started_at, R.finished_at,
        R.error, R.n_documents, R.n_tokens, R.n_pairs, R.tokens_per_s).order_by(R.id)).mappings().all()
    vocab = s.execute(select(V.token_id, V.piece, V.text).order_by(V.token_id)).all()
    return {"corpora": corpora, "docs": docs, "runs": runs, "vocab": vocab}


def _catalog_tables(rows: dict, statuses: dict[int, str]) -> dict[str, pa.Table]:
    """The catalog tables as Arrow (rows read by ``read_catalog``)."""
    corpora, docs, runs, vocab = rows["corpora"], rows["docs"], rows["runs"], rows["vocab"]
    names = {r.id: r.name for r in corpora}
    vocab_table = pa.table({"token_id": pa.array([r[0] for r in vocab], pa.int32()),
                            "piece": pa.array([r[1] for r in vocab], pa.string()),
                            "text": pa.array([r[2] for r in vocab], pa.string())})

    def table(rows, schema: pa.Schema) -> pa.Table:
        return pa.Table.from_pylist(rows, schema=schema)

    ts = pa.timestamp("us")
    return {
        "corpora": table([{
            "id": r.id, "name": r.name, "status": statuses.get(r.id, r.status),
            "source": r.source, "n_documents": r.n_documents, "n_tokens": r.n_tokens,
            "n_pairs": r.n_pairs, "created_at": r.created_at, "ready_at": r.ready_at,
        } for r in corpora], pa.schema([
            ("id", pa.int32()), ("name", pa.string()), ("status", pa.string()), ("source", pa.string()),
            ("n_documents", pa.int64()), ("n_tokens", pa.int64()), ("n_pairs", pa.int64()),
            ("created_at", ts), ("ready_at", ts)])),
        "documents": table([{
            "id": r.id, "corpus": names.get(r.corpus_id), "corpus_id": r.corpus_id,
            "ordinal": r.ordinal, "source": r.source, "title": r.title, "sha256": r.sha256,
            "n_tokens": r.n_tokens, "n_pairs": r.n_pairs, "status": r.status,
            "metadata": None if r.meta is None else json.dumps(r.meta, ensure_ascii=False),
        } for r in docs], pa.schema([
            ("id", pa.int64()), ("corpus", pa.string()), ("corpus_id", pa.int32()),
            ("ordinal", pa.int64()), ("source", pa.string()), ("title", pa.string()),
            ("sha256", pa.string()), ("n_tokens", pa.int64()), ("n_pairs", pa.int64()),
            ("status", pa.string()), ("metadata", pa.string())])),
        "runs": table([dict(r) for r in runs], pa.schema([
            ("id", pa.int64()), ("corpus_id", pa.int32()), ("corpus_name", pa.string()),
            ("kind", pa.string()), ("status", pa.string()), ("started_at", ts), ("finished_at", ts),
            ("error", pa.string()), ("n_documents", pa.int64()), ("n_tokens", pa.int64()),
            ("n_pairs", pa.int64()), ("tokens_per_s", pa.float64())])),
        "vocab": vocab_table,
    }


@dataclass(frozen=True)
class SQLLimits:
    """What one statement may take (``knnstore sql`` and the server's ``/v1/store/sql``):
    ``timeout_s`` of wall time (then it is interrupted), ``max_rows`` rows of result (the
    rest is not read: ``Result.truncated``), ``memory`` for DuckDB's operators (a join or
    sort past it fails with an out-of-memory error, the process unharmed)."""

    timeout_s: float = SQL_TIMEOUT_S
    max_rows: int = SQL_MAX_ROWS
    memory: str = SQL_MEMORY

    def __post_init__(self) -> None:
        check_number("SQL timeout (seconds)", self.timeout_s, 0.0, None, integer=False, lo_open=True)
        check_number("SQL row limit", self.max_rows, 1, None, integer=True)
        if not re.fullmatch(r"\d+(\.\d+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)", self.memory.strip(), re.IGNORECASE):
            raise InputError(f"SQL memory limit {self.memory!r} is not a size: write e.g. 512MB or 2GB")


@dataclass(frozen=True)
class Result:
    """A statement's rows (at most the limit's) and whether more were left unread."""

    table: pa.Table
    truncated: bool


class SQLSession:
    """A read-only DuckDB connection over one moment of a store.

    Args:
        views: what to show (``Store.sql_views()``, or ``Store.sql_session()`` for the
            session itself). An open ``Store`` is taken too (as before ``Views``): the
            session then reads its latest consistent snapshot.
        limits: what one statement may take (``SQLLimits``; ``run`` applies them all,
            ``execute`` the time and memory).
    """

    def __init__(self, views: Views, limits: SQLLimits | None = None) -> None:
        if not isinstance(views, Views):  # a Store
            views = views.sql_views()
        self.limits = limits or SQLLimits()
        self._timed_out = False
        con = duckdb.connect(":memory:", config={
            "autoinstall_known_extensions": False, "autoload_known_extensions": False,
            "memory_limit": self.limits.memory})
        for name, data in _catalog_tables(views.rows, views.statuses).items():
            con.register(f"_{name}", data)
            con.execute(f"CREATE VIEW {name} AS SELECT *{_ALIASES.get(name, '')} FROM _{name}")
        # Hidden corpora are filtered inside the scan, so even `_pairs` shows none of them.
        con.register("_pairs", _PairsDataset.of(views.dataset, set(views.visible)))
        weight = "p.weight" if "weight" in views.dataset.schema.names else "1"
        codes = ", p.codes" if "codes" in views.dataset.schema.names else ""
        con.execute(f"""
            CREATE VIEW pairs AS
            SELECT p.pair_id, c.name AS corpus, p.corpus_id, p.document_id, p.position,
                   p.token, t.text AS token_text, p.next_token, n.text AS next_token_text,
                   {weight} AS weight, p.vector{codes}
            FROM _pairs p
            JOIN _corpora c ON c.id = p.corpus_id
            LEFT JOIN _vocab t ON t.token_id = p.token
            LEFT JOIN _vocab n ON n.token_id = p.next_token""")
        # From here on: no files, no extensions, no way to turn either back on.
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        self._con = con

    def execute(self, query: str) -> pa.Table:
        """Run one read-only statement and return all its rows as a pyarrow Table (within
        the session's time and memory limits)."""
        return self.run(query, max_rows=None).table

    def run(self, query: str, max_rows: int | None = -1) -> Result:
        """Run one read-only statement; read at most ``max_rows`` rows of its result (-1:
        the limits' ``max_rows``; None: all), within the limits' time and memory."""
        check_read_only(query)
        limit = self.limits.max_rows if max_rows == -1 else max_rows
        timer = threading.Timer(self.limits.timeout_s, self.interrupt)
        timer.daemon = True
        self._timed_out = False
        timer.start()
        try:
            reader = self._con.sql(query).fetch_record_batch(min(limit or 65536, 65536) + 1)
            batches, rows, truncated = [], 0, False
            for batch in reader:
                if limit is not None and rows + batch.num_rows > limit:
                    batches.append(batch.slice(0, limit - rows))
                    truncated = True
                    break
                batches.append(batch)
                rows += batch.num_rows
            return Result(pa.Table.from_batches(batches, schema=reader.schema), truncated)
        except duckdb.PermissionException as exc:
            raise ReadOnlyError(f"knnstore sql reads only the store's views; files and other "
                                f"databases are out of reach ({first_line(exc)})") from None
        except duckdb.InterruptException:
            if self._timed_out:
                raise InputError(f"the query ran past its limit of {self.limits.timeout_s:g} s and was stopped: "
                                 "narrow it (WHERE, LIMIT), or raise the limit (--timeout)") from None
            raise InputError("the query was cancelled") from None
        except duckdb.OutOfMemoryException as exc:
            raise InputError(f"the query needs more than its memory limit of {self.limits.memory} "
                             f"({first_line(exc)}): narrow it, or raise the limit (--memory)") from None
        except duckdb.Error as exc:
            if "stream registered as '_pairs' failed" in str(exc):  # the table's files, not the query
                raise StoreDamagedError(f"the pairs table could not be read ({first_line(exc)[:300]}): run "
                                        "`knnstore check` on the store") from None
            raise InputError(f"SQL error: {first_line(exc)}") from None
        finally:
            timer.cancel()

    def interrupt(self, timed_out: bool = True) -> None:
        """Stop the statement running now (from another thread): it raises in ``run``."""
        self._timed_out = timed_out
        self._con.interrupt()

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "SQLSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_read_only(query: str) -> None:
    """Refuse anything but one SELECT / EXPLAIN statement, before it reaches DuckDB."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise InputError(f"SQL error: {first_line(exc)}") from None
    if not statements:
        raise InputError("no SQL statement given: write a SELECT, e.g. SELECT count(*) FROM pairs")
    if len(statements) > 1:
        raise InputError("give one statement at a time (this query holds "
                         f"{len(statements)}, separated by ';')")
    kind = statements[0].type
    if kind == duckdb.StatementType.EXPLAIN:  # EXPLAIN ANALYZE runs what it explains
        inner = _explained(statements[0].query)
        if not inner:
            raise InputError("EXPLAIN needs a statement to explain, e.g. EXPLAIN SELECT count(*) FROM pairs")
        return check_read_only(inner)
    if kind not in _ALLOWED:
        raise ReadOnlyError(
            f"knnstore sql is read-only: {kind.name} statements are refused; use SELECT "
            f"over the views {', '.join(VIEWS)} (change a store with the knnstore commands)"
        )


def _explained(query: str) -> str:
    """The statement an EXPLAIN wraps: what follows EXPLAIN, ANALYZE and an option list."""
    tokens = [(pos, kind) for pos, kind in duckdb.tokenize(query) if kind != duckdb.token_type.comment]
    i = 1  # tokens[0] is EXPLAIN
    if i < len(tokens) and query[tokens[i][0]:].upper().startswith("ANALY"):
        i += 1
    if i < len(tokens) and query[tokens[i][0]] == "(":
        depth = 0
        while i < len(tokens):
            ch = query[tokens[i][0]]
            depth += ch == "("
            depth -= ch == ")"
            i += 1
            if depth == 0:
                break
    return query[tokens[i][0]:] if i < len(tokens) else ""



def write_result(table: pa.Table, fmt: str, path) -> None:
    """Write a result as csv, json (a list of row objects) or parquet to ``path``
    (a file path or a binary file object)."""
    if fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(_printable(table), path)
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    elif fmt == "json":
        data = json.dumps(table.to_pylist(), ensure_ascii=False, indent=2, default=str).encode() + b"\n"
        if hasattr(path, "write"):
            path.write(data)
        else:
            with open(path, "wb") as f:
                f.write(data)
    else:
        raise InputError(f"unknown format {fmt!r}: use table, csv, json or parquet")


def _printable(table: pa.Table) -> pa.Table:
    """Lists (key vectors) as JSON text, so that flat formats can hold them."""
    for i, field in enumerate(table.schema):
        if pa.types.is_list(field.type) or pa.types.is_fixed_size_list(field.type):
            text = pa.array([None if v is None else json.dumps(v) for v in table.column(i).to_pylist()],
                            pa.string())
            table = table.set_column(i, field.name, text)
    return table
