"""Alerts reach subscribers through the real CLI: a backfill stays quiet, a poll notifies once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from tests.cli_helpers import project, railwatch
from tests.fakes_delivery import SmtpSink, WebhookReceiver, new_whsec, smtp_sink, webhook_receiver  # noqa: F401

AOI = "tumangang-khasan"
SECRET = new_whsec(3)
PASSWORD_LIKE = "do-not-print-me-7781"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = project(tmp_path_factory.mktemp("archive"))
    res = railwatch("simulate", "--aoi", AOI, "--out", "var/archive", "--days", "150", "--seed", "5",
                    "--end", "2025-06-30", "--surge", "2025-06-02:170:14", "--no-progress", cwd=tmp)
    assert res.code == 0, res.err
    return tmp / "var/archive"


def _work(tmp: Path, archive: Path, smtp: SmtpSink, hook: WebhookReceiver) -> Path:
    toml = f'''
[[subscribers]]
name = "desk"
kind = "email"
to = ["desk@example.org"]
from = "railwatch@example.org"
smtp_host = "127.0.0.1"
smtp_port = {smtp.port}
smtp_security = "none"

[[subscribers]]
name = "hook"
kind = "webhook"
url = "{hook.url('/hook')}"
secret_env = "RAILWATCH_TEST_HOOK_SECRET"
'''
    work = project(tmp, extra_toml=toml)
    shutil.copytree(archive, work / "var/archive")
    return work


ENV = {"RAILWATCH_TEST_HOOK_SECRET": SECRET, "RAILWATCH_SENTINELHUB_CLIENT_SECRET": PASSWORD_LIKE}


def test_backfill_without_notify_sends_nothing_then_or_later(
    archive: Path, tmp_path: Path, smtp_sink: SmtpSink, webhook_receiver: WebhookReceiver
) -> None:
    work = _work(tmp_path, archive, smtp_sink, webhook_receiver)
    res = railwatch("backfill", "--until", "2025-06-25", "--no-progress", cwd=work, env=ENV)
    assert res.code == 0, res.err
    alerts = railwatch("alerts", "--format", "json", cwd=work, env=ENV).json()
    assert alerts, "the surge should have opened an alert during the backfill"
    deliveries = railwatch("deliveries", "--format", "json", cwd=work, env=ENV).json()
    assert deliveries and {d["state"] for d in deliveries} == {"suppressed"}
    again = railwatch("run", "--once", "--no-progress", cwd=work, env=ENV | {"RAILWATCH_NOW": "2025-06-26T00:00:00Z"})
    assert again.code == 0, again.err
    assert smtp_sink.messages == []
    assert webhook_receiver.requests == []


def test_poll_notifies_each_subscriber_once_per_event(
    archive: Path, tmp_path: Path, smtp_sink: SmtpSink, webhook_receiver: WebhookReceiver
) -> None:
    work = _work(tmp_path, archive, smtp_sink, webhook_receiver)
    quiet = railwatch("backfill", "--until", "2025-05-25", "--no-progress", cwd=work, env=ENV)
    assert quiet.code == 0, quiet.err
    assert railwatch("alerts", "--format", "json", cwd=work, env=ENV).json() == []
    outputs = []
    for now in ("2025-06-12T00:00:00Z", "2025-06-12T00:00:00Z", "2025-06-20T00:00:00Z"):
        res = railwatch("run", "--once", "--no-progress", cwd=work, env=ENV | {"RAILWATCH_NOW": now})
        assert res.code == 0, res.err
        outputs.append(res.out + res.err)
    deliveries = railwatch("deliveries", "--format", "json", cwd=work, env=ENV).json()
    events = {d["event_id"] for d in deliveries}
    assert events, "the surge should have opened an alert during the polls"
    assert {d["state"] for d in deliveries} == {"delivered"}
    assert len(smtp_sink.messages) == len(events)
    hooks = webhook_receiver.at("/hook")
    assert len(hooks) == len(events)
    assert len({h.headers["webhook-id"] for h in hooks}) == len(hooks)
    for h in hooks:
        payload = Webhook(SECRET).verify(h.body, h.headers)
        assert payload["aoi"]["id"] == AOI
        assert payload["schema_version"]
    subjects = [m.message["Subject"] for m in smtp_sink.messages]
    assert all(s.startswith("[railwatch] Tumangang") for s in subjects), subjects
    printed = "".join(outputs)
    assert SECRET not in printed and PASSWORD_LIKE not in printed
