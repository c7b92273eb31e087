"""The catalog schema comes only from Alembic revisions, and they match the models."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from knnstore import StoreVersionError, catalog


@pytest.fixture
def engine(tmp_path):
    e = catalog.make_engine(f"sqlite:///{tmp_path / 'catalog.db'}", create=True)
    yield e
    e.dispose()


def test_migrating_a_blank_database_creates_every_table(engine):
    catalog.upgrade(engine)
    tables = set(inspect(engine).get_table_names())
    assert {"store_config", "corpora", "documents", "ingest_runs", "vocab", "alembic_version"} <= tables
    assert catalog.current_revision(engine) == catalog.head_revision()


def test_models_and_migrations_agree(engine):
    catalog.upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), catalog.Base.metadata)
    assert diff == []


def test_every_revision_goes_up_down_and_up_again(engine):
    script = ScriptDirectory.from_config(catalog.alembic_config())
    revisions = list(reversed(list(script.walk_revisions())))
    assert revisions, "no migrations found"
    for rev in revisions:
        catalog.upgrade(engine, rev.revision)
        catalog.downgrade(engine, rev.down_revision or "base")
        catalog.upgrade(engine, rev.revision)
    assert catalog.current_revision(engine) == catalog.head_revision()


def test_a_catalog_from_a_newer_knnstore_is_refused(engine):
    catalog.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff_future'"))
    with pytest.raises(StoreVersionError, match="newer knnstore"):
        catalog.upgrade(engine)
