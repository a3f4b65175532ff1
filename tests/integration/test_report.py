"""`railwatch report` end to end: a simulated surge, backfilled through the CLI, drawn and checked as images.

The archive is simulated once per session (:func:`surge_archive`, shared with test_triage.py) and
only read; a test that needs to break it works on a copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pyproj import Transformer
from shapely import transform as shp_transform
from shapely.geometry import shape
from shapely.ops import unary_union

from railwatch.domain import iso
from tests.cli_helpers import project, railwatch

AOI = "tumangang-khasan"
# min_history 3 lets a short simulation reach the alert rule; the surge (2025-05-20..06-14) covers
# four radar passes.
DETECTOR = "[detector]\nmin_history = 3\n"
CHROMIUM = Path("/usr/bin/chromium")
HALF_WIDTH_M = 6.0  # [aoi] track_half_width_m default


def surge_archive(factory: pytest.TempPathFactory) -> Path:
    """A simulated archive root with a 160-car surge, made once per session (read-only for tests)."""
    root = factory.getbasetemp() / "surge-archive"
    done = root / ".complete"
    if done.exists():
        return root / "var" / "archive"
    shutil.rmtree(root, ignore_errors=True)
    work = project(root)
    sim = railwatch("simulate", "--aoi", AOI, "--out", "var/archive", "--days", "95", "--seed", "11",
                    "--end", "2025-06-30", "--surge", "2025-05-20:160:26", "--no-progress", cwd=work)
    assert sim.code == 0, sim.err
    done.write_text("ok")
    return work / "var" / "archive"


def surge_project(tmp: Path, factory: pytest.TempPathFactory, extra_toml: str = "") -> Path:
    """A project whose archive is the shared simulated one (a symlink: nothing writes to it)."""
    work = project(tmp, extra_toml=DETECTOR + extra_toml)
    (work / "var").mkdir(exist_ok=True)
    (work / "var" / "archive").symlink_to(surge_archive(factory), target_is_directory=True)
    return work


def _store_read(work: Path, read: Callable[[Any], Any]) -> Any:
    from railwatch.store import Store

    store = Store(f"sqlite:///{work / 'var' / 'railwatch.db'}")
    try:
        return read(store)
    finally:
        store.close()


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = surge_project(tmp_path_factory.mktemp("report"), tmp_path_factory)
    res = railwatch("backfill", "--aoi", AOI, "--no-progress", cwd=work)
    assert res.code == 0, res.err
    alerts = [{"id": a.id, "kind": a.kind, "acquired": iso(a.opened_acquired), "sensor": a.sensor, "state": a.state,
               "ended": iso(a.resolved_at or a.last_acquired or a.opened_acquired)}
              for a in _store_read(work, lambda st: st.alerts(aoi_id=AOI))]
    assert [a for a in alerts if a["kind"] == "activity"], "the simulated surge opened no alert"
    rep = railwatch("report", "--aoi", AOI, "--out", "out", "--format", "json", cwd=work)
    assert rep.code == 0, rep.err
    return {"work": work, "out": work / "out", "alerts": alerts, "result": rep.json()}


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _not_blank(arr: np.ndarray) -> None:
    assert arr.std() > 15, "the picture is (nearly) one colour"
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 50


def _track_mask(work: Path) -> tuple[np.ndarray, Any]:
    from railwatch.analysis import AoiContext
    from railwatch.aoi import load_aoi

    aoi, _ = load_aoi(work / "aoi" / f"{AOI}.geojson")
    ctx = AoiContext.build(aoi, HALF_WIDTH_M)
    return ctx.track, aoi


def test_report_writes_every_file_it_names(reported: dict[str, Any]) -> None:
    out: Path = reported["out"]
    activity = [a for a in reported["alerts"] if a["kind"] == "activity"]
    files = reported["result"]["files"]
    assert set(files) == {"chart", "html"} | {f"quicklook-{a['id']}" for a in activity} | {
        f"changes-{a['id']}" for a in activity}
    for name in ["activity.png", "report.html"] + [f"quicklook-{a['id']}.png" for a in activity] + [
            f"changes-{a['id']}.geojson" for a in activity]:
        assert (out / name).is_file() and (out / name).stat().st_size > 1000, name
    assert reported["result"]["problems"] == []


def test_activity_chart_is_a_readable_picture(reported: dict[str, Any]) -> None:
    arr = _rgb(reported["out"] / "activity.png")
    assert arr.shape[1] >= 1200 and arr.shape[0] >= 500
    _not_blank(arr)
    # Radar estimates are drawn in tab:orange (#ff7f0e) and the alert is shaded.
    r, g, b = (arr[..., i].astype(int) for i in range(3))
    assert ((abs(r - 255) < 10) & (abs(g - 127) < 12) & (b < 40)).sum() > 200


def test_quicklook_highlights_changed_pixels_on_the_track(reported: dict[str, Any]) -> None:
    from railwatch.evidence import LAYOUT_KEY

    track, _aoi = _track_mask(reported["work"])
    for a in (x for x in reported["alerts"] if x["kind"] == "activity"):
        path = reported["out"] / f"quicklook-{a['id']}.png"
        with Image.open(path) as img:
            layout = json.loads(img.info[LAYOUT_KEY])
            arr = np.asarray(img.convert("RGB"))
        assert arr.shape[1] >= 1000 and arr.shape[0] >= 400
        _not_blank(arr)
        assert layout["grid_shape"] == list(track.shape)
        r, g, b = (arr[..., i].astype(int) for i in range(3))
        hi = (r - g > 100) & (b - g > 100)
        left, top, right, bottom = next(p["box"] for p in layout["panels"] if p["name"] == "after")
        ys, xs = np.nonzero(hi)
        inside = (xs >= left) & (xs < right) & (ys >= top) & (ys < bottom)
        assert inside.sum() > 30, "no changed pixel is highlighted"
        r0, r1, c0, c1 = layout["window"]
        cols = c0 + np.floor((xs[inside] + 0.5 - left) / (right - left) * (c1 - c0)).astype(int)
        rows = r0 + np.floor((ys[inside] + 0.5 - top) / (bottom - top) * (r1 - r0)).astype(int)
        on_track = track[np.clip(rows, r0, r1 - 1), np.clip(cols, c0, c1 - 1)]
        assert on_track.mean() > 0.95


def test_changes_geojson_is_valid_and_lies_on_the_tracks(reported: dict[str, Any]) -> None:
    from railwatch.geo import utm_epsg

    _track, aoi = _track_mask(reported["work"])
    west, south, east, north = aoi.bbox
    epsg = utm_epsg((west + east) / 2, (south + north) / 2)
    tr = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)

    def to_utm(xy: np.ndarray) -> np.ndarray:
        x, y = tr.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    tracks = unary_union([shp_transform(shape(t), to_utm) for t in aoi.tracks])
    # Track pixels have their centre within the buffer; a 10 m pixel reaches 7.1 m beyond it.
    corridor = tracks.buffer(HALF_WIDTH_M + 7.5)
    history = {iso(o.acquired): o for o in _store_read(reported["work"], lambda st: st.observations(AOI))}
    for a in (x for x in reported["alerts"] if x["kind"] == "activity"):
        fc = json.loads((reported["out"] / f"changes-{a['id']}.geojson").read_text())
        assert fc["type"] == "FeatureCollection" and fc["features"]
        assert fc["railwatch"]["alert_id"] == a["id"] and fc["railwatch"]["acquired"] == a["acquired"]
        for f in fc["features"]:
            poly = shape(f["geometry"])
            assert f["geometry"]["type"] == "Polygon" and poly.is_valid and poly.exterior.is_ccw
            assert west - 0.01 <= poly.centroid.x <= east + 0.01 and south - 0.01 <= poly.centroid.y <= north + 0.01
            assert corridor.contains(shp_transform(poly, to_utm)), f["properties"]
            assert f["properties"]["magnitude"] > f["properties"]["threshold"]
        # The pixels shown are the ones the detector counted for that scene.
        counted = history[a["acquired"]].metrics.get("n_occupied")
        if counted is not None:
            assert len(fc["features"]) == counted


def test_report_html_opens_in_headless_chromium(reported: dict[str, Any], tmp_path: Path) -> None:
    page = (reported["out"] / "report.html").read_text(encoding="utf-8")
    assert "Tumangang" in page and page.count("data:image/png;base64,") >= 2
    assert 'src="http' not in page and "href=\"http" not in page
    if not CHROMIUM.exists():
        pytest.skip("chromium is not installed (apt-get install -y chromium): cannot open the page headless")
    shot = tmp_path / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--window-size=1200,1600", (reported["out"] / "report.html").as_uri()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBUS")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False, env=env, cwd=tmp_path)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    arr = _rgb(shot)
    assert arr.shape[:2] == (1600, 1200)
    _not_blank(arr)
    # Below the header there are pictures: many colours, not just text on white.
    assert len(np.unique(arr[300:].reshape(-1, 3), axis=0)) > 500


def test_since_latest_and_a_missing_scene(reported: dict[str, Any], tmp_path: Path) -> None:
    work: Path = reported["work"]
    activity = [a for a in reported["alerts"] if a["kind"] == "activity"]
    since = "2025-06-25"
    after = railwatch("report", "--aoi", AOI, "--out", str(tmp_path / "since"), "--since", since, "--format", "json",
                      cwd=work)
    assert after.code == 0, after.err
    # Alerts still open, or running on the date, are in; those over before it are not.
    running = [a["id"] for a in activity if a["state"] in ("provisional", "confirmed") or a["ended"] >= since]
    assert after.json()["alerts"] == running
    assert sorted(p.name for p in (tmp_path / "since").glob("quicklook-*")) == sorted(
        f"quicklook-{i}.png" for i in running)
    page = (tmp_path / "since" / "report.html").read_text(encoding="utf-8")
    assert ("No alert in this period" in page) == (not running)
    assert "scenes from 2025-06-2" in page  # the chart and numbers start at --since too
    # The latest alert's opening scene gone from the archive: reported (exit 1), the rest still written.
    link = work / "var" / "archive"  # the store names scenes by their path through this link
    shared = link.resolve()
    missing = f"{activity[-1]['sensor']}_{activity[-1]['acquired'].replace('-', '').replace(':', '')}.tif"
    broken = tmp_path / "archive"
    (broken / AOI).mkdir(parents=True)
    for f in (shared / AOI).iterdir():
        if f.name != missing:
            (broken / AOI / f.name).symlink_to(f)
    assert (shared / AOI / missing).exists() and not (broken / AOI / missing).exists()
    link.unlink()
    link.symlink_to(broken, target_is_directory=True)
    try:
        res = railwatch("report", "--aoi", AOI, "--out", str(tmp_path / "broken"), "--latest", "--format", "json",
                        cwd=work)
    finally:
        link.unlink()
        link.symlink_to(shared, target_is_directory=True)
    assert res.code == 1, res.err
    problems = res.json()["problems"]
    assert len(problems) == 1 and problems[0].startswith(f"alert {activity[-1]['id']}:")
    assert missing in problems[0]
    assert res.json()["alerts"] == [] and not list((tmp_path / "broken").glob("quicklook-*"))
    assert (tmp_path / "broken" / "report.html").is_file() and (tmp_path / "broken" / "activity.png").is_file()
    assert missing in (tmp_path / "broken" / "report.html").read_text(encoding="utf-8")


def test_render_alert_evidence_for_the_delivery_code(reported: dict[str, Any], tmp_path: Path) -> None:
    from railwatch.config import load_settings
    from railwatch.evidence import EvidenceError, render_alert_evidence
    from railwatch.store import Store

    work: Path = reported["work"]
    settings = load_settings(work / "config" / "railwatch.toml", cwd=work)
    _track, aoi = _track_mask(work)
    store = Store(settings.store.url)
    try:
        alert = next(a for a in reported["alerts"] if a["kind"] == "activity")
        files = render_alert_evidence(store, settings, aoi, alert["id"], tmp_path / "ev")
        assert set(files) == {"chart", "quicklook", "geojson"}
        assert files["chart"].name == f"activity-{alert['id']}.png"
        for p in files.values():
            assert p.is_file() and p.stat().st_size > 1000
        _not_blank(_rgb(files["quicklook"]))
        with pytest.raises(EvidenceError):
            render_alert_evidence(store, settings, aoi, 9999, tmp_path / "ev")
    finally:
        store.close()
