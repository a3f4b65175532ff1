"""Domain values shared by every layer: frozen dataclasses, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

S2 = "sentinel-2-l2a"
S1 = "sentinel-1-grd"
COLLECTIONS: tuple[str, ...] = (S2, S1)

#: Scene status vocabulary (``history`` JSON ``status``).
STATUSES: tuple[str, ...] = ("ok", "partial", "cloudy", "haze", "snow", "nodata", "unreadable", "failed")
#: Statuses whose observation carries a usable activity measure.
USABLE: frozenset[str] = frozenset({"ok", "partial"})

TIME_FORMAT = "%Y%m%dT%H%M%SZ"


def utc(dt: datetime) -> datetime:
    """Return ``dt`` as an aware UTC datetime (naive values are taken as UTC)."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def iso(dt: datetime | None) -> str | None:
    """ISO 8601 UTC with a ``Z`` suffix, to the second."""
    if dt is None:
        return None
    return utc(dt).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Aoi:
    """An area of interest: polygon, rail centrelines, optional yards, per-AOI settings.

    Geometries are GeoJSON mappings in lon/lat (CRS84), so this module needs no geometry library.
    """

    id: str
    name: str
    geometry: Mapping[str, Any]
    tracks: tuple[Mapping[str, Any], ...]
    yards: tuple[Mapping[str, Any], ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def __geo_interface__(self) -> Mapping[str, Any]:
        return self.geometry

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(west, south, east, north) in degrees."""
        xs: list[float] = []
        ys: list[float] = []

        def walk(c: Any) -> None:
            if isinstance(c[0], (int, float)):
                xs.append(float(c[0]))
                ys.append(float(c[1]))
            else:
                for part in c:
                    walk(part)

        walk(self.geometry["coordinates"])
        return (min(xs), min(ys), max(xs), max(ys))


@dataclass(frozen=True)
class SceneRef:
    """One acquisition of one collection over one AOI, as a provider found it."""

    aoi_id: str
    collection: str
    acquired: datetime
    source: str = ""
    orbit_direction: str | None = None
    relative_orbit: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def scene_id(self) -> str:
        return f"{self.collection}_{utc(self.acquired).strftime(TIME_FORMAT)}"


@dataclass(frozen=True, eq=False)
class Raster:
    """Bands of one scene on one grid: ``bands`` maps a band name to a 2-D array."""

    bands: Mapping[str, npt.NDArray[Any]]
    crs: Any  # rasterio.crs.CRS
    transform: Any  # affine.Affine
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        first = next(iter(self.bands.values()))
        return (int(first.shape[0]), int(first.shape[1]))


@dataclass(frozen=True)
class Observation:
    """What the detector concluded about one scene of one AOI."""

    aoi_id: str
    collection: str
    acquired: datetime
    status: str
    reason: str = ""
    estimated_cars: float | None = None
    estimated_cars_low: float | None = None
    estimated_cars_high: float | None = None
    activity: float | None = None
    clear_fraction: float | None = None
    geometry_key: str = ""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    detector_version: str = ""

    @property
    def usable(self) -> bool:
        return self.status in USABLE and self.estimated_cars is not None


FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
