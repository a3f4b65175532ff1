"""Change of the track pixels against a reference of the same place (optical and radar).

Both paths end in the same measure: which track pixels are *occupied* (changed beyond what the
stable surroundings say is noise), with an expected false-positive count from those surroundings.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import ndimage, stats

from railwatch.detect.quality import OPTICAL_BANDS

F32 = npt.NDArray[np.float32]
B = npt.NDArray[np.bool_]

#: Equivalent number of looks of Sentinel-1 IW GRD high resolution (ESA product definition: ~4.4).
S1_ENL = 4.4
#: False-alarm rate per track pixel for the occupancy tests.
FALSE_ALARM = 0.01
#: Local background window for optical residuals (pixels): ~90 m, wider than a consist of cars is deep.
BACKGROUND_WINDOW = 9


@dataclass(frozen=True)
class Change:
    """Per-scene change measure on the usable track pixels."""

    occupied: B  # occupied track pixels (grid-shaped)
    n_track: int  # usable track pixels
    n_occupied: int
    expected_false: float  # false positives expected among the usable track pixels
    activity: float  # occupied share of the usable track beyond the false-alarm level (0..1)
    magnitude: F32  # per-pixel change statistic (grid-shaped; 0 off the track)
    metrics: dict[str, float] = field(default_factory=dict)
    haze: float = 0.0  # spatially coherent residual on the track's surroundings (noise units)


def _masked_mean(values: F32, weight: B, size: int) -> F32:
    w = weight.astype(np.float32)
    num = ndimage.uniform_filter(np.where(weight, values, 0).astype(np.float32), size=size, mode="nearest")
    den = ndimage.uniform_filter(w, size=size, mode="nearest")
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 1e-3)
    return out


def _robust_fit(x: F32, y: F32) -> tuple[float, float]:
    """Gain and offset of y ≈ g·x + o by least squares after clipping the worst 10 % residuals."""
    if x.size < 10:
        return 1.0, 0.0
    g, o = np.polyfit(x, y, 1)
    r = np.abs(y - (g * x + o))
    keep = r <= np.quantile(r, 0.9)
    if keep.sum() >= 10:
        g, o = np.polyfit(x[keep], y[keep], 1)
    return float(g), float(o)


def _mad_sigma(v: F32) -> float:
    if v.size == 0:
        return 1.0
    return float(1.4826 * np.median(np.abs(v - np.median(v)))) or 1e-6


def _neighbour_min(values_by_shift: list[F32]) -> F32:
    return np.minimum.reduce(values_by_shift)


def _shifts(a: F32) -> list[F32]:
    """The array shifted by every offset of a 3×3 neighbourhood (edges replicated)."""
    p = np.pad(a, 1, mode="edge")
    h, w = a.shape
    return [p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def optical_change(
    current: dict[str, F32],
    reference: dict[str, F32],
    track: B,
    stable: B,
) -> Change:
    """Spectral change of each track pixel against the reference, in units of the scene's noise.

    Per band: gain/offset normalisation fitted on stable pixels (illumination, season, thin
    uniform haze), then subtraction of the local background of the residual measured on the
    stable surroundings (patchy haze, local shadow), then the distance to the *closest* reference
    pixel in a 3×3 neighbourhood (sub-pixel misregistration). Darker and brighter both count.
    Inputs are reflectance (float, 0..1); ``track`` and ``stable`` already exclude unusable pixels.
    """
    bands = [b for b in OPTICAL_BANDS if b in current and b in reference]
    sq_by_shift: list[list[F32]] = [[] for _ in range(9)]
    stable_sq: list[F32] = []
    haze_scores: list[float] = []
    metrics: dict[str, float] = {}
    ring = ndimage.binary_dilation(track, iterations=BACKGROUND_WINDOW // 2) & stable
    for b in bands:
        cur = current[b].astype(np.float32)
        ref = reference[b].astype(np.float32)
        g, o = _robust_fit(ref[stable], cur[stable])
        metrics[f"gain_{b}"] = g
        metrics[f"offset_{b}"] = o
        norm = (cur - o) / (g if abs(g) > 1e-3 else 1.0)
        resid = norm - ref
        background = _masked_mean(resid, stable, BACKGROUND_WINDOW)
        sigma = _mad_sigma((resid - background)[stable])
        metrics[f"noise_{b}"] = sigma
        if ring.any():
            haze_scores.append(float(np.quantile(np.abs(background[ring]), 0.9)) / sigma)
        local = norm - background
        for i, shifted in enumerate(_shifts(ref)):
            sq_by_shift[i].append(((local - shifted) / sigma) ** 2)
        stable_sq.append(((local - ref) / sigma) ** 2)
    if not bands:
        raise ValueError("no optical bands in common between the scene and its reference")
    dist = np.sqrt(_neighbour_min([np.sum(parts, axis=0) for parts in sq_by_shift]) / len(bands)).astype(np.float32)
    # The same 3×3-minimum statistic on stable pixels gives this scene's own noise distribution.
    threshold = float(np.quantile(dist[stable], 1.0 - FALSE_ALARM)) if stable.sum() > 100 else 3.0
    threshold = max(threshold, 2.0)
    metrics["threshold"] = threshold
    return _finish(dist, track, threshold, metrics, haze=max(haze_scores, default=0.0))


def radar_change(current: dict[str, F32], reference: dict[str, F32], n_reference: int, track: B, stable: B) -> Change:
    """Ratio of backscatter (VV+VH, linear) to the same-geometry reference: a CFAR test.

    Metal rolling stock brightens a pixel; speckle makes the ratio of a single look (ENL 4.4)
    to the mean of ``n_reference`` looks follow an F distribution, so the threshold for a 1 %
    false-alarm rate follows from the ENL, not from tuning. A scene-wide gain measured on stable
    pixels removes calibration and moisture differences.
    """
    cur = (current["VV"] + current["VH"]).astype(np.float32)
    ref = (reference["VV"] + reference["VH"]).astype(np.float32)
    valid = np.isfinite(cur) & np.isfinite(ref) & (ref > 0) & (cur > 0)
    st = stable & valid
    gain = float(np.median(cur[st]) / np.median(ref[st])) if st.sum() > 10 else 1.0
    ratio = np.zeros_like(cur)
    np.divide(cur, gain * ref, out=ratio, where=valid)
    # Reference of n looks each ENL: ratio ~ F(2·ENL, 2·n·ENL).
    threshold = float(stats.f.ppf(1.0 - FALSE_ALARM, 2 * S1_ENL, 2 * max(1, n_reference) * S1_ENL))
    metrics = {"gain": gain, "threshold": threshold, "n_reference": float(n_reference)}
    if st.sum() > 100:
        metrics["stable_exceed"] = float(np.mean(ratio[st] > threshold))
    return _finish(ratio.astype(np.float32), track & valid, threshold, metrics)


def _finish(stat: F32, track: B, threshold: float, metrics: dict[str, float], haze: float = 0.0) -> Change:
    occupied = track & (stat > threshold)
    n_track = int(track.sum())
    n_occ = int(occupied.sum())
    expected = FALSE_ALARM * n_track
    activity = max(0.0, n_occ - expected) / n_track if n_track else 0.0
    metrics = dict(metrics, n_track=float(n_track), n_occupied=float(n_occ), haze=haze)
    return Change(occupied, n_track, n_occ, expected, activity, np.where(track, stat, 0).astype(np.float32),
                  metrics, haze)


def median_reference(stack: Sequence[dict[str, F32]], bands: Sequence[str], valid: Sequence[B]) -> dict[str, F32]:
    """Per-pixel median of the reference scenes, ignoring each scene's unusable pixels."""
    out: dict[str, F32] = {}
    for b in bands:
        arr = np.stack([np.where(v, s[b], np.nan) for s, v in zip(stack, valid, strict=True)]).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels stay NaN
            out[b] = np.nanmedian(arr, axis=0).astype(np.float32)
    return out


def mean_reference(stack: Sequence[dict[str, F32]], bands: Sequence[str]) -> dict[str, F32]:
    """Per-pixel mean (linear power) of radar reference scenes: unbiased under speckle."""
    out: dict[str, F32] = {}
    for b in bands:
        arr = np.stack([np.where(np.isfinite(s[b]) & (s[b] > 0), s[b], np.nan) for s in stack]).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out[b] = np.nanmean(arr, axis=0).astype(np.float32)
    return out
