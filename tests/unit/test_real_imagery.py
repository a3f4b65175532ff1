"""The optical path on real Sentinel-2 L1C imagery (../shared/data/imagery: Paris Bercy, Milano).

One GeoTIFF per band, EPSG:4326, digital numbers = reflectance × 10000, no SCL. A yard AOI is drawn
here over tracks visible in the images (Gare de Lyon–Bercy approach; Milano Scalo Farini); the
test checks that the whole optical path runs on real radiometry and real geometry: the grid is
reprojected, the missing SCL falls back to the documented brightness cloud test, and the change and
the estimate are finite. Skipped when the data is absent; the data is never copied into the repo.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from railwatch.analysis import MIN_OPTICAL_REFERENCE, AoiContext, analyse, prepare
from railwatch.aoi import load_aoi
from railwatch.config import DetectorSettings
from railwatch.detect.change import optical_change, optical_reference
from railwatch.detect.quality import OPTICAL_BANDS
from railwatch.domain import S2, Raster, SceneRef

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "imagery"
#: The fill value of these L1C tiles (README: 28000 marks fill).
FILL = 28000

# Track centrelines drawn by eye over the visible rail corridors (lon, lat).
PLACES = {
    "bercy": {
        "tracks": [[[2.3745, 48.8432], [2.3800, 48.8400], [2.3865, 48.8362], [2.3935, 48.8322]],
                   [[2.3752, 48.8440], [2.3810, 48.8407], [2.3875, 48.8370], [2.3945, 48.8330]]],
        "box": [2.3700, 48.8290, 2.3990, 48.8470],
    },
    "milano": {
        "tracks": [[[9.1630, 45.4975], [9.1700, 45.4957], [9.1765, 45.4940], [9.1900, 45.4905]],
                   [[9.1635, 45.4983], [9.1705, 45.4965], [9.1770, 45.4948], [9.1905, 45.4913]]],
        "box": [9.1580, 45.4870, 9.1960, 45.5010],
    },
}


def _dates(folder: Path) -> list[datetime]:
    text = (folder / "dates.txt").read_text()
    return [datetime.strptime(line.split(":")[1].strip(), "%Y%m%d").replace(hour=10, tzinfo=UTC)
            for line in text.splitlines() if ":" in line]


def _raster(folder: Path) -> Raster:
    import rasterio

    bands = {}
    crs = transform = None
    for b in OPTICAL_BANDS:
        (path,) = sorted(folder.glob(f"*_{b}.tif"))
        with rasterio.open(path) as src:
            dn = src.read(1)
            crs, transform = src.crs, src.transform
        bands[b] = np.where(dn == FILL, 0, dn).astype(np.uint16)  # the archive's nodata is 0
    return Raster(bands=bands, crs=crs, transform=transform)


def _aoi(tmp_path: Path, name: str) -> object:
    west, south, east, north = PLACES[name]["box"]
    features = [{"type": "Feature", "properties": {"kind": "aoi", "id": f"{name}-yard", "name": f"{name} yard (test)"},
                 "geometry": {"type": "Polygon", "coordinates": [[[west, south], [east, south], [east, north],
                                                                  [west, north], [west, south]]]}}]
    features += [{"type": "Feature", "properties": {"kind": "track"},
                  "geometry": {"type": "LineString", "coordinates": line}} for line in PLACES[name]["tracks"]]
    path = tmp_path / f"{name}-yard.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}), encoding="utf-8")
    aoi, _warnings = load_aoi(path)
    return aoi


@pytest.mark.parametrize("name", sorted(PLACES))
def test_optical_path_runs_on_real_l1c_without_scl(name: str, tmp_path: Path) -> None:
    folder = DATA / name
    if not (folder / "imgs_1").is_dir() or not (folder / "imgs_2").is_dir():
        pytest.skip(f"real imagery not available at {folder}")
    aoi = _aoi(tmp_path, name)
    ctx = AoiContext.build(aoi, 6.0)  # type: ignore[arg-type]
    assert ctx.track.sum() > 50 and ctx.stable.sum() > 1000
    cfg = DetectorSettings()
    first, second = _dates(folder)
    scenes = []
    for when, sub in ((first, "imgs_1"), (second, "imgs_2")):
        ref = SceneRef(ctx.aoi.id, S2, when, str(folder / sub))
        scene = prepare(ctx, ref, _raster(folder / sub), cfg)
        # No SCL: the documented fallback (very bright = cloud) and a note saying so.
        assert "no SCL band" in scene.quality.reason
        assert scene.quality.status in ("ok", "partial", "cloudy")
        for b in OPTICAL_BANDS:
            on_track = scene.bands[b][ctx.on_zone(ctx.track)]
            assert np.isfinite(on_track).all() and 0.0 <= float(np.median(on_track)) < 0.5
        scenes.append(scene)
    older, newer = scenes
    # Identical scenes: nothing changed.
    stable = ctx.on_zone(ctx.stable) & older.quality.clear
    core = ctx.on_zone(ctx.core)
    same = optical_change(older.bands, optical_reference(older.bands, [older.bands], [older.quality.clear], stable),
                          core & older.quality.clear, stable, zone=ctx.zone, neighbours=core)
    assert same.n_occupied == 0
    # Two real dates (a year apart, other trains): finite change, a finite estimate with its interval.
    # (The older date stands for the three earlier clear scenes an optical reference needs.)
    obs = analyse(ctx, newer, [older] * MIN_OPTICAL_REFERENCE, cfg)
    assert obs.status in ("ok", "partial", "haze", "cloudy")
    assert math.isfinite(float(obs.metrics.get("haze", 0.0)))
    if obs.status in ("ok", "partial"):
        assert obs.estimated_cars is not None and obs.estimated_cars_low is not None
        assert obs.estimated_cars_high is not None
        assert 0 <= obs.estimated_cars_low <= obs.estimated_cars <= obs.estimated_cars_high
        assert all(math.isfinite(obs.metrics[k]) for k in ("n_track", "n_occupied", "threshold"))
        assert 0.0 <= (obs.activity or 0.0) <= 1.0
