"""The executors of per-AOI jobs (railwatch.executor) against the fake Sentinel Hub with latency.

Local: several AOIs at once in threads, one shared provider; the most requests in flight reaches the
provider's cap and never passes it. Dask: a ``LocalCluster`` runs the same jobs under deterministic
keys with a cluster-wide cap; a worker killed in the middle of a job still leaves exactly one
observation per scene (the job is retried and skips what was recorded). SQLite and PostgreSQL
(``store_url``, when ``RAILWATCH_TEST_POSTGRES_URL`` is set).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from railwatch.config import Settings, load_settings
from railwatch.domain import Aoi
from railwatch.executor import AoiJob, DaskExecutor, LocalExecutor, reset_worker_state
from railwatch.imagery.sentinelhub import SentinelHubProvider
from railwatch.store import Store
from tests.fakes.sentinelhub_server import PROCESS_PATH, FakeSentinelHub

pytest_plugins = ("tests.fakes.fixtures",)

SECRET_VAR = "RW_TEST_EXECUTOR_SH_SECRET"
SECRET = "fake-secret-do-not-log"
#: The last days of the simulated month: two scenes per AOI (a poll's worth); LONG has four.
SINCE, UNTIL = datetime(2024, 6, 25, tzinfo=UTC), datetime(2024, 7, 1, tzinfo=UTC)
LONG = datetime(2024, 6, 20, tzinfo=UTC)


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_VAR, SECRET)


@pytest.fixture
def slow_sh(sim_archive: Path) -> Iterator[FakeSentinelHub]:
    """The fake with a slow Process API (0.5 s) and a slowish token and Catalog (0.2 s)."""
    fake = FakeSentinelHub(sim_archive, page_size=100, client_secret=SECRET,
                           latency={"token": 0.2, "catalog": 0.2, "process": 0.5})
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


def _settings(tmp_path: Path, fake: FakeSentinelHub, store_url: str, *, cap: int, executor: str = "") -> Settings:
    cfg = tmp_path / "rw.toml"
    cfg.write_text(
        '[imagery]\nprovider = "sentinelhub"\nlookback_days = 30\n'
        f'[imagery.files]\nroot = "{tmp_path / "archive"}"\n'
        "[imagery.sentinelhub]\n"
        f'base_url = "{fake.base_url}"\ntoken_url = "{fake.token_url}"\nclient_id = "{fake.client_id}"\n'
        f'client_secret_env = "{SECRET_VAR}"\nmax_scene_cloud_percent = 100.0\nbackoff_seconds = 0.05\n'
        f"max_concurrent_requests = {cap}\ntimeout_seconds = 30\n"
        f'[store]\nurl = "{store_url}"\n'
        f"[executor]\n{executor}\n"
    )
    return load_settings(cfg, environ={SECRET_VAR: SECRET}, cwd=tmp_path)


def _aois(base: Aoi, n: int) -> list[Aoi]:
    """``n`` copies of one AOI under other ids: each is searched and fetched on its own."""
    return [dataclasses.replace(base, id=f"copy-{i:02d}", name=f"copy {i}") for i in range(n)]


def _scenes_in_window(fake: FakeSentinelHub, since: datetime = SINCE) -> int:
    return sum(1 for s in fake.scenes if since < s.acquired <= UNTIL)


def _observations(store: Store, aois: list[Aoi]) -> dict[str, list[tuple[str, datetime]]]:
    return {a.id: [(o.collection, o.acquired) for o in store.observations(a.id)] for a in aois}


# ------------------------------------------------------------------------------------------ local


def test_local_executor_overlaps_provider_io_up_to_the_cap(
    tmp_path: Path, slow_sh: FakeSentinelHub, tumangang: Aoi, store_url: str, secret_env: None,
) -> None:
    settings = _settings(tmp_path, slow_sh, store_url, cap=3, executor="max_workers = 4")
    store = Store(store_url)
    provider = SentinelHubProvider.from_settings(settings)
    aois = _aois(tumangang, 4)
    jobs = [AoiJob(a, SINCE, UNTIL, suppressed=True, kind="backfill") for a in aois]
    executor = LocalExecutor(settings, store, provider)
    try:
        outcomes = executor.map(jobs)
        n = _scenes_in_window(slow_sh)
        assert n >= 2
        assert [o.error for o in outcomes] == [None] * len(jobs)
        assert all(o.result.ok and o.result.new == n for o in outcomes)
        # Requests overlapped up to the provider's cap, never beyond it.
        assert slow_sh.in_flight_max == 3
        process = [r for r in slow_sh.requests_to(PROCESS_PATH) if r.status == 200]
        assert len(process) == n * len(aois)
        tokens = [r for r in slow_sh.requests if r.path.endswith("/token")]
        assert len(tokens) == 1  # one OAuth session shared by every thread
        seen = _observations(store, aois)
        assert all(len(v) == n == len(set(v)) for v in seen.values())
        # A second pass finds every scene observed: nothing is fetched again.
        slow_sh.reset()
        again = executor.map(jobs)
        assert all(o.result.new == 0 for o in again)
        assert slow_sh.requests_to(PROCESS_PATH) == []
    finally:
        store.close()


# ------------------------------------------------------------------------------------------- dask


@contextlib.contextmanager
def _cluster(**kwargs: Any) -> Iterator[Any]:
    """A LocalCluster and a client of it (not the default client), both closed afterwards."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(dashboard_address=":0", **kwargs)
    client = Client(cluster, set_as_default=False)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.fixture
def thread_cluster() -> Iterator[Any]:
    """An in-process Dask cluster: one worker with four threads."""
    with _cluster(processes=False, n_workers=1, threads_per_worker=4) as client:
        yield client
    reset_worker_state()


def test_dask_executor_runs_jobs_under_deterministic_keys_with_a_cluster_wide_cap(
    tmp_path: Path, slow_sh: FakeSentinelHub, tumangang: Aoi, store_url: str, secret_env: None, thread_cluster: Any,
) -> None:
    # Each process may send 4 requests at once, the cluster only 2 (the distributed.Semaphore).
    settings = _settings(tmp_path, slow_sh, store_url, cap=4,
                         executor='kind = "dask"\nmax_workers = 4\nmax_concurrent_requests = 2')
    aois = _aois(tumangang, 3)
    jobs = [AoiJob(a, SINCE, UNTIL, suppressed=False, kind="poll") for a in aois]
    assert [j.key for j in jobs] == [f"railwatch-poll-{a.id}-2024-07-01T00:00:00Z" for a in aois]
    executor = DaskExecutor(settings, client=thread_cluster)
    outcomes = executor.map(jobs)
    n = _scenes_in_window(slow_sh)
    assert [o.error for o in outcomes] == [None] * len(jobs)
    assert [o.extra["key"] for o in outcomes] == [j.key for j in jobs]
    assert all(o.result.new == n for o in outcomes)
    assert slow_sh.in_flight_max == 2
    store = Store(store_url)
    try:
        seen = _observations(store, aois)
        assert all(len(v) == n == len(set(v)) for v in seen.values())
        # Usage was persisted by the workers: one Process request per scene and AOI.
        usage = {u.aoi_id: u for u in store.usage() if u.collection == "sentinel-2-l2a"}
        assert set(usage) == {a.id for a in aois}
    finally:
        store.close()
    # A later window (other keys): the jobs find everything observed and fetch nothing.
    slow_sh.reset()
    later = [dataclasses.replace(j, until=UNTIL + timedelta(hours=1)) for j in jobs]
    again = executor.map(later)
    assert all(o.result.new == 0 for o in again)
    assert slow_sh.requests_to(PROCESS_PATH) == []
    # One key is one task: the same job submitted twice at once runs once (the same answer, same timing).
    twice = dataclasses.replace(jobs[0], until=UNTIL + timedelta(hours=2))
    f1, f2 = executor.submit(twice), executor.submit(twice)
    assert f1.key == f2.key == twice.key
    assert f1.result() == f2.result()
    # A railwatch error on the worker comes back as that error, not as a crash (and is not retried).
    (tmp_path / "rw.toml").write_text((tmp_path / "rw.toml").read_text().replace(
        f'client_secret_env = "{SECRET_VAR}"', 'client_secret_env = "RW_TEST_EXECUTOR_UNSET"'))
    bad = DaskExecutor(load_settings(tmp_path / "rw.toml", environ={}, cwd=tmp_path), client=thread_cluster)
    from railwatch.errors import ConfigError

    with pytest.raises(ConfigError, match="RW_TEST_EXECUTOR_UNSET"):
        bad.run_one(AoiJob(aois[0], SINCE, UNTIL + timedelta(hours=3), suppressed=False, kind="poll"))


def test_dask_without_address_starts_an_in_process_cluster_and_refuses_sqlite_far_away(
    tmp_path: Path, slow_sh: FakeSentinelHub, tumangang: Aoi, secret_env: None,
) -> None:
    from railwatch.errors import ConfigError

    url = f"sqlite:///{tmp_path / 'rw.db'}"
    settings = _settings(tmp_path, slow_sh, url, cap=2, executor='kind = "dask"\nmax_workers = 2')
    executor = DaskExecutor(settings)
    try:
        result = executor.run_one(AoiJob(tumangang, SINCE, UNTIL, suppressed=True, kind="backfill"))
        assert result.ok and result.new == _scenes_in_window(slow_sh)
    finally:
        executor.close()
        reset_worker_state()
    far = _settings(tmp_path, slow_sh, url, cap=2, executor='kind = "dask"\naddress = "tcp://10.1.2.3:8786"')
    with pytest.raises(ConfigError, match="postgresql"):
        DaskExecutor(far)


# ------------------------------------------------------------------------------- a worker killed


@pytest.fixture(scope="module")
def process_cluster() -> Iterator[Any]:
    """Two worker processes (one thread each) under nannies that restart a killed worker."""
    old = os.environ.get(SECRET_VAR)
    os.environ[SECRET_VAR] = SECRET  # workers read the secret from their own environment
    try:
        with _cluster(processes=True, n_workers=2, threads_per_worker=1) as client:
            yield client
    finally:
        if old is None:
            os.environ.pop(SECRET_VAR, None)
        else:
            os.environ[SECRET_VAR] = old


def test_worker_killed_mid_job_still_yields_one_observation_per_scene(
    tmp_path: Path, sim_archive: Path, tumangang: Aoi, store_url: str, secret_env: None, process_cluster: Any,
) -> None:
    fake = FakeSentinelHub(sim_archive, page_size=100, client_secret=SECRET, latency={"process": 0.5})
    fake.start()
    try:
        settings = _settings(tmp_path, fake, store_url, cap=2, executor='kind = "dask"\nretries = 2')
        executor = DaskExecutor(settings, client=process_cluster)
        # An AOI id of its own: the key differs from any other test's on this module's cluster.
        aoi = dataclasses.replace(tumangang, id=f"killed-{uuid.uuid4().hex[:8]}")
        job = AoiJob(aoi, LONG, UNTIL, suppressed=True, kind="backfill")
        future = executor.submit(job)
        # Wait until the job has a scene or two behind it, then kill the worker process running it.
        deadline = time.monotonic() + 60
        while not [r for r in fake.requests_to(PROCESS_PATH) if r.status == 200]:
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.05)
        running = [w for w, keys in process_cluster.processing().items() if job.key in keys]
        assert len(running) == 1
        pid = process_cluster.run(os.getpid, workers=running)[running[0]]
        os.kill(pid, signal.SIGKILL)
        data = future.result(timeout=120)
        assert "result" in data, data
        assert data["pid"] != pid  # finished by another worker process
        n = _scenes_in_window(fake, LONG)
        assert n >= 4
        store = Store(store_url)
        try:
            seen = [(o.collection, o.acquired) for o in store.observations(aoi.id)]
        finally:
            store.close()
        assert len(seen) == n == len(set(seen))
        # Nothing archived was fetched twice: the retry read what the killed worker had written.
        fetched = [r for r in fake.requests_to(PROCESS_PATH) if r.status == 200]
        assert n <= len(fetched) <= n + 1  # at most the one request cut off by the kill is repeated
    finally:
        fake.stop()


# ------------------------------------------------------------------------------ the CLI and the daemon


def test_cli_run_once_and_backfill_on_both_executors(tmp_path: Path, slow_sh: FakeSentinelHub) -> None:
    from tests.cli_helpers import railwatch
    from tests.daemon_helpers import write_aoi

    root = tmp_path / "proj"
    for i in range(3):
        write_aoi(root / "aoi", f"tk{i}")
    (root / "config").mkdir(parents=True)
    (root / "config" / "railwatch.toml").write_text(
        '[aoi]\ndir = "aoi"\n[imagery]\nprovider = "sentinelhub"\nlookback_days = 6\n'
        '[imagery.files]\nroot = "var/archive"\n[imagery.sentinelhub]\n'
        f'base_url = "{slow_sh.base_url}"\ntoken_url = "{slow_sh.token_url}"\nclient_id = "{slow_sh.client_id}"\n'
        f'client_secret_env = "{SECRET_VAR}"\nmax_scene_cloud_percent = 100.0\nmax_concurrent_requests = 2\n'
        '[store]\nurl = "sqlite:///var/railwatch.db"\n'
    )
    env = {SECRET_VAR: SECRET, "RAILWATCH_NOW": "2024-07-01T00:00:00Z"}
    res = railwatch("run", "--once", "--workers", "3", "--no-progress", cwd=root, env=env)
    assert res.code == 0, res.err
    assert slow_sh.in_flight_max == 2
    n = _scenes_in_window(slow_sh)
    store = Store(f"sqlite:///{root / 'var' / 'railwatch.db'}", migrate_schema=False)
    try:
        assert [len(store.observations(f"tk{i}")) for i in range(3)] == [n] * 3
    finally:
        store.close()
    # The same on Dask (an in-process cluster: no address), further back: only the older scenes are new.
    res = railwatch("backfill", "--since", "2024-06-20", "--until", "2024-07-01", "--no-progress", cwd=root,
                    env=env | {"RAILWATCH_EXECUTOR__KIND": "dask", "RAILWATCH_EXECUTOR__MAX_WORKERS": "3"})
    assert res.code == 0, res.err
    assert "backfill done: " in res.err and "new scene(s) over 3 AOI(s)" in res.err
    long = _scenes_in_window(slow_sh, LONG)
    store = Store(f"sqlite:///{root / 'var' / 'railwatch.db'}", migrate_schema=False)
    try:
        for i in range(3):
            rows = [(o.collection, o.acquired) for o in store.observations(f"tk{i}")]
            assert len(rows) == long == len(set(rows))
    finally:
        store.close()
    bad = railwatch("run", "--once", "--workers", "0", cwd=root, env=env)
    assert bad.code == 2 and "--workers" in bad.err


def test_daemon_polls_on_the_dask_cluster(
    tmp_path: Path, slow_sh: FakeSentinelHub, tumangang: Aoi, store_url: str, secret_env: None, thread_cluster: Any,
) -> None:
    from railwatch.clock import FixedClock
    from railwatch.scheduler import Daemon

    settings = _settings(tmp_path, slow_sh, store_url, cap=2, executor='kind = "dask"\nmax_workers = 2')
    settings.imagery.lookback_days = 6
    store = Store(store_url)
    try:
        daemon = Daemon(settings, store, SentinelHubProvider.from_settings(settings), clock=FixedClock(UNTIL))
        daemon.executor = DaskExecutor(settings, client=thread_cluster, clock=daemon.clock)
        aois = _aois(tumangang, 2)
        daemon.aois = {a.id: a for a in aois}
        for a in aois:
            daemon.poll(a.id)
        n = _scenes_in_window(slow_sh)
        assert all(len(v) == n == len(set(v)) for v in _observations(store, aois).values())
        polls = daemon.metrics.render().decode()
        assert 'railwatch_polls_total{aoi="copy-00",outcome="ok"} 1.0' in polls
        assert all(p.last_success_at is not None for p in store.poll_states(aois[0].id))
    finally:
        store.close()
