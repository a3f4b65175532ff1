"""The local scene archive: a public, documented GeoTIFF layout (see docs/archive.md).

    <root>/<aoi-id>/<collection>_<YYYYMMDDTHHMMSSZ>.tif

Sentinel-2 L2A files carry uint16 bands described ``B02``, ``B03``, ``B04``, ``B08`` (reflectance
x 10000, 0 = nodata) and ``SCL`` (ESA scene classification); Sentinel-1 GRD files carry float32
bands ``VV`` and ``VH`` (linear sigma0, NaN or 0 = nodata) and, where known, the tags
``ORBIT_DIRECTION`` and ``RELATIVE_ORBIT``. The simulator writes this layout and the network
providers cache their downloads in it, so one reader serves them all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from railwatch.domain import S1, S2, TIME_FORMAT, Raster, SceneRef, utc
from railwatch.errors import SceneUnreadable

log = logging.getLogger(__name__)

#: Bands every scene of a collection must carry, in the order they are written.
REQUIRED_BANDS: Mapping[str, tuple[str, ...]] = {
    S2: ("B02", "B03", "B04", "B08", "SCL"),
    S1: ("VV", "VH"),
}
#: Accepted on-disk dtypes per collection and band (the first one is what ``write_scene`` writes).
_S2_DTYPES = ("uint16",)
_SCL_DTYPES = ("uint16", "uint8")
_S1_DTYPES = ("float32", "float64")
#: Highest ESA Sentinel-2 scene classification code (11 = snow or ice).
MAX_SCL_CODE = 11

ORBIT_DIRECTION_TAG = "ORBIT_DIRECTION"
RELATIVE_ORBIT_TAG = "RELATIVE_ORBIT"
ORBIT_DIRECTIONS = ("ascending", "descending")

#: Files that live in an AOI folder without being scenes.
IGNORED_NAMES = frozenset({"truth.csv", "surges.csv"})
#: GDAL side-car files next to a scene (statistics, external overviews, masks).
_SIDECAR_SUFFIXES = (".aux.xml", ".ovr", ".msk")

_TIME_RE = re.compile(r"^\d{8}T\d{6}Z$")

_warnings_lock = threading.Lock()


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """Warnings ignored inside (GDAL warns when it opens a file without georeferencing; the readers
    report a reason instead), one thread at a time: ``warnings.catch_warnings`` swaps the process-wide
    filter list, and two threads inside it at once can leave one's filters in place for good (the
    read-ahead thread and the AOI threads of the local executor read scenes beside each other)."""
    with _warnings_lock, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def scene_filename(collection: str, acquired: datetime) -> str:
    """``<collection>_<YYYYMMDDTHHMMSSZ>.tif`` for an acquisition (UTC, to the second)."""
    if collection not in REQUIRED_BANDS:
        raise ValueError(f"unknown collection {collection!r}; expected one of {', '.join(REQUIRED_BANDS)}")
    return f"{collection}_{utc(acquired).strftime(TIME_FORMAT)}.tif"


def scene_path(root: Path | str, aoi_id: str, collection: str, acquired: datetime) -> Path:
    """Where a scene of ``aoi_id`` lives under the archive ``root``."""
    return Path(root) / aoi_id / scene_filename(collection, acquired)


def orbit_tags(ref: SceneRef) -> dict[str, str]:
    """The archive tags that record a radar scene's orbit geometry (empty when unknown or optical)."""
    tags: dict[str, str] = {}
    if ref.collection == S1 and ref.orbit_direction:
        tags[ORBIT_DIRECTION_TAG] = ref.orbit_direction
    if ref.collection == S1 and ref.relative_orbit is not None:
        tags[RELATIVE_ORBIT_TAG] = str(ref.relative_orbit)
    return tags


def cached_fetch(root: Path | str, aoi_id: str, ref: SceneRef, download: Callable[[], Raster], *,
                 threads: int = 1) -> Raster:
    """A network provider's fetch through the archive: the archived scene if there is one, else
    ``download()`` written into the archive first and read back, so that every scene a provider
    returns has passed the same reader and validation as a local one, and is never fetched twice.
    ``threads``: :func:`read_scene`'s."""
    path = scene_path(root, aoi_id, ref.collection, ref.acquired)
    if path.exists():
        log.debug("%s already archived at %s; no request", ref.scene_id, path)
        return read_scene(path, ref.collection, threads=threads)
    written = write_scene(root, aoi_id, ref.collection, ref.acquired, download())
    log.info("archived %s (%s)", ref.scene_id, written, extra={"aoi": aoi_id, "scene": ref.scene_id})
    return read_scene(written, ref.collection, threads=threads)


def parse_scene_filename(name: str) -> tuple[str, datetime] | None:
    """(collection, acquired UTC) from a scene file name, or None if it breaks the naming rule."""
    return _parse_name(name)[0]


def _parse_name(name: str) -> tuple[tuple[str, datetime] | None, str]:
    """Parse a file name; on failure return (None, why)."""
    if not name.endswith(".tif"):
        return None, "not a .tif file (expected <collection>_<YYYYMMDDTHHMMSSZ>.tif)"
    stem = name[: -len(".tif")]
    if "_" not in stem:
        return None, "name does not match <collection>_<YYYYMMDDTHHMMSSZ>.tif"
    collection, stamp = stem.rsplit("_", 1)
    if collection not in REQUIRED_BANDS:
        return None, f"unknown collection {collection!r} (expected {' or '.join(REQUIRED_BANDS)})"
    if not _TIME_RE.match(stamp):
        return None, f"acquisition time {stamp!r} is not YYYYMMDDTHHMMSSZ (UTC)"
    try:
        acquired = datetime.strptime(stamp, TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None, f"acquisition time {stamp!r} is not a valid UTC date and time"
    return (collection, acquired), ""


def _ignored(name: str) -> bool:
    return (
        name in IGNORED_NAMES
        or name.startswith(".")
        or name.endswith((".tmp", "~"))
        or name.endswith(_SIDECAR_SUFFIXES)
    )


def _orbit_from_tags(tags: Mapping[str, str]) -> tuple[str | None, int | None]:
    direction = tags.get(ORBIT_DIRECTION_TAG)
    direction = direction.strip().lower() if direction else None
    if direction not in ORBIT_DIRECTIONS:
        direction = None
    orbit: int | None
    try:
        orbit = int(str(tags.get(RELATIVE_ORBIT_TAG, "")).strip())
    except ValueError:
        orbit = None
    return direction, orbit


def _header_tags(path: Path) -> dict[str, str]:
    """The default-domain GeoTIFF tags, read from the header only (no pixels)."""
    import rasterio
    from rasterio.errors import RasterioError

    try:
        with quiet_warnings(), rasterio.open(path) as ds:
            return dict(ds.tags())
    except (RasterioError, OSError) as exc:
        # The scene is still listed: fetching it reports the precise reason.
        log.debug("cannot read tags of %s: %s", path, exc, extra={"path": str(path)})
        return {}


def list_archive(root: Path | str, aoi_id: str) -> tuple[list[SceneRef], list[tuple[Path, str]]]:
    """Scenes of one AOI in the archive, sorted by time, and the misnamed files with reasons.

    Sentinel-1 orbit tags are read from each file's header; pixels are not read, so a corrupt
    file is still listed and reported as unreadable when it is fetched.
    """
    folder = Path(root) / aoi_id
    refs: list[SceneRef] = []
    problems: list[tuple[Path, str]] = []
    if not folder.is_dir():
        return refs, problems
    for path in sorted(folder.iterdir()):
        name = path.name
        if _ignored(name) or path.is_dir():
            continue
        parsed, why = _parse_name(name)
        if parsed is None:
            problems.append((path, why))
            continue
        collection, acquired = parsed
        direction: str | None = None
        orbit: int | None = None
        if collection == S1:
            direction, orbit = _orbit_from_tags(_header_tags(path))
        refs.append(SceneRef(aoi_id=aoi_id, collection=collection, acquired=acquired, source=str(path),
                             orbit_direction=direction, relative_orbit=orbit))
    refs.sort(key=lambda r: (r.acquired, r.collection))
    return refs, problems


def _fail(path: Path, reason: str) -> SceneUnreadable:
    return SceneUnreadable(f"{path}: {reason}")


def read_scene(path: Path | str, collection: str, *, threads: int = 1) -> Raster:
    """Read and validate one archive scene; raise ``SceneUnreadable`` with the precise reason.

    Bands are found by their GDAL descriptions (case-sensitive). Sentinel-2 bands come back as
    uint16 (SCL as uint8); Sentinel-1 bands as float32 with nodata (0 or the file's nodata value)
    as NaN. Tags include ``ORBIT_DIRECTION``/``RELATIVE_ORBIT`` when the file has them. ``threads`` > 1
    lets GDAL decode the file's compressed blocks on that many threads (``[imagery] read_threads``; the
    same pixels, read sooner when a scene has several blocks).
    """
    import rasterio
    from rasterio.errors import RasterioError

    path = Path(path)
    if collection not in REQUIRED_BANDS:
        raise ValueError(f"unknown collection {collection!r}; expected one of {', '.join(REQUIRED_BANDS)}")
    required = REQUIRED_BANDS[collection]
    try:
        with contextlib.ExitStack() as stack:
            with quiet_warnings():  # a file without georeferencing warns on open; we report it as a reason instead
                ds = stack.enter_context(rasterio.open(path, **({"num_threads": threads} if threads > 1 else {})))
                if ds.driver != "GTiff":
                    raise _fail(path, f"not a GeoTIFF / corrupt: GDAL opened it as {ds.driver}")
                descriptions = [d or "" for d in ds.descriptions]
                index: dict[str, int] = {}
                for i, d in enumerate(descriptions, start=1):
                    if d in required and d in index:
                        raise _fail(path, f"band {d} appears twice (bands {index[d]} and {i})")
                    index.setdefault(d, i)
                missing = [b for b in required if b not in index]
                if missing:
                    found = ", ".join(d for d in descriptions if d) or "no band descriptions"
                    raise _fail(path, f"missing band(s) {', '.join(missing)} (found: {found})")
                for b in required:
                    dtype = ds.dtypes[index[b] - 1]
                    allowed = _allowed_dtypes(collection, b)
                    if dtype not in allowed:
                        raise _fail(path, f"band {b} has dtype {dtype}, expected {' or '.join(allowed)}")
                if ds.crs is None:
                    raise _fail(path, "no CRS")
                if ds.transform.is_identity:
                    raise _fail(path, "no georeferencing (identity transform)")
                nodata, crs, transform, tags = ds.nodata, ds.crs, ds.transform, dict(ds.tags())
            data = ds.read([index[b] for b in required])  # the pixels: outside the lock, GDAL without the GIL
    except SceneUnreadable:
        raise
    except (RasterioError, OSError) as exc:
        raise _fail(path, f"not a GeoTIFF / corrupt: {exc}") from exc

    bands: dict[str, npt.NDArray[Any]] = {}
    if collection == S2:
        for b, arr in zip(required, data, strict=True):
            if b == "SCL":
                top = int(arr.max()) if arr.size else 0
                if top > MAX_SCL_CODE:
                    raise _fail(path, f"band SCL has codes outside 0..{MAX_SCL_CODE} (e.g. {top})")
                bands[b] = arr.astype(np.uint8)
            else:
                bands[b] = arr.astype(np.uint16, copy=False)
    else:
        for b, arr in zip(required, data, strict=True):
            a = arr.astype(np.float32, copy=False)  # ``data`` is ours: float32 bands are used in place
            a[a == 0] = np.nan
            if nodata is not None and not np.isnan(nodata):
                a[a == np.float32(nodata)] = np.nan
            if _median_negative(a):
                median = float(np.median(a[np.isfinite(a)]))
                raise _fail(path, f"band {b} looks like decibels (median {median:.1f}); "
                                  "expected linear sigma0 (convert with 10 ** (dB / 10))")
            bands[b] = a
    return Raster(bands=bands, crs=crs, transform=transform, tags=tags)


def _median_negative(a: npt.NDArray[np.float32]) -> bool:
    """Whether the median of the finite values is below 0, by counting (no sort, no copy of the band).

    Exactly ``np.median(a[np.isfinite(a)]) < 0``: with n finite values of which ``neg`` are negative,
    the median is negative when more than half are, non-negative when fewer than half are, and for an
    even n with exactly half negative it is the mean of the largest negative and the smallest other value.
    """
    n = int(np.count_nonzero(np.isfinite(a)))
    if n == 0:
        return False
    negative = a < 0  # NaN compares False
    neg = int(np.count_nonzero(negative))
    if 2 * neg > n:
        return True
    if 2 * neg < n:
        return False
    upper = a[~negative & np.isfinite(a)]
    return bool(float(a[negative].max()) + float(upper.min()) < 0)


def _allowed_dtypes(collection: str, band: str) -> tuple[str, ...]:
    if collection == S1:
        return _S1_DTYPES
    return _SCL_DTYPES if band == "SCL" else _S2_DTYPES


#: ZSTD level of the scenes :func:`write_scene` writes. Level 1 against DEFLATE's default (GDAL 3.10, the
#: kernel benchmark's 100 km² scenes, bench/README.md): files within 1 % of the size, written 4-5x and read
#: (decoded) about 1.5x as fast; higher levels save 2-3 % of the size and write as slowly as DEFLATE.
ZSTD_LEVEL = 1


@lru_cache(maxsize=1)
def default_codec() -> str:
    """``"zstd"`` where this GDAL build writes ZSTD-compressed GeoTIFFs, else ``"deflate"``.

    Checked once, on a one-pixel file in memory: a GDAL without ZSTD does not fail on ``COMPRESS=ZSTD``,
    it warns and writes the file uncompressed.
    """
    from rasterio.io import MemoryFile

    try:
        with quiet_warnings(), MemoryFile() as mem:
            with mem.open(driver="GTiff", width=1, height=1, count=1, dtype="uint8", compress="zstd") as ds:
                ds.write(np.zeros((1, 1, 1), np.uint8))
            with mem.open() as ds:
                found = ds.compression
        return "zstd" if found is not None and str(found.value).upper() == "ZSTD" else "deflate"
    except Exception:  # any failure of the probe means: do not rely on ZSTD
        log.debug("no ZSTD in this GDAL build; scenes are written with DEFLATE", exc_info=True)
        return "deflate"


def write_scene(
    root: Path | str,
    aoi_id: str,
    collection: str,
    acquired: datetime,
    raster: Raster,
    *,
    compress: str | None = None,
) -> Path:
    """Write one scene atomically (temporary file in the same folder, then ``os.replace``).

    The required bands come first in contract order, then any others; all share the collection's
    dtype (uint16 for Sentinel-2, float32 for Sentinel-1). ``raster.tags`` become GeoTIFF tags.
    ``compress``: a GDAL codec name, or ``"none"``; by default ZSTD at level 1 (:data:`ZSTD_LEVEL`),
    or DEFLATE where this GDAL build has no ZSTD.
    """
    import rasterio

    dest = scene_path(root, aoi_id, collection, acquired)
    required = REQUIRED_BANDS[collection]
    missing = [b for b in required if b not in raster.bands]
    if missing:
        raise ValueError(f"cannot write {dest.name}: raster lacks band(s) {', '.join(missing)}")
    names: Sequence[str] = [*required, *(b for b in raster.bands if b not in required)]
    dtype = "uint16" if collection == S2 else "float32"
    height, width = raster.shape
    profile: dict[str, Any] = {
        "driver": "GTiff", "width": width, "height": height, "count": len(names), "dtype": dtype,
        "crs": raster.crs, "transform": raster.transform,
        "nodata": 0 if collection == S2 else float("nan"),
        "interleave": "band",
    }
    codec = (compress or default_codec()).lower()
    if codec != "none":
        profile["compress"] = codec
        profile["predictor"] = 2 if collection == S2 else 3
        if codec == "zstd":
            profile["zstd_level"] = ZSTD_LEVEL
    if width >= 256 and height >= 256:
        # Tiled with 256-pixel blocks: readable by window and convertible to COG without re-encoding.
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        with rasterio.open(tmp, "w", **profile) as dst:
            for i, b in enumerate(names, start=1):
                arr = np.asarray(raster.bands[b])
                if arr.shape != (height, width):
                    raise ValueError(f"band {b} has shape {arr.shape}, expected {(height, width)}")
                dst.write(arr.astype(dtype, copy=False), i)
                dst.set_band_description(i, b)
            tags = {k: str(v) for k, v in raster.tags.items() if v is not None and k != "AREA_OR_POINT"}
            if tags:
                dst.update_tags(**tags)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return dest
