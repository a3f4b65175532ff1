"""Laws of the pure detector and alert rule (arrays and observations in, decisions out)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from railwatch.baseline import CONFIRMED, ESCALATED, OPENED, RESOLVED, OpenAlert, compute_baseline, decide
from railwatch.config import DetectorSettings
from railwatch.detect.change import mean_reference, optical_change, radar_change
from railwatch.detect.estimate import estimate_cars
from railwatch.detect.quality import optical_quality
from railwatch.domain import S1, S2, Observation

CFG = DetectorSettings()
T0 = datetime(2024, 1, 1, 2, tzinfo=UTC)


def _scene(seed: int, shape: tuple[int, int] = (60, 80)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {b: (0.05 + 0.2 * rng.random(shape)).astype(np.float32) for b in ("B02", "B03", "B04", "B08")}


def _masks(shape: tuple[int, int] = (60, 80)) -> tuple[np.ndarray, np.ndarray]:
    track = np.zeros(shape, bool)
    track[28:31, 5:75] = True
    stable = np.ones(shape, bool)
    stable[24:35, :] = False
    return track, stable


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000))
def test_identical_optical_scenes_give_zero_activity(seed: int) -> None:
    scene = _scene(seed)
    track, stable = _masks()
    ch = optical_change(scene, scene, track, stable)
    assert ch.n_occupied == 0
    assert ch.activity == 0.0


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000))
def test_identical_radar_scenes_give_zero_activity(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scene = {b: rng.gamma(4.4, 0.05 / 4.4, (60, 80)).astype(np.float32) for b in ("VV", "VH")}
    track, stable = _masks()
    ch = radar_change(scene, scene, 4, track, stable)
    assert ch.n_occupied == 0 and ch.activity == 0.0


def test_darker_and_brighter_cars_both_count() -> None:
    ref = _scene(1)
    track, stable = _masks()
    rng = np.random.default_rng(2)
    cur = {b: v + rng.normal(0, 0.003, v.shape).astype(np.float32) for b, v in ref.items()}
    dark = {b: v.copy() for b, v in cur.items()}
    bright = {b: v.copy() for b, v in cur.items()}
    for b in dark:
        dark[b][29, 10:40] = 0.02
        bright[b][29, 10:40] = 0.6
    for scene in (dark, bright):
        ch = optical_change(scene, ref, track, stable)
        assert 25 <= ch.n_occupied <= 40


def test_uniform_haze_and_gain_are_normalised_away() -> None:
    ref = _scene(3)
    track, stable = _masks()
    hazy = {b: (1.1 * v + 0.05).astype(np.float32) for b, v in ref.items()}
    ch = optical_change(hazy, ref, track, stable)
    assert ch.n_occupied <= 2


def test_radar_metal_is_detected_and_orbit_gain_is_not() -> None:
    rng = np.random.default_rng(5)
    shape = (60, 80)
    refs = [{b: rng.gamma(4.4, 0.05 / 4.4, shape).astype(np.float32) for b in ("VV", "VH")} for _ in range(6)]
    ref = mean_reference(refs, ("VV", "VH"))
    track, stable = _masks()
    brighter_orbit = {b: (3.0 * rng.gamma(4.4, 0.05 / 4.4, shape)).astype(np.float32) for b in ("VV", "VH")}
    quiet = radar_change(brighter_orbit, ref, 6, track, stable)
    assert quiet.n_occupied < 0.06 * quiet.n_track
    cars = {b: v.copy() for b, v in brighter_orbit.items()}
    for b in cars:
        cars[b][28:31, 10:50] *= 20.0
    busy = radar_change(cars, ref, 6, track, stable)
    assert busy.n_occupied >= 100


def test_cloud_and_nodata_quality() -> None:
    track, _ = _masks()
    bands = {b: np.full(track.shape, 1000, np.uint16) for b in ("B02", "B03", "B04", "B08")}
    scl = np.full(track.shape, 5, np.uint8)
    scl[:, :60] = 9
    q = optical_quality(bands | {"SCL": scl}, track, nodata_fraction=0.5, snow_fraction=0.3, cloudy_fraction=0.5,
                        partial_fraction=0.05)
    assert q.status == "cloudy"
    scl[:, :60] = 0
    q = optical_quality(bands | {"SCL": scl}, track, nodata_fraction=0.5, snow_fraction=0.3, cloudy_fraction=0.5,
                        partial_fraction=0.05)
    assert q.status == "nodata"
    scl[:, :] = 5
    scl[:, :10] = 8
    q = optical_quality(bands | {"SCL": scl}, track, nodata_fraction=0.5, snow_fraction=0.3, cloudy_fraction=0.5,
                        partial_fraction=0.05)
    assert q.status == "partial" and abs(q.clear_fraction - 65 / 70) < 1e-6


def test_estimate_interval_contains_estimate_and_scales() -> None:
    e = estimate_cars(n_occupied=60, expected_false=2, n_usable=400, n_track=400, metres_per_pixel=10,
                      car_length_m=15)
    assert e.low < e.cars < e.high
    assert abs(e.cars - 58 * 10 / 15) < 1e-9
    half = estimate_cars(n_occupied=30, expected_false=1, n_usable=200, n_track=400, metres_per_pixel=10,
                         car_length_m=15, scale=2.0)
    assert abs(half.cars - 2 * 29 * 2 * 10 / 15) < 1e-9


def _obs(day: int, cars: float | None, status: str = "ok", sensor: str = S2, **metrics: object) -> Observation:
    return Observation("a", sensor, T0 + timedelta(days=day), status, estimated_cars=cars,
                       estimated_cars_low=None if cars is None else cars * 0.8,
                       estimated_cars_high=None if cars is None else cars * 1.2,
                       geometry_key="optical" if sensor == S2 else "asc:1", metrics=dict(metrics))


HISTORY = [_obs(i * 5, 12 + (i % 3)) for i in range(10)]


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["cloudy", "snow", "nodata", "haze", "unreadable", "failed"]), st.floats(0, 1000))
def test_unusable_scenes_never_open_alerts(status: str, cars: float) -> None:
    obs = _obs(60, None, status)
    d = decide(obs, compute_baseline(HISTORY), None, CFG)
    assert d.events == ()


def test_alert_lifecycle() -> None:
    b = compute_baseline(HISTORY)
    assert b is not None and 12 <= b.level <= 14
    d = decide(_obs(60, 70), b, None, CFG)
    assert d.events == (OPENED,)
    alert = OpenAlert(S2, T0 + timedelta(days=60), 70, 70, "provisional", False)
    d = decide(_obs(62, 72, sensor=S1), b, alert, CFG)
    assert CONFIRMED in d.events
    alert = OpenAlert(S2, T0 + timedelta(days=60), 70, 72, "confirmed", False)
    assert decide(_obs(65, 110), b, alert, CFG).events == (ESCALATED,)
    d1 = decide(_obs(70, 12), b, alert, CFG)
    assert d1.events == () and d1.quiet_count == 1
    alert = OpenAlert(S2, T0 + timedelta(days=60), 70, 110, "confirmed", True, quiet_count=1)
    assert decide(_obs(75, 13), b, alert, CFG).events == (RESOLVED,)


def test_no_alert_before_min_history_and_baseline_ignores_surges() -> None:
    short = compute_baseline(HISTORY[:3])
    assert decide(_obs(60, 90), short, None, CFG).events == ()
    with_surge = [*HISTORY, *(_obs(51 + i, 90, elevated=True) for i in range(5))]
    b = compute_baseline(with_surge)
    assert b is not None and b.level < 15
