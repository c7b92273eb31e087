"""Alembic environment and revisions of the knnstore catalog (installed as knnstore.migrations)."""
