"""Alert delivery end to end: a real SMTP server, a real HTTP receiver, a real store.

The outbox functions run against SQLite (a temporary file) and, when RAILWATCH_TEST_POSTGRES_URL is
set, PostgreSQL (a schema of its own per test). Time is injected: no test waits for a backoff.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import standardwebhooks
from sqlalchemy import create_engine, select
from sqlalchemy.engine import make_url

from railwatch.alerts import outbox
from railwatch.alerts.outbox import dispatch_pending, emit_reminders, enqueue, list_deliveries, retry_delivery
from railwatch.alerts.webhook import WebhookNotifier
from railwatch.config import Settings, load_settings, masked_dump
from railwatch.domain import S2, Aoi
from railwatch.errors import ConfigError, DeliveryError
from railwatch.store import AlertRow, Store
from railwatch.store.models import DeliveryRow

try:
    from tests.fakes_delivery import (
        Reply,
        SmtpSink,
        WebhookReceiver,
        new_whsec,
        smtp_sink,  # fixture
        webhook_receiver,  # fixture
    )
except ModuleNotFoundError:  # run as `pytest` rather than `python -m pytest`: put the repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.fakes_delivery import (
        Reply,
        SmtpSink,
        WebhookReceiver,
        new_whsec,
        smtp_sink,  # noqa: F401  (fixture)
        webhook_receiver,  # noqa: F401  (fixture)
    )

# aiosmtpd sets its own deprecated attribute on every successful AUTH.
pytestmark = pytest.mark.filterwarnings("ignore:Session.login_data is deprecated:DeprecationWarning")

T0 = datetime(2024, 5, 12, 2, 25, 49, tzinfo=UTC)
SECRET_A = new_whsec(1)
SECRET_B = new_whsec(2)
SMTP_PASSWORD = "s3cr3t-smtp-Pa55word"
KHASAN = Aoi(
    id="tumangang-khasan",
    name="Tumangang–Khasan",
    geometry={"type": "Polygon", "coordinates": [[[130.6, 42.4], [130.7, 42.4], [130.7, 42.5], [130.6, 42.4]]]},
    tracks=(),
)
DANDONG = Aoi(
    id="dandong-sinuiju",
    name="Dandong–Sinuiju",
    geometry={"type": "Polygon", "coordinates": [[[124.3, 40.0], [124.4, 40.0], [124.4, 40.1], [124.3, 40.0]]]},
    tracks=(),
)
ENV = {"HOOK_SECRET_A": SECRET_A, "HOOK_SECRET_B": SECRET_B, "SMTP_PASSWORD": SMTP_PASSWORD}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64

# --- fixtures and helpers ---------------------------------------------------------------------------
_BACKENDS = [pytest.param("sqlite", id="sqlite")]
if os.environ.get("RAILWATCH_TEST_POSTGRES_URL"):
    _BACKENDS.append(pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres))


@pytest.fixture(params=_BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        st = Store(f"sqlite:///{tmp_path / 'railwatch.db'}")
        yield st
        st.close()
        return
    base = os.environ["RAILWATCH_TEST_POSTGRES_URL"]
    schema = f"rw_delivery_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    st = Store(url.render_as_string(hide_password=False))
    try:
        yield st
    finally:
        st.close()
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


def settings_for(tmp_path: Path, body: str, environ: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "railwatch.toml"
    path.write_text(body, encoding="utf-8")
    return load_settings(path, environ=ENV if environ is None else environ, cwd=tmp_path)


def webhook_sub(name: str, url: str, *, secret_env: str | list[str] = "HOOK_SECRET_A", extra: str = "") -> str:
    secret = json.dumps(secret_env)
    return f'[[subscribers]]\nname = "{name}"\nkind = "webhook"\nurl = "{url}"\nsecret_env = {secret}\n{extra}\n'


def email_sub(name: str, sink: SmtpSink, *, extra: str = "") -> str:
    lines = [
        "[[subscribers]]", f'name = "{name}"', 'kind = "email"', 'to = ["ops@example.org", "duty@example.org"]',
        'from = "railwatch <alerts@railwatch.example>"', f'smtp_host = "{sink.host}"', f"smtp_port = {sink.port}",
        f'smtp_security = "{sink.security}"',
    ]
    if sink.ca_file:
        lines.append(f'smtp_ca_file = "{sink.ca_file}"')
    return "\n".join(lines) + "\n" + extra + "\n"


def record_event(
    store: Store,
    settings: Settings,
    event: str = "alert.opened",
    *,
    aoi: Aoi = KHASAN,
    alert_id: int | None = None,
    state: str = "confirmed",
    acquired: datetime | None = T0,
    now: datetime = T0,
    suppressed: bool = False,
    chart: bytes | None = None,
    cars: float = 71.2,
) -> tuple[int, int, list[int]]:
    """Record an alert event the way the pipeline does: add_event + enqueue in one transaction."""
    with store.session() as s:
        if alert_id is None:
            alert = AlertRow(kind="activity", aoi_id=aoi.id, sensor=S2, state=state, opened_acquired=acquired,
                             last_acquired=acquired, opened_at=now, estimated_cars=cars, estimated_cars_low=cars - 13,
                             estimated_cars_high=cars + 15, peak_cars=74.0, baseline_cars=14.4, score=6.31)
            s.add(alert)
            s.flush()
        else:
            got = s.get(AlertRow, alert_id)
            assert got is not None
            alert = got
            alert.state = state
            alert.last_acquired = acquired or alert.last_acquired
        ev = store.add_event(s, alert, event, acquired=acquired, data={})
        assert ev is not None
        ev.created_at = now
        rows = enqueue(s, settings, ev, alert, aoi, suppressed=suppressed, chart_png=chart, now=now)
        return alert.id, ev.id, [r.id for r in rows]


def dispatch(store: Store, settings: Settings, now: datetime, **kw: Any) -> outbox.DispatchReport:
    return dispatch_pending(store, settings, now, rng=random.Random(1234), **kw)


def rows(store: Store) -> list[DeliveryRow]:
    with store.session() as s:
        return list(s.scalars(select(DeliveryRow).order_by(DeliveryRow.id)))


def verify(secret: str, req: Any) -> Any:
    return standardwebhooks.Webhook(secret).verify(req.body, req.headers)


# --- one event, one notification per subscriber ----------------------------------------------------
def test_event_sends_exactly_one_email_and_one_webhook_per_subscriber(
    store: Store, tmp_path: Path, smtp_sink: SmtpSink, webhook_receiver: WebhookReceiver
) -> None:
    settings = settings_for(tmp_path, email_sub("ops-mail", smtp_sink)
                            + webhook_sub("hook-1", webhook_receiver.url("/one"))
                            + webhook_sub("hook-2", webhook_receiver.url("/two"), secret_env="HOOK_SECRET_B"))
    alert_id, event_id, queued = record_event(store, settings, chart=PNG)
    assert len(queued) == 3
    assert {r.state for r in rows(store)} == {"pending"}

    report = dispatch(store, settings, T0)
    assert (report.claimed, report.delivered, report.retrying, report.dead) == (3, 3, 0, 0)
    assert len(smtp_sink.messages) == 1
    assert len(webhook_receiver.at("/one")) == 1
    assert len(webhook_receiver.at("/two")) == 1

    # Nothing is sent twice: later runs find nothing due.
    assert dispatch(store, settings, T0 + timedelta(days=3)).claimed == 0
    assert len(smtp_sink.messages) == 1
    assert len(webhook_receiver.requests) == 2

    listed = {d.subscriber: d for d in list_deliveries(store)}
    assert set(listed) == {"ops-mail", "hook-1", "hook-2"}
    for d in listed.values():
        assert (d.state, d.attempts, d.last_error, d.next_attempt, d.event, d.event_id, d.alert_id) == (
            "delivered", 1, "", None, "alert.opened", event_id, alert_id)
        assert d.delivered_at == T0

    mail = smtp_sink.messages[0]
    assert mail.rcpt_tos == ["ops@example.org", "duty@example.org"]
    assert mail.mail_from == "alerts@railwatch.example"
    msg = mail.message
    assert msg["Subject"] == "[railwatch] Tumangang–Khasan: 71 cars vs baseline 14 (confirmed)"
    assert msg.is_multipart()
    text = msg.get_body(("plain",))
    html_part = msg.get_body(("html",))
    assert text is not None
    assert html_part is not None
    assert "Estimated cars  71 (58–86)" in text.get_content()
    images = [p for p in msg.walk() if p.get_content_type() == "image/png"]
    assert len(images) == 1
    assert images[0].get_content() == PNG
    cid = images[0]["Content-ID"].strip("<>")
    assert f'src="cid:{cid}"' in html_part.get_content()

    req = webhook_receiver.at("/one")[0]
    payload = verify(SECRET_A, req)
    assert payload["delivery_id"] == req.headers["webhook-id"] == listed["hook-1"].key
    assert payload["schema_version"] == 1
    assert payload["type"] == "alert.opened"
    assert payload["event"]["id"] == event_id
    assert payload["alert"]["id"] == alert_id
    assert payload["aoi"] == {"id": KHASAN.id, "name": KHASAN.name, "geometry": json.loads(json.dumps(KHASAN.geometry))}
    assert payload["scene"] == {"id": "sentinel-2-l2a_20240512T022549Z", "sensor": S2, "acquired": "2024-05-12T02:25:49Z"}
    assert payload["estimated_cars"] == {"value": 71.2, "low": 58.2, "high": 86.2}
    assert (payload["peak_cars"], payload["baseline_cars"], payload["score"], payload["state"]) == (74.0, 14.4, 6.31,
                                                                                                    "confirmed")
    assert payload["evidence"] == []
    assert payload["railwatch_version"]
    assert req.headers["content-type"] == "application/json"
    verify(SECRET_B, webhook_receiver.at("/two")[0])


def test_enqueue_is_part_of_the_event_transaction_and_idempotent(store: Store, tmp_path: Path) -> None:
    settings = settings_for(tmp_path, webhook_sub("hook", "http://127.0.0.1:9/hook"))

    def pipeline_that_fails_after_enqueue() -> None:
        with store.session() as s:
            alert = AlertRow(kind="activity", aoi_id=KHASAN.id, sensor=S2, state="confirmed")
            s.add(alert)
            s.flush()
            ev = store.add_event(s, alert, "alert.opened", acquired=T0, data={})
            assert len(enqueue(s, settings, ev, alert, KHASAN, suppressed=False, now=T0)) == 1
            raise RuntimeError("pipeline failed")

    with pytest.raises(RuntimeError, match="pipeline failed"):
        pipeline_that_fails_after_enqueue()
    assert rows(store) == []  # rolled back with the event
    with store.session() as s:
        assert s.scalars(select(AlertRow)).all() == []

    with store.session() as s:
        alert = AlertRow(kind="activity", aoi_id=KHASAN.id, sensor=S2, state="confirmed")
        s.add(alert)
        s.flush()
        ev = store.add_event(s, alert, "alert.opened", acquired=T0, data={})
        assert len(enqueue(s, settings, ev, alert, KHASAN, suppressed=False, now=T0)) == 1
        assert enqueue(s, settings, ev, alert, KHASAN, suppressed=False, now=T0) == []  # same event again
        again = store.add_event(s, alert, "alert.opened", acquired=T0, data={})  # re-processing: None
        assert enqueue(s, settings, again, alert, KHASAN, suppressed=False, now=T0) == []
    assert len(rows(store)) == 1


def test_new_deliveries_are_due_whatever_the_dispatcher_clock_says(
    store: Store, tmp_path: Path, webhook_receiver: WebhookReceiver
) -> None:
    """The pipeline queues on the wall clock; a daemon on an injected (earlier) clock still sends at once."""
    settings = settings_for(tmp_path, webhook_sub("hook", webhook_receiver.url()))
    with store.session() as s:
        alert = AlertRow(kind="activity", aoi_id=KHASAN.id, sensor=S2, state="confirmed")
        s.add(alert)
        s.flush()
        enqueue(s, settings, store.add_event(s, alert, "alert.opened", acquired=T0, data={}), alert, KHASAN,
                suppressed=False)
    [pending] = list_deliveries(store)
    assert (pending.state, pending.next_attempt) == ("pending", None)
    assert pending.created_at > T0 + timedelta(days=365)  # the wall clock
    assert dispatch(store, settings, T0).delivered == 1


# --- signatures -------------------------------------------------------------------------------------
def test_signature_verifies_with_either_rotating_secret_and_fails_when_tampered(
    store: Store, tmp_path: Path, webhook_receiver: WebhookReceiver
) -> None:
    settings = settings_for(tmp_path, webhook_sub("hook", webhook_receiver.url(),
                                                  secret_env=["HOOK_SECRET_A", "HOOK_SECRET_B"]))
    record_event(store, settings)
    dispatch(store, settings, T0)
    [req] = webhook_receiver.requests
    assert len(req.headers["webhook-signature"].split(" ")) == 2
    assert all(sig.startswith("v1,") for sig in req.headers["webhook-signature"].split(" "))
    assert verify(SECRET_A, req)["type"] == "alert.opened"
    assert verify(SECRET_B, req)["type"] == "alert.opened"
    # Only one of the two secrets configured at the receiver (mid-rotation) still verifies.
    assert standardwebhooks.Webhook(SECRET_B).verify(req.body, req.headers)["delivery_id"] == req.headers["webhook-id"]

    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(new_whsec(3)).verify(req.body, req.headers)
    tampered = req.body.replace(b'"confirmed"', b'"provisional"')
    assert tampered != req.body
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(SECRET_A).verify(tampered, req.headers)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(SECRET_A).verify(req.body, {**req.headers, "webhook-id": "rwd_other"})


def test_stale_timestamp_fails_verification(store: Store, tmp_path: Path, webhook_receiver: WebhookReceiver) -> None:
    settings = settings_for(tmp_path, webhook_sub("hook", webhook_receiver.url()))
    record_event(store, settings)

    def late_clock(index: int, sub: Any, st: Settings) -> WebhookNotifier:
        return WebhookNotifier(sub, [SECRET_A], clock=lambda: time.time() - 600)

    dispatch(store, settings, T0, notifiers={"webhook": late_clock})
    [req] = webhook_receiver.requests
    assert abs(int(req.headers["webhook-timestamp"]) - (time.time() - 600)) < 60
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError, match="too old"):
        verify(SECRET_A, req)


# --- retries, backoff, dead letters ------------------------------------------------------------------
def test_receiver_failing_three_times_gets_the_delivery_once_it_recovers(
    store: Store, tmp_path: Path, webhook_receiver: WebhookReceiver
) -> None:
    settings = settings_for(tmp_path, webhook_sub("hook", webhook_receiver.url()))
    record_event(store, settings)
    webhook_receiver.respond(500, 502, Reply(503, body=b"maintenance"), 200)
    now = T0
    waits = []
    for attempt in (1, 2, 3):
        report = dispatch(store, settings, now)
        assert report.retrying == 1
        [d] = list_deliveries(store)
        assert (d.state, d.attempts) == ("retrying", attempt)
        assert d.next_attempt is not None
        assert d.next_attempt > now
        assert dispatch(store, settings, d.next_attempt - timedelta(seconds=1)).claimed == 0  # not due yet
        waits.append((d.next_attempt - now).total_seconds())
        now = d.next_attempt
    assert "HTTP 503: maintenance" in d.last_error
    # Exponential with jitter: each wait within [0.5, 1] x 30 s x 2^(n-1).
    for n, w in enumerate(waits):
        assert 15 * 2**n <= w <= 30 * 2**n
    report = dispatch(store, settings, now)
    assert report.delivered == 1
    [d] = list_deliveries(store)
    assert (d.state, d.attempts, d.last_error) == ("delivered", 4, "")
    assert len(webhook_receiver.requests) == 4
    assert len({r.headers["webhook-id"] for r in webhook_receiver.requests}) == 1  # one idempotency key
    assert dispatch(store, settings, now + timedelta(days=2)).claimed == 0


def test_client_error_is_dead_with_the_reason(store: Store, tmp_path: Path, webhook_receiver: WebhookReceiver) -> None:
    settings = settings_for(tmp_path, webhook_sub("hook", webhook_receiver.url()))
    record_event(store, settings)
    webhook_receiver.respond(Reply(400, body=b'{"error": "unknown field alert"}'))
    assert dispatch(store, settings, T0).dead == 1
    [d] = list_deliveries(store, failed_only=True)
    assert d.state == "dead"
    assert d.attempts == 1
    assert d.next_attempt is None
    assert "HTTP 400" in d.last_error
    assert "unknown field alert" in d.last_error
    assert dispatch(store, settings, T0 + timedelta(days=2)).claimed == 0
    assert len(webhook_receiver.requests) == 1

    # An operator fixes the receiver and retries the dead delivery.
    info = retry_delivery(store, settings, d.id, now=T0 + timedelta(days=3))
    assert (info.state, info.next_attempt) == ("pending", T0 + timedelta(days=3))
    assert dispatch(store, settings, T0 + timedelta(days=3)).delivered == 1
    assert list_deliveries(store)[0].state == "delivered"
    with pytest.raises(DeliveryError, match="is delivered"):
        retry_delivery(store, settings, d.id)
    with pytest.raises(DeliveryError, match="no delivery 999"):
        retry_delivery(store, settings, 999)


def test_redirect_is_not_followed(store: Store, tmp_path: Path, webhook_receiver: WebhookReceiver) -> None:
    settings = settings_for(tmp_path, webhook_sub("hook", webhook_receiver.url("/old")))
    record_event(store, settings)
    webhook_receiver.respond(Reply(307, headers={"location": webhook_receiver.url("/new?token=abc")}))
    assert dispatch(store, settings, T0).dead == 1
    assert [r.path for r in webhook_receiver.requests] == ["/old"]
    [d] = list_deliveries(store)
    assert "redirect" in d.last_error
    assert "token=abc" not in d.last_error


@pytest.mark.parametrize("status", [429, 503, 408])
def test_retry_after_is_honoured(
    store: Store, tmp_path: Path, webhook_receiver: WebhookReceiver, status: int
) -> None:
    settings = settings_for(tmp_path, webhook_sub("hook", webhook_receiver.url()))
    record_event(store, settings)
    webhook_receiver.respond(Reply(status, headers={"retry-after": "120"}), 200)
    dispatch(store, settings, T0)
    [d] = list_deliveries(store)
    assert (d.state, d.next_attempt) == ("retrying", T0 + timedelta(seconds=120))
    assert "Retry-After 120 s" in d.last_error
    assert dispatch(store, settings, T0 + timedelta(seconds=119)).claimed == 0
    assert dispatch(store, settings, T0 + timedelta(seconds=120)).delivered == 1


def test_gives_up_after_the_horizon(store: Store, tmp_path: Path, webhook_receiver: WebhookReceiver) -> None:
    settings = settings_for(tmp_path, "[delivery]\nhorizon_hours = 2\n" + webhook_sub("hook", webhook_receiver.url()))
    record_event(store, settings)
    webhook_receiver.respond(*([500] * 50))
    now, tries = T0, 0
    while tries < 50:
        dispatch(store, settings, now)
        tries += 1
        [d] = list_deliveries(store)
        if d.state == "dead":
            break
        assert d.next_attempt is not None
        assert d.next_attempt <= T0 + timedelta(hours=2)
        now = d.next_attempt
    assert d.state == "dead"
    assert now == T0 + timedelta(hours=2)  # the last try is at the horizon, not after it
    assert d.last_error.startswith(f"gave up after {tries} attempts over 2 h")
    assert len(webhook_receiver.requests) == tries


def test_timeout_is_bounded_and_retryable(store: Store, tmp_path: Path, webhook_receiver: WebhookReceiver) -> None:
    settings = settings_for(tmp_path, "[delivery]\ntimeout_seconds = 0.3\nclaim_lease_seconds = 30\n"
                            + webhook_sub("hook", webhook_receiver.url()))
    record_event(store, settings)
    webhook_receiver.respond(Reply(hang=True))
    started = time.monotonic()
    assert dispatch(store, settings, T0).retrying == 1
    assert time.monotonic() - started < 3
    assert "timed out after 0.3 s" in list_deliveries(store)[0].last_error


def test_unreachable_receiver_is_retried(store: Store, tmp_path: Path) -> None:
    from tests.fakes_delivery import free_port

    settings = settings_for(tmp_path, webhook_sub("hook", f"http://127.0.0.1:{free_port()}/hook"))
    record_event(store, settings)
    assert dispatch(store, settings, T0).retrying == 1
    assert "unreachable" in list_deliveries(store)[0].last_error


# --- backfills ---------------------------------------------------------------------------------------
def test_suppressed_deliveries_are_never_sent(
    store: Store, tmp_path: Path, smtp_sink: SmtpSink, webhook_receiver: WebhookReceiver
) -> None:
    settings = settings_for(tmp_path, email_sub("mail", smtp_sink) + webhook_sub("hook", webhook_receiver.url()))
    for day in range(5):
        record_event(store, settings, acquired=T0 + timedelta(days=day), now=T0 + timedelta(days=day),
                     suppressed=True)
    assert [r.state for r in rows(store)] == ["suppressed"] * 10
    for later in (T0, T0 + timedelta(days=10), T0 + timedelta(days=400)):
        assert dispatch(store, settings, later).claimed == 0
    assert smtp_sink.messages == []
    assert webhook_receiver.requests == []
    with pytest.raises(DeliveryError, match="is suppressed"):
        retry_delivery(store, settings, rows(store)[0].id)


# --- routing -----------------------------------------------------------------------------------------
def test_filters_route_events_as_configured(store: Store, tmp_path: Path, webhook_receiver: WebhookReceiver) -> None:
    u = webhook_receiver.url
    settings = settings_for(
        tmp_path,
        webhook_sub("all", u("/all"))
        + webhook_sub("tumangang", u("/tumangang"), extra='aois = ["tumangang-*"]')
        + webhook_sub("confirmed", u("/confirmed"), extra='min_state = "confirmed"')
        + webhook_sub("quiet-end", u("/quiet-end"), extra="resolved = false")
        + webhook_sub("dandong", u("/dandong"), extra='aois = ["dandong-sinuiju", "nowhere"]'),
    )
    khasan, _, _ = record_event(store, settings, state="provisional")
    record_event(store, settings, "alert.confirmed", alert_id=khasan, state="confirmed",
                 acquired=T0 + timedelta(days=1))
    dandong, _, _ = record_event(store, settings, aoi=DANDONG, state="provisional")
    record_event(store, settings, "alert.resolved", alert_id=dandong, aoi=DANDONG, state="resolved",
                 acquired=T0 + timedelta(days=2))
    dispatch(store, settings, T0 + timedelta(days=3))

    def got(path: str) -> list[tuple[str, str]]:
        return [(p["aoi"]["id"], p["type"]) for p in (r.json() for r in webhook_receiver.at(path))]

    k, d = KHASAN.id, DANDONG.id
    assert got("/all") == [(k, "alert.opened"), (k, "alert.confirmed"), (d, "alert.opened"), (d, "alert.resolved")]
    assert got("/tumangang") == [(k, "alert.opened"), (k, "alert.confirmed")]
    # Never told about the provisional Dandong alert, so not about its resolution either.
    assert got("/confirmed") == [(k, "alert.confirmed")]
    assert got("/quiet-end") == [(k, "alert.opened"), (k, "alert.confirmed"), (d, "alert.opened")]
    assert got("/dandong") == [(d, "alert.opened"), (d, "alert.resolved")]


# --- email -------------------------------------------------------------------------------------------
def test_each_event_of_one_alert_is_its_own_email_in_one_thread(store: Store, tmp_path: Path, smtp_sink: SmtpSink) -> None:
    settings = settings_for(tmp_path, email_sub("mail", smtp_sink))
    first, _, _ = record_event(store, settings, state="provisional")
    record_event(store, settings, "alert.confirmed", alert_id=first, acquired=T0 + timedelta(days=1))
    record_event(store, settings, "alert.escalated", alert_id=first, acquired=T0 + timedelta(days=3))
    record_event(store, settings, "alert.resolved", alert_id=first, state="resolved", acquired=T0 + timedelta(days=5))
    other, _, _ = record_event(store, settings, aoi=DANDONG, state="provisional")
    dispatch(store, settings, T0 + timedelta(days=6))
    msgs: list[EmailMessage] = [m.message for m in smtp_sink.messages]
    assert [m["X-Railwatch-Event"] for m in msgs] == ["alert.opened", "alert.confirmed", "alert.escalated",
                                                       "alert.resolved", "alert.opened"]
    root = msgs[0]["Message-ID"]
    assert root == f"<railwatch.alert.{first}.tumangang-khasan@railwatch.example>"
    assert msgs[0]["In-Reply-To"] is None
    for m in msgs[1:4]:
        assert m["In-Reply-To"] == root
        assert m["References"] == root
        assert m["Message-ID"] != root
    assert msgs[4]["Message-ID"] == f"<railwatch.alert.{other}.dandong-sinuiju@railwatch.example>"
    assert len({m["Message-ID"] for m in msgs}) == 5
    assert [m["Subject"] for m in msgs] == [
        "[railwatch] Tumangang–Khasan: 71 cars vs baseline 14 (provisional)",
        "[railwatch] Tumangang–Khasan: 71 cars vs baseline 14 (confirmed)",
        "[railwatch] Tumangang–Khasan: 71 cars vs baseline 14 (escalated)",
        "[railwatch] Tumangang–Khasan: 71 cars vs baseline 14 (resolved)",
        "[railwatch] Dandong–Sinuiju: 71 cars vs baseline 14 (provisional)",
    ]
    assert all(m["Auto-Submitted"] == "auto-generated" for m in msgs)
    assert abs(parsedate_to_datetime(msgs[0]["Date"]).timestamp() - time.time()) < 120


def test_smtp_temporary_failure_is_retried_and_permanent_one_is_dead(
    store: Store, tmp_path: Path, smtp_sink: SmtpSink
) -> None:
    settings = settings_for(tmp_path, email_sub("mail", smtp_sink))
    record_event(store, settings)
    smtp_sink.data_replies.append("451 4.3.0 Mail server temporarily unavailable")
    assert dispatch(store, settings, T0).retrying == 1
    [d] = list_deliveries(store)
    assert "451 4.3.0" in d.last_error
    assert d.next_attempt is not None
    assert dispatch(store, settings, d.next_attempt).delivered == 1
    assert len(smtp_sink.messages) == 1

    record_event(store, settings, aoi=DANDONG)
    smtp_sink.rcpt_replies.extend(["550 5.1.1 No such user", "550 5.1.1 No such user"])
    assert dispatch(store, settings, T0 + timedelta(days=1)).dead == 1
    dead = list_deliveries(store, failed_only=True)
    assert len(dead) == 1
    assert "550 5.1.1" in dead[0].last_error
    assert "refused every recipient" in dead[0].last_error

    record_event(store, settings, aoi=DANDONG, acquired=T0 + timedelta(days=2))
    smtp_sink.data_replies.append("554 5.7.1 Message rejected as spam")
    assert dispatch(store, settings, T0 + timedelta(days=2)).dead == 1
    assert len(smtp_sink.messages) == 1


def test_smtp_unreachable_is_retried(store: Store, tmp_path: Path) -> None:
    from tests.fakes_delivery import free_port

    closed = SimpleNamespace(host="127.0.0.1", port=free_port(), security="none", ca_file=None)  # nobody listens
    settings = settings_for(tmp_path, email_sub("mail", closed))  # type: ignore[arg-type]
    record_event(store, settings)
    assert dispatch(store, settings, T0).retrying == 1
    assert "will retry" in list_deliveries(store)[0].last_error


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_smtp_over_tls_with_login(store: Store, tmp_path: Path, security: str) -> None:
    sink = SmtpSink(security=security, cert_dir=tmp_path, username="railwatch", password=SMTP_PASSWORD).start()
    try:
        extra = 'username = "railwatch"\npassword_env = "SMTP_PASSWORD"'
        settings = settings_for(tmp_path, email_sub("mail", sink, extra=extra))
        record_event(store, settings)
        assert dispatch(store, settings, T0).delivered == 1
        assert len(sink.messages) == 1
        assert sink.logins == ["railwatch"]

        wrong = settings_for(tmp_path, email_sub("mail", sink, extra=extra), environ={**ENV, "SMTP_PASSWORD": "nope"})
        record_event(store, wrong, aoi=DANDONG)
        assert dispatch(store, wrong, T0).dead == 1
        err = list_deliveries(store, failed_only=True)[0].last_error
        assert "login as railwatch refused: 535" in err
        assert "nope" not in err
    finally:
        sink.stop()


# --- crash safety ------------------------------------------------------------------------------------
def test_crash_between_send_and_record_resends_with_the_same_idempotency_key(
    store: Store, tmp_path: Path, smtp_sink: SmtpSink, webhook_receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_for(tmp_path, email_sub("mail", smtp_sink) + webhook_sub("hook", webhook_receiver.url()))
    record_event(store, settings)

    class Crash(BaseException):
        """The process dies: nothing after the send runs."""

    def crash(*args: Any, **kwargs: Any) -> None:
        raise Crash

    with monkeypatch.context() as m:
        m.setattr(outbox, "_record_success", crash)
        with pytest.raises(Crash):
            dispatch(store, settings, T0)
    # The send went out, the success was not recorded: the row is still pending, under its lease.
    assert len(webhook_receiver.requests) + len(smtp_sink.messages) == 1
    assert {(d.state, d.attempts) for d in list_deliveries(store)} == {("pending", 0)}
    assert dispatch(store, settings, T0 + timedelta(seconds=60)).claimed == 0  # lease still held

    after_lease = T0 + timedelta(seconds=settings.delivery.claim_lease_seconds + 1)
    report = dispatch(store, settings, after_lease)
    assert report.delivered == 2
    assert {d.state for d in list_deliveries(store)} == {"delivered"}
    sent_twice = webhook_receiver.requests if len(webhook_receiver.requests) == 2 else None
    if sent_twice is not None:
        assert sent_twice[0].headers["webhook-id"] == sent_twice[1].headers["webhook-id"]
        assert sent_twice[0].json()["delivery_id"] == sent_twice[1].json()["delivery_id"]
        assert sent_twice[0].body == sent_twice[1].body
        assert len(smtp_sink.messages) == 1
    else:
        assert len(smtp_sink.messages) == 2
        assert len(webhook_receiver.requests) == 1
        assert smtp_sink.messages[0].message["Message-ID"] == smtp_sink.messages[1].message["Message-ID"]


def test_crash_after_claim_loses_nothing(store: Store, tmp_path: Path, webhook_receiver: WebhookReceiver,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(tmp_path, webhook_sub("hook", webhook_receiver.url()))
    record_event(store, settings)

    class Crash(BaseException):
        pass

    def crash(*args: Any, **kwargs: Any) -> None:
        raise Crash

    with monkeypatch.context() as m:
        m.setattr(outbox, "_attempt", crash)
        with pytest.raises(Crash):
            dispatch(store, settings, T0)
    assert webhook_receiver.requests == []
    assert dispatch(store, settings, T0 + timedelta(minutes=10)).delivered == 1
    assert len(webhook_receiver.requests) == 1


def test_concurrent_dispatchers_send_each_delivery_once(
    store: Store, tmp_path: Path, webhook_receiver: WebhookReceiver
) -> None:
    settings = settings_for(tmp_path, webhook_sub("hook", webhook_receiver.url()))
    for day in range(12):
        record_event(store, settings, acquired=T0 + timedelta(days=day))
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            for _ in range(4):
                dispatch_pending(store, settings, T0 + timedelta(days=20), limit=2, worker=f"w{n}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    ids = [r.headers["webhook-id"] for r in webhook_receiver.requests]
    assert len(ids) == len(set(ids)) == 12
    assert {d.state for d in list_deliveries(store)} == {"delivered"}


def test_postgres_claim_skips_rows_locked_by_another_dispatcher(
    store: Store, tmp_path: Path, webhook_receiver: WebhookReceiver
) -> None:
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SKIP LOCKED is the PostgreSQL claim")
    settings = settings_for(tmp_path, webhook_sub("hook", webhook_receiver.url()))
    record_event(store, settings)
    record_event(store, settings, aoi=DANDONG)
    first = rows(store)[0].id
    with store.session() as s:
        s.execute(select(DeliveryRow).where(DeliveryRow.id == first).with_for_update())
        report = dispatch(store, settings, T0)  # another connection: must not block on the locked row
        assert report.claimed == 1
    assert dispatch(store, settings, T0).delivered == 1
    assert len(webhook_receiver.requests) == 2


# --- quiet by design ---------------------------------------------------------------------------------
def test_rate_limit_sends_a_digest_when_exceeded(
    store: Store, tmp_path: Path, webhook_receiver: WebhookReceiver, smtp_sink: SmtpSink
) -> None:
    settings = settings_for(tmp_path, webhook_sub("hook", webhook_receiver.url(), extra="max_per_hour = 2")
                            + email_sub("mail", smtp_sink, extra="max_per_hour = 2"))
    for day in range(5):
        record_event(store, settings, acquired=T0 + timedelta(days=day))
    report = dispatch(store, settings, T0 + timedelta(days=6))
    assert report.digests == 2
    assert len(webhook_receiver.requests) == 2
    assert len(smtp_sink.messages) == 2
    single, digest = (r.json() for r in webhook_receiver.requests)
    assert single["type"] == "alert.opened"
    assert digest["type"] == "digest"
    assert digest["max_per_hour"] == 2
    assert len(digest["events"]) == 4
    assert verify(SECRET_A, webhook_receiver.requests[1])["delivery_id"] == digest["delivery_id"]
    assert smtp_sink.messages[1].message["Subject"] == "[railwatch] digest of 4 alert events (limit 2 per hour)"
    listed = list_deliveries(store, subscriber="hook")
    assert sorted(d.state for d in listed) == ["delivered"] * 6
    digest_row = next(d for d in listed if d.event == "digest")
    assert sum(1 for d in listed if d.digest_id == digest_row.id) == 4

    # At the limit: the next events wait for the window and then go out one by one.
    t1 = T0 + timedelta(days=6, minutes=10)
    record_event(store, settings, aoi=DANDONG, now=t1)
    record_event(store, settings, aoi=DANDONG, acquired=T0 + timedelta(days=6), now=t1)
    report = dispatch(store, settings, t1)
    assert (report.held, report.delivered) == (4, 0)
    held = [d for d in list_deliveries(store, states=["pending"]) if d.subscriber == "hook"]
    reopen = T0 + timedelta(days=6, hours=1)  # when the sends at T0 + 6 days leave the window
    assert {d.next_attempt for d in held} == {reopen}
    assert dispatch(store, settings, reopen - timedelta(seconds=1)).claimed == 0
    assert dispatch(store, settings, reopen).delivered == 4
    assert [r.json()["type"] for r in webhook_receiver.requests[2:]] == ["alert.opened", "alert.opened"]


def test_reminders_for_alerts_that_stay_open(store: Store, tmp_path: Path, webhook_receiver: WebhookReceiver) -> None:
    body = webhook_sub("hook", webhook_receiver.url())
    off = settings_for(tmp_path, body)
    khasan, _, _ = record_event(store, off)
    dandong, _, _ = record_event(store, off, aoi=DANDONG)
    assert emit_reminders(store, off, T0 + timedelta(days=30)) == []  # off by default

    settings = settings_for(tmp_path, "[delivery]\nreminder_hours = 24\n" + body)
    record_event(store, settings, "alert.resolved", alert_id=dandong, aoi=DANDONG, state="resolved",
                 now=T0 + timedelta(hours=1),
                 acquired=T0 + timedelta(hours=1))
    assert emit_reminders(store, settings, T0 + timedelta(hours=23)) == []
    made = emit_reminders(store, settings, T0 + timedelta(hours=24))
    assert [(e.alert_id, e.type) for e in made] == [(khasan, "alert.reminder")]
    assert emit_reminders(store, settings, T0 + timedelta(hours=30)) == []
    assert len(emit_reminders(store, settings, T0 + timedelta(hours=48))) == 1
    dispatch(store, settings, T0 + timedelta(hours=49))
    reminders = [r.json() for r in webhook_receiver.requests if r.json()["type"] == "alert.reminder"]
    assert len(reminders) == 2
    assert reminders[0]["aoi"]["name"] == KHASAN.name
    assert reminders[0]["alert"]["id"] == khasan
    assert reminders[0]["scene"] is None


# --- test notifications ------------------------------------------------------------------------------
def test_test_subscriber_sends_a_marked_notification(
    tmp_path: Path, smtp_sink: SmtpSink, webhook_receiver: WebhookReceiver
) -> None:
    settings = settings_for(tmp_path, email_sub("mail", smtp_sink) + webhook_sub("hook", webhook_receiver.url()))
    result = outbox.test_subscriber(settings, "hook")
    assert (result.ok, result.kind, result.subscriber) == (True, "webhook", "hook")
    payload = verify(SECRET_A, webhook_receiver.requests[0])
    assert (payload["type"], payload["test"], payload["delivery_id"]) == ("test", True, result.key)

    result = outbox.test_subscriber(settings, "mail")
    assert result.ok
    msg = smtp_sink.messages[0].message
    assert msg["Subject"] == "[railwatch] test notification for subscriber mail (not an alert)"
    assert msg["X-Railwatch-Test"] == "true"

    webhook_receiver.respond(Reply(500, body=b"down"))
    failed = outbox.test_subscriber(settings, "hook")
    assert (failed.ok, failed.retryable) == (False, True)
    assert "HTTP 500: down" in failed.detail
    with pytest.raises(ConfigError, match="no subscriber named 'nobody'"):
        outbox.test_subscriber(settings, "nobody")


# --- secrets -----------------------------------------------------------------------------------------
def test_secrets_never_appear_in_output_logs_or_errors(
    store: Store, tmp_path: Path, webhook_receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    sink = SmtpSink(security="starttls", cert_dir=tmp_path, username="railwatch", password=SMTP_PASSWORD).start()
    try:
        body = (email_sub("mail", sink, extra='username = "railwatch"\npassword_env = "SMTP_PASSWORD"')
                + webhook_sub("hook", webhook_receiver.url("/hook/tok-path"), secret_env=["HOOK_SECRET_A",
                                                                                          "HOOK_SECRET_B"]))
        settings = settings_for(tmp_path, body)
        texts = [repr(settings), str(settings), json.dumps(masked_dump(settings)), repr(settings.subscribers),
                 repr(settings.secrets)]
        record_event(store, settings)
        webhook_receiver.respond(500, 200)
        texts.append(repr(dispatch(store, settings, T0)))
        texts.append(repr(dispatch(store, settings, T0 + timedelta(hours=1))))
        texts.append(repr(outbox.test_subscriber(settings, "mail")))
        texts.append(repr(outbox.test_subscriber(settings, "hook")))
        texts += [json.dumps(d.as_dict()) for d in list_deliveries(store)]
        # Failures too: a wrong password and a missing secret.
        bad = settings_for(tmp_path, body, environ={**ENV, "SMTP_PASSWORD": SMTP_PASSWORD + "x"})
        texts.append(repr(outbox.test_subscriber(bad, "mail")))
        for environ in ({k: v for k, v in ENV.items() if k != "HOOK_SECRET_B"},
                        {**ENV, "HOOK_SECRET_B": "whsec_!!notbase64" + SECRET_A[6:]}):
            with pytest.raises(ConfigError) as exc:
                settings_for(tmp_path, body, environ=environ)
            texts.append(str(exc.value))
        assert "HOOK_SECRET_B" in texts[-1]
        assert "HOOK_SECRET_B" in texts[-2]
    finally:
        sink.stop()
    out = capsys.readouterr()
    texts += [caplog.text, out.out, out.err]
    texts += [r.getMessage() for r in caplog.records]
    everything = "\n".join(texts)
    assert "alert.opened" in everything
    assert "********" in everything
    for secret in (SECRET_A, SECRET_B, SECRET_A[6:], SECRET_B[6:], SMTP_PASSWORD):
        assert secret not in everything
    assert "tok-path" not in "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("railwatch"))
