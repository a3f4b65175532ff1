"""Read-ahead (``[imagery] read_ahead``): the next scene is fetched and prepared in a background thread
while the current one is analysed, and nothing that is recorded changes.

A simulated archive (a small yard, 100 days, a surge that opens and resolves an alert) is backfilled
into a fresh SQLite file with read-ahead off and on; every table, the monitor's scene cache and the
provider's calls are compared. Errors of one scene's fetch are recorded or raised as without
read-ahead, and no read-ahead thread outlives a pass.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from railwatch.clock import FixedClock
from railwatch.config import Settings
from railwatch.domain import Aoi, Raster, SceneRef
from railwatch.errors import (
    CredentialsError,
    ProviderError,
    ProviderUnavailable,
    QuotaExceeded,
    SceneUnreadable,
)
from railwatch.imagery import FilesProvider
from railwatch.imagery import synthetic as sy
from railwatch.monitor import AoiResult, Monitor
from railwatch.store import Store
from railwatch.store.models import Base
from tests.unit.test_synthetic import make_aoi

SINCE, UNTIL = datetime(2024, 3, 1, tzinfo=UTC), datetime(2024, 12, 31, tzinfo=UTC)
NOW = datetime(2025, 1, 15, tzinfo=UTC)
THREAD = "railwatch-read-ahead"
#: Columns stamped with the wall clock by the store itself (not by the monitor's clock).
WALL_CLOCK = {"first_seen", "processed_at", "created_at", "retry_from"}


@pytest.fixture(scope="module")
def yard() -> Aoi:
    return make_aoi("read-ahead-yard")


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, yard: Aoi) -> Path:
    """37 scenes of both sensors: clear, partial, cloudy and snowy ones, and a surge in June."""
    root = tmp_path_factory.mktemp("archive")
    sy.simulate(yard, root, days=100, seed=11, start=date(2024, 4, 1),
                surges=[sy.SurgeSpec(date(2024, 6, 10), 80, 15)], usual_cars=10)
    return root


class Recording:
    """The files provider, recording each fetch (scene and thread) and failing the scenes it is told to."""

    name = "recording"

    def __init__(self, root: Path, failures: dict[datetime, BaseException] | None = None) -> None:
        self.inner = FilesProvider(root)
        self.failures = failures or {}
        self.calls: list[tuple[str, datetime, str]] = []
        self._lock = threading.Lock()

    def search(self, aoi: Aoi, since: datetime, until: datetime, collections: Sequence[str] = ()) -> list[SceneRef]:
        return self.inner.search(aoi, since, until, collections)

    def fetch(self, aoi: Aoi, ref: SceneRef) -> Raster:
        with self._lock:
            self.calls.append((ref.collection, ref.acquired, threading.current_thread().name))
        failure = self.failures.get(ref.acquired)
        if failure is not None:
            raise failure
        return self.inner.fetch(aoi, ref)

    @property
    def scenes(self) -> list[tuple[str, datetime]]:
        return [(c, t) for c, t, _ in self.calls]

    @property
    def threads(self) -> set[str]:
        return {name.rsplit("_", 1)[0] for _, _, name in self.calls}


@dataclass
class Run:
    result: AoiResult
    tables: dict[str, list[dict[str, Any]]]
    provider: Recording
    monitor: Monitor


def _settings(db: Path, read_ahead: int) -> Settings:
    # min_history 3: the short simulation opens (and resolves) an alert
    return Settings.model_validate({"store": {"url": f"sqlite:///{db}"}, "imagery": {"read_ahead": read_ahead},
                                    "detector": {"min_history": 3}})


def _tables(store: Store) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table, wall-clock stamps left out: what the pass recorded."""
    out: dict[str, list[dict[str, Any]]] = {}
    with store.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            rows = conn.execute(select(table).order_by(*table.primary_key.columns)).mappings()
            out[table.name] = [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows]
    return out


def _monitor(tmp_path: Path, name: str, read_ahead: int, provider: Recording) -> Monitor:
    settings = _settings(tmp_path / f"{name}.db", read_ahead)
    return Monitor(settings, Store(settings.store.url), provider, clock=FixedClock(NOW), event_hook=lambda *a: None)


def _backfill(tmp_path: Path, archive: Path, aoi: Aoi, read_ahead: int, *, name: str = "",
              failures: dict[datetime, BaseException] | None = None, cache_bytes: int | None = None,
              until: datetime = UNTIL, progress: Any = None) -> Run:
    provider = Recording(archive, failures)
    monitor = _monitor(tmp_path, name or f"ahead{read_ahead}", read_ahead, provider)
    if cache_bytes is not None:
        monitor.cache_bytes = cache_bytes
    result = monitor.backfill(aoi, since=SINCE, until=until, progress=progress)
    assert not _read_ahead_threads()
    return Run(result, _tables(monitor.store), provider, monitor)


def _read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD)]


def _scene_times(archive: Path, aoi: Aoi) -> list[datetime]:
    return [r.acquired for r in FilesProvider(archive).search(aoi, SINCE, UNTIL)]


# ------------------------------------------------------------------------------ same results


@pytest.fixture(scope="module")
def without_read_ahead(tmp_path_factory: pytest.TempPathFactory, archive: Path, yard: Aoi) -> dict[bool, Run]:
    """The backfill with read-ahead off, with the default and with a tight scene cache (four
    Sentinel-2 scenes' worth: references are evicted and fetched again by the main thread while the
    next scene is read ahead)."""
    folder = tmp_path_factory.mktemp("without-read-ahead")
    return {tight: _backfill(folder, archive, yard, 0, name=f"off-{tight}", cache_bytes=_cache(tight))
            for tight in (False, True)}


def _cache(tight: bool) -> int | None:
    return 1_500_000 if tight else None


@pytest.mark.parametrize(("read_ahead", "tight_cache"), [(1, False), (2, False), (1, True)])
def test_backfill_records_exactly_what_it_records_without_read_ahead(
    tmp_path: Path, archive: Path, yard: Aoi, without_read_ahead: dict[bool, Run], read_ahead: int,
    tight_cache: bool,
) -> None:
    off = without_read_ahead[tight_cache]
    on = _backfill(tmp_path, archive, yard, read_ahead, cache_bytes=_cache(tight_cache))

    assert off.result.statuses == on.result.statuses
    assert {"ok", "partial", "cloudy"} <= set(off.result.statuses)
    assert off.result.events == on.result.events
    assert {"alert.opened", "alert.resolved"} <= {event for _, event in off.result.events}
    assert len(off.tables["observations"]) == off.result.new == 37
    assert any("estimated_cars" in r and r["estimated_cars"] is not None for r in off.tables["observations"])
    for table, rows in off.tables.items():
        assert on.tables[table] == rows, table  # every field, the metrics included, in the same order
    # The scene cache ends the same, and the provider was asked for the same scenes (with one scene
    # ahead: in the same order, none of them twice).
    assert list(on.monitor._prepared) == list(off.monitor._prepared)
    assert on.monitor._prepared_bytes == off.monitor._prepared_bytes
    assert on.monitor._uses == off.monitor._uses
    assert Counter(on.provider.scenes) == Counter(off.provider.scenes)
    if read_ahead == 1:
        assert on.provider.scenes == off.provider.scenes
    if tight_cache:
        assert len(off.provider.scenes) > len(set(off.provider.scenes))  # references were fetched again
    assert off.provider.threads == {"MainThread"}
    assert {"MainThread", THREAD} == on.provider.threads
    # all but the first scene were read ahead
    assert sum(1 for *_, t in on.provider.calls if t.startswith(THREAD)) == 36


def test_reprocess_reads_ahead_with_the_same_results(tmp_path: Path, archive: Path, yard: Aoi) -> None:
    """One backfill, reprocessed from May 20th without and then with read-ahead: reprocessing is
    idempotent, so the second pass records exactly what the first did."""
    _backfill(tmp_path, archive, yard, 0, name="reprocessed")
    runs = {}
    for read_ahead in (0, 1):
        provider = Recording(archive)
        monitor = _monitor(tmp_path, "reprocessed", read_ahead, provider)
        result = monitor.reprocess(yard, since=datetime(2024, 5, 20, tzinfo=UTC))
        assert not _read_ahead_threads()
        runs[read_ahead] = Run(result, _tables(monitor.store), provider, monitor)
    off, on = runs[0], runs[1]
    assert off.result.new == on.result.new == 19
    assert off.result.statuses == on.result.statuses
    assert on.tables == off.tables
    assert on.provider.scenes == off.provider.scenes
    assert THREAD in on.provider.threads and off.provider.threads == {"MainThread"}


def test_one_new_scene_or_read_ahead_off_starts_no_thread(tmp_path: Path, archive: Path, yard: Aoi) -> None:
    first = _scene_times(archive, yard)[0]
    one = _backfill(tmp_path, archive, yard, 1, name="one", until=first)
    assert one.result.new == 1 and one.provider.threads == {"MainThread"}
    off = _backfill(tmp_path, archive, yard, 0, name="off", until=datetime(2024, 5, 1, tzinfo=UTC))
    assert off.result.new > 5 and off.provider.threads == {"MainThread"}


# ---------------------------------------------------------------------------------------- errors


def test_unreadable_and_failed_scenes_are_recorded_as_without_read_ahead(
    tmp_path: Path, archive: Path, yard: Aoi,
) -> None:
    times = _scene_times(archive, yard)
    until = times[11]
    failures: dict[datetime, BaseException] = {
        times[1]: SceneUnreadable("scene 1: not a GeoTIFF / corrupt"),
        times[4]: ProviderError("scene 4: refused (400)"),
        times[5]: SceneUnreadable("scene 5: missing band(s) VH"),
    }
    off = _backfill(tmp_path, archive, yard, 0, failures=failures, until=until)
    on = _backfill(tmp_path, archive, yard, 1, failures=failures, until=until)
    assert off.result.ok and on.result.ok
    assert on.tables == off.tables
    by_time = {r["acquired"]: r for r in on.tables["observations"]}
    assert [by_time[times[i]]["status"] for i in (1, 4, 5)] == ["unreadable", "failed", "unreadable"]
    assert by_time[times[4]]["reason"] == "scene 4: refused (400)"
    assert on.result.statuses == off.result.statuses and sum(on.result.statuses.values()) == 12
    assert on.provider.scenes == off.provider.scenes


@pytest.mark.parametrize("read_ahead", [1, 2])
@pytest.mark.parametrize("error", [QuotaExceeded("budget spent"), ProviderUnavailable("503 after 4 attempts")],
                         ids=["quota", "outage"])
def test_outage_or_spent_quota_stops_the_pass_at_the_scene_that_raised(
    tmp_path: Path, archive: Path, yard: Aoi, read_ahead: int, error: ProviderError,
) -> None:
    times = _scene_times(archive, yard)
    k = 6
    run = _backfill(tmp_path, archive, yard, read_ahead, failures={times[k]: error}, until=times[12])
    assert run.result.error is not None and str(error) in run.result.error
    assert sorted(t for _, t in run.monitor.store.observed_keys(yard.id)) == times[:k]
    assert sum(run.result.statuses.values()) == k
    if read_ahead == 1:  # nothing after the failing scene was asked for
        assert max(t for _, t in run.provider.scenes) == times[k]


def test_refused_credentials_propagate_after_the_earlier_scenes_are_recorded(
    tmp_path: Path, archive: Path, yard: Aoi,
) -> None:
    times = _scene_times(archive, yard)
    provider = Recording(archive, {times[3]: CredentialsError("401: check client_id")})
    monitor = _monitor(tmp_path, "credentials", 1, provider)
    with pytest.raises(CredentialsError, match="401"):
        monitor.backfill(yard, since=SINCE, until=times[10])
    assert not _read_ahead_threads()
    assert sorted(t for _, t in monitor.store.observed_keys(yard.id)) == times[:3]


def test_an_interrupt_in_the_main_thread_leaves_no_read_ahead_running(
    tmp_path: Path, archive: Path, yard: Aoi,
) -> None:
    times = _scene_times(archive, yard)
    started = threading.Event()
    release = threading.Event()

    class Slow(Recording):
        def fetch(self, aoi: Aoi, ref: SceneRef) -> Raster:
            if ref.acquired == times[2]:
                started.set()
                release.wait(5)
            return super().fetch(aoi, ref)

    def progress(done: int, total: int) -> None:
        if done == 2:
            assert started.wait(5)  # scene 2 is being read ahead
            threading.Timer(0.2, release.set).start()
            raise KeyboardInterrupt

    provider = Slow(archive)
    monitor = _monitor(tmp_path, "interrupt", 1, provider)
    with pytest.raises(KeyboardInterrupt):
        monitor.backfill(yard, since=SINCE, until=times[10], progress=progress)
    assert release.is_set()  # closing waited for the read that was running ...
    assert not _read_ahead_threads()  # ... and the thread is gone
    assert [t for _, t in provider.scenes] == times[:3]  # nothing after the scene read ahead
    assert sorted(t for _, t in monitor.store.observed_keys(yard.id)) == times[:2]
