"""The delivery outbox: at-least-once notifications with retries, backoff, a dead-letter state.

Lifecycle of a delivery row (``deliveries`` table)::

    enqueue ──► pending ──send ok──► delivered
       │           │
       │           └─ retryable failure ─► retrying ─(backoff + jitter, Retry-After)─► … ─► delivered
       │                     permanent failure, or the horizon passed ───────────────────► dead
       └─ backfill ─► suppressed  (never sent)

:func:`enqueue` writes the rows in the transaction that records the alert event, so an event and
its deliveries exist together or not at all. :func:`dispatch_pending` claims due rows (``SELECT …
FOR UPDATE SKIP LOCKED`` on PostgreSQL; a claim-column UPDATE in its own transaction on SQLite)
under a lease, sends each with no transaction open, then records the outcome in a new transaction.
A crash after the claim leaves the row claimable again once the lease ends; the only repeat a crash
can cause is a send whose success was not yet recorded, and it carries the same idempotency key
(the delivery key, sent as ``webhook-id``, ``delivery_id`` and in the Message-ID).

Time is an argument everywhere (``now``); nothing here sleeps.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from railwatch.alerts.email import EmailNotifier
from railwatch.alerts.payload import Delivery, Notifier, digest_payload, event_payload, test_payload
from railwatch.alerts.subscribers import EmailSubscriber, WebhookSubscriber
from railwatch.alerts.webhook import WebhookNotifier
from railwatch.clock import SystemClock
from railwatch.domain import iso, utc
from railwatch.errors import ConfigError, DeliveryError
from railwatch.store.models import AlertEventRow, AlertRow, DeliveryRow
from railwatch.triage import active_silence

if TYPE_CHECKING:
    from railwatch.config import Settings
    from railwatch.store import Store

__all__ = [
    "ACTIVE_STATES",
    "NOTIFIERS",
    "STATES",
    "DeliveryInfo",
    "DispatchReport",
    "TestResult",
    "dispatch_pending",
    "emit_reminders",
    "enqueue",
    "find_subscriber",
    "list_deliveries",
    "make_notifier",
    "retry_delivery",
    "test_subscriber",
]

log = logging.getLogger(__name__)

#: Every state a delivery can be in.
STATES: tuple[str, ...] = ("pending", "retrying", "delivered", "dead", "suppressed")
#: States the dispatcher picks up when due.
ACTIVE_STATES: tuple[str, ...] = ("pending", "retrying")
#: States ``list_deliveries(failed_only=True)`` shows.
FAILED_STATES: tuple[str, ...] = ("retrying", "dead")

_HOUR = timedelta(hours=1)
_OPEN_ALERT_STATES = ("provisional", "confirmed")

AnySubscriber = EmailSubscriber | WebhookSubscriber


# --- values handed back -----------------------------------------------------------------------------
@dataclass(frozen=True)
class DeliveryInfo:
    """A delivery as listings show it."""

    id: int
    key: str
    subscriber: str
    kind: str
    event: str
    event_id: int | None
    alert_id: int | None
    aoi_id: str | None
    state: str
    attempts: int
    last_error: str
    next_attempt: datetime | None
    created_at: datetime
    last_attempt_at: datetime | None
    delivered_at: datetime | None
    digest_id: int | None

    @classmethod
    def from_row(cls, r: DeliveryRow) -> DeliveryInfo:
        return cls(
            id=r.id, key=r.key, subscriber=r.subscriber, kind=r.kind, event=r.event_type, event_id=r.event_id,
            alert_id=r.alert_id, aoi_id=r.aoi_id, state=r.state, attempts=r.attempts, last_error=r.last_error or "",
            next_attempt=r.next_attempt, created_at=r.created_at, last_attempt_at=r.last_attempt_at,
            delivered_at=r.delivered_at, digest_id=r.digest_id,
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (ISO 8601 UTC times) for ``--format json``."""
        return {
            "id": self.id, "key": self.key, "subscriber": self.subscriber, "kind": self.kind, "event": self.event,
            "event_id": self.event_id, "alert_id": self.alert_id, "aoi_id": self.aoi_id, "state": self.state,
            "attempts": self.attempts, "last_error": self.last_error, "next_attempt": iso(self.next_attempt),
            "created_at": iso(self.created_at), "last_attempt_at": iso(self.last_attempt_at),
            "delivered_at": iso(self.delivered_at), "digest_id": self.digest_id,
        }


@dataclass
class DispatchReport:
    """What one :func:`dispatch_pending` run did (counts of deliveries)."""

    claimed: int = 0
    delivered: int = 0
    retrying: int = 0
    dead: int = 0
    held: int = 0
    digests: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return self.delivered


@dataclass(frozen=True)
class TestResult:
    """The outcome of :func:`test_subscriber`."""

    subscriber: str
    kind: str
    ok: bool
    detail: str
    key: str
    retryable: bool | None = None
    elapsed_s: float = 0.0

    __test__ = False  # not a pytest test class, despite the name


# --- subscribers and notifiers --------------------------------------------------------------------
def find_subscriber(settings: Settings, name: str) -> tuple[int, AnySubscriber] | None:
    """(index in ``settings.subscribers``, subscriber) of the one called ``name``."""
    for i, sub in enumerate(settings.subscribers):
        if sub.name == name:
            return i, sub
    return None


def _secret_value(settings: Settings, key: str, var: str) -> str:
    value = settings.secrets.get(key)
    if value is None or not value.get_secret_value():
        raise ConfigError([f"[{key.rsplit('.', 1)[0]}] the environment variable {var} is not set"],
                          source=settings.source)
    return value.get_secret_value()


def _make_email(index: int, sub: AnySubscriber, settings: Settings) -> Notifier:
    assert isinstance(sub, EmailSubscriber)
    password = None
    if sub.password_env:
        password = _secret_value(settings, f"subscribers.{index}.password_env", sub.password_env)
    return EmailNotifier(sub, password, timeout=settings.delivery.timeout_seconds)


def _make_webhook(index: int, sub: AnySubscriber, settings: Settings) -> Notifier:
    assert isinstance(sub, WebhookSubscriber)
    if isinstance(sub.secret_env, str):
        keys = [(f"subscribers.{index}.secret_env", sub.secret_env)]
    else:
        keys = [(f"subscribers.{index}.secret_env.{j}", var) for j, var in enumerate(sub.secret_env)]
    secrets = [_secret_value(settings, key, var) for key, var in keys]
    return WebhookNotifier(sub, secrets, timeout=settings.delivery.timeout_seconds)


#: Subscriber kind -> notifier constructor ``(index, subscriber, settings)``.
NOTIFIERS: dict[str, Callable[[int, AnySubscriber, Settings], Notifier]] = {
    "email": _make_email,
    "webhook": _make_webhook,
}

NotifierFactory = Callable[[int, AnySubscriber, "Settings"], Notifier]


def make_notifier(settings: Settings, name: str,
                  notifiers: Mapping[str, NotifierFactory] | None = None) -> Notifier:
    """The notifier for the subscriber called ``name`` (ConfigError if unknown or a secret is missing)."""
    found = find_subscriber(settings, name)
    if found is None:
        known = ", ".join(s.name for s in settings.subscribers) or "none"
        raise ConfigError([f"no subscriber named {name!r} (configured: {known})"], source=settings.source)
    index, sub = found
    return (notifiers or NOTIFIERS)[sub.kind](index, sub, settings)


def _new_key() -> str:
    return "rwd_" + uuid.uuid4().hex


# --- enqueue ----------------------------------------------------------------------------------------
def enqueue(
    session: Session,
    settings: Settings,
    event_row: AlertEventRow | None,
    alert_row: AlertRow,
    aoi: Any,
    *,
    suppressed: bool,
    chart_png: bytes | None = None,
    now: datetime | None = None,
) -> list[DeliveryRow]:
    """Queue one delivery per subscriber the event routes to, in the caller's transaction.

    Call right after :meth:`Store.add_event` in the same session; ``event_row`` None (the event was
    already recorded) queues nothing. ``suppressed`` (a backfill) writes ``suppressed`` rows that are
    never sent. ``aoi`` is the :class:`railwatch.domain.Aoi` (its name and geometry go into the
    payload). ``chart_png`` is attached inline to emails. Queuing the same event twice adds nothing.
    """
    if event_row is None:
        return []
    aoi_id = aoi.get("id") if isinstance(aoi, Mapping) else getattr(aoi, "id", None)
    if aoi_id is not None and aoi_id != alert_row.aoi_id:
        raise ValueError(f"enqueue: the AOI {aoi_id!r} is not the alert's AOI {alert_row.aoi_id!r}")
    if event_row.id is None or alert_row.id is None:
        session.flush()
    when = utc(now) if now is not None else utc(event_row.created_at or datetime.now(UTC))
    suppressed = suppressed or bool(event_row.suppressed)
    if not suppressed:  # a silenced AOI records its alerts but notifies no one (railwatch.triage)
        silence = active_silence(session, alert_row.aoi_id, utc(now) if now is not None else SystemClock().now())
        if silence is not None:
            suppressed = True
            log.info("AOI %s is silenced until %s (silence %d: %s): %s of alert %s not sent", alert_row.aoi_id,
                     iso(silence.until), silence.id, silence.reason, event_row.type, alert_row.id,
                     extra={"aoi": alert_row.aoi_id, "alert": alert_row.id})
    already = set(session.scalars(select(DeliveryRow.subscriber).where(DeliveryRow.event_id == event_row.id)))
    told: set[str] | None = None
    rows: list[DeliveryRow] = []
    for sub in settings.subscribers:
        if sub.name in already:
            continue
        if event_row.type == "alert.resolved" and told is None:
            told = set(session.scalars(
                select(DeliveryRow.subscriber).where(
                    DeliveryRow.alert_id == alert_row.id, DeliveryRow.state != "suppressed"
                )
            ))
        if not sub.wants(aoi_id=alert_row.aoi_id, event_type=event_row.type, alert_kind=alert_row.kind,
                         state=alert_row.state, told_before=sub.name in (told or set())):
            continue
        key = _new_key()
        row = DeliveryRow(
            key=key,
            event_id=event_row.id,
            alert_id=alert_row.id,
            aoi_id=alert_row.aoi_id,
            subscriber=sub.name,
            kind=sub.kind,
            event_type=event_row.type,
            state="suppressed" if suppressed else "pending",
            attempts=0,
            last_error="",
            next_attempt=None,  # pending with no time: due at once, whatever the dispatcher's clock says
            retry_from=when,
            created_at=when,
            payload=event_payload(delivery_key=key, event=event_row, alert=alert_row, aoi=aoi),
            chart_png=chart_png if sub.kind == "email" else None,
        )
        session.add(row)
        rows.append(row)
    if rows:
        session.flush()
        log.info("queued %d deliveries for %s of alert %s (%s)%s", len(rows), event_row.type, alert_row.id,
                 ", ".join(r.subscriber for r in rows), " [suppressed]" if suppressed else "",
                 extra={"alert_id": alert_row.id, "event": event_row.type, "suppressed": suppressed})
    return rows


# --- dispatch ---------------------------------------------------------------------------------------
def _due(now: datetime) -> Any:
    return and_(
        DeliveryRow.state.in_(ACTIVE_STATES),
        or_(DeliveryRow.next_attempt.is_(None), DeliveryRow.next_attempt <= now),
        DeliveryRow.digest_id.is_(None),
        or_(DeliveryRow.claimed_until.is_(None), DeliveryRow.claimed_until < now),
    )


def _claim(store: Store, now: datetime, token: str, lease_until: datetime, limit: int) -> list[DeliveryRow]:
    """Claim up to ``limit`` due rows for ``token`` and commit the claim before anything is sent."""
    order = (DeliveryRow.id,)  # oldest first
    with store.session() as s:
        if s.get_bind().dialect.name == "postgresql":
            rows = list(s.scalars(
                select(DeliveryRow).where(_due(now)).order_by(*order).limit(limit).with_for_update(skip_locked=True)
            ))
            for r in rows:
                r.claimed_by = token
                r.claimed_until = lease_until
            return rows
        ids = select(DeliveryRow.id).where(_due(now)).order_by(*order).limit(limit).scalar_subquery()
        s.execute(
            update(DeliveryRow).where(DeliveryRow.id.in_(ids), _due(now))
            .values(claimed_by=token, claimed_until=lease_until)
            .execution_options(synchronize_session=False)
        )
        return list(s.scalars(select(DeliveryRow).where(DeliveryRow.claimed_by == token).order_by(*order)))


def _release(store: Store, ids: Sequence[int], *, next_attempt: datetime | None = None) -> None:
    if not ids:
        return
    values: dict[str, Any] = {"claimed_by": None, "claimed_until": None}
    if next_attempt is not None:
        values["next_attempt"] = next_attempt
    with store.session() as s:
        s.execute(update(DeliveryRow).where(DeliveryRow.id.in_(list(ids))).values(**values)
                  .execution_options(synchronize_session=False))


def backoff_seconds(attempts: int, settings: Settings, rng: random.Random) -> float:
    """Exponential backoff with jitter: about initial x 2^(attempts-1), capped, times 0.5-1.0."""
    d = settings.delivery
    base = min(d.backoff_max_seconds, d.backoff_initial_seconds * 2.0 ** max(0, min(attempts - 1, 60)))
    return base * (0.5 + 0.5 * rng.random())


def _record_success(store: Store, row: DeliveryRow, now: datetime) -> None:
    done = {"state": "delivered", "delivered_at": now, "last_attempt_at": now, "last_error": "",
            "next_attempt": None, "claimed_by": None, "claimed_until": None}
    with store.session() as s:
        s.execute(update(DeliveryRow).where(DeliveryRow.id == row.id)
                  .values(attempts=DeliveryRow.attempts + 1, **done).execution_options(synchronize_session=False))
        if row.event_type == "digest":
            s.execute(update(DeliveryRow).where(DeliveryRow.digest_id == row.id)
                      .values(attempts=DeliveryRow.attempts + 1, **done).execution_options(synchronize_session=False))


def _record_failure(store: Store, settings: Settings, row: DeliveryRow, err: DeliveryError, now: datetime,
                    rng: random.Random) -> str:
    """Record a failed attempt; returns the new state (retrying or dead)."""
    attempts = row.attempts + 1
    # The horizon counts from the first attempt (or the last manual retry), on the dispatcher's clock.
    start = now if row.attempts == 0 else utc(row.retry_from)
    horizon_end = start + timedelta(hours=settings.delivery.horizon_hours)
    message = str(err)
    next_attempt: datetime | None = None
    if not err.retryable:
        state = "dead"
    elif now >= horizon_end:
        state = "dead"
        message = (f"gave up after {attempts} attempts over {settings.delivery.horizon_hours:g} h "
                   f"([delivery] horizon_hours): {message}")
    else:
        if err.retry_after is not None:
            delay = min(max(0.0, err.retry_after), settings.delivery.retry_after_max_seconds)
        else:
            delay = backoff_seconds(attempts, settings, rng)
        state = "retrying"
        next_attempt = min(now + timedelta(seconds=delay), horizon_end)
    values = {"state": state, "attempts": attempts, "last_error": message, "last_attempt_at": now,
              "next_attempt": next_attempt, "retry_from": start, "claimed_by": None, "claimed_until": None}
    with store.session() as s:
        s.execute(update(DeliveryRow).where(DeliveryRow.id == row.id).values(**values)
                  .execution_options(synchronize_session=False))
        if row.event_type == "digest" and state == "dead":
            s.execute(update(DeliveryRow).where(DeliveryRow.digest_id == row.id)
                      .values(state="dead", last_error=f"sent in digest {row.id}, which failed: {message}",
                              last_attempt_at=now, next_attempt=None)
                      .execution_options(synchronize_session=False))
    return state


def _to_delivery(row: DeliveryRow) -> Delivery:
    return Delivery(key=row.key, subscriber=row.subscriber, event_type=row.event_type, payload=row.payload,
                    id=row.id, alert_id=row.alert_id, attempt=row.attempts + 1, chart_png=row.chart_png)


def _attempt(store: Store, settings: Settings, notifier: Notifier, row: DeliveryRow, now: datetime,
             rng: random.Random, report: DispatchReport) -> None:
    extra = {"delivery_id": row.id, "subscriber": row.subscriber, "event": row.event_type}
    try:
        notifier.send(_to_delivery(row))
    except DeliveryError as exc:
        state = _record_failure(store, settings, row, exc, now, rng)
        setattr(report, state, getattr(report, state) + 1)
        level = logging.ERROR if state == "dead" else logging.WARNING
        log.log(level, "delivery %d (%s to %s) %s: %s", row.id, row.event_type, row.subscriber,
                "is dead" if state == "dead" else "will be retried", exc, extra=extra)
        return
    except Exception as exc:  # a bug in a notifier must not stop the dispatcher; the row is retried
        log.exception("delivery %d (%s to %s): unexpected %s", row.id, row.event_type, row.subscriber,
                      type(exc).__name__, extra=extra)
        err = DeliveryError(f"internal error {type(exc).__name__} while sending; see the log", retryable=True)
        state = _record_failure(store, settings, row, err, now, rng)
        setattr(report, state, getattr(report, state) + 1)
        report.errors.append(f"delivery {row.id}: {type(exc).__name__}")
        return
    _record_success(store, row, now)
    report.delivered += 1
    log.info("delivery %d (%s to %s) delivered", row.id, row.event_type, row.subscriber, extra=extra)


def _window(store: Store, name: str, now: datetime) -> list[datetime]:
    """When the sends counted against ``name``'s hourly limit went out (oldest first)."""
    with store.session() as s:
        return [utc(t) for t in s.scalars(
            select(DeliveryRow.delivered_at).where(
                DeliveryRow.subscriber == name,
                DeliveryRow.state == "delivered",
                DeliveryRow.digest_id.is_(None),
                DeliveryRow.delivered_at > now - _HOUR,
                DeliveryRow.delivered_at <= now,
            ).order_by(DeliveryRow.delivered_at)
        ) if t is not None]


def _fold(store: Store, sub: AnySubscriber, members: Sequence[DeliveryRow], now: datetime, token: str,
          lease_until: datetime) -> DeliveryRow:
    """Make one digest delivery, claimed by ``token``, of ``members`` (released to it)."""
    assert sub.max_per_hour is not None
    key = _new_key()
    digest = DeliveryRow(
        key=key, event_id=None, alert_id=None, aoi_id=None, subscriber=sub.name, kind=sub.kind,
        event_type="digest", state="pending", attempts=0, last_error="", next_attempt=now, retry_from=now,
        created_at=now, claimed_by=token, claimed_until=lease_until,
        payload=digest_payload(delivery_key=key, subscriber=sub.name, max_per_hour=sub.max_per_hour,
                               events=[m.payload for m in members]),
    )
    with store.session() as s:
        s.add(digest)
        s.flush()
        s.execute(update(DeliveryRow).where(DeliveryRow.id.in_([m.id for m in members]))
                  .values(digest_id=digest.id, claimed_by=None, claimed_until=None)
                  .execution_options(synchronize_session=False))
    log.info("subscriber %s reached %d per hour: %d deliveries go out as digest %d", sub.name, sub.max_per_hour,
             len(members), digest.id, extra={"subscriber": sub.name, "delivery_id": digest.id})
    return digest


def _plan(store: Store, sub: AnySubscriber, rows: list[DeliveryRow], now: datetime, token: str,
          lease_until: datetime, report: DispatchReport) -> list[DeliveryRow]:
    """Which claimed rows to send now, under the subscriber's hourly limit; the rest are held or folded."""
    if sub.max_per_hour is None:
        return rows
    sent = _window(store, sub.name, now)
    budget = sub.max_per_hour - len(sent)
    digests = [r for r in rows if r.event_type == "digest"]
    singles = [r for r in rows if r.event_type != "digest"]
    send: list[DeliveryRow] = []
    held: list[DeliveryRow] = []
    take = max(0, min(budget, len(digests)))
    send += digests[:take]
    held += digests[take:]
    budget -= take
    if budget <= 0:
        held += singles
    elif len(singles) <= budget:
        send += singles
    else:
        send += singles[: budget - 1]
        send.append(_fold(store, sub, singles[budget - 1:], now, token, lease_until))
        report.digests += 1
    if held:
        # The window frees a slot when its oldest send turns one hour old.
        reopen = (sent[0] + _HOUR) if sent else now
        _release(store, [r.id for r in held], next_attempt=max(reopen, now))
        report.held += len(held)
        log.info("subscriber %s is at its limit of %d per hour: %d deliveries held until %s", sub.name,
                 sub.max_per_hour, len(held), iso(reopen), extra={"subscriber": sub.name})
    return send


def dispatch_pending(
    store: Store,
    settings: Settings,
    now: datetime | None = None,
    *,
    limit: int | None = None,
    notifiers: Mapping[str, NotifierFactory] | None = None,
    rng: random.Random | None = None,
    worker: str | None = None,
) -> DispatchReport:
    """Send every due delivery once: claim, send (no transaction open), record. Never sleeps.

    ``now`` (default: the clock) decides what is due and schedules retries; ``notifiers`` replaces
    the kind -> constructor map (tests); ``rng`` makes the jitter reproducible.
    """
    now = utc(now) if now is not None else datetime.now(UTC)
    rng = rng or random.Random()
    token = (worker or f"{socket.gethostname()}:{os.getpid()}")[:40] + ":" + uuid.uuid4().hex[:12]
    lease_until = now + timedelta(seconds=settings.delivery.claim_lease_seconds)
    rows = _claim(store, now, token, lease_until, limit or settings.delivery.batch_size)
    report = DispatchReport(claimed=len(rows))
    groups: dict[str, list[DeliveryRow]] = {}
    for r in rows:
        groups.setdefault(r.subscriber, []).append(r)
    for name, group in groups.items():
        found = find_subscriber(settings, name)
        if found is None:
            err = DeliveryError(f"subscriber {name!r} is no longer configured; add it back and retry the delivery",
                                retryable=False)
            for r in group:
                _record_failure(store, settings, r, err, now, rng)
                report.dead += 1
            log.error("%d deliveries to %s are dead: subscriber no longer configured", len(group), name)
            continue
        _index, sub = found
        try:
            notifier = make_notifier(settings, name, notifiers)
        except ConfigError as exc:
            for r in group:
                state = _record_failure(store, settings, r, DeliveryError(str(exc), retryable=True), now, rng)
                setattr(report, state, getattr(report, state) + 1)
            log.error("cannot notify %s: %s", name, exc, extra={"subscriber": name})
            continue
        for r in _plan(store, sub, group, now, token, lease_until, report):
            _attempt(store, settings, notifier, r, now, rng, report)
    if rows:
        log.info("dispatched %d deliveries: %d delivered, %d retrying, %d dead, %d held", report.claimed,
                 report.delivered, report.retrying, report.dead, report.held)
    return report


# --- listing and operator actions -----------------------------------------------------------------
def list_deliveries(
    store: Store,
    *,
    failed_only: bool = False,
    states: Iterable[str] | None = None,
    subscriber: str | None = None,
    alert_id: int | None = None,
    limit: int | None = 200,
) -> list[DeliveryInfo]:
    """Deliveries, newest first; ``failed_only`` keeps ``retrying`` and ``dead`` ones."""
    q = select(DeliveryRow)
    wanted = set(states or ())
    if failed_only:
        wanted = (wanted & set(FAILED_STATES)) if wanted else set(FAILED_STATES)
    if wanted:
        q = q.where(DeliveryRow.state.in_(sorted(wanted)))
    if subscriber:
        q = q.where(DeliveryRow.subscriber == subscriber)
    if alert_id is not None:
        q = q.where(DeliveryRow.alert_id == alert_id)
    q = q.order_by(DeliveryRow.id.desc())
    if limit:
        q = q.limit(limit)
    with store.session() as s:
        return [DeliveryInfo.from_row(r) for r in s.scalars(q)]


def retry_delivery(store: Store, settings: Settings, id: int, *, now: datetime | None = None) -> DeliveryInfo:
    """Make a dead (or retrying, or pending) delivery due now, with a fresh retry horizon.

    A delivery that was folded into a digest is detached and sent on its own; retrying a digest
    brings back the deliveries it stands for. Delivered and suppressed deliveries are refused.
    """
    now = utc(now) if now is not None else datetime.now(UTC)
    with store.session() as s:
        row = s.get(DeliveryRow, id)
        if row is None:
            raise DeliveryError(f"no delivery {id}; see `railwatch deliveries`", retryable=False)
        if row.state not in ("dead", "retrying", "pending"):
            raise DeliveryError(f"delivery {id} is {row.state}; only dead, retrying or pending deliveries can be "
                                "retried", retryable=False)
        if find_subscriber(settings, row.subscriber) is None:
            raise DeliveryError(f"delivery {id} is for subscriber {row.subscriber!r}, which is no longer configured",
                                retryable=False)
        row.state = "pending"
        row.next_attempt = now
        row.retry_from = now
        row.digest_id = None
        row.claimed_by = None
        row.claimed_until = None
        if row.event_type == "digest":
            s.execute(update(DeliveryRow).where(DeliveryRow.digest_id == row.id, DeliveryRow.state == "dead")
                      .values(state="pending", next_attempt=now, retry_from=now)
                      .execution_options(synchronize_session=False))
        s.flush()
        log.info("delivery %d to %s queued again by an operator", id, row.subscriber,
                 extra={"delivery_id": id, "subscriber": row.subscriber})
        return DeliveryInfo.from_row(row)


def test_subscriber(
    settings: Settings,
    name: str,
    *,
    now: datetime | None = None,  # noqa: PT028 (not a test function, despite the name)
    notifiers: Mapping[str, NotifierFactory] | None = None,  # noqa: PT028
) -> TestResult:
    """Send a clearly marked test notification to one subscriber through the real notifier.

    Raises ConfigError for an unknown subscriber or a missing secret; a failed send is a result
    with ``ok`` False and the reason, not an exception. Nothing is written to the store.
    """
    now = utc(now) if now is not None else datetime.now(UTC)
    notifier = make_notifier(settings, name, notifiers)
    found = find_subscriber(settings, name)
    assert found is not None
    sub = found[1]
    key = "rwt_" + uuid.uuid4().hex
    delivery = Delivery(key=key, subscriber=name, event_type="test",
                        payload=test_payload(delivery_key=key, subscriber=name, now=now))
    started = time.monotonic()
    try:
        notifier.send(delivery)
    except DeliveryError as exc:
        return TestResult(subscriber=name, kind=sub.kind, ok=False, detail=str(exc), key=key,
                          retryable=exc.retryable, elapsed_s=time.monotonic() - started)
    return TestResult(subscriber=name, kind=sub.kind, ok=True, detail=f"test notification accepted by {sub.kind} "
                      f"subscriber {name}", key=key, elapsed_s=time.monotonic() - started)


test_subscriber.__test__ = False  # type: ignore[attr-defined]  # not a pytest test, despite the name


# --- reminders --------------------------------------------------------------------------------------
def _aoi_snapshot(s: Session, alert_id: int) -> Mapping[str, Any] | None:
    """The AOI part of the latest payload queued for this alert, so reminders name the AOI too."""
    payload = s.scalar(
        select(DeliveryRow.payload).where(DeliveryRow.alert_id == alert_id).order_by(DeliveryRow.id.desc()).limit(1)
    )
    aoi = (payload or {}).get("aoi")
    return aoi if isinstance(aoi, Mapping) else None


def emit_reminders(
    store: Store,
    settings: Settings,
    now: datetime | None = None,
    *,
    aois: Mapping[str, Any] | None = None,
) -> list[AlertEventRow]:
    """Record an ``alert.reminder`` event, and queue its deliveries, for each open alert that has
    had no event for ``[delivery] reminder_hours``. Off (returns []) unless that is set.

    ``aois`` maps AOI id to :class:`railwatch.domain.Aoi`; without it the AOI name and geometry
    come from the alert's latest queued payload. A reminder for a suppressed (backfill) alert is
    suppressed too.
    """
    hours = settings.delivery.reminder_hours
    if hours is None:
        return []
    now = utc(now) if now is not None else datetime.now(UTC)
    interval = timedelta(hours=hours)
    created: list[AlertEventRow] = []
    with store.session() as s:
        for alert in list(s.scalars(select(AlertRow).where(AlertRow.state.in_(_OPEN_ALERT_STATES))
                                    .order_by(AlertRow.id))):
            last = s.scalar(select(func.max(AlertEventRow.created_at)).where(AlertEventRow.alert_id == alert.id))
            last = utc(last) if last is not None else utc(alert.opened_at)
            if now - last < interval:
                continue
            event = store.add_event(s, alert, "alert.reminder", acquired=None,
                                    data={"dedupe": iso(now), "quiet_since": iso(last)},
                                    suppressed=bool(alert.suppressed))
            if event is None:
                continue
            event.created_at = now
            aoi = (aois or {}).get(alert.aoi_id) or _aoi_snapshot(s, alert.id)
            enqueue(s, settings, event, alert, aoi, suppressed=bool(alert.suppressed), now=now)
            created.append(event)
    if created:
        log.info("queued %d reminders for open alerts", len(created))
    return created
