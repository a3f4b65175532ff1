"""initial schema

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import railwatch.store.models

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('alerts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('aoi_id', sa.String(length=64), nullable=False),
    sa.Column('sensor', sa.String(length=32), nullable=True),
    sa.Column('geometry_key', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('opened_acquired', railwatch.store.models.UTCDateTime(), nullable=True),
    sa.Column('last_acquired', railwatch.store.models.UTCDateTime(), nullable=True),
    sa.Column('opened_at', railwatch.store.models.UTCDateTime(), nullable=False),
    sa.Column('updated_at', railwatch.store.models.UTCDateTime(), nullable=False),
    sa.Column('resolved_at', railwatch.store.models.UTCDateTime(), nullable=True),
    sa.Column('opening_cars', sa.Float(), nullable=True),
    sa.Column('estimated_cars', sa.Float(), nullable=True),
    sa.Column('estimated_cars_low', sa.Float(), nullable=True),
    sa.Column('estimated_cars_high', sa.Float(), nullable=True),
    sa.Column('peak_cars', sa.Float(), nullable=True),
    sa.Column('baseline_cars', sa.Float(), nullable=True),
    sa.Column('score', sa.Float(), nullable=True),
    sa.Column('sensors_seen', sa.JSON(), nullable=False),
    sa.Column('passes', sa.Integer(), nullable=False),
    sa.Column('escalated', sa.Boolean(), nullable=False),
    sa.Column('suppressed', sa.Boolean(), nullable=False),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_alerts'))
    )
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_alerts_aoi_id'), ['aoi_id'], unique=False)

    op.create_table('calibrations',
    sa.Column('aoi_id', sa.String(length=64), nullable=False),
    sa.Column('sensor', sa.String(length=32), nullable=False),
    sa.Column('scale', sa.Float(), nullable=False),
    sa.Column('log_sigma', sa.Float(), nullable=True),
    sa.Column('n_counts', sa.Integer(), nullable=False),
    sa.Column('updated_at', railwatch.store.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('aoi_id', 'sensor', name=op.f('pk_calibrations'))
    )
    op.create_table('observations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('aoi_id', sa.String(length=64), nullable=False),
    sa.Column('collection', sa.String(length=32), nullable=False),
    sa.Column('acquired', railwatch.store.models.UTCDateTime(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('estimated_cars', sa.Float(), nullable=True),
    sa.Column('estimated_cars_low', sa.Float(), nullable=True),
    sa.Column('estimated_cars_high', sa.Float(), nullable=True),
    sa.Column('activity', sa.Float(), nullable=True),
    sa.Column('clear_fraction', sa.Float(), nullable=True),
    sa.Column('geometry_key', sa.String(length=64), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('detector_version', sa.String(length=32), nullable=False),
    sa.Column('processed_at', railwatch.store.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_observations')),
    sa.UniqueConstraint('aoi_id', 'collection', 'acquired', name='uq_observations_key')
    )
    with op.batch_alter_table('observations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_observations_aoi_id'), ['aoi_id'], unique=False)

    op.create_table('poll_state',
    sa.Column('aoi_id', sa.String(length=64), nullable=False),
    sa.Column('collection', sa.String(length=32), nullable=False),
    sa.Column('last_poll_at', railwatch.store.models.UTCDateTime(), nullable=True),
    sa.Column('last_success_at', railwatch.store.models.UTCDateTime(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=False),
    sa.Column('last_scene_acquired', railwatch.store.models.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('aoi_id', 'collection', name=op.f('pk_poll_state'))
    )
    op.create_table('scenes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('aoi_id', sa.String(length=64), nullable=False),
    sa.Column('collection', sa.String(length=32), nullable=False),
    sa.Column('acquired', railwatch.store.models.UTCDateTime(), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('orbit_direction', sa.String(length=16), nullable=True),
    sa.Column('relative_orbit', sa.Integer(), nullable=True),
    sa.Column('first_seen', railwatch.store.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_scenes')),
    sa.UniqueConstraint('aoi_id', 'collection', 'acquired', name='uq_scenes_key')
    )
    with op.batch_alter_table('scenes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_scenes_aoi_id'), ['aoi_id'], unique=False)

    op.create_table('alert_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('alert_id', sa.Integer(), nullable=False),
    sa.Column('type', sa.String(length=32), nullable=False),
    sa.Column('dedupe', sa.String(length=160), nullable=False),
    sa.Column('acquired', railwatch.store.models.UTCDateTime(), nullable=True),
    sa.Column('created_at', railwatch.store.models.UTCDateTime(), nullable=False),
    sa.Column('suppressed', sa.Boolean(), nullable=False),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['alert_id'], ['alerts.id'], name=op.f('fk_alert_events_alert_id_alerts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_alert_events')),
    sa.UniqueConstraint('dedupe', name=op.f('uq_alert_events_dedupe'))
    )
    with op.batch_alter_table('alert_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_alert_events_alert_id'), ['alert_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('alert_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_alert_events_alert_id'))

    op.drop_table('alert_events')
    with op.batch_alter_table('scenes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_scenes_aoi_id'))

    op.drop_table('scenes')
    op.drop_table('poll_state')
    with op.batch_alter_table('observations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_observations_aoi_id'))

    op.drop_table('observations')
    op.drop_table('calibrations')
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_alerts_aoi_id'))

    op.drop_table('alerts')
