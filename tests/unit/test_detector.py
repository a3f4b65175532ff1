"""Laws of the pure detector and alert rule (arrays and observations in, decisions out)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from railwatch.baseline import (
    CONFIRMED,
    ESCALATED,
    OPENED,
    RESOLVED,
    OpenAlert,
    alert_threshold,
    compute_baseline,
    decide,
    replay,
    single_scene_threshold,
)
from railwatch.config import DetectorSettings
from railwatch.detect.change import mean_reference, optical_change, optical_reference, radar_change
from railwatch.detect.estimate import estimate_cars
from railwatch.detect.quality import optical_quality
from railwatch.detect.zone import Zone
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


def test_change_on_a_zone_equals_the_change_on_the_whole_grid() -> None:
    """The pipeline's pixel vectors over the track's zone read exactly what the whole grid holds there."""
    from scipy import ndimage

    track, stable = _masks()
    track[40:42, 70:80] = True  # a track at the grid's edge: windows clipped as on the grid
    zone_mask = ndimage.binary_dilation(track, iterations=3) | (stable & (np.arange(80)[None, :] % 7 == 0))
    zone = Zone.build(zone_mask, track)
    ref, cur = _scene(1), _scene(1)
    rng = np.random.default_rng(5)
    for b in cur:
        cur[b] = cur[b] * 1.02 + rng.normal(0, 0.002, cur[b].shape).astype(np.float32)
        cur[b][29, 20:40] = 0.5  # a consist
    ref = {b: np.where(zone_mask, v, np.nan).astype(np.float32) for b, v in ref.items()}  # built on the zone only
    on_grid = optical_change(cur, ref, track, stable, neighbours=track)
    g = zone.gather
    on_zone = optical_change({b: g(v) for b, v in cur.items()}, {b: g(v) for b, v in ref.items()}, g(track),
                             g(stable), zone=zone, neighbours=g(track)).on_grid(zone)
    assert on_grid.metrics == on_zone.metrics and on_zone.n_occupied > 10
    assert np.array_equal(on_grid.occupied, on_zone.occupied)
    np.testing.assert_allclose(on_grid.magnitude, on_zone.magnitude, rtol=1e-5, atol=1e-5)
    radar = {b: rng.gamma(4.4, 0.05 / 4.4, (60, 80)).astype(np.float32) for b in ("VV", "VH")}
    lit = {b: np.where(track & (np.arange(80)[None, :] < 30), v * 8, v).astype(np.float32) for b, v in radar.items()}
    on_grid = radar_change(lit, radar, 4, track, stable)
    on_zone = radar_change({b: g(v) for b, v in lit.items()}, {b: g(v) for b, v in radar.items()}, 4, g(track),
                           g(stable), zone=zone).on_grid(zone)
    assert on_zone.n_occupied > 10 and np.array_equal(on_grid.occupied, on_zone.occupied)
    assert {k: v for k, v in on_grid.metrics.items() if k != "stable_ratio"} == \
        {k: v for k, v in on_zone.metrics.items() if k != "stable_ratio"}


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
    # 5 cloudy track columns plus the 5-pixel cloud-edge buffer beyond them
    assert q.status == "partial" and abs(q.clear_fraction - 60 / 70) < 1e-6


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
    d = decide(_obs(60, 70, sensor=S1), b, None, CFG)
    assert d.events == (OPENED,)
    alert = OpenAlert(S1, T0 + timedelta(days=60), 70, 70, "provisional", False)
    d = decide(_obs(62, 72), b, alert, CFG)
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


def test_one_elevated_scene_waits_for_a_second_and_a_far_one_opens_alone() -> None:
    """Persistence: a scene just above the threshold opens nothing alone; the next usable scene (of either
    sensor) above its own threshold opens the alert; a scene far above it opens at once."""
    b = compute_baseline(HISTORY)
    assert b is not None
    thr, far = alert_threshold(b, CFG), single_scene_threshold(b, CFG)
    assert thr < far
    just = (thr + far) / 2
    d = decide(_obs(60, just), b, None, CFG)
    assert d.elevated and d.events == ()
    assert decide(_obs(60, far + 1, sensor=S1), b, None, CFG).events == (OPENED,)
    # An optical scene never opens alone, however far above (its count misses or inflates car types) ...
    assert decide(_obs(60, far + 1), b, None, CFG).events == ()
    # ... nor as the second scene in a row when cloud or shadow is on (the grown mask of) the track.
    prior = replace(b, prior_elevated=True)
    assert decide(_obs(60, just), prior, None, CFG).events == (OPENED,)
    cloud_edge = replace(_obs(60, just), clear_fraction=0.95)
    assert decide(cloud_edge, prior, None, CFG).events == ()
    assert decide(replace(cloud_edge, collection=S1, geometry_key="asc:1"), prior, None, CFG).events == (OPENED,)
    # Through the replay (which gives the rule the scenes just before): S2 then S1 two days later.
    rep = replay([*HISTORY, _obs(60, just), *(_obs(60 + i, 13.0, sensor=S1) for i in (-30, -24, -18, -12, -6, -5, -4)),
                  _obs(62, just, sensor=S1)], CFG)
    assert [e.opened_acquired for e in rep.episodes] == [T0 + timedelta(days=62)]
    # A lone elevated scene followed by an ordinary one opens nothing.
    rep = replay([*HISTORY, _obs(60, just), _obs(65, 13.0), _obs(70, just)], CFG)
    assert rep.episodes == []
    # A scene that could not be judged (its geometry still building its baseline) between two elevated
    # scenes does not break the run: the second elevated scene opens the alert.
    radar = [_obs(60 + i, 13.0, sensor=S1) for i in (-30, -24, -18, -12, -6, -5, -4)]
    fresh = Observation("a", S1, T0 + timedelta(days=61), "ok", estimated_cars=13.0, geometry_key="desc:9")
    rep = replay([*HISTORY, *radar, _obs(60, just), fresh, _obs(62, just, sensor=S1)], CFG)
    assert [e.opened_acquired for e in rep.episodes] == [T0 + timedelta(days=62)]


def test_the_absolute_floor_lets_a_medium_surge_on_a_quiet_line_through() -> None:
    """A usual level of 8 cars: 2.5 x (20 cars) is above the threshold (the old 15-car floor made it 23)."""
    quiet = [_obs(i * 5, 8 + (i % 3) - 1) for i in range(10)]
    b = compute_baseline(quiet)
    assert b is not None
    assert alert_threshold(b, CFG) < 20.0


# --- robustness laws of the optical and radar tests -------------------------------------------------
def _field(shape: tuple[int, int], seed: int, sigma: float) -> np.ndarray:
    from scipy import ndimage

    f = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)
    return ((f - f.mean()) / f.std()).astype(np.float32)


def _landscape(seed: int, shape: tuple[int, int] = (80, 120)) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Fields of varying spectra, a gravel track bed across them, and the track pixels on it."""
    rng = np.random.default_rng(seed)
    veg = np.clip(0.5 + 0.5 * _field(shape, seed, 6), 0, 1)
    soil, green = np.array([0.06, 0.085, 0.115, 0.18]), np.array([0.03, 0.07, 0.035, 0.42])
    cube = soil[None, None] * (1 - veg[..., None]) + green[None, None] * veg[..., None]
    track = np.zeros(shape, bool)
    track[38:41, 5:115] = True
    cube[36:43, :] = [0.14, 0.16, 0.18, 0.22]  # embankment gravel
    cube[track] = [0.12, 0.135, 0.155, 0.18]  # ballast
    cube *= 1 + 0.02 * rng.standard_normal(shape)[..., None]
    bands = {b: cube[..., i].astype(np.float32) for i, b in enumerate(("B02", "B03", "B04", "B08"))}
    stable = np.ones(shape, bool)
    stable[34:45, :] = False
    return bands, track, stable


def _noisy(bands: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {b: (v + rng.normal(0, 0.002, v.shape)).astype(np.float32) for b, v in bands.items()}


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.15, 0.7))
def test_haze_that_scl_misses_is_not_rolling_stock(seed: int, strength: float) -> None:
    """A smooth, bluish haze (path radiance falling with wavelength, some contrast loss) over part of
    the scene: the occupied track pixels stay at the false-alarm level."""
    bands, track, stable = _landscape(seed)
    ref = _noisy(bands, seed + 1)
    shape = track.shape
    ramp = 1 / (1 + np.exp(-(np.arange(shape[1]) - shape[1] * 0.5) / 6.0))[None, :]
    h = (strength * ramp * (1 + 0.2 * _field(shape, seed + 2, 15))).astype(np.float32)
    spectrum = {"B02": 0.10, "B03": 0.08, "B04": 0.06, "B08": 0.035}
    hazy = {b: v * (1 - 0.3 * h) + h * spectrum[b] for b, v in _noisy(bands, seed + 3).items()}
    ch = optical_change(hazy, ref, track, stable)
    assert ch.n_occupied <= 2 * ch.expected_false + 3


def test_vegetation_change_beside_the_track_is_not_rolling_stock() -> None:
    """Fields green up on both sides and bleed into the track's edge pixels: not cars."""
    bands, track, stable = _landscape(11)
    ref = _noisy(bands, 12)
    cur = _noisy(bands, 13)
    fields = np.ones(track.shape, bool)
    fields[36:43, :] = False
    cur["B04"] = np.where(fields, cur["B04"] - 0.06, cur["B04"])
    cur["B08"] = np.where(fields, cur["B08"] + 0.15, cur["B08"])
    edge = np.zeros(track.shape, bool)
    edge[[38, 40], :] = True  # the outer track rows mix 10 % of the field in
    cur["B04"] = np.where(edge & track, cur["B04"] - 0.006, cur["B04"])
    cur["B08"] = np.where(edge & track, cur["B08"] + 0.015, cur["B08"])
    ch = optical_change(cur, ref, track, stable)
    assert ch.n_occupied <= 2 * ch.expected_false + 3


def test_subpixel_misregistration_is_not_rolling_stock() -> None:
    """The whole scene shifted by 0.4 pixel (Sentinel-2 multi-temporal co-registration is a few metres)."""
    from scipy import ndimage

    bands, track, stable = _landscape(21)
    ref = _noisy(bands, 22)
    shifted = {b: ndimage.shift(v, (0.4, -0.3), order=1, mode="nearest") for b, v in bands.items()}
    ch = optical_change(_noisy(shifted, 23), ref, track, stable)
    assert ch.n_occupied <= 2 * ch.expected_false + 3


def test_cars_darker_and_brighter_than_ballast_on_a_real_bed() -> None:
    bands, track, stable = _landscape(31)
    ref = _noisy(bands, 32)
    cur = _noisy(bands, 33)
    tank = np.array([0.035, 0.036, 0.037, 0.042])
    white = np.array([0.44, 0.45, 0.45, 0.46])
    for i, b in enumerate(("B02", "B03", "B04", "B08")):
        # a quarter of each pixel covered by a 3 m wide car, 25 pixels of each kind
        cur[b][39, 10:35] = 0.75 * cur[b][39, 10:35] + 0.25 * tank[i]
        cur[b][39, 60:85] = 0.75 * cur[b][39, 60:85] + 0.25 * white[i]
    ch = optical_change(cur, ref, track, stable)
    assert ch.occupied[39, 10:35].sum() >= 22 and ch.occupied[39, 60:85].sum() >= 22
    assert ch.n_occupied <= 50 + 2 * ch.expected_false + 3


def test_a_car_gone_since_one_of_three_references_is_no_change_but_two_references_need_a_third() -> None:
    """A tank car stood in one reference scene and has left. The median of three scenes drops it; the
    median of two is their mean, and the departed car counts like an arriving one (the optical test has
    no sign), which is why an optical scene waits for three earlier clear scenes (analysis.min_reference)."""
    from railwatch.analysis import MIN_OPTICAL_REFERENCE, min_reference

    bands, track, stable = _landscape(41)
    refs = [_noisy(bands, 42 + k) for k in range(3)]
    tank = np.array([0.035, 0.036, 0.037, 0.042])
    for i, b in enumerate(("B02", "B03", "B04", "B08")):
        refs[0][b][38:41, 10:40] = tank[i]
    cur = _noisy(bands, 50)
    clear = [np.ones(track.shape, bool)] * 3
    three = optical_change(cur, optical_reference(cur, refs, clear, stable), track, stable)
    assert three.occupied[38:41, 10:40].sum() <= 2
    assert three.n_occupied <= 2 * three.expected_false + 3
    two = optical_change(cur, optical_reference(cur, refs[:2], clear[:2], stable), track, stable)
    assert two.occupied[38:41, 10:40].sum() >= 80  # the ghost of the departed car
    assert min_reference(S2, 6) == MIN_OPTICAL_REFERENCE == 3
    assert min_reference(S1, 6) == 2
    assert min_reference(S2, 2) == 2  # never more than the reference is ever given


def test_a_change_of_radar_orbit_alone_opens_no_alert() -> None:
    """A new relative orbit sees the same yard 3x brighter: it builds its own baseline first."""
    from railwatch.baseline import replay

    asc = [Observation("a", S1, T0 + timedelta(days=12 * i), "ok", estimated_cars=14 + (i % 3), clear_fraction=1.0,
                       geometry_key="ascending:134") for i in range(12)]
    desc = [Observation("a", S1, T0 + timedelta(days=12 * i + 5), "ok", estimated_cars=3 * (14 + (i % 3)),
                        clear_fraction=1.0, geometry_key="descending:61") for i in range(8, 14)]
    rep = replay([*asc, *desc], CFG)
    assert rep.episodes == []
    assert all(not o.metrics["elevated"] for o in rep.observations)


def _radar(day: int, cars: float, geometry: str) -> Observation:
    return Observation("a", S1, T0 + timedelta(days=day), "ok", estimated_cars=cars, clear_fraction=1.0,
                       geometry_key=geometry)


def test_a_radar_geometry_short_of_history_borrows_its_sensors_baseline_when_it_reads_at_that_level() -> None:
    """After a winter of wet-snow scenes one geometry has three usable scenes, the other twelve. A surge
    seen by both: without the fallback the short geometry cannot judge, its elevated scenes fall out of
    the two-in-a-row test and the other geometry's lone elevated scenes (12 days apart) open nothing;
    with it, the second elevated scene in a row opens the alert."""
    from railwatch.baseline import history_for

    asc = [_radar(12 * i, 14 + (i % 3), "ascending:134") for i in range(12)]
    desc = [_radar(12 * i + 6, 13 + (i % 3), "descending:61") for i in range(9, 12)]
    surge = [_radar(144, 36.0, "ascending:134"), _radar(150, 37.0, "descending:61"), _radar(156, 38.0, "ascending:134")]
    off = CFG.model_copy(update={"geometry_baseline_fallback": False})
    assert len(history_for(surge[1], [*asc, *desc], off)) == 3
    assert len(history_for(surge[1], [*asc, *desc], CFG)) == 3 + 9  # and the other geometry's 9 of the 120 days
    assert replay([*asc, *desc, *surge], off).episodes == []
    opened = replay([*asc, *desc, *surge], CFG).episodes
    assert [e.opened_acquired for e in opened] == [T0 + timedelta(days=150)]
    # Two scenes of its own are not enough to tell its level: no borrowing yet.
    assert len(history_for(surge[1], [*asc, *desc[1:]], CFG)) == 2


def test_a_new_radar_orbit_reading_another_level_builds_its_own_baseline_first() -> None:
    """Three scenes of a new geometry at 3x the sensor's level (no calibration factor for it yet) do not
    borrow: a change of orbit alone opens no alert, the fallback on or off."""
    from railwatch.baseline import history_for

    asc = [_radar(12 * i, 14 + (i % 3), "ascending:134") for i in range(12)]
    desc = [_radar(12 * i + 6, 3 * (14 + (i % 3)), "descending:61") for i in range(9, 14)]
    assert len(history_for(desc[-1], [*asc, *desc[:-1]], CFG)) == 4
    for cfg in (CFG, CFG.model_copy(update={"geometry_baseline_fallback": False})):
        rep = replay([*asc, *desc], cfg)
        assert rep.episodes == [] and not any(o.metrics["elevated"] for o in rep.observations)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["ok", "cloudy", "snow", "nodata", "haze", "partial"]),
                          st.floats(0, 500), st.floats(0, 1)), min_size=1, max_size=40))
def test_only_usable_scenes_that_saw_the_track_open_alerts(scenes: list[tuple[str, float, float]]) -> None:
    """Whatever the history: an alert opens only on an ok/partial scene that saw enough of the track."""
    from railwatch.baseline import replay

    history = [_obs(i * 5, 12 + (i % 3)) for i in range(8)]
    later = [Observation("a", S2, T0 + timedelta(days=60 + 5 * i), status,
                         estimated_cars=cars if status in ("ok", "partial") else None,
                         clear_fraction=clear, geometry_key="optical") for i, (status, cars, clear) in enumerate(scenes)]
    rep = replay([*history, *later], CFG)
    for ep in rep.episodes:
        assert ep.opening.status in ("ok", "partial")
        assert (ep.opening.clear_fraction or 0) >= CFG.open_min_clear


def test_replay_matches_the_live_rule_and_processing_twice_opens_once() -> None:
    from railwatch.baseline import replay

    history = [*HISTORY, _obs(60, 70), _obs(62, 72, sensor=S1), _obs(65, 110), _obs(70, 12), _obs(75, 13)]
    history = [Observation(o.aoi_id, o.collection, o.acquired, o.status, estimated_cars=o.estimated_cars,
                           clear_fraction=1.0, geometry_key="optical") for o in history]
    cfg = CFG.model_copy(update={"optical_opens_alone": True})  # the first optical scene opens it alone
    rep = replay(history, cfg)
    assert len(rep.episodes) == 1
    ep = rep.episodes[0]
    # the radar pass has no baseline of its own yet; the second optical pass confirms and escalates
    assert [e for e, _ in ep.events] == [OPENED, CONFIRMED, ESCALATED, RESOLVED]
    assert ep.peak_cars == 110 and ep.state == "resolved"
    # the same scenes replayed again (a scene processed twice) give the same single alert
    again = replay([*history, *history[-3:]], cfg)
    assert len(again.episodes) == 1


def test_thin_cirrus_and_dense_haze_flagged_by_scl_make_a_haze_scene() -> None:
    track, _ = _masks()
    bands = {b: np.full(track.shape, 1000, np.uint16) for b in ("B02", "B03", "B04", "B08")}
    scl = np.full(track.shape, 5, np.uint8)
    scl[:, :50] = 10  # thin cirrus (SCL also puts the dense part of haze there)
    q = optical_quality(bands | {"SCL": scl}, track, nodata_fraction=0.5, snow_fraction=0.3, cloudy_fraction=0.5,
                        partial_fraction=0.05)
    assert q.status == "haze" and "cirrus or haze" in q.reason
    scl[:, :50] = 9
    q = optical_quality(bands | {"SCL": scl}, track, nodata_fraction=0.5, snow_fraction=0.3, cloudy_fraction=0.5,
                        partial_fraction=0.05)
    assert q.status == "cloudy"


def _radar_pair(seed: int, shape: tuple[int, int], n_ref: int = 6, looks: float = 4.4) -> tuple[np.ndarray, np.ndarray]:
    """VV + VH of a speckled scene and of the mean of ``n_ref`` reference scenes (flat ground, sigma0 0.05)."""
    rng = np.random.default_rng(seed)
    cur = rng.gamma(looks, 0.05 / looks, shape).astype(np.float32)
    ref = rng.gamma(looks * n_ref, 0.05 / (looks * n_ref), shape).astype(np.float32)
    return cur, ref


def _region_test_masks() -> np.ndarray:
    """Single tracks (2 pixels wide, straight and diagonal) and a yard of parallel tracks (a 6-pixel band)."""
    track = np.zeros((120, 300), bool)
    track[10:12, 5:295] = True
    track[30, 5:295] = True
    yy, xx = np.mgrid[0:120, 0:300]
    track |= (np.abs(yy - 40 - (xx - 5) * 0.5) <= 0.6) & (xx < 150)
    track[90:96, 20:280] = True
    return track


def test_radar_region_test_holds_its_false_regions_on_pure_speckle() -> None:
    """Under the speckle the test assumes (m pixels carry m / 2 looks of ENL 4.4: per-pixel Gamma of shape
    2.2), about RADAR_REGION_FALSE_REGIONS false regions per 1 000 track pixels per scene and the false
    pixels RADAR_REGION_FALSE_PIXELS documents; white speckle of ENL 4.4 (more looks per pixel) gives fewer."""
    from railwatch.detect.change import (
        RADAR_REGION_FALSE_PIXELS,
        RADAR_REGION_FALSE_REGIONS,
        S1_ENL,
        S1_SPECKLE_CORRELATION,
        radar_region_threshold,
        radar_regions,
    )

    track = _region_test_masks()
    flat = track.reshape(-1)
    win = Zone.whole(track).windows(np.flatnonzero(flat))
    reps, n_ref = 60, 6
    for looks, low, high in ((S1_ENL / S1_SPECKLE_CORRELATION, 0.5, 1.7), (S1_ENL, 0.0, 0.4)):
        regions = pixels = 0.0
        for seed in range(reps):
            cur, ref = _radar_pair(seed, track.shape, n_ref, looks)
            found = radar_regions(cur.reshape(-1), ref.reshape(-1), n_ref, flat, win)
            passed = found.z > radar_region_threshold(found.size, n_ref)
            regions += np.count_nonzero(passed)
            pixels += found.size[passed].sum()
        per_1000 = regions / reps / flat.sum() * 1000
        assert low * RADAR_REGION_FALSE_REGIONS <= per_1000 <= high * RADAR_REGION_FALSE_REGIONS
        if looks < S1_ENL:
            assert pixels / reps / flat.sum() == pytest.approx(RADAR_REGION_FALSE_PIXELS[n_ref], rel=0.5)
    cur, ref = _radar_pair(0, track.shape)
    ch = radar_change({"VV": cur, "VH": cur}, {"VV": ref, "VH": ref}, n_ref, track, ~track, regions=True)
    assert ch.expected_false == 0.0 and ch.n_occupied <= 0.1 * ch.n_track


def test_radar_regions_are_8_connected_and_judged_whole() -> None:
    """Two bright pixels that touch only diagonally form one region (8-connected)."""
    from railwatch.detect.change import radar_regions

    track = np.zeros((20, 200), bool)
    track[9:11, 5:195] = True
    flat = track.reshape(-1)
    win = Zone.whole(track).windows(np.flatnonzero(flat))
    cur = np.ones(track.shape, np.float32)
    ref = np.ones(track.shape, np.float32)
    cur[9, 20] = cur[10, 21] = 3.0  # diagonal neighbours
    found = radar_regions(cur.reshape(-1), ref.reshape(-1), 6, flat, win)
    assert found.size.size == 1 and np.count_nonzero(found.candidate) >= 2


def test_radar_region_count_of_a_consist_does_not_grow_with_its_brightness() -> None:
    """A consist of 20 pixels on a 2-pixel track (40 pixels), blurred by the 20 m resolution, on Gamma
    speckle: over ten draws the region test counts it within a few pixels of its length whether it is 3
    or 100 times the ballast (the 5 x 5 window test's count grows by about 10 pixels over that range)."""
    from scipy import ndimage

    shape = (40, 120)
    track = np.zeros(shape, bool)
    track[19:21, 5:115] = True
    medians = []
    for contrast in (3.0, 10.0, 100.0):
        counts = []
        for seed in range(10):
            rng = np.random.default_rng(seed)
            ref = np.mean([rng.gamma(4.4, 0.05 / 4.4, shape) for _ in range(6)], axis=0).astype(np.float32)
            power = np.full(shape, 0.05, np.float32)
            power[19:21, 40:60] *= contrast
            power = ndimage.gaussian_filter(power, 0.8)
            cur = (power * rng.gamma(4.4, 1 / 4.4, shape)).astype(np.float32)
            ch = radar_change({"VV": cur, "VH": cur}, {"VV": ref, "VH": ref}, 6, track, ~track, regions=True)
            counts.append(ch.n_occupied - ch.expected_false)
        medians.append(float(np.median(counts)))
    assert all(36 <= m <= 54 for m in medians), medians
    assert medians[-1] - medians[0] <= 8, medians


def test_radar_region_test_is_off_by_default_and_finds_no_change_in_identical_scenes() -> None:
    from railwatch.detect.change import RADAR_REGION_TEST

    rng = np.random.default_rng(3)
    scene = {b: rng.gamma(4.4, 0.05 / 4.4, (60, 80)).astype(np.float32) for b in ("VV", "VH")}
    track, stable = _masks()
    assert RADAR_REGION_TEST is False
    assert radar_change(scene, scene, 4, track, stable).metrics.keys() == \
        radar_change(scene, scene, 4, track, stable, regions=False).metrics.keys()
    ch = radar_change(scene, scene, 4, track, stable, regions=True)
    assert ch.n_occupied == 0 and ch.activity == 0.0
