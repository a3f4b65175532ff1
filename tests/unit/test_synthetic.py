"""The scene simulator: archive layout, truth, physics of the rendering, determinism and speed."""

from __future__ import annotations

import csv
import hashlib
import itertools
import math
import re
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from railwatch.domain import S1, S2, Aoi
from railwatch.geo import aoi_grid
from railwatch.imagery import FilesProvider
from railwatch.imagery import synthetic as sy
from railwatch.imagery.archive import read_scene

START = date(2024, 1, 1)
DAYS = 120


def make_aoi(aoi_id: str = "tumangang-test", lon: float = 130.62, lat: float = 42.42,
             width_km: float = 2.0, height_km: float = 1.5, with_yard: bool = False) -> Aoi:
    """A yard near Tumangang: three parallel 1 km sidings 5 m apart and a through line.

    ``with_yard`` adds a yard polygon around the middle 600 m of the sidings.
    """
    dlon = 1.0 / (111.32 * math.cos(math.radians(lat)))  # degrees per km
    dlat = 1.0 / 111.1
    w, h = width_km / 2 * dlon, height_km / 2 * dlat
    poly = {"type": "Polygon", "coordinates": [[[lon - w, lat - h], [lon + w, lat - h], [lon + w, lat + h],
                                                [lon - w, lat + h], [lon - w, lat - h]]]}
    # As railwatch.aoi.load_aoi hands them over: bare GeoJSON geometries in lon/lat.
    tracks = [{"type": "LineString", "coordinates": [[lon - 0.5 * dlon, lat + (i - 1) * 0.005 * dlat],
                                                     [lon + 0.5 * dlon, lat + (i - 1) * 0.005 * dlat]]}
              for i in range(3)]
    tracks.append({"type": "LineString", "coordinates": [[lon - 1.2 * w, lat - 0.15 * dlat],
                                                         [lon + 1.2 * w, lat - 0.03 * dlat]]})
    yards = ()
    if with_yard:
        yards = ({"type": "Polygon", "coordinates": [[[lon - 0.3 * dlon, lat - 0.02 * dlat], [lon + 0.3 * dlon, lat - 0.02 * dlat],
                                                      [lon + 0.3 * dlon, lat + 0.02 * dlat], [lon - 0.3 * dlon, lat + 0.02 * dlat],
                                                      [lon - 0.3 * dlon, lat - 0.02 * dlat]]]},)
    return Aoi(id=aoi_id, name="Test yard", geometry=poly, tracks=tuple(tracks), yards=yards)


def read_truth(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> sy.SimulationResult:
    """One default 120-day simulation (winter into spring, with the default surge)."""
    out = tmp_path_factory.mktemp("sim")
    return sy.simulate(make_aoi(), out, days=DAYS, seed=11, start=START)


@pytest.fixture(scope="module")
def land() -> sy.Landscape:
    return sy.build_landscape(make_aoi(), seed=3)


SUMMER = sy.DayWeather(temp_c=22.0, precip_mm=0.0, snow_cover=0.0, fresh_snow=0.0, wet_snow=False,
                       frozen=False, soil_moisture=0.4)
WINTER = sy.DayWeather(temp_c=-8.0, precip_mm=0.0, snow_cover=1.0, fresh_snow=0.8, wet_snow=False,
                       frozen=True, soil_moisture=0.3)
NOON = datetime(2024, 7, 10, 1, 47, 31, tzinfo=UTC)


# -- the archive and the truth ------------------------------------------------------------------


def test_truth_csv_has_exactly_the_documented_columns_and_one_row_per_scene(sim: sy.SimulationResult) -> None:
    header = sim.truth_csv.read_text().splitlines()[0]
    assert header == "acquired,sensor,cars,cloud_fraction,snow,surge"
    rows = read_truth(sim.truth_csv)
    assert len(rows) == len(sim.scenes) == sum(sim.scenes_per_sensor.values())
    names = sorted(p.name for p in sim.scenes)
    assert sorted(f"{r['sensor']}_{r['acquired'].replace('-', '').replace(':', '')}.tif" for r in rows) == names
    for r in rows:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["acquired"])
        assert r["sensor"] in (S1, S2)
        assert int(r["cars"]) >= 0
        assert re.fullmatch(r"[01]\.\d{3}", r["cloud_fraction"])
        assert 0.0 <= float(r["cloud_fraction"]) <= 1.0
        assert r["snow"] in ("true", "false")
        assert int(r["surge"]) in (0, 1)
        if r["sensor"] == S1:
            assert r["cloud_fraction"] == "0.000"
    acquired = [r["acquired"] for r in rows]
    assert acquired == sorted(acquired)
    # January-February in the Tumen valley: some scenes with snow, and clouds in some optical scenes.
    assert any(r["snow"] == "true" for r in rows)
    assert any(float(r["cloud_fraction"]) > 0.5 for r in rows if r["sensor"] == S2)
    assert any(float(r["cloud_fraction"]) == 0.0 for r in rows if r["sensor"] == S2)


def test_archive_follows_the_contract_and_the_acquisition_plan(sim: sy.SimulationResult) -> None:
    aoi = make_aoi()
    provider = FilesProvider(sim.folder.parent)
    refs = provider.search(aoi, datetime(2023, 12, 1, tzinfo=UTC), datetime(2024, 6, 1, tzinfo=UTC))
    assert provider.problems == []  # truth.csv and surges.csv are not reported
    assert len(refs) == len(sim.scenes)
    s2 = [r for r in refs if r.collection == S2]
    s1 = [r for r in refs if r.collection == S1]
    assert sim.scenes_per_sensor == {S2: len(s2), S1: len(s1)}
    assert len(s2) == DAYS // 5
    # Sentinel-2 at a fixed time, 10:30 local solar time at 130.62 E = 01:47:31 UTC, every 5 days.
    assert {r.acquired.time().isoformat() for r in s2} == {"01:47:31"}
    assert {(b.acquired - a.acquired).days for a, b in itertools.pairwise(s2)} == {5}
    # Sentinel-1 from two geometries, each every 12 days, tagged in the files.
    assert {(r.orbit_direction, r.relative_orbit) for r in s1} == {("ascending", 134), ("descending", 61)}
    for direction in ("ascending", "descending"):
        times = [r.acquired for r in s1 if r.orbit_direction == direction]
        assert {(b - a) for a, b in itertools.pairwise(times)} == {timedelta(days=12)}
        assert len({t.time() for t in times}) == 1
    assert all(START <= r.acquired.date() < START + timedelta(days=DAYS) for r in refs)
    optical = provider.fetch(aoi, s2[0])
    radar = provider.fetch(aoi, s1[0])
    assert optical.shape == radar.shape
    assert str(optical.crs) == "EPSG:32652"
    assert set(optical.bands) == {"B02", "B03", "B04", "B08", "SCL"}
    assert set(np.unique(optical.bands["SCL"])) <= set(range(12))
    assert radar.tags["ORBIT_DIRECTION"] == s1[0].orbit_direction


def test_default_surge_lies_in_the_last_third_and_not_at_the_end(sim: sy.SimulationResult) -> None:
    with sim.surges_csv.open(newline="") as fh:
        episodes = list(csv.DictReader(fh))
    assert len(episodes) == 1
    ep = episodes[0]
    assert list(ep) == ["episode", "start", "end", "peak_cars"]
    start, end = date.fromisoformat(ep["start"]), date.fromisoformat(ep["end"])
    last = START + timedelta(days=DAYS - 1)
    assert start >= START + timedelta(days=DAYS * 2 // 3)
    assert end <= last - timedelta(days=4)
    assert int(ep["peak_cars"]) >= 3 * sim.usual_cars - 1
    assert sim.episodes[0].start == start


def test_surge_scenes_have_many_more_cars(sim: sy.SimulationResult) -> None:
    rows = read_truth(sim.truth_csv)
    surge = [int(r["cars"]) for r in rows if r["surge"] != "0"]
    usual = [int(r["cars"]) for r in rows if r["surge"] == "0"]
    assert len(surge) >= 3
    assert np.mean(surge) > 2.0 * np.mean(usual)


def test_explicit_surges_reach_their_peak(tmp_path: Path) -> None:
    peak = 80
    specs = [sy.SurgeSpec(START + timedelta(days=20), 40, 8), sy.SurgeSpec(START + timedelta(days=60), peak, 20)]
    res = sy.simulate(make_aoi(), tmp_path, days=100, seed=5, start=START, surges=specs, sensors=(S1,),
                      usual_cars=10)
    rows = read_truth(res.truth_csv)
    by_episode = {n: [int(r["cars"]) for r in rows if int(r["surge"]) == n] for n in (0, 1, 2)}
    assert by_episode[2]
    assert max(by_episode[2]) >= 0.7 * peak
    assert np.mean(by_episode[2]) > 3 * np.mean(by_episode[0])
    assert 5 <= np.mean(by_episode[0]) <= 16
    with res.surges_csv.open() as fh:
        assert fh.read().splitlines() == [
            "episode,start,end,peak_cars",
            "1,2024-01-21,2024-01-28,40",
            "2,2024-03-01,2024-03-20,80",
        ]


def test_quiet_has_no_surge(tmp_path: Path) -> None:
    res = sy.simulate(make_aoi(), tmp_path, days=40, seed=2, start=START, quiet=True, sensors=(S2,))
    assert res.episodes == ()
    assert res.surges_csv.read_text().splitlines() == ["episode,start,end,peak_cars"]
    assert {r["surge"] for r in read_truth(res.truth_csv)} == {"0"}
    with pytest.raises(ValueError, match="quiet"):
        sy.simulate(make_aoi(), tmp_path, days=40, seed=2, start=START, quiet=True,
                    surges=[sy.SurgeSpec(START, 50)])


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    def digest(res: sy.SimulationResult) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(res.folder.iterdir())}

    a = sy.simulate(make_aoi(), tmp_path / "a", days=25, seed=42, start=date(2024, 6, 1))
    b = sy.simulate(make_aoi(), tmp_path / "b", days=25, seed=42, start=date(2024, 6, 1))
    c = sy.simulate(make_aoi(), tmp_path / "c", days=25, seed=43, start=date(2024, 6, 1))
    da, db, dc = digest(a), digest(b), digest(c)
    assert len(da) == len(a.scenes) + 2
    assert da == db
    assert dc["truth.csv"] != da["truth.csv"]
    assert not set(da.items()) & {(k, v) for k, v in dc.items() if k.endswith(".tif")}


def test_rerun_into_the_same_folder_replaces_the_old_simulation(tmp_path: Path) -> None:
    sy.simulate(make_aoi(), tmp_path, days=30, seed=1, start=START, sensors=(S2,))
    res = sy.simulate(make_aoi(), tmp_path, days=10, seed=1, start=START + timedelta(days=40), sensors=(S2,))
    on_disk = sorted(p.name for p in res.folder.glob("*.tif"))
    assert on_disk == sorted(p.name for p in res.scenes)


def test_refuses_to_mix_with_real_scenes(tmp_path: Path) -> None:
    folder = tmp_path / "tumangang-test"
    folder.mkdir()
    (folder / "sentinel-2-l2a_20200101T000000Z.tif").write_bytes(b"real data")
    with pytest.raises(FileExistsError, match="not from a simulation"):
        sy.simulate(make_aoi(), tmp_path, days=10, seed=1, start=START)
    assert (folder / "sentinel-2-l2a_20200101T000000Z.tif").read_bytes() == b"real data"


def test_default_period_ends_today_without_future_scenes(tmp_path: Path) -> None:
    res = sy.simulate(make_aoi(), tmp_path, days=12, seed=4, quiet=True)
    today = datetime.now(UTC).date()
    assert res.end == today
    assert res.start == today - timedelta(days=11)
    times = [datetime.fromisoformat(r["acquired"].replace("Z", "+00:00")) for r in read_truth(res.truth_csv)]
    assert times
    assert max(times) <= datetime.now(UTC)
    assert min(times).date() >= res.start


def test_start_and_end_define_the_period(tmp_path: Path) -> None:
    res = sy.simulate(make_aoi(), tmp_path, days=365, seed=4, start=date(2024, 2, 1), end=date(2024, 2, 10),
                      quiet=True)
    assert (res.start, res.end) == (date(2024, 2, 1), date(2024, 2, 10))
    dates = {datetime.fromisoformat(r["acquired"].replace("Z", "+00:00")).date() for r in read_truth(res.truth_csv)}
    assert dates
    assert min(dates) >= date(2024, 2, 1)
    assert max(dates) <= date(2024, 2, 10)
    with pytest.raises(ValueError, match="before start"):
        sy.simulate(make_aoi(), tmp_path, days=5, seed=4, start=date(2024, 2, 10), end=date(2024, 2, 1))


def test_progress_is_reported(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    res = sy.simulate(make_aoi(), tmp_path, days=15, seed=1, start=START, progress=lambda d, t: seen.append((d, t)))
    n = len(res.scenes)
    assert seen == [(i, n) for i in range(1, n + 1)]


# -- surges, counts ------------------------------------------------------------------------------


def test_surge_spec_parse() -> None:
    assert sy.SurgeSpec.parse("2024-06-01:80") == sy.SurgeSpec(date(2024, 6, 1), 80, 10)
    assert sy.SurgeSpec.parse(" 2024-06-01:80:12 ") == sy.SurgeSpec(date(2024, 6, 1), 80, 12)
    for bad, why in [("2024-06-01", "DATE:CARS"), ("2024-13-01:80", "bad date"), ("2024-06-01:many", "whole"),
                     ("2024-06-01:80:0", "at least 1"), ("2024-06-01:80:5:1", "DATE:CARS")]:
        with pytest.raises(ValueError, match=why):
            sy.SurgeSpec.parse(bad)


def test_surge_outside_the_period_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside the simulated period"):
        sy.simulate(make_aoi(), tmp_path, days=10, seed=1, start=START, surges=[sy.SurgeSpec(date(2023, 1, 1), 50)])


def test_default_surges_last_weeks_and_ordinary_days_stay_below_a_medium_surge() -> None:
    """The truth's premise: surges are build-ups of weeks; ordinary days vary by near-Poisson noise, so
    that over 18 months an ordinary day stays well below a medium surge (2.5 x the usual level)."""
    first, last = date(2024, 1, 1), date(2025, 7, 1)
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    for seed in (1, 2, 3, 4, 5):
        usual = sy.usual_level(seed)
        assert sy.USUAL_RANGE[0] <= usual <= sy.USUAL_RANGE[1]
        episodes = sy._episodes(sy.default_surges(first, last, seed=seed, usual_cars=usual))
        lengths = [(ep.end - ep.start).days + 1 for ep in episodes]
        assert len(lengths) == 2
        assert sy.MEDIUM_SURGE_DAYS[0] <= lengths[0] <= sy.MEDIUM_SURGE_DAYS[1]
        assert sy.LARGE_SURGE_DAYS[0] <= lengths[1] <= sy.LARGE_SURGE_DAYS[1]
        assert episodes[1].end <= last - timedelta(days=4)
        ordinary = np.array([sy.daily_cars(seed, d, usual, episodes) for d in days
                             if not any(ep.contains(d) for ep in episodes)])
        assert np.median(ordinary) == pytest.approx(usual, rel=0.2)
        assert np.percentile(ordinary, 99) < 2.0 * usual
        assert ordinary.var() < 1.6 * ordinary.mean()  # near-Poisson (the weekly and slow swings add a little)


def test_surge_ramps_up_to_its_peak_and_back() -> None:
    ep = sy.SurgeEpisode(1, date(2024, 5, 1), date(2024, 5, 10), 100)
    means = [sy.daily_mean_cars(1, ep.start + timedelta(days=k), 10.0, [ep]) for k in range(10)]
    assert means[0] < 60
    assert means[-1] < 60
    assert max(means) == pytest.approx(100.0)
    peak_at = means.index(max(means))
    assert all(a <= b for a, b in itertools.pairwise(means[: peak_at + 1]))
    last_peak = max(i for i, m in enumerate(means) if m == max(means))
    assert all(a >= b for a, b in itertools.pairwise(means[last_peak:]))
    outside = sy.daily_mean_cars(1, date(2024, 5, 20), 10.0, [ep])
    assert 5 < outside < 20


def test_place_cars_puts_non_overlapping_cars_on_tracks(land: sy.Landscape) -> None:
    from shapely.geometry import Point
    from shapely.ops import unary_union

    cars = sy.place_cars(land, 90, np.random.default_rng(0))
    assert len(cars) == 90
    tracks = unary_union([t.line for t in land.tracks])
    assert max(tracks.distance(Point(c.x, c.y)) for c in cars) < 0.5
    xy = np.array([(c.x, c.y) for c in cars])
    d = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
    np.fill_diagonal(d, np.inf)
    # Neighbours on one track are one car pitch (16 m) apart; parallel tracks are 5 m apart.
    assert d.min() >= 4.9
    assert sy.place_cars(land, 0, np.random.default_rng(0)) == []
    # More cars than the tracks hold: as many as fit, quickly.
    t0 = time.perf_counter()
    full = sy.place_cars(land, 2000, np.random.default_rng(0))
    assert 150 < len(full) < 2000
    assert time.perf_counter() - t0 < 5.0


def test_sidings_are_preferred_for_parking(land: sy.Landscape) -> None:
    sidings = [t for t in land.tracks if t.weight > 2.5]
    assert len(sidings) == 3  # the three parallel tracks; the through line keeps weight 1
    assert sum(t.length for t in sidings) == pytest.approx(3000, rel=0.02)
    on_sidings = 0
    total = 0
    for s in range(20):
        cars = sy.place_cars(land, 30, np.random.default_rng(s))
        total += len(cars)
        on_sidings += sum(1 for c in cars if any(t.line.distance(_pt(c)) < 0.5 for t in sidings))
    share_of_length = sum(t.length for t in sidings) / sum(t.length for t in land.tracks)
    assert on_sidings / total > share_of_length + 0.1


def test_yards_are_preferred_for_parking() -> None:
    land = sy.build_landscape(make_aoi(with_yard=True), seed=3)
    # Each siding is cut into its 600 m inside the yard and the two 200 m ends outside it.
    in_yard = [t for t in land.tracks if abs(t.length - 600) < 30]
    ends = [t for t in land.tracks if abs(t.length - 200) < 30]
    assert len(in_yard) == 3
    assert len(ends) == 6
    assert all(t.weight == 4.0 for t in in_yard)
    assert all(t.weight == pytest.approx(3.0) for t in ends)  # still sidings


def _pt(c: sy.Car) -> object:
    from shapely.geometry import Point

    return Point(c.x, c.y)


# -- optical physics -----------------------------------------------------------------------------


def _render(land: sy.Landscape, cars: list[sy.Car], sky: sy.Sky, weather: sy.DayWeather = SUMMER,
            when: datetime = NOON) -> sy.OpticalScene:
    return sy.render_optical(land, when, weather, cars, np.random.default_rng(1), sky=sky)


def test_cars_change_reflectance_only_on_track_pixels(land: sy.Landscape) -> None:
    cars = sy.place_cars(land, 60, np.random.default_rng(5))
    with_cars = _render(land, cars, sy.Sky.clear())
    empty = _render(land, [], sy.Sky.clear())
    near_track = ndimage.binary_dilation(land.track_mask, iterations=2)
    for band in ("B02", "B03", "B04", "B08"):
        diff = with_cars.bands[band].astype(int) - empty.bands[band].astype(int)
        assert (diff[land.track_mask] != 0).mean() > 0.2
        assert np.abs(diff).max() > 150  # > 0.015 reflectance
        assert (diff[~near_track] == 0).all()


@pytest.mark.parametrize(("kind", "darker"), [(0, True), (6, False)])  # tank cars, white containers
def test_car_types_have_their_own_brightness(land: sy.Landscape, kind: int, darker: bool) -> None:
    cars = [sy.Car(c.x, c.y, c.angle, kind) for c in sy.place_cars(land, 80, np.random.default_rng(6))]
    with_cars = _render(land, cars, sy.Sky.clear())
    empty = _render(land, [], sy.Sky.clear())
    diff = with_cars.bands["B04"].astype(float) - empty.bands["B04"].astype(float)
    changed = diff[land.track_mask & (diff != 0)]
    assert changed.size > 50
    assert bool(np.median(changed) < 0) is darker


def test_misregistration_shifts_the_scene_by_a_fraction_of_a_pixel(land: sy.Landscape) -> None:
    a = _render(land, [], sy.Sky.clear((0, 0))).bands["B08"].astype(float)
    b = _render(land, [], sy.Sky.clear((2, -2))).bands["B08"].astype(float)
    assert not np.array_equal(a, b)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9
    skies = [sy.draw_sky(np.random.default_rng(i), NOON, SUMMER, land.lat) for i in range(40)]
    shifts = {s.shift for s in skies}
    assert len(shifts) > 5
    assert all(abs(dy) <= sy.MAX_SHIFT and abs(dx) <= sy.MAX_SHIFT for dy, dx in shifts)
    assert sy.MAX_SHIFT / sy.FACTOR <= 0.5


def test_clear_scene_classification(land: sy.Landscape) -> None:
    scl = _render(land, [], sy.Sky.clear()).bands["SCL"]
    codes = set(np.unique(scl).tolist())
    assert codes <= {4, 5, 6}
    assert 4 in codes  # July: vegetation


def test_cloudy_scene_classification(land: sy.Landscape) -> None:
    partly = _render(land, [], sy.Sky(cover=0.5, field_seed=3))
    scl = partly.bands["SCL"]
    cloud = np.isin(scl, (8, 9)).mean()
    assert 0.25 < cloud < 0.7
    assert 9 in scl
    assert 0.0 < partly.cloud_fraction <= 1.0
    b02 = partly.bands["B02"].astype(float) / 10000
    assert np.median(b02[scl == 9]) > 0.4  # thick clouds are bright
    overcast = _render(land, [], sy.Sky(cover=1.0, field_seed=3))
    assert np.isin(overcast.bands["SCL"], (8, 9)).mean() > 0.95
    assert overcast.cloud_fraction == 1.0


def test_cloud_shadows_are_dark_and_flagged(land: sy.Landscape) -> None:
    # A low sun (late autumn) throws the shadows of high clouds far from them.
    when = datetime(2024, 11, 20, 1, 47, 31, tzinfo=UTC)
    autumn = sy.DayWeather(temp_c=2.0, precip_mm=0.0, snow_cover=0.0, fresh_snow=0.0, wet_snow=False,
                           frozen=False, soil_moisture=0.4)
    scene = _render(land, [], sy.Sky(cover=0.3, cloud_height_m=1200.0, field_seed=8), autumn, when)
    clear = _render(land, [], sy.Sky.clear(), autumn, when)
    scl = scene.bands["SCL"]
    assert (scl == 3).mean() > 0.02
    shadowed = scl == 3
    ratio = scene.bands["B08"][shadowed].astype(float).mean() / clear.bands["B08"][shadowed].astype(float).mean()
    assert ratio < 0.75


def test_haze_brightens_the_scene_but_is_mostly_not_flagged(land: sy.Landscape) -> None:
    hazy = _render(land, [], sy.Sky(haze=0.6, haze_extent=1.0, t_haze=0.65, field_seed=2))
    clear = _render(land, [], sy.Sky.clear())
    gain = hazy.bands["B02"].astype(float).mean() / clear.bands["B02"].astype(float).mean()
    assert gain > 1.4
    assert np.isin(hazy.bands["SCL"], (4, 5, 6)).mean() > 0.5


def test_snow_is_bright_in_the_visible_and_flagged(land: sy.Landscape) -> None:
    when = datetime(2024, 1, 20, 1, 47, 31, tzinfo=UTC)
    scene = _render(land, [], sy.Sky.clear(), WINTER, when)
    assert scene.snow is True
    scl = scene.bands["SCL"]
    assert (scl == 11).mean() > 0.5
    snowy = scl == 11
    b03 = scene.bands["B03"][snowy].astype(float) / 10000
    b08 = scene.bands["B08"][snowy].astype(float) / 10000
    assert np.median(b03) > 0.5
    assert np.median(b08) < np.median(b03)


def test_winter_scenes_are_darker_than_summer_scenes(land: sy.Landscape) -> None:
    # Same ground (ballast and roofs do not change with the season), lower sun.
    static = np.isin(land.classes, (sy.BALLAST, sy.ROOF_BRIGHT, sy.ROAD))
    mask = sy._block_mean(static[sy.PAD:-sy.PAD, sy.PAD:-sy.PAD], sy.FACTOR) > 0.99
    assert mask.sum() > 20
    summer = _render(land, [], sy.Sky.clear()).bands["B04"][mask].astype(float).mean()
    bare = sy.DayWeather(-5.0, 0.0, 0.0, 0.0, False, False, 0.3)
    winter = _render(land, [], sy.Sky.clear(), bare, datetime(2024, 12, 21, 1, 47, 31, tzinfo=UTC))
    assert winter.bands["B04"][mask].astype(float).mean() < 0.92 * summer


def test_swath_edge_nodata_is_zero_in_every_band(land: sy.Landscape) -> None:
    scene = _render(land, [], sy.Sky(nodata_fraction=0.3, nodata_side=-1))
    cut = scene.bands["B02"] == 0
    assert 0.25 < cut.mean() < 0.35
    assert cut[:, 0].all()  # the western side
    for band in ("B03", "B04", "B08", "SCL"):
        assert (scene.bands[band][cut] == 0).all()
        assert (scene.bands[band][~cut] != 0).all()


# -- radar physics -------------------------------------------------------------------------------


def _interior_of_largest_parcel(land: sy.Landscape) -> np.ndarray:
    interior = ndimage.binary_erosion(land.parcels > 0, iterations=2)
    ids, counts = np.unique(land.parcels[interior], return_counts=True)
    return interior & (land.parcels == ids[np.argmax(counts)])


def test_speckle_has_the_enl_of_sentinel1_grd(land: sy.Landscape) -> None:
    region = _interior_of_largest_parcel(land)
    assert region.sum() > 300
    for geometry in ("ascending", "descending"):
        vv = sy.render_radar(land, NOON, SUMMER, geometry, [], np.random.default_rng(2))["VV"][region]
        enl = vv.mean() ** 2 / vv.var()
        assert 3.5 <= enl <= 5.5
    calm = sy.render_radar(land, NOON, SUMMER, "ascending", [], np.random.default_rng(2), speckle=False)["VV"][region]
    assert calm.mean() ** 2 / calm.var() > 50  # without speckle the parcel is nearly uniform


def test_radar_levels_geometry_and_cars(land: sy.Landscape) -> None:
    asc = sy.render_radar(land, NOON, SUMMER, "ascending", [], np.random.default_rng(2), speckle=False)
    desc = sy.render_radar(land, NOON, SUMMER, "descending", [], np.random.default_rng(2), speckle=False)
    pure_ballast = sy._block_mean(
        (land.classes == sy.BALLAST)[sy.PAD:-sy.PAD, sy.PAD:-sy.PAD], sy.FACTOR) > 0.3
    vv_db = 10 * np.log10(np.median(asc["VV"][land.track_mask]))
    assert -16 < vv_db < -9  # ballast and gravel around -12 dB
    assert 10 * np.log10(np.median(asc["VH"][land.track_mask])) < vv_db - 4
    ratio_db = 10 * np.log10(np.median(desc["VV"][land.track_mask]) / np.median(asc["VV"][land.track_mask]))
    assert 0.5 < ratio_db < 2.5  # descending brighter than ascending
    cars = sy.place_cars(land, 80, np.random.default_rng(1))
    with_cars = sy.render_radar(land, NOON, SUMMER, "ascending", cars, np.random.default_rng(2), speckle=False)
    gain_db = 10 * np.log10(with_cars["VV"] / asc["VV"])
    assert np.percentile(gain_db[land.track_mask], 95) > 2.0
    assert gain_db[pure_ballast].max() > 3.0
    gain_vh = 10 * np.log10(with_cars["VH"] / asc["VH"])
    assert gain_vh[land.track_mask].max() > 1.0


def test_wet_snow_darkens_the_radar(land: sy.Landscape) -> None:
    region = _interior_of_largest_parcel(land)
    when = datetime(2024, 3, 10, 21, 29, 31, tzinfo=UTC)
    dry = sy.DayWeather(-6.0, 0.0, 1.0, 0.5, False, False, 0.4)
    wet = sy.DayWeather(0.5, 0.0, 1.0, 0.5, True, False, 0.4)
    a = sy.render_radar(land, when, dry, "descending", [], np.random.default_rng(2), speckle=False)["VV"][region]
    b = sy.render_radar(land, when, wet, "descending", [], np.random.default_rng(2), speckle=False)["VV"][region]
    assert 10 * np.log10(b.mean() / a.mean()) < -2.5


# -- boundaries ----------------------------------------------------------------------------------


def test_simulator_does_not_depend_on_the_detector() -> None:
    source = Path(sy.__file__).read_text()
    assert "railwatch.detect" not in source


@pytest.mark.slow
def test_a_4_by_3_km_aoi_over_120_days(tmp_path: Path) -> None:
    """Scene counts and grid of a realistic AOI size (its speed is measured in bench/, not here)."""
    aoi = make_aoi("big", width_km=4.0, height_km=3.0)
    res = sy.simulate(aoi, tmp_path, days=120, seed=7, start=date(2024, 5, 1))
    assert res.scenes_per_sensor[S2] == 24
    assert res.scenes_per_sensor[S1] == 20
    grid = aoi_grid(aoi)
    assert read_scene(res.scenes[0], S2 if S2 in res.scenes[0].name else S1).shape == (grid.height, grid.width)
