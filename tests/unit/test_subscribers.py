"""Subscriber configuration, routing, payload, signing and message building (pure parts of alerts/)."""

from __future__ import annotations

import base64
import json
import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import standardwebhooks

from railwatch.alerts.email import build_message, thread_root_id
from railwatch.alerts.outbox import backoff_seconds
from railwatch.alerts.payload import Delivery, encode, event_payload, headline, scene_id
from railwatch.alerts.payload import test_payload as make_test_payload
from railwatch.alerts.signing import sign, signature_header, signed_headers
from railwatch.alerts.subscribers import (
    EmailSubscriber,
    WebhookSubscriber,
    decode_webhook_secret,
    is_loopback_host,
    redact_url,
)
from railwatch.alerts.webhook import parse_retry_after
from railwatch.config import Settings, load_settings, masked_dump, require_secret
from railwatch.domain import S1, S2, Aoi
from railwatch.errors import ConfigError

SECRET_A = "whsec_" + base64.b64encode(b"a" * 32).decode()
SECRET_B = "whsec_" + base64.b64encode(b"b" * 24).decode()
PASSWORD = "hunter2-but-longer"
ENV = {"HOOK_A": SECRET_A, "HOOK_B": SECRET_B, "MAIL_PW": PASSWORD}
T0 = datetime(2024, 5, 12, 2, 25, 49, tzinfo=UTC)

EMAIL = """
[[subscribers]]
name = "ops-mail"
kind = "email"
to = ["ops@example.org"]
from = "railwatch <alerts@example.org>"
smtp_host = "smtp.example.org"
username = "railwatch"
password_env = "MAIL_PW"
"""
WEBHOOK = """
[[subscribers]]
name = "hook"
kind = "webhook"
url = "https://hooks.example.org/railwatch/T0K3N"
secret_env = ["HOOK_A", "HOOK_B"]
headers = { X-Team = "border" }
aois = ["tumangang-*"]
min_state = "confirmed"
resolved = false
max_per_hour = 6
"""


def load(tmp_path: Path, body: str, environ: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "railwatch.toml"
    path.write_text(body, encoding="utf-8")
    return load_settings(path, environ=ENV if environ is None else environ, cwd=tmp_path)


def problems(tmp_path: Path, body: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, body, environ)
    return str(exc.value)


# --- configuration ---------------------------------------------------------------------------------
def test_both_kinds_load_with_their_secrets(tmp_path: Path) -> None:
    s = load(tmp_path, EMAIL + WEBHOOK + "[delivery]\nhorizon_hours = 12\nreminder_hours = 48\n")
    mail, hook = s.subscribers
    assert isinstance(mail, EmailSubscriber)
    assert isinstance(hook, WebhookSubscriber)
    assert (mail.port, mail.smtp_security, mail.from_, mail.sender_domain) == (
        587, "starttls", "railwatch <alerts@example.org>", "example.org")
    assert (hook.aois, hook.min_state, hook.resolved, hook.max_per_hour, hook.headers) == (
        ["tumangang-*"], "confirmed", False, 6, {"X-Team": "border"})
    assert mail.aois == ["*"]
    assert mail.resolved
    assert mail.min_state == "provisional"
    assert (s.delivery.horizon_hours, s.delivery.reminder_hours) == (12, 48)
    assert {k: v.get_secret_value() for k, v in s.secrets.items()} == {
        "subscribers.0.password_env": PASSWORD,
        "subscribers.1.secret_env.0": SECRET_A,
        "subscribers.1.secret_env.1": SECRET_B,
    }
    assert require_secret(s, "subscribers.1.secret_env.1") == SECRET_B
    assert hook.secret_vars == ["HOOK_A", "HOOK_B"]


def test_defaults_have_no_subscribers_and_reminders_off() -> None:
    s = Settings()
    assert s.subscribers == []
    assert (s.delivery.horizon_hours, s.delivery.reminder_hours) == (24.0, None)


def test_masked_dump_shows_secrets_only_as_set(tmp_path: Path) -> None:
    s = load(tmp_path, EMAIL + WEBHOOK, {**ENV, "HOOK_B": SECRET_B})
    dumped = masked_dump(s)
    assert dumped["subscribers"][0]["password"] == "********"
    assert dumped["subscribers"][0]["password_env"] == "MAIL_PW"
    assert dumped["subscribers"][1]["secret"] == ["********", "********"]
    text = json.dumps(dumped) + repr(s) + str(s)
    for secret in (SECRET_A, SECRET_B, PASSWORD, SECRET_A[6:]):
        assert secret not in text
    # A webhook URL's path and header values may be tokens: reprs redact them.
    assert "T0K3N" not in repr(s) + str(s)
    assert "https://hooks.example.org/…" in repr(s)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (EMAIL.replace('"ops@example.org"', '"ops at example.org"'), "[subscribers.0.email] to: not a valid email"),
        (EMAIL.replace('"railwatch <alerts@example.org>"', '"alerts@"'), "from: not a valid email address"),
        (EMAIL.replace("smtp.example.org", "smtp.example.org\"\nsmtp_security = \"none"),
         '[subscribers.0.email] smtp_security: "none" sends mail and password in clear text'),
        (EMAIL.replace('password_env = "MAIL_PW"', ""), "go together: set both to log in, or neither (got username without"),
        (EMAIL.replace('username = "railwatch"', ""), "(got password_env without username)"),
        (EMAIL.replace("MAIL_PW", "NOT_SET_PW"), "the environment variable NOT_SET_PW is not set"),
        (WEBHOOK.replace('["HOOK_A", "HOOK_B"]', '["HOOK_A", "NO_SUCH"]'), "the environment variable NO_SUCH is not set"),
        (WEBHOOK.replace("https://hooks.example.org", "http://hooks.example.org"),
         "[subscribers.0.webhook] url: expected an https:// URL (plain http:// only to a loopback host, or with "
         "allow_http = true to accept sending alerts unencrypted), got http://hooks.example.org/…"),
        (WEBHOOK.replace("https://", "ftp://"), "expected an https:// URL"),
        (WEBHOOK.replace('min_state = "confirmed"', 'min_state = "resolved"'), "min_state"),
        (WEBHOOK.replace('X-Team = "border"', 'webhook-id = "x"'), "is set by railwatch"),
        (WEBHOOK.replace("secret_env = [\"HOOK_A\", \"HOOK_B\"]", "secret_env = []"), "at least one variable"),
        (WEBHOOK + "colour = \"red\"\n", "[subscribers.0.webhook] colour: unknown key"),
        (EMAIL + EMAIL, "subscriber names must be unique (got ops-mail more than once)"),
        ('[[subscribers]]\nname = "x"\nkind = "pager"\n', '[subscribers] 0: expected kind = "email" or kind = "webhook"'),
        ("[delivery]\ntimeout_seconds = 100\n", "claim_lease_seconds must be at least 4 x timeout_seconds (got 300 and 100)"),
    ],
)
def test_invalid_subscribers_are_refused_with_a_clear_message(tmp_path: Path, body: str, expected: str) -> None:
    message = problems(tmp_path, body)
    assert expected in message
    for secret in (SECRET_A, SECRET_B, PASSWORD, "T0K3N"):  # the URL path may be a token too
        assert secret not in message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    body = (EMAIL.replace('"ops@example.org"', '"bad"')
            + WEBHOOK.replace("https://", "http://").replace('name = "hook"', 'name = "hook-2"')
            + WEBHOOK.replace("HOOK_B", "GONE"))
    message = problems(tmp_path, body)
    assert "3 problems" in message
    assert "[subscribers.0.email] to:" in message
    assert "[subscribers.1.webhook] url:" in message
    assert "subscribers.2.webhook" in message
    assert "GONE is not set" in message


def test_plain_http_is_allowed_to_loopback_or_when_asked(tmp_path: Path) -> None:
    local = WEBHOOK.replace("https://hooks.example.org", "http://127.0.0.1:8080")
    assert load(tmp_path, local).subscribers[0].url.startswith("http://127.0.0.1")
    remote = WEBHOOK.replace("https://", "http://") + "allow_http = true\n"
    assert load(tmp_path, remote).subscribers[0].allow_http
    plain_local_mail = EMAIL.replace("smtp.example.org", "localhost\"\nsmtp_security = \"none")
    mail = load(tmp_path, plain_local_mail).subscribers[0]
    assert isinstance(mail, EmailSubscriber)
    assert mail.port == 25


def test_a_webhook_secret_must_be_a_whsec_key_and_is_never_shown(tmp_path: Path) -> None:
    not_whsec = "not-a-whsec-0123456789abcdef"
    message = problems(tmp_path, WEBHOOK, {**ENV, "HOOK_B": not_whsec})
    assert "HOOK_B does not hold a Standard Webhooks secret: expected a secret starting with whsec_" in message
    assert not_whsec not in message
    bad_b64 = "whsec_%%%%" + SECRET_A[6:]
    message = problems(tmp_path, WEBHOOK, {**ENV, "HOOK_B": bad_b64})
    assert "not base64" in message
    assert SECRET_A[6:] not in message
    with pytest.raises(ValueError, match="shorter than 16 bytes"):
        decode_webhook_secret("whsec_" + base64.b64encode(b"short").decode())
    assert decode_webhook_secret(SECRET_A) == b"a" * 32


def test_models_without_an_environment_skip_the_secret_check() -> None:
    sub = WebhookSubscriber.model_validate(
        {"name": "h", "kind": "webhook", "url": "https://x.example/h", "secret_env": "UNSET_VAR"})
    assert sub.secret_vars == ["UNSET_VAR"]


def test_loopback_and_redaction_helpers() -> None:
    assert all(is_loopback_host(h) for h in ("localhost", "127.0.0.1", "127.8.9.1", "::1", "[::1]"))
    assert not any(is_loopback_host(h) for h in ("example.org", "10.0.0.1", "192.168.1.1", "localhost.example.org"))
    assert redact_url("https://hooks.example.org/services/T0K3N?sig=abc") == "https://hooks.example.org/…"
    assert redact_url("http://127.0.0.1:8080/") == "http://127.0.0.1:8080/"


# --- routing ---------------------------------------------------------------------------------------
def _sub(**kw: Any) -> WebhookSubscriber:
    return WebhookSubscriber.model_validate(
        {"name": "s", "kind": "webhook", "url": "https://x.example/h", "secret_env": "V", **kw})


@pytest.mark.parametrize(
    ("filters", "event", "state", "told", "expected"),
    [
        ({}, "alert.opened", "provisional", False, True),
        ({"min_state": "confirmed"}, "alert.opened", "provisional", False, False),
        ({"min_state": "confirmed"}, "alert.opened", "confirmed", False, True),
        ({"min_state": "confirmed"}, "alert.confirmed", "provisional", False, True),
        ({"min_state": "confirmed"}, "alert.escalated", "confirmed", True, True),
        ({"min_state": "confirmed"}, "alert.reminder", "provisional", False, False),
        ({}, "alert.resolved", "resolved", True, True),
        ({}, "alert.resolved", "resolved", False, False),
        ({"resolved": False}, "alert.resolved", "resolved", True, False),
        ({"aois": ["dandong-*"]}, "alert.opened", "confirmed", False, False),
        ({"aois": ["dandong-*", "tumangang-?hasan"]}, "alert.opened", "confirmed", False, True),
    ],
)
def test_routing(filters: dict[str, Any], event: str, state: str, told: bool, expected: bool) -> None:
    sub = _sub(**filters)
    assert sub.wants(aoi_id="tumangang-khasan", event_type=event, alert_kind="activity", state=state,
                     told_before=told) is expected


def test_stale_alerts_follow_the_stale_filter() -> None:
    for stale, expected in ((True, True), (False, False)):
        assert _sub(stale=stale, min_state="confirmed").wants(
            aoi_id="a", event_type="alert.opened", alert_kind="stale", state="provisional", told_before=False
        ) is expected


# --- payload and signing -----------------------------------------------------------------------------
AOI = Aoi(id="tumangang-khasan", name="Tumangang–Khasan",
          geometry={"type": "Polygon", "coordinates": (((130.6, 42.4), (130.7, 42.4), (130.6, 42.4)),)}, tracks=())


def _alert(**kw: Any) -> SimpleNamespace:
    base: dict[str, Any] = dict(
        id=7, kind="activity", aoi_id=AOI.id, sensor=S2, state="confirmed", opened_acquired=T0, last_acquired=T0,
        estimated_cars=71.2, estimated_cars_low=58.0, estimated_cars_high=86.04, peak_cars=74.0, baseline_cars=14.4,
        score=6.3125, escalated=False, data={},
    )
    return SimpleNamespace(**(base | kw))


def _event(**kw: Any) -> SimpleNamespace:
    return SimpleNamespace(**({"id": 42, "type": "alert.confirmed", "created_at": T0 + timedelta(hours=3),
                               "acquired": T0, "data": {}} | kw))


def test_event_payload_schema() -> None:
    p = event_payload(delivery_key="rwd_x", event=_event(data={"evidence": ["quicklooks/a.png"]}), alert=_alert(),
                      aoi=AOI)
    assert p == {
        "schema_version": 1,
        "delivery_id": "rwd_x",
        "type": "alert.confirmed",
        "test": False,
        "event": {"id": 42, "type": "alert.confirmed", "created_at": "2024-05-12T05:25:49Z",
                  "acquired": "2024-05-12T02:25:49Z"},
        "alert": {"id": 7, "kind": "activity", "state": "confirmed", "opened_acquired": "2024-05-12T02:25:49Z",
                  "last_acquired": "2024-05-12T02:25:49Z", "escalated": False},
        "state": "confirmed",
        "aoi": {"id": AOI.id, "name": AOI.name,
                "geometry": {"type": "Polygon", "coordinates": [[[130.6, 42.4], [130.7, 42.4], [130.6, 42.4]]]}},
        "sensor": S2,
        "scene": {"id": "sentinel-2-l2a_20240512T022549Z", "sensor": S2, "acquired": "2024-05-12T02:25:49Z"},
        "estimated_cars": {"value": 71.2, "low": 58.0, "high": 86.04},
        "peak_cars": 74.0,
        "baseline_cars": 14.4,
        "score": 6.31,
        "evidence": ["quicklooks/a.png"],
        "railwatch_version": p["railwatch_version"],
    }
    assert json.loads(encode(p)) == p
    assert encode(p) == encode(dict(reversed(list(p.items()))))  # key order does not change the bytes
    assert "Tumangang–Khasan".encode() in encode(p)  # UTF-8, not \\u escapes


def test_payload_without_numbers_or_scene() -> None:
    p = event_payload(delivery_key="k", event=_event(type="alert.reminder", acquired=None),
                      alert=_alert(estimated_cars=None, score=float("nan"), sensor=S1), aoi=None)
    assert p["scene"] is None
    assert p["estimated_cars"]["value"] is None
    assert p["score"] is None
    assert p["aoi"] == {"id": AOI.id, "name": AOI.id, "geometry": None}
    assert scene_id(S1, T0) == "sentinel-1-grd_20240512T022549Z"


@pytest.mark.parametrize(
    ("event", "alert", "expected"),
    [
        ("alert.opened", {"state": "provisional"}, "Tumangang–Khasan: 71 cars vs baseline 14 (provisional)"),
        ("alert.confirmed", {}, "Tumangang–Khasan: 71 cars vs baseline 14 (confirmed)"),
        ("alert.escalated", {"estimated_cars": 140.6}, "Tumangang–Khasan: 141 cars vs baseline 14 (escalated)"),
        ("alert.resolved", {"state": "resolved", "estimated_cars": 12.0},
         "Tumangang–Khasan: 12 cars vs baseline 14 (resolved)"),
        ("alert.reminder", {}, "Tumangang–Khasan: 71 cars vs baseline 14 (confirmed, reminder)"),
        ("alert.opened", {"kind": "stale", "estimated_cars": None},
         "Tumangang–Khasan: no usable imagery since 2024-05-12 (stale)"),
        ("alert.resolved", {"kind": "stale", "state": "resolved"},
         "Tumangang–Khasan: usable imagery again (stale alert resolved)"),
    ],
)
def test_headline(event: str, alert: dict[str, Any], expected: str) -> None:
    p = event_payload(delivery_key="k", event=_event(type=event), alert=_alert(**alert), aoi=AOI)
    assert headline(p) == expected


def test_signature_matches_the_standard_webhooks_library() -> None:
    body = encode({"a": "ü", "b": 1})
    ts = int(datetime.now(UTC).timestamp())
    ours = sign(decode_webhook_secret(SECRET_A), "rwd_1", ts, body)
    theirs = standardwebhooks.Webhook(SECRET_A).sign("rwd_1", datetime.fromtimestamp(ts, UTC), body.decode())
    assert ours == theirs
    headers = dict(signed_headers([SECRET_A, SECRET_B], "rwd_1", ts, body))
    assert headers["webhook-signature"] == signature_header([SECRET_A, SECRET_B], "rwd_1", ts, body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (SECRET_A, SECRET_B):
        assert standardwebhooks.Webhook(secret).verify(body, headers) == {"a": "ü", "b": 1}
    with pytest.raises(ValueError, match="at least one secret"):
        signature_header([], "x", ts, body)


# --- email building ----------------------------------------------------------------------------------
MAIL = EmailSubscriber.model_validate({
    "name": "mail", "kind": "email", "to": ["ops@example.org"], "from": "railwatch <alerts@rw.example>",
    "smtp_host": "localhost", "smtp_security": "none",
})


def _delivery(event: str, key: str = "rwd_abc", chart: bytes | None = None) -> Delivery:
    p = event_payload(delivery_key=key, event=_event(type=event), alert=_alert(), aoi=AOI)
    return Delivery(key=key, subscriber="mail", event_type=event, payload=p, alert_id=7, chart_png=chart)


def test_email_threading_headers_and_parts() -> None:
    now = datetime(2024, 5, 12, 6, 0, tzinfo=UTC)
    root = thread_root_id(7, AOI.id, "rw.example")
    assert root == "<railwatch.alert.7.tumangang-khasan@rw.example>"
    opened = build_message(MAIL, _delivery("alert.opened", chart=b"\x89PNG fake"), now=now)
    assert opened["Message-ID"] == root
    assert opened["In-Reply-To"] is None
    assert opened["Date"] == format_datetime(now)
    assert [p.get_content_type() for p in opened.walk()] == [
        "multipart/alternative", "text/plain", "multipart/related", "text/html", "image/png"]
    later = build_message(MAIL, _delivery("alert.escalated", key="rwd_def"), now=now)
    assert later["Message-ID"] == "<railwatch.rwd_def@rw.example>"
    assert later["In-Reply-To"] == later["References"] == root
    assert [p.get_content_type() for p in later.walk()] == ["multipart/alternative", "text/plain", "text/html"]
    assert later["Subject"] == "[railwatch] Tumangang–Khasan: 71 cars vs baseline 14 (escalated)"
    # The same delivery built again (a resend) is the same message.
    assert build_message(MAIL, _delivery("alert.escalated", key="rwd_def"), now=now)["Message-ID"] == later[
        "Message-ID"]


def test_test_email_is_marked_and_unthreaded() -> None:
    p = make_test_payload(delivery_key="rwt_1", subscriber="mail", now=T0)
    msg = build_message(MAIL, Delivery(key="rwt_1", subscriber="mail", event_type="test", payload=p), now=T0)
    assert msg["Subject"] == "[railwatch] test notification for subscriber mail (not an alert)"
    assert msg["X-Railwatch-Test"] == "true"
    assert msg["In-Reply-To"] is None
    body = msg.get_body(("plain",))
    assert body is not None
    assert "It is not an alert." in body.get_content()


# --- retry timing ------------------------------------------------------------------------------------
def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    s = Settings()
    rng = random.Random(5)
    for attempt in range(1, 12):
        base = min(3600.0, 30.0 * 2 ** (attempt - 1))
        for _ in range(20):
            assert base / 2 <= backoff_seconds(attempt, s, rng) <= base
    assert len({round(backoff_seconds(3, s, rng), 3) for _ in range(20)}) > 10  # jittered


def test_parse_retry_after() -> None:
    now = datetime(2024, 5, 12, 6, 0, tzinfo=UTC).timestamp()
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after("Sun, 12 May 2024 06:02:00 GMT", now) == 120.0
    assert parse_retry_after("Sun, 12 May 2024 05:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None
