"""removals: the audit of documents and text taken out of a store

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 18:25:00
"""

import sqlalchemy as sa
from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'removals',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('at', sa.DateTime(), nullable=False),
        sa.Column('command', sa.String(length=32), nullable=False),
        sa.Column('condition', sa.Text(), nullable=True),
        sa.Column('corpus', sa.String(length=256), nullable=True),
        sa.Column('text_hash', sa.String(length=64), nullable=True),
        sa.Column('salt', sa.String(length=32), nullable=True),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('n_documents', sa.Integer(), nullable=False),
        sa.Column('n_pairs', sa.BigInteger(), nullable=False),
        sa.Column('n_occurrences', sa.Integer(), nullable=True),
        sa.Column('document_ids', sa.JSON(), nullable=True),
        sa.Column('pair_ids', sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table('removals')
