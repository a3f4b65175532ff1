"""Where per-AOI jobs run: a thread pool in this process (``local``) or a Dask cluster (``dask``).

``railwatch run --once``, ``railwatch backfill`` and the daemon's poll jobs hand the executor one
:class:`AoiJob` per AOI: the AOI, the searched window and whether notifications are suppressed. A
job is the pipeline of :class:`railwatch.monitor.Monitor` for that AOI; it is idempotent per
(AOI, collection, acquired) because the store skips scenes already observed, so running a job twice
(a retry after a worker died) records every scene once.

``[executor] kind = "local"`` (default): ``max_workers`` jobs at once in threads of this process,
each with its own Monitor (a Monitor's caches are not thread-safe) and one shared provider, whose
``max_concurrent_requests`` caps the provider requests in flight and whose OAuth session (token) is
shared. Provider latency overlaps; the detector (numpy, GIL released in its heavy parts) runs
between requests.

``[executor] kind = "dask"``: each job is submitted to a Dask cluster (``address``, or an in-process
``LocalCluster`` when unset) as ``run_aoi_job(spec)`` under a deterministic key
(``railwatch-poll-<aoi>-<window end>``), with ``retries``. The spec is plain data: the settings as
JSON (secrets excluded: each worker reads them from its own environment, from the variables the
configuration names), the AOI, the window and the submitting side's ``now``. Each worker process
builds the store and the provider once and keeps them; state is only in the database, so a worker
lost mid-job is harmless. A ``distributed.Semaphore`` named ``railwatch-provider`` caps provider
requests across the whole cluster (``[executor] max_concurrent_requests``, default the provider's).
Workers share the store: a cluster at a non-loopback address needs PostgreSQL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

from railwatch import errors
from railwatch.clock import Clock, FixedClock, SystemClock
from railwatch.config import Settings, is_loopback_url
from railwatch.domain import Aoi, iso, utc
from railwatch.errors import ConfigError, RailwatchError

log = logging.getLogger(__name__)

#: Name of the cluster-wide semaphore that caps provider requests.
SEMAPHORE_NAME = "railwatch-provider"

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class AoiJob:
    """One AOI's pipeline over ``(since, until]``; ``kind`` is ``poll`` or ``backfill`` (for the key)."""

    aoi: Aoi
    since: datetime
    until: datetime
    suppressed: bool
    kind: str = "poll"

    @property
    def key(self) -> str:
        """Deterministic Dask key: the same window of the same AOI is one task cluster-wide."""
        if self.kind == "poll":
            return f"railwatch-poll-{self.aoi.id}-{iso(utc(self.until))}"
        return f"railwatch-{self.kind}-{self.aoi.id}-{iso(utc(self.since))}-{iso(utc(self.until))}"


@dataclass
class JobOutcome:
    """What became of one job: the pipeline's result, or the railwatch error it raised."""

    job: AoiJob
    result: Any = None  # railwatch.monitor.AoiResult
    error: RailwatchError | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Executor(Protocol):
    kind: str
    max_workers: int

    def run_one(self, job: AoiJob, *, progress: Progress | None = None,
                abort: threading.Event | None = None) -> Any: ...

    def map(self, jobs: Sequence[AoiJob], *, on_done: Callable[[JobOutcome], None] | None = None) -> list[JobOutcome]: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------ results


def result_to_dict(result: Any) -> dict[str, Any]:
    """An :class:`~railwatch.monitor.AoiResult` as small plain data (what a Dask task returns)."""
    return {"aoi_id": result.aoi_id, "found": result.found, "new": result.new,
            "statuses": dict(result.statuses), "events": [list(e) for e in result.events], "error": result.error}


def result_from_dict(data: dict[str, Any]) -> Any:
    from railwatch.monitor import AoiResult

    return AoiResult(aoi_id=data["aoi_id"], found=int(data["found"]), new=int(data["new"]),
                     statuses=Counter(data.get("statuses") or {}),
                     events=[(int(a), str(t)) for a, t in data.get("events") or []], error=data.get("error"))


def error_to_dict(exc: RailwatchError) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc)}


def error_from_dict(data: dict[str, Any]) -> RailwatchError:
    """The railwatch error a job raised on a worker, rebuilt by class name (messages kept as they were)."""
    cls = getattr(errors, str(data.get("type", "")), None)
    message = str(data.get("message", ""))
    if isinstance(cls, type) and issubclass(cls, errors._ProblemList):
        return cls([message])
    if isinstance(cls, type) and issubclass(cls, RailwatchError):
        with contextlib.suppress(TypeError):
            return cls(message)
    return RailwatchError(message)


def _run_monitor(monitor: Any, job: AoiJob, progress: Progress | None) -> Any:
    return monitor.run(job.aoi, job.since, job.until, suppressed=job.suppressed, progress=progress)


# ------------------------------------------------------------------------------------- local


class LocalExecutor:
    """Jobs in threads of this process, one Monitor each, one shared provider and store."""

    kind = "local"

    def __init__(self, settings: Settings, store: Any, provider: Any, *, max_workers: int | None = None,
                 clock: Clock | None = None, event_hook: Any = None) -> None:
        self.settings = settings
        self.store = store
        self.provider = provider
        self.clock = clock or SystemClock()
        self.event_hook = event_hook
        self.max_workers = max_workers or settings.executor.max_workers

    def _monitor(self) -> Any:
        from railwatch.monitor import Monitor

        return Monitor(self.settings, self.store, self.provider, clock=self.clock, event_hook=self.event_hook)

    def run_one(self, job: AoiJob, *, progress: Progress | None = None, abort: threading.Event | None = None) -> Any:
        """The job in the calling thread (its errors raised as Monitor raises them)."""
        return _run_monitor(self._monitor(), job, progress)

    def map(self, jobs: Sequence[AoiJob], *, on_done: Callable[[JobOutcome], None] | None = None) -> list[JobOutcome]:
        """Every job, ``max_workers`` at a time; outcomes in the order of ``jobs``."""

        def one(job: AoiJob) -> JobOutcome:
            t0 = time.monotonic()
            try:
                res = self.run_one(job)
                out = JobOutcome(job, result=res)
            except RailwatchError as exc:
                out = JobOutcome(job, error=exc)
            out.seconds = time.monotonic() - t0
            return out

        outcomes: dict[int, JobOutcome] = {}
        if self.max_workers <= 1 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                outcomes[i] = one(job)
                if on_done:
                    on_done(outcomes[i])
            return [outcomes[i] for i in range(len(jobs))]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(jobs)),
                                thread_name_prefix="railwatch-aoi") as pool:
            futures = {pool.submit(one, job): i for i, job in enumerate(jobs)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    outcomes[futures[f]] = f.result()
                    if on_done:
                        on_done(outcomes[futures[f]])
        return [outcomes[i] for i in range(len(jobs))]

    def close(self) -> None:
        return None


# -------------------------------------------------------------------------------------- dask


def settings_spec(settings: Settings) -> dict[str, Any]:
    """The settings as JSON-able data for a worker; secrets are not in it (workers read their own)."""
    return {"settings": settings.model_dump(mode="json"), "source": settings.source}


def _settings_from_spec(spec: dict[str, Any]) -> Settings:
    from pydantic import SecretStr

    from railwatch.config import _secret_keys

    settings = Settings.model_validate(spec["settings"], context={"environ": os.environ})
    settings.source = str(spec.get("source") or "dask job")
    settings.secrets = {k: SecretStr(os.environ[v]) for k, v in _secret_keys(settings) if os.environ.get(v)}
    return settings


@dataclass
class _WorkerState:
    settings: Settings
    store: Any
    provider: Any


_WORKER_LOCK = threading.Lock()
_WORKER_STATE: dict[str, _WorkerState] = {}
_SEMAPHORES: dict[tuple[str, int], Any] = {}


def _worker_state(spec: dict[str, Any]) -> _WorkerState:
    """Settings, store and provider of this worker process for these settings, built once."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    with _WORKER_LOCK:
        state = _WORKER_STATE.get(digest)
        if state is None:
            from railwatch.cli import make_provider
            from railwatch.store import Store

            settings = _settings_from_spec(spec)
            state = _WorkerState(settings, Store(settings.store.url), make_provider(settings))
            _WORKER_STATE[digest] = state
        return state


def _cluster_slots(cap: int) -> Any:
    """This worker's handle on the cluster-wide semaphore (one per worker and cap)."""
    from distributed import Semaphore, get_worker

    key = (str(get_worker().id), cap)
    with _WORKER_LOCK:
        sem = _SEMAPHORES.get(key)
        if sem is None:
            sem = Semaphore(max_leases=cap, name=SEMAPHORE_NAME)
            _SEMAPHORES[key] = sem
        return sem


def reset_worker_state() -> None:
    """Close the stores this process built for Dask jobs and forget them (tests, shutdown)."""
    with _WORKER_LOCK:
        states = list(_WORKER_STATE.values())
        _WORKER_STATE.clear()
        _SEMAPHORES.clear()
    for state in states:
        with contextlib.suppress(Exception):
            state.store.close()


def run_aoi_job(spec: dict[str, Any]) -> dict[str, Any]:
    """The Dask task: one AOI job from plain data; returns a small dict (``result`` or ``raised``).

    A railwatch error (bad credentials, an unreachable store) is returned, not raised, so Dask does
    not retry what a retry cannot fix; anything else raises and is retried (``[executor] retries``).
    """
    from railwatch.monitor import Monitor

    t0 = time.monotonic()
    job = AoiJob(aoi=spec["aoi"], since=spec["since"], until=spec["until"], suppressed=spec["suppressed"],
                 kind=spec["kind"])
    out: dict[str, Any] = {"key": job.key, "pid": os.getpid()}
    try:
        state = _worker_state(spec["config"])
        cap = spec.get("cluster_cap")
        if cap and hasattr(state.provider, "shared_slots"):
            state.provider.shared_slots = _cluster_slots(int(cap))
        monitor = Monitor(state.settings, state.store, state.provider, clock=FixedClock(spec["now"]))
        out["result"] = result_to_dict(_run_monitor(monitor, job, None))
    except RailwatchError as exc:
        out["raised"] = error_to_dict(exc)
    out["seconds"] = time.monotonic() - t0
    return out


def _cluster_is_loopback(address: str) -> bool:
    host = urlsplit(address).hostname or ""
    return is_loopback_url(f"http://{host}/") if host else False


class DaskExecutor:
    """Jobs as Dask tasks with deterministic keys; results are small dicts, state is in the database."""

    kind = "dask"

    def __init__(self, settings: Settings, *, client: Any = None, address: str | None = None,
                 max_workers: int | None = None, cluster_cap: int | None = None, retries: int | None = None,
                 clock: Clock | None = None) -> None:
        from distributed import Client

        ex = settings.executor
        self.settings = settings
        self.clock = clock or SystemClock()
        self.max_workers = max_workers or ex.max_workers
        self.retries = ex.retries if retries is None else retries
        self.cluster_cap = cluster_cap if cluster_cap is not None else (
            ex.max_concurrent_requests or settings.imagery.sentinelhub.max_concurrent_requests)
        self._spec = settings_spec(settings)
        self._cluster: Any = None
        self._own_client = client is None
        address = ex.address if address is None else address
        if client is not None:
            self.client = client
        elif address:
            if settings.store.url.startswith("sqlite") and not _cluster_is_loopback(address):
                raise ConfigError([
                    f"[executor] address {address}: Dask workers on other machines cannot share a SQLite store; "
                    "set [store] url to a postgresql:// database every worker reaches"], source=settings.source)
            try:
                self.client = Client(address, set_as_default=False, timeout="20s")
            except (OSError, TimeoutError) as exc:
                raise ConfigError([f"[executor] address: cannot reach the Dask scheduler at {address}: {exc}"],
                                  source=settings.source) from exc
        else:
            from distributed import LocalCluster

            # No address: an in-process cluster (threads), for trying the dask path on one machine.
            self._cluster = LocalCluster(processes=False, n_workers=1, threads_per_worker=self.max_workers,
                                         dashboard_address=":0")
            self.client = Client(self._cluster, set_as_default=False)

    def spec(self, job: AoiJob) -> dict[str, Any]:
        return {"config": self._spec, "aoi": job.aoi, "since": job.since, "until": job.until,
                "suppressed": job.suppressed, "kind": job.kind, "now": self.clock.now(),
                "cluster_cap": self.cluster_cap}

    def submit(self, job: AoiJob) -> Any:
        """Submit one job under its key (a job already in the cluster under that key is joined)."""
        return self.client.submit(run_aoi_job, self.spec(job), key=job.key, retries=self.retries, pure=False)

    def _outcome(self, job: AoiJob, future: Any, t0: float) -> JobOutcome:
        try:
            data = future.result()
        except Exception as exc:  # the task crashed on every try, or its workers kept dying
            return JobOutcome(job, error=RailwatchError(
                f"AOI {job.aoi.id}: job {job.key} failed on the Dask cluster: {type(exc).__name__}: {exc}"),
                seconds=time.monotonic() - t0)
        out = JobOutcome(job, seconds=time.monotonic() - t0, extra={"pid": data.get("pid"), "key": data.get("key")})
        if "raised" in data:
            out.error = error_from_dict(data["raised"])
        else:
            out.result = result_from_dict(data["result"])
        return out

    def run_one(self, job: AoiJob, *, progress: Progress | None = None, abort: threading.Event | None = None) -> Any:
        """Submit, wait (cancelling when ``abort`` is set) and return the result or raise its error."""
        t0 = time.monotonic()
        future = self.submit(job)
        while True:
            try:
                future.result(timeout=0.25)
                break
            except TimeoutError:
                if abort is not None and abort.is_set():
                    future.cancel()
                    raise _Aborted(job.key) from None
            except Exception:
                break
        out = self._outcome(job, future, t0)
        if out.error is not None:
            raise out.error
        return out.result

    def map(self, jobs: Sequence[AoiJob], *, on_done: Callable[[JobOutcome], None] | None = None) -> list[JobOutcome]:
        """Every job, at most ``max_workers`` submitted at once; outcomes in the order of ``jobs``."""
        from distributed import as_completed

        t0 = time.monotonic()
        outcomes: dict[int, JobOutcome] = {}
        todo = list(enumerate(jobs))
        index: dict[Any, int] = {}
        ac = as_completed(loop=self.client.loop)
        for _ in range(min(self.max_workers, len(todo))):
            i, job = todo.pop(0)
            f = self.submit(job)
            index[f] = i
            ac.add(f)
        for f in ac:
            i = index.pop(f)
            outcomes[i] = self._outcome(jobs[i], f, t0)
            if on_done:
                on_done(outcomes[i])
            if todo:
                j, job = todo.pop(0)
                nf = self.submit(job)
                index[nf] = j
                ac.add(nf)
        return [outcomes[i] for i in range(len(jobs))]

    def close(self) -> None:
        if self._own_client:
            with contextlib.suppress(Exception):
                self.client.close()
        if self._cluster is not None:
            with contextlib.suppress(Exception):
                self._cluster.close()


class _Aborted(RailwatchError):
    """A job given up on shutdown (cancelled on the cluster)."""


def make_executor(settings: Settings, store: Any, provider: Any, *, clock: Clock | None = None,
                  event_hook: Any = None) -> LocalExecutor | DaskExecutor:
    """The configured executor (``[executor] kind``)."""
    if settings.executor.kind == "dask":
        return DaskExecutor(settings, clock=clock)
    return LocalExecutor(settings, store, provider, clock=clock, event_hook=event_hook)


@contextlib.contextmanager
def executor_for(settings: Settings, store: Any, provider: Any, **kwargs: Any) -> Iterator[LocalExecutor | DaskExecutor]:
    ex = make_executor(settings, store, provider, **kwargs)
    try:
        yield ex
    finally:
        ex.close()


def poll_jobs(settings: Settings, aois: Iterable[Aoi], now: datetime) -> list[AoiJob]:
    """One poll job per AOI: the look-back window ending ``now`` (as :meth:`Monitor.poll`)."""
    from datetime import timedelta

    since = now - timedelta(days=settings.imagery.lookback_days)
    return [AoiJob(aoi=a, since=since, until=now, suppressed=False, kind="poll") for a in aois]


__all__ = [
    "SEMAPHORE_NAME",
    "AoiJob",
    "DaskExecutor",
    "Executor",
    "JobOutcome",
    "LocalExecutor",
    "executor_for",
    "make_executor",
    "poll_jobs",
    "reset_worker_state",
    "run_aoi_job",
]
