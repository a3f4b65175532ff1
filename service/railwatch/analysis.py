"""One scene of one AOI through quality, reference and change: arrays in, an Observation out.

Pure apart from the reference scenes it is handed: the pipeline (monitor.py) loads those.
Every scene is first put on the AOI's analysis grid (its UTM box at 10 m, see geo.aoi_grid), so
masks are computed once per AOI and scenes from any source line up. Only the pixels the change test
reads (the AOI's change zone, :func:`change_zone`) are then kept, as vectors: past the quality masks,
a scene costs time and memory in proportion to its track, not to the AOI's area.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from railwatch import aoi as aoi_mod
from railwatch.config import DetectorSettings
from railwatch.detect import DETECTOR_VERSION
from railwatch.detect.change import (
    RADAR_WINDOW,
    Change,
    covered,
    ndvi,
    optical_change,
    optical_reference_and_fit,
    radar_change,
    radar_reference,
    spread_sample,
    wet_snow_drop_db,
)
from railwatch.detect.estimate import estimate_cars
from railwatch.detect.quality import OPTICAL_BANDS, SCL_WATER, Quality, optical_quality, radar_quality
from railwatch.detect.zone import Zone
from railwatch.domain import S1, S2, Aoi, Observation, Raster, SceneRef
from railwatch.geo import Grid, aoi_grid

F32 = npt.NDArray[np.float32]
B = npt.NDArray[np.bool_]
#: Below this many earlier clear scenes there is no reference, and so no estimate yet (radar).
MIN_REFERENCE = 2
#: The same for optical, whose test has no sign (cars darker or brighter than the ballast): the median of
#: two reference scenes is their mean, so a car standing in either of them and gone now is a change as
#: large as a car arriving. On the analysis-kernel archive (cars moved between scenes) the first scene
#: estimated against two references counted 590 occupied pixels where 99 were cars; against three or
#: more, every count was the cars plus the false-alarm level. The radar test counts only what is
#: brighter than the reference, so a departed car cannot count there.
MIN_OPTICAL_REFERENCE = 3
#: A track pixel is a *core* pixel for the optical test when at least this share of it lies inside
#: the track band: it then sees only the formation (ballast, gravel), not the fields beside it,
#: whose seasonal change would otherwise look like rolling stock in the mixed pixels.
CORE_COVERAGE = 0.9
#: Without enough core pixels (tracks drawn off the formation, a very narrow band) use every track pixel.
MIN_CORE_SHARE = 0.3
#: The reference is built for the track grown by this many pixels (what the change test reads) ...
ZONE_MARGIN = 3
#: ... and for this many stable pixels, evenly spread: the radiometric fit's candidates, of which
#: those not vegetated in either date are fitted (at most ``detect.change.FIT_SAMPLE`` of them). In
#: summer only a fifth may qualify, so the pool stays large (5 000 left a small AOI's September fits
#: on about a thousand pixels and moved its gains by 1 %).
ZONE_STABLE_SAMPLE = 20000
#: The radar reference is computed on the track and on this many of the zone's stable pixels, evenly
#: spread: the radar test reads only the track; the stable pixels give the surroundings' ratio, a diagnostic.
RADAR_STABLE_SAMPLE = 5000


@dataclass
class AoiContext:
    """Per-AOI masks on the analysis grid, computed once, and the change zone with its windows."""

    aoi: Aoi
    grid: Grid
    track: B
    stable: B
    metres_per_pixel: float  # metres of centreline per track pixel a consist lights (radar; aoi.lit_pixels)
    #: The pixels the change test can read (see :func:`change_zone`), with a window around every
    #: track pixel; prepared scenes hold their bands as vectors over it.
    zone: Zone
    core: B | None = None
    metres_per_core_pixel: float = 10.0  # the same among the core pixels (optical)

    @classmethod
    def build(cls, aoi: Aoi, half_width_m: float | None = None) -> AoiContext:
        """Masks on the AOI grid; ``half_width_m`` is the config default, the AOI's own setting wins."""
        grid = aoi_grid(aoi)
        width = aoi.settings.get("track_half_width_m", half_width_m)
        track = aoi_mod.track_mask(aoi, grid.crs, grid.transform, grid.shape, half_width_m=width)
        inside = aoi_mod.aoi_mask(aoi, grid.crs, grid.transform, grid.shape)
        near_track = ndimage.binary_dilation(track, iterations=2)
        n = int(track.sum())
        coverage = aoi_mod.track_coverage(aoi, grid.crs, grid.transform, grid.shape, half_width_m=width)
        core = track & (coverage >= CORE_COVERAGE)
        if n == 0 or core.sum() < MIN_CORE_SHARE * n:
            core = track
        stable = inside & ~near_track
        # Metres of centreline per pixel a consist lights (docs/detector.md §5): radar averages a window of
        # track pixels, so a consist lights the track pixels within half a window of its centreline, those of
        # a neighbouring track of a yard included; optical tests each core pixel on its own.
        (lit_radar, lit_optical), length = aoi_mod.lit_pixels(aoi, grid.crs, grid.transform, grid.shape,
                                                              [(track, RADAR_WINDOW // 2), (core, 0)])
        return cls(aoi, grid, track, stable, length / lit_radar if lit_radar else 10.0,
                   Zone.build(change_zone(track, stable), track), core,
                   length / lit_optical if lit_optical else 10.0)

    def detection_mask(self, collection: str) -> tuple[npt.NDArray[np.bool_], float]:
        """The pixels a sensor's occupancy test runs on, and the metres of centreline per pixel a consist
        lights among them (:func:`railwatch.aoi.lit_pixels`, docs/detector.md §5).

        Optical tests the core pixels (the edge pixels also see the fields beside the track); radar
        every track pixel — its 20 m resolution mixes the fields in anyway, and on the tuning seeds the
        core pixels made the radar count worse (alert F1 0.77 → 0.58, MAPE 41 % → 49 %).
        """
        if collection == S2 and self.core is not None:
            return self.core, self.metres_per_core_pixel
        return self.track, self.metres_per_pixel

    def on_zone(self, mask: B) -> B:
        """A grid mask of this AOI as a pixel vector over its change zone."""
        return np.asarray(self.zone.gather(mask), bool)

    @cached_property
    def optical_reads(self) -> B:
        """The zone pixels the optical test reads around its tested pixels (the 7 x 7 windows of the
        Sentinel-2 detection mask), as a pixel vector over the zone: where the reference is computed."""
        mask, _metres = self.detection_mask(S2)
        windows = self.zone.windows(np.flatnonzero(self.on_zone(mask)))
        reads = np.zeros(self.zone.flat.size, bool)
        reads[windows[windows >= 0]] = True
        return reads

    @cached_property
    def stable_sample(self) -> B:
        """``RADAR_STABLE_SAMPLE`` of the zone's stable pixels, evenly spread, as a pixel vector over the zone."""
        stable = self.on_zone(self.stable)
        sample = np.zeros_like(stable)
        sample[spread_sample(stable, RADAR_STABLE_SAMPLE)] = True
        return sample


@dataclass(frozen=True)
class OnGrid:
    """A prepared scene's float bands and usable-pixel mask on the whole analysis grid (for pictures)."""

    bands: dict[str, F32]
    clear: B


@dataclass
class Prepared:
    """A scene ready for the change test: float bands (reflectance 0..1 or linear sigma0) and usable
    pixels (``quality.clear``) as pixel vectors over the AOI's change zone, and its quality.

    The zone is all the change test reads, so that is all the monitor's scene cache holds. ``grid``
    keeps the whole-grid bands and mask when :func:`prepare` is asked for them (evidence pictures
    show the whole AOI).
    """

    ref: SceneRef
    bands: dict[str, F32]
    quality: Quality
    geometry_key: str
    grid: OnGrid | None = None
    #: Optical: the NDVI on the zone (:func:`detect.change.ndvi`), computed once (in the read-ahead thread
    #: when there is one) for the radiometric fits of every scene this one is a reference of.
    ndvi: F32 | None = None


def min_reference(collection: str, reference_scenes: int) -> int:
    """Earlier clear scenes of the same geometry a scene of ``collection`` needs for its reference (at
    most ``[detector] reference_scenes``, the most it is ever given)."""
    return min(MIN_OPTICAL_REFERENCE if collection == S2 else MIN_REFERENCE, reference_scenes)


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


def prepare(ctx: AoiContext, ref: SceneRef, raster: Raster, cfg: DetectorSettings, *,
            keep_grid: bool = False) -> Prepared:
    """The scene's quality (on the AOI's track pixels) and its float bands on the change zone.

    Quality and bands are computed at the zone's pixels only (the cloud-edge buffer of an optical
    scene with cloud, shadow or snow reads the whole grid: an edge reaches beyond the zone); the
    masks are pixel by pixel, so they are those of the whole grid at those pixels. ``keep_grid``
    also keeps the whole-grid float bands and mask (:attr:`Prepared.grid`), and so computes the
    quality on the whole grid.
    """
    bands = to_grid(raster, ctx.grid)
    tags = {k: str(v) for k, v in raster.tags.items()}
    zone = None if keep_grid else ctx.zone  # the pixels quality is computed on (None: the whole grid)
    if ref.collection == S2:
        q = optical_quality(
            bands, ctx.track, nodata_fraction=cfg.nodata_fraction, snow_fraction=cfg.snow_fraction,
            cloudy_fraction=cfg.cloudy_fraction, partial_fraction=cfg.partial_fraction, zone=zone,
        )
        clear = q.clear
        if "SCL" in bands:  # water is no reference for the radiometric fit, but a track over it stays
            scl, track = (bands["SCL"], ctx.track) if zone is None else (zone.gather(bands["SCL"]), ctx.on_zone(ctx.track))
            clear = (clear & (np.asarray(scl) != SCL_WATER)) | (track & clear)
        names: tuple[str, ...] = tuple(b for b in OPTICAL_BANDS if b in bands)
        unit = np.float32(10000.0)  # digital numbers to reflectance
    else:
        q = radar_quality(bands, ctx.track, nodata_fraction=cfg.nodata_fraction, partial_fraction=cfg.partial_fraction,
                          zone=zone)
        clear, names, unit = q.clear, ("VV", "VH"), np.float32(1.0)

    def to_float(a: npt.NDArray[Any]) -> F32:
        return np.asarray(a, np.float32) / unit

    on_grid = OnGrid({b: to_float(bands[b]) for b in names}, clear) if keep_grid else None
    zone_bands = {b: to_float(ctx.zone.gather(bands[b])) for b in names}
    quality = Quality(q.status, q.reason, ctx.on_zone(clear) if zone is None else clear, q.fractions)
    vegetation = ndvi(zone_bands) if "B04" in zone_bands and "B08" in zone_bands else None
    return Prepared(ref, zone_bands, quality, geometry_key(ref, tags), on_grid, vegetation)


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
    needed = min_reference(scene.ref.collection, cfg.reference_scenes)
    if len(refs) < needed:
        return Observation(
            status=q.status,
            reason=f"building the reference: {len(refs)} of {needed} earlier clear scenes",
            metrics=metrics,
            **base,
        )
    mask, metres = ctx.detection_mask(scene.ref.collection)
    if scene.ref.collection == S1:
        drop = wet_snow_drop_db(scene.bands, [r.bands for r in refs], ctx.on_zone(ctx.stable) & q.clear)
        metrics["backscatter_change_db"] = round(drop, 2)
        if drop < -cfg.wet_snow_drop_db:
            return Observation(
                status="snow",
                reason=(f"wet snow: the surroundings are {-drop:.1f} dB darker than in the same-orbit reference "
                        f"(limit {cfg.wet_snow_drop_db:.1f} dB)"),
                metrics=metrics,
                **base,
            )
    change, _reference = _zone_change(ctx, scene, refs)
    if change.n_track == 0:
        return Observation(status="nodata", reason="no comparable track pixels", metrics=metrics, **base)
    est = estimate_cars(
        n_occupied=change.n_occupied,
        expected_false=change.expected_false,
        n_usable=change.n_track,
        n_track=int(mask.sum()),
        metres_per_pixel=metres,
        car_length_m=cfg.car_length_m,
        scale=scale,
        rel_sigma=rel_sigma,
    )
    metrics |= _round(change.metrics) | {
        "raw_cars": round(est.raw, 3),
        "raw_cars_sd": round(est.count_sd, 3),
        "scale": scale,
        "log_sigma": rel_sigma,
    }
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


def change_zone(track: B, stable: B) -> B:
    """The pixels a reference is built for: the track grown by ``ZONE_MARGIN`` pixels, plus an even
    sample of the stable pixels for the radiometric fit.

    The optical test reads the reference at most 1.5 pixels off a track pixel (registration and
    half-pixel candidates) and the surroundings of a track pixel within 3 (the 7 x 7 window); the
    radar test only on the track. Building the reference over the whole grid costs time and memory
    in proportion to the AOI's area rather than its track (bench/kernel.py, bench/memory.py).
    """
    zone = np.asarray(ndimage.binary_dilation(track, iterations=ZONE_MARGIN))
    zone.reshape(-1)[spread_sample(stable, ZONE_STABLE_SAMPLE)] = True
    return zone


def _zone_change(ctx: AoiContext, scene: Prepared, refs: Sequence[Prepared]) -> tuple[Change, dict[str, F32]]:
    """The change of a usable scene against its reference scenes, and the reference itself (in the
    scene's radiometry for optical, track-normalised for radar), as pixel vectors over ``ctx.zone``."""
    mask, _metres = ctx.detection_mask(scene.ref.collection)
    q = scene.quality
    on_mask = ctx.on_zone(mask)
    track = on_mask & q.clear
    stable = ctx.on_zone(ctx.stable) & q.clear
    if scene.ref.collection == S2:
        reference, fit = optical_reference_and_fit(
            scene.bands, [r.bands for r in refs], [r.quality.clear for r in refs], stable,
            where=ctx.optical_reads, ndvis=[scene.ndvi, *(r.ndvi for r in refs)])
        # Where some reference scene is clear (the NDVI bands cover every stable pixel; the others only
        # those the test reads).
        ref_ok = covered(reference)
        change = optical_change(scene.bands, reference, track & ref_ok, stable & ref_ok, zone=ctx.zone,
                                neighbours=on_mask, fit=fit)
        return change, reference
    # The radar test reads the reference on the track only (and RADAR_STABLE_SAMPLE stable pixels).
    reference = radar_reference([r.bands for r in refs], track, where=on_mask | ctx.stable_sample)
    return radar_change(scene.bands, reference, len(refs), track, stable, zone=ctx.zone), reference


def scene_change(ctx: AoiContext, scene: Prepared, refs: Sequence[Prepared]) -> tuple[Change, dict[str, F32]]:
    """The change of a usable scene against its reference scenes, exactly as :func:`analyse` measures
    it, and the reference itself (in the scene's radiometry for optical, track-normalised for radar),
    on the whole grid: the reference is NaN where the test does not read it (off ``ctx.zone``; for
    optical, also off the tested pixels' windows and the stable pixels, see :func:`optical_reference`).

    Public so that evidence (quicklooks, change maps) shows the very pixels the estimate counted.
    """
    change, reference = _zone_change(ctx, scene, refs)
    return change.on_grid(ctx.zone), {b: ctx.zone.scatter(v, np.nan) for b, v in reference.items()}


def _round(d: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in d.items()}


def scene_time_key(ref: SceneRef) -> tuple[datetime, str]:
    return (ref.acquired, ref.collection)
