"""SQLAlchemy 2 models: the one place the schema is declared (migrations must match it)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC, on every backend (SQLite keeps no zone)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class SceneRow(Base):
    """A scene seen for an AOI, identified by (AOI, collection, acquisition time)."""

    __tablename__ = "scenes"
    __table_args__ = (UniqueConstraint("aoi_id", "collection", "acquired", name="uq_scenes_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    aoi_id: Mapped[str] = mapped_column(String(64), index=True)
    collection: Mapped[str] = mapped_column(String(32))
    acquired: Mapped[datetime] = mapped_column(UTCDateTime())
    source: Mapped[str] = mapped_column(Text, default="")
    orbit_direction: Mapped[str | None] = mapped_column(String(16), nullable=True)
    relative_orbit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime(), default=_now)


class ObservationRow(Base):
    """One observation per (AOI, scene): quality status, metrics and the estimate."""

    __tablename__ = "observations"
    __table_args__ = (UniqueConstraint("aoi_id", "collection", "acquired", name="uq_observations_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    aoi_id: Mapped[str] = mapped_column(String(64), index=True)
    collection: Mapped[str] = mapped_column(String(32))
    acquired: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    estimated_cars: Mapped[float | None] = mapped_column(Float, nullable=True)
    estimated_cars_low: Mapped[float | None] = mapped_column(Float, nullable=True)
    estimated_cars_high: Mapped[float | None] = mapped_column(Float, nullable=True)
    activity: Mapped[float | None] = mapped_column(Float, nullable=True)
    clear_fraction: Mapped[float | None] = mapped_column(Float, nullable=True)
    geometry_key: Mapped[str] = mapped_column(String(64), default="")
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    detector_version: Mapped[str] = mapped_column(String(32), default="")
    processed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=_now)


class AlertRow(Base):
    """An alert: ``kind`` activity (opened by a scene) or stale (no data)."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="activity")
    aoi_id: Mapped[str] = mapped_column(String(64), index=True)
    sensor: Mapped[str | None] = mapped_column(String(32), nullable=True)
    geometry_key: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(16), default="provisional")
    opened_acquired: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_acquired: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=_now)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    opening_cars: Mapped[float | None] = mapped_column(Float, nullable=True)
    estimated_cars: Mapped[float | None] = mapped_column(Float, nullable=True)
    estimated_cars_low: Mapped[float | None] = mapped_column(Float, nullable=True)
    estimated_cars_high: Mapped[float | None] = mapped_column(Float, nullable=True)
    peak_cars: Mapped[float | None] = mapped_column(Float, nullable=True)
    baseline_cars: Mapped[float | None] = mapped_column(Float, nullable=True)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    sensors_seen: Mapped[list[str]] = mapped_column(JSON, default=list)
    passes: Mapped[int] = mapped_column(Integer, default=1)
    escalated: Mapped[bool] = mapped_column(Boolean, default=False)
    suppressed: Mapped[bool] = mapped_column(Boolean, default=False)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: Analyst feedback (railwatch.triage): confirmed by an analyst ("ack") ...
    acknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    ack_note: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: ... or dismissed as a false alarm (state ``dismissed``, closed without a resolution notice).
    dismissed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    dismissed_reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class AlertEventRow(Base):
    """An alert event (``alert.opened`` …); ``dedupe`` makes re-processing record it once."""

    __tablename__ = "alert_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(32))
    dedupe: Mapped[str] = mapped_column(String(160), unique=True)
    acquired: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=_now)
    suppressed: Mapped[bool] = mapped_column(Boolean, default=False)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class CalibrationRow(Base):
    """A per-AOI, per-sensor scale fitted to analysts' counts."""

    __tablename__ = "calibrations"

    aoi_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sensor: Mapped[str] = mapped_column(String(32), primary_key=True)
    scale: Mapped[float] = mapped_column(Float)
    log_sigma: Mapped[float | None] = mapped_column(Float, nullable=True)
    n_counts: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=_now)


class PollStateRow(Base):
    """What the pipeline needs to resume and to report freshness, per AOI and collection."""

    __tablename__ = "poll_state"

    aoi_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    collection: Mapped[str] = mapped_column(String(32), primary_key=True)
    last_poll_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_success_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    last_scene_acquired: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class DeliveryRow(Base):
    """One notification of one alert event to one subscriber: the outbox row (``railwatch.alerts``).

    Written in the transaction that records the event; a dispatcher claims due rows, sends them and
    records the outcome. ``key`` is the idempotency key the receiver sees (``webhook-id``); it never
    changes, so a send repeated after a crash carries the same one. A digest row (``event_id`` NULL,
    ``event_type`` "digest") stands for the rows whose ``digest_id`` points at it.
    """

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "subscriber", name="uq_deliveries_event_subscriber"),
        Index("ix_deliveries_due", "state", "next_attempt"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    event_id: Mapped[int | None] = mapped_column(
        ForeignKey("alert_events.id", ondelete="CASCADE"), nullable=True, index=True
    )
    alert_id: Mapped[int | None] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"), nullable=True, index=True)
    aoi_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    subscriber: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    event_type: Mapped[str] = mapped_column(String(32))
    #: pending | retrying | delivered | dead | suppressed
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    next_attempt: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: Start of the retry horizon: creation, or the last manual retry.
    retry_from: Mapped[datetime] = mapped_column(UTCDateTime(), default=_now)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=_now)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    digest_id: Mapped[int | None] = mapped_column(
        ForeignKey("deliveries.id", ondelete="SET NULL"), nullable=True, index=True
    )
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    chart_png: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class SilenceRow(Base):
    """A silence: the AOI keeps recording and opening alerts, but its notifications are suppressed.

    Active while ``starts_at <= now < until`` and not removed; an expired silence simply stops
    matching (railwatch.triage).
    """

    __tablename__ = "silences"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    aoi_id: Mapped[str] = mapped_column(String(64), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    starts_at: Mapped[datetime] = mapped_column(UTCDateTime())
    until: Mapped[datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=_now)
    created_by: Mapped[str] = mapped_column(String(64), default="")
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ProviderUsageRow(Base):
    """Requests and processing units spent with the imagery provider, per AOI, collection and UTC month."""

    __tablename__ = "provider_usage"

    aoi_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    collection: Mapped[str] = mapped_column(String(32), primary_key=True)
    month: Mapped[str] = mapped_column(String(7), primary_key=True)  # YYYY-MM
    requests: Mapped[int] = mapped_column(Integer, default=0)
    processing_units: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=_now)
