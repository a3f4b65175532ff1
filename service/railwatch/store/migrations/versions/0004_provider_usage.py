"""provider usage: requests and processing units per AOI, collection and month

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import railwatch.store.models

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "provider_usage",
        sa.Column("aoi_id", sa.String(length=64), nullable=False),
        sa.Column("collection", sa.String(length=32), nullable=False),
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("processing_units", sa.Float(), nullable=False),
        sa.Column("updated_at", railwatch.store.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("aoi_id", "collection", "month", name=op.f("pk_provider_usage")),
    )


def downgrade() -> None:
    op.drop_table("provider_usage")
