"""The SQL catalog: SQLAlchemy models and the engine/session helpers.

The schema is created and upgraded only by the Alembic revisions in ``migrations/``;
``tests/test_migrations.py`` checks that these models and the migrations agree.
SQLite (a file inside the store) by default; any SQLAlchemy URL, e.g. PostgreSQL.
"""

from __future__ import annotations

import importlib.resources
import sqlite3
import urllib.parse
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, Session
from sqlalchemy.pool import QueuePool

from .errors import CatalogError, StoreVersionError

# Corpus status. Readers (search, SQL, eval) only ever see pairs of READY corpora.
INGESTING, READY, FAILED, REMOVING = "ingesting", "ready", "failed", "removing"
# Document status: PENDING documents may have pairs in the table that are not yet counted.
PENDING = "pending"


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class StoreConfig(Base):
    """One row: the store's identity (see config.StoreIdentity)."""

    __tablename__ = "store_config"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    format_version: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(512))
    model_fingerprint: Mapped[str] = mapped_column(String(64))
    tokenizer_fingerprint: Mapped[str] = mapped_column(String(64))
    vocab_size: Mapped[int] = mapped_column(Integer)
    key_layer: Mapped[int] = mapped_column(Integer)
    key_site: Mapped[str] = mapped_column(String(32))
    dim: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(16))
    metric: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    # Binds the catalog to its vector table (and marker): the same id is in all three.
    store_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    # Reduced keys (knnstore.projection): the stored dimension, the projection and its sha256.
    key_dim: Mapped[int | None] = mapped_column(Integer, nullable=True)
    key_projection: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    key_projection_sha: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Quantised keys: bits per dimension of the codes and the routing key's dimension.
    key_bits: Mapped[int | None] = mapped_column(Integer, nullable=True)
    route_dim: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The LanceDB table holding the pairs (None: "pairs"); a compaction switches it.
    pairs_table: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Corpus(Base):
    __tablename__ = "corpora"
    __table_args__ = {"sqlite_autoincrement": True}  # ids are never reused

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(256), unique=True)
    source: Mapped[str] = mapped_column(Text)  # human-readable: the paths given
    # What resume needs to re-read the source exactly: paths, SourceOptions, IngestSettings.
    spec: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), index=True)
    n_documents: Mapped[int] = mapped_column(Integer, default=0)
    n_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    n_pairs: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    ready_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    documents: Mapped[list["Document"]] = relationship(
        back_populates="corpus", cascade="all, delete-orphan", passive_deletes=True
    )


class Document(Base):
    __tablename__ = "documents"
    __table_args__ = (
        UniqueConstraint("corpus_id", "ordinal", name="uq_documents_corpus_ordinal"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    corpus_id: Mapped[int] = mapped_column(
        ForeignKey("corpora.id", ondelete="CASCADE"), index=True
    )
    ordinal: Mapped[int] = mapped_column(Integer)  # order within the source; resume key
    source: Mapped[str] = mapped_column(Text)  # path, "path#line", or external id
    title: Mapped[str | None] = mapped_column(Text, nullable=True)
    sha256: Mapped[str] = mapped_column(String(64))
    n_tokens: Mapped[int] = mapped_column(Integer)
    n_pairs: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    meta: Mapped[dict | None] = mapped_column("metadata", JSON, nullable=True)

    corpus: Mapped[Corpus] = relationship(back_populates="documents")


class IngestRun(Base):
    """One add, resume or remove of a corpus; kept as history after the corpus is gone."""

    __tablename__ = "ingest_runs"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    corpus_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    corpus_name: Mapped[str] = mapped_column(String(256))
    kind: Mapped[str] = mapped_column(String(16))  # add | resume | remove
    status: Mapped[str] = mapped_column(String(16))  # running | ok | failed
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    n_documents: Mapped[int] = mapped_column(Integer, default=0)
    n_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    n_pairs: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)


class Calibration(Base):
    """A fitted adaptive-λ map (``knnstore calibrate``); the newest one made at the k and T
    in use is used."""

    __tablename__ = "calibrations"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    text_source: Mapped[str] = mapped_column(Text)  # the held-out text it was fitted on
    n_tokens: Mapped[int] = mapped_column(Integer)
    n_pairs: Mapped[int] = mapped_column(BigInteger)  # the store's size when fitted
    kind: Mapped[str] = mapped_column(String(16))  # logistic | mlp
    fit: Mapped[dict] = mapped_column(JSON)  # adaptive.Calibration.to_dict()


class IndexBuild(Base):
    """One training (``train``) or incremental update (``update``) of the ANN index."""

    __tablename__ = "index_builds"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # train | update
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    seconds: Mapped[float] = mapped_column(Float)
    rows: Mapped[int] = mapped_column(BigInteger)  # table rows when it ran
    new_rows: Mapped[int] = mapped_column(BigInteger)  # rows it indexed (all, for train)
    params: Mapped[dict] = mapped_column(JSON)  # partitions, sub-vectors


class Removal(Base):
    """One removal (``remove-documents`` or ``forget``): the audit of what was taken out,
    kept after the rows are gone, and while ``removing`` the intent a cut-short removal is
    finished from. Never the removed text itself: a forgotten string is kept only as a
    salted hash."""

    __tablename__ = "removals"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    command: Mapped[str] = mapped_column(String(32))  # remove-documents | forget
    condition: Mapped[str | None] = mapped_column(Text, nullable=True)  # the --where condition
    corpus: Mapped[str | None] = mapped_column(String(256), nullable=True)  # --corpus
    text_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)  # sha256(salt + text)
    salt: Mapped[str | None] = mapped_column(String(32), nullable=True)
    status: Mapped[str] = mapped_column(String(16))  # removing | ok
    n_documents: Mapped[int] = mapped_column(Integer, default=0)
    n_pairs: Mapped[int] = mapped_column(BigInteger, default=0)
    n_occurrences: Mapped[int | None] = mapped_column(Integer, nullable=True)  # forget: matches found
    document_ids: Mapped[list | None] = mapped_column(JSON, nullable=True)  # documents removed (or touched)
    pair_ids: Mapped[list | None] = mapped_column(JSON, nullable=True)  # forget: pairs removed, while removing


class Vocab(Base):
    """The tokenizer's vocabulary: token id -> raw piece and decoded text (for SQL)."""

    __tablename__ = "vocab"

    token_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    piece: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)


# --- queries other modules share ----------------------------------------------------


def set_corpus_status(engine: Engine, corpus_id: int, status: str, **values) -> None:
    """One corpus's status (and other columns) in a transaction of its own."""
    with Session(engine) as s, s.begin():
        s.execute(update(Corpus).where(Corpus.id == corpus_id).values(status=status, **values))


def record_index_build(engine: Engine, kind: str, seconds: float, rows: int, new_rows: int, params: dict) -> None:
    """One row of ``index_builds``: a training (``train``) or an incremental ``update``."""
    with Session(engine) as s, s.begin():
        s.add(IndexBuild(kind=kind, seconds=seconds, rows=rows, new_rows=new_rows, params=params))


def last_trained_rows(engine: Engine) -> int | None:
    """The table rows the index was last trained on (None: never recorded)."""
    with Session(engine) as s:
        return s.scalars(select(IndexBuild.rows).where(IndexBuild.kind == "train")
                         .order_by(IndexBuild.id.desc()).limit(1)).first()


def add_calibration(engine: Engine, **values) -> int:
    """A new ``calibrations`` row (adaptive λ uses the newest at its k and T); returns its id."""
    with Session(engine) as s, s.begin():
        row = Calibration(**values)
        s.add(row)
        s.flush()
        return row.id


def newest_calibration_fit(engine: Engine) -> dict | None:
    with Session(engine) as s:
        return s.scalars(select(Calibration.fit).order_by(Calibration.id.desc()).limit(1)).first()


def calibration_fits(engine: Engine) -> list[dict]:
    """Every calibration's fit, newest first."""
    with Session(engine) as s:
        return list(s.scalars(select(Calibration.fit).order_by(Calibration.id.desc())))


def newest_calibration(engine: Engine) -> int | None:
    """The newest calibration's id (None: none): what a reader compares to see new ones."""
    with Session(engine) as s:
        return s.scalar(select(func.max(Calibration.id)))


def clear_calibrations(engine: Engine) -> int:
    """Delete every calibration; returns how many."""
    with Session(engine) as s, s.begin():
        return s.execute(delete(Calibration)).rowcount


def write_identity(engine: Engine, store_id: str, identity: dict, vocab: list[dict]) -> None:
    """A new store's ``store_config`` row and its vocabulary, in one transaction."""
    with Session(engine) as s, s.begin():
        s.add(StoreConfig(id=1, created_at=utcnow(), store_id=store_id, **identity))
        s.execute(Vocab.__table__.insert(), vocab)


def vocab_rows(tokenizer) -> list[dict]:
    """A tokenizer's vocabulary as ``vocab`` rows: id, piece, decoded text."""
    ids = list(range(len(tokenizer)))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    texts = tokenizer.batch_decode([[i] for i in ids])
    # SQL text cannot hold NUL (PostgreSQL refuses it): the NUL byte token reads "\x00".
    clean = lambda s: (s or "").replace("\x00", "\\x00")  # noqa: E731
    return [{"token_id": i, "piece": clean(p), "text": clean(t)} for i, p, t in zip(ids, pieces, texts)]


def write_projection(engine: Engine, data: bytes, sha: str) -> None:
    """Record the store's key projection (``knnstore.projection``), once it is fitted."""
    with Session(engine) as s, s.begin():
        s.execute(update(StoreConfig).where(StoreConfig.id == 1).values(key_projection=data, key_projection_sha=sha))


def set_store_id(engine: Engine, store_id: str) -> None:
    with Session(engine) as s, s.begin():
        s.execute(update(StoreConfig).where(StoreConfig.id == 1).values(store_id=store_id))


def store_config(engine: Engine) -> StoreConfig:
    """The store's config row, read now (detached: usable after the session)."""
    with Session(engine, expire_on_commit=False) as s:
        return s.get(StoreConfig, 1)


def named_table(engine: Engine) -> str | None:
    """The pairs table's name as the catalog records it now (None: the first name)."""
    with Session(engine) as s:
        return s.scalar(select(StoreConfig.pairs_table).where(StoreConfig.id == 1))


def corpus_states(engine: Engine) -> dict[int, str]:
    """Every corpus's status, by id."""
    with Session(engine) as s:
        return dict(s.execute(select(Corpus.id, Corpus.status)).tuples().all())


def corpora(s: Session) -> list[Corpus]:
    """Every corpus row, in the order added (read in the caller's session)."""
    return list(s.scalars(select(Corpus).order_by(Corpus.id)))


def last_run_error(engine: Engine, corpus_id: int) -> str | None:
    """The error of a corpus's latest run (None if it recorded none)."""
    with Session(engine) as s:
        return s.scalar(select(IngestRun.error).where(IngestRun.corpus_id == corpus_id)
                        .order_by(IngestRun.id.desc()).limit(1))


def ready_documents(engine: Engine, corpus_id: int) -> list[Document]:
    """A corpus's ready documents, in source order."""
    with Session(engine, expire_on_commit=False) as s:
        return list(s.scalars(select(Document)
                              .where(Document.corpus_id == corpus_id, Document.status == READY)
                              .order_by(Document.ordinal)))


def document_sources(engine: Engine, document_ids: list[int]) -> list[tuple[int, str, str, str | None]]:
    """(document id, corpus name, source, title) of the given documents (unknown ids left out)."""
    with Session(engine) as s:
        return [tuple(r) for r in s.execute(
            select(Document.id, Corpus.name, Document.source, Document.title)
            .join(Corpus, Corpus.id == Document.corpus_id)
            .where(Document.id.in_(document_ids))).all()]


# --- engine and migrations ---------------------------------------------------------


def recount_corpus(s: Session, corpus_id: int) -> None:
    """A corpus's counts as the sums over its ready documents (in the caller's transaction)."""
    totals = s.execute(select(func.count(), func.coalesce(func.sum(Document.n_tokens), 0),
                              func.coalesce(func.sum(Document.n_pairs), 0))
                       .where(Document.corpus_id == corpus_id, Document.status == READY)).one()
    s.execute(update(Corpus).where(Corpus.id == corpus_id).values(
        n_documents=totals[0], n_tokens=totals[1], n_pairs=totals[2]))


def vacuum(engine: Engine) -> None:
    """Rewrite the catalog so deleted rows leave its files: SQLite ``VACUUM`` and a WAL
    checkpoint; PostgreSQL ``VACUUM FULL`` (needs the tables' owner)."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM FULL")
        return
    raw = engine.raw_connection()  # outside SQLAlchemy's transaction: VACUUM refuses to run in one
    try:
        raw.driver_connection.execute("VACUUM")
        raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        raw.close()


def unfinished_removals(engine: Engine) -> list[Removal]:
    """Removals a killed writer left ``removing`` (oldest first)."""
    with Session(engine, expire_on_commit=False) as s:
        return list(s.scalars(select(Removal).where(Removal.status == REMOVING).order_by(Removal.id)))


def sqlite_url(path: Path) -> URL:
    """The URL of a SQLite catalog file, built from the path without string formatting
    (a ``?``, ``%`` or ``#`` in a directory name stays part of the path)."""
    return URL.create("sqlite", database=str(Path(path).resolve()))


def sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite catalog URL (None for a server database); an in-memory or
    ``file:`` URI database is refused: a catalog must outlive the process."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        raise CatalogError(f"the catalog must be a SQLite file (sqlite:////absolute/path.db), got "
                           f"{mask(url)}: an in-memory catalog would be lost")
    return Path(database)


def parse_url(url: str | URL) -> URL:
    """A catalog URL, checked: one line on a malformed URL (the password never shown)."""
    if isinstance(url, URL):
        return url
    if not isinstance(url, str) or not url.strip():
        raise CatalogError(f"the catalog URL must be a SQLAlchemy URL such as "
                           f"postgresql+psycopg://user:***@host/db, got {type(url).__name__}")
    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        # Not shown: where a URL does not parse, nothing tells which part is a password.
        raise CatalogError("the catalog URL is not a SQLAlchemy URL: write it as "
                           "dialect+driver://user:password@host:port/database") from None


def without_password(url: str) -> str:
    """The URL as a store records it: its password left out (a later open takes it from
    the environment, e.g. PGPASSWORD or ~/.pgpass, or from KNNSTORE_CATALOG_URL)."""
    parsed = parse_url(url)
    if parsed.password is None:
        return url
    return URL.create(parsed.drivername, username=parsed.username, host=parsed.host, port=parsed.port,
                      database=parsed.database, query=parsed.query).render_as_string(hide_password=False)


def mask(url) -> str:
    """A URL (or anything) as it may be shown: with its password hidden."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL: hide whatever sits between ':' and '@' after '//'
        text = str(url)
        head, sep, rest = text.partition("//")
        if sep and "@" in rest:
            creds, _, host = rest.rpartition("@")
            user = creds.split(":", 1)[0]
            return f"{head}//{user}:***@{host}"
        return text


def make_engine(url: str | URL, *, create: bool = False, read_only: bool = False) -> Engine:
    """An engine for the catalog.

    A SQLite catalog is a file opened by its path: never created unless ``create`` (a
    read of a store whose catalog is gone must not leave an empty one), opened with
    ``mode=ro`` when ``read_only`` (on a read-only mount with no ``-shm`` file left by a
    writer, as ``immutable``: then the database file holds everything). SQLite gets enforced foreign keys and real transactions (SQLAlchemy's
    recipe: BEGIN on begin, so one session reads one snapshot); WAL is set once, at creation.
    """
    url = parse_url(url)
    path = sqlite_file(url)
    if path is None:
        try:
            return create_engine(url)
        except NoSuchModuleError:
            raise CatalogError(f"unknown database in catalog URL {mask(url)}: use sqlite:///FILE or "
                               "postgresql+psycopg://...") from None
        except ModuleNotFoundError as exc:
            raise CatalogError(f"the driver for {mask(url)} is not installed ({exc.name}): "
                               "pip install 'knnstore[postgres]'") from None
    mode = "rwc" if create else ("ro" if read_only else "rw")
    uri = f"file:{urllib.parse.quote(str(path))}?mode={mode}"

    def connect():
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        if read_only:
            try:  # reads the WAL through its -shm file, if a writer left them
                conn.execute("SELECT 1 FROM sqlite_master LIMIT 1")
            except sqlite3.OperationalError:  # no -shm, none can be made: the file is all there is
                conn.close()
                conn = sqlite3.connect(uri + "&immutable=1", uri=True, check_same_thread=False)
        return conn

    engine = create_engine(URL.create("sqlite", database=str(path)), creator=connect, poolclass=QueuePool)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # transactions are begun below, not by the driver
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        if create:
            cur.execute("PRAGMA journal_mode=WAL")  # stored in the file: set once
        cur.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn):
        conn.exec_driver_sql("BEGIN")

    return engine


@contextmanager
def snapshot_session(engine: Engine) -> Iterator[Session]:
    """A session whose reads all see one moment of the catalog (a read transaction:
    SQLite's BEGIN, PostgreSQL's REPEATABLE READ)."""
    with Session(engine, expire_on_commit=False) as s:
        if engine.dialect.name == "postgresql":
            s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        yield s


def migrations_dir() -> Path:
    return Path(str(importlib.resources.files("knnstore.migrations")))


def alembic_config():
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the catalog to ``revision`` (creates the schema on an empty database).

    Refuses a catalog whose revision this knnstore does not know (written by a newer one).
    """
    from alembic import command
    from alembic.script import ScriptDirectory

    cfg = alembic_config()
    script = ScriptDirectory.from_config(cfg)
    current = current_revision(engine)
    if current is not None:
        try:
            script.get_revision(current)
        except Exception:
            raise StoreVersionError(
                f"the catalog is at revision {current}, which this knnstore does not know: "
                "it was written by a newer knnstore; upgrade knnstore to open it"
            ) from None
    if revision == "head" and current == script.get_current_head():
        return
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def has_catalog(engine: Engine) -> bool:
    return inspect(engine).has_table("store_config")
