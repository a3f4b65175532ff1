"""Silences and analyst feedback end to end: the CLI, a real SQLite store, a real SMTP server and a real
webhook receiver (tests/fakes_delivery.py). Time is pinned with RAILWATCH_NOW, never waited for.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from railwatch.alerts.outbox import dispatch_pending, enqueue
from railwatch.config import load_settings
from railwatch.domain import S1, Aoi
from railwatch.store import AlertRow, Store
from railwatch.store.models import DeliveryRow
from railwatch.triage import (
    TriageError,
    acknowledge,
    active_silence,
    add_silence,
    dismiss,
    feedback_counts,
    list_silences,
    remove_silence,
)
from tests.cli_helpers import project, railwatch
from tests.fakes_delivery import SmtpSink, WebhookReceiver, new_whsec
from tests.integration.test_report import AOI, surge_project

# aiosmtpd sets its own deprecated attribute on every successful AUTH.
pytestmark = pytest.mark.filterwarnings("ignore:Session.login_data is deprecated:DeprecationWarning")

SECRET = new_whsec(5)
# Every poll looks back over the whole simulated period, so each pinned run sees all scenes so far.
ENV = {"HOOK_SECRET": SECRET, "RAILWATCH_IMAGERY__LOOKBACK_DAYS": "120"}


def at(when: str) -> dict[str, str]:
    return {"RAILWATCH_NOW": when, **ENV}


def dt(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- the repository functions (in process) ------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    st = Store(f"sqlite:///{tmp_path / 'railwatch.db'}")
    yield st
    st.close()


def _alert(store: Store, aoi_id: str = AOI, *, kind: str = "activity", state: str = "provisional") -> int:
    with store.session() as s:
        row = AlertRow(kind=kind, aoi_id=aoi_id, sensor=S1 if kind == "activity" else None, state=state,
                       opened_acquired=dt("2025-05-28T21:29:30Z") if kind == "activity" else None,
                       last_acquired=dt("2025-05-28T21:29:30Z"), estimated_cars=31.9, estimated_cars_low=11.8,
                       estimated_cars_high=52.0, peak_cars=31.9, baseline_cars=0.0, score=31.9,
                       sensors_seen=[S1] if kind == "activity" else [], passes=1, data={})
        s.add(row)
        s.flush()
        return row.id


def test_silence_lifecycle_follows_the_clock(store: Store) -> None:
    t0 = dt("2025-05-29T00:00:00Z")
    info = add_silence(store, AOI, until=dt("2025-06-01T00:00:00Z"), reason="  track works,\n known  ", now=t0,
                       created_by="analyst")
    assert info.reason == "track works, known" and info.state(t0) == "active"
    later = add_silence(store, "other-aoi", until=dt("2025-07-01T00:00:00Z"), reason="x", now=t0,
                        starts_at=dt("2025-06-10T00:00:00Z"))
    assert later.state(t0) == "scheduled"
    with store.session() as s:
        assert active_silence(s, AOI, t0) is not None
        assert active_silence(s, AOI, dt("2025-05-31T23:59:59Z")) is not None
        assert active_silence(s, AOI, dt("2025-06-01T00:00:00Z")) is None  # lifts itself at `until`
        assert active_silence(s, "other-aoi", t0) is None
        assert active_silence(s, "other-aoi", dt("2025-06-15T00:00:00Z")) is not None
    assert [x.id for x in list_silences(store, now=t0)] == [info.id, later.id]
    after = dt("2025-06-02T00:00:00Z")
    assert [x.id for x in list_silences(store, now=after)] == [later.id]
    assert [x.state(after) for x in list_silences(store, now=after, include_inactive=True)] == ["expired", "scheduled"]
    removed = remove_silence(store, later.id, now=after)
    assert removed.state(after) == "removed" and list_silences(store, now=after) == []
    with pytest.raises(TriageError, match="already removed"):
        remove_silence(store, later.id, now=after)
    with pytest.raises(TriageError, match="no silence 99"):
        remove_silence(store, 99, now=after)
    with pytest.raises(ValueError, match="not in the future"):
        add_silence(store, AOI, until=t0, reason="x", now=t0)
    with pytest.raises(ValueError, match="reason"):
        add_silence(store, AOI, until=after, reason="   ", now=t0)


@pytest.fixture
def peers() -> Iterator[tuple[SmtpSink, WebhookReceiver]]:
    sink = SmtpSink().start()
    hook = WebhookReceiver().start()
    try:
        yield sink, hook
    finally:
        hook.stop()
        sink.stop()


def _subscribers(sink: SmtpSink, hook: WebhookReceiver) -> str:
    return (
        '[[subscribers]]\nname = "ops-mail"\nkind = "email"\nto = ["ops@example.org"]\n'
        f'from = "railwatch <alerts@railwatch.example>"\nsmtp_host = "127.0.0.1"\nsmtp_port = {sink.port}\n'
        'smtp_security = "none"\n'
        f'[[subscribers]]\nname = "ops-hook"\nkind = "webhook"\nurl = "{hook.url()}"\nsecret_env = "HOOK_SECRET"\n'
    )


TUMANGANG = Aoi(id=AOI, name="Tumangang–Khasan", geometry={"type": "Point", "coordinates": [130.6, 42.4]}, tracks=())


def _settings(tmp_path: Path, sink: SmtpSink, hook: WebhookReceiver) -> Any:
    cfg = tmp_path / "railwatch.toml"
    cfg.write_text(_subscribers(sink, hook), encoding="utf-8")
    return load_settings(cfg, environ=ENV, cwd=tmp_path)


def _event(store: Store, settings: Any, aoi: Aoi, alert_id: int, type_: str, when: str) -> list[DeliveryRow]:
    """Record an alert event and queue its deliveries in one transaction, as the pipeline does."""
    with store.session() as s:
        row = s.get(AlertRow, alert_id)
        assert row is not None
        ev = store.add_event(s, row, type_, acquired=dt(when), data={})
        return enqueue(s, settings, ev, row, aoi, suppressed=False, now=dt(when))


def test_silenced_aoi_sends_nothing_over_smtp_and_webhook_then_sends_again(
    store: Store, tmp_path: Path, peers: tuple[SmtpSink, WebhookReceiver],
) -> None:
    sink, hook = peers
    settings = _settings(tmp_path, sink, hook)
    aoi = TUMANGANG
    other = Aoi(id="other-aoi", name="Other crossing", geometry={"type": "Point", "coordinates": [1.0, 2.0]}, tracks=())
    add_silence(store, AOI, until=dt("2025-06-01T00:00:00Z"), reason="maintenance", now=dt("2025-05-29T00:00:00Z"))
    alert_id = _alert(store)

    def event(a: Aoi, alert: int, type_: str, when: str) -> list[str]:
        return sorted(r.state for r in _event(store, settings, a, alert, type_, when))

    # While silenced: recorded, suppressed, and the dispatcher sends nothing; other AOIs are not affected.
    assert event(aoi, alert_id, "alert.opened", "2025-05-30T00:00:00Z") == ["suppressed", "suppressed"]
    assert event(other, _alert(store, "other-aoi"), "alert.opened", "2025-05-30T00:00:00Z") == ["pending", "pending"]
    report = dispatch_pending(store, settings, now=dt("2025-05-30T00:01:00Z"))
    assert report.delivered == 2
    assert [r.json()["aoi"]["id"] for r in hook.requests] == ["other-aoi"]
    assert len(sink.messages) == 1 and "Other crossing" in str(sink.messages[0].message["Subject"])
    # The silence has lifted itself: the next event of the same alert goes out by email and webhook.
    assert event(aoi, alert_id, "alert.confirmed", "2025-06-01T00:00:00Z") == ["pending", "pending"]
    report = dispatch_pending(store, settings, now=dt("2025-06-01T00:01:00Z"))
    assert report.delivered == 2
    confirmed = [r.json() for r in hook.requests if r.json()["aoi"]["id"] == AOI]
    assert [(p["type"], p["alert"]["id"]) for p in confirmed] == [("alert.confirmed", alert_id)]
    assert len(sink.messages) == 2 and "Tumangang" in str(sink.messages[1].message["Subject"])
    with store.session() as s:
        states = sorted((r.event_type, r.state) for r in s.scalars(select(DeliveryRow).where(DeliveryRow.alert_id == alert_id)))
    assert states == [("alert.confirmed", "delivered")] * 2 + [("alert.opened", "suppressed")] * 2


def test_a_dismissed_alert_is_closed_without_any_notice(store: Store) -> None:
    alert_id = _alert(store, state="confirmed")
    with store.session() as s:
        row = s.get(AlertRow, alert_id)
        assert row is not None
        store.add_event(s, row, "alert.opened", acquired=row.opened_acquired, data={})
    dismiss(store, alert_id, reason="snow-clearing train", now=dt("2025-06-02T00:00:00Z"))
    assert [e.type for e in store.events(alert_id=alert_id)] == ["alert.opened"]  # no event, so nothing to send
    with store.session() as s:
        # The pipeline only updates (and so only ever resolves) open alerts: it will never see this one again.
        assert store.open_alert(s, AOI) is None
        assert s.scalars(select(DeliveryRow)).all() == []


def test_dismissing_an_alert_cancels_its_queued_notifications(
    store: Store, tmp_path: Path, peers: tuple[SmtpSink, WebhookReceiver],
) -> None:
    """A false alarm stops reaching subscribers: what is still queued is suppressed, what went out stays."""
    sink, hook = peers
    settings = _settings(tmp_path, sink, hook)
    aoi = TUMANGANG
    alert_id, other_id = _alert(store), _alert(store)

    def event(alert: int, type_: str, when: str) -> None:
        _event(store, settings, aoi, alert, type_, when)

    event(alert_id, "alert.opened", "2025-05-30T00:00:00Z")
    assert dispatch_pending(store, settings, now=dt("2025-05-30T00:01:00Z")).delivered == 2
    hook.respond(503)  # the webhook is down when the confirmation is queued: it stays retrying
    event(alert_id, "alert.confirmed", "2025-05-31T00:00:00Z")
    event(other_id, "alert.opened", "2025-05-31T00:00:00Z")
    report = dispatch_pending(store, settings, now=dt("2025-05-31T00:01:00Z"), limit=2)
    assert (report.delivered, report.retrying) == (1, 1)

    gone = dismiss(store, alert_id, reason="snow-clearing train", now=dt("2025-05-31T01:00:00Z"))
    with store.session() as s:
        rows = {(r.alert_id, r.event_type, r.subscriber): r for r in s.scalars(select(DeliveryRow))}
    mine = {k[1:]: r.state for k, r in rows.items() if k[0] == alert_id}
    assert mine == {("alert.opened", "ops-mail"): "delivered", ("alert.opened", "ops-hook"): "delivered",
                    ("alert.confirmed", "ops-mail"): "delivered", ("alert.confirmed", "ops-hook"): "suppressed"}
    assert "dismissed as a false alarm (snow-clearing train)" in rows[(alert_id, "alert.confirmed", "ops-hook")].last_error
    assert gone.data["cancelled_deliveries"] == [rows[(alert_id, "alert.confirmed", "ops-hook")].id]
    # The other alert's queued notifications are untouched and go out; the cancelled one never does.
    before = len(hook.requests)
    assert dispatch_pending(store, settings, now=dt("2025-06-02T00:00:00Z")).delivered == 2
    assert [(r.json()["type"], r.json()["alert"]["id"]) for r in hook.requests[before:]] == [("alert.opened", other_id)]


def test_feedback_repository_rules(store: Store) -> None:
    now = dt("2025-06-02T08:00:00Z")
    a, b, stale = _alert(store), _alert(store, state="confirmed"), _alert(store, kind="stale", state="confirmed")
    row = acknowledge(store, a, note="  forty tank cars, counted  ", now=now)
    assert row.acknowledged_at == now and row.ack_note == "forty tank cars, counted" and row.state == "provisional"
    again = acknowledge(store, a, now=dt("2025-06-03T00:00:00Z"))
    assert again.acknowledged_at == now and again.ack_note == "forty tank cars, counted"  # first time kept
    gone = dismiss(store, b, reason="snow clearing train", now=now)
    assert gone.state == "dismissed" and gone.dismissed_at == now and gone.data["state_before_dismissal"] == "confirmed"
    with pytest.raises(TriageError, match="dismissed as a false alarm"):
        acknowledge(store, b, now=now)
    with pytest.raises(TriageError, match="stale alert"):
        dismiss(store, stale, reason="x", now=now)
    with pytest.raises(TriageError, match="no alert 999"):
        acknowledge(store, 999, now=now)
    with pytest.raises(ValueError, match="reason"):
        dismiss(store, a, reason=" ", now=now)
    assert feedback_counts(store) == {AOI: {"acked": 1, "dismissed": 1}}
    dismiss(store, a, reason="changed my mind", now=now)  # a dismissed alert no longer counts as confirmed
    assert feedback_counts(store) == {AOI: {"acked": 0, "dismissed": 2}}


# --- through the CLI ----------------------------------------------------------------------------
def test_ack_and_dismiss_through_the_cli(tmp_path: Path) -> None:
    work = project(tmp_path)
    st = Store(f"sqlite:///{work / 'var' / 'railwatch.db'}")
    try:
        first, second = _alert(st), _alert(st, state="confirmed")
    finally:
        st.close()
    ack = railwatch("alerts", "ack", str(first), "--note", "40 tank cars on the siding", "--format", "json", cwd=work,
                    env=at("2025-06-02T08:00:00Z"))
    assert ack.code == 0, ack.err
    assert ack.json()["acknowledged_at"] == "2025-06-02T08:00:00Z" and ack.json()["ack_note"] == "40 tank cars on the siding"
    assert railwatch("alerts", "dismiss", str(second), cwd=work).code == 2  # --reason is required
    gone = railwatch("alerts", "dismiss", str(second), "--reason", "snow-clearing train", "--format", "json", cwd=work,
                     env=at("2025-06-02T09:00:00Z"))
    assert gone.code == 0, gone.err
    assert gone.json()["state"] == "dismissed" and gone.json()["dismissed_reason"] == "snow-clearing train"
    # The listing is unchanged for scripts: the same command, the same keys (and the feedback added).
    listed = railwatch("alerts", "--aoi", AOI, "--format", "json", cwd=work)
    assert listed.code == 0, listed.err
    rows = {r["id"]: r for r in listed.json()}
    assert rows[first]["state"] == "provisional" and rows[second]["state"] == "dismissed"
    for key in ("id", "kind", "aoi", "acquired", "sensor", "state", "estimated_cars", "peak_cars", "baseline_cars",
                "score", "sensors", "escalated", "last_acquired", "resolved_at", "opened_at", "notified"):
        assert key in rows[first]
    status = railwatch("status", "--format", "json", cwd=work)
    assert status.code == 0, status.err
    mine = next(a for a in status.json()["aois"] if a["aoi"] == AOI)
    assert mine["alerts_acked"] == 1 and mine["alerts_dismissed"] == 1
    assert mine["open_alerts"] == [first] and mine["silenced"] is False


def _deliveries(work: Path) -> list[tuple[str, str, str]]:
    st = Store(f"sqlite:///{work / 'var' / 'railwatch.db'}")
    try:
        with st.session() as s:
            return [(r.subscriber, r.event_type, r.state) for r in s.scalars(select(DeliveryRow).order_by(DeliveryRow.id))]
    finally:
        st.close()


def test_silence_through_the_cli_on_a_simulated_surge(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
                                                      peers: tuple[SmtpSink, WebhookReceiver]) -> None:
    """The real pipeline: scenes processed while silenced notify no one; after the silence they do."""
    sink, hook = peers
    work = surge_project(tmp_path, tmp_path_factory, extra_toml=_subscribers(sink, hook))
    add = railwatch("silence", "add", "--aoi", AOI, "--until", "2025-06-20", "--reason", "track works, known traffic",
                    "--format", "json", cwd=work, env=at("2025-03-20T00:00:00Z"))
    assert add.code == 0, add.err
    silence = add.json()
    assert silence["state"] == "active" and silence["until"] == "2025-06-20T00:00:00Z"

    # 1. Silenced across the surge: every alert event is recorded, its deliveries suppressed, nothing sent.
    run1 = railwatch("run", "--once", "--no-progress", cwd=work, env=at("2025-06-19T23:00:00Z"))
    assert run1.code == 0, run1.err
    during = _deliveries(work)
    assert all(state == "suppressed" for _s, _e, state in during), during
    assert sink.messages == [] and hook.requests == []
    status = railwatch("status", "--format", "json", cwd=work, env=at("2025-06-19T23:00:00Z")).json()
    mine = next(a for a in status["aois"] if a["aoi"] == AOI)
    assert mine["silenced"] is True and mine["silenced_until"] == "2025-06-20T00:00:00Z"
    assert mine["silence"] == {"id": silence["id"], "until": "2025-06-20T00:00:00Z",
                               "reason": "track works, known traffic"}

    # 2. The silence lifted itself: whatever the rest of the scenes raise is sent, over SMTP and the webhook.
    run2 = railwatch("run", "--once", "--no-progress", cwd=work, env=at("2025-07-01T00:00:00Z"))
    assert run2.code == 0, run2.err
    after = _deliveries(work)[len(during):]
    assert during or after, "the simulated surge raised no alert event at all"
    assert all(state == "delivered" for _s, _e, state in after), after
    assert len(sink.messages) == sum(1 for sub, _e, _st in after if sub == "ops-mail")
    assert len(hook.requests) == sum(1 for sub, _e, _st in after if sub == "ops-hook")
    listed = railwatch("silence", "list", "--all", "--format", "json", cwd=work, env=at("2025-07-01T00:00:00Z")).json()
    assert [(x["id"], x["state"]) for x in listed] == [(silence["id"], "expired")]
    final = railwatch("status", "--format", "json", cwd=work, env=at("2025-07-01T00:00:00Z")).json()
    mine = next(a for a in final["aois"] if a["aoi"] == AOI)
    assert mine["silenced"] is False and mine["silence"] is None and mine["silenced_until"] is None
    # Removing the expired silence is recorded (and shown with --all).
    removed = railwatch("silence", "remove", str(silence["id"]), "--format", "json", cwd=work,
                        env=at("2025-07-01T00:00:00Z"))
    assert removed.code == 0, removed.err
    assert removed.json()["state"] == "removed" and removed.json()["removed_at"] == "2025-07-01T00:00:00Z"
