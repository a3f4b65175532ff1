"""The freshness watch (pure decision + the stale alert it writes) and the daemon's other pure helpers:
schedules, the fast clock, archive retention planning, metrics bookkeeping."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from railwatch.config import DaemonSettings, Settings
from railwatch.domain import S1, S2, Aoi, Observation
from railwatch.freshness import DEFAULT_REVISIT_DAYS, judge, revisit_for, transition
from railwatch.retention import ArchivedScene, plan_prune

T0 = datetime(2024, 6, 1, tzinfo=UTC)
DAY = timedelta(days=1)


def days(n: float) -> timedelta:
    return timedelta(days=n)


# --- judge ------------------------------------------------------------------------------------
def test_fresh_when_a_sensor_delivered_within_its_allowance() -> None:
    v = judge("a", T0, [S2, S1], {S2: T0 - days(20), S1: T0 - days(10)})
    assert not v.stale
    s2, s1 = v.sensors
    assert s2.overdue
    assert not s1.overdue
    assert v.last_usable == T0 - days(10)
    assert v.stale_after == T0 - days(10) + days(18)


def test_stale_when_every_sensor_is_overdue_and_carries_the_evidence() -> None:
    v = judge("a", T0, [S2, S1], {S2: T0 - days(16), S1: T0 - days(19)})
    assert v.stale
    assert v.last_usable == T0 - days(16)
    # the last moment a scene was due: S2's next pass after its last usable one (5 days later)
    assert v.expected_by == T0 - days(16) + days(5)
    assert v.stale_after == max(T0 - days(16) + days(15), T0 - days(19) + days(18))
    assert [s.sensor for s in v.sensors] == [S2, S1]
    doc = v.as_dict()
    assert doc["stale"] is True
    assert doc["last_usable"] == "2024-05-16T00:00:00Z"


def test_scope_any_raises_on_the_first_overdue_sensor() -> None:
    last = {S2: T0 - days(20), S1: T0 - days(1)}
    assert not judge("a", T0, [S2, S1], last).stale
    v = judge("a", T0, [S2, S1], last, scope="any")
    assert v.stale
    assert v.stale_after == T0 - days(20) + days(15)


def test_boundary_is_strict() -> None:
    last = {S2: T0 - days(15)}
    assert not judge("a", T0, [S2], last).stale
    assert judge("a", T0 + timedelta(seconds=1), [S2], last).stale


def test_configured_revisits_and_multiplier() -> None:
    last = {S1: T0 - days(30)}
    assert judge("a", T0, [S1], last).stale  # 30 > 3 x 6
    assert not judge("a", T0, [S1], last, revisit_days={S1: 12.0}).stale  # 30 < 3 x 12
    assert judge("a", T0, [S1], last, revisit_days={S1: 12.0}, stale_after_revisits=2).stale


def test_a_sensor_never_seen_is_measured_from_when_watching_began() -> None:
    assert not judge("a", T0, [S2], {}).stale  # nothing to measure from: cannot be judged
    assert judge("a", T0, [S2], {}, watching_since=T0 - days(16)).stale
    assert not judge("a", T0, [S2], {}, watching_since=T0 - days(14)).stale
    # "all": an unjudgeable sensor keeps the AOI fresh
    assert not judge("a", T0, [S2, S1], {S2: T0 - days(30)}).stale


def test_bad_multiplier_is_refused() -> None:
    with pytest.raises(ValueError, match="stale_after_revisits"):
        judge("a", T0, [S2], {}, stale_after_revisits=0)


def test_revisit_defaults_match_the_config_defaults() -> None:
    assert DaemonSettings().revisit_days == dict(DEFAULT_REVISIT_DAYS)
    assert revisit_for(S2) == 5.0
    assert revisit_for(S1) == 6.0
    assert revisit_for(S1, {S1: 12.0}) == 12.0


def test_transition() -> None:
    stale = judge("a", T0, [S2], {S2: T0 - days(30)})
    fresh = judge("a", T0, [S2], {S2: T0 - days(1)})
    assert transition(stale, alert_open=False) == "open"
    assert transition(stale, alert_open=True) == "none"
    assert transition(fresh, alert_open=True) == "resolve"
    assert transition(fresh, alert_open=False) == "none"


times = st.integers(min_value=0, max_value=400).map(lambda d: T0 - days(d))


@given(s2=st.none() | times, s1=st.none() | times, later=st.integers(min_value=0, max_value=100),
       scope=st.sampled_from(["all", "any"]))
def test_staleness_only_grows_with_time_and_a_new_scene_always_ends_it(
    s2: datetime | None, s1: datetime | None, later: int, scope: Any,
) -> None:
    last = {S2: s2, S1: s1}
    now = T0
    if judge("a", now, [S2, S1], last, scope=scope).stale:
        assert judge("a", now + days(later), [S2, S1], last, scope=scope).stale
    # a usable scene of every sensor acquired now: never stale
    assert not judge("a", now, [S2, S1], {S2: now, S1: now}, scope=scope).stale


# --- the stale alert in a real store ----------------------------------------------------------
def _aoi() -> Aoi:
    return Aoi(id="x", name="X", geometry={"type": "Polygon", "coordinates": [[[0, 0], [0.01, 0], [0.01, 0.01],
                                                                               [0, 0]]]}, tracks=())


def _obs(when: datetime, sensor: str = S1, status: str = "ok", cars: float | None = 3.0) -> Observation:
    return Observation(aoi_id="x", collection=sensor, acquired=when, status=status, estimated_cars=cars)


def test_stale_alert_opens_once_goes_through_the_hook_and_resolves(tmp_path: Path) -> None:
    from railwatch.scheduler import apply_verdict, verdict_for
    from railwatch.store import Store

    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    settings = Settings()
    aoi = _aoi()
    calls: list[tuple[str, str, str, bool]] = []

    def hook(_s: Any, ev: Any, alert: Any, a: Aoi, suppressed: bool) -> None:
        calls.append((ev.type, alert.kind, a.id, suppressed))

    obs = [_obs(T0 - days(40)), _obs(T0 - days(30), S2, "cloudy", None)]
    v = verdict_for(settings, aoi, obs, T0)
    assert v.stale
    action, alert_id = apply_verdict(store, aoi, v, now=T0, event_hook=hook)
    assert action == "open"
    assert alert_id is not None
    # judged again: nothing new
    assert apply_verdict(store, aoi, verdict_for(settings, aoi, obs, T0 + DAY), now=T0 + DAY,
                         event_hook=hook) == ("none", alert_id)
    (row,) = store.alerts(aoi_id="x")
    assert (row.kind, row.state, row.opened_acquired, row.sensor) == ("stale", "confirmed", None, None)
    assert row.last_acquired == T0 - days(40)
    (ev,) = store.events(alert_id=alert_id)
    assert ev.type == "alert.stale"
    assert ev.acquired is None
    assert ev.data["last_usable_acquired"] == "2024-04-22T00:00:00Z"
    assert ev.data["expected_by"] == "2024-04-28T00:00:00Z"  # S1's next pass after its last usable one
    assert ev.created_at == T0
    # an activity alert of the same AOI is untouched by the stale one, and the reverse
    obs.append(_obs(T0 + days(2)))
    v2 = verdict_for(settings, aoi, obs, T0 + days(3))
    assert apply_verdict(store, aoi, v2, now=T0 + days(3), event_hook=hook) == ("resolve", None)
    (row,) = store.alerts(aoi_id="x")
    assert row.state == "resolved"
    assert row.resolved_at == T0 + days(3)
    assert [e.type for e in store.events(alert_id=alert_id)] == ["alert.stale", "alert.resolved"]
    assert calls == [("alert.stale", "stale", "x", False), ("alert.resolved", "stale", "x", False)]
    store.close()


def test_verdict_measures_a_silent_sensor_from_the_first_observation() -> None:
    from railwatch.scheduler import verdict_for

    settings = Settings()
    obs = [_obs(T0 - days(40), S2, "cloudy", None), _obs(T0 - days(39), S1, "nodata", None)]
    v = verdict_for(settings, _aoi(), obs, T0)
    assert v.stale
    assert v.last_usable is None
    assert not verdict_for(settings, _aoi(), [], T0).stale  # nothing seen, not watching: no judgement
    # a clear scene counts before the detector can estimate on it (a new AOI builds its reference)
    warming = [*obs, _obs(T0 - days(2), S1, "ok", None)]
    assert not verdict_for(settings, _aoi(), warming, T0).stale


# --- schedules and the fast clock -------------------------------------------------------------
def test_cron_weekdays_follow_standard_cron() -> None:
    from railwatch.scheduler import _cron_weekdays

    assert _cron_weekdays("*") == "*"
    assert _cron_weekdays("0") == "sun"
    assert _cron_weekdays("7") == "sun"
    assert _cron_weekdays("1-5") == "mon,tue,wed,thu,fri"
    assert _cron_weekdays("5-7") == "fri,sat,sun"
    assert _cron_weekdays("sat,sun") == "sat,sun"
    assert _cron_weekdays("*/2") == "tue,thu,sat,sun"  # 0, 2, 4, 6


def test_cron_sunday_fires_on_sunday() -> None:
    from railwatch.scheduler import cron_trigger

    trig = cron_trigger("30 6 * * 0")
    fire = trig.get_next_fire_time(None, datetime(2025, 1, 1, tzinfo=UTC))  # a Wednesday
    assert fire == datetime(2025, 1, 5, 6, 30, tzinfo=UTC)
    assert fire.weekday() == 6


def test_poll_schedule_precedence_and_time_scale() -> None:
    from railwatch.scheduler import poll_schedule

    d = DaemonSettings(poll_interval_minutes=60, jitter_seconds=10)
    plain = poll_schedule(_aoi(), d)
    assert plain.period_seconds == 3600
    assert plain.trigger.interval == timedelta(hours=1)
    assert "every 60 min jitter 10s" in plain.description
    own = Aoi(**{**_aoi().__dict__, "settings": {"poll_interval_minutes": 15, "jitter_seconds": 0}})
    p = poll_schedule(own, d)
    assert p.trigger.interval == timedelta(minutes=15)
    assert p.trigger.jitter is None
    cron = Aoi(**{**_aoi().__dict__, "settings": {"schedule": "0 */6 * * *"}})
    c = poll_schedule(cron, d)
    assert c.period_seconds == 6 * 3600
    assert "cron" in c.description
    fast = poll_schedule(cron, DaemonSettings(time_scale=3600))
    assert fast.trigger.interval == timedelta(seconds=6)
    assert "time_scale 3600" in fast.description
    assert fast.description != c.description  # a changed scale reschedules the stored job


def test_scaled_clock_runs_faster() -> None:
    from railwatch.scheduler import ScaledClock

    t = [100.0]
    clock = ScaledClock(T0, 86400, monotonic=lambda: t[0])
    assert clock.now() == T0
    t[0] += 2.5
    assert clock.now() == T0 + days(2.5)


def test_lock_and_jobstore_locations(tmp_path: Path) -> None:
    from railwatch.scheduler import jobstore_url_for, lock_path_for

    s = Settings.model_validate({"store": {"url": f"sqlite:///{tmp_path}/var/rw.db"}})
    assert lock_path_for(s) == tmp_path / "var" / "rw.db.daemon.lock"
    assert jobstore_url_for(s) == f"sqlite:///{tmp_path}/var/rw.jobs.db"
    pg = Settings.model_validate({"store": {"url": "postgresql://u@h/db"}})
    assert lock_path_for(pg) is None
    assert jobstore_url_for(pg) == "postgresql://u@h/db"
    own = Settings.model_validate({"daemon": {"jobstore_url": "sqlite:////j.db", "lock_path": "/l.lock"}})
    assert jobstore_url_for(own) == "sqlite:////j.db"
    assert lock_path_for(own) == Path("/l.lock")


def test_daemon_settings_are_validated(tmp_path: Path) -> None:
    from railwatch.config import load_settings
    from railwatch.errors import ConfigError

    env = {"RAILWATCH_DAEMON__LISTEN": "9466", "RAILWATCH_DAEMON__STALE_AFTER_REVISITS": "0",
           "RAILWATCH_DAEMON__JOBSTORE_URL": "mysql://x"}
    with pytest.raises(ConfigError) as err:
        load_settings(None, environ=env, cwd=tmp_path)
    text = str(err.value)
    assert "listen" in text
    assert "stale_after_revisits" in text
    assert "jobstore_url" in text


# --- retention ---------------------------------------------------------------------------------
def _scene(when: datetime, sensor: str = S1) -> ArchivedScene:
    return ArchivedScene(Path(f"/a/{sensor}_{when:%Y%m%d}.tif"), sensor, when)


def test_retention_keeps_young_unobserved_reference_and_alert_scenes() -> None:
    now = T0
    old = [T0 - days(d) for d in (400, 380, 360, 340, 320, 300)]
    obs = [Observation("x", S1, t, "ok", estimated_cars=1.0, geometry_key="g") for t in old]
    # the newest two are the current reference (reference_scenes=2)
    scenes = [_scene(t) for t in old] + [_scene(T0 - days(500)), _scene(T0 - days(5))]
    delete, kept = plan_prune(scenes, obs, now=now, max_age_days=100, reference_scenes=2, reference_days=90)
    gone = {s.acquired for s in delete}
    assert gone == {T0 - days(400), T0 - days(380), T0 - days(360), T0 - days(340)}
    assert kept == 3  # the two reference scenes and the unobserved one
    # an open alert opened 330 days ago protects everything from 330 + 90 days back
    delete, _ = plan_prune(scenes, obs, now=now, max_age_days=100, reference_scenes=2, reference_days=90,
                           open_alert_starts=[T0 - days(330)])
    assert {s.acquired for s in delete} == set()
    # elevated or unusable scenes never count as reference scenes
    obs2 = [*obs[:-1], Observation("x", S1, old[-1], "ok", estimated_cars=9.0, geometry_key="g",
                                   metrics={"elevated": True})]
    delete, _ = plan_prune(scenes, obs2, now=now, max_age_days=100, reference_scenes=2, reference_days=90)
    assert T0 - days(300) in {s.acquired for s in delete}
    assert T0 - days(340) not in {s.acquired for s in delete}


def test_prune_archive_deletes_files_and_sidecars(tmp_path: Path) -> None:
    from railwatch.retention import prune_archive

    root = tmp_path / "arch"
    folder = root / "x"
    folder.mkdir(parents=True)
    names = {T0 - days(d): f"{S1}_{(T0 - days(d)):%Y%m%dT%H%M%SZ}.tif" for d in (300, 200, 10)}
    for n in names.values():
        (folder / n).write_bytes(b"0" * 10)
    (folder / (names[T0 - days(300)] + ".aux.xml")).write_text("x")
    (folder / "truth.csv").write_text("x")

    class FakeStore:
        def observations(self, _aoi: str) -> list[Observation]:
            return [Observation("x", S1, t, "cloudy") for t in names]

        def alerts(self, **_kw: Any) -> list[Any]:
            return []

    cfg = Settings().detector
    report = prune_archive(root, FakeStore(), [_aoi()], now=T0, max_age_days=100, detector_for={"x": cfg})
    assert sorted(p.name for p in report.deleted) == sorted([names[T0 - days(300)], names[T0 - days(200)]])
    assert report.bytes_freed == 20
    assert sorted(p.name for p in folder.iterdir()) == sorted([names[T0 - days(10)], "truth.csv"])


# --- metrics bookkeeping -----------------------------------------------------------------------
def test_usage_deltas_and_invalid_file_gauge() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from railwatch.imagery.sentinelhub import UsageRow
    from railwatch.metrics import DaemonMetrics

    m = DaemonMetrics()
    m.observe_usage([UsageRow("x", S2, "2024-06", 2, 1.5)])
    m.observe_usage([UsageRow("x", S2, "2024-06", 5, 4.0)])
    m.observe_usage([UsageRow("x", S2, "2024-06", 1, 0.5)])  # drained by someone: counts in full again
    m.set_invalid_files(["a.geojson", "b.geojson"])
    m.set_invalid_files(["b.geojson"])
    fams = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    req = [s.value for s in fams["railwatch_provider_requests"].samples if s.name.endswith("_total")]
    pu = [s.value for s in fams["railwatch_provider_processing_units"].samples if s.name.endswith("_total")]
    assert req == [6.0]
    assert pu == [4.5]
    assert [s.labels["file"] for s in fams["railwatch_aoi_file_invalid"].samples] == ["b.geojson"]
