"""One scene of one AOI through quality, reference and change: arrays in, an Observation out.

Pure apart from the reference scenes it is handed: the pipeline (monitor.py) loads those.
Every scene is first put on the AOI's analysis grid (its UTM box at 10 m, see geo.aoi_grid), so
masks are computed once per AOI and scenes from any source line up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from railwatch import aoi as aoi_mod
from railwatch.config import DetectorSettings
from railwatch.detect import DETECTOR_VERSION
from railwatch.detect.change import Change, mean_reference, median_reference, optical_change, radar_change
from railwatch.detect.estimate import estimate_cars
from railwatch.detect.quality import OPTICAL_BANDS, SCL_WATER, Quality, optical_quality, radar_quality
from railwatch.domain import S1, S2, Aoi, Observation, Raster, SceneRef
from railwatch.geo import Grid, aoi_grid

F32 = npt.NDArray[np.float32]
#: Below this many earlier clear scenes there is no reference, and so no estimate yet.
MIN_REFERENCE = 2
#: Haze score (coherent residual around the track, in noise units) above which a scene is `haze`.
HAZE_LIMIT = 1.5


@dataclass
class AoiContext:
    """Per-AOI masks on the analysis grid, computed once."""

    aoi: Aoi
    grid: Grid
    track: npt.NDArray[np.bool_]
    stable: npt.NDArray[np.bool_]
    metres_per_pixel: float

    @classmethod
    def build(cls, aoi: Aoi, half_width_m: float | None = None) -> AoiContext:
        """Masks on the AOI grid; ``half_width_m`` is the config default, the AOI's own setting wins."""
        grid = aoi_grid(aoi)
        width = aoi.settings.get("track_half_width_m", half_width_m)
        track = aoi_mod.track_mask(aoi, grid.crs, grid.transform, grid.shape, half_width_m=width)
        inside = aoi_mod.aoi_mask(aoi, grid.crs, grid.transform, grid.shape)
        near_track = ndimage.binary_dilation(track, iterations=2)
        n = int(track.sum())
        metres = aoi_mod.track_length_m(aoi) / n if n else 10.0
        return cls(aoi, grid, track, inside & ~near_track, metres)


@dataclass
class Prepared:
    """A scene on the analysis grid: float bands (reflectance 0..1 or linear sigma0) and its quality."""

    ref: SceneRef
    bands: dict[str, F32]
    quality: Quality
    geometry_key: str


def geometry_key(ref: SceneRef, tags: dict[str, str] | None = None) -> str:
    """Radar compares like with like: orbit direction and relative orbit, else the time of day."""
    if ref.collection != S1:
        return "optical"
    direction = ref.orbit_direction or (tags or {}).get("ORBIT_DIRECTION")
    orbit = ref.relative_orbit or (tags or {}).get("RELATIVE_ORBIT")
    if direction or orbit:
        return f"{(direction or '?').lower()}:{orbit or '?'}"
    return f"hour:{ref.acquired.hour:02d}"


def to_grid(raster: Raster, grid: Grid) -> dict[str, npt.NDArray[Any]]:
    """The raster's bands on ``grid`` (unchanged when already on it; else reprojected)."""
    from rasterio.crs import CRS
    from rasterio.warp import Resampling, reproject

    same = (
        raster.shape == grid.shape
        and CRS.from_user_input(raster.crs) == CRS.from_user_input(grid.crs)
        and all(abs(a - b) < 1e-6 for a, b in zip(tuple(raster.transform)[:6], tuple(grid.transform)[:6], strict=True))
    )
    if same:
        return dict(raster.bands)
    out: dict[str, npt.NDArray[Any]] = {}
    for name, arr in raster.bands.items():
        categorical = name == "SCL"
        dst = np.zeros(grid.shape, dtype=arr.dtype)
        if np.issubdtype(arr.dtype, np.floating):
            dst[:] = np.nan
        reproject(
            source=arr,
            destination=dst,
            src_transform=raster.transform,
            src_crs=raster.crs,
            dst_transform=grid.transform,
            dst_crs=grid.crs,
            src_nodata=(np.nan if np.issubdtype(arr.dtype, np.floating) else 0),
            dst_nodata=(np.nan if np.issubdtype(arr.dtype, np.floating) else 0),
            resampling=Resampling.nearest if categorical else Resampling.bilinear,
        )
        out[name] = dst
    return out


def prepare(ctx: AoiContext, ref: SceneRef, raster: Raster, cfg: DetectorSettings) -> Prepared:
    bands = to_grid(raster, ctx.grid)
    tags = {k: str(v) for k, v in raster.tags.items()}
    if ref.collection == S2:
        q = optical_quality(
            bands, ctx.track, nodata_fraction=cfg.nodata_fraction, snow_fraction=cfg.snow_fraction,
            cloudy_fraction=cfg.cloudy_fraction, partial_fraction=cfg.partial_fraction,
        )
        fb = {b: np.asarray(bands[b], np.float32) / 10000.0 for b in OPTICAL_BANDS if b in bands}
        if "SCL" in bands:
            q_clear = q.clear & (np.asarray(bands["SCL"]) != SCL_WATER)
            q = Quality(q.status, q.reason, q_clear | (ctx.track & q.clear), q.fractions)
    else:
        fb = {b: np.asarray(bands[b], np.float32) for b in ("VV", "VH")}
        q = radar_quality(fb, ctx.track, nodata_fraction=cfg.nodata_fraction, partial_fraction=cfg.partial_fraction)
    return Prepared(ref, fb, q, geometry_key(ref, tags))


def analyse(
    ctx: AoiContext,
    scene: Prepared,
    references: Sequence[Prepared],
    cfg: DetectorSettings,
    *,
    scale: float = 1.0,
    rel_sigma: float | None = None,
) -> Observation:
    """The observation of one prepared scene given earlier usable scenes of the same geometry."""
    q = scene.quality
    base: dict[str, Any] = {
        "aoi_id": ctx.aoi.id,
        "collection": scene.ref.collection,
        "acquired": scene.ref.acquired,
        "geometry_key": scene.geometry_key,
        "detector_version": DETECTOR_VERSION,
        "clear_fraction": round(q.clear_fraction, 4),
    }
    metrics: dict[str, Any] = {f"frac_{k}": round(v, 4) for k, v in q.fractions.items()}
    if q.status not in ("ok", "partial"):
        return Observation(status=q.status, reason=q.reason, metrics=metrics, **base)
    refs = [r for r in references if r.geometry_key == scene.geometry_key][-cfg.reference_scenes:]
    metrics["n_reference"] = len(refs)
    if len(refs) < MIN_REFERENCE:
        return Observation(
            status=q.status,
            reason=f"building the reference: {len(refs)} of {MIN_REFERENCE} earlier clear scenes",
            metrics=metrics,
            **base,
        )
    track = ctx.track & q.clear
    change: Change
    if scene.ref.collection == S2:
        bands = [b for b in OPTICAL_BANDS if b in scene.bands]
        reference = median_reference([r.bands for r in refs], bands, [r.quality.clear for r in refs])
        ref_ok = np.all(np.stack([np.isfinite(reference[b]) for b in bands]), axis=0)
        stable = ctx.stable & q.clear & ref_ok
        change = optical_change(scene.bands, reference, track & ref_ok, stable)
        metrics["haze"] = round(change.haze, 3)
        if change.haze > HAZE_LIMIT:
            return Observation(
                status="haze",
                reason=f"hazy: the track's surroundings changed coherently ({change.haze:.1f} noise units)",
                metrics=metrics | _round(change.metrics),
                **base,
            )
    else:
        reference = mean_reference([r.bands for r in refs], ("VV", "VH"))
        stable = ctx.stable & q.clear
        change = radar_change(scene.bands, reference, len(refs), track, stable)
    if change.n_track == 0:
        return Observation(status="nodata", reason="no comparable track pixels", metrics=metrics, **base)
    est = estimate_cars(
        n_occupied=change.n_occupied,
        expected_false=change.expected_false,
        n_usable=change.n_track,
        n_track=int(ctx.track.sum()),
        metres_per_pixel=ctx.metres_per_pixel,
        car_length_m=cfg.car_length_m,
        scale=scale,
        rel_sigma=rel_sigma,
    )
    metrics |= _round(change.metrics) | {"raw_cars": round(est.raw, 3), "scale": scale}
    return Observation(
        status=q.status,
        reason=q.reason,
        estimated_cars=round(est.cars, 2),
        estimated_cars_low=round(est.low, 2),
        estimated_cars_high=round(est.high, 2),
        activity=round(change.activity, 5),
        metrics=metrics,
        **base,
    )


def _round(d: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in d.items()}


def scene_time_key(ref: SceneRef) -> tuple[datetime, str]:
    return (ref.acquired, ref.collection)
