"""Reading and mask building made lean for large AOIs give exactly the results of the plain versions."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from railwatch import aoi as aoi_mod
from railwatch.aoi import load_aoi
from railwatch.geo import aoi_grid, reproject_geometry
from railwatch.imagery.archive import _median_negative

AOI_DIR = Path(__file__).resolve().parents[2] / "aoi"


def test_median_negative_is_the_sign_of_the_median() -> None:
    rng = np.random.default_rng(0)
    values = np.array([-3, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 2, np.nan], np.float32)
    for _ in range(5000):
        a = rng.choice(values, size=int(rng.integers(0, 12))).astype(np.float32)
        finite = a[np.isfinite(a)]
        assert _median_negative(a) == bool(finite.size and float(np.median(finite)) < 0), a


def _whole_window_coverage(aoi, crs, transform, shape, half_width_m=None):  # type: ignore[no-untyped-def]
    """track_coverage as it was: the band's whole window supersampled at once."""
    coverage = np.zeros(shape, np.float32)
    band, utm = aoi_mod._track_band_utm(aoi, half_width_m)
    band = reproject_geometry(band, utm, crs)
    if band.is_empty:
        return coverage
    a, b, c, d, e, f = tuple(transform)[:6]
    inv = ~Affine(a, b, c, d, e, f)
    minx, miny, maxx, maxy = band.bounds
    corners = [(x, y) for x in (minx, maxx) for y in (miny, maxy)]
    cols = [inv.a * x + inv.b * y + inv.c for x, y in corners]
    rows = [inv.d * x + inv.e * y + inv.f for x, y in corners]
    c0, c1 = max(0, math.floor(min(cols))), min(shape[1], math.ceil(max(cols)))
    r0, r1 = max(0, math.floor(min(rows))), min(shape[0], math.ceil(max(rows)))
    if c0 >= c1 or r0 >= r1:
        return coverage
    n = aoi_mod._SUPERSAMPLE
    fine_tr = Affine(a / n, b / n, c + a * c0 + b * r0, d / n, e / n, f + d * c0 + e * r0)
    fine = aoi_mod._burn(band, fine_tr, ((r1 - r0) * n, (c1 - c0) * n), all_touched=False)
    coverage[r0:r1, c0:c1] = fine.reshape(r1 - r0, n, c1 - c0, n).mean(axis=(1, 3), dtype=np.float32)
    return coverage


@pytest.mark.parametrize("name", ["tumangang-khasan", "sinuiju-dandong"])
def test_strip_coverage_equals_whole_window(name: str) -> None:
    aoi, _ = load_aoi(AOI_DIR / f"{name}.geojson")
    g = aoi_grid(aoi)
    w, s, e, n = aoi.bbox
    grids = [
        (g.crs, g.transform, g.shape),
        (g.crs, g.transform @ Affine.translation(37.3, 11.7), (g.shape[0] // 2, g.shape[1] // 2)),  # partial
        ("EPSG:4326", Affine(0.0001, 0, w, 0, -0.0001, n), (int((n - s) / 0.0001) + 1, int((e - w) / 0.0001) + 1)),
    ]
    for crs, transform, shape in grids:
        for half_width in (None, 20.0):
            got = aoi_mod.track_coverage(aoi, crs, transform, shape, half_width_m=half_width)
            assert np.array_equal(got, _whole_window_coverage(aoi, crs, transform, shape, half_width))
            assert got.any()
