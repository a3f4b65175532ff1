"""The daemon behind ``railwatch run``: APScheduler jobs that call the pipeline, plus the freshness watch.

One APScheduler 3.x ``BackgroundScheduler`` holds a ``poll:<aoi-id>`` job per valid AOI (the AOI's
``poll_interval_minutes`` or ``schedule`` cron, else ``[daemon] poll_interval_minutes``, plus
jitter) in a persistent SQLAlchemy job store, and two in-memory jobs: ``dispatch`` (the delivery
outbox) and ``retention`` (archive pruning, when configured). Jobs are module-level functions taking
an AOI id, so the store can pickle them; they find the running :class:`Daemon` through
:data:`_ACTIVE`.

Policies (docs/daemon.md):

- ``max_instances=1`` and ``coalesce=True``: a slow poll is never run twice at once, and runs
  missed while the daemon was down collapse into one; ``misfire_grace_time=None`` makes that one
  run however late it is (catch up once after downtime). The scheduler starts paused, only missing
  or changed jobs are (re)added, an AOI whose last completed poll is older than its interval is
  polled at once, then it resumes.
- A poll searches ``[imagery] lookback_days`` back, or from the last successful poll minus that,
  so a long outage loses nothing; every scene is processed once (the pipeline skips observed
  scenes and each scene is one transaction), so ``kill -9`` at any point loses nothing either.
- SIGTERM/SIGINT: no new jobs; running ones may finish for ``shutdown_grace_seconds``, then stop at
  the next scene boundary; exit 0. SIGHUP (and every ``rescan_seconds``) re-reads the AOI folder.
- One daemon per store: an ``fcntl`` lock file next to a SQLite store, a PostgreSQL advisory lock.
- After each poll the AOI's freshness is judged (:mod:`railwatch.freshness`) and a ``stale`` alert
  is opened or resolved through the same event hook (the outbox) as activity alerts.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from railwatch import __version__
from railwatch.clock import Clock, SystemClock
from railwatch.config import DaemonSettings, Settings, effective_detector
from railwatch.domain import USABLE, Aoi, Observation, iso, utc
from railwatch.errors import AoiError, ConfigError, RailwatchError
from railwatch.freshness import Verdict, judge, transition
from railwatch.metrics import CONTENT_TYPE, DaemonMetrics
from railwatch.store import AlertRow, Store, redact_url

log = logging.getLogger(__name__)

POLL_PREFIX = "poll:"
#: The persistent job store (AOI polls) and the in-memory one (dispatcher, retention).
AOI_STORE, INTERNAL_STORE = "default", "internal"
#: Alert states that count as open.
OPEN_STATES = ("provisional", "confirmed")
#: No trigger fires more often than this, in real seconds (a fast clock divides every interval).
MIN_REAL_SECONDS = 0.05
#: After the shutdown deadline, running jobs are asked to stop at the next scene; this long at most.
ABORT_WAIT_SECONDS = 5.0
#: A catch-up poll after downtime searches at most this far back (``backfill`` is for history).
MAX_CATCH_UP = timedelta(days=366)
#: How often the main thread wakes up to run pending signal handlers.
SIGNAL_POLL_SECONDS = 0.25
#: Stable key of the PostgreSQL advisory lock (``railwatch-daemon`` as a signed 63-bit number).
PG_LOCK_KEY = 0x7261_696C_7761_7463 & 0x7FFF_FFFF_FFFF_FFFF

EventHook = Callable[[Any, Any, AlertRow, Aoi, bool], None]


# ================================================================================================
# Time
# ================================================================================================
class ScaledClock:
    """railwatch time that runs ``scale`` times faster than real time, from ``start``.

    For soaks and demos (``[daemon] time_scale``): a simulated year passes in minutes.
    """

    def __init__(self, start: datetime, scale: float, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.start = utc(start)
        self.scale = float(scale)
        self._monotonic = monotonic
        self._t0 = monotonic()

    def now(self) -> datetime:
        return self.start + timedelta(seconds=(self._monotonic() - self._t0) * self.scale)


def make_clock(settings: Settings) -> Clock:
    """The daemon's clock: the system clock (``RAILWATCH_NOW`` pins it), sped up by ``time_scale``."""
    base = SystemClock()
    scale = settings.daemon.time_scale
    return base if scale == 1 else ScaledClock(base.now(), scale)


# ================================================================================================
# One daemon per store
# ================================================================================================
class AlreadyRunning(RailwatchError):
    """Another daemon holds the store's lock (exit code 1)."""


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL, None for other URLs and in-memory SQLite."""
    m = re.match(r"^sqlite(?:\+\w+)?:///(.+)$", url)
    if not m or m.group(1) == ":memory:":
        return None
    return Path(m.group(1))


def lock_path_for(settings: Settings) -> Path | None:
    """``[daemon] lock_path``, else ``<store file>.daemon.lock`` for a SQLite store."""
    if settings.daemon.lock_path:
        return Path(settings.daemon.lock_path).expanduser()
    db = sqlite_path(settings.store.url)
    return db.with_name(db.name + ".daemon.lock") if db is not None else None


def jobstore_url_for(settings: Settings) -> str | None:
    """``[daemon] jobstore_url``, else ``<store>.jobs.db`` beside a SQLite store, else the PostgreSQL store.

    None (an in-memory store) for an in-memory SQLite store.
    """
    if settings.daemon.jobstore_url:
        return settings.daemon.jobstore_url
    db = sqlite_path(settings.store.url)
    if db is not None:
        return f"sqlite:///{db.with_name(db.stem + '.jobs.db').as_posix()}"
    if settings.store.url.startswith("postgresql"):
        return settings.store.url
    return None


class DaemonLock:
    """A held lock file and/or PostgreSQL advisory lock; :meth:`release` lets go of both."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.path: Path | None = None
        self.conn: Any = None

    def release(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                self.conn.exec_driver_sql(f"SELECT pg_advisory_unlock({PG_LOCK_KEY})")
                self.conn.commit()
            with contextlib.suppress(SQLAlchemyError):
                self.conn.close()
            self.conn = None
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def acquire_lock(settings: Settings, store: Store, *, now: datetime | None = None) -> DaemonLock:
    """Take the store's daemon lock, or raise :class:`AlreadyRunning` naming the holder."""
    url = redact_url(settings.store.url)
    lock = DaemonLock()
    try:
        path = lock_path_for(settings)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
                os.close(fd)
                raise AlreadyRunning(
                    f"another railwatch daemon is already running on store {url}"
                    f"{f' ({holder})' if holder else ''}; lock file {path}. Stop it first "
                    "(or give this one another [store] url)") from None
            lock.fd, lock.path = fd, path
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}, started {iso(now or datetime.now(UTC))}\n".encode(), 0)
        if store.engine.dialect.name == "postgresql":
            conn = store.engine.connect()
            got = bool(conn.exec_driver_sql(f"SELECT pg_try_advisory_lock({PG_LOCK_KEY})").scalar())
            conn.commit()
            if not got:
                conn.close()
                raise AlreadyRunning(
                    f"another railwatch daemon is already running on store {url} (it holds the PostgreSQL "
                    f"advisory lock {PG_LOCK_KEY}); stop it first (or give this one another [store] url)")
            lock.conn = conn
    except BaseException:
        lock.release()
        raise
    return lock


# ================================================================================================
# Schedules
# ================================================================================================
_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _cron_weekdays(field: str) -> str:
    """A standard cron day-of-week field (0 or 7 = Sunday) as APScheduler 3 weekday names.

    APScheduler 3 counts 0 as Monday; names mean the same in both, so numbers become names.
    """
    def num(tok: str) -> int:
        tok = tok.lower()
        return _CRON_DAYS.index(tok[:3]) if not tok.isdigit() else int(tok) % 7

    days: set[int] = set()
    for item in field.split(","):
        base, _, step_text = item.partition("/")
        step = int(step_text) if step_text else 1
        if base == "*":
            lo, hi = 0, 6
        elif "-" in base:
            a, b = base.split("-", 1)
            lo, hi = num(a), (7 if b == "7" else num(b))
            if hi < lo:
                hi += 7
        else:
            lo = hi = num(base)
            if step_text:
                hi = 6
        days.update(d % 7 for d in range(lo, hi + 1, step))
    if len(days) == 7:
        return "*"
    order = [1, 2, 3, 4, 5, 6, 0]  # mon..sun
    return ",".join(_CRON_DAYS[d] for d in order if d in days)


def cron_trigger(expr: str, *, jitter: float | None = None) -> Any:
    """An APScheduler CronTrigger (UTC) for a standard 5-field crontab expression."""
    from apscheduler.triggers.cron import CronTrigger

    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"expected 5 cron fields, got {len(fields)} in {expr!r}")
    minute, hour, day, month, dow = fields
    return CronTrigger(minute=minute, hour=hour, day=day, month=month, day_of_week=_cron_weekdays(dow),
                       timezone=UTC, jitter=jitter or None)


def _cron_period_seconds(expr: str) -> float:
    """The mean gap between the next fire times of a cron expression (for a fast clock, and overdue checks)."""
    trig = cron_trigger(expr)
    t = datetime(2025, 1, 1, tzinfo=UTC)
    prev: datetime | None = None
    fires: list[datetime] = []
    for _ in range(40):
        nxt = trig.get_next_fire_time(prev, t if prev is None else prev)
        if nxt is None:
            break
        fires.append(nxt)
        prev = nxt
    if len(fires) < 2:
        return 86400.0
    return (fires[-1] - fires[0]).total_seconds() / (len(fires) - 1)


@dataclass(frozen=True)
class PollSchedule:
    """When an AOI is polled: the trigger, a description that changes with it, the period in railwatch seconds."""

    trigger: Any
    description: str
    period_seconds: float


def poll_schedule(aoi: Aoi, daemon: DaemonSettings) -> PollSchedule:
    """The AOI's own ``schedule`` (cron) or ``poll_interval_minutes``, else the config default, with jitter.

    Under a fast clock (``time_scale`` > 1) intervals and jitter are divided by the scale and a cron
    schedule runs as an interval of its mean period.
    """
    from apscheduler.triggers.interval import IntervalTrigger

    jitter = float(aoi.settings.get("jitter_seconds", daemon.jitter_seconds))
    scale = daemon.time_scale
    cron = aoi.settings.get("schedule")
    if cron:
        period = _cron_period_seconds(str(cron))
        if scale == 1:
            return PollSchedule(cron_trigger(str(cron), jitter=jitter), f"cron '{cron}' jitter {jitter:g}s", period)
        minutes = period / 60.0
    else:
        minutes = float(aoi.settings.get("poll_interval_minutes", daemon.poll_interval_minutes))
        period = minutes * 60.0
    seconds = max(period / scale, MIN_REAL_SECONDS)
    real_jitter = jitter / scale
    trigger = IntervalTrigger(seconds=seconds, jitter=real_jitter if real_jitter > 0 else None, timezone=UTC)
    desc = f"every {minutes:g} min jitter {jitter:g}s" + (f" time_scale {scale:g}" if scale != 1 else "")
    return PollSchedule(trigger, desc, period)


# ================================================================================================
# Freshness: the I/O around railwatch.freshness
# ================================================================================================
def last_usable_by_sensor(observations: Sequence[Observation]) -> dict[str, datetime]:
    """Acquisition time of the newest usable scene per sensor: quality ``ok`` or ``partial``, whether
    or not the detector could estimate yet (a new AOI's first passes build its reference)."""
    out: dict[str, datetime] = {}
    for o in observations:
        if o.status in USABLE and (o.collection not in out or o.acquired > out[o.collection]):
            out[o.collection] = utc(o.acquired)
    return out


def verdict_for(settings: Settings, aoi: Aoi, observations: Sequence[Observation], now: datetime, *,
                watching_since: datetime | None = None) -> Verdict:
    """Judge one AOI from its observations; a sensor with no usable scene yet is measured from its
    first observation of any kind, else from ``watching_since``."""
    sensors = list(aoi.settings.get("sensors") or settings.imagery.sensors)
    first = min((utc(o.acquired) for o in observations), default=None)
    since = first if first is not None else watching_since
    d = settings.daemon
    return judge(aoi.id, now, sensors, last_usable_by_sensor(observations), revisit_days=d.revisit_days,
                 stale_after_revisits=d.stale_after_revisits, scope=d.stale_when, watching_since=since)


def _stale_evidence(v: Verdict) -> list[str]:
    lines = [f"no usable scene since {iso(v.last_usable) or 'railwatch began watching'}; "
             f"the next was expected by {iso(v.expected_by)}"]
    for s in v.sensors:
        lines.append(f"{s.sensor}: last usable {iso(s.last_usable) or 'never'}, revisit ~{s.revisit_days:g} days, "
                     f"overdue after {iso(s.overdue_after) or '-'}")
    return lines


def apply_verdict(store: Store, aoi: Aoi, verdict: Verdict, *, now: datetime,
                  event_hook: EventHook | None) -> tuple[str, int | None]:
    """Open or resolve the AOI's ``stale`` alert to match ``verdict``: (action, open stale alert id or None).

    The event goes through ``store.add_event`` and the event hook (the outbox) in one transaction,
    exactly like an activity alert's events.
    """
    now = utc(now)
    with store.session() as s:
        row = s.scalar(
            select(AlertRow)
            .where(AlertRow.aoi_id == aoi.id, AlertRow.kind == "stale", AlertRow.state.in_(OPEN_STATES))
            .order_by(AlertRow.id.desc())
        )
        action = transition(verdict, row is not None)
        if action == "none":
            return action, row.id if row is not None else None
        if action == "open":
            row = AlertRow(
                kind="stale", aoi_id=aoi.id, sensor=None, geometry_key="", state="confirmed",
                opened_acquired=None, last_acquired=verdict.last_usable, opened_at=now, updated_at=now,
                sensors_seen=[], passes=0, escalated=False, suppressed=False,
                data={"freshness": verdict.as_dict(), "evidence": _stale_evidence(verdict)},
            )
            s.add(row)
            s.flush()
            ev_type = "alert.stale"
            data: dict[str, Any] = {
                "dedupe": "stale", "last_usable_acquired": iso(verdict.last_usable),
                "expected_by": iso(verdict.expected_by), "stale_after": iso(verdict.stale_after),
                "sensors": [x.as_dict() for x in verdict.sensors], "evidence": _stale_evidence(verdict),
            }
        else:
            assert row is not None
            row.state = "resolved"
            row.resolved_at = now
            row.updated_at = now
            row.last_acquired = verdict.last_usable
            ev_type = "alert.resolved"
            data = {"dedupe": "resolved", "last_usable_acquired": iso(verdict.last_usable),
                    "stale_since": iso(row.opened_at), "evidence": [
                        f"usable imagery again: newest usable scene {iso(verdict.last_usable)}"]}
        ev = store.add_event(s, row, ev_type, acquired=None, data=data, suppressed=False)
        if ev is not None:
            ev.created_at = now
            if event_hook is not None:
                event_hook(s, ev, row, aoi, False)
        alert_id = row.id
    if action == "open":
        log.warning("AOI %s is stale: no usable scene since %s (expected by %s); alert %s opened", aoi.id,
                    iso(verdict.last_usable) or "it was first watched", iso(verdict.expected_by), alert_id,
                    extra={"aoi": aoi.id, "alert": alert_id})
        return action, alert_id
    log.info("AOI %s has usable imagery again (newest %s); stale alert %s resolved", aoi.id,
             iso(verdict.last_usable), alert_id, extra={"aoi": aoi.id, "alert": alert_id})
    return action, None


def _event_hook(settings: Settings, store: Store, provider: Any, clock: Clock) -> EventHook | None:
    """The pipeline's own event hook (the outbox), taken from a Monitor so both paths share it."""
    from railwatch.monitor import Monitor

    return Monitor(settings, store, provider, clock=clock).event_hook


def watch_freshness(settings: Settings, store: Store, provider: Any, aois: Sequence[Aoi], *,
                    clock: Clock | None = None, dispatch: bool = True) -> dict[str, str]:
    """The freshness watch of ``run --once``: judge every AOI now, open/resolve stale alerts, and send
    their notifications at once. Returns {aoi id: "open" | "resolve" | "none"}.

    An AOI with no observation at all cannot be judged here (there is no daemon watching since).
    """
    clock = clock or SystemClock()
    hook = _event_hook(settings, store, provider, clock)
    now = clock.now()
    out: dict[str, str] = {}
    for aoi in aois:
        verdict = verdict_for(settings, aoi, store.observations(aoi.id), now)
        out[aoi.id], _ = apply_verdict(store, aoi, verdict, now=now, event_hook=hook)
    if dispatch and any(a != "none" for a in out.values()):
        try:
            from railwatch.alerts.outbox import dispatch_pending
        except ImportError:
            return out
        dispatch_pending(store, settings, now=now)
    return out


# ================================================================================================
# Job entry points (module level: the persistent job store pickles references to them)
# ================================================================================================
_ACTIVE: Daemon | None = None


def poll_job(aoi_id: str) -> None:
    """Poll one AOI (the ``poll:<aoi-id>`` job)."""
    daemon = _ACTIVE
    if daemon is None:
        log.warning("poll job for AOI %s ran with no daemon running; skipped", aoi_id, extra={"aoi": aoi_id})
        return
    daemon.poll(aoi_id)


def dispatch_job() -> None:
    """Send due deliveries (the ``dispatch`` job)."""
    if _ACTIVE is not None:
        _ACTIVE.dispatch()


def retention_job() -> None:
    """Prune the archive (the ``retention`` job)."""
    if _ACTIVE is not None:
        _ACTIVE.retention()


class _Interrupted(Exception):
    """Raised from the pipeline's progress callback to stop a job at a scene boundary on shutdown."""


@dataclass
class _JobRun:
    job_id: str
    kind: str
    aoi_id: str | None
    outcome: str = "ok"
    detail: str = ""
    quiet: bool = False


# ================================================================================================
# The daemon
# ================================================================================================
class Daemon:
    """``railwatch run``: the scheduler, its jobs, the HTTP endpoint and the lifecycle."""

    def __init__(self, settings: Settings, store: Store, provider: Any, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self.store = store
        self.provider = provider
        self.clock = clock or make_clock(settings)
        self.metrics = DaemonMetrics()
        self.event_hook = _event_hook(settings, store, provider, self.clock)
        self.aois: dict[str, Aoi] = {}
        self.invalid: dict[str, list[str]] = {}
        self.aoi_dir_error: str | None = None
        self.scheduler: Any = None
        self._paths: dict[Path, str] = {}
        self._watch_start: dict[str, datetime] = {}
        #: Per AOI, the end of the window the last complete, error-free poll searched.
        self._covered: dict[str, datetime] = {}
        self._state_lock = threading.RLock()
        self._running: dict[str, float] = {}
        self._running_cond = threading.Condition()
        self._stop = threading.Event()
        self._hup = threading.Event()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self._signals = 0
        self._outbox: Any = None
        self._reminders: Any = None
        #: ``[executor] kind = "dask"``: polls run on the cluster (connected at start); None = here.
        self.executor: Any = None
        try:
            from railwatch.alerts import outbox

            self._outbox = outbox.dispatch_pending
            self._reminders = getattr(outbox, "emit_reminders", None)
        except ImportError:
            pass

    # --- lifecycle ---------------------------------------------------------------------------
    def run(self) -> int:
        """Lock the store, start, serve until SIGTERM/SIGINT, stop gracefully; the exit code."""
        lock = acquire_lock(self.settings, self.store, now=self.clock.now())
        try:
            return self._run_locked()
        finally:
            lock.release()

    def _run_locked(self) -> int:
        global _ACTIVE
        from railwatch.health import HealthServer

        self._install_signals()
        server = None
        if self.settings.daemon.listen:
            server = HealthServer(self.settings.daemon.listen, self.health, self.render_metrics)
        self.scheduler = self._build_scheduler()
        _ACTIVE = self
        try:
            if self.settings.executor.kind == "dask" and self.executor is None:
                from railwatch.executor import DaskExecutor

                self.executor = DaskExecutor(self.settings, clock=self.clock)
                log.info("poll jobs run on the Dask cluster %s", self.settings.executor.address or "(in-process)")
            with contextlib.suppress(RailwatchError, SQLAlchemyError):
                self.metrics.prime_usage(self._usage())
            self.scheduler.start(paused=True)
            self.reconcile(startup=True)
            self._add_internal_jobs()
            self.scheduler.resume()
            self.metrics.up.set(1)
            self.metrics.start_time.set(time.time())
            if server is not None:
                server.start()
            d = self.settings.daemon
            log.info("railwatch %s daemon started: %d AOI(s), store %s, job store %s, clock %s%s", __version__,
                     len(self.aois), redact_url(self.store.url),
                     redact_url(jobstore_url_for(self.settings) or "memory"), iso(self.clock.now()),
                     f" x{d.time_scale:g}" if d.time_scale != 1 else "")
            self._main_loop()
            return self._shutdown(server)
        except BaseException:
            # start-up failed (or something escaped the loop): release the port and the job store
            self._stopping.set()
            from apscheduler.schedulers.base import STATE_STOPPED

            if self.scheduler.state != STATE_STOPPED:
                self.scheduler.shutdown(wait=False)
            if server is not None:
                server.close()
            raise
        finally:
            _ACTIVE = None
            if self.executor is not None:
                self.executor.close()

    def _main_loop(self) -> None:
        rescan = self.settings.daemon.rescan_seconds
        next_rescan = time.monotonic() + rescan
        while not self._stop.is_set():
            # Short waits: a signal delivered to a worker thread only runs its Python handler when
            # the main thread next executes bytecode, which a long blocking wait would postpone.
            self._wake.wait(timeout=min(SIGNAL_POLL_SECONDS, max(0.01, next_rescan - time.monotonic())))
            self._wake.clear()
            if self._stop.is_set():
                break
            if self._hup.is_set():
                self._hup.clear()
                log.info("SIGHUP: re-reading the AOI folder %s", self.settings.aoi.dir)
            elif time.monotonic() < next_rescan:
                continue
            self._safe_reconcile()
            next_rescan = time.monotonic() + rescan

    def _shutdown(self, server: Any) -> int:
        from apscheduler.schedulers.base import STATE_STOPPED

        self._stopping.set()
        grace = self.settings.daemon.shutdown_grace_seconds
        with self._running_cond:
            running = sorted(self._running)
        log.info("stopping: no new jobs; %s", f"waiting up to {grace:g} s for {', '.join(running)}" if running
                 else "no job running")
        if self.scheduler.state != STATE_STOPPED:
            self.scheduler.shutdown(wait=False)
        done = self._wait_idle(time.monotonic() + grace)
        if not done:
            self._abort.set()
            with self._running_cond:
                late = sorted(self._running)
            log.warning("shutdown deadline (%g s) passed: asking %s to stop at the next scene", grace, ", ".join(late))
            done = self._wait_idle(time.monotonic() + ABORT_WAIT_SECONDS)
        self.metrics.up.set(0)
        if server is not None:
            server.close()
        if not done:
            with self._running_cond:
                late = sorted(self._running)
            log.error("job(s) %s still running; exiting without them (nothing is lost: the next start "
                      "processes their remaining scenes)", ", ".join(late))
            logging.shutdown()
            os._exit(0)
        log.info("stopped")
        return 0

    def _wait_idle(self, deadline: float) -> bool:
        with self._running_cond:
            while self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._running_cond.wait(timeout=min(left, 0.5))
        return True

    def request_stop(self) -> None:
        """What SIGTERM/SIGINT do (a second one also stops running jobs at the next scene)."""
        self._signals += 1
        if self._signals > 1:
            self._abort.set()
        self._stop.set()
        self._wake.set()

    def request_rescan(self) -> None:
        """What SIGHUP does."""
        self._hup.set()
        self._wake.set()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_stop(_signum: int, _frame: FrameType | None) -> None:
            self.request_stop()

        def on_hup(_signum: int, _frame: FrameType | None) -> None:
            self.request_rescan()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    # --- the scheduler -----------------------------------------------------------------------
    def _build_scheduler(self) -> Any:
        from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.jobstores.memory import MemoryJobStore
        from apscheduler.schedulers.background import BackgroundScheduler

        url = jobstore_url_for(self.settings)
        if url is None:
            persistent: Any = MemoryJobStore()
        else:
            from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore

            db = sqlite_path(url)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            try:
                persistent = SQLAlchemyJobStore(url=url, tablename="railwatch_jobs")
            except (SQLAlchemyError, ImportError) as exc:
                raise ConfigError([f"[daemon] jobstore_url: cannot use {redact_url(url)}: {exc}"]) from exc
        sched = BackgroundScheduler(
            jobstores={AOI_STORE: persistent, INTERNAL_STORE: MemoryJobStore()},
            executors={"default": ThreadPoolExecutor(self._poll_threads()),
                       INTERNAL_STORE: ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )
        sched.add_listener(self._on_scheduler_event, EVENT_JOB_ERROR | EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)
        logging.getLogger("apscheduler.scheduler").addFilter(_drop_max_instances)
        return sched

    def _poll_threads(self) -> int:
        """Polls at once: ``[daemon] workers``; on Dask at least ``[executor] max_workers`` (each thread
        only waits for its job on the cluster)."""
        if self.settings.executor.kind == "dask":
            return max(self.settings.daemon.workers, self.settings.executor.max_workers)
        return self.settings.daemon.workers

    def _on_scheduler_event(self, event: Any) -> None:
        from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED

        kind = _job_kind(event.job_id)
        if event.code == EVENT_JOB_MAX_INSTANCES:
            self.metrics.jobs_skipped.labels(job=kind).inc()
            log.debug("job %s skipped: its previous run is still going", event.job_id, extra={"job": event.job_id})
        elif event.code == EVENT_JOB_MISSED:
            self.metrics.jobs_skipped.labels(job=kind).inc()
            log.warning("job %s missed its run time", event.job_id, extra={"job": event.job_id})
        else:
            log.error("job %s raised outside the job wrapper: %s", event.job_id, event.exception,
                      extra={"job": event.job_id})

    def _real_seconds(self, railwatch_seconds: float) -> float:
        return max(railwatch_seconds / self.settings.daemon.time_scale, MIN_REAL_SECONDS)

    def _add_internal_jobs(self) -> None:
        from apscheduler.triggers.interval import IntervalTrigger

        d = self.settings.daemon
        wall_now = datetime.now(UTC)
        if self._outbox is not None:
            self.scheduler.add_job(dispatch_job, IntervalTrigger(seconds=self._real_seconds(d.dispatch_seconds),
                                                                 timezone=UTC),
                                   id="dispatch", name="delivery outbox", jobstore=INTERNAL_STORE,
                                   executor=INTERNAL_STORE, replace_existing=True, next_run_time=wall_now)
        if d.archive_max_age_days is not None:
            self.scheduler.add_job(retention_job, IntervalTrigger(seconds=self._real_seconds(d.retention_hours * 3600),
                                                                  timezone=UTC),
                                   id="retention", name="archive retention", jobstore=INTERNAL_STORE,
                                   executor=INTERNAL_STORE, replace_existing=True,
                                   next_run_time=wall_now + timedelta(seconds=1))

    # --- AOIs ---------------------------------------------------------------------------------
    def _safe_reconcile(self) -> None:
        try:
            self.reconcile()
        except (RailwatchError, SQLAlchemyError, OSError) as exc:
            log.error("re-reading the AOIs failed: %s; the AOIs loaded before keep running", exc)

    def reconcile(self, *, startup: bool = False) -> None:
        """Re-read the AOI folder and make the poll jobs match it.

        A new valid file is polled at once; a removed one stops; an invalid one is logged, counted
        and listed by /healthz and skipped. A file that was valid and is now broken keeps its last
        valid version polled until it is fixed or removed.
        """
        from railwatch.aoi import load_aoi_dir

        cfg = self.settings.aoi
        try:
            scan = load_aoi_dir(cfg.dir, max_area_km2=cfg.max_area_km2)
        except AoiError as exc:
            if startup:  # a missing AOI folder at start is a configuration mistake: say so and stop
                raise
            if self.aoi_dir_error != str(exc):
                log.error("cannot read the AOI folder: %s; keeping the %d AOI(s) loaded before", exc, len(self.aois))
            self.aoi_dir_error = str(exc)
            return
        self.aoi_dir_error = None
        invalid = {str(p): list(e.problems) for p, e in scan.errors.items()}
        for path, err in scan.errors.items():
            if self.invalid.get(str(path)) != invalid[str(path)]:
                log.error("invalid AOI file skipped: %s", err, extra={"aoi": path.stem})
                self.metrics.aoi_errors.labels(file=path.name).inc()
        new = {a.id: a for a in scan.aois}
        for path in scan.errors:
            old_id = self._paths.get(path)
            if old_id is not None and old_id in self.aois and old_id not in new:
                new[old_id] = self.aois[old_id]
                if self.invalid.get(str(path)) != invalid[str(path)]:
                    log.warning("AOI %s: %s is invalid now; polling its last valid version until it is fixed",
                                old_id, path.name, extra={"aoi": old_id})
        for aoi_id, warns in scan.warnings.items():
            if startup or aoi_id not in self.aois:
                for w in warns:
                    log.warning("AOI %s: %s", aoi_id, w, extra={"aoi": aoi_id})
        now = self.clock.now()
        with self._state_lock:
            old = self.aois
            added = sorted(set(new) - set(old))
            removed = sorted(set(old) - set(new))
            changed = sorted(i for i in set(new) & set(old) if new[i] != old[i])
            self.aois = new
            self.invalid = invalid
            self._paths = {a.path: a.id for a in new.values() if a.path is not None}
            for i in removed:
                self._watch_start.pop(i, None)
                self._covered.pop(i, None)
            for i in added:
                self._watch_start.setdefault(i, now)
        self.metrics.set_invalid_files(Path(p).name for p in invalid)
        self.metrics.aois.set(len(new))
        for i in removed:
            self.metrics.forget_aoi(i)
        self._sync_jobs(startup=startup)
        if startup or added or removed or changed:
            log.info("AOIs: %d polled%s%s%s, %d invalid file(s) skipped", len(new),
                     f", added {', '.join(added)}" if added and not startup else "",
                     f", removed {', '.join(removed)}" if removed else "",
                     f", changed {', '.join(changed)}" if changed else "", len(invalid))

    def _sync_jobs(self, *, startup: bool) -> None:
        """Add missing poll jobs, reschedule changed ones, remove orphans; never touch unchanged ones."""
        sched = self.scheduler
        existing = {j.id: j for j in sched.get_jobs(jobstore=AOI_STORE) if j.id.startswith(POLL_PREFIX)}
        wall_now = datetime.now(UTC)
        with self._state_lock:
            aois = dict(self.aois)
        for aoi_id, aoi in sorted(aois.items()):
            job_id = POLL_PREFIX + aoi_id
            plan = poll_schedule(aoi, self.settings.daemon)
            name = f"poll {aoi_id} {plan.description}"
            job = existing.pop(job_id, None)
            if job is None:
                sched.add_job(poll_job, plan.trigger, args=[aoi_id], id=job_id, name=name, jobstore=AOI_STORE,
                              next_run_time=wall_now)
                log.info("AOI %s: polling %s, first poll now", aoi_id, plan.description,
                         extra={"aoi": aoi_id, "job": job_id})
                continue
            if job.name != name:
                sched.modify_job(job_id, jobstore=AOI_STORE, name=name)
                sched.reschedule_job(job_id, jobstore=AOI_STORE, trigger=plan.trigger)
                log.info("AOI %s: schedule changed to %s", aoi_id, plan.description, extra={"aoi": aoi_id, "job": job_id})
            if startup and self._poll_overdue(aoi, plan.period_seconds):
                nrt = job.next_run_time
                if nrt is None or nrt > wall_now:
                    sched.modify_job(job_id, jobstore=AOI_STORE, next_run_time=wall_now)
                log.info("AOI %s: last poll incomplete or older than its interval; polling now", aoi_id,
                         extra={"aoi": aoi_id, "job": job_id})
        for job_id in existing:
            sched.remove_job(job_id, jobstore=AOI_STORE)
            log.info("AOI %s removed: no longer polled", job_id[len(POLL_PREFIX):],
                     extra={"aoi": job_id[len(POLL_PREFIX):], "job": job_id})

    def _poll_overdue(self, aoi: Aoi, period_seconds: float) -> bool:
        sensors = set(aoi.settings.get("sensors") or self.settings.imagery.sensors)
        done = [p.last_poll_at for p in self.store.poll_states(aoi.id) if p.collection in sensors]
        if not done or any(t is None for t in done) or len(done) < len(sensors):
            return True
        last = min(utc(t) for t in done if t is not None)
        return (self.clock.now() - last).total_seconds() >= period_seconds

    def _monitor(self) -> Any:
        """A Monitor for one poll. Not kept between polls: its scene cache holds up to 24 prepared
        scenes (tens of MB each for a large AOI), and one per AOI would keep them all resident."""
        from railwatch.monitor import Monitor

        return Monitor(self.settings, self.store, self.provider, clock=self.clock, event_hook=self.event_hook)

    # --- jobs -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _job(self, job_id: str, kind: str, aoi_id: str | None = None) -> Iterator[_JobRun]:
        run = _JobRun(job_id, kind, aoi_id)
        t0 = time.monotonic()
        with self._running_cond:
            self._running[job_id] = t0
        try:
            yield run
        except _Interrupted:
            run.outcome, run.detail = "interrupted", "stopped at a scene boundary for shutdown"
        except RailwatchError as exc:
            run.outcome, run.detail = "error", str(exc)
        except Exception as exc:  # the job boundary: one bad AOI or scene never kills the daemon
            run.outcome, run.detail = "crashed", f"{type(exc).__name__}: {exc}"
            log.exception("job %s crashed", job_id, extra=_extra(job_id, aoi_id))
        finally:
            took = time.monotonic() - t0
            with self._running_cond:
                self._running.pop(job_id, None)
                self._running_cond.notify_all()
            self.metrics.jobs.labels(job=kind, outcome=run.outcome).inc()
            self.metrics.job_duration.labels(job=kind).observe(took)
            level = logging.INFO if run.outcome in ("ok", "interrupted") else logging.WARNING
            if run.quiet and run.outcome == "ok":
                level = logging.DEBUG
            log.log(level, "job %s %s in %.2f s%s", job_id, run.outcome, took, f": {run.detail}" if run.detail else "",
                    extra=_extra(job_id, aoi_id))

    def _check_abort(self, _done: int, _total: int) -> None:
        if self._abort.is_set():
            raise _Interrupted

    def poll(self, aoi_id: str) -> None:
        """One poll of one AOI: the ``run --once`` pipeline, then metrics and the freshness watch."""
        job_id = POLL_PREFIX + aoi_id
        if self._stopping.is_set():
            log.info("job %s not started: shutting down", job_id, extra=_extra(job_id, aoi_id))
            return
        with self._state_lock:
            aoi = self.aois.get(aoi_id)
        if aoi is None:
            log.warning("job %s: AOI %s is no longer configured; skipped", job_id, aoi_id, extra=_extra(job_id, aoi_id))
            return
        with self._job(job_id, "poll", aoi_id) as run:
            monitor = self._monitor()
            now = self.clock.now()
            since = self._window_start(aoi, now)
            before = self.store.observed_keys(aoi.id)
            result = None
            try:
                if self.executor is not None:
                    result = self._poll_on_cluster(aoi, since, now)
                else:
                    result = monitor.run(aoi, since, now, suppressed=False, progress=self._check_abort)
            finally:
                self._after_poll(aoi, before, result, run, now)

    def _poll_on_cluster(self, aoi: Aoi, since: datetime, now: datetime) -> Any:
        """The poll as a Dask task (key ``railwatch-poll-<aoi>-<now>``); cancelled on a forced shutdown."""
        from railwatch.executor import AoiJob, _Aborted

        job = AoiJob(aoi=aoi, since=since, until=now, suppressed=False, kind="poll")
        try:
            return self.executor.run_one(job, abort=self._abort)
        except _Aborted:
            raise _Interrupted from None

    def _window_start(self, aoi: Aoi, now: datetime) -> datetime:
        from railwatch.monitor import MISSION_START

        lookback = timedelta(days=self.settings.imagery.lookback_days)
        since = now - lookback
        with self._state_lock:
            covered = self._covered.get(aoi.id)
        if covered is None:  # since this process started: the store's last successful poll
            sensors = set(aoi.settings.get("sensors") or self.settings.imagery.sensors)
            ok = [utc(p.last_success_at) for p in self.store.poll_states(aoi.id)
                  if p.collection in sensors and p.last_success_at is not None]
            covered = min(ok) if ok else None
        if covered is not None:
            # cover what the last successful poll could not see yet (scenes published late)
            since = min(since, max(covered - lookback, now - MAX_CATCH_UP))
            if now - covered > lookback:
                log.info("AOI %s: last successful poll reached %s, older than the look-back; searching from %s",
                         aoi.id, iso(covered), iso(since), extra={"aoi": aoi.id})
        return max(since, MISSION_START)

    def _after_poll(self, aoi: Aoi, before: set[tuple[str, datetime]], result: Any, run: _JobRun,
                    searched_until: datetime) -> None:
        m = self.metrics
        if result is not None:
            run.outcome = "ok" if result.ok else "error"
            if result.ok:
                with self._state_lock:
                    self._covered[aoi.id] = searched_until
            run.detail = (f"{result.found} scene(s) found, {result.new} new"
                          + (f" {dict(sorted(result.statuses.items()))}" if result.statuses else "")
                          + (f", {len(result.events)} alert event(s)" if result.events else "")
                          + (f"; error: {result.error}" if result.error else ""))
            if result.error:
                m.provider_errors.labels(aoi=aoi.id).inc()
            for _alert_id, ev_type in result.events:
                m.alert_events.labels(aoi=aoi.id, type=ev_type).inc()
                if ev_type == "alert.opened":
                    m.alerts_opened.labels(aoi=aoi.id, kind="activity").inc()
        m.polls.labels(aoi=aoi.id, outcome=run.outcome if result is not None else "incomplete").inc()
        try:
            m.observe_usage(self._usage(aoi.id))
            observations = self.store.observations(aoi.id)
            for o in observations:
                if (o.collection, utc(o.acquired)) not in before:
                    m.scenes.labels(aoi=aoi.id, sensor=o.collection, status=o.status).inc()
            if result is not None:  # an interrupted poll left newer scenes unread: judge next time
                self._judge(aoi, observations, run, searched_until)
            states = self.store.poll_states(aoi.id)
            success = [utc(p.last_success_at) for p in states if p.last_success_at is not None]
            m.set_timestamps(aoi.id, last_success=max(success, default=None),
                             last_scene=max((utc(o.acquired) for o in observations), default=None),
                             last_usable=last_usable_by_sensor(observations))
        except (RailwatchError, SQLAlchemyError) as exc:
            log.warning("AOI %s: metrics and freshness not updated: %s", aoi.id, exc, extra={"aoi": aoi.id})

    def _usage(self, aoi_id: str | None = None) -> list[Any]:
        """Provider requests and processing units per AOI, sensor and month, cumulative: the monitor
        moves the provider's ``usage`` into the store after each run (nothing for ``files``)."""
        return list(self.store.usage(aoi_id=aoi_id))

    def _judge(self, aoi: Aoi, observations: Sequence[Observation], run: _JobRun, now: datetime) -> None:
        # judged as of the end of the searched window: what the poll could see (a slow poll on a
        # fast clock would otherwise count its own run time as silence)
        verdict = verdict_for(self.settings, aoi, observations, now, watching_since=self._watch_start.get(aoi.id))
        action, open_id = apply_verdict(self.store, aoi, verdict, now=now, event_hook=self.event_hook)
        m = self.metrics
        for s in verdict.sensors:
            m.set_overdue(aoi.id, s.sensor, s.overdue)
        m.stale.labels(aoi=aoi.id).set(1 if open_id is not None else 0)
        if action == "open":
            m.alerts_opened.labels(aoi=aoi.id, kind="stale").inc()
            m.alert_events.labels(aoi=aoi.id, type="alert.stale").inc()
            run.detail += "; stale alert opened"
        elif action == "resolve":
            m.alert_events.labels(aoi=aoi.id, type="alert.resolved").inc()
            run.detail += "; stale alert resolved"

    def dispatch(self) -> None:
        """Send due deliveries (and queue reminders, when configured)."""
        if self._outbox is None or self._stopping.is_set():
            return
        with self._job("dispatch", "dispatch") as run:
            now = self.clock.now()
            if self._reminders is not None:
                with self._state_lock:
                    aois = dict(self.aois)
                self._reminders(self.store, self.settings, now, aois=aois)
            report = self._outbox(self.store, self.settings, now=now)
            counts = {k: int(getattr(report, k, 0) or 0) for k in ("delivered", "retrying", "dead", "held")}
            for outcome, n in counts.items():
                if n:
                    self.metrics.deliveries.labels(outcome=outcome).inc(n)
            claimed = int(getattr(report, "claimed", 0) or 0)
            run.detail = f"{claimed} claimed " + str({k: v for k, v in counts.items() if v})
            run.quiet = claimed == 0

    def retention(self) -> None:
        """Delete archive files older than ``archive_max_age_days`` that nothing needs any more."""
        from railwatch.retention import prune_archive

        max_age = self.settings.daemon.archive_max_age_days
        if max_age is None or self._stopping.is_set():
            return
        with self._job("retention", "retention") as run:
            with self._state_lock:
                aois = list(self.aois.values())
            detectors = {a.id: effective_detector(self.settings, a.settings.get("detector")) for a in aois}
            report = prune_archive(Path(self.settings.imagery.files.root), self.store, aois, now=self.clock.now(),
                                   max_age_days=max_age, detector_for=detectors)
            self.metrics.archive_pruned.inc(len(report.deleted))
            self.metrics.archive_pruned_bytes.inc(report.bytes_freed)
            run.detail = (f"{len(report.deleted)} file(s) deleted, {report.bytes_freed} bytes freed, "
                          f"{report.kept_needed} old file(s) kept (still needed)")
            if report.errors:
                run.outcome = "error"
                run.detail += f"; {len(report.errors)} could not be deleted"

    # --- HTTP ----------------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, document) for ``GET /healthz``."""
        from apscheduler.schedulers.base import STATE_PAUSED, STATE_RUNNING

        sched = self.scheduler
        thread = getattr(sched, "_thread", None)
        alive = sched is not None and sched.state == STATE_RUNNING and (thread is None or thread.is_alive())
        if self._stopping.is_set():
            sched_state = "stopping"
        elif alive:
            sched_state = "running"
        elif sched is not None and sched.state == STATE_PAUSED:
            sched_state = "paused"
        else:
            sched_state = "stopped"
        store_ok = self.store.ping()
        with self._running_cond:
            running = sorted(self._running)
        with self._state_lock:
            aois = sorted(self.aois)
            invalid = dict(self.invalid)
        ok = sched_state == "running" and store_ok
        return ok, {
            "status": "ok" if ok else "unavailable",
            "version": __version__,
            "scheduler": sched_state,
            "store": "ok" if store_ok else "unreachable",
            "now": iso(self.clock.now()),
            "time_scale": self.settings.daemon.time_scale,
            "aois": aois,
            "running_jobs": running,
            "invalid_aoi_files": invalid,
            "aoi_dir_error": self.aoi_dir_error,
        }

    def render_metrics(self) -> tuple[bytes, str]:
        return self.metrics.render(), CONTENT_TYPE


def _extra(job_id: str, aoi_id: str | None) -> dict[str, Any]:
    return {"job": job_id, "aoi": aoi_id} if aoi_id else {"job": job_id}


def _job_kind(job_id: str) -> str:
    return "poll" if job_id.startswith(POLL_PREFIX) else job_id


def _drop_max_instances(record: logging.LogRecord) -> bool:
    """APScheduler warns on every skipped overlapping run; the daemon counts those in a metric instead."""
    return "maximum number of running instances reached" not in record.getMessage()


def run_daemon(settings: Settings, store: Store, provider: Any, *, clock: Clock | None = None) -> int:
    """``railwatch run``: the daemon until SIGTERM/SIGINT; returns the exit code."""
    return Daemon(settings, store, provider, clock=clock).run()


__all__ = [
    "AlreadyRunning",
    "Daemon",
    "PollSchedule",
    "ScaledClock",
    "acquire_lock",
    "apply_verdict",
    "cron_trigger",
    "dispatch_job",
    "jobstore_url_for",
    "lock_path_for",
    "make_clock",
    "poll_job",
    "poll_schedule",
    "retention_job",
    "run_daemon",
    "verdict_for",
    "watch_freshness",
]
