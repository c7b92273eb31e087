"""reduced keys: the stored key dimension, the projection that makes it, the pairs table's name

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 21:40:00
"""

import sqlalchemy as sa
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('store_config') as batch:
        batch.add_column(sa.Column('key_dim', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('key_projection', sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column('key_projection_sha', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('pairs_table', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('store_config') as batch:
        batch.drop_column('pairs_table')
        batch.drop_column('key_projection_sha')
        batch.drop_column('key_projection')
        batch.drop_column('key_dim')
