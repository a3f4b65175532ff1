"""The evidence pictures, GeoJSON and HTML from arrays (no store, no archive): railwatch.evidence, report."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from affine import Affine
from PIL import Image
from pyproj import Transformer
from shapely.geometry import shape

from railwatch.domain import S1, S2, Observation
from railwatch.evidence import (
    HIGHLIGHT_RGB,
    LAYOUT_KEY,
    SceneEvidence,
    change_features,
    crop_window,
    display_rgb,
    quicklook_png,
    report_html,
)
from railwatch.report import activity_chart, write_chart

T0 = datetime(2025, 5, 28, 21, 29, 30, tzinfo=UTC)
# A 10 m UTM grid near Tumangang (zone 52N).
TRANSFORM = Affine(10.0, 0.0, 330_000.0, 0.0, -10.0, 4_700_000.0)
CRS = "EPSG:32652"
H, W = 90, 140


def _track() -> np.ndarray:
    """A diagonal track two pixels wide, and a straight one along a row."""
    track = np.zeros((H, W), bool)
    for c in range(10, 130):
        r = 10 + int(0.5 * c)
        track[r : r + 2, c] = True
    track[70:72, 5:135] = True
    return track


def _evidence(sensor: str, occupied: np.ndarray, seed: int = 0) -> SceneEvidence:
    rng = np.random.default_rng(seed)
    track = _track()
    if sensor == S2:
        base = 0.05 + 0.1 * rng.random((H, W))  # a natural, nearly grey landscape
        before = {b: (base * k).astype(np.float32) for b, k in (("B02", 0.8), ("B03", 0.95), ("B04", 1.1), ("B08", 2.0))}
        after = {b: v.copy() for b, v in before.items()}
        for v in after.values():
            v[occupied] = 0.02  # dark tank cars
    else:
        before = {b: (0.05 * rng.gamma(4.4, 1 / 4.4, (H, W))).astype(np.float32) for b in ("VV", "VH")}
        after = {b: v.copy() for b, v in before.items()}
        for v in after.values():
            v[occupied] = 1.5  # bright metal
    magnitude = np.where(track, 1.0, 0.0).astype(np.float32)
    magnitude[occupied] = 7.5
    return SceneEvidence(
        alert_id=7, aoi_id="test-aoi", aoi_name="Test <crossing> & yard", sensor=sensor, acquired=T0,
        before=before, after=after, track=track, occupied=occupied, magnitude=magnitude, crs=CRS,
        transform=TRANSFORM, threshold=3.2, reference_times=(T0 - timedelta(days=24), T0 - timedelta(days=12)),
        north_deg=-1.8, estimated_cars=31.9,
    )


def _occupied(track: np.ndarray) -> np.ndarray:
    occ = np.zeros((H, W), bool)
    occ[70:72, 40:60] = True  # a consist on the straight track
    for c in range(90, 100):  # and one on the diagonal
        r = 10 + int(0.5 * c)
        occ[r : r + 2, c] = True
    return occ & track


def _highlighted(img: np.ndarray) -> np.ndarray:
    """PNG pixels painted with the highlight colour (magenta over anything keeps R, B >> G)."""
    assert HIGHLIGHT_RGB == (255, 0, 255)
    r, g, b = (img[..., i].astype(int) for i in range(3))
    return (r - g > 100) & (b - g > 100)


def _to_grid(layout: dict, panel: str, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r0, r1, c0, c1 = layout["window"]
    left, top, right, bottom = next(p["box"] for p in layout["panels"] if p["name"] == panel)
    cols = c0 + np.floor((xs + 0.5 - left) / (right - left) * (c1 - c0)).astype(int)
    rows = r0 + np.floor((ys + 0.5 - top) / (bottom - top) * (r1 - r0)).astype(int)
    return np.clip(rows, r0, r1 - 1), np.clip(cols, c0, c1 - 1)


@pytest.mark.parametrize("sensor", [S2, S1])
def test_quicklook_highlights_exactly_the_changed_track_pixels(sensor: str) -> None:
    track = _track()
    occ = _occupied(track)
    ev = _evidence(sensor, occ)
    png, layout = quicklook_png(ev)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size[0] >= 1000 and img.size[1] >= 400
    assert json.loads(img.info[LAYOUT_KEY]) == layout
    arr = np.asarray(img.convert("RGB"))
    assert arr.std() > 20  # a picture, not a blank page
    hi = _highlighted(arr)
    ys, xs = np.nonzero(hi)
    assert ys.size > 50
    left, top, right, bottom = next(p["box"] for p in layout["panels"] if p["name"] == "after")
    inside = (xs >= left) & (xs < right) & (ys >= top) & (ys < bottom)
    # Highlight colour only inside the "after" panel, apart from the legend swatch below the panels.
    assert inside[ys < bottom].mean() > 0.99
    rows, cols = _to_grid(layout, "after", ys[inside], xs[inside])
    assert track[rows, cols].mean() > 0.97
    assert occ[rows, cols].mean() > 0.9
    # Every changed pixel is visibly painted.
    seen = np.zeros_like(occ)
    seen[rows, cols] = True
    assert seen[occ].all()
    # The "before" panel carries no highlight.
    left_b, top_b, right_b, bottom_b = next(p["box"] for p in layout["panels"] if p["name"] == "before")
    assert not hi[int(top_b) : int(bottom_b), int(left_b) : int(right_b)].any()


def test_quicklook_without_change_still_renders_the_track() -> None:
    track = _track()
    ev = _evidence(S2, np.zeros_like(track))
    png, layout = quicklook_png(ev)
    arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    left, top, right, bottom = (int(v) for v in layout["panels"][1]["box"])
    assert not _highlighted(arr[top:bottom, left:right]).any()
    assert arr.std() > 20


def test_display_rgb_shares_one_stretch_and_blacks_out_missing_pixels() -> None:
    track = _track()
    ev = _evidence(S2, np.zeros_like(track))
    before, after = display_rgb(ev)
    assert before.shape == (H, W, 3) and np.allclose(before, after)  # identical scenes look identical
    assert before.min() >= 0.0 and before.max() <= 1.0
    ev.after["B04"][:5, :5] = np.nan
    ev.after["B03"][:5, :5] = 0  # Sentinel-2 nodata
    _b, after = display_rgb(ev)
    assert after[:5, :5, 0].max() == 0.0 and after[:5, :5, 1].max() == 0.0
    ev1 = _evidence(S1, _occupied(track))
    b1, a1 = display_rgb(ev1)
    assert np.allclose(b1[..., 0], b1[..., 2])  # grey
    assert a1[_occupied(track)].mean() > 0.95 > b1[_occupied(track)].mean()  # bright metal after


def test_crop_window_keeps_the_change_with_a_margin() -> None:
    occ = np.zeros((500, 600), bool)
    occ[200:203, 300:340] = True
    r0, r1, c0, c1 = crop_window(occ, occ, margin=40, min_size=120)
    assert r0 <= 200 - 40 and r1 >= 203 + 40 and c0 <= 300 - 40 and c1 >= 340 + 40
    assert r1 - r0 >= 120 and c1 - c0 >= 120
    edge = np.zeros((100, 100), bool)
    edge[0, 0] = True
    assert crop_window(edge, edge, margin=40, min_size=120) == (0, 100, 0, 100)
    empty = np.zeros((50, 60), bool)
    assert crop_window(empty, empty) == (0, 50, 0, 60)


def test_change_features_are_rfc7946_pixels_in_lon_lat() -> None:
    track = _track()
    occ = _occupied(track)
    ev = _evidence(S1, occ)
    fc = json.loads(json.dumps(change_features(ev)))
    assert fc["type"] == "FeatureCollection" and "crs" not in fc
    assert len(fc["features"]) == int(occ.sum())
    assert fc["railwatch"]["groups"] == 2
    to_grid = Transformer.from_crs("EPSG:4326", CRS, always_xy=True)
    for f in fc["features"]:
        poly = shape(f["geometry"])
        assert poly.is_valid and poly.exterior.is_ccw  # RFC 7946 right-hand rule
        lon, lat = poly.centroid.x, poly.centroid.y
        assert 125 < lon < 133 and 40 < lat < 45
        x, y = to_grid.transform(lon, lat)
        col, row = (x - TRANSFORM.c) / TRANSFORM.a, (y - TRANSFORM.f) / TRANSFORM.e
        p = f["properties"]
        assert (int(row), int(col)) == (p["row"], p["col"])
        assert occ[p["row"], p["col"]]
        assert p["magnitude"] == pytest.approx(7.5) and p["threshold"] == pytest.approx(3.2)
        assert p["area_m2"] == pytest.approx(100.0)
        assert p["group_pixels"] in (40, 20)
    west, south, east, north = fc["bbox"]
    assert west < east and south < north


def test_change_features_of_no_change_is_an_empty_collection() -> None:
    ev = _evidence(S2, np.zeros((H, W), bool))
    fc = change_features(ev)
    assert fc["features"] == [] and fc["railwatch"]["pixels"] == 0 and "bbox" not in fc


def test_report_html_is_self_contained_and_escaped() -> None:
    png = _png_bytes()
    page = report_html(
        aoi_id="test-aoi", aoi_name="<script>alert(1)</script> yard", generated_at=T0, period=(T0, T0),
        summary=[("scenes", 3), ("note", "a < b")], chart_png=png,
        alerts=[{"id": 4, "state": "dismissed", "acquired": "2025-05-28T21:29:30Z", "sensor": S1,
                 "estimated_cars": 30.0, "estimated_cars_low": 10.0, "estimated_cars_high": 50.0,
                 "dismissed_at": "2025-05-30T00:00:00Z", "dismissed_reason": "snow plough <train>"}],
        evidence={4: {"quicklook": png, "geojson": {"type": "FeatureCollection", "features": []}, "pixels": 0}},
        silences=[{"id": 2, "until": "2025-06-01T00:00:00Z", "reason": "maintenance"}],
        problems=["alert 5: scene missing"],
    )
    assert page.startswith("<!DOCTYPE html>")
    assert "<script>" not in page and "&lt;script&gt;" in page and "snow plough &lt;train&gt;" in page
    assert page.count('src="data:image/png;base64,') == 2
    assert "data:application/geo+json;base64," in page
    assert "http://" not in page and "https://" not in page and "default-src 'none'" in page
    assert "silenced" in page and "maintenance" in page and "alert 5: scene missing" in page
    assert "10–50" in page


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _obs(day: int, cars: float | None, status: str = "ok", sensor: str = S1, **metrics: float) -> Observation:
    return Observation(
        aoi_id="test-aoi", collection=sensor, acquired=T0 + timedelta(days=day), status=status,
        estimated_cars=cars, estimated_cars_low=None if cars is None else max(0.0, cars - 5),
        estimated_cars_high=None if cars is None else cars + 5, metrics=metrics,
    )


def test_activity_chart_draws_everything_and_keeps_the_old_signature(tmp_path: Path) -> None:
    obs = [_obs(d, 3.0 + (40 if 20 <= d <= 30 else 0), baseline_cars=3.0, baseline_spread=1.5, threshold_cars=18.0)
           for d in range(0, 60, 6)]
    obs += [_obs(d, 5.0, sensor=S2, baseline_cars=4.0, baseline_spread=1.0) for d in range(1, 60, 10)]
    obs += [_obs(3, None, "cloudy", S2), _obs(8, None, "haze", S2), _obs(13, None, "snow", S2),
            _obs(14, None, "nodata", S1), _obs(15, None, "unreadable", S1), _obs(2, None, "ok", S2)]
    alerts = [
        SimpleNamespace(id=1, state="confirmed", opened_acquired=T0 + timedelta(days=24), last_acquired=T0 +
                        timedelta(days=30), resolved_at=None, acknowledged_at=T0 + timedelta(days=31)),
        SimpleNamespace(id=2, state="dismissed", opened_acquired=T0 + timedelta(days=42), last_acquired=None,
                        resolved_at=None),
    ]
    counts = [(T0 + timedelta(days=25), 44.0), {"acquired": T0 + timedelta(days=40), "cars": 6}]
    png = activity_chart("Test — estimated rail cars", obs, alerts, counts=counts)
    img = Image.open(io.BytesIO(png))
    assert img.size[0] >= 1200 and img.size[1] >= 500
    arr = np.asarray(img.convert("RGB"))
    assert arr.std() > 20
    # The old positional call (monitor.py, the demo) still works and draws a picture too.
    old = Image.open(io.BytesIO(activity_chart("t", obs, alerts)))
    assert old.size == img.size
    since = write_chart(tmp_path / "c.png", "t", obs, alerts, since=T0 + timedelta(days=40))
    with Image.open(since) as chart:
        assert chart.size == img.size
    empty = Image.open(io.BytesIO(activity_chart("nothing", [], [])))
    assert np.asarray(empty.convert("L")).std() > 5
