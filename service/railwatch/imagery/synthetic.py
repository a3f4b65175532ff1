"""A scene simulator: writes a realistic Sentinel-1/-2 archive for an AOI, with the truth.

Used by the demo, the tests and the accuracy benchmark. It renders physics, not a detector's
expectations: rail cars of several types (15 m x 3 m, in consists) mix sub-pixel with ballast on
a 2 m sub-grid that is block-averaged to 10 m after a random misregistration shift; land cover
with a seasonal vegetation cycle, buildings, roads and water; clouds, cirrus, cloud shadows, haze
that the scene classification only partly flags, snow, swath-edge nodata and sensor noise for
Sentinel-2; speckled linear sigma0 from two orbit geometries, soil moisture, frozen ground, wet
snow and building layover for Sentinel-1. See docs/simulator.md.

The output follows docs/archive.md exactly, plus ``truth.csv`` and ``surges.csv`` that only tests
and benchmarks may read. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from affine import Affine
from scipy import ndimage

from railwatch.domain import S1, S2, Aoi, Raster, iso
from railwatch.geo import Grid, aoi_grid
from railwatch.imagery.archive import (
    ORBIT_DIRECTION_TAG,
    RELATIVE_ORBIT_TAG,
    parse_scene_filename,
    scene_filename,
    write_scene,
)

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]

# ----------------------------------------------------------------------------------------------
# Constants of the world
# ----------------------------------------------------------------------------------------------

#: Sub-grid factor: scenes are rendered at 10 m / FACTOR (2 m) and block-averaged to 10 m.
FACTOR = 5
#: Largest misregistration shift in sub-grid pixels (2 x 2 m = 0.4 of a 10 m pixel).
MAX_SHIFT = 2
#: Margin of the padded sub-grid, so that every shift stays inside it.
PAD = MAX_SHIFT + 1

CAR_LENGTH_M = 15.0
CAR_WIDTH_M = 3.0
CAR_GAP_M = 1.0
CAR_PITCH_M = CAR_LENGTH_M + CAR_GAP_M
#: Gap kept between two consists on one track.
CONSIST_GAP_M = 4.0

# Land-cover classes of the sub-grid (0 is never used).
FIELD_A, FIELD_B, FIELD_C, FIELD_D, GRASS, FOREST, BARE = 1, 2, 3, 4, 5, 6, 7
GRAVEL, BALLAST, ROAD, ROOF_BRIGHT, ROOF_DARK, ROOF_RED, WATER, CONCRETE = 8, 9, 10, 11, 12, 13, 14, 15
N_LAND = 16
NATURAL = (FIELD_A, FIELD_B, FIELD_C, FIELD_D, GRASS, FOREST, BARE)
ROOFS = (ROOF_BRIGHT, ROOF_DARK, ROOF_RED)
#: Field phenology: (green-up day offset, peak vegetation fraction) per field class.
_FIELDS = {FIELD_A: (-12, 0.85), FIELD_B: (0, 0.92), FIELD_C: (10, 0.75), FIELD_D: (22, 0.80)}

# Surface reflectance spectra (B02, B03, B04, B08), bottom of atmosphere.
GREEN_VEG = (0.030, 0.070, 0.035, 0.420)
DRY_VEG = (0.070, 0.100, 0.130, 0.240)
SOIL = (0.060, 0.085, 0.115, 0.180)
FOREST_LEAF = (0.025, 0.050, 0.025, 0.320)
FOREST_BARE = (0.040, 0.050, 0.050, 0.150)
_STATIC_SPECTRA: Mapping[int, tuple[float, float, float, float]] = {
    BARE: (0.075, 0.100, 0.130, 0.195),
    GRAVEL: (0.140, 0.160, 0.180, 0.220),
    # Ballast bed with sleepers and rails: 0.12-0.18.
    BALLAST: (0.115, 0.130, 0.150, 0.175),
    ROAD: (0.070, 0.080, 0.090, 0.110),
    ROOF_BRIGHT: (0.240, 0.260, 0.270, 0.300),
    ROOF_DARK: (0.070, 0.075, 0.080, 0.100),
    ROOF_RED: (0.070, 0.090, 0.170, 0.220),
    WATER: (0.045, 0.050, 0.030, 0.015),
    CONCRETE: (0.200, 0.220, 0.240, 0.260),
}
SNOW_FRESH = (0.88, 0.87, 0.85, 0.72)
SNOW_OLD = (0.66, 0.65, 0.62, 0.50)
#: Fraction of each class that a full snow cover hides (canopies and cleared roads show through).
_SNOW_HOLD = {FIELD_A: 1.0, FIELD_B: 1.0, FIELD_C: 1.0, FIELD_D: 1.0, GRASS: 0.95, FOREST: 0.35, BARE: 1.0,
              GRAVEL: 0.95, BALLAST: 0.75, ROAD: 0.45, ROOF_BRIGHT: 0.8, ROOF_DARK: 0.8, ROOF_RED: 0.8,
              WATER: 0.0, CONCRETE: 0.6}
CLOUD_SPECTRUM = (1.02, 1.0, 0.99, 1.0)
HAZE_SPECTRUM = (0.10, 0.08, 0.06, 0.035)
CIRRUS_SPECTRUM = (0.11, 0.11, 0.11, 0.11)
OPTICAL_BANDS = ("B02", "B03", "B04", "B08")

# Radar backscatter (VV dB, VH dB) of static classes in dry, unfrozen conditions, ascending.
_RADAR_DB: Mapping[int, tuple[float, float]] = {
    BARE: (-12.5, -21.0), GRAVEL: (-12.0, -19.5), BALLAST: (-12.0, -19.0), ROAD: (-17.0, -25.0),
    ROOF_BRIGHT: (-1.0, -9.0), ROOF_DARK: (-1.0, -9.0), ROOF_RED: (-1.0, -9.0), WATER: (-21.0, -28.0),
    CONCRETE: (-13.0, -21.0),
}
#: Sentinel-1 geometries: relative orbit, local solar time of the pass, heading (deg from north),
#: gain relative to ascending (dB) and the side buildings lay over to (-1 west, +1 east).
GEOMETRIES: Mapping[str, tuple[int, float, float, float, int]] = {
    "descending": (61, 6.2, 192.0, 1.5, 1),
    "ascending": (134, 17.8, 348.0, 0.0, -1),
}
#: Sentinel-2 overpass, local solar time (hours).
S2_LOCAL_TIME = 10.5
S2_REVISIT_DAYS = 5
S1_REPEAT_DAYS = 12
#: Speckle equivalent number of looks of Sentinel-1 IW GRD (high resolution).
ENL = 4.4


@dataclass(frozen=True)
class CarKind:
    """A rail car type: its roof reflectance, radar brightness over ballast and how much snow it holds."""

    name: str
    family: str
    reflectance: tuple[float, float, float, float]
    radar_boost_db: float
    snow_hold: float


CAR_KINDS: tuple[CarKind, ...] = (
    CarKind("tank", "tank", (0.035, 0.036, 0.037, 0.042), 10.5, 0.30),
    CarKind("coal hopper", "hopper", (0.045, 0.048, 0.050, 0.058), 10.0, 0.70),
    CarKind("box car", "box", (0.085, 0.095, 0.135, 0.170), 11.5, 0.50),
    CarKind("ore wagon", "ore", (0.065, 0.075, 0.150, 0.200), 10.0, 0.70),
    CarKind("container red", "container", (0.100, 0.090, 0.330, 0.400), 12.5, 0.50),
    CarKind("container blue", "container", (0.280, 0.240, 0.170, 0.300), 12.5, 0.50),
    CarKind("container white", "container", (0.440, 0.450, 0.450, 0.460), 12.5, 0.50),
    CarKind("container green", "container", (0.160, 0.300, 0.180, 0.340), 12.5, 0.50),
    CarKind("container yellow", "container", (0.120, 0.300, 0.400, 0.440), 12.5, 0.50),
)
_FAMILIES = ("tank", "hopper", "box", "ore", "container")
_FAMILY_WEIGHTS = (0.22, 0.18, 0.15, 0.20, 0.25)
#: Car orientation bins (of 180 degrees) for the radar's dependence on the car's axis.
N_ORIENT = 8


# ----------------------------------------------------------------------------------------------
# Surges
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SurgeSpec:
    """A surge to simulate: from ``start``, for ``days`` days, peaking at ``cars`` cars on site."""

    start: date
    cars: int
    days: int = 10

    def __post_init__(self) -> None:
        if self.cars < 1:
            raise ValueError(f"surge peak must be at least 1 car, got {self.cars}")
        if self.days < 1:
            raise ValueError(f"surge must last at least 1 day, got {self.days}")

    @classmethod
    def parse(cls, text: str) -> SurgeSpec:
        """Parse ``DATE:CARS`` or ``DATE:CARS:DAYS``, e.g. ``2024-06-01:80:10``."""
        usage = f"surge {text!r} must look like DATE:CARS or DATE:CARS:DAYS, e.g. 2024-06-01:80:10"
        parts = text.strip().split(":")
        if len(parts) not in (2, 3):
            raise ValueError(usage)
        try:
            start = date.fromisoformat(parts[0])
        except ValueError:
            raise ValueError(f"{usage} (bad date {parts[0]!r}, expected YYYY-MM-DD)") from None
        try:
            cars = int(parts[1])
            days = int(parts[2]) if len(parts) == 3 else 10
        except ValueError:
            raise ValueError(f"{usage} (CARS and DAYS must be whole numbers)") from None
        if cars < 1 or days < 1:
            raise ValueError(f"{usage} (CARS and DAYS must be at least 1)")
        return cls(start, cars, days)


@dataclass(frozen=True)
class SurgeEpisode:
    """A numbered surge as simulated: first and last local day (inclusive) and the peak."""

    number: int
    start: date
    end: date
    peak_cars: int

    def contains(self, day: date) -> bool:
        return self.start <= day <= self.end


#: The usual number of cars on site is drawn per seed from this range (Tumangang-Khasan: about 10-15
#: cars on an ordinary day, never much more than 20 over five years; larger yards hold a few more).
USUAL_RANGE = (10.0, 18.0)
#: Surge lengths in days, [low, high] inclusive: build-ups before a shipment or a sanctions-evasion
#: push last weeks (and a satellite with a 5-12-day revisit must see them several times).
MEDIUM_SURGE_DAYS = (14, 28)
LARGE_SURGE_DAYS = (21, 42)
#: Dispersion (negative-binomial k) of the daily count: near-Poisson on ordinary days (trains run to
#: a timetable, a yard fills and empties by whole trains but its occupancy is steady), a little more in
#: a surge. Variance = mean + mean²/k.
ORDINARY_DISPERSION_K = 60.0
SURGE_DISPERSION_K = 30.0


def usual_level(seed: int) -> float:
    """The usual number of cars on site for a seed (:data:`USUAL_RANGE`, 10-18)."""
    return float(np.random.default_rng([seed, 3]).uniform(*USUAL_RANGE))


def default_surges(start: date, end: date, *, seed: int, usual_cars: float | None = None) -> list[SurgeSpec]:
    """The surge(s) a default simulation contains.

    One large surge (3-5x usual, 21-42 days) starting in the last third of the period and ending
    at least four days before its end; periods of 240 days or more also get an earlier, medium
    surge (2.5-3x, 14-28 days) in their first half. Short periods shorten the surge to fit.
    """
    rng = np.random.default_rng([seed, 9])
    usual = usual_level(seed) if usual_cars is None else usual_cars
    days = (end - start).days + 1
    if days < 1:
        raise ValueError(f"empty period {start}..{end}")
    length = int(rng.integers(LARGE_SURGE_DAYS[0], LARGE_SURGE_DAYS[1] + 1))
    first = min(end, start + timedelta(days=math.ceil(2 * days / 3)))
    last = end - timedelta(days=length + 4)
    if last < first:  # a short period: fit the surge between two thirds and four days before the end
        length = max(1, min(length, (end - first).days - 4))
        last = first
    offset = int(rng.integers(0, (last - first).days + 1))
    factor = float(rng.uniform(3.0, 5.0))
    specs = [SurgeSpec(first + timedelta(days=offset), max(1, round(usual * factor)), length)]
    if days >= 240:
        m_len = int(rng.integers(MEDIUM_SURGE_DAYS[0], MEDIUM_SURGE_DAYS[1] + 1))
        m_start = start + timedelta(days=int(rng.integers(days // 6, days // 2 - m_len)))
        specs.insert(0, SurgeSpec(m_start, max(1, round(usual * float(rng.uniform(2.5, 3.0)))), m_len))
    return specs


def _episodes(specs: Sequence[SurgeSpec]) -> list[SurgeEpisode]:
    ordered = sorted(specs, key=lambda s: s.start)
    return [SurgeEpisode(i, s.start, s.start + timedelta(days=s.days - 1), s.cars)
            for i, s in enumerate(ordered, start=1)]


# ----------------------------------------------------------------------------------------------
# Weather and the daily car count
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DayWeather:
    """Ground conditions of one local day."""

    temp_c: float
    precip_mm: float
    snow_cover: float  # 0..1 of open ground
    fresh_snow: float  # 0..1, how recently snow fell (1 = today)
    wet_snow: bool
    frozen: bool  # ground and standing water frozen
    soil_moisture: float  # 0..1


# Daily precipitation probability by month (East Asian monsoon: wet July-August, dry winter).
_P_PRECIP = (0.10, 0.10, 0.15, 0.22, 0.28, 0.38, 0.52, 0.52, 0.35, 0.22, 0.15, 0.10)


def _season_doy(day: date, lat: float) -> int:
    """Day of year, shifted by half a year south of the equator so seasons line up."""
    doy = day.timetuple().tm_yday
    return doy if lat >= 0 else (doy + 182) % 365 + 1


def simulate_weather(seed: int, first: date, last: date, lat: float) -> dict[date, DayWeather]:
    """Daily weather of a continental north-east Asian climate (Tumen valley) from ``first`` to ``last``.

    Draws are keyed by date, and the snowpack is run from the 1st of September before ``first``,
    so a day's weather does not depend on where the simulated period starts within a season.
    """
    anchor = date(first.year if first.month >= 9 else first.year - 1, 9, 1)
    out: dict[date, DayWeather] = {}
    anomaly = 0.0
    swe = 0.0  # snow water equivalent, mm
    moisture = 0.4
    since_snow = 99
    cold = 0.0  # running mean of temperature over about ten days
    day = anchor
    while day <= last:
        rng = np.random.default_rng([seed, 2, day.toordinal()])
        doy = _season_doy(day, lat)
        clim = 6.5 - 15.5 * math.cos(2 * math.pi * (doy - 25) / 365.25)
        anomaly = 0.75 * anomaly + float(rng.normal(0.0, 2.6))
        temp = clim + anomaly
        cold = 0.9 * cold + 0.1 * temp if day != anchor else temp
        precip = float(rng.gamma(0.8, 9.0)) if rng.random() < _P_PRECIP[day.month - 1] else 0.0
        if precip > 0 and temp < 0.5:
            swe += precip
            since_snow = 0
        else:
            since_snow += 1
            moisture = min(1.0, moisture + precip / 25.0)
        if temp > 0 and swe > 0:
            swe = max(0.0, swe - (3.5 * temp + 1.0))
        swe = max(0.0, swe - 0.15)  # sublimation
        moisture = max(0.05, moisture * math.exp(-1.0 / 6.0))
        if day >= first:
            cover = min(1.0, swe / 8.0)
            out[day] = DayWeather(
                temp_c=temp,
                precip_mm=precip,
                snow_cover=cover,
                fresh_snow=math.exp(-since_snow / 4.0) if cover > 0 else 0.0,
                wet_snow=cover > 0 and temp > -0.5,
                frozen=cold < -1.0,
                soil_moisture=moisture,
            )
        day += timedelta(days=1)
    return out


_WEEKLY = (1.05, 1.05, 1.0, 1.0, 1.05, 0.92, 0.88)  # Monday..Sunday


def daily_mean_cars(seed: int, day: date, usual: float, episodes: Sequence[SurgeEpisode]) -> float:
    """Expected cars on site on a local day: a slowly varying usual level, a weekly pattern and surges.

    The slow swing (periods of 23 days, two months and a year) stays within about ±12 %: the usual
    level of a border yard moves with the season and the timetable, not by a factor of two.
    """
    ph = np.random.default_rng([seed, 5]).uniform(0.0, 2 * math.pi, 3)
    t = day.toordinal()
    slow = (0.05 * math.sin(2 * math.pi * t / 61.0 + ph[0]) + 0.04 * math.sin(2 * math.pi * t / 23.0 + ph[1])
            + 0.03 * math.sin(2 * math.pi * t / 365.25 + ph[2]))
    mean = usual * math.exp(slow) * _WEEKLY[day.weekday()]
    for ep in episodes:
        if ep.contains(day):
            ramp = np.random.default_rng([seed, 6, ep.number]).integers(1, 4, 2)
            k = (day - ep.start).days
            n = (ep.end - ep.start).days + 1
            profile = min(1.0, (k + 1) / (ramp[0] + 1)) * min(1.0, (n - k) / (ramp[1] + 1))
            mean = max(mean, ep.peak_cars * profile)
    return mean


def daily_cars(seed: int, day: date, usual: float, episodes: Sequence[SurgeEpisode]) -> int:
    """Cars on site on a local day: negative binomial around the daily mean, near-Poisson on ordinary
    days (:data:`ORDINARY_DISPERSION_K`) and a little more dispersed in a surge."""
    mean = daily_mean_cars(seed, day, usual, episodes)
    k = SURGE_DISPERSION_K if any(ep.contains(day) for ep in episodes) else ORDINARY_DISPERSION_K
    rng = np.random.default_rng([seed, 4, day.toordinal()])
    return int(rng.negative_binomial(k, k / (k + mean)))


# ----------------------------------------------------------------------------------------------
# The landscape: static land cover on the sub-grid, tracks and yards
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TrackPiece:
    """A stretch of track (UTM) where cars may stand, with its parking preference."""

    line: Any  # shapely LineString
    weight: float

    @property
    def length(self) -> float:
        return float(self.line.length)


@dataclass(frozen=True, eq=False)
class Landscape:
    """Everything about an AOI's ground that does not change between scenes.

    ``classes`` is the land cover on the padded sub-grid (``FACTOR`` sub-pixels per 10 m pixel,
    ``PAD`` sub-pixels of margin); the other arrays are on the 10 m grid.
    """

    aoi_id: str
    grid: Grid
    lon: float
    lat: float
    classes: npt.NDArray[np.uint8]
    fine_transform: Affine
    tracks: tuple[TrackPiece, ...]
    track_mask: npt.NDArray[np.bool_]
    parcels: npt.NDArray[np.int32]  # parcel id where a 10 m pixel is one natural parcel, else 0
    water_fraction: F32
    building_fraction: F32
    optical_texture: F32
    radar_texture: F32
    roof_radar_gain: Mapping[str, F32]
    seed: int
    block_key: npt.NDArray[np.int32]  # per sub-pixel of the unpadded view: 10 m pixel index x N_LAND

    @property
    def shape(self) -> tuple[int, int]:
        return self.grid.shape


def _as_geometry(obj: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """(geometry, properties) of a GeoJSON geometry or Feature."""
    if obj.get("type") == "Feature":
        return obj["geometry"], obj.get("properties") or {}
    return obj, {}


def _lines(geom: Any) -> list[Any]:
    from shapely.geometry import LineString, MultiLineString

    if isinstance(geom, LineString):
        return [geom] if not geom.is_empty else []
    if isinstance(geom, MultiLineString):
        return [g for g in geom.geoms if not g.is_empty]
    if hasattr(geom, "geoms"):
        return [p for g in geom.geoms for p in _lines(g)]
    return []


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> F32:
    """Standardised Gaussian-smoothed white noise."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return ((f - f.mean()) / (f.std() + 1e-9)).astype(np.float32)


def _rect(cx: float, cy: float, length: float, width: float, angle: float) -> Any:
    """A rectangle centred on (cx, cy), its long side at ``angle`` (radians from east)."""
    from shapely.geometry import Polygon

    ux, uy = math.cos(angle), math.sin(angle)
    vx, vy = -uy, ux
    hl, hw = length / 2, width / 2
    return Polygon([(cx + ux * hl + vx * hw, cy + uy * hl + vy * hw), (cx - ux * hl + vx * hw, cy - uy * hl + vy * hw),
                    (cx - ux * hl - vx * hw, cy - uy * hl - vy * hw), (cx + ux * hl - vx * hw, cy + uy * hl - vy * hw)])


def _projector(crs: str) -> Callable[[Any], Any]:
    """Reproject shapely geometries from lon/lat (CRS84) to ``crs``."""
    import shapely
    from pyproj import Transformer

    tr = Transformer.from_crs("EPSG:4326", crs, always_xy=True)

    def project(geom: Any) -> Any:
        return shapely.transform(geom, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))

    return project


def _block_mean(a: npt.NDArray[Any], f: int) -> F32:
    h, w = a.shape[0] // f, a.shape[1] // f
    return a[: h * f, : w * f].reshape(h, f, w, f).mean(axis=(1, 3), dtype=np.float32)


def build_landscape(aoi: Aoi, seed: int) -> Landscape:
    """Generate the AOI's static ground: fields, forest, buildings, roads, water, track beds and yards."""
    from rasterio import features
    from shapely.geometry import LineString, shape
    from shapely.ops import unary_union

    rng = np.random.default_rng([seed, 1])
    grid = aoi_grid(aoi)
    crs = grid.crs
    height, width = grid.shape
    f = FACTOR
    res = grid.transform.a / f
    left, top = grid.transform.c, grid.transform.f
    fine_tr = Affine(res, 0.0, left - PAD * res, 0.0, -res, top + PAD * res)
    west, south, east, north = aoi.bbox
    lon, lat = (west + east) / 2, (south + north) / 2

    to_utm = _projector(crs)
    polygon = to_utm(shape(aoi.geometry))
    yards = [to_utm(shape(_as_geometry(y)[0])) for y in aoi.yards]
    yard_area = unary_union(yards) if yards else None
    lines = [part for t in aoi.tracks for part in _lines(to_utm(shape(_as_geometry(t)[0])))]
    all_tracks = unary_union(lines) if lines else None

    # Cars stand on track inside the AOI. They park preferably in yards (weight 4) and on sidings,
    # i.e. track with another track running alongside within 8 m (weight up to 3); plain line 1.
    pieces: list[TrackPiece] = []
    for i, ln in enumerate(lines):
        inside = ln.intersection(polygon)
        if yard_area is not None:
            pieces.extend(TrackPiece(part, 4.0) for part in _lines(inside.intersection(yard_area)))
            inside = inside.difference(yard_area)
        others = [o for j, o in enumerate(lines) if j != i]
        beside = unary_union(others).buffer(8.0) if others else None
        for part in _lines(inside):
            share = part.intersection(beside).length / part.length if beside is not None and part.length else 0.0
            pieces.append(TrackPiece(part, 1.0 + 2.0 * share))
    pieces = [p for p in pieces if p.length >= CAR_LENGTH_M + 1.0]

    # Parcels: an anisotropic Voronoi partition of the 10 m grid, classes biased by a smooth field.
    cell = 170.0
    ext_w, ext_h = width * 10.0, height * 10.0
    n_seeds = max(4, int(ext_w * ext_h / cell**2))
    sx = rng.uniform(-100, ext_w + 100, n_seeds)
    sy = rng.uniform(-100, ext_h + 100, n_seeds)
    stretch = 0.55
    from scipy.spatial import cKDTree

    tree = cKDTree(np.column_stack([sx * stretch, sy]))
    cy, cx = np.mgrid[0:height, 0:width]
    _, nearest = tree.query(np.column_stack([(cx.ravel() * 10 + 5) * stretch, cy.ravel() * 10 + 5]))
    parcel_of = nearest.reshape(height, width).astype(np.int32) + 1
    wild = _smooth_field(rng, (height, width), sigma=25.0)
    sums = np.bincount(parcel_of.ravel(), weights=wild.ravel(), minlength=n_seeds + 1)[1:]
    sizes = np.bincount(parcel_of.ravel(), minlength=n_seeds + 1)[1:]
    wild_mean = np.divide(sums, sizes, out=np.zeros_like(sums), where=sizes > 0)
    choice = rng.random(n_seeds)
    pclass = np.empty(n_seeds + 1, np.uint8)
    pclass[0] = GRASS
    for i in range(n_seeds):
        w = float(wild_mean[i])
        c = choice[i]
        if w > 0.7:
            pclass[i + 1] = FOREST if c < 0.8 else GRASS
        elif w > 0.1:
            pclass[i + 1] = GRASS if c < 0.4 else (FOREST if c < 0.55 else FIELD_A + int(c * 40) % 4)
        else:
            pclass[i + 1] = BARE if c < 0.08 else (GRASS if c < 0.22 else FIELD_A + int(c * 40) % 4)
    land10 = pclass[parcel_of]
    classes = np.pad(np.repeat(np.repeat(land10, f, axis=0), f, axis=1), PAD, mode="edge").astype(np.uint8)

    def burn(geoms: Sequence[Any], value: int) -> None:
        geoms = [g for g in geoms if g is not None and not g.is_empty]
        if geoms:
            features.rasterize([(g, value) for g in geoms], out=classes, transform=fine_tr)

    # Frame of the grid in UTM, for random placements.
    x0, y1 = left, top
    x1, y0 = left + ext_w, top - ext_h
    frame = LineString([(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]).convex_hull
    corridor = all_tracks.buffer(9.0) if all_tracks is not None else None
    keep_clear = all_tracks.buffer(14.0) if all_tracks is not None else None

    # A river across the scene, now and then, bridged where the tracks cross it.
    if rng.random() < 0.5:
        ang = rng.uniform(0, math.pi)
        amp, wave, half = rng.uniform(80, 250), rng.uniform(900, 2000), rng.uniform(18, 40)
        cxm, cym = (x0 + x1) / 2 + rng.uniform(-0.35, 0.35) * ext_w, (y0 + y1) / 2 + rng.uniform(-0.35, 0.35) * ext_h
        span = math.hypot(ext_w, ext_h)
        s = np.linspace(-span, span, 400)
        off = amp * np.sin(2 * math.pi * s / wave)
        xs = cxm + s * math.cos(ang) - off * math.sin(ang)
        ys = cym + s * math.sin(ang) + off * math.cos(ang)
        river = LineString(np.column_stack([xs, ys])).buffer(half).intersection(frame.buffer(50))
        if all_tracks is not None:
            river = river.difference(all_tracks.buffer(40.0))
        burn([river], WATER)

    # Roads: a few straight roads through the scene and a service road along the longest track.
    roads = []
    for _ in range(int(rng.integers(2, 4))):
        px, py = rng.uniform(x0, x1), rng.uniform(y0, y1)
        ang = rng.uniform(0, math.pi)
        d = math.hypot(ext_w, ext_h)
        roads.append(LineString([(px - d * math.cos(ang), py - d * math.sin(ang)),
                                 (px + d * math.cos(ang), py + d * math.sin(ang))]).buffer(rng.uniform(2.5, 4.0)))
    longest = max(lines, key=lambda g: g.length, default=None)
    if longest is not None:
        side = 1 if rng.random() < 0.5 else -1
        service = longest.offset_curve(side * rng.uniform(25, 40))
        if not service.is_empty:
            roads.append(service.buffer(3.0))
    burn(roads, ROAD)

    # Track corridor (embankment gravel) and yards, then buildings beside them.
    if corridor is not None:
        burn([corridor], GRAVEL)
    if yard_area is not None:
        burn([yard_area], GRAVEL)
    buildings: list[tuple[Any, int]] = []
    if longest is not None:
        # Station and warehouses beside the tracks, aligned with them.
        mid = longest.interpolate(0.5, normalized=True)
        a = longest.interpolate(0.45, normalized=True)
        b = longest.interpolate(0.55, normalized=True)
        ang = math.atan2(b.y - a.y, b.x - a.x)
        nx, ny = -math.sin(ang), math.cos(ang)
        side = 1 if rng.random() < 0.5 else -1
        for _ in range(int(rng.integers(3, 6))):
            along, across = rng.uniform(-250, 250), side * rng.uniform(35, 90)
            bx = mid.x + along * math.cos(ang) + across * nx
            by = mid.y + along * math.sin(ang) + across * ny
            buildings.append((_rect(bx, by, rng.uniform(35, 80), rng.uniform(14, 24), ang), ROOF_BRIGHT))
        for _ in range(int(rng.integers(6, 14))):
            along, across = rng.uniform(-400, 400), side * rng.uniform(30, 160) * (1 if rng.random() < 0.8 else -1)
            bx = mid.x + along * math.cos(ang) + across * nx
            by = mid.y + along * math.sin(ang) + across * ny
            roof = (ROOF_BRIGHT, ROOF_DARK, ROOF_RED)[int(rng.integers(0, 3))]
            buildings.append((_rect(bx, by, rng.uniform(10, 30), rng.uniform(8, 16), ang), roof))
    for _ in range(int(rng.integers(1, 3))):  # villages
        vx, vy = rng.uniform(x0, x1), rng.uniform(y0, y1)
        vang = rng.uniform(0, math.pi)
        for _ in range(int(rng.integers(10, 30))):
            bx, by = vx + rng.normal(0, 120), vy + rng.normal(0, 90)
            roof = (ROOF_DARK, ROOF_RED, ROOF_BRIGHT)[int(rng.choice(3, p=[0.45, 0.4, 0.15]))]
            buildings.append((_rect(bx, by, rng.uniform(8, 16), rng.uniform(7, 11), vang), roof))
    placed = []
    for poly, roof in buildings:
        if keep_clear is not None and poly.intersects(keep_clear):
            continue
        placed.append((poly, roof))
        burn([poly.buffer(4.0)], CONCRETE if roof == ROOF_BRIGHT else BARE)
    for poly, roof in placed:
        burn([poly], roof)
    if all_tracks is not None:
        # Ballast bed about 3.6 m wide (sleepers 2.6 m plus shoulders).
        burn([all_tracks.buffer(1.8, cap_style="flat")], BALLAST)

    inner = classes[PAD: PAD + height * f, PAD: PAD + width * f]
    ballast_frac = _block_mean(inner == BALLAST, f)
    water_frac = _block_mean(inner == WATER, f)
    roof_frac = _block_mean(np.isin(inner, ROOFS), f)
    pure = _block_mean(inner == np.repeat(np.repeat(land10, f, 0), f, 1), f) >= 1.0
    parcels = np.where(pure & np.isin(land10, NATURAL), parcel_of, 0).astype(np.int32)

    # Static textures: parcel-to-parcel differences (soil, crop) and pixel-level roughness.
    pgain = rng.normal(1.0, 0.06, n_seeds + 1).astype(np.float32)
    pgain_db = rng.normal(0.0, 0.8, n_seeds + 1).astype(np.float32)
    natural10 = np.isin(land10, NATURAL)
    opt_tex = np.where(natural10, pgain[parcel_of], 1.0).astype(np.float32)
    opt_tex *= (1.0 + 0.025 * rng.standard_normal((height, width))).astype(np.float32)
    rad_tex = np.where(natural10, 10.0 ** (pgain_db[parcel_of] / 10.0), 1.0).astype(np.float32)
    rad_tex *= (1.0 + 0.04 * rng.standard_normal((height, width))).astype(np.float32)
    roof_gain = {
        geom: (10.0 ** (np.random.default_rng([seed, 7, i]).normal(0.0, 3.0, (height, width)) / 10.0)).astype(np.float32)
        for i, geom in enumerate(GEOMETRIES)
    }
    return Landscape(
        aoi_id=aoi.id, grid=grid, lon=lon, lat=lat, classes=classes, fine_transform=fine_tr,
        tracks=tuple(pieces), track_mask=ballast_frac >= 0.15, parcels=parcels,
        water_fraction=water_frac, building_fraction=roof_frac, optical_texture=opt_tex,
        radar_texture=rad_tex, roof_radar_gain=roof_gain, seed=seed,
        block_key=((np.arange(height * f, dtype=np.int32) // f)[:, None] * width
                   + (np.arange(width * f, dtype=np.int32) // f)[None, :]) * N_LAND,
    )


# ----------------------------------------------------------------------------------------------
# Cars
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Car:
    """One rail car: centre (UTM), axis angle (radians from east) and kind (index into CAR_KINDS)."""

    x: float
    y: float
    angle: float
    kind: int


def _consist_sizes(n: int, rng: np.random.Generator) -> list[int]:
    sizes: list[int] = []
    while n > 0:
        size = min(n, int(rng.integers(3, 31)))
        sizes.append(size)
        n -= size
    return sizes


def _consist_kinds(n: int, rng: np.random.Generator) -> list[int]:
    by_family = {fam: [i for i, k in enumerate(CAR_KINDS) if k.family == fam] for fam in _FAMILIES}
    if rng.random() < 0.25:  # a mixed train
        fams = rng.choice(len(_FAMILIES), size=n, p=_FAMILY_WEIGHTS)
    else:
        fams = np.full(n, rng.choice(len(_FAMILIES), p=_FAMILY_WEIGHTS))
    out = []
    for fm in fams:
        options = by_family[_FAMILIES[int(fm)]]
        out.append(options[int(rng.integers(0, len(options)))])
    return out


def place_cars(land: Landscape, n: int, rng: np.random.Generator) -> list[Car]:
    """Park ``n`` cars in consists of 3-30 on the AOI's tracks, yards and sidings preferred.

    Consists never overlap; a consist that finds no room is split, and cars that still do not
    fit are not placed (the truth counts only the cars placed).
    """
    import shapely

    if n <= 0 or not land.tracks:
        return []
    lengths = np.array([t.length for t in land.tracks])
    weights = np.array([t.weight for t in land.tracks]) * lengths
    occupied: list[list[tuple[float, float]]] = [[] for _ in land.tracks]
    cars: list[Car] = []
    queue = _consist_sizes(n, rng)
    misses = 0  # single cars in a row that found no room: the tracks are full
    while queue and misses < 20:
        size = queue.pop(0)
        span = size * CAR_PITCH_M - CAR_GAP_M
        fits = lengths >= span
        if not fits.any():
            if size > 1:
                queue[:0] = [size // 2, size - size // 2]
            continue
        p = np.where(fits, weights, 0.0)
        p = p / p.sum()
        done = False
        for _ in range(25):
            ti = int(rng.choice(len(land.tracks), p=p))
            s0 = float(rng.uniform(0.0, lengths[ti] - span))
            s1 = s0 + span
            if all(s1 + CONSIST_GAP_M <= a or s0 >= b + CONSIST_GAP_M for a, b in occupied[ti]):
                occupied[ti].append((s0, s1))
                line = land.tracks[ti].line
                centres = s0 + CAR_LENGTH_M / 2 + CAR_PITCH_M * np.arange(size)
                if rng.random() < 0.5:  # which end the consist was built from does not matter,
                    centres = centres[::-1]  # but keeps kinds from always starting at the same end
                mids = shapely.line_interpolate_point(line, centres)
                ahead = shapely.line_interpolate_point(line, np.minimum(centres + CAR_LENGTH_M / 2, lengths[ti]))
                behind = shapely.line_interpolate_point(line, np.maximum(centres - CAR_LENGTH_M / 2, 0.0))
                mx, my = shapely.get_x(mids), shapely.get_y(mids)
                ang = np.arctan2(shapely.get_y(ahead) - shapely.get_y(behind),
                                 shapely.get_x(ahead) - shapely.get_x(behind))
                kinds = _consist_kinds(size, rng)
                cars.extend(Car(float(x), float(y), float(a), k) for x, y, a, k in zip(mx, my, ang, kinds, strict=True))
                done = True
                break
        if done:
            misses = 0
        elif size > 1:
            queue[:0] = [size // 2, size - size // 2]
        else:
            misses += 1
    if len(cars) < n:
        log.debug("only %d of %d cars fit on the tracks of %s", len(cars), n, land.aoi_id)
    return cars


def _car_code(car: Car) -> int:
    """Index of a car in the car look-up tables: kind x orientation bin."""
    bearing = (90.0 - math.degrees(car.angle)) % 180.0  # axis bearing from north, 0..180
    return car.kind * N_ORIENT + int(bearing // (180.0 / N_ORIENT)) % N_ORIENT


def _car_pixels(land: Landscape, cars: Sequence[Car]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.int32]]:
    """Rasterise cars on the padded sub-grid: (rows, cols, car codes) of covered sub-pixels."""
    from rasterio import features

    empty = (np.empty(0, np.intp), np.empty(0, np.intp), np.empty(0, np.int32))
    if not cars:
        return empty
    polys = [(_rect(c.x, c.y, CAR_LENGTH_M, CAR_WIDTH_M, c.angle), _car_code(c) + 1) for c in cars]
    xs = [p.bounds for p, _ in polys]
    tr = land.fine_transform  # north-up: a > 0, e < 0
    west, south = min(b[0] for b in xs), min(b[1] for b in xs)
    east, north = max(b[2] for b in xs), max(b[3] for b in xs)
    r0 = max(0, math.floor((north - tr.f) / tr.e) - 1)
    c0 = max(0, math.floor((west - tr.c) / tr.a) - 1)
    r1 = min(land.classes.shape[0], math.ceil((south - tr.f) / tr.e) + 1)
    c1 = min(land.classes.shape[1], math.ceil((east - tr.c) / tr.a) + 1)
    if r1 <= r0 or c1 <= c0:
        return empty
    window_tr = Affine(tr.a, 0.0, tr.c + c0 * tr.a, 0.0, tr.e, tr.f + r0 * tr.e)
    burned = features.rasterize(polys, out_shape=(r1 - r0, c1 - c0), fill=0, transform=window_tr, dtype="int32")
    rows, cols = np.nonzero(burned)
    return rows + r0, cols + c0, (burned[rows, cols] - 1).astype(np.int32)


@dataclass(frozen=True)
class _Composition:
    """How many sub-pixels of each land class and of each car fall in each 10 m pixel."""

    counts: F32  # (H*W, N_LAND)
    car_block: npt.NDArray[np.intp]
    car_code: npt.NDArray[np.int32]
    car_under: npt.NDArray[np.uint8]

    def mix(self, land_lut: F32, car_lut: F32) -> F32:
        """Area-weighted mean of a per-class quantity per 10 m pixel, (H*W, bands)."""
        out = self.counts @ land_lut
        if self.car_block.size:
            np.add.at(out, self.car_block, car_lut[self.car_code] - land_lut[self.car_under])
        return out / float(FACTOR * FACTOR)


def _compose(land: Landscape, cars: Sequence[Car], shift: tuple[int, int]) -> _Composition:
    h, w = land.shape
    f = FACTOR
    dy, dx = shift
    view = land.classes[PAD + dy: PAD + dy + h * f, PAD + dx: PAD + dx + w * f]
    counts = np.bincount((land.block_key + view).ravel(), minlength=h * w * N_LAND)
    rows, cols, codes = _car_pixels(land, cars)
    vr, vc = rows - (PAD + dy), cols - (PAD + dx)
    ok = (vr >= 0) & (vr < h * f) & (vc >= 0) & (vc < w * f)
    vr, vc = vr[ok], vc[ok]
    return _Composition(
        counts=counts.reshape(h * w, N_LAND).astype(np.float32),
        car_block=(vr // f) * w + vc // f,
        car_code=codes[ok],
        car_under=land.classes[rows[ok], cols[ok]],
    )


# ----------------------------------------------------------------------------------------------
# Sentinel-2
# ----------------------------------------------------------------------------------------------


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _vegetation(doy: int) -> dict[int, tuple[float, float, float, float]]:
    """Spectra of the natural classes on a day of the year (green-up May, harvest September)."""
    g, d, s = np.array(GREEN_VEG), np.array(DRY_VEG), np.array(SOIL)
    out: dict[int, tuple[float, float, float, float]] = {}
    for cls, (shift, peak) in _FIELDS.items():
        fv = peak * _sig((doy - 150 - shift) / 8.0) * (1.0 - _sig((doy - 255 - shift) / 7.0))
        out[cls] = tuple(fv * g + (1 - fv) * (0.4 * d + 0.6 * s))  # type: ignore[assignment]
    fg = 0.12 + 0.7 * _sig((doy - 125) / 10.0) * (1.0 - _sig((doy - 285) / 10.0))
    out[GRASS] = tuple(fg * g + (1 - fg) * d)  # type: ignore[assignment]
    leaf = _sig((doy - 135) / 7.0) * (1.0 - _sig((doy - 290) / 8.0))
    out[FOREST] = tuple(leaf * np.array(FOREST_LEAF) + (1 - leaf) * np.array(FOREST_BARE))  # type: ignore[assignment]
    return out


def _vegetation_fraction(doy: int) -> dict[int, float]:
    """Green biomass proxy (0..1) of the natural classes, for the radar."""
    out = {cls: peak * _sig((doy - 150 - s) / 8.0) * (1.0 - _sig((doy - 255 - s) / 7.0)) for cls, (s, peak) in _FIELDS.items()}
    out[GRASS] = 0.12 + 0.7 * _sig((doy - 125) / 10.0) * (1.0 - _sig((doy - 285) / 10.0))
    out[FOREST] = _sig((doy - 135) / 7.0) * (1.0 - _sig((doy - 290) / 8.0))
    out[BARE] = 0.0
    return out


def _optical_luts(doy: int, weather: DayWeather) -> tuple[F32, F32, F32, F32, F32, F32]:
    """(land, car) reflectance tables without snow, with full snow, and the snow fraction of each."""
    land = np.zeros((N_LAND, 4), np.float32)
    for cls, spec in {**_STATIC_SPECTRA, **_vegetation(doy)}.items():
        land[cls] = spec
    if weather.frozen:  # ice on still water looks like bare grey ice
        land[WATER] = (0.20, 0.21, 0.21, 0.18)
    cars = np.zeros((len(CAR_KINDS) * N_ORIENT, 4), np.float32)
    for i, kind in enumerate(CAR_KINDS):
        cars[i * N_ORIENT: (i + 1) * N_ORIENT] = kind.reflectance
    age = weather.fresh_snow
    snow = age * np.array(SNOW_FRESH, np.float32) + (1 - age) * np.array(SNOW_OLD, np.float32)
    land_hold = np.array([_SNOW_HOLD.get(c, 0.0) for c in range(N_LAND)], np.float32)
    if weather.frozen:
        land_hold[WATER] = 1.0
    car_hold = np.repeat(np.array([k.snow_hold for k in CAR_KINDS], np.float32), N_ORIENT)
    car_hold *= 0.3 + 0.7 * age  # snow slides off and is shaken off running cars
    land_snow = (land * (1 - land_hold[:, None]) + snow[None, :] * land_hold[:, None]).astype(np.float32)
    car_snow = (cars * (1 - car_hold[:, None]) + snow[None, :] * car_hold[:, None]).astype(np.float32)
    return land, cars, land_snow, car_snow, land_hold[:, None], car_hold[:, None]


def sun_position(when: datetime, lon: float, lat: float) -> tuple[float, float]:
    """(elevation, azimuth) of the sun in degrees, azimuth clockwise from north."""
    doy = when.timetuple().tm_yday
    decl = math.radians(23.44) * math.sin(2 * math.pi * (284 + doy) / 365.0)
    solar_h = when.hour + when.minute / 60 + when.second / 3600 + lon / 15.0
    ha = math.radians(15.0 * (solar_h - 12.0))
    phi = math.radians(lat)
    sin_el = math.sin(phi) * math.sin(decl) + math.cos(phi) * math.cos(decl) * math.cos(ha)
    el = math.asin(max(-1.0, min(1.0, sin_el)))
    az = math.atan2(-math.sin(ha) * math.cos(decl),
                    math.cos(phi) * math.sin(decl) - math.sin(phi) * math.cos(decl) * math.cos(ha))
    return math.degrees(el), math.degrees(az) % 360.0


@dataclass(frozen=True)
class Sky:
    """The random state of one optical acquisition: atmosphere, calibration, geometry errors."""

    cover: float = 0.0  # cloud cover of the scene, 1 = overcast
    cloud_height_m: float = 1500.0
    cirrus: float = 0.0  # peak cirrus strength 0..1
    haze: float = 0.0  # peak haze strength 0..1
    haze_extent: float = 1.0  # 1 = the whole scene
    gain: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    offset: float = 0.0
    shift: tuple[int, int] = (0, 0)
    nodata_fraction: float = 0.0
    nodata_side: int = 1
    roof_commission: bool = False
    t_medium: float = 0.3
    t_high: float = 0.6
    t_cirrus: float = 0.15
    t_haze: float = 0.65
    field_seed: int = 0

    @classmethod
    def clear(cls, shift: tuple[int, int] = (0, 0)) -> Sky:
        """A cloudless, haze-free, perfectly calibrated sky (for tests)."""
        return cls(shift=shift)


def _monsoon(doy: int) -> float:
    return math.exp(-(((doy - 200) / 45.0) ** 2))


def draw_sky(rng: np.random.Generator, when: datetime, weather: DayWeather, lat: float) -> Sky:
    """Draw the atmosphere of an optical acquisition: more clouds in the summer monsoon and on wet days."""
    doy = _season_doy(when.date(), lat)
    m = _monsoon(doy)
    p_over = min(0.9, 0.05 + 0.22 * m + (0.4 if weather.precip_mm > 1.0 else 0.0))
    p_clear = max(0.05, 0.45 - 0.3 * m - (0.2 if weather.precip_mm > 0 else 0.0))
    u = rng.random()
    if u < p_over:
        cover = 1.0
    elif u < p_over + p_clear:
        cover = 0.0
    else:
        cover = float(0.03 + 0.92 * rng.beta(1.2, 2.0))
    spring = 1.0 if 60 <= doy <= 150 else 0.0
    haze = float(rng.uniform(0.15, 0.7)) if rng.random() < 0.12 + 0.12 * spring else 0.0
    common = float(np.clip(rng.normal(1.0, 0.04), 0.9, 1.1))
    gain = tuple(float(np.clip(common * rng.normal(1.0, 0.01), 0.9, 1.1)) for _ in range(4))
    nodata = 0.0
    u = rng.random()
    if u < 0.015:
        nodata = 1.0
    elif u < 0.08:
        nodata = float(rng.uniform(0.1, 0.7))
    return Sky(
        cover=cover,
        cloud_height_m=float(rng.uniform(400.0, 2500.0)),
        cirrus=float(rng.uniform(0.05, 0.35)) if rng.random() < 0.12 + 0.15 * m else 0.0,
        haze=haze,
        haze_extent=1.0 if rng.random() < 0.5 else float(rng.uniform(0.3, 0.9)),
        gain=gain,  # type: ignore[arg-type]
        offset=float(np.clip(rng.normal(0.0, 0.004), -0.01, 0.01)),
        shift=(int(rng.integers(-MAX_SHIFT, MAX_SHIFT + 1)), int(rng.integers(-MAX_SHIFT, MAX_SHIFT + 1))),
        nodata_fraction=nodata,
        nodata_side=1 if rng.random() < 0.5 else -1,
        roof_commission=bool(rng.random() < 0.2),
        t_medium=float(rng.uniform(0.25, 0.4)),
        t_high=float(rng.uniform(0.55, 0.7)),
        t_cirrus=float(rng.uniform(0.12, 0.2)),
        t_haze=float(rng.uniform(0.5, 0.8)),
        field_seed=int(rng.integers(0, 2**31 - 1)),
    )


def _swath_edge(shape: tuple[int, int], fraction: float, side: int) -> npt.NDArray[np.bool_]:
    """Pixels beyond a swath edge (tilted about 13 degrees from north, like the orbit track)."""
    h, w = shape
    if fraction >= 1.0:
        return np.ones(shape, bool)
    rows, cols = np.mgrid[0:h, 0:w]
    x = (cols - rows * math.tan(math.radians(13.0))) * side
    return x > np.quantile(x, 1.0 - fraction)


@dataclass(frozen=True)
class OpticalScene:
    """A rendered Sentinel-2 scene and what really happened in it."""

    bands: Mapping[str, npt.NDArray[Any]]
    cloud_fraction: float  # of track pixels under cloud or cloud shadow
    snow: bool


def render_optical(land: Landscape, when: datetime, weather: DayWeather, cars: Sequence[Car],
                   rng: np.random.Generator, sky: Sky | None = None) -> OpticalScene:
    """Render one Sentinel-2 L2A scene (B02, B03, B04, B08 as uint16 reflectance x 10000, SCL)."""
    if sky is None:
        sky = draw_sky(rng, when, weather, land.lat)
    h, w = land.shape
    noise_rng = np.random.default_rng([sky.field_seed, 1])
    frng = np.random.default_rng([sky.field_seed, 2])
    doy = _season_doy(when.date(), land.lat)

    comp = _compose(land, cars, sky.shift)
    lut, car_lut, lut_s, car_lut_s, hold, car_hold = _optical_luts(doy, weather)
    refl = comp.mix(lut, car_lut).reshape(h, w, 4)
    snow_vis = np.zeros((h, w), np.float32)
    if weather.snow_cover > 0.02:
        snowy = comp.mix(lut_s, car_lut_s).reshape(h, w, 4)
        hold_px = comp.mix(hold, car_hold).reshape(h, w)
        patch = np.clip(weather.snow_cover + 0.25 * _smooth_field(frng, (h, w), 6.0), 0.0, 1.0)
        refl = refl + (snowy - refl) * patch[..., None]
        snow_vis = hold_px * patch
    refl *= land.optical_texture[..., None]
    # The 10 m MTF of the instrument: a little blur beyond the pixel footprint.
    for b in range(4):
        refl[..., b] = ndimage.gaussian_filter(refl[..., b], 0.45, mode="nearest")

    # Residual illumination in L2A: lower sun, darker scene (about 15 % in mid-winter).
    elev, azim = sun_position(when, land.lon, land.lat)
    illum = 0.75 + 0.25 * max(0.05, math.sin(math.radians(elev))) / math.sin(math.radians(70.0))
    refl *= illum

    # Clouds and their shadows, from one smooth field sampled at the pixel and at the sun-displaced
    # position (shadows fall away from the sun by height x tan(zenith)).
    opacity = np.zeros((h, w), np.float32)
    shadow = np.zeros((h, w), np.float32)
    if sky.cover > 0:
        zen = math.radians(90.0 - max(elev, 5.0))
        disp = min(sky.cloud_height_m * math.tan(zen), 6000.0) / 10.0  # pixels
        dcol, drow = disp * math.sin(math.radians(azim)), -disp * math.cos(math.radians(azim))
        coarse = 5  # cloud field at 50 m
        padc = math.ceil(disp / coarse) + 4
        cshape = (h // coarse + 2 * padc + 2, w // coarse + 2 * padc + 2)
        field_c = 0.75 * _smooth_field(frng, cshape, 5.0) + 0.45 * _smooth_field(frng, cshape, 1.5)
        rr, cc = np.mgrid[0:h, 0:w].astype(np.float32)
        rr_c, cc_c = (rr + 0.5) / coarse + padc, (cc + 0.5) / coarse + padc
        here = ndimage.map_coordinates(field_c, [rr_c, cc_c], order=1, mode="nearest")
        there = ndimage.map_coordinates(field_c, [rr_c + drow / coarse, cc_c + dcol / coarse], order=1, mode="nearest")
        if sky.cover >= 1.0:
            opacity = np.clip(0.9 + 0.06 * here, 0.75, 1.0).astype(np.float32)
        else:
            thr = float(np.quantile(here, 1.0 - sky.cover))
            opacity = (np.clip((here - thr) / 0.8, 0.0, 1.0) ** 0.6).astype(np.float32)
            shadow = (np.clip((there - thr) / 0.8, 0.0, 1.0) ** 0.6).astype(np.float32)
    refl *= (1.0 - 0.7 * shadow)[..., None]
    if sky.haze > 0:
        gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
        ang = frng.uniform(0, 2 * math.pi)
        proj = (gx * math.cos(ang) + gy * math.sin(ang)) / max(h, w)
        proj = (proj - proj.min()) / (np.ptp(proj) + 1e-9)
        ramp = 1.0 if sky.haze_extent >= 1.0 else 1.0 / (1.0 + np.exp(-(proj - (1 - sky.haze_extent)) / 0.06))
        haze = (sky.haze * ramp * np.clip(1.0 + 0.2 * _smooth_field(frng, (h, w), 15.0), 0.5, 1.5)).astype(np.float32)
        refl = refl * (1.0 - 0.3 * haze[..., None]) + haze[..., None] * np.array(HAZE_SPECTRUM, np.float32)
    else:
        haze = np.zeros((h, w), np.float32)
    if sky.cirrus > 0:
        cirrus = (sky.cirrus * np.clip(0.5 + 0.5 * _smooth_field(frng, (h, w), 20.0), 0.0, 1.0)).astype(np.float32)
        refl = refl * (1.0 - 0.15 * cirrus[..., None]) + cirrus[..., None] * np.array(CIRRUS_SPECTRUM, np.float32)
    else:
        cirrus = np.zeros((h, w), np.float32)
    if sky.cover > 0:
        cloud = (0.4 + 0.4 * opacity)[..., None] * np.array(CLOUD_SPECTRUM, np.float32)
        refl = refl * (1.0 - opacity[..., None]) + cloud * opacity[..., None]

    refl = refl * np.array(sky.gain, np.float32) + sky.offset
    refl += noise_rng.standard_normal(refl.shape).astype(np.float32) * (0.0015 + 0.004 * np.abs(refl))
    dn = np.clip(np.rint(refl * 10000.0), 1, 65535).astype(np.uint16)

    scl = _scene_classification(refl, opacity, shadow, cirrus, haze, snow_vis, land, sky)
    if sky.nodata_fraction > 0:
        cut = _swath_edge((h, w), sky.nodata_fraction, sky.nodata_side)
        dn[cut] = 0
        scl[cut] = 0
    track = land.track_mask
    if track.any():
        under = ((opacity >= 0.2) | (shadow >= 0.2))[track]
        cloud_fraction = float(under.mean())
    else:
        cloud_fraction = float(((opacity >= 0.2) | (shadow >= 0.2)).mean())
    bands = {name: dn[..., i] for i, name in enumerate(OPTICAL_BANDS)}
    bands["SCL"] = scl
    return OpticalScene(bands=bands, cloud_fraction=cloud_fraction, snow=weather.snow_cover >= 0.3)


def _scene_classification(refl: F32, opacity: F32, shadow: F32, cirrus: F32, haze: F32, snow: F32,
                          land: Landscape, sky: Sky) -> npt.NDArray[np.uint8]:
    """An imperfect Sen2Cor-like scene classification, computed at 20 m like the real one.

    Thick clouds are found, thin edges become 'unclassified', most haze goes unflagged, and in
    some scenes bright roofs are mistaken for clouds.
    """
    h, w = opacity.shape
    hp, wp = h + h % 2, w + w % 2

    def to20(a: npt.NDArray[Any]) -> F32:
        a = np.pad(a.astype(np.float32), ((0, hp - h), (0, wp - w)), mode="edge")
        return a.reshape(hp // 2, 2, wp // 2, 2).mean(axis=(1, 3))

    op, sh, ci = to20(opacity), to20(shadow), to20(np.maximum(cirrus, haze * (haze > sky.t_haze)))
    sn, wa = to20(snow), to20(land.water_fraction)
    nir, red = to20(refl[..., 3]), to20(refl[..., 2])
    ndvi = (nir - red) / (nir + red + 1e-6)
    roof = to20(land.building_fraction)
    scl = np.where(ndvi > 0.35, 4, 5).astype(np.uint8)
    scl[wa > 0.5] = 6
    scl[(op > 0.08) & (op < sky.t_medium)] = 7
    scl[sn > 0.5] = 11
    scl[(sh > 0.45) & (op < sky.t_medium)] = 3
    scl[ci > sky.t_cirrus] = 10
    scl[op >= sky.t_medium] = 8
    scl[op >= sky.t_high] = 9
    if sky.roof_commission:
        scl[(roof > 0.5) & (to20(refl[..., 0]) > 0.18)] = 8
    full = np.repeat(np.repeat(scl, 2, axis=0), 2, axis=1)
    return np.ascontiguousarray(full[:h, :w])


# ----------------------------------------------------------------------------------------------
# Sentinel-1
# ----------------------------------------------------------------------------------------------


def _radar_luts(doy: int, weather: DayWeather, geometry: str, wind_db: float) -> tuple[F32, F32]:
    """(land, car) tables of linear sigma0, columns VV and VH."""
    _, _, heading, gain_db, _ = GEOMETRIES[geometry]
    veg = _vegetation_fraction(doy)
    db = np.full((N_LAND, 2), -15.0, np.float32)
    for cls, (vv, vh) in _RADAR_DB.items():
        db[cls] = (vv, vh)
    for cls in (FIELD_A, FIELD_B, FIELD_C, FIELD_D):
        db[cls] = (-12.0 + 2.0 * veg[cls], -20.0 + 6.0 * veg[cls])
    db[GRASS] = (-11.5 + 1.0 * veg[GRASS], -19.0 + 4.0 * veg[GRASS])
    db[FOREST] = (-7.5 - 1.0 * (1 - veg[FOREST]), -13.0 - 1.5 * (1 - veg[FOREST]))
    db[WATER] = (-16.0, -24.0) if weather.frozen else (-21.0 + wind_db, -28.0 + 0.5 * wind_db)
    soil = (FIELD_A, FIELD_B, FIELD_C, FIELD_D, GRASS, BARE)
    m = weather.soil_moisture - 0.4
    for cls in soil:
        db[cls] += (3.5 * m, 2.5 * m)
    db[GRAVEL] += (1.0 * m, 0.7 * m)
    db[BALLAST] += (0.6 * m, 0.4 * m)
    ground = (*soil, FOREST, GRAVEL, BALLAST, ROAD, CONCRETE)
    for cls in ground:
        if weather.frozen:  # frozen soil: the dielectric constant drops
            db[cls] += (-2.0, -1.5)
        if weather.wet_snow:  # liquid water in the snowpack absorbs C-band
            db[cls] += (-4.0 * weather.snow_cover, -3.5 * weather.snow_cover)
    db += gain_db
    # Rolling stock: steel dihedrals with the ground, brightest broadside to the radar, i.e. when
    # the car's axis runs along the satellite's flight direction.
    flight_axis = heading % 180.0
    car_db = np.zeros((len(CAR_KINDS) * N_ORIENT, 2), np.float32)
    for i, kind in enumerate(CAR_KINDS):
        for o in range(N_ORIENT):
            bearing = (o + 0.5) * 180.0 / N_ORIENT
            orient = 2.0 * math.cos(2.0 * math.radians(bearing - flight_axis))
            boost = kind.radar_boost_db + orient - (1.0 if weather.wet_snow else 0.0)
            car_db[i * N_ORIENT + o] = (-12.0 + boost + gain_db, -19.0 + boost - 3.5 + gain_db)
    return (10.0 ** (db / 10.0)).astype(np.float32), (10.0 ** (car_db / 10.0)).astype(np.float32)


def render_radar(land: Landscape, when: datetime, weather: DayWeather, geometry: str, cars: Sequence[Car],
                 rng: np.random.Generator, *, speckle: bool = True) -> dict[str, F32]:
    """Render one Sentinel-1 GRD scene: VV and VH linear sigma0 (float32, 0 = nodata)."""
    h, w = land.shape
    shift = (int(rng.integers(-MAX_SHIFT, MAX_SHIFT + 1)), int(rng.integers(-MAX_SHIFT, MAX_SHIFT + 1)))
    cal_db = float(np.clip(rng.normal(0.0, 0.3), -0.8, 0.8))
    wind_db = float(np.clip(rng.normal(0.0, 2.5), -4.0, 6.0))
    u = rng.random()
    nodata = 1.0 if u < 0.01 else (float(rng.uniform(0.1, 0.6)) if u < 0.05 else 0.0)
    side = 1 if rng.random() < 0.5 else -1
    speckle_rng = np.random.default_rng(rng.integers(0, 2**31 - 1))
    doy = _season_doy(when.date(), land.lat)

    comp = _compose(land, cars, shift)
    lut, car_lut = _radar_luts(doy, weather, geometry, wind_db)
    power = comp.mix(lut, car_lut).reshape(h, w, 2)
    power *= land.radar_texture[..., None]
    # Buildings: bright, different per geometry, laid over towards the sensor, shadow behind.
    bf = land.building_fraction
    gain = land.roof_radar_gain[geometry]
    layover_side = GEOMETRIES[geometry][4]
    roofs = 1.0 + bf * (gain - 1.0)
    lay = np.roll(bf, layover_side, axis=1)
    shade = np.roll(bf, -layover_side, axis=1) * (1.0 - bf)
    if layover_side > 0:
        lay[:, 0] = 0
        shade[:, -1] = 0
    else:
        lay[:, -1] = 0
        shade[:, 0] = 0
    power *= roofs[..., None]
    power[..., 0] += 0.6 * lay * np.roll(gain, layover_side, axis=1)
    power[..., 1] += 0.08 * lay
    power *= (1.0 - 0.6 * shade)[..., None]
    power *= 10.0 ** (cal_db / 10.0)
    # Resolution of IW GRD (about 20 m x 22 m) on 10 m pixels.
    for b in range(2):
        power[..., b] = ndimage.gaussian_filter(power[..., b], 0.8, mode="nearest")
    if speckle:
        power *= speckle_rng.gamma(ENL, 1.0 / ENL, power.shape).astype(np.float32)
    power = np.maximum(power, 1e-6).astype(np.float32)
    if nodata > 0:
        cut = _swath_edge((h, w), nodata, side)
        power[cut] = 0.0
    return {"VV": np.ascontiguousarray(power[..., 0]), "VH": np.ascontiguousarray(power[..., 1])}


# ----------------------------------------------------------------------------------------------
# The acquisition plan and the archive writer
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Acquisition:
    """One planned scene: UTC time, collection and, for Sentinel-1, the orbit geometry."""

    acquired: datetime
    collection: str
    geometry: str | None = None

    @property
    def relative_orbit(self) -> int | None:
        return GEOMETRIES[self.geometry][0] if self.geometry else None


def _at_local(day: date, local_hours: float, lon: float) -> datetime:
    """The UTC instant of a local solar time on a local day (seconds resolution)."""
    secs = round((local_hours - lon / 15.0) * 3600.0)
    return datetime.combine(day, time(0, 0), tzinfo=UTC) + timedelta(seconds=secs)


def plan_acquisitions(lon: float, start: date, end: date, seed: int,
                      sensors: Sequence[str] = (S2, S1)) -> list[Acquisition]:
    """Acquisitions whose UTC date lies in start..end: Sentinel-2 every 5 days at 10:30 local solar
    time; Sentinel-1 descending (06:12) and ascending (17:48), each every 12 days, offset."""
    rng = np.random.default_rng([seed, 8])
    s2_phase = int(rng.integers(0, S2_REVISIT_DAYS))
    desc_phase = int(rng.integers(0, S1_REPEAT_DAYS))
    asc_phase = (desc_phase + int(rng.integers(4, 9))) % S1_REPEAT_DAYS
    plan: list[Acquisition] = []
    day = start - timedelta(days=1)
    while day <= end + timedelta(days=1):
        o = day.toordinal()
        if S2 in sensors and o % S2_REVISIT_DAYS == s2_phase:
            plan.append(Acquisition(_at_local(day, S2_LOCAL_TIME, lon), S2))
        if S1 in sensors:
            for geom, phase in (("descending", desc_phase), ("ascending", asc_phase)):
                if o % S1_REPEAT_DAYS == phase:
                    plan.append(Acquisition(_at_local(day, GEOMETRIES[geom][1], lon), S1, geom))
        day += timedelta(days=1)
    plan = [a for a in plan if start <= a.acquired.date() <= end]
    plan.sort(key=lambda a: (a.acquired, a.collection))
    return plan


@dataclass(frozen=True)
class SimulationResult:
    """What ``simulate`` wrote."""

    aoi_id: str
    folder: Path
    scenes: tuple[Path, ...]
    truth_csv: Path
    surges_csv: Path
    scenes_per_sensor: Mapping[str, int]
    episodes: tuple[SurgeEpisode, ...]
    start: date
    end: date
    usual_cars: float
    seed: int = 0


TRUTH_COLUMNS = ("acquired", "sensor", "cars", "cloud_fraction", "snow", "surge")
SURGE_COLUMNS = ("episode", "start", "end", "peak_cars")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8", newline="")
    os.replace(tmp, path)


def _period(days: int, start: date | None, end: date | None) -> tuple[date, date]:
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    if start is not None and end is not None:  # both given: they define the period, days is ignored
        if end < start:
            raise ValueError(f"end {end} is before start {start}")
        return start, end
    if start is not None:
        return start, start + timedelta(days=days - 1)
    last = end if end is not None else datetime.now(UTC).date()
    return last - timedelta(days=days - 1), last


def _prepare_folder(folder: Path, planned: set[str]) -> None:
    """Make room for a simulation: stale scenes of an earlier simulation go; real data is never touched."""
    folder.mkdir(parents=True, exist_ok=True)
    stale = [p for p in folder.iterdir() if parse_scene_filename(p.name) is not None and p.name not in planned]
    if not stale:
        return
    if not (folder / "truth.csv").exists():
        raise FileExistsError(
            f"{folder} holds {len(stale)} scene file(s) that are not from a simulation (no truth.csv); "
            "choose an empty --out folder")
    for p in stale:
        p.unlink()


def simulate(
    aoi: Aoi,
    out: Path,
    *,
    days: int,
    seed: int,
    start: date | None = None,
    end: date | None = None,
    surges: Sequence[SurgeSpec] | None = None,
    sensors: Sequence[str] = (S2, S1),
    quiet: bool = False,
    usual_cars: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SimulationResult:
    """Write a simulated archive for ``aoi`` under ``out/<aoi-id>/`` plus truth.csv and surges.csv.

    The period is ``days`` long, ending ``end`` (default today, UTC) or starting ``start``; with
    both ``start`` and ``end`` it is start..end and ``days`` is ignored. Acquisitions later than
    now are never written. Without ``surges`` and unless ``quiet``, the period contains
    ``default_surges``. Same arguments, same seed: identical files.
    """
    unknown = [s for s in sensors if s not in (S2, S1)]
    if unknown:
        raise ValueError(f"unknown sensor(s) {', '.join(unknown)}; expected {S2} and/or {S1}")
    if quiet and surges:
        raise ValueError("quiet=True asks for no surge, but surges were given")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    first, last = _period(days, start, end)
    usual = usual_level(seed) if usual_cars is None else float(usual_cars)
    if surges is not None:
        specs = list(surges)
        for s in specs:
            if s.start > last or s.start + timedelta(days=s.days - 1) < first:
                raise ValueError(f"surge {s.start}:{s.cars}:{s.days} lies outside the simulated period {first}..{last}")
    elif quiet:
        specs = []
    else:
        specs = default_surges(first, last, seed=seed, usual_cars=usual)
    episodes = _episodes(specs)

    land = build_landscape(aoi, seed)
    if not land.tracks:
        log.warning("AOI %s has no track inside its polygon: the simulation has no cars", aoi.id,
                    extra={"aoi_id": aoi.id})
    now = datetime.now(UTC)  # no archive holds scenes from the future
    plan = [a for a in plan_acquisitions(land.lon, first, last, seed, sensors) if a.acquired <= now]
    local_offset = timedelta(hours=land.lon / 15.0)
    local_days = [(a.acquired + local_offset).date() for a in plan]
    weather = simulate_weather(seed, min(local_days, default=first), max(local_days, default=last), land.lat)

    folder = Path(out) / aoi.id
    _prepare_folder(folder, {scene_filename(a.collection, a.acquired) for a in plan})
    counts: dict[date, int] = {}
    parked: dict[tuple[date, bool], list[Car]] = {}
    rows: list[tuple[str, ...]] = []
    paths: list[Path] = []
    per_sensor = {s: 0 for s in sensors}
    base_tags = {"SIMULATED": "railwatch.imagery.synthetic", "SIMULATION_SEED": str(seed)}
    for done, (acq, day) in enumerate(zip(plan, local_days, strict=True), start=1):
        if day not in counts:
            counts[day] = daily_cars(seed, day, usual, episodes)
        afternoon = (acq.acquired + local_offset).hour >= 12
        key = (day, afternoon)
        if key not in parked:
            parked[key] = place_cars(land, counts[day], np.random.default_rng([seed, 4, day.toordinal(), int(afternoon)]))
        cars = parked[key]
        wx = weather[day]
        scene_rng = np.random.default_rng([seed, 10, int(acq.acquired.timestamp())])
        tags = dict(base_tags)
        if acq.collection == S2:
            scene = render_optical(land, acq.acquired, wx, cars, scene_rng)
            bands: Mapping[str, npt.NDArray[Any]] = scene.bands
            cloud, snow = scene.cloud_fraction, scene.snow
        else:
            assert acq.geometry is not None
            bands = render_radar(land, acq.acquired, wx, acq.geometry, cars, scene_rng)
            cloud, snow = 0.0, wx.snow_cover >= 0.3
            tags[ORBIT_DIRECTION_TAG] = acq.geometry
            tags[RELATIVE_ORBIT_TAG] = str(acq.relative_orbit)
        raster = Raster(bands=bands, crs=land.grid.crs, transform=land.grid.transform, tags=tags)
        paths.append(write_scene(Path(out), aoi.id, acq.collection, acq.acquired, raster))
        per_sensor[acq.collection] += 1
        surge = next((ep.number for ep in episodes if ep.contains(day)), 0)
        rows.append((iso(acq.acquired) or "", acq.collection, str(len(cars)), f"{cloud:.3f}",
                     "true" if snow else "false", str(surge)))
        if progress is not None:
            progress(done, len(plan))

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(TRUTH_COLUMNS)
    writer.writerows(rows)
    truth = folder / "truth.csv"
    _write_text_atomic(truth, buf.getvalue())
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SURGE_COLUMNS)
    writer.writerows((ep.number, ep.start.isoformat(), ep.end.isoformat(), ep.peak_cars) for ep in episodes)
    surges_csv = folder / "surges.csv"
    _write_text_atomic(surges_csv, buf.getvalue())
    log.info("simulated %d scenes for %s (%s..%s, seed %d)", len(paths), aoi.id, first, last, seed,
             extra={"aoi_id": aoi.id})
    return SimulationResult(
        aoi_id=aoi.id, folder=folder, scenes=tuple(paths), truth_csv=truth, surges_csv=surges_csv,
        scenes_per_sensor=per_sensor, episodes=tuple(episodes), start=first, end=last, usual_cars=usual,
        seed=seed,
    )
