"""silences and analyst feedback: the silences table; ack/dismiss columns on alerts

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import railwatch.store.models

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('silences',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('aoi_id', sa.String(length=64), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('starts_at', railwatch.store.models.UTCDateTime(), nullable=False),
    sa.Column('until', railwatch.store.models.UTCDateTime(), nullable=False),
    sa.Column('created_at', railwatch.store.models.UTCDateTime(), nullable=False),
    sa.Column('created_by', sa.String(length=64), nullable=False),
    sa.Column('removed_at', railwatch.store.models.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_silences'))
    )
    with op.batch_alter_table('silences', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_silences_aoi_id'), ['aoi_id'], unique=False)

    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('acknowledged_at', railwatch.store.models.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('ack_note', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('dismissed_at', railwatch.store.models.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('dismissed_reason', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.drop_column('dismissed_reason')
        batch_op.drop_column('dismissed_at')
        batch_op.drop_column('ack_note')
        batch_op.drop_column('acknowledged_at')

    with op.batch_alter_table('silences', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_silences_aoi_id'))

    op.drop_table('silences')
