"""Calibration with analysts' counts: reading, matching, fitting, and updating recorded estimates."""

from __future__ import annotations

import io
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from railwatch.config import Settings
from railwatch.detect.calibrate import (
    SCALE_PRIOR_LOG_SIGMA,
    SCALE_RANGE,
    Count,
    CountsError,
    assign_counts,
    fit_scale,
    geometry_factors,
    geometry_key_of,
    read_counts,
)
from railwatch.detect.estimate import Z80, estimate_cars, interval
from railwatch.domain import S1, S2, Aoi, Observation
from railwatch.monitor import Monitor
from railwatch.store import AlertRow, Store

T0 = datetime(2024, 3, 1, 1, 47, 30, tzinfo=UTC)


def test_read_counts_accepts_dates_and_datetimes() -> None:
    counts = read_counts(io.StringIO("acquired,cars\n2024-03-01,12\n2024-03-06T01:47:30Z,30\n"))
    assert [c.cars for c in counts] == [12.0, 30.0]
    assert counts[0].day.isoformat() == "2024-03-01" and not counts[0].has_time
    assert counts[1].acquired == datetime(2024, 3, 6, 1, 47, 30, tzinfo=UTC) and counts[1].has_time


def test_read_counts_reports_every_problem_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "counts.csv"
    path.write_text("acquired,cars\nyesterday,3\n2024-03-01,-2\n2024-03-02,many\n", encoding="utf-8")
    with pytest.raises(CountsError) as err:
        read_counts(path)
    msg = str(err.value)
    assert "line 2" in msg and "line 3" in msg and "line 4" in msg and str(path) in msg
    path.write_text("date,count\n2024-03-01,3\n", encoding="utf-8")
    with pytest.raises(CountsError, match="missing column"):
        read_counts(path)


def test_counts_match_the_same_utc_day_of_each_sensor() -> None:
    scenes = [(S2, T0), (S1, T0 + timedelta(hours=7)), (S1, T0 + timedelta(hours=20)), (S2, T0 + timedelta(days=5))]
    dated = Count(T0.replace(hour=12), 10.0, has_time=False)
    timed = Count(T0 + timedelta(hours=19), 20.0, has_time=True)
    lost = Count(T0 + timedelta(days=2), 5.0)
    assigned, unmatched = assign_counts([dated, timed, lost], scenes)
    # the date-only count goes to every scene of the day; the timed one, later, to the closest of each sensor
    assert assigned == {(S2, T0): 20.0, (S1, T0 + timedelta(hours=7)): 10.0, (S1, T0 + timedelta(hours=20)): 20.0}
    assert unmatched == [lost]


@settings(max_examples=25, deadline=None)
@given(st.floats(0.2, 5.0), st.integers(0, 1000))
def test_calibration_recovers_a_known_scale(scale: float, seed: int) -> None:
    """Raw estimates of truth / scale with 15 % log-normal model error: the fit finds the scale (within
    what 40 noisy pairs allow: the L1 fit's own sampling error is about 3 %, so 15 % is a 4-5 sigma bound)."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(8, 80, 40).astype(float)
    raw = truth / scale * np.exp(rng.normal(0, 0.15, truth.size))
    cal = fit_scale(list(zip(raw, truth, strict=True)))
    assert cal.scale == pytest.approx(scale, rel=0.15)
    assert 0.1 < cal.log_sigma < 0.4


def test_three_counts_give_a_scale_and_an_honest_spread() -> None:
    cal = fit_scale([(10.0, 20.0), (20.0, 41.0), (15.0, 29.0)])
    assert cal.scale == pytest.approx(2.0, rel=0.05)
    # three counts cannot claim a precision they do not have: the prior keeps the spread wide
    assert cal.log_sigma > 0.2
    with pytest.raises(ValueError, match="no matched counts"):
        fit_scale([])


def test_interval_is_wide_without_calibration_and_narrows_with_it() -> None:
    raw = estimate_cars(n_occupied=60, expected_false=2, n_usable=400, n_track=400, metres_per_pixel=10,
                        car_length_m=15)
    calibrated = interval(raw.raw, raw.count_sd, 1.5, 0.15)
    assert raw.low < raw.cars < raw.high
    assert calibrated.cars == pytest.approx(1.5 * raw.cars)
    assert math.log1p(calibrated.high) - math.log1p(calibrated.low) < math.log1p(raw.high) - math.log1p(raw.low)
    # the 80 % interval of log(1 + cars) is ±Z80 sigma wide
    sigma = (math.log1p(calibrated.high) - math.log1p(calibrated.cars)) / Z80
    assert sigma >= 0.15


def _aoi() -> Aoi:
    poly = {"type": "Polygon", "coordinates": [[[130.6, 42.4], [130.61, 42.4], [130.61, 42.41], [130.6, 42.41], [130.6, 42.4]]]}
    line = {"type": "LineString", "coordinates": [[130.601, 42.405], [130.609, 42.405]]}
    return Aoi("cal-test", "Calibration test", poly, (line,))


class _NoProvider:
    def search(self, *a: object, **k: object) -> list[object]:
        return []

    def fetch(self, *a: object, **k: object) -> object:
        raise AssertionError("calibration must not fetch imagery")


def test_calibrate_updates_recorded_estimates_and_sends_nothing(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'rw.db'}")
    settings = Settings.model_validate({"store": {"url": store.url}})
    aoi = _aoi()
    rng = np.random.default_rng(3)
    with store.session() as s:
        for i in range(30):
            for sensor, hours in ((S2, 0), (S1, 8)):
                truth = 15 + 10 * math.sin(i / 3)
                raw = truth / (2.0 if sensor == S2 else 0.5) * math.exp(rng.normal(0, 0.1))
                store.save_observation(s, Observation(
                    aoi.id, sensor, T0 + timedelta(days=5 * i, hours=hours), "ok", estimated_cars=raw,
                    estimated_cars_low=raw / 2, estimated_cars_high=raw * 2, clear_fraction=1.0,
                    geometry_key="optical" if sensor == S2 else "ascending:134",
                    metrics={"raw_cars": raw, "raw_cars_sd": 1.0}, detector_version="test"))
    # An alert decided on the uncalibrated (4x too high) radar estimates: its numbers follow the new
    # scale, its state and events stay as they were, and nothing is sent.
    opened, last = T0 + timedelta(days=50, hours=8), T0 + timedelta(days=60, hours=8)
    with store.session() as s:
        raw = {o.acquired: o for o in store.observations(aoi.id, session=s)}
        s.add(AlertRow(kind="activity", aoi_id=aoi.id, sensor=S1, state="resolved", opened_acquired=opened,
                       last_acquired=last, opening_cars=raw[opened].estimated_cars,
                       estimated_cars=raw[last].estimated_cars, peak_cars=999.0, baseline_cars=80.0,
                       sensors_seen=[S1], passes=3, data={}))
    sent: list[object] = []
    monitor = Monitor(settings, store, _NoProvider(), event_hook=lambda *a: sent.append(a))  # type: ignore[arg-type]
    counts = [Count(T0 + timedelta(days=5 * i, hours=h), 15 + 10 * math.sin(i / 3), has_time=True)
              for i in (2, 11, 23) for h in (0, 8)]
    report = monitor.calibrate(aoi, counts)
    cals = store.calibrations(aoi.id)
    assert cals[S2].scale == pytest.approx(2.0, rel=0.15) and cals[S1].scale == pytest.approx(0.5, rel=0.15)
    assert cals[S2].n_counts == 3 and report["updated"] > 0
    obs = store.observations(aoi.id)
    errors = []
    for o in obs:
        truth = 15 + 10 * math.sin(((o.acquired - T0).days // 5) / 3)
        assert o.estimated_cars is not None and o.estimated_cars_low is not None and o.estimated_cars_high is not None
        assert o.estimated_cars_low <= o.estimated_cars <= o.estimated_cars_high
        errors.append(abs(math.log(o.estimated_cars / truth)))
    assert np.median(errors) < 0.12 and max(errors) < math.log(1.6)
    assert sum("analyst_cars" in o.metrics for o in obs) == 6
    assert sent == [] and report["alerts_rescaled"] == 1
    (alert,) = store.alerts(aoi_id=aoi.id)
    now = {o.acquired: o for o in obs}
    assert alert.state == "resolved" and store.events(alert_id=alert.id) == []
    assert alert.opening_cars == now[opened].estimated_cars and alert.estimated_cars == now[last].estimated_cars
    assert alert.estimated_cars_low == now[last].estimated_cars_low
    assert alert.peak_cars == max(now[T0 + timedelta(days=d, hours=8)].estimated_cars or 0 for d in (50, 55, 60))
    assert alert.baseline_cars == now[opened].metrics["baseline_cars"] and alert.baseline_cars < 40


def test_geometry_factors_bring_each_radar_geometry_to_the_common_level() -> None:
    """Two geometries read the same yard at 2 : 1; the factors bring both to the pooled median."""
    rows = [("asc", 20.0 + i % 3) for i in range(20)] + [("desc", 10.0 + (i % 3) / 2) for i in range(20)]
    f = geometry_factors(rows)
    assert f["asc"] * 21 == pytest.approx(f["desc"] * 10.5, rel=0.1)
    assert 0.25 <= f["desc"] <= 4 and f["desc"] > 1 > f["asc"]
    # One geometry, too few scenes or a zero level: nothing to compare, factor 1.
    assert geometry_factors([("asc", 5.0)] * 10) == {"asc": 1.0}
    assert geometry_factors(rows + [("new", 50.0)] * 3)["new"] == 1.0
    assert geometry_factors(rows + [("dead", 0.0)] * 10)["dead"] == 1.0


def test_calibration_scales_each_radar_geometry_to_the_same_cars(tmp_path: Path) -> None:
    """Descending reads the yard at half the ascending raw count: three counts (two of them on the
    ascending pass) calibrate both, and the per-geometry scale is applied to new scenes."""
    store = Store(f"sqlite:///{tmp_path / 'rw.db'}")
    settings = Settings.model_validate({"store": {"url": store.url}})
    aoi = _aoi()
    with store.session() as s:
        for i in range(40):
            truth = 15 + 5 * math.sin(i / 4)
            geom, per_car = ("ascending:134", 4.0) if i % 2 == 0 else ("descending:61", 2.0)
            raw = truth * per_car
            store.save_observation(s, Observation(
                aoi.id, S1, T0 + timedelta(days=3 * i), "ok", estimated_cars=raw, estimated_cars_low=raw / 2,
                estimated_cars_high=raw * 2, clear_fraction=1.0, geometry_key=geom,
                metrics={"raw_cars": raw, "raw_cars_sd": 1.0}, detector_version="test"))
    monitor = Monitor(settings, store, _NoProvider(), event_hook=lambda *a: None)  # type: ignore[arg-type]
    counts = [Count(T0 + timedelta(days=3 * i, hours=12), 15 + 5 * math.sin(i / 4)) for i in (4, 10, 21)]
    report = monitor.calibrate(aoi, counts)
    assert set(report["sensors"][S1]["geometry_factors"]) == {"ascending:134", "descending:61"}
    for o in store.observations(aoi.id):
        truth = 15 + 5 * math.sin(((o.acquired - T0).days // 3) / 4)
        assert o.estimated_cars == pytest.approx(truth, rel=0.1)
    cals = store.calibrations(aoi.id)
    assert cals[geometry_key_of(S1, "descending:61")].scale == pytest.approx(0.5, rel=0.1)
    assert cals[geometry_key_of(S1, "ascending:134")].scale == pytest.approx(0.25, rel=0.1)


def test_a_scale_few_counts_support_is_held_near_the_physical_model() -> None:
    """Three counts of 12-15 cars on scenes whose raw estimates are 0, half a car and 0 (the optical test saw
    almost nothing): the plain L1 fit follows the one informative count to the end of its range, the fit with
    the prior stays within what the model's stated uncertainty (a factor of about two) allows."""
    pairs = [(0.0, 12.0), (0.52, 14.0), (0.0, 15.0)]
    assert fit_scale(pairs, scale_prior_log_sigma=None).scale == pytest.approx(SCALE_RANGE[1])
    held = fit_scale(pairs)
    assert 1.0 < held.scale < math.exp(2 * SCALE_PRIOR_LOG_SIGMA)


@pytest.mark.parametrize("scale", [0.2, 0.5, 3.0])
def test_counts_that_agree_fix_the_scale_whatever_the_prior(scale: float) -> None:
    """Three counts of a yard's usual 8-30 cars within ±6 % of one scale: the prior does not move it."""
    cars = [8.0, 14.0, 30.0]
    pairs = [(c / scale, c * f) for c, f in zip(cars, (0.95, 1.0, 1.06), strict=True)]
    assert fit_scale(pairs).scale == pytest.approx(fit_scale(pairs, scale_prior_log_sigma=None).scale, rel=0.02)


def test_calibrate_says_when_the_prior_holds_a_scale_its_counts_barely_support(tmp_path: Path) -> None:
    """Through the real CLI: optical counts of 12-15 cars on scenes that read 0, 0.52 and 0 cars. The JSON
    carries the scale the counts alone give beside the held one, and stderr says why they differ; radar
    counts that agree with their scenes get no such note."""
    from tests.cli_helpers import project, railwatch

    proj = project(tmp_path, aois=("sinuiju-dandong",))
    (proj / "var").mkdir()
    store = Store(f"sqlite:///{proj / 'var' / 'railwatch.db'}")
    days = [T0 + timedelta(days=5 * i) for i in range(12)]
    with store.session() as s:
        for i, t in enumerate(days):
            for sensor, raw, hours in ((S2, (0.0, 0.52, 0.0)[i % 3], 2), (S1, 14.0 + i % 3, 21)):
                store.save_observation(s, Observation(
                    "sinuiju-dandong", sensor, t + timedelta(hours=hours), "ok", estimated_cars=raw,
                    estimated_cars_low=raw / 2, estimated_cars_high=raw * 2 + 1, clear_fraction=1.0,
                    geometry_key="optical" if sensor == S2 else "descending:61",
                    metrics={"raw_cars": raw, "raw_cars_sd": 1.0}, detector_version="test"))
    (proj / "counts.csv").write_text(
        "acquired,cars\n" + "".join(f"{days[i].date().isoformat()},{c}\n" for i, c in ((0, 12), (1, 14), (2, 15))),
        encoding="utf-8")
    res = railwatch("calibrate", "--aoi", "sinuiju-dandong", "counts.csv", "--format", "json", cwd=proj)
    assert res.code == 0, res.err
    sensors = res.json()["sensors"]
    optical, radar = sensors[S2], sensors[S1]
    assert optical["counts_scale"] == pytest.approx(SCALE_RANGE[1]) and 1.0 < optical["scale"] < 5.0
    assert radar["counts_scale"] == pytest.approx(radar["scale"], rel=0.05)
    assert f"{S2}: the counts alone would set a scale of 20" in res.err
    assert S1 not in res.err
