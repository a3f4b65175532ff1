"""Alerts reach subscribers through the real CLI: a backfill stays quiet, a poll notifies once."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from standardwebhooks import Webhook

from tests.cli_helpers import RAILWATCH, project, railwatch
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


class _WriteLock:
    """Holds the store's write lock from outside, as a slow disk or a busy database would."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._release: Callable[[], None] | None = None

    def acquire(self) -> None:
        if self.url.startswith("sqlite"):
            conn = sqlite3.connect(self.url.split("///", 1)[1], isolation_level=None, timeout=30)
            conn.execute("BEGIN IMMEDIATE")  # every other writer now waits (busy_timeout)

            def release() -> None:
                conn.execute("ROLLBACK")
                conn.close()
        else:
            engine = create_engine(self.url)
            pg = engine.connect()
            tx = pg.begin()
            pg.execute(text("LOCK TABLE deliveries IN EXCLUSIVE MODE"))  # blocks every UPDATE of a delivery

            def release() -> None:
                tx.rollback()
                pg.close()
                engine.dispose()
        self._release = release

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None


def test_dispatcher_killed_between_send_and_record_repeats_once_with_the_same_webhook_id(
    archive: Path, tmp_path: Path, store_url: str, webhook_receiver: WebhookReceiver
) -> None:
    """The receiver gets the webhook and answers 200; before the dispatcher process can record that, it
    is killed (SIGKILL). The restarted dispatcher sends it again, once, with the same webhook-id."""
    toml = f'[[subscribers]]\nname = "hook"\nkind = "webhook"\nurl = "{webhook_receiver.url("/hook")}"\n' \
           'secret_env = "RAILWATCH_TEST_HOOK_SECRET"\n'
    work = project(tmp_path, extra_toml=toml, store_url=store_url)
    shutil.copytree(archive, work / "var/archive")
    assert railwatch("backfill", "--until", "2025-05-25", "--no-progress", cwd=work, env=ENV).code == 0

    lock = _WriteLock(store_url)
    victim: list[subprocess.Popen[str]] = []

    def before(_req: object) -> None:  # the send has arrived: from now on the dispatcher cannot record it
        if len(webhook_receiver.requests) == 1:
            lock.acquire()

    def after(_req: object) -> None:  # the 200 went out; the dispatcher is blocked recording it: kill it
        if len(webhook_receiver.requests) == 1:
            time.sleep(1.0)
            victim[0].kill()
            victim[0].wait(30)
            lock.release()

    webhook_receiver.before_reply, webhook_receiver.after_reply = before, after
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAILWATCH_")} | ENV | {
        "RAILWATCH_NOW": "2025-06-12T00:00:00Z", "NO_COLOR": "1"}
    victim.append(subprocess.Popen([*RAILWATCH, "run", "--once", "--no-progress"], cwd=work, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out, err = victim[0].communicate(timeout=300)
    assert victim[0].returncode == -signal.SIGKILL, (out, err)
    first = webhook_receiver.at("/hook")
    assert len(first) == 1, "the receiver should have had exactly the one send before the crash"
    crashed = {d["id"]: d for d in railwatch("deliveries", "--format", "json", cwd=work, env=ENV).json()}
    assert [d["state"] for d in crashed.values()].count("delivered") == 0  # the success was never recorded

    # Restarted later (past the dead process's claim lease): the delivery goes out again, once.
    webhook_receiver.before_reply = webhook_receiver.after_reply = None
    again = railwatch("run", "--once", "--no-progress", cwd=work, env=ENV | {"RAILWATCH_NOW": "2025-06-12T01:00:00Z"})
    assert again.code == 0, again.err
    hooks = webhook_receiver.at("/hook")
    ids = [h.headers["webhook-id"] for h in hooks]
    repeated = [i for i in set(ids) if ids.count(i) > 1]
    assert repeated == [first[0].headers["webhook-id"]] and ids.count(repeated[0]) == 2, ids
    assert hooks[0].body == next(h.body for h in hooks[1:] if h.headers["webhook-id"] == repeated[0])
    for h in hooks:
        Webhook(SECRET).verify(h.body, h.headers)
    final = railwatch("deliveries", "--format", "json", cwd=work, env=ENV).json()
    assert {d["state"] for d in final} == {"delivered"} and len(final) == len(set(ids))
    # A third pass sends nothing more.
    assert railwatch("run", "--once", "--no-progress", cwd=work,
                     env=ENV | {"RAILWATCH_NOW": "2025-06-12T02:00:00Z"}).code == 0
    assert len(webhook_receiver.at("/hook")) == len(hooks)
