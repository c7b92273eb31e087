"""Alembic environment: runs on the connection knnstore passes in ``config.attributes``.

knnstore upgrades a store's catalog itself when it opens it (knnstore.catalog.upgrade);
there is no alembic.ini. To write a new revision, from the checkout:

    python tools/new_migration.py "what changed"
"""

from alembic import context

from knnstore.catalog import Base

target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("knnstore migrations run through knnstore.catalog.upgrade()")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported")
run_migrations_online()
