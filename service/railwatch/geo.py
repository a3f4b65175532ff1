"""Grids and projections shared by the simulator, the providers and the masks."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from affine import Affine

from railwatch.domain import Aoi

#: Sentinel-1/-2 analysis resolution in metres.
RESOLUTION_M = 10.0


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the WGS 84 / UTM zone containing (lon, lat)."""
    zone = min(60, max(1, math.floor((lon + 180.0) / 6.0) + 1))
    return (32600 if lat >= 0 else 32700) + zone


@dataclass(frozen=True)
class Grid:
    """A north-up raster grid: CRS (``"EPSG:n"``), affine transform and size."""

    crs: str
    transform: Affine
    width: int
    height: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in the grid's CRS."""
        left, top = self.transform.c, self.transform.f
        return (left, top + self.transform.e * self.height, left + self.transform.a * self.width, top)


def aoi_grid(aoi: Aoi, resolution: float = RESOLUTION_M, pad_m: float = 0.0) -> Grid:
    """The AOI's bounding box in its UTM zone, snapped outwards to whole ``resolution`` cells.

    This is the grid every provider asks for and the simulator renders on, so scenes of one AOI
    from any source line up pixel for pixel.
    """
    west, south, east, north = aoi.bbox
    epsg = utm_epsg((west + east) / 2.0, (south + north) / 2.0)
    tr = transformer("EPSG:4326", f"EPSG:{epsg}")
    xs: list[float] = []
    ys: list[float] = []
    # Densify the box edges: a lon/lat box is not a rectangle in UTM.
    for i in range(11):
        f = i / 10.0
        for lon, lat in ((west + f * (east - west), south), (west + f * (east - west), north),
                         (west, south + f * (north - south)), (east, south + f * (north - south))):
            x, y = tr.transform(lon, lat)
            xs.append(x)
            ys.append(y)
    left = math.floor((min(xs) - pad_m) / resolution) * resolution
    right = math.ceil((max(xs) + pad_m) / resolution) * resolution
    bottom = math.floor((min(ys) - pad_m) / resolution) * resolution
    top = math.ceil((max(ys) + pad_m) / resolution) * resolution
    width = round((right - left) / resolution)
    height = round((top - bottom) / resolution)
    return Grid(f"EPSG:{epsg}", Affine(resolution, 0.0, left, 0.0, -resolution, top), width, height)


@functools.lru_cache(maxsize=64)
def transformer(src_crs: str, dst_crs: str) -> Any:
    """A cached always-xy ``pyproj.Transformer`` (safe to share between threads since pyproj 3.1,
    which gives each thread its own PROJ object)."""
    from pyproj import Transformer

    return Transformer.from_crs(src_crs, dst_crs, always_xy=True)


def reproject_geometry(geom: Any, src_crs: Any, dst_crs: Any) -> Any:
    """Reproject a shapely geometry (always_xy axis order); unchanged when the CRSs are the same."""
    import numpy as np
    import shapely

    src, dst = _crs_key(src_crs), _crs_key(dst_crs)
    if _same_crs(src, dst):
        return geom
    tr = transformer(src, dst)

    def move(xy: Any) -> Any:
        x, y = tr.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    return shapely.transform(geom, move)


def _crs_key(crs: Any) -> str:
    """A hashable name for a CRS given as a string or as a pyproj/rasterio CRS object."""
    if isinstance(crs, str):
        return crs
    from pyproj import CRS

    return str(CRS.from_user_input(crs).to_wkt())


@functools.lru_cache(maxsize=64)
def _same_crs(a: str, b: str) -> bool:
    from pyproj import CRS

    return bool(CRS.from_user_input(a) == CRS.from_user_input(b))
