"""Analysts' controls: silences (an AOI keeps recording but notifies no one) and feedback on alerts.

A **silence** covers one AOI from ``starts_at`` until ``until``. While it is active the pipeline
goes on recording scenes and opening alerts; only the notifications are written ``suppressed``
(the outbox asks :func:`active_silence` for every event it queues). Nothing has to lift a silence:
past ``until`` it stops matching, so it "expires by itself"; ``remove`` ends it early.

**Feedback** on an alert: *ack* (an analyst confirms it, with an optional note) or *dismiss* (a false
alarm: the alert is closed, state ``dismissed``, and no resolution notice is ever sent; its
notifications still queued — ``pending`` or ``retrying``, not yet delivered — are cancelled, state
``suppressed``, so a false alarm stops reaching subscribers as soon as an analyst has called it one).

Repository functions on the store; time is always an argument (``now``), never read here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from railwatch.domain import iso, utc
from railwatch.errors import RailwatchError
from railwatch.store.models import AlertRow, DeliveryRow, SilenceRow

if TYPE_CHECKING:
    from railwatch.store import Store

__all__ = [
    "OPEN_STATES",
    "SilenceInfo",
    "TriageError",
    "acknowledge",
    "active_silence",
    "active_silences",
    "add_silence",
    "dismiss",
    "feedback_counts",
    "list_silences",
    "remove_silence",
]

#: Alert states the pipeline still updates.
OPEN_STATES: tuple[str, ...] = ("provisional", "confirmed")
#: Delivery states a dismissal cancels (the outbox's active states: not yet delivered, not given up).
QUEUED_DELIVERY_STATES: tuple[str, ...] = ("pending", "retrying")
#: Longest text kept for a reason or a note.
MAX_TEXT = 2000


class TriageError(RailwatchError):
    """A silence or feedback action that cannot be carried out (unknown id, wrong state)."""


@dataclass(frozen=True)
class SilenceInfo:
    """A silence as listings show it."""

    id: int
    aoi_id: str
    reason: str
    starts_at: datetime
    until: datetime
    created_at: datetime
    created_by: str
    removed_at: datetime | None

    @classmethod
    def from_row(cls, r: SilenceRow) -> SilenceInfo:
        return cls(id=r.id, aoi_id=r.aoi_id, reason=r.reason or "", starts_at=utc(r.starts_at), until=utc(r.until),
                   created_at=utc(r.created_at), created_by=r.created_by or "",
                   removed_at=utc(r.removed_at) if r.removed_at else None)

    def state(self, now: datetime) -> str:
        """``active``, ``scheduled`` (starts later), ``expired`` or ``removed``."""
        now = utc(now)
        if self.removed_at is not None and self.removed_at <= now:
            return "removed"
        if now >= self.until:
            return "expired"
        if now < self.starts_at:
            return "scheduled"
        return "active"

    def as_dict(self, now: datetime) -> dict[str, Any]:
        return {"id": self.id, "aoi": self.aoi_id, "state": self.state(now), "starts_at": iso(self.starts_at),
                "until": iso(self.until), "reason": self.reason, "created_at": iso(self.created_at),
                "created_by": self.created_by, "removed_at": iso(self.removed_at)}


def _text(value: str | None, what: str, *, required: bool) -> str | None:
    text = " ".join((value or "").split())
    if required and not text:
        raise ValueError(f"{what} must not be empty: say why, for the next analyst")
    return text[:MAX_TEXT] if text else None


def _active(now: datetime) -> Any:
    return (SilenceRow.starts_at <= now) & (SilenceRow.until > now) & (
        SilenceRow.removed_at.is_(None) | (SilenceRow.removed_at > now))


# --- silences -------------------------------------------------------------------------------
def add_silence(
    store: Store,
    aoi_id: str,
    *,
    until: datetime,
    reason: str,
    now: datetime,
    starts_at: datetime | None = None,
    created_by: str = "",
) -> SilenceInfo:
    """Silence ``aoi_id`` from ``starts_at`` (default ``now``) until ``until``.

    ValueError when the period is empty or already over, or the reason is blank.
    """
    now = utc(now)
    start = utc(starts_at) if starts_at is not None else now
    until = utc(until)
    if until <= now:
        raise ValueError(f"--until {iso(until)} is not in the future (now is {iso(now)})")
    if until <= start:
        raise ValueError(f"the silence would end ({iso(until)}) before it starts ({iso(start)})")
    text = _text(reason, "the reason", required=True)
    row = SilenceRow(aoi_id=aoi_id, reason=text or "", starts_at=start, until=until, created_at=now,
                     created_by=(created_by or "")[:64])
    with store.session() as s:
        s.add(row)
        s.flush()
        return SilenceInfo.from_row(row)


def list_silences(
    store: Store, *, now: datetime, aoi_id: str | None = None, include_inactive: bool = False,
) -> list[SilenceInfo]:
    """Silences in force or still to come (all of them with ``include_inactive``), oldest first."""
    now = utc(now)
    q = select(SilenceRow).order_by(SilenceRow.id)
    if aoi_id:
        q = q.where(SilenceRow.aoi_id == aoi_id)
    if not include_inactive:
        q = q.where(SilenceRow.until > now, or_(SilenceRow.removed_at.is_(None), SilenceRow.removed_at > now))
    with store.session() as s:
        return [SilenceInfo.from_row(r) for r in s.scalars(q)]


def remove_silence(store: Store, silence_id: int, *, now: datetime) -> SilenceInfo:
    """End a silence now (it stays listed with ``--all``); an expired one is recorded as removed too."""
    now = utc(now)
    with store.session() as s:
        row = s.get(SilenceRow, silence_id)
        if row is None:
            raise TriageError(f"no silence {silence_id}; see `railwatch silence list --all`")
        if row.removed_at is not None:
            raise TriageError(f"silence {silence_id} (AOI {row.aoi_id}) was already removed at {iso(row.removed_at)}")
        row.removed_at = now
        s.flush()
        return SilenceInfo.from_row(row)


def active_silence(session: Session, aoi_id: str, now: datetime) -> SilenceRow | None:
    """The silence covering ``aoi_id`` at ``now`` (the one lasting longest), in the caller's transaction."""
    return session.scalar(
        select(SilenceRow).where(SilenceRow.aoi_id == aoi_id, _active(utc(now)))
        .order_by(SilenceRow.until.desc(), SilenceRow.id.desc()).limit(1)
    )


def active_silences(store: Store, now: datetime) -> dict[str, SilenceInfo]:
    """AOI id -> the silence covering it at ``now`` (the one lasting longest)."""
    now = utc(now)
    out: dict[str, SilenceInfo] = {}
    with store.session() as s:
        for r in s.scalars(select(SilenceRow).where(_active(now)).order_by(SilenceRow.until, SilenceRow.id)):
            out[r.aoi_id] = SilenceInfo.from_row(r)  # later rows last longer and win
    return out


# --- feedback -------------------------------------------------------------------------------
def _alert(s: Session, alert_id: int) -> AlertRow:
    row = s.get(AlertRow, alert_id)
    if row is None:
        raise TriageError(f"no alert {alert_id}; see `railwatch alerts`")
    return row


def acknowledge(store: Store, alert_id: int, *, now: datetime, note: str | None = None) -> AlertRow:
    """An analyst confirms the alert. Acknowledging again keeps the first time and replaces the note.

    A dismissed alert cannot be acknowledged (TriageError).
    """
    now = utc(now)
    text = _text(note, "the note", required=False)
    with store.session() as s:
        row = _alert(s, alert_id)
        if row.state == "dismissed":
            raise TriageError(f"alert {alert_id} was dismissed as a false alarm at {iso(row.dismissed_at)} "
                              f"({row.dismissed_reason}); it cannot be acknowledged")
        if row.acknowledged_at is None:
            row.acknowledged_at = now
        if text is not None:
            row.ack_note = text
        row.updated_at = now
        s.flush()
        return row


def dismiss(store: Store, alert_id: int, *, reason: str, now: datetime) -> AlertRow:
    """A false alarm: close the alert (state ``dismissed``) without a resolution notice.

    The pipeline no longer updates it; if activity stays high, the next elevated scene opens a new
    alert. Stale (no data) alerts cannot be dismissed: they close when usable imagery arrives.
    Its deliveries still queued (``pending``/``retrying``) are cancelled in the same transaction:
    state ``suppressed``, the reason in ``last_error``; their ids are kept in the alert's
    ``data["cancelled_deliveries"]`` (this dismissal's; each delivery's ``last_error`` says why).
    A send already in flight may still complete.
    """
    now = utc(now)
    text = _text(reason, "the reason", required=True)
    with store.session() as s:
        row = _alert(s, alert_id)
        if row.kind != "activity":
            raise TriageError(f"alert {alert_id} is a {row.kind} alert; it closes by itself when usable imagery "
                              "arrives and cannot be dismissed")
        if row.state != "dismissed":
            row.dismissed_at = now
            row.data = dict(row.data or {}) | {"state_before_dismissal": row.state}
            row.state = "dismissed"
        row.dismissed_reason = text
        row.updated_at = now
        cancelled = list(s.scalars(
            select(DeliveryRow.id).where(DeliveryRow.alert_id == alert_id,
                                         DeliveryRow.state.in_(QUEUED_DELIVERY_STATES))
        ))
        if cancelled:
            s.execute(update(DeliveryRow).where(DeliveryRow.id.in_(cancelled)).values(
                state="suppressed", next_attempt=None,
                last_error=f"cancelled: alert {alert_id} dismissed as a false alarm ({text})",
            ).execution_options(synchronize_session=False))
        row.data = dict(row.data or {}) | {"cancelled_deliveries": cancelled}
        s.flush()
        return row


def feedback_counts(store: Store, aoi_ids: Sequence[str] | None = None) -> dict[str, dict[str, int]]:
    """AOI id -> {"acked": confirmed by analysts (and not dismissed since), "dismissed": false alarms}."""
    q = select(AlertRow.aoi_id, AlertRow.state, AlertRow.acknowledged_at)
    if aoi_ids is not None:
        q = q.where(AlertRow.aoi_id.in_(list(aoi_ids)))
    counts: dict[str, Counter[str]] = {}
    with store.session() as s:
        for aoi_id, state, acked_at in s.execute(q).all():
            c = counts.setdefault(aoi_id, Counter())
            if state == "dismissed":
                c["dismissed"] += 1
            elif acked_at is not None:
                c["acked"] += 1
    return {a: {"acked": c["acked"], "dismissed": c["dismissed"]} for a, c in counts.items()}
