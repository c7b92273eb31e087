"""quantised keys: bits per dimension of the stored codes and the routing key's dimension

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 00:00:00
"""

import sqlalchemy as sa
from alembic import op


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('store_config') as batch:
        batch.add_column(sa.Column('key_bits', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('route_dim', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('store_config') as batch:
        batch.drop_column('route_dim')
        batch.drop_column('key_bits')
