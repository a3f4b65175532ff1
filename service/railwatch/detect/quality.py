"""Scene quality on the AOI's track pixels (not on the whole scene).

Sentinel-2 uses the L2A scene classification (SCL); Sentinel-1 only needs valid data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from railwatch.detect.zone import Zone

_S = TypeVar("_S", bound=np.generic)

# ESA Sentinel-2 L2A scene classification codes.
SCL_NODATA = 0
SCL_SATURATED = 1
SCL_DARK = 2
SCL_CLOUD_SHADOW = 3
SCL_VEGETATION = 4
SCL_NOT_VEGETATED = 5
SCL_WATER = 6
SCL_UNCLASSIFIED = 7
SCL_CLOUD_MEDIUM = 8
SCL_CLOUD_HIGH = 9
SCL_CIRRUS = 10
SCL_SNOW = 11

OPTICAL_BANDS = ("B02", "B03", "B04", "B08")
#: Without SCL (e.g. L1C), a pixel this bright in blue and red (reflectance) counts as cloud or snow.
NO_SCL_BRIGHT = 0.30
#: Cloud, shadow and snow masks are grown by this many 10 m pixels: SCL is computed at 20 m and misses the
#: thin, semi-transparent edges of clouds and shadows (the usual practice is a buffer of 50-100 m,
#: e.g. Zhu & Woodcock 2012 Fmask dilates by 3 pixels of 30 m). Edges are unusable, not "cloudy".
CLOUD_BUFFER_PX = 5


@dataclass(frozen=True)
class Quality:
    """What part of the track pixels is usable, and the resulting status."""

    status: str
    reason: str
    clear: npt.NDArray[np.bool_]  # usable pixels: of the grid, or of the zone the quality was computed on
    fractions: dict[str, float] = field(default_factory=dict)

    @property
    def clear_fraction(self) -> float:
        return 1.0 - self.fractions.get("bad", 0.0)


def _frac(mask: npt.NDArray[np.bool_], track: npt.NDArray[np.bool_], n: int) -> float:
    return float(np.count_nonzero(mask & track)) / n if n else 0.0


def _on(zone: Zone | None, grid: npt.NDArray[_S]) -> npt.NDArray[_S]:
    """A grid array at the pixels quality is computed on: the zone's, or the whole grid."""
    return np.asarray(grid) if zone is None else zone.gather(grid)


def _is(scl: npt.NDArray[np.generic], codes: tuple[int, ...]) -> npt.NDArray[np.bool_]:
    """``np.isin(scl, codes)`` as one comparison per code: the same mask, some 30x faster on a
    grid of SCL codes (``np.isin`` sorts its way through them: ~11 ms per million pixels)."""
    out = np.asarray(scl == codes[0])
    for code in codes[1:]:
        out |= scl == code
    return out


@dataclass(frozen=True)
class _Cover:
    """What covers each pixel (Sentinel-2), from the SCL band or, without it, from brightness."""

    nodata: npt.NDArray[np.bool_]
    cloud: npt.NDArray[np.bool_]
    cirrus: npt.NDArray[np.bool_]
    shadow: npt.NDArray[np.bool_]
    snow: npt.NDArray[np.bool_]
    saturated: npt.NDArray[np.bool_]

    @classmethod
    def of(cls, bands: dict[str, npt.NDArray[np.generic]], zone: Zone | None) -> _Cover:
        """Pixel by pixel, so the zone's pixels of it are those of the whole grid's."""
        nodata: npt.NDArray[np.bool_] | None = None
        for b in OPTICAL_BANDS:
            if b in bands:
                zero = _on(zone, bands[b]) == 0
                nodata = zero if nodata is None else nodata | zero
        if "SCL" in bands:
            scl = _on(zone, bands["SCL"])
            nodata = scl == SCL_NODATA if nodata is None else nodata | (scl == SCL_NODATA)
            return cls(nodata, _is(scl, (SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH, SCL_CIRRUS)), scl == SCL_CIRRUS,
                       scl == SCL_CLOUD_SHADOW, scl == SCL_SNOW, scl == SCL_SATURATED)
        blue = np.asarray(_on(zone, bands["B02"]), np.float32) / 10000.0
        red = np.asarray(_on(zone, bands["B04"]), np.float32) / 10000.0
        assert nodata is not None  # B02 is there
        bright = (blue > NO_SCL_BRIGHT) & (red > NO_SCL_BRIGHT) & ~nodata
        none = np.zeros_like(bright)
        return cls(nodata, bright, none, none, none, none)

    @property
    def edge_source(self) -> npt.NDArray[np.bool_]:
        """The masks whose edges are unusable (patchy snow has thin, unflagged margins too)."""
        return self.cloud | self.shadow | self.snow


def _edge_source(bands: dict[str, npt.NDArray[np.generic]]) -> npt.NDArray[np.bool_]:
    """:attr:`_Cover.edge_source` of the whole grid (one pass over SCL when there is one)."""
    if "SCL" in bands:
        return _is(np.asarray(bands["SCL"]), (SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH, SCL_CIRRUS, SCL_CLOUD_SHADOW, SCL_SNOW))
    return _Cover.of(bands, None).edge_source


def optical_quality(
    bands: dict[str, npt.NDArray[np.generic]],
    track: npt.NDArray[np.bool_],
    *,
    nodata_fraction: float,
    snow_fraction: float,
    cloudy_fraction: float,
    partial_fraction: float,
    zone: Zone | None = None,
) -> Quality:
    """Classify a Sentinel-2 scene by what covers its track pixels.

    Order of precedence: nodata, snow, haze (obscured mostly by SCL's thin cirrus class, which also
    takes dense haze) or cloudy (cloud, cirrus, shadow, saturation), then ``partial`` when more than
    ``partial_fraction`` of the track is unusable (cloud edges included), else ``ok``.
    Without an SCL band, zeros are nodata and very bright pixels count as cloud/snow.

    With a ``zone`` that holds the track, the masks are computed on the zone's pixels only and
    ``clear`` comes back as a pixel vector over it (the pipeline's case: it keeps nothing else);
    the grid is read once more (SCL) for the cloud, shadow and snow whose edges are unusable, and
    only when there are some does the cloud-edge buffer (a dilation, which reaches beyond the zone)
    run on the whole grid. The fractions and the zone's ``clear`` are those of the whole-grid masks.
    """
    track = _on(zone, track)  # at the pixels computed on
    n = int(np.count_nonzero(track))
    if n == 0:
        return Quality("nodata", "no track pixels on this grid", np.zeros(track.shape, bool), {"bad": 1.0})
    cover = _Cover.of(bands, zone)
    nodata, cloud, cirrus, shadow, snow, saturated = (
        cover.nodata, cover.cloud, cover.cirrus, cover.shadow, cover.snow, cover.saturated)
    note = "" if "SCL" in bands else " (no SCL band: brightness cloud test)"
    obscured = cloud | shadow | saturated
    edge = np.zeros_like(obscured)
    source = cover.edge_source if zone is None else _edge_source(bands)  # on the grid: edges reach off the zone
    if source.any():
        edge = _on(zone, ndimage.binary_dilation(source, iterations=CLOUD_BUFFER_PX)) & ~obscured & ~snow
    bad = nodata | obscured | snow | edge
    fr = {
        "nodata": _frac(nodata, track, n),
        "cloud": _frac(cloud & ~nodata, track, n),
        "shadow": _frac(shadow & ~nodata, track, n),
        "snow": _frac(snow & ~nodata, track, n),
        "saturated": _frac(saturated & ~nodata, track, n),
        "cloud_edge": _frac(edge & ~nodata, track, n),
        "cirrus": _frac(cirrus & ~nodata, track, n),
        "bad": _frac(bad, track, n),
    }
    clear = ~bad
    obscured_frac = fr["cloud"] + fr["shadow"] + fr["saturated"]
    if fr["nodata"] > nodata_fraction:
        return Quality("nodata", f"{fr['nodata']:.0%} of track pixels without data{note}", clear, fr)
    if fr["snow"] > snow_fraction:
        return Quality("snow", f"{fr['snow']:.0%} of track pixels under snow{note}", clear, fr)
    if obscured_frac > cloudy_fraction:
        if fr["cirrus"] >= 0.5 * obscured_frac:  # SCL's thin cirrus class also takes the dense part of haze
            return Quality("haze", f"{fr['cirrus']:.0%} of track pixels under thin cirrus or haze{note}", clear, fr)
        return Quality("cloudy", f"{obscured_frac:.0%} of track pixels under cloud or shadow{note}", clear, fr)
    if fr["bad"] > cloudy_fraction:
        return Quality("cloudy", f"{fr['bad']:.0%} of track pixels unusable (cloud, snow, no data){note}", clear, fr)
    if fr["bad"] > partial_fraction:
        return Quality("partial", f"estimated on the clear {1 - fr['bad']:.0%} of the track{note}", clear, fr)
    return Quality("ok", note.strip(" ()"), clear, fr)


def radar_quality(
    bands: dict[str, npt.NDArray[np.generic]], track: npt.NDArray[np.bool_], *, nodata_fraction: float,
    partial_fraction: float, zone: Zone | None = None,
) -> Quality:
    """Sentinel-1: only missing data (NaN or 0 in VV or VH) makes track pixels unusable.

    Pixel by pixel: with a ``zone`` that holds the track, computed on its pixels only and ``clear``
    comes back as a pixel vector over it.
    """
    track = _on(zone, track)  # at the pixels computed on
    n = int(np.count_nonzero(track))
    if n == 0:
        return Quality("nodata", "no track pixels on this grid", np.zeros(track.shape, bool), {"bad": 1.0})
    nodata = np.zeros(track.shape, bool)
    for b in ("VV", "VH"):
        v: npt.NDArray[Any] = _on(zone, bands[b])
        nodata |= ~np.isfinite(v) | (v <= 0)
    fr = {"nodata": _frac(nodata, track, n), "bad": _frac(nodata, track, n)}
    if fr["nodata"] > nodata_fraction:
        return Quality("nodata", f"{fr['nodata']:.0%} of track pixels without data", ~nodata, fr)
    if fr["bad"] > partial_fraction:
        return Quality("partial", f"estimated on the valid {1 - fr['bad']:.0%} of the track", ~nodata, fr)
    return Quality("ok", "", ~nodata, fr)
