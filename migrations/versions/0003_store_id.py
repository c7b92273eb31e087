"""store id: binds the catalog to its vector table

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 12:40:00
"""

import sqlalchemy as sa
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('store_config') as batch:
        batch.add_column(sa.Column('store_id', sa.String(length=36), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('store_config') as batch:
        batch.drop_column('store_id')
