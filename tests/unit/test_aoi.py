"""AOI files: loading, every validation rule, the shipped AOIs, and the track/AOI masks."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS as RioCRS

from railwatch.aoi import (
    DEFAULT_TRACK_HALF_WIDTH_M,
    AoiScan,
    aoi_mask,
    aoi_summary,
    area_km2,
    load_aoi,
    load_aoi_dir,
    track_area_m2,
    track_buffer,
    track_coverage,
    track_length_m,
    track_mask,
)
from railwatch.errors import AoiError
from railwatch.geo import aoi_grid, utm_epsg

REPO = Path(__file__).resolve().parents[2]
AOI_DIR = REPO / "aoi"
SHIPPED = ("tumangang-khasan", "sinuiju-dandong", "manzhouli-zabaikalsk", "brest-malaszewicze",
           "suifenhe-grodekovo")
POINTS = REPO.parent / "shared" / "data" / "places" / "border_crossings_points.geojson"
#: Published points each shipped AOI is drawn through.
PUBLISHED = {
    "tumangang-khasan": ("Tumangang station (DPRK)", "Korea-Russia Friendship Bridge (Tumen River rail bridge)",
                         "Khasan station (RU)"),
    "sinuiju-dandong": ("Sino-Korean Friendship Bridge (Dandong-Sinuiju)", "Sinuiju Chongnyon station (DPRK)"),
    "manzhouli-zabaikalsk": ("Manzhouli station (CN)", "Zabaykalsk settlement (RU)"),
    "brest-malaszewicze": ("Brest-Tsentralny station (BY)", "Terespol (PL, town)",
                           "Malaszewicze (PL, dry port settlement)"),
    "suifenhe-grodekovo": ("Suifenhe station (CN)", "Grodekovo station, Pogranichny (RU)"),
}

# WGS 84 ellipsoid, for reference values computed independently of pyproj.Geod.
A_WGS84 = 6378137.0
E2_WGS84 = 0.00669437999014

# A 0.02° x 0.01° box near Tumangang (~1.64 km x 1.11 km) with two parallel tracks 5.6 m apart.
W, S, E, N = 130.60, 42.41, 130.62, 42.42
BOX = [[[W, S], [E, S], [E, N], [W, N], [W, S]]]
TRACK_A = [[130.603, 42.415], [130.617, 42.415]]
TRACK_B = [[130.603, 42.41505], [130.617, 42.41505]]
YARD = [[[130.602, 42.4145], [130.618, 42.4145], [130.618, 42.4156], [130.602, 42.4156], [130.602, 42.4145]]]


def parallel_m(lat: float, dlon: float) -> float:
    """Length of ``dlon`` degrees along the parallel at ``lat`` on the WGS 84 ellipsoid."""
    phi = math.radians(lat)
    return A_WGS84 * math.cos(phi) / math.sqrt(1 - E2_WGS84 * math.sin(phi) ** 2) * math.radians(dlon)


def meridian_m(lat: float, dlat: float) -> float:
    """Length of ``dlat`` degrees along the meridian near ``lat`` (meridional radius of curvature)."""
    phi = math.radians(lat)
    m = A_WGS84 * (1 - E2_WGS84) / (1 - E2_WGS84 * math.sin(phi) ** 2) ** 1.5
    return m * math.radians(dlat)


def feat(kind: str, gtype: str, coords: Any, **props: Any) -> dict[str, Any]:
    return {"type": "Feature", "properties": {"kind": kind, **props},
            "geometry": {"type": gtype, "coordinates": coords}}


def base_doc(stem: str = "test-aoi", **settings: Any) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": [
        feat("aoi", "Polygon", BOX, id=stem, name="Test AOI", **settings),
        feat("track", "LineString", TRACK_A, name="main"),
        feat("track", "LineString", TRACK_B, name="siding", survey="approximate"),
        feat("yard", "Polygon", YARD, name="yard"),
    ]}


def write(tmp_path: Path, doc: Any, stem: str = "test-aoi") -> Path:
    path = tmp_path / f"{stem}.geojson"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return path


def problems_of(path: Path, **kwargs: Any) -> AoiError:
    with pytest.raises(AoiError) as info:
        load_aoi(path, **kwargs)
    err = info.value
    assert err.source == str(path)
    assert str(path) in str(err)
    return err


# ---------------------------------------------------------------------------------------------
# A valid file
# ---------------------------------------------------------------------------------------------


def test_valid_file_loads_with_values(tmp_path: Path) -> None:
    path = write(tmp_path, base_doc(sensors=["sentinel-1-grd"], poll_interval_minutes=90,
                                     description="ignored", country=["KP"]))
    aoi, warnings = load_aoi(path)
    assert warnings == []
    assert (aoi.id, aoi.name, aoi.path) == ("test-aoi", "Test AOI", path)
    assert aoi.bbox == (W, S, E, N)
    assert len(aoi.tracks) == 2
    assert len(aoi.yards) == 1
    assert aoi.tracks[0] == {"type": "LineString", "coordinates": TRACK_A}
    assert dict(aoi.settings) == {"sensors": ["sentinel-1-grd"], "poll_interval_minutes": 90}
    expected_area = parallel_m((S + N) / 2, E - W) * meridian_m((S + N) / 2, N - S) / 1e6
    assert area_km2(aoi) == pytest.approx(expected_area, rel=0.005)
    assert track_length_m(aoi) == pytest.approx(2 * parallel_m(42.415, 0.014), rel=0.002)


def test_summary_values(tmp_path: Path) -> None:
    aoi, _ = load_aoi(write(tmp_path, base_doc(sensors=["sentinel-2-l2a"])))
    summary = aoi_summary(aoi)
    assert summary["id"] == "test-aoi"
    assert summary["name"] == "Test AOI"
    assert summary["n_tracks"] == 2
    assert summary["n_yards"] == 1
    assert summary["sensors"] == ["sentinel-2-l2a"]
    assert summary["survey"] == "approximate"  # TRACK_B is marked approximate
    assert summary["path"] == str(tmp_path / "test-aoi.geojson")
    assert summary["track_km"] == pytest.approx(2 * parallel_m(42.415, 0.014) / 1000, rel=0.002)
    assert summary["area_km2"] == pytest.approx(area_km2(aoi), abs=0.001)


def test_summary_surveyed_when_no_track_is_approximate(tmp_path: Path) -> None:
    doc = base_doc()
    del doc["features"][2]["properties"]["survey"]
    aoi, _ = load_aoi(write(tmp_path, doc))
    assert aoi_summary(aoi)["survey"] == "surveyed"
    assert aoi_summary(aoi)["sensors"] is None  # no override: the config's default applies


def test_multipolygon_aoi_and_multilinestring_track(tmp_path: Path) -> None:
    other = [[[W + 0.05, S], [E + 0.05, S], [E + 0.05, N], [W + 0.05, N], [W + 0.05, S]]]
    doc = base_doc()
    doc["features"][0]["geometry"] = {"type": "MultiPolygon", "coordinates": [BOX, other]}
    doc["features"].append(feat("track", "MultiLineString",
                                [TRACK_A, [[130.655, 42.415], [130.665, 42.415]]], name="two parts"))
    aoi, warnings = load_aoi(write(tmp_path, doc))
    assert warnings == []
    assert aoi.tracks[-1]["type"] == "MultiLineString"
    assert area_km2(aoi) == pytest.approx(2 * parallel_m(42.415, 0.02) * meridian_m(42.415, 0.01) / 1e6,
                                          rel=0.005)


# ---------------------------------------------------------------------------------------------
# One test per validation rule
# ---------------------------------------------------------------------------------------------


def test_invalid_json(tmp_path: Path) -> None:
    path = write(tmp_path, '{"type": "FeatureCollection", "features": [\n  {"type": "Feature",,}\n]}')
    err = problems_of(path)
    assert len(err.problems) == 1
    assert "invalid JSON at line 2 column" in err.problems[0]
    assert "expected a GeoJSON FeatureCollection" in err.problems[0]


def test_not_a_feature_collection(tmp_path: Path) -> None:
    err = problems_of(write(tmp_path, {"type": "Feature", "geometry": None, "properties": {}}))
    assert err.problems == ['top level is type "Feature"; expected a GeoJSON object with '
                            '"type": "FeatureCollection"']


def test_no_aoi_feature(tmp_path: Path) -> None:
    doc = base_doc()
    del doc["features"][0]
    err = problems_of(write(tmp_path, doc))
    assert err.problems == ['no feature with properties.kind = "aoi"; expected exactly one Polygon or '
                            'MultiPolygon feature with kind "aoi"']


def test_two_aoi_features(tmp_path: Path) -> None:
    doc = base_doc()
    doc["features"].append(copy.deepcopy(doc["features"][0]))
    err = problems_of(write(tmp_path, doc))
    assert err.problems == ['2 features have kind "aoi" (features[0], features[4]); expected exactly one']


def test_self_intersecting_polygon(tmp_path: Path) -> None:
    doc = base_doc()
    bow_tie = [[[W, S], [E, N], [E, S], [W, N], [W, S]]]
    doc["features"][0]["geometry"]["coordinates"] = bow_tie
    err = problems_of(write(tmp_path, doc))
    assert len(err.problems) == 1
    msg = err.problems[0]
    assert msg.startswith('features[0] (aoi "Test AOI"): invalid Polygon: self-intersection at (130.610000, 42.415000)')
    assert "expected a simple polygon" in msg


def test_unclosed_ring(tmp_path: Path) -> None:
    doc = base_doc()
    doc["features"][3]["geometry"]["coordinates"] = [YARD[0][:-1]]
    err = problems_of(write(tmp_path, doc))
    assert len(err.problems) == 1
    assert err.problems[0].startswith('features[3] (yard "yard"): ring 0 is not closed')


def test_track_entirely_outside(tmp_path: Path) -> None:
    doc = base_doc()
    doc["features"][1]["geometry"]["coordinates"] = [[130.70, 42.415], [130.71, 42.415]]
    err = problems_of(write(tmp_path, doc))
    assert err.problems == ['features[1] (track "main"): lies entirely outside the AOI polygon; expected a '
                            "track inside (or crossing) the aoi feature's polygon"]


def test_track_partly_outside_is_clipped_with_a_warning(tmp_path: Path) -> None:
    doc = base_doc()
    doc["features"][1]["geometry"]["coordinates"] = [[130.61, 42.415], [130.63, 42.415]]  # half outside
    aoi, warnings = load_aoi(write(tmp_path, doc))
    assert len(warnings) == 1
    assert warnings[0].startswith('features[1] (track "main"): partly outside the AOI: clipped from 1.65 km to 0.82 km')
    clipped = aoi.tracks[0]
    assert clipped["type"] == "LineString"
    xs = [p[0] for p in clipped["coordinates"]]
    assert max(xs) == pytest.approx(E)
    assert min(xs) == pytest.approx(130.61)
    # The clipped track is shorter: half of the first track plus the unchanged second track.
    expected = parallel_m(42.415, 0.01) + parallel_m(42.415, 0.014)
    assert track_length_m(aoi) == pytest.approx(expected, rel=0.002)


def test_yard_partly_outside_is_clipped_with_a_warning(tmp_path: Path) -> None:
    doc = base_doc()
    doc["features"][3]["geometry"]["coordinates"] = [
        [[130.61, 42.414], [130.63, 42.414], [130.63, 42.416], [130.61, 42.416], [130.61, 42.414]]]
    aoi, warnings = load_aoi(write(tmp_path, doc))
    assert warnings == ['features[3] (yard "yard"): partly outside the AOI: clipped to 50% of its area']
    assert max(p[0] for p in aoi.yards[0]["coordinates"][0]) == pytest.approx(E)


def test_no_track(tmp_path: Path) -> None:
    doc = base_doc()
    doc["features"] = [f for f in doc["features"] if f["properties"]["kind"] != "track"]
    err = problems_of(write(tmp_path, doc))
    assert err.problems == ['no feature with properties.kind = "track"; expected at least one LineString '
                            "or MultiLineString rail centreline"]


def test_swapped_lat_lon(tmp_path: Path) -> None:
    doc = base_doc()
    doc["features"][0]["geometry"]["coordinates"] = [[[y, x] for x, y in BOX[0]]]
    err = problems_of(write(tmp_path, doc))
    assert len(err.problems) == 1
    msg = err.problems[0]
    assert msg.startswith('features[0] (aoi "Test AOI"): 5 of 5 positions out of range, first [42.41, 130.6] '
                          "(latitude 130.6 is beyond ±90)")
    assert msg.endswith("latitude and longitude look swapped")


def test_longitude_out_of_range_without_swap_hint(tmp_path: Path) -> None:
    doc = base_doc()
    doc["features"][1]["geometry"]["coordinates"] = [[190.0, 42.415], [130.617, 42.415]]
    err = problems_of(write(tmp_path, doc))
    assert len(err.problems) == 1
    assert "(longitude 190 is beyond ±180)" in err.problems[0]
    assert "swapped" not in err.problems[0]


def test_id_mismatch(tmp_path: Path) -> None:
    err = problems_of(write(tmp_path, base_doc(stem="other-place"), stem="test-aoi"))
    assert err.problems == ['features[0] (aoi "Test AOI"): properties.id "other-place" does not match the '
                            'file name; expected "test-aoi" (or rename the file to other-place.geojson)']


def test_id_not_a_slug_and_missing_name(tmp_path: Path) -> None:
    doc = base_doc(stem="Test_AOI")
    del doc["features"][0]["properties"]["name"]
    err = problems_of(write(tmp_path, doc))
    assert len(err.problems) == 2
    assert 'properties.id "Test_AOI" is not a slug' in err.problems[0]
    assert "properties.name is missing or empty" in err.problems[1]


def test_area_over_maximum(tmp_path: Path) -> None:
    doc = base_doc()
    # 0.16° x 0.11° ~ 13.1 km x 12.2 km ~ 160 km².
    big = [[[130.55, 42.36], [130.71, 42.36], [130.71, 42.47], [130.55, 42.47], [130.55, 42.36]]]
    doc["features"][0]["geometry"]["coordinates"] = big
    path = write(tmp_path, doc)
    err = problems_of(path)
    expected = parallel_m(42.415, 0.16) * meridian_m(42.415, 0.11) / 1e6
    assert len(err.problems) == 1
    assert f"polygon area {expected:.1f} km² exceeds the maximum 100 km²" in err.problems[0]
    aoi, _ = load_aoi(path, max_area_km2=200.0)
    assert area_km2(aoi) == pytest.approx(expected, rel=0.005)
    # The small box fails a tighter limit too.
    err = problems_of(write(tmp_path, base_doc()), max_area_km2=1.0)
    assert "exceeds the maximum 1 km²" in err.problems[0]


def test_bad_settings_types_are_all_reported(tmp_path: Path) -> None:
    path = write(tmp_path, base_doc(sensors="sentinel-2-l2a", poll_interval_minutes=0, schedule="every hour",
                                    jitter_seconds=-1, track_half_width_m="6", detector=[1]))
    err = problems_of(path)
    head = 'features[0] (aoi "Test AOI"): properties.'
    assert err.problems == [
        head + 'sensors is "sentinel-2-l2a"; expected a non-empty list without repeats drawn from '
               '["sentinel-2-l2a", "sentinel-1-grd"]',
        head + "poll_interval_minutes is 0; expected a number > 0",
        head + "jitter_seconds is -1; expected a number >= 0",
        head + "track_half_width_m is \"6\"; expected a number > 0",
        head + 'schedule is "every hour"; expected a 5-field cron string such as "0 */6 * * *" (2 fields, not 5)',
        head + "detector is [1]; expected a JSON object of detector threshold overrides",
    ]


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("sensors", ["landsat-8"], "sensors is [\"landsat-8\"]"),
    ("sensors", [], "sensors is []"),
    ("sensors", ["sentinel-1-grd", "sentinel-1-grd"], "without repeats"),
    ("poll_interval_minutes", True, "poll_interval_minutes is true"),
    ("schedule", "61 * * * *", "minute value '61' outside 0-59"),
    ("schedule", "0 0 * * funday", "day of week value 'funday' outside 0-7"),
    ("schedule", 5, "not a string"),
])
def test_bad_setting_values(tmp_path: Path, key: str, value: Any, fragment: str) -> None:
    err = problems_of(write(tmp_path, base_doc(**{key: value})))
    assert len(err.problems) == 1
    assert fragment in err.problems[0]


def test_good_settings_pass_through(tmp_path: Path) -> None:
    settings = {"sensors": ["sentinel-2-l2a", "sentinel-1-grd"], "poll_interval_minutes": 30.5,
                "schedule": "0  */6 * * mon-fri", "jitter_seconds": 0, "track_half_width_m": 8,
                "detector": {"min_cars": 3, "optical": {"threshold": 0.2}}}
    aoi, warnings = load_aoi(write(tmp_path, base_doc(**settings, survey="2024", source="OSM")))
    assert warnings == []
    assert dict(aoi.settings) == {**settings, "schedule": "0 */6 * * mon-fri"}


def test_misspelt_setting_is_a_warning(tmp_path: Path) -> None:
    aoi, warnings = load_aoi(write(tmp_path, base_doc(poll_interval_minute=60)))
    assert "poll_interval_minutes" not in aoi.settings
    assert warnings == ['features[0] (aoi "Test AOI"): property "poll_interval_minute" is not a recognised '
                        'setting and is ignored; did you mean "poll_interval_minutes"?']


def test_unknown_kind_and_wrong_geometry_type(tmp_path: Path) -> None:
    doc = base_doc()
    doc["features"].append(feat("station", "Point", [130.61, 42.415], name="x"))
    doc["features"].append(feat("track", "Polygon", BOX))
    err = problems_of(write(tmp_path, doc))
    assert err.problems == [
        'features[4] (feature "x"): properties.kind is "station"; expected one of aoi, track, yard',
        'features[5] (track): geometry type is "Polygon"; expected LineString or MultiLineString',
    ]


def test_several_problems_reported_together(tmp_path: Path) -> None:
    doc = base_doc(stem="wrong-id", poll_interval_minutes=-5)
    doc["features"][0]["geometry"]["coordinates"] = [[[W, S], [E, N], [E, S], [W, N], [W, S]]]
    doc["features"][1]["geometry"]["coordinates"] = [[42.415, 130.603], [42.415, 130.617]]
    del doc["features"][2]
    path = write(tmp_path, doc)
    err = problems_of(path)
    assert len(err.problems) == 4
    text = str(err)
    assert text.startswith(f"{path}: 4 problems:\n")
    for fragment in ('properties.id "wrong-id" does not match', "poll_interval_minutes is -5",
                     "invalid Polygon: self-intersection", 'features[1] (track "main"): 2 of 2 positions out of range'):
        assert fragment in text


# ---------------------------------------------------------------------------------------------
# Directory scan
# ---------------------------------------------------------------------------------------------


def test_load_aoi_dir_separates_good_bad_and_warnings(tmp_path: Path) -> None:
    write(tmp_path, base_doc(stem="a-good"), stem="a-good")
    write(tmp_path, "not json", stem="b-broken")
    partly = base_doc(stem="c-warned")
    partly["features"][1]["geometry"]["coordinates"] = [[130.61, 42.415], [130.63, 42.415]]
    write(tmp_path, partly, stem="c-warned")
    (tmp_path / "notes.txt").write_text("not an AOI", encoding="utf-8")
    scan = load_aoi_dir(tmp_path)
    assert isinstance(scan, AoiScan)
    assert [a.id for a in scan.aois] == ["a-good", "c-warned"]
    assert list(scan.errors) == [tmp_path / "b-broken.geojson"]
    assert "invalid JSON" in str(scan.errors[tmp_path / "b-broken.geojson"])
    assert list(scan.warnings) == ["c-warned"]
    assert "partly outside the AOI" in scan.warnings["c-warned"][0]


def test_load_aoi_dir_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(AoiError) as info:
        load_aoi_dir(missing)
    assert str(missing) in str(info.value)
    assert "does not exist" in str(info.value)


# ---------------------------------------------------------------------------------------------
# The shipped AOIs
# ---------------------------------------------------------------------------------------------


def test_shipped_aoi_directory_is_clean() -> None:
    scan = load_aoi_dir(AOI_DIR)
    assert scan.errors == {}
    assert scan.warnings == {}
    assert sorted(a.id for a in scan.aois) == sorted(SHIPPED)


@pytest.mark.parametrize("aoi_id", SHIPPED)
def test_shipped_aoi_validates(aoi_id: str) -> None:
    path = AOI_DIR / f"{aoi_id}.geojson"
    aoi, warnings = load_aoi(path)
    assert warnings == []
    assert aoi.id == path.stem
    assert 1.0 < area_km2(aoi) < 100.0
    assert aoi.settings["sensors"] == ["sentinel-2-l2a", "sentinel-1-grd"]
    assert aoi.settings["poll_interval_minutes"] > 0
    assert len(aoi.yards) >= 1
    summary = aoi_summary(aoi)
    assert summary["survey"] == "approximate"
    assert summary["track_km"] > 2.0
    doc = json.loads(path.read_text(encoding="utf-8"))
    props = doc["features"][0]["properties"]
    assert "border_crossings_points.geojson" in props["source"]
    assert props["description"]
    grid = aoi_grid(aoi)
    tracks = track_mask(aoi, grid.crs, grid.transform, grid.shape)
    inside = aoi_mask(aoi, grid.crs, grid.transform, grid.shape)
    assert tracks.any()
    assert not (tracks & ~inside).any()
    # Track pixels are a small part of the AOI and roughly the buffered track area.
    assert tracks.sum() * 100.0 == pytest.approx(track_area_m2(aoi), rel=0.15)
    assert tracks.sum() < 0.05 * inside.sum()


@pytest.mark.parametrize("aoi_id", SHIPPED)
def test_shipped_aoi_passes_through_its_published_points(aoi_id: str) -> None:
    if not POINTS.exists():
        pytest.skip("shared/data/places/border_crossings_points.geojson is not present")
    from shapely.geometry import Point, shape

    published = {f["properties"]["name"]: f["geometry"]["coordinates"]
                 for f in json.loads(POINTS.read_text(encoding="utf-8"))["features"]
                 if f["geometry"]["type"] == "Point"}
    aoi, _ = load_aoi(AOI_DIR / f"{aoi_id}.geojson")
    epsg = utm_epsg(*published[PUBLISHED[aoi_id][0]])
    to_utm = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
    tracks = [shape(t) for t in aoi.tracks]
    for name in PUBLISHED[aoi_id]:
        lon, lat = published[name]
        assert shape(aoi.geometry).contains(Point(lon, lat)), name
        x, y = to_utm.transform(lon, lat)
        nearest = min(
            Point(x, y).distance(type(t)(_utm_coords(t, to_utm))) for t in tracks
        )
        assert nearest < 150.0, f"{name}: nearest track {nearest:.0f} m away"


def _utm_coords(geom: Any, tr: Transformer) -> Any:
    if geom.geom_type == "LineString":
        return [tr.transform(x, y) for x, y in geom.coords]
    return [[tr.transform(x, y) for x, y in part.coords] for part in geom.geoms]


def test_tumangang_khasan_covers_the_derived_boxes() -> None:
    aoi, _ = load_aoi(AOI_DIR / "tumangang-khasan.geojson")
    assert aoi.name == "Tumangang–Khasan"
    assert 15.0 <= area_km2(aoi) <= 20.0
    west, south, east, north = aoi.bbox
    # Derived boxes around Tumangang yard, the bridge and Khasan (shared/data/places).
    assert west <= 130.5961
    assert south <= 42.4112
    assert east >= 130.6529
    assert north >= 42.436
    assert len(aoi.yards) == 2
    assert len(aoi.tracks) >= 10


# ---------------------------------------------------------------------------------------------
# Masks and coverage
# ---------------------------------------------------------------------------------------------


def _lonlat_grid(aoi: Any, metres: float = 10.0) -> tuple[Affine, tuple[int, int], float]:
    """An EPSG:4326 grid over the AOI with ~``metres`` pixels; also the pixel area in m²."""
    west, south, east, north = aoi.bbox
    lat = (south + north) / 2
    dx = metres / parallel_m(lat, 1.0)
    dy = metres / meridian_m(lat, 1.0)
    width = math.ceil((east - west) / dx)
    height = math.ceil((north - south) / dy)
    return Affine(dx, 0, west, 0, -dy, north), (height, width), metres * metres


def test_track_mask_lonlat_grid_agrees_with_utm_grid() -> None:
    aoi, _ = load_aoi(AOI_DIR / "tumangang-khasan.geojson")
    grid = aoi_grid(aoi)
    utm_area = track_mask(aoi, grid.crs, grid.transform, grid.shape).sum() * 100.0
    transform, shape, pixel_m2 = _lonlat_grid(aoi)
    ll = track_mask(aoi, "EPSG:4326", transform, shape)
    assert ll.any()
    assert ll.sum() * pixel_m2 == pytest.approx(utm_area, rel=0.1)
    # The lon/lat track pixels lie inside the lon/lat AOI mask too.
    assert not (ll & ~aoi_mask(aoi, "EPSG:4326", transform, shape)).any()


def test_track_mask_accepts_a_rasterio_crs() -> None:
    aoi, _ = load_aoi(AOI_DIR / "sinuiju-dandong.geojson")
    grid = aoi_grid(aoi)
    as_string = track_mask(aoi, grid.crs, grid.transform, grid.shape)
    as_rio = track_mask(aoi, RioCRS.from_string(grid.crs), grid.transform, grid.shape)
    assert np.array_equal(as_string, as_rio)


def test_track_half_width_setting_and_argument(tmp_path: Path) -> None:
    narrow, _ = load_aoi(write(tmp_path, base_doc()))
    wide, _ = load_aoi(write(tmp_path, base_doc(track_half_width_m=20), stem="test-aoi"))
    grid = aoi_grid(narrow)
    n = track_mask(narrow, grid.crs, grid.transform, grid.shape).sum()
    w = track_mask(wide, grid.crs, grid.transform, grid.shape).sum()
    explicit = track_mask(narrow, grid.crs, grid.transform, grid.shape, half_width_m=20).sum()
    assert w == explicit
    assert w > 2 * n
    # Two tracks 5.6 m apart, each ±6 m: a band ~17.6 m wide and ~1.15 km long.
    band_m2 = (2 * DEFAULT_TRACK_HALF_WIDTH_M + 5.6) * parallel_m(42.415, 0.014)
    assert track_area_m2(narrow) == pytest.approx(band_m2, rel=0.03)
    assert track_area_m2(wide) == pytest.approx((40 + 5.6) * parallel_m(42.415, 0.014), rel=0.03)


def test_track_mask_falls_back_to_touched_pixels(tmp_path: Path) -> None:
    """A 1 km grid whose pixel-row boundary runs along the track: no centre hits the band."""
    aoi, _ = load_aoi(write(tmp_path, base_doc()))
    epsg = utm_epsg(130.61, 42.415)
    to_utm = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
    x0, _ = to_utm.transform(W, 42.415)
    _, y_mid = to_utm.transform(130.61, 42.415)  # the track crosses this row boundary (grid convergence)
    transform = Affine(1000.0, 0, x0, 0, -1000.0, y_mid + 1000.0)
    centres_only = aoi_mask(aoi, f"EPSG:{epsg}", transform, (3, 3))  # sanity: the AOI itself is hit
    assert centres_only.any()
    mask = track_mask(aoi, f"EPSG:{epsg}", transform, (3, 3), half_width_m=1.0)
    # The track (130.603..130.617 E) starts in column 0 below the boundary (row 1), crosses it at
    # 130.61 E and ends in column 1 above it (row 0): exactly the touched pixels, as no centre is hit.
    assert mask.tolist() == [[True, True, False], [True, False, False], [False, False, False]]


def test_track_mask_off_grid_is_empty(tmp_path: Path) -> None:
    aoi, _ = load_aoi(write(tmp_path, base_doc()))
    far = Affine(10.0, 0, 0.0, 0, -10.0, 1000.0)
    assert not track_mask(aoi, "EPSG:32652", far, (20, 20)).any()
    assert not track_coverage(aoi, "EPSG:32652", far, (20, 20)).any()


@pytest.mark.parametrize("aoi_id", ["tumangang-khasan", "manzhouli-zabaikalsk"])
def test_track_coverage_fractions(aoi_id: str) -> None:
    aoi, _ = load_aoi(AOI_DIR / f"{aoi_id}.geojson")
    grid = aoi_grid(aoi)
    cov = track_coverage(aoi, grid.crs, grid.transform, grid.shape)
    assert cov.dtype == np.float32
    assert cov.shape == grid.shape
    assert cov.min() >= 0.0
    assert cov.max() <= 1.0
    assert cov.max() == 1.0  # a yard's sidings fully cover some pixels
    assert 0.0 < cov[(cov > 0) & (cov < 1)].min() < 0.5  # and edges are fractional
    assert cov.sum() * 100.0 == pytest.approx(track_area_m2(aoi), rel=0.15)
    mask = track_mask(aoi, grid.crs, grid.transform, grid.shape)
    assert cov[mask].min() > 0.0
    assert not ((cov > 0) & ~aoi_mask(aoi, grid.crs, grid.transform, grid.shape)).any()


def test_track_coverage_on_lonlat_grid() -> None:
    aoi, _ = load_aoi(AOI_DIR / "sinuiju-dandong.geojson")
    transform, shape, pixel_m2 = _lonlat_grid(aoi)
    cov = track_coverage(aoi, "EPSG:4326", transform, shape)
    assert cov.min() >= 0.0
    assert cov.max() <= 1.0
    assert cov.sum() * pixel_m2 == pytest.approx(track_area_m2(aoi), rel=0.15)


def test_track_buffer_is_lonlat_geojson(tmp_path: Path) -> None:
    aoi, _ = load_aoi(write(tmp_path, base_doc()))
    band = track_buffer(aoi)
    assert band["type"] in ("Polygon", "MultiPolygon")
    from shapely.geometry import shape

    minx, miny, maxx, _ = shape(band).bounds
    assert W <= minx < 130.603
    assert 130.617 < maxx <= E
    assert miny == pytest.approx(42.415 - 6.0 / meridian_m(42.415, 1.0), abs=2e-6)


def test_a_consist_lights_the_pixels_of_a_neighbouring_track_once_per_track(tmp_path: Path) -> None:
    """The car estimate's pixels per metre (docs/detector.md §5): one track alone lights its own band; a
    second track 5.6 m away shares the pixels and the windows, so each track's consist lights both bands."""
    from railwatch.aoi import lit_pixels

    one = base_doc("one")
    one["features"] = [f for f in one["features"] if f["properties"].get("name") != "siding"]
    single, _w = load_aoi(write(tmp_path, one, "one"))
    double, _w = load_aoi(write(tmp_path, base_doc("two"), "two"))
    for aoi in (single, double):
        grid = aoi_grid(aoi)
        tracks = track_mask(aoi, grid.crs, grid.transform, grid.shape)
        (lit_window, lit_own), length = lit_pixels(aoi, grid.crs, grid.transform, grid.shape, [(tracks, 2), (tracks, 0)])
        assert length == pytest.approx(track_length_m(aoi), rel=1e-6)
        # A 5 x 5 window reaches the whole band (the track's 12 m and the neighbour's) from the centreline.
        assert lit_window == pytest.approx(tracks.sum() * len(aoi.tracks), rel=0.02)
        assert lit_own <= lit_window
    # Metres of centreline per lit pixel: the same for one track as metres per track pixel; with two tracks
    # sharing a band, half of it (the old model counted each shared pixel once for each track through it).
    g1, g2 = aoi_grid(single), aoi_grid(double)
    n1 = track_mask(single, g1.crs, g1.transform, g1.shape).sum()
    n2 = track_mask(double, g2.crs, g2.transform, g2.shape).sum()
    m1 = track_length_m(single) / lit_pixels(single, g1.crs, g1.transform, g1.shape,
                                             [(track_mask(single, g1.crs, g1.transform, g1.shape), 2)])[0][0]
    m2 = track_length_m(double) / lit_pixels(double, g2.crs, g2.transform, g2.shape,
                                             [(track_mask(double, g2.crs, g2.transform, g2.shape), 2)])[0][0]
    assert m1 == pytest.approx(track_length_m(single) / n1, rel=0.02)
    assert m2 == pytest.approx(track_length_m(double) / n2 / 2, rel=0.02)
