"""AOI files: GeoJSON -> :class:`~railwatch.domain.Aoi`, validation, and track masks.

One GeoJSON FeatureCollection per AOI (``aoi/<id>.geojson``, lon/lat CRS84) holds exactly one
``kind = "aoi"`` Polygon/MultiPolygon, one or more ``kind = "track"`` rail centrelines and optional
``kind = "yard"`` polygons. The format is documented in ``docs/aoi.md``.

This is the one module that imports shapely, pyproj and rasterio for vector work; the rest of
railwatch sees plain GeoJSON mappings and numpy masks.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely
from affine import Affine
from pyproj import Geod
from rasterio import features as rio_features
from scipy import ndimage
from shapely.errors import GEOSException
from shapely.geometry import LineString, MultiLineString, MultiPolygon, Polygon, mapping, shape
from shapely.geometry.base import BaseGeometry
from shapely.ops import linemerge

from railwatch.domain import COLLECTIONS, Aoi
from railwatch.errors import AoiError
from railwatch.geo import reproject_geometry, utm_epsg

#: Half-width in metres of the band around a rail centreline that counts as "track pixels".
#: Standard-gauge rolling stock is about 3 m wide (UIC loading gauge 3.15 m), so a car spans
#: ±1.5 m of the centreline; ±6 m covers the car plus up to half a 10 m pixel of
#: misregistration between the centreline (drawn on a map) and the Sentinel-1/-2 grid.
DEFAULT_TRACK_HALF_WIDTH_M = 6.0

#: Default largest AOI polygon, geodesic km². Big AOIs cost processing units and dilute the signal.
DEFAULT_MAX_AREA_KM2 = 100.0

KINDS: tuple[str, ...] = ("aoi", "track", "yard")

#: Per-AOI settings recognised in the aoi feature's properties (they override the config defaults).
SETTING_KEYS: tuple[str, ...] = (
    "sensors",
    "poll_interval_minutes",
    "schedule",
    "jitter_seconds",
    "track_half_width_m",
    "detector",
)

_SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_GEOD = Geod(ellps="WGS84")
#: Nesting depth of the ``coordinates`` array above a single position, per geometry type.
_DEPTH = {"LineString": 1, "Polygon": 2, "MultiLineString": 2, "MultiPolygon": 3}
_EXPECTED = {
    "aoi": ("Polygon", "MultiPolygon"),
    "yard": ("Polygon", "MultiPolygon"),
    "track": ("LineString", "MultiLineString"),
}
#: Densify lon/lat edges to ~100 m before projecting, so straight CRS84 edges stay faithful.
_SEGMENT_DEG = 0.001
_SUPERSAMPLE = 5


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


@dataclass
class AoiScan:
    """Everything found in an AOI directory: the valid AOIs, the broken files and the warnings."""

    aois: list[Aoi] = field(default_factory=list)
    errors: dict[Path, AoiError] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)


def load_aoi(path: Path, *, max_area_km2: float = DEFAULT_MAX_AREA_KM2) -> tuple[Aoi, list[str]]:
    """Read and validate one AOI file; return the Aoi (tracks clipped to the AOI) and warnings.

    Every problem in the file is collected and raised together as one :class:`AoiError` whose
    ``source`` is the file path.
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AoiError([f"not UTF-8 text ({exc.reason} at byte {exc.start}); expected a GeoJSON file"],
                       source=source) from exc
    except OSError as exc:
        raise AoiError([f"cannot read the file ({exc.strerror or exc}); expected a readable GeoJSON file"],
                       source=source) from exc
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise AoiError([f"invalid JSON{where}: {msg}; expected a GeoJSON FeatureCollection"],
                       source=source) from exc
    return _Loader(path, max_area_km2).run(doc)


def load_aoi_dir(directory: Path, *, max_area_km2: float = DEFAULT_MAX_AREA_KM2) -> AoiScan:
    """Load every ``*.geojson`` in ``directory`` (sorted by name); a bad file never hides the others."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise AoiError([f"the AOI directory {what}; expected a directory of <id>.geojson files"],
                       source=str(directory))
    scan = AoiScan()
    for path in sorted(directory.glob("*.geojson")):
        try:
            aoi, warnings = load_aoi(path, max_area_km2=max_area_km2)
        except AoiError as exc:
            scan.errors[path] = exc
            continue
        scan.aois.append(aoi)
        if warnings:
            scan.warnings[aoi.id] = warnings
    return scan


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _label(index: int, kind: str | None, props: Mapping[str, Any] | None = None) -> str:
    """``features[3] (track "Khasan siding 2")``: where a problem is, in the file's own terms."""
    name = props.get("name") if isinstance(props, Mapping) else None
    kind_txt = kind if isinstance(kind, str) else "feature"
    return f'features[{index}] ({kind_txt} "{name}")' if isinstance(name, str) and name else \
        f"features[{index}] ({kind_txt})"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt_km(metres: float) -> str:
    return f"{metres / 1000.0:.2f} km"


class _Loader:
    """One pass over one parsed AOI file, collecting problems and warnings."""

    def __init__(self, path: Path, max_area_km2: float) -> None:
        self.path = path
        self.max_area_km2 = max_area_km2
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def fail(self) -> AoiError:
        return AoiError(self.problems, source=str(self.path))

    def run(self, doc: Any) -> tuple[Aoi, list[str]]:
        if not isinstance(doc, dict) or doc.get("type") != "FeatureCollection":
            got = f'type "{doc.get("type")}"' if isinstance(doc, dict) else type(doc).__name__
            self.problems.append(f'top level is {got}; expected a GeoJSON object with "type": "FeatureCollection"')
            raise self.fail()
        feats = doc.get("features")
        if not isinstance(feats, list):
            self.problems.append('"features" is missing or not an array; expected an array of Features')
            raise self.fail()
        crs = doc.get("crs")
        if crs is not None and not _is_crs84(crs):
            self.problems.append(f"top-level crs {json.dumps(crs)} is not CRS84; expected lon/lat "
                                 "(EPSG:4326 axis order longitude, latitude) and no crs member")

        aoi_feats: list[tuple[int, Mapping[str, Any], BaseGeometry | None]] = []
        track_feats: list[tuple[int, Mapping[str, Any], BaseGeometry | None]] = []
        yard_feats: list[tuple[int, Mapping[str, Any], BaseGeometry | None]] = []
        for i, feat in enumerate(feats):
            parsed = self._feature(i, feat)
            if parsed is None:
                continue
            kind, props, geom = parsed
            {"aoi": aoi_feats, "track": track_feats, "yard": yard_feats}[kind].append((i, props, geom))

        if not aoi_feats:
            self.problems.append('no feature with properties.kind = "aoi"; expected exactly one '
                                 "Polygon or MultiPolygon feature with kind \"aoi\"")
        elif len(aoi_feats) > 1:
            where = ", ".join(f"features[{i}]" for i, _, _ in aoi_feats)
            self.problems.append(f'{len(aoi_feats)} features have kind "aoi" ({where}); expected exactly one')
        if not track_feats:
            self.problems.append('no feature with properties.kind = "track"; expected at least one '
                                 "LineString or MultiLineString rail centreline")

        aoi_id, name = "", ""
        settings: dict[str, Any] = {}
        polygon: BaseGeometry | None = None
        if len(aoi_feats) == 1:
            i, props, polygon = aoi_feats[0]
            aoi_id, name = self._identity(i, props)
            settings = self._settings(i, props)
            if polygon is not None:
                self._area(i, props, polygon)

        tracks = self._clip_all(track_feats, polygon, "track")
        yards = self._clip_all(yard_feats, polygon, "yard")

        if self.problems:
            raise self.fail()
        assert polygon is not None  # no problems means exactly one valid aoi polygon
        aoi = Aoi(
            id=aoi_id,
            name=name,
            geometry=_to_mapping(polygon),
            tracks=tuple(_to_mapping(t) for t in tracks),
            yards=tuple(_to_mapping(y) for y in yards),
            settings=settings,
            path=self.path,
        )
        return aoi, list(self.warnings)

    # -- one feature ------------------------------------------------------------------------

    def _feature(self, i: int, feat: Any) -> tuple[str, Mapping[str, Any], BaseGeometry | None] | None:
        if not isinstance(feat, dict) or feat.get("type") != "Feature":
            self.problems.append(f'features[{i}]: not a GeoJSON Feature; expected an object with "type": "Feature"')
            return None
        props = feat.get("properties")
        if not isinstance(props, dict):
            self.problems.append(f"features[{i}]: properties missing or not an object; expected an object "
                                 f"with \"kind\" one of {', '.join(KINDS)}")
            return None
        kind = props.get("kind")
        if kind not in KINDS:
            got = f'"{kind}"' if isinstance(kind, str) else ("missing" if kind is None else json.dumps(kind))
            self.problems.append(f"{_label(i, None, props)}: properties.kind is {got}; "
                                 f"expected one of {', '.join(KINDS)}")
            return None
        geom = self._geometry(i, kind, props, feat.get("geometry"))
        return kind, props, geom

    def _geometry(self, i: int, kind: str, props: Mapping[str, Any], raw: Any) -> BaseGeometry | None:
        """Check the GeoJSON geometry's shape, ranges and validity; None when unusable."""
        where = _label(i, kind, props)
        allowed = _EXPECTED[kind]
        expected = " or ".join(allowed)
        if not isinstance(raw, dict):
            self.problems.append(f"{where}: geometry missing or not an object; expected a {expected}")
            return None
        gtype = raw.get("type")
        if gtype not in allowed:
            self.problems.append(f'{where}: geometry type is "{gtype}"; expected {expected}')
            return None
        coords = raw.get("coordinates")
        positions: list[Sequence[float]] = []
        shape_err = _collect_positions(coords, _DEPTH[gtype], positions)
        if shape_err:
            self.problems.append(f"{where}: malformed {gtype} coordinates ({shape_err}); expected "
                                 f"{_coord_hint(gtype)}")
            return None
        if not positions:
            self.problems.append(f"{where}: empty {gtype}; expected at least one {_coord_hint(gtype)}")
            return None
        bad = [p for p in positions if not (-180.0 <= p[0] <= 180.0 and -90.0 <= p[1] <= 90.0)]
        if bad:
            first = bad[0]
            swapped = all(abs(p[0]) <= 90.0 and abs(p[1]) <= 180.0 for p in positions)
            why = ("latitude " + f"{first[1]:g} is beyond ±90" if abs(first[1]) > 90.0
                   else "longitude " + f"{first[0]:g} is beyond ±180")
            hint = "; latitude and longitude look swapped" if swapped else ""
            self.problems.append(
                f"{where}: {len(bad)} of {len(positions)} positions out of range, first "
                f"[{first[0]:g}, {first[1]:g}] ({why}); expected [longitude, latitude] with longitude "
                f"in -180..180 and latitude in -90..90{hint}")
            return None
        if kind in ("aoi", "yard"):
            ring_err = _ring_problem(coords, gtype)
            if ring_err:
                self.problems.append(f"{where}: {ring_err}")
                return None
        try:
            geom = shapely.force_2d(shape(raw))
        except (ValueError, TypeError, GEOSException) as exc:
            self.problems.append(f"{where}: cannot build the {gtype} ({exc}); expected {_coord_hint(gtype)}")
            return None
        if kind in ("aoi", "yard"):
            if not geom.is_valid:
                reason = shapely.is_valid_reason(geom)
                self.problems.append(f"{where}: invalid {gtype}: {_explain(reason)}; expected a simple "
                                     "polygon whose rings do not cross or touch themselves")
                return None
            if geom.area <= 0.0:
                self.problems.append(f"{where}: {gtype} has zero area; expected a polygon enclosing an area")
                return None
        elif geom.length <= 0.0:
            self.problems.append(f"{where}: {gtype} has zero length; expected a line of at least two "
                                 "distinct positions")
            return None
        return geom

    # -- the aoi feature --------------------------------------------------------------------

    def _identity(self, i: int, props: Mapping[str, Any]) -> tuple[str, str]:
        where = _label(i, "aoi", props)
        stem = self.path.stem
        aoi_id = props.get("id")
        if not isinstance(aoi_id, str) or not aoi_id:
            self.problems.append(f'{where}: properties.id is missing or not a string; expected "{stem}" '
                                 "(the file name without .geojson)")
            aoi_id = ""
        elif not _SLUG.match(aoi_id):
            self.problems.append(f'{where}: properties.id "{aoi_id}" is not a slug; expected lower-case '
                                 "letters, digits and single hyphens, equal to the file name")
        elif aoi_id != stem:
            self.problems.append(f'{where}: properties.id "{aoi_id}" does not match the file name; '
                                 f'expected "{stem}" (or rename the file to {aoi_id}.geojson)')
        name = props.get("name")
        if not isinstance(name, str) or not name.strip():
            self.problems.append(f"{where}: properties.name is missing or empty; expected a human-readable name")
            name = ""
        return aoi_id, name

    def _settings(self, i: int, props: Mapping[str, Any]) -> dict[str, Any]:
        where = _label(i, "aoi", props)
        out: dict[str, Any] = {}

        def bad(key: str, expected: str) -> None:
            self.problems.append(f"{where}: properties.{key} is {json.dumps(props[key])}; expected {expected}")

        if "sensors" in props:
            v = props["sensors"]
            if (not isinstance(v, list) or not v or not all(isinstance(s, str) for s in v)
                    or any(s not in COLLECTIONS for s in v) or len(set(v)) != len(v)):
                bad("sensors", f"a non-empty list without repeats drawn from {json.dumps(list(COLLECTIONS))}")
            else:
                out["sensors"] = list(v)
        for key, lowest, strict in (("poll_interval_minutes", 0.0, True), ("jitter_seconds", 0.0, False),
                                    ("track_half_width_m", 0.0, True)):
            if key in props:
                v = props[key]
                ok = _is_number(v) and (v > lowest if strict else v >= lowest)
                if ok:
                    out[key] = v
                else:
                    bad(key, f"a number {'>' if strict else '>='} {lowest:g}")
        if "schedule" in props:
            v = props["schedule"]
            err = _cron_problem(v) if isinstance(v, str) else "not a string"
            if err:
                bad("schedule", f'a 5-field cron string such as "0 */6 * * *" ({err})')
            else:
                out["schedule"] = " ".join(v.split())
        if "detector" in props:
            v = props["detector"]
            if isinstance(v, dict):
                out["detector"] = dict(v)
            else:
                bad("detector", "a JSON object of detector threshold overrides")
        for key in props:
            if key in SETTING_KEYS:
                continue
            close = difflib.get_close_matches(key, SETTING_KEYS, n=1, cutoff=0.8)
            if close:
                self.warnings.append(f'{where}: property "{key}" is not a recognised setting and is '
                                     f'ignored; did you mean "{close[0]}"?')
        return out

    def _area(self, i: int, props: Mapping[str, Any], polygon: BaseGeometry) -> None:
        km2 = _geodesic_area_km2(polygon)
        if km2 > self.max_area_km2:
            self.problems.append(
                f"{_label(i, 'aoi', props)}: polygon area {km2:.1f} km² exceeds the maximum "
                f"{self.max_area_km2:g} km²; expected a smaller AOI around the tracks (or raise the "
                "maximum in the configuration)")

    # -- tracks and yards -------------------------------------------------------------------

    def _clip_all(self, feats: list[tuple[int, Mapping[str, Any], BaseGeometry | None]],
                  polygon: BaseGeometry | None, kind: str) -> list[BaseGeometry]:
        out: list[BaseGeometry] = []
        for i, props, geom in feats:
            if geom is None or polygon is None:
                continue
            where = _label(i, kind, props)
            inside = _clip(geom, polygon, kind)
            if inside is None:
                self.problems.append(f"{where}: lies entirely outside the AOI polygon; expected a "
                                     f"{kind} inside (or crossing) the aoi feature's polygon")
                continue
            if kind == "track":
                before, after = _geodesic_length_m(geom), _geodesic_length_m(inside)
                if after < before * (1.0 - 1e-9):
                    self.warnings.append(f"{where}: partly outside the AOI: clipped from "
                                         f"{_fmt_km(before)} to {_fmt_km(after)}")
                    geom = inside
            else:
                before_a, after_a = geom.area, inside.area
                if after_a < before_a * (1.0 - 1e-9):
                    self.warnings.append(f"{where}: partly outside the AOI: clipped to "
                                         f"{100.0 * after_a / before_a:.0f}% of its area")
                    geom = inside
            out.append(geom)
        return out


def _is_crs84(crs: Any) -> bool:
    name = crs.get("properties", {}).get("name", "") if isinstance(crs, dict) else ""
    return isinstance(name, str) and (name.upper().endswith("CRS84") or name.upper().endswith("EPSG::4326"))


def _collect_positions(coords: Any, depth: int, out: list[Sequence[float]]) -> str | None:
    """Walk a ``coordinates`` array of the given nesting depth; return what is wrong, if anything."""
    if depth == 0:
        if not isinstance(coords, list) or len(coords) not in (2, 3):
            return f"{json.dumps(coords)} is not a position"
        if not all(_is_number(c) for c in coords):
            return f"{json.dumps(coords)} holds a value that is not a finite number"
        out.append(coords)
        return None
    if not isinstance(coords, list):
        return f"{json.dumps(coords)} is not an array"
    for part in coords:
        err = _collect_positions(part, depth - 1, out)
        if err:
            return err
    return None


def _coord_hint(gtype: str) -> str:
    return {
        "LineString": "an array of two or more [longitude, latitude] positions",
        "MultiLineString": "an array of LineString coordinate arrays",
        "Polygon": "an array of closed linear rings, each four or more [longitude, latitude] positions",
        "MultiPolygon": "an array of Polygon coordinate arrays",
    }.get(gtype, "valid GeoJSON coordinates")


def _ring_problem(coords: Any, gtype: str) -> str | None:
    polys = [coords] if gtype == "Polygon" else coords
    if not polys:
        return f"empty {gtype}; expected at least one polygon"
    for p, rings in enumerate(polys):
        if not rings:
            return f"polygon {p} has no rings; expected an outer ring"
        for r, ring in enumerate(rings):
            tag = f"ring {r}" if gtype == "Polygon" else f"polygon {p} ring {r}"
            if len(ring) < 4:
                return f"{tag} has {len(ring)} positions; expected a closed ring of at least 4 positions"
            if list(ring[0][:2]) != list(ring[-1][:2]):
                return (f"{tag} is not closed (first {list(ring[0][:2])} != last {list(ring[-1][:2])}); "
                        "expected the last position to repeat the first")
    return None


def _explain(reason: str) -> str:
    """Turn GEOS's ``Self-intersection[130.6 42.4]`` into ``self-intersection at (130.6, 42.4)``."""
    m = re.match(r"^\s*([^\[]+)\[([-\d.eE+]+)\s+([-\d.eE+]+)\]", reason)
    if not m:
        return reason
    what, x, y = m.group(1).strip(), float(m.group(2)), float(m.group(3))
    return f"{what.lower()} at ({x:.6f}, {y:.6f})"


_CRON_RANGES = ((0, 59, "minute"), (0, 23, "hour"), (1, 31, "day of month"), (1, 12, "month"),
                (0, 7, "day of week"))
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_CRON_NAMES: tuple[dict[str, int], ...] = (
    {},
    {},
    {},
    {m: i + 1 for i, m in enumerate(_MONTHS)},
    {d: i for i, d in enumerate(_DAYS)},
)


def _cron_problem(expr: str) -> str | None:
    """What is wrong with a 5-field cron expression, or None (numbers, names, *, -, / and lists)."""
    fields = expr.split()
    if len(fields) != 5:
        return f"{len(fields)} fields, not 5"
    for text, (lo, hi, label), names in zip(fields, _CRON_RANGES, _CRON_NAMES, strict=True):
        for item in text.split(","):
            base, _, step = item.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                return f"bad step in {label} field {text!r}"
            if base == "*":
                continue
            ends = base.split("-")
            if len(ends) > 2 or not all(ends):
                return f"bad {label} field {text!r}"
            for end in ends:
                value = names.get(end.lower()) if not end.isdigit() else int(end)
                if value is None or not lo <= value <= hi:
                    return f"{label} value {end!r} outside {lo}-{hi}"
    return None


def _lines_only(geom: BaseGeometry) -> BaseGeometry | None:
    parts = [p for p in shapely.get_parts(geom) if isinstance(p, LineString) and p.length > 0.0]
    if not parts:
        return None
    merged = linemerge(MultiLineString(parts)) if len(parts) > 1 else parts[0]
    return merged


def _polys_only(geom: BaseGeometry) -> BaseGeometry | None:
    parts = [p for p in shapely.get_parts(geom) if isinstance(p, Polygon) and p.area > 0.0]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else MultiPolygon(parts)


def _clip(geom: BaseGeometry, polygon: BaseGeometry, kind: str) -> BaseGeometry | None:
    """The part of ``geom`` inside ``polygon`` (lines for tracks, polygons for yards), or None."""
    inter = geom.intersection(polygon)
    if inter.is_empty:
        return None
    return _lines_only(inter) if kind == "track" else _polys_only(inter)


def _to_mapping(geom: BaseGeometry) -> dict[str, Any]:
    """GeoJSON mapping with lists (not tuples), so it round-trips through JSON unchanged."""
    result: dict[str, Any] = json.loads(json.dumps(mapping(geom)))
    return result


def _geodesic_area_km2(geom: BaseGeometry) -> float:
    area, _ = _GEOD.geometry_area_perimeter(geom)
    return abs(area) / 1e6


def _geodesic_length_m(geom: BaseGeometry) -> float:
    return float(_GEOD.geometry_length(geom))


# --------------------------------------------------------------------------------------------
# Measures and masks
# --------------------------------------------------------------------------------------------


def _aoi_utm(aoi: Aoi) -> str:
    west, south, east, north = aoi.bbox
    return f"EPSG:{utm_epsg((west + east) / 2.0, (south + north) / 2.0)}"


def _polygon_ll(aoi: Aoi) -> BaseGeometry:
    return shape(aoi.geometry)


def _tracks_utm(aoi: Aoi, utm: str) -> BaseGeometry:
    lines = [shape(t) for t in aoi.tracks]
    union = shapely.union_all(lines) if lines else LineString()
    return reproject_geometry(shapely.segmentize(union, _SEGMENT_DEG), "OGC:CRS84", utm)


def _half_width(aoi: Aoi, half_width_m: float | None) -> float:
    if half_width_m is not None:
        return float(half_width_m)
    return float(aoi.settings.get("track_half_width_m", DEFAULT_TRACK_HALF_WIDTH_M))


def _track_band_utm(aoi: Aoi, half_width_m: float | None = None) -> tuple[BaseGeometry, str]:
    """The tracks buffered by the half-width and clipped to the AOI, in the AOI's UTM CRS (metres)."""
    utm = _aoi_utm(aoi)
    polygon = reproject_geometry(shapely.segmentize(_polygon_ll(aoi), _SEGMENT_DEG), "OGC:CRS84", utm)
    band = _tracks_utm(aoi, utm).buffer(_half_width(aoi, half_width_m), quad_segs=8)
    clipped = _polys_only(band.intersection(polygon))
    return (clipped if clipped is not None else Polygon()), utm


def track_buffer(aoi: Aoi, half_width_m: float | None = None) -> dict[str, Any]:
    """The track pixels' footprint as a GeoJSON (Multi)Polygon in lon/lat, for maps and exports."""
    band, utm = _track_band_utm(aoi, half_width_m)
    return _to_mapping(reproject_geometry(band, utm, "OGC:CRS84"))


def track_area_m2(aoi: Aoi, half_width_m: float | None = None) -> float:
    """Ground area of the buffered, clipped tracks in m² (overlapping sidings counted once)."""
    band, _ = _track_band_utm(aoi, half_width_m)
    return float(band.area)


def _burn(geom: BaseGeometry, transform: Any, shape_: tuple[int, int], *, all_touched: bool) -> npt.NDArray[np.bool_]:
    out_shape = (int(shape_[0]), int(shape_[1]))
    if geom.is_empty or out_shape[0] <= 0 or out_shape[1] <= 0:
        return np.zeros(out_shape, dtype=bool)
    burned = rio_features.rasterize([(mapping(geom), 1)], out_shape=out_shape, transform=transform, fill=0,
                                    all_touched=all_touched, dtype="uint8")
    return np.asarray(burned, dtype=bool)


def aoi_mask(aoi: Aoi, crs: Any, transform: Any, shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """Pixels of the grid whose centre lies inside the AOI polygon."""
    polygon = reproject_geometry(shapely.segmentize(_polygon_ll(aoi), _SEGMENT_DEG), "OGC:CRS84", crs)
    return _burn(polygon, transform, shape, all_touched=False)


def track_mask(aoi: Aoi, crs: Any, transform: Any, shape: tuple[int, int],
               half_width_m: float | None = None) -> npt.NDArray[np.bool_]:
    """Pixels whose centre lies within the buffered tracks (clipped to the AOI).

    The buffer is drawn in the AOI's UTM zone (metres) and then projected to the raster's CRS, so a
    lon/lat grid and a UTM grid select the same ground. If centre sampling finds no pixel (a track
    band narrower than a pixel that falls between centres), every touched pixel is used instead.
    """
    band, utm = _track_band_utm(aoi, half_width_m)
    band = reproject_geometry(band, utm, crs)
    mask = _burn(band, transform, shape, all_touched=False)
    mask &= aoi_mask(aoi, crs, transform, shape)
    if not mask.any():
        mask = _burn(band, transform, shape, all_touched=True)
    return mask


#: Rows of analysis pixels supersampled at a time by :func:`track_coverage` (bounds its memory).
_COVERAGE_STRIP_ROWS = 16


def track_coverage(aoi: Aoi, crs: Any, transform: Any, shape: tuple[int, int],
                   half_width_m: float | None = None) -> npt.NDArray[np.float32]:
    """Fraction (0..1) of each pixel covered by the buffered tracks, from 5x5 sub-pixel sampling.

    Supersampled strip by strip (:data:`_COVERAGE_STRIP_ROWS` rows), each over the columns the band
    reaches in that strip only, and strips the band misses are skipped: memory stays bounded and the
    work follows the track, not the grid. Sub-pixel centres never lie on a strip's edges, so the
    result is the same as supersampling the whole window at once.
    """
    out_shape = (int(shape[0]), int(shape[1]))
    coverage = np.zeros(out_shape, dtype=np.float32)
    band, utm = _track_band_utm(aoi, half_width_m)
    band = reproject_geometry(band, utm, crs)
    if band.is_empty:
        return coverage
    # Only supersample the window of pixels the band can touch.
    a, b, c, d, e, f = tuple(transform)[:6]
    inv = ~Affine(a, b, c, d, e, f)
    r0, r1, c0, c1 = _pixel_window(band.bounds, inv, out_shape)
    if c0 >= c1 or r0 >= r1:
        return coverage
    n = _SUPERSAMPLE
    if b != 0 or d != 0:  # a rotated grid: no strips, the whole window at once
        _supersample(band, (a, b, c, d, e, f), coverage, r0, r1, c0, c1, n)
        return coverage
    for s0 in range(r0, r1, _COVERAGE_STRIP_ROWS):
        s1 = min(r1, s0 + _COVERAGE_STRIP_ROWS)
        ys = (f + e * s0, f + e * s1)
        xs = (c + a * c0, c + a * c1)
        part = shapely.clip_by_rect(band, min(xs), min(ys), max(xs), max(ys))
        if part.is_empty:
            continue
        _, _, pc0, pc1 = _pixel_window(part.bounds, inv, out_shape)
        pc0, pc1 = max(pc0, c0), min(pc1, c1)
        if pc0 < pc1:
            _supersample(part, (a, b, c, d, e, f), coverage, s0, s1, pc0, pc1, n)
    return coverage


def _pixel_window(bounds: tuple[float, float, float, float], inv: Affine,
                  shape_: tuple[int, int]) -> tuple[int, int, int, int]:
    """Rows r0:r1 and columns c0:c1 of the grid that a bounding box touches (clipped to the grid)."""
    minx, miny, maxx, maxy = bounds
    corners = [(x, y) for x in (minx, maxx) for y in (miny, maxy)]
    cols = [inv.a * x + inv.b * y + inv.c for x, y in corners]
    rows = [inv.d * x + inv.e * y + inv.f for x, y in corners]
    c0, c1 = max(0, math.floor(min(cols))), min(shape_[1], math.ceil(max(cols)))
    r0, r1 = max(0, math.floor(min(rows))), min(shape_[0], math.ceil(max(rows)))
    return r0, r1, c0, c1


def _supersample(geom: BaseGeometry, tr: tuple[float, ...], coverage: npt.NDArray[np.float32],
                 r0: int, r1: int, c0: int, c1: int, n: int) -> None:
    """Write into ``coverage[r0:r1, c0:c1]`` the share of each pixel's n x n sub-pixel centres in ``geom``."""
    a, b, c, d, e, f = tr
    fine_tr = Affine(a / n, b / n, c + a * c0 + b * r0, d / n, e / n, f + d * c0 + e * r0)
    fine = _burn(geom, fine_tr, ((r1 - r0) * n, (c1 - c0) * n), all_touched=False)
    coverage[r0:r1, c0:c1] = fine.reshape(r1 - r0, n, c1 - c0, n).mean(axis=(1, 3), dtype=np.float32)


def track_length_m(aoi: Aoi) -> float:
    """Total length of the (clipped) tracks in metres, measured in the AOI's UTM zone."""
    return float(sum(reproject_geometry(shapely.segmentize(shape(t), _SEGMENT_DEG), "OGC:CRS84", _aoi_utm(aoi)).length
                     for t in aoi.tracks))


def lit_pixels(aoi: Aoi, crs: Any, transform: Any, shape: tuple[int, int],
               tests: Sequence[tuple[npt.NDArray[np.bool_], int]]) -> tuple[list[int], float]:
    """For each test (``tested`` mask, ``reach``), how many tested pixels a consist on each centreline
    lights, summed over the centrelines; and the centrelines' total length in metres (the AOI's UTM zone).

    A centreline's pixels (every pixel it touches) grown by ``reach`` pixels in every direction (a
    (2·reach + 1)² square: the radar test's window) are the pixels a consist standing on it lights; those
    that are ``tested`` count. Tracks of a yard a few metres apart share pixels and windows, so a pixel
    lit by a consist on one track counts once for that track only: the occupied length of the estimate
    is (occupied pixels) / (lit pixels per metre of centreline), not (occupied pixels) x (centreline per
    tested pixel), which counts a shared pixel once for every track through it (docs/detector.md §5).
    Each centreline is drawn once, in its own window of the grid, so the cost follows the track.
    """
    utm = _aoi_utm(aoi)
    lines_utm = _tracks_utm(aoi, utm)
    parts_utm = [g for g in getattr(lines_utm, "geoms", [lines_utm]) if not g.is_empty]
    height, width = int(shape[0]), int(shape[1])
    lit = [0] * len(tests)
    length = 0.0
    pad = max((reach for _, reach in tests), default=0) + 1
    a, b, c, d, e, f = tuple(transform)[:6]
    to_pixel = ~Affine(a, b, c, d, e, f)
    for part in parts_utm:
        length += float(part.length)
        line = reproject_geometry(part, utm, crs)
        r0, r1, c0, c1 = _pixel_window(line.bounds, to_pixel, (height, width))
        if r1 <= r0 or c1 <= c0:
            continue
        r0, c0, r1, c1 = max(0, r0 - pad), max(0, c0 - pad), min(height, r1 + pad), min(width, c1 + pad)
        # The window's transform: the grid's, moved to the window's top-left pixel.
        window = Affine(a, b, c + a * c0 + b * r0, d, e, f + d * c0 + e * r0)
        path = _burn(line, window, (r1 - r0, c1 - c0), all_touched=True)
        for i, (tested, reach) in enumerate(tests):
            grown = ndimage.binary_dilation(path, structure=np.ones((2 * reach + 1,) * 2, bool)) if reach else path
            lit[i] += int(np.count_nonzero(grown & tested[r0:r1, c0:c1]))
    return lit, length


def area_km2(aoi: Aoi) -> float:
    """Geodesic area of the AOI polygon on the WGS 84 ellipsoid, km²."""
    return _geodesic_area_km2(_polygon_ll(aoi))


def aoi_summary(aoi: Aoi) -> dict[str, Any]:
    """A flat description for listings: id, name, area, track length and counts, sensors, survey.

    ``sensors`` is None when the AOI does not override the config's default sensors. ``survey`` is
    "approximate" when any track feature in the file is marked ``"survey": "approximate"``,
    "surveyed" when none is, and None when the file is not at hand.
    """
    sensors = aoi.settings.get("sensors")
    return {
        "id": aoi.id,
        "name": aoi.name,
        "area_km2": round(area_km2(aoi), 3),
        "track_km": round(track_length_m(aoi) / 1000.0, 3),
        "n_tracks": len(aoi.tracks),
        "n_yards": len(aoi.yards),
        "sensors": list(sensors) if sensors is not None else None,
        "path": str(aoi.path) if aoi.path is not None else None,
        "survey": _survey(aoi.path),
    }


def _survey(path: Path | None) -> str | None:
    """Track survey quality read back from the file (the Aoi keeps geometries, not properties)."""
    if path is None:
        return None
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        marks = [f["properties"].get("survey") for f in doc["features"]
                 if isinstance(f, dict) and isinstance(f.get("properties"), dict)
                 and f["properties"].get("kind") == "track"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return "approximate" if "approximate" in marks else "surveyed"
