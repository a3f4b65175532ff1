#!/usr/bin/env python3
"""Analysis-kernel benchmark: per-scene time and peak memory of railwatch's own pipeline code.

For AOIs from 1 km² to 100 km² (400 km² with ``--full``) it

1. writes a synthetic AOI (a square polygon with a rail line every kilometre, so the track length
   in km is about the area in km²) and an archive of Sentinel-2 and Sentinel-1 scenes on the AOI's
   10 m grid with the project's own archive writer (``railwatch.imagery.archive.write_scene``, so
   the files follow docs/archive.md);
2. times, each in a fresh child process (its peak RSS is the process's ``ru_maxrss``):

   - **railwatch**: ``Monitor.backfill`` over the archive, exactly as ``railwatch backfill`` runs
     it (read + validate, grid, quality, change against the cached reference scenes, estimate,
     store). The track masks (``AoiContext.build``) are built once per AOI and timed apart; the
     per-scene figure is the wall time between two progress callbacks, the median over the scenes
     analysed against a full reference (``reference_scenes`` earlier clear scenes), per sensor.
     With read-ahead (``[imagery] read_ahead``, default 2; ``--read-ahead N`` sets it) the next
     scene is read and prepared in a background thread while one is analysed, so that wall time
     overlaps the next read; the CPU time per scene (``time.process_time()`` between the same
     callbacks: every thread of the process) is shown beside it, so overlap (wall below CPU) can be
     told from less work (both lower), and so are the whole backfill's wall and CPU time. A scene's
     read time and files are its own read (wherever it ran) and the references it read again;
   - **rasterstats**: ``rasterstats.zonal_stats`` of the buffered track geometry, mean and count of
     every band the detector reads, on the same files;
   - **exactextract**: ``exactextract.exact_extract`` of the same geometry and statistics;
   - **floor**: a bare ``rasterio`` read of the same bands plus one numpy pass (mean and count of
     the valid track pixels, pixel indices precomputed);

   every method decodes the files' compressed blocks on the same number of GDAL threads: railwatch's
   ``[imagery] read_threads`` (default 2; ``--read-threads N`` sets it);

3. prints a table of medians (several repetitions for the peers and the floor), the ratios
   railwatch/floor, railwatch/rasterstats and railwatch/exactextract, and the time per million
   track pixels and per million grid pixels across sizes (linearity).

    .venv/bin/python bench/kernel.py                      # 1, 10, 50, 100 km², ~5 min on 2 cores
    .venv/bin/python bench/kernel.py --full               # adds 400 km² (~2000 x 2000 px)
    .venv/bin/python bench/kernel.py --sizes 1 10 --json out.json
    .venv/bin/python bench/kernel.py --sizes 10 100 --read-ahead 0   # scenes read, then analysed

rasterstats and exactextract come with ``pip install -e '.[bench]'``; without them their columns
are left empty. Nothing here is imported by the service.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

#: AOI sizes (km²) of the default run and of ``--full``.
SIZES = (1.0, 10.0, 50.0, 100.0)
FULL_SIZES = (1.0, 10.0, 50.0, 100.0, 400.0)
#: A rail line every this many metres across the AOI: track km ≈ area km².
TRACK_SPACING_M = 1000.0
#: Where the synthetic AOIs lie (near Tumangang-Khasan, UTM zone 52N).
LON0, LAT0 = 130.50, 42.40
S2 = "sentinel-2-l2a"
S1 = "sentinel-1-grd"
T0 = datetime(2024, 5, 1, 2, 0, tzinfo=UTC)


# --------------------------------------------------------------------------------------------
# Synthetic AOIs and archives
# --------------------------------------------------------------------------------------------


def aoi_id(km2: float, spacing_m: float = TRACK_SPACING_M) -> str:
    dense = "" if spacing_m == TRACK_SPACING_M else f"-every{spacing_m:g}m"
    return f"bench-{km2:g}km2{dense}".replace(".", "p")


def write_aoi(folder: Path, km2: float, spacing_m: float = TRACK_SPACING_M) -> Path:
    """A square AOI of ``km2`` with parallel east-west rail lines every ``spacing_m`` (GeoJSON, docs/aoi.md)."""
    side_km = math.sqrt(km2)
    dlat = side_km / 111.32
    dlon = side_km / (111.32 * math.cos(math.radians(LAT0)))
    w, s, e, n = LON0, LAT0, LON0 + dlon, LAT0 + dlat
    n_lines = max(1, round(side_km * 1000.0 / spacing_m))
    margin = 0.02 * dlon
    features: list[dict[str, Any]] = [{
        "type": "Feature",
        "properties": {"kind": "aoi", "id": aoi_id(km2, spacing_m), "name": f"Benchmark AOI {km2:g} km²",
                       "sensors": [S2, S1]},
        "geometry": {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]},
    }]
    for i in range(n_lines):
        lat = s + (i + 0.5) * dlat / n_lines
        # A slight bend so the lines are not grid-aligned.
        xs = np.linspace(w + margin, e - margin, 9)
        coords = [[float(x), float(lat + 0.00004 * math.sin(3.0 * (x - w) / dlon))] for x in xs]
        features.append({"type": "Feature", "properties": {"kind": "track", "name": f"line {i + 1}"},
                         "geometry": {"type": "LineString", "coordinates": coords}})
    path = folder / f"{aoi_id(km2, spacing_m)}.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}), encoding="utf-8")
    return path


def load(path: Path) -> Any:
    from railwatch.aoi import load_aoi

    aoi, _warnings = load_aoi(path, max_area_km2=10_000.0)
    return aoi


#: Reflectance (B02, B03, B04, B08) of the land-cover classes: vegetation, bare soil, built, ballast, car.
_REFL = np.array([[0.03, 0.06, 0.04, 0.35], [0.08, 0.11, 0.14, 0.22], [0.12, 0.13, 0.14, 0.18],
                  [0.09, 0.10, 0.11, 0.14], [0.05, 0.05, 0.05, 0.06]], np.float32)
#: Linear sigma0 VV of the same classes (VH is a fifth of it).
_SIGMA0 = np.array([0.04, 0.03, 0.30, 0.08, 0.80], np.float32)


def scene_times(n_s2: int, n_s1: int) -> list[tuple[str, datetime]]:
    """S2 every 5 days (02:00 UTC), S1 of one geometry every 6 days (21:00 UTC)."""
    out = [(S2, T0 + timedelta(days=5 * i)) for i in range(n_s2)]
    out += [(S1, T0 + timedelta(days=6 * i + 1, hours=19)) for i in range(n_s1)]
    return sorted(out, key=lambda t: t[1])


def write_archive(aoi: Any, root: Path, n_s2: int, n_s1: int, *, seed: int = 1,
                  s1_geometries: Sequence[tuple[str, int, int]] = (("descending", 61, 19),)) -> int:
    """Write ``n_s2`` Sentinel-2 and ``n_s1`` Sentinel-1 scenes per geometry; returns the number written.

    ``s1_geometries`` holds (direction, relative orbit, UTC hour) per Sentinel-1 geometry.
    Land cover in 250 m parcels, ballast on the tracks, a few per cent of the track occupied by
    cars that move between scenes, seasonal and radiometric drift, sensor noise and speckle.
    """
    from railwatch import aoi as aoi_mod
    from railwatch.domain import Raster
    from railwatch.geo import aoi_grid
    from railwatch.imagery.archive import write_scene

    grid = aoi_grid(aoi)
    h, w = grid.shape
    rng = np.random.default_rng(seed)
    parcel = 25
    land = rng.integers(0, 3, size=(h // parcel + 1, w // parcel + 1), dtype=np.int8)
    land = np.repeat(np.repeat(land, parcel, axis=0), parcel, axis=1)[:h, :w]
    track = aoi_mod.track_mask(aoi, grid.crs, grid.transform, grid.shape)
    land[track] = 3
    ty, tx = np.nonzero(track)
    count = 0

    def with_cars() -> np.ndarray:
        cls = land.copy()
        k = int(rng.uniform(0.0, 0.08) * ty.size)
        if k:
            start = rng.integers(0, ty.size, size=max(1, k // 20))
            idx = (start[:, None] + np.arange(20)[None, :]).ravel() % ty.size
            cls[ty[idx], tx[idx]] = 4
        return cls

    for i in range(n_s2):
        cls = with_cars()
        gain = np.float32(1.0 + rng.normal(0, 0.03))
        season = np.float32(1.0 + 0.2 * math.sin(i / 3.0))
        bands: dict[str, np.ndarray] = {}
        for j, b in enumerate(("B02", "B03", "B04", "B08")):
            lut = _REFL[:, j].copy()
            if b == "B08":
                lut[0] *= season
            refl = lut[cls] * gain + rng.standard_normal((h, w), dtype=np.float32) * np.float32(0.004)
            bands[b] = np.clip(refl * 10000.0, 1, 65535).astype(np.uint16)
        bands["SCL"] = np.where(cls == 0, 4, 5).astype(np.uint16)
        raster = Raster(bands=bands, crs=grid.crs, transform=grid.transform)
        write_scene(root, aoi.id, S2, T0 + timedelta(days=5 * i), raster)
        count += 1
    for g, (direction, orbit, hour) in enumerate(s1_geometries):
        for i in range(n_s1):
            cls = with_cars()
            vv = _SIGMA0[cls] * rng.gamma(4.4, 1 / 4.4, size=(h, w)).astype(np.float32)
            vh = 0.2 * _SIGMA0[cls] * rng.gamma(4.4, 1 / 4.4, size=(h, w)).astype(np.float32)
            raster = Raster(bands={"VV": vv, "VH": vh}, crs=grid.crs, transform=grid.transform,
                            tags={"ORBIT_DIRECTION": direction, "RELATIVE_ORBIT": str(orbit)})
            when = T0 + timedelta(days=6 * i + 1 + 2 * g)
            write_scene(root, aoi.id, S1, when.replace(hour=hour), raster)
            count += 1
    return count


# --------------------------------------------------------------------------------------------
# Measurements (each runs in its own child process unless inline)
# --------------------------------------------------------------------------------------------


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _rss() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def measure_railwatch(aoi_path: str, archive: str, workdir: str, cache_bytes: int | None = None,
                      read_ahead: int | None = None, read_threads: int | None = None) -> dict[str, Any]:
    """``Monitor.backfill`` over the archive; masks timed apart, per-scene wall and CPU times and fetch times.

    ``cache_bytes`` overrides the monitor's prepared-scene cache budget (for comparisons);
    ``read_ahead`` sets ``[imagery] read_ahead`` and ``read_threads`` ``[imagery] read_threads`` (None: the
    configuration's default).
    """
    from railwatch.config import Settings
    from railwatch.imagery.files import FilesProvider
    from railwatch.monitor import Monitor
    from railwatch.store import Store

    aoi = load(Path(aoi_path))
    db = Path(workdir) / f"rw-{os.getpid()}-{time.monotonic_ns()}.db"
    store = Store(f"sqlite:///{db}")
    imagery = {k: v for k, v in (("read_ahead", read_ahead), ("read_threads", read_threads)) if v is not None}
    settings = Settings.model_validate({"store": {"url": store.url}, "imagery": imagery})

    class TimedFiles(FilesProvider):
        """Each fetch's duration, scene, and whether the read-ahead thread made it."""

        def __init__(self, root: str, read_threads: int) -> None:
            super().__init__(root, read_threads=read_threads)
            self.fetches: list[float] = []
            self.scenes: list[tuple[str, datetime, bool]] = []

        def fetch(self, aoi: Any, ref: Any) -> Any:
            t = time.perf_counter()
            try:
                return super().fetch(aoi, ref)
            finally:
                self.fetches.append(time.perf_counter() - t)
                self.scenes.append((ref.collection, ref.acquired, threading.current_thread() is not threading.main_thread()))

    provider = TimedFiles(archive, read_threads=settings.imagery.read_threads)  # as `railwatch backfill` builds it
    monitor = Monitor(settings, store, provider)
    if cache_bytes is not None and hasattr(monitor, "cache_bytes"):
        monitor.cache_bytes = cache_bytes
    rss0 = _rss()
    t = time.perf_counter()
    ctx = monitor._context(aoi)  # the masks, built once per AOI (backfill builds them before its first scene)
    t_masks = time.perf_counter() - t
    n_track = int(ctx.track.sum())
    stamps: list[float] = []
    cpu_stamps: list[float] = []
    fetch_marks: list[int] = []

    def progress(_i: int, _n: int) -> None:
        stamps.append(time.perf_counter())
        cpu_stamps.append(time.process_time())  # every thread of the process: the read-ahead's too
        fetch_marks.append(len(provider.fetches))

    t_start, cpu_start = time.perf_counter(), time.process_time()
    result = monitor.backfill(aoi, since=T0 - timedelta(days=1), until=T0 + timedelta(days=3650), progress=progress)
    wall, cpu_total = time.perf_counter() - t_start, time.process_time() - cpu_start
    obs = sorted(store.observations(aoi.id), key=lambda o: (o.acquired, o.collection))
    # A scene's reads: those of the main thread between its progress callbacks (the scene itself, or
    # references read again), and its own read by the read-ahead thread, whenever that was.
    ahead = {(c, a): d for d, (c, a, background) in zip(provider.fetches, provider.scenes, strict=True) if background}
    per_scene: list[dict[str, Any]] = []
    prev, prev_cpu, prev_fetch = t_start, cpu_start, 0
    for o, stamp, cpu, fm in zip(obs, stamps, cpu_stamps, fetch_marks, strict=True):
        main = [d for d, (*_, background) in zip(provider.fetches[prev_fetch:fm], provider.scenes[prev_fetch:fm],
                                                  strict=True) if not background]
        own = [ahead[(o.collection, o.acquired)]] if (o.collection, o.acquired) in ahead else []
        per_scene.append({
            "collection": o.collection, "status": o.status, "n_reference": o.metrics.get("n_reference", 0),
            "estimated": o.estimated_cars is not None, "seconds": stamp - prev, "cpu_seconds": cpu - prev_cpu,
            "read_seconds": sum(main + own), "reads": len(main + own),
        })
        prev, prev_cpu, prev_fetch = stamp, cpu, fm
    return {"masks_s": t_masks, "n_track": n_track, "grid_px": int(ctx.track.size), "scenes": per_scene,
            "statuses": dict(result.statuses), "rss_start": rss0, "peak_rss": _peak_rss(),
            "wall_s": wall, "cpu_s": cpu_total, "reads": len(provider.fetches),
            "cache_bytes": getattr(monitor, "cache_bytes", None),
            "reference_scenes": settings.detector.reference_scenes,
            "read_ahead": getattr(settings.imagery, "read_ahead", 0),
            "read_threads": getattr(settings.imagery, "read_threads", 1)}


def _scene_files(archive: str, aoi_id_: str, collection: str) -> list[str]:
    folder = Path(archive) / aoi_id_
    return sorted(str(p) for p in folder.glob(f"{collection}_*.tif"))


def _bands(collection: str) -> tuple[str, ...]:
    from railwatch.imagery.archive import REQUIRED_BANDS

    return tuple(REQUIRED_BANDS[collection])


def _track_geometry(aoi: Any) -> Any:
    """The buffered, clipped track band (what the track mask rasterises), in the grid's CRS."""
    from shapely.geometry import shape

    from railwatch import aoi as aoi_mod
    from railwatch.geo import aoi_grid, reproject_geometry

    grid = aoi_grid(aoi)
    return reproject_geometry(shape(aoi_mod.track_buffer(aoi)), "OGC:CRS84", grid.crs), grid


def measure_peer(method: str, aoi_path: str, files: Sequence[str], collection: str, repeat: int,
                 threads: int = 1) -> dict[str, Any]:
    """Mean and count over the track of every band the detector reads, per scene file, ``repeat`` times.

    ``threads``: GDAL threads decoding each file's blocks, as railwatch's ``[imagery] read_threads``: the
    floor opens its files with that many, the peers read through GDAL with ``GDAL_NUM_THREADS`` set to it
    (for this call only), so that every method decodes the same way.

    Returns the median seconds per scene over the repetitions and the last means (a sanity check:
    every method must agree on the same pixels' mean).
    """
    import rasterio
    from shapely.geometry import mapping

    aoi = load(Path(aoi_path))
    geom, grid = _track_geometry(aoi)
    names = _bands(collection)
    stats_bands = [b for b in names if b != "SCL"]
    with rasterio.open(files[0]) as ds:
        index = {d: i for i, d in enumerate(ds.descriptions, start=1)}
    indexes = [index[b] for b in names]
    feature = {"type": "Feature", "properties": {"id": 1}, "geometry": mapping(geom)}
    prepared: dict[str, Any] = {}
    run: Callable[[str], dict[str, float]]
    if method == "floor":
        from railwatch import aoi as aoi_mod

        mask = aoi_mod.track_mask(aoi, grid.crs, grid.transform, grid.shape)
        ys, xs = np.nonzero(mask)  # precomputed once per AOI, like railwatch's masks
        prepared["n"] = ys.size

        def run(path: str) -> dict[str, float]:
            with rasterio.open(path, **({"num_threads": threads} if threads > 1 else {})) as ds:
                data = ds.read(indexes)
            px = data[:, ys, xs].astype(np.float64)
            if collection == S2:
                ok = np.all(px[: len(stats_bands)] > 0, axis=0)
            else:
                ok = np.all(np.isfinite(px) & (px > 0), axis=0)
            sums = np.where(ok, px, 0.0).sum(axis=1)
            n = int(ok.sum())
            return {b: float(sums[i] / max(n, 1)) for i, b in enumerate(stats_bands)} | {"count": float(n)}
    elif method == "rasterstats":
        from rasterstats import zonal_stats

        def run(path: str) -> dict[str, float]:
            out: dict[str, float] = {}
            for b in stats_bands:
                st = zonal_stats([feature], path, band=index[b], stats=["mean", "count"],
                                 nodata=0 if collection == S2 else float("nan"), all_touched=False)[0]
                out[b] = float(st["mean"] or 0.0)
                out["count"] = float(st["count"])
            return out
    elif method == "exactextract":
        from exactextract import exact_extract

        def run(path: str) -> dict[str, float]:
            res = exact_extract(path, [feature], ["mean", "count"])[0]["properties"]
            out: dict[str, float] = {}
            for b in stats_bands:
                i = index[b]
                out[b] = float(res.get(f"band_{i}_mean", res.get("mean", float("nan"))))
                out["count"] = float(res.get(f"band_{i}_count", res.get("count", float("nan"))))
            return out
    else:
        raise ValueError(method)
    rss0 = _rss()
    times: list[float] = []
    last: dict[str, float] = {}
    previous = os.environ.get("GDAL_NUM_THREADS")
    os.environ["GDAL_NUM_THREADS"] = str(threads)  # read by GDAL's GeoTIFF driver at each open
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rasterstats' and rasterio's deprecation notices
            for _ in range(repeat):
                for path in files:
                    t = time.perf_counter()
                    last = run(path)
                    times.append(time.perf_counter() - t)
    finally:
        if previous is None:
            os.environ.pop("GDAL_NUM_THREADS", None)
        else:
            os.environ["GDAL_NUM_THREADS"] = previous
    return {"seconds": statistics.median(times), "runs": len(times), "last": last, "rss_start": rss0,
            "peak_rss": _peak_rss()}


def _call(inline: bool, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    if inline:
        return fn(*args)
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def steady(scenes: Sequence[dict[str, Any]], collection: str) -> list[dict[str, Any]]:
    """The scenes of a collection analysed against the largest reference seen (steady state)."""
    done = [s for s in scenes if s["collection"] == collection and s["estimated"]]
    if not done:
        return [s for s in scenes if s["collection"] == collection]
    top = max(s["n_reference"] for s in done)
    return [s for s in done if s["n_reference"] == top]


def bench_size(km2: float, work: Path, *, n_scenes: int, repeat: int, rw_repeat: int, inline: bool,
               methods: Sequence[str], log: Callable[[str], None],
               spacing_m: float = TRACK_SPACING_M, read_ahead: int | None = None,
               read_threads: int | None = None) -> dict[str, Any]:
    folder = work / aoi_id(km2, spacing_m)
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "archive"
    aoi_path = write_aoi(folder, km2, spacing_m)
    aoi = load(aoi_path)
    t = time.perf_counter()
    n_written = write_archive(aoi, archive, n_scenes, n_scenes)
    log(f"  {aoi.id}: {n_written} scenes written in {time.perf_counter() - t:.1f} s")
    runs = [_call(inline, measure_railwatch, str(aoi_path), str(archive), str(folder), None, read_ahead, read_threads)
            for _ in range(rw_repeat)]
    rw = runs[0]
    row: dict[str, Any] = {"km2": km2, "spacing_m": spacing_m, "grid_px": rw["grid_px"], "track_px": rw["n_track"],
                           "masks_s": statistics.median(r["masks_s"] for r in runs),
                           "railwatch_peak_rss": max(r["peak_rss"] for r in runs),
                           "railwatch_rss_start": rw["rss_start"], "statuses": rw["statuses"],
                           "railwatch_runs": len(runs), "read_ahead": rw["read_ahead"],
                           "read_threads": rw["read_threads"],
                           "backfill_scenes": len(rw["scenes"]),
                           "backfill_wall_s": statistics.median(r["wall_s"] for r in runs),
                           "backfill_cpu_s": statistics.median(r["cpu_s"] for r in runs), "collections": {}}
    row["first_scene_s"] = statistics.median(r["masks_s"] + r["scenes"][0]["seconds"] for r in runs if r["scenes"])
    for coll in (S2, S1):
        st = [s for r in runs for s in steady(r["scenes"], coll)]
        files = _scene_files(str(archive), aoi.id, coll)
        entry: dict[str, Any] = {
            "railwatch_s": statistics.median(s["seconds"] for s in st),
            "railwatch_cpu_s": statistics.median(s["cpu_seconds"] for s in st),
            "railwatch_read_s": statistics.median(s["read_seconds"] for s in st),
            "railwatch_reads_per_scene": statistics.mean(s["reads"] for s in st),
            "steady_scenes": len(st), "n_reference": st[0]["n_reference"] if st else 0,
        }
        for m in methods:
            try:
                res = _call(inline, measure_peer, m, str(aoi_path), files, coll, repeat, rw["read_threads"])
            except ImportError as exc:
                log(f"  {m} unavailable: {exc}")
                continue
            entry[f"{m}_s"] = res["seconds"]
            entry[f"{m}_peak_rss"] = res["peak_rss"]
            entry[f"{m}_last"] = res["last"]
        row["collections"][coll] = entry
    return row


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def _ms(x: float | None) -> str:
    return f"{1000 * x:.0f}" if x is not None else "-"


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The per-scene table: medians in ms, ratios, linearity, peak RSS."""
    head = (f"{'km²':>5} {'grid Mpx':>8} {'track px':>8} {'sensor':>6} {'masks ms':>8} | {'railwatch':>9} {'cpu':>5} {'(read)':>6} {'files':>5} "
            f"{'floor':>6} {'rstats':>6} {'exactx':>6} | {'rw/floor':>8} {'rw/rstats':>9} {'rw/exactx':>9} | "
            f"{'rw s/M track px':>15} {'rw s/M grid px':>14} | {'rw peak MiB':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        for coll, e in r["collections"].items():
            short = "S2" if coll == S2 else "S1"
            rw = e["railwatch_s"]
            size = f"{r['km2']:g}" + ("" if r.get("spacing_m", TRACK_SPACING_M) == TRACK_SPACING_M else "*")
            lines.append(
                f"{size:>5} {r['grid_px'] / 1e6:>8.2f} {r['track_px']:>8d} {short:>6} {1000 * r['masks_s']:>8.0f} | "
                f"{_ms(rw):>9} {_ms(e.get('railwatch_cpu_s')):>5} {_ms(e['railwatch_read_s']):>6} {e['railwatch_reads_per_scene']:>5.1f} {_ms(e.get('floor_s')):>6} {_ms(e.get('rasterstats_s')):>6} "
                f"{_ms(e.get('exactextract_s')):>6} | {_ratio(rw, e.get('floor_s')):>8} {_ratio(rw, e.get('rasterstats_s')):>9} "
                f"{_ratio(rw, e.get('exactextract_s')):>9} | {rw / max(r['track_px'], 1) * 1e6:>15.2f} "
                f"{rw / r['grid_px'] * 1e6:>14.3f} | {r['railwatch_peak_rss'] / 2**20:>11.0f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--full", action="store_true", help="add the 400 km² AOI (about 2000 x 2000 pixels)")
    ap.add_argument("--sizes", type=float, nargs="+", help="AOI sizes in km² (overrides the defaults)")
    ap.add_argument("--scenes", type=int, default=10,
                    help="scenes per sensor per size (default 10: four reach the full 6-scene reference)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of the peers and the floor (default 3)")
    ap.add_argument("--rw-repeat", type=int, default=3,
                    help="backfills of each archive by railwatch, each in a fresh process and store (default 3)")
    ap.add_argument("--dense", type=float,
                    help="also run this size (km²) with four times the track (a line every 250 m); "
                         "0: no (default 100, or 0 with --sizes)")
    ap.add_argument("--methods", nargs="*", default=["floor", "rasterstats", "exactextract"],
                    help="reference methods to run (default: floor rasterstats exactextract)")
    ap.add_argument("--inline", action="store_true",
                    help="measure in this process (no child processes: fast, but peak RSS is this process's)")
    ap.add_argument("--read-ahead", type=int, metavar="N",
                    help="[imagery] read_ahead of railwatch's backfill: scenes read in a background thread "
                         "while one is analysed (default: the configuration's default, 2; 0: off)")
    ap.add_argument("--read-threads", type=int, metavar="N",
                    help="[imagery] read_threads of railwatch's backfill: GDAL threads decoding a scene's blocks; the "
                         "floor and the peers decode with as many (default: the configuration's default, 2)")
    ap.add_argument("--workdir", type=Path, help="where the archives are written (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    sizes = args.sizes or (FULL_SIZES if args.full else SIZES)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    import platform

    machine = {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
               "processor": _cpu_name()}
    log(f"kernel benchmark: sizes {', '.join(f'{s:g}' for s in sizes)} km², {args.scenes} scenes per sensor, "
        f"read-ahead {'default' if args.read_ahead is None else args.read_ahead}, "
        f"{machine['cpus']} CPU(s) {machine['processor']}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="railwatch-kernel-") as tmp:
        work = args.workdir or Path(tmp)
        cases = [(km2, TRACK_SPACING_M) for km2 in sizes]
        dense = args.dense if args.dense is not None else (0.0 if args.sizes else 100.0)
        if dense:
            cases.append((dense, TRACK_SPACING_M / 4))
        for km2, spacing in cases:
            t = time.perf_counter()
            rows.append(bench_size(km2, work, n_scenes=args.scenes, repeat=args.repeat, rw_repeat=args.rw_repeat,
                                   inline=args.inline, methods=args.methods, log=log, spacing_m=spacing,
                                   read_ahead=args.read_ahead, read_threads=args.read_threads))
            log(f"  {km2:g} km² (a line every {spacing:g} m) done in {time.perf_counter() - t:.0f} s")
    print("\nPer-scene medians (ms) in steady state (full reference); masks = AoiContext.build, once per AOI.")
    print("floor = rasterio read of the same bands + one numpy pass over the precomputed track pixels.")
    threads = rows[0]["read_threads"] if rows else 1
    print(f"GDAL decodes each file's blocks on {threads} thread(s) for every method ([imagery] read_threads; "
          "GDAL_NUM_THREADS for the peers).")
    print("* = the same AOI with four times the track (a rail line every 250 m instead of every 1000 m).")
    print("(read) = railwatch's time in read_scene for the scene; files = scene files read per scene (1 + cache misses).")
    ahead = rows[0]["read_ahead"] if rows else 0
    print(f"railwatch = wall time per scene, cpu = its CPU time (all threads). Read-ahead {ahead}: "
          + ("the next scene is read in the background while one is analysed: wall below cpu is that overlap."
             if ahead else "off: each scene is read, then analysed."))
    print(table(rows))
    print("Whole backfills (every scene, the first ones included; median of runs): "
          + "; ".join(f"{r['km2']:g}{'' if r['spacing_m'] == TRACK_SPACING_M else '*'} km²: "
                      f"{r['backfill_scenes']} scenes in {r['backfill_wall_s']:.2f} s wall, "
                      f"{r['backfill_cpu_s']:.2f} s CPU" for r in rows))
    print(pairs(rows))
    for line in linearity(rows):
        print(line)
    print(f"Machine: {machine['cpus']} CPU(s), {machine['processor']}, Python {machine['python']}.")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1, default=str), encoding="utf-8")
    return 0


def pairs(rows: Sequence[dict[str, Any]]) -> str:
    """One Sentinel-2 plus one Sentinel-1 scene against the floor's two reads: with read-ahead the two
    sensors' scenes overlap each other's reads, so the pair is the figure that does not flatter either."""
    out = []
    for r in rows:
        c = r["collections"]
        rw = sum(c[s].get("railwatch_s") or 0.0 for s in (S2, S1))
        floor = sum(c[s].get("floor_s") or 0.0 for s in (S2, S1))
        tag = f"{r['km2']:g}{'' if r['spacing_m'] == TRACK_SPACING_M else '*'} km²"
        out.append(f"{tag}: {_ms(rw)} ms" + (f" ({_ratio(rw, floor)}x the floor's {_ms(floor)} ms)" if floor else ""))
    return "A pair of scenes (one per sensor), wall: " + "; ".join(out)


def linearity(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Is railwatch's cost linear in track pixels? A fit t = a + b x track px per sensor over the sizes,
    and the time at the dense AOI against the same size with a quarter of the track."""
    out = ["", "Linearity (railwatch, steady state):"]
    plain = [r for r in rows if r.get("spacing_m", TRACK_SPACING_M) == TRACK_SPACING_M]
    for coll in (S2, S1):
        pts = [(r["track_px"], r["collections"][coll]["railwatch_s"]) for r in plain if coll in r["collections"]]
        if len(pts) >= 2:
            x = np.array([p[0] for p in pts], float)
            y = np.array([p[1] for p in pts], float)
            b, a = np.polyfit(x, y, 1)
            resid = np.max(np.abs(y - (a + b * x)) / y)
            out.append(f"  {coll}: t = {1000 * a:.0f} ms + {1e6 * b:.1f} µs x track px "
                       f"(largest deviation {100 * resid:.0f} %); per million grid px at the largest size "
                       f"{pts[-1][1] / plain[-1]['grid_px'] * 1e6:.2f} s")
    for d in (r for r in rows if r.get("spacing_m", TRACK_SPACING_M) != TRACK_SPACING_M):
        base = next((r for r in plain if r["km2"] == d["km2"]), None)
        if base is None:
            continue
        for coll in (S2, S1):
            if coll in d["collections"] and coll in base["collections"]:
                out.append(f"  {coll} at {d['km2']:g} km²: x{d['track_px'] / base['track_px']:.1f} track px -> "
                           f"x{d['collections'][coll]['railwatch_s'] / base['collections'][coll]['railwatch_s']:.2f} "
                           "time (linear in track px would be the same factor; grid-bound would be x1)")
    return out if len(out) > 2 else []


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
