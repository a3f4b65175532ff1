"""The store: SQLAlchemy 2 on SQLite by default, PostgreSQL by URL; schema migrated by Alembic.

Repository functions speak domain values (:class:`~railwatch.domain.Observation`,
:class:`~railwatch.domain.SceneRef`); the rows stay in :mod:`railwatch.store.models`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from railwatch.domain import Observation, SceneRef, utc
from railwatch.errors import StoreError
from railwatch.store.models import (
    AlertEventRow,
    AlertRow,
    Base,
    CalibrationRow,
    ObservationRow,
    PollStateRow,
    ProviderUsageRow,
    SceneRow,
)

__all__ = [
    "AlertEventRow",
    "AlertRow",
    "Base",
    "CalibrationRow",
    "ObservationRow",
    "PollStateRow",
    "ProviderUsageRow",
    "SceneRow",
    "Store",
    "redact_url",
]

MIGRATIONS = Path(__file__).with_name("migrations")


def redact_url(url: str) -> str:
    """The URL with any password replaced, for messages and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is shown as its scheme only
        return url.split(":", 1)[0] + "://…"


def _alembic_config(connection: Any) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to ``revision`` (idempotent; a fresh database goes through every revision)."""
    from alembic import command

    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), revision)


def _obs_from_row(r: ObservationRow) -> Observation:
    return Observation(
        aoi_id=r.aoi_id,
        collection=r.collection,
        acquired=r.acquired,
        status=r.status,
        reason=r.reason or "",
        estimated_cars=r.estimated_cars,
        estimated_cars_low=r.estimated_cars_low,
        estimated_cars_high=r.estimated_cars_high,
        activity=r.activity,
        clear_fraction=r.clear_fraction,
        geometry_key=r.geometry_key or "",
        metrics=dict(r.metrics or {}),
        detector_version=r.detector_version or "",
    )


class Store:
    """A database holding scenes, observations, alerts and pipeline state."""

    def __init__(self, url: str, *, migrate_schema: bool = True) -> None:
        self.url = url
        if url.startswith("sqlite") and ":///" in url:
            path = url.split(":///", 1)[1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine = create_engine(url, pool_pre_ping=True)
        except (SQLAlchemyError, ImportError) as exc:
            raise StoreError(f"cannot use store {redact_url(url)}: {exc}") from exc
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if migrate_schema:
            try:
                migrate(self.engine)
            except OperationalError as exc:
                raise StoreError(
                    f"cannot reach or migrate store {redact_url(url)}: {exc.orig}; check [store] url"
                ) from exc

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on error."""
        with self._sessions() as s, s.begin():
            yield s

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except SQLAlchemyError:
            return False

    # --- scenes -----------------------------------------------------------------------------
    def record_scene(self, s: Session, ref: SceneRef) -> SceneRow:
        row = s.scalar(
            select(SceneRow).where(
                SceneRow.aoi_id == ref.aoi_id,
                SceneRow.collection == ref.collection,
                SceneRow.acquired == utc(ref.acquired),
            )
        )
        if row is None:
            row = SceneRow(
                aoi_id=ref.aoi_id,
                collection=ref.collection,
                acquired=utc(ref.acquired),
                source=ref.source,
                orbit_direction=ref.orbit_direction,
                relative_orbit=ref.relative_orbit,
            )
            s.add(row)
            s.flush()
        elif ref.source and row.source != ref.source:
            row.source = ref.source
        return row

    def scene_refs(self, aoi_id: str) -> dict[tuple[str, datetime], SceneRef]:
        """Every recorded scene of an AOI as the provider described it (source, orbit), by (collection, time)."""
        with self.session() as s:
            rows = s.scalars(select(SceneRow).where(SceneRow.aoi_id == aoi_id))
            return {
                (r.collection, r.acquired): SceneRef(r.aoi_id, r.collection, r.acquired, r.source or "",
                                                     orbit_direction=r.orbit_direction, relative_orbit=r.relative_orbit)
                for r in rows
            }

    def scene_sources(self, aoi_id: str) -> dict[tuple[str, datetime], str]:
        with self.session() as s:
            rows = s.execute(
                select(SceneRow.collection, SceneRow.acquired, SceneRow.source).where(SceneRow.aoi_id == aoi_id)
            ).all()
        return {(c, a): src for c, a, src in rows}

    # --- observations -----------------------------------------------------------------------
    def observed_keys(self, aoi_id: str, *, detector_version: str | None = None) -> set[tuple[str, datetime]]:
        """(collection, acquired) of every scene already observed (with that detector version)."""
        q = select(ObservationRow.collection, ObservationRow.acquired).where(ObservationRow.aoi_id == aoi_id)
        if detector_version is not None:
            q = q.where(ObservationRow.detector_version == detector_version)
        with self.session() as s:
            return {(c, a) for c, a in s.execute(q).all()}

    def save_observation(self, s: Session, obs: Observation) -> bool:
        """Insert or replace the observation of (AOI, collection, acquired); True when anything changed."""
        row = s.scalar(
            select(ObservationRow).where(
                ObservationRow.aoi_id == obs.aoi_id,
                ObservationRow.collection == obs.collection,
                ObservationRow.acquired == utc(obs.acquired),
            )
        )
        values = {
            "status": obs.status,
            "reason": obs.reason,
            "estimated_cars": obs.estimated_cars,
            "estimated_cars_low": obs.estimated_cars_low,
            "estimated_cars_high": obs.estimated_cars_high,
            "activity": obs.activity,
            "clear_fraction": obs.clear_fraction,
            "geometry_key": obs.geometry_key,
            "metrics": dict(obs.metrics),
            "detector_version": obs.detector_version,
        }
        if row is None:
            s.add(ObservationRow(aoi_id=obs.aoi_id, collection=obs.collection, acquired=utc(obs.acquired), **values))
            s.flush()
            return True
        changed = False
        for k, v in values.items():
            if getattr(row, k) != v:
                setattr(row, k, v)
                changed = True
        return changed

    def observations(
        self,
        aoi_id: str,
        *,
        collection: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        session: Session | None = None,
    ) -> list[Observation]:
        q = select(ObservationRow).where(ObservationRow.aoi_id == aoi_id)
        if collection:
            q = q.where(ObservationRow.collection == collection)
        if since:
            q = q.where(ObservationRow.acquired >= utc(since))
        if until:
            q = q.where(ObservationRow.acquired <= utc(until))
        q = q.order_by(ObservationRow.acquired, ObservationRow.collection)
        if session is not None:
            return [_obs_from_row(r) for r in session.scalars(q)]
        with self.session() as s:
            return [_obs_from_row(r) for r in s.scalars(q)]

    # --- alerts -----------------------------------------------------------------------------
    def open_alert(self, s: Session, aoi_id: str, kind: str = "activity") -> AlertRow | None:
        return s.scalar(
            select(AlertRow)
            .where(AlertRow.aoi_id == aoi_id, AlertRow.kind == kind, AlertRow.state.in_(("provisional", "confirmed")))
            .order_by(AlertRow.id.desc())
        )

    def alerts(self, *, aoi_id: str | None = None, states: Sequence[str] | None = None) -> list[AlertRow]:
        q = select(AlertRow)
        if aoi_id:
            q = q.where(AlertRow.aoi_id == aoi_id)
        if states:
            q = q.where(AlertRow.state.in_(tuple(states)))
        with self.session() as s:
            return list(s.scalars(q.order_by(AlertRow.id)))

    def add_event(
        self, s: Session, alert: AlertRow, type_: str, *, acquired: datetime | None, data: dict[str, Any],
        suppressed: bool = False,
    ) -> AlertEventRow | None:
        """Record an alert event once: the same (alert, type, scene) is never recorded twice."""
        dedupe = f"{alert.id}:{type_}:{utc(acquired).isoformat() if acquired else data.get('dedupe', '')}"
        if s.scalar(select(AlertEventRow.id).where(AlertEventRow.dedupe == dedupe)) is not None:
            return None
        ev = AlertEventRow(alert_id=alert.id, type=type_, dedupe=dedupe, acquired=acquired, data=data,
                           suppressed=suppressed)
        s.add(ev)
        s.flush()
        return ev

    def events(self, *, alert_id: int | None = None, aoi_id: str | None = None) -> list[AlertEventRow]:
        q = select(AlertEventRow).order_by(AlertEventRow.id)
        if alert_id is not None:
            q = q.where(AlertEventRow.alert_id == alert_id)
        if aoi_id is not None:
            q = q.join(AlertRow, AlertRow.id == AlertEventRow.alert_id).where(AlertRow.aoi_id == aoi_id)
        with self.session() as s:
            return list(s.scalars(q))

    # --- calibration & poll state -----------------------------------------------------------
    def calibrations(self, aoi_id: str) -> dict[str, CalibrationRow]:
        with self.session() as s:
            return {r.sensor: r for r in s.scalars(select(CalibrationRow).where(CalibrationRow.aoi_id == aoi_id))}

    def save_calibration(
        self, s: Session, aoi_id: str, sensor: str, *, scale: float, log_sigma: float | None, n_counts: int,
        now: datetime,
    ) -> CalibrationRow:
        """Insert or replace the calibration of one AOI and sensor."""
        row = s.get(CalibrationRow, (aoi_id, sensor))
        if row is None:
            row = CalibrationRow(aoi_id=aoi_id, sensor=sensor)
            s.add(row)
        row.scale = float(scale)
        row.log_sigma = None if log_sigma is None else float(log_sigma)
        row.n_counts = int(n_counts)
        row.updated_at = utc(now)
        s.flush()
        return row

    def save_observations(self, s: Session, observations: Sequence[Observation]) -> int:
        """Replace several observations in one transaction; returns how many changed."""
        return sum(1 for o in observations if self.save_observation(s, o))

    def poll_state(self, s: Session, aoi_id: str, collection: str) -> PollStateRow:
        row = s.get(PollStateRow, (aoi_id, collection))
        if row is None:
            row = PollStateRow(aoi_id=aoi_id, collection=collection)
            s.add(row)
        return row

    def poll_states(self, aoi_id: str | None = None) -> list[PollStateRow]:
        q = select(PollStateRow)
        if aoi_id:
            q = q.where(PollStateRow.aoi_id == aoi_id)
        with self.session() as s:
            return list(s.scalars(q))


    # --- provider usage (requests, processing units) ------------------------------------------
    def add_usage(self, rows: Sequence[tuple[str, str, str, int, float]]) -> None:
        """Add (aoi_id, collection, month, requests, processing_units) to the monthly totals.

        One atomic upsert per row (``INSERT ... ON CONFLICT DO UPDATE`` adding to the stored totals):
        the executor's AOI threads and processes add to the same month's row at once, and a read then
        a write would lose increments or, on PostgreSQL, fail on the second insert of a new row.
        """
        if not rows:
            return
        from sqlalchemy.dialects import postgresql, sqlite

        insert = postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert
        with self.session() as s:
            for aoi_id, collection, month, requests, pu in rows:
                now = datetime.now(UTC)
                stmt = insert(ProviderUsageRow).values(aoi_id=aoi_id, collection=collection, month=month,
                                            requests=int(requests), processing_units=float(pu), updated_at=now)
                s.execute(stmt.on_conflict_do_update(
                    index_elements=["aoi_id", "collection", "month"],
                    set_={"requests": ProviderUsageRow.requests + stmt.excluded.requests,
                          "processing_units": ProviderUsageRow.processing_units + stmt.excluded.processing_units,
                          "updated_at": stmt.excluded.updated_at},
                ))

    def usage(self, *, aoi_id: str | None = None, month: str | None = None) -> list[ProviderUsageRow]:
        q = select(ProviderUsageRow).order_by(ProviderUsageRow.month, ProviderUsageRow.aoi_id)
        if aoi_id:
            q = q.where(ProviderUsageRow.aoi_id == aoi_id)
        if month:
            q = q.where(ProviderUsageRow.month == month)
        with self.session() as s:
            return list(s.scalars(q))


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
