"""Change of the track pixels against a reference of the same place (optical and radar).

Both paths end in the same measure: which track pixels are *occupied* (changed beyond what the
scene's own noise allows), with the number of false positives expected at the test's false-alarm
rate. Everything here is pure numpy/scipy: arrays in, a :class:`Change` out.

Optical (Sentinel-2, reflectance 0..1)
    1. every reference scene is brought to the current scene's radiometry by a per-band gain and
       offset fitted on *pseudo-invariant* pixels (stable, non-vegetated in both dates: roofs, roads,
       bare ground) — illumination, calibration and uniform haze go, phenology does not bias it;
    2. the reference is the per-pixel median of those scenes (a car in one of them does not survive);
    3. the residual of each track pixel is freed from the change of its immediate surroundings
       (the direction of the local residual of the stable pixels around it is projected out), so
       vegetation bleeding into mixed track pixels and patchy haze do not count as cars;
    4. the residual vector (B02, B03, B04, B08) is whitened with a robust covariance estimated on the
       track pixels themselves (cars are a minority) and compared, as a squared Mahalanobis
       distance, with the chi-square quantile of the false-alarm rate. Sub-pixel misregistration
       is absorbed by comparing each track pixel with the closest reference among its track
       neighbours (a car cannot be "explained" by a field pixel next to the track). Darker
       and brighter cars both count.

Radar (Sentinel-1 GRD, linear sigma0)
    The reference is the per-pixel median of same-geometry scenes, each scaled to the same track
    level; a scene gain is measured on the track itself (robust lower quartile against the speckle
    distribution); the ratio of local means along the track (a few pixels: a consist is longer than
    a pixel, speckle is not) is tested against the F distribution of speckle with the
    Sentinel-1 IW GRD equivalent number of looks.
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

#: Equivalent number of looks of Sentinel-1 IW GRD high resolution (ESA Sentinel-1 Product
#: Definition, S1-RS-MDA-52-7440: ENL 4.4 for IW GRDH).
S1_ENL = 4.4
#: GRDH resolution (about 20 x 22 m) over its 10 m pixel spacing: neighbouring pixels share speckle,
#: so a window of k pixels holds about k / S1_SPECKLE_CORRELATION independent samples.
S1_SPECKLE_CORRELATION = 2.0
#: False-alarm rate per track pixel for the occupancy tests.
FALSE_ALARM = 0.01
#: Radar: the window (pixels) over which the ratio of local means is taken along the track.
RADAR_WINDOW = 5
#: Radar: the scene gain is read at this quantile of the track's ratios against the same quantile of
#: the speckle ratio distribution. Cars only brighten, so the lower tail is car-free as long as less
#: of the track than this is lit.
RADAR_GAIN_QUANTILE = 0.25
#: Radar: passes that re-measure the gain on the track pixels the previous pass found free of cars.
RADAR_GAIN_REFINE = 1
#: Optical: the window (pixels, 70 m) over which the surroundings' change is measured.
SURROUNDINGS_WINDOW = 7
#: Optical: a surroundings change is projected out only when it is this significant (whitened units).
SURROUNDINGS_MIN_Z = 2.0
#: Optical: offsets (pixels) tried around the registered position for what registration leaves:
#: Sentinel-2 multi-temporal co-registration is specified at 0.3 pixel (2 sigma).
SUBPIXEL_OFFSETS = (-0.5, 0.0, 0.5)
#: Optical: offsets (pixels) searched for the scene's global registration against its reference.
REGISTRATION_OFFSETS = (-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0)
#: Optical: pixels whose NDVI exceeds this in either date are not used to normalise (vegetation).
PIF_MAX_NDVI = 0.3
#: Optical: floor of the residual standard deviation per band (reflectance). Sentinel-2 L2A surface
#: reflectance uncertainty is a few thousandths (ESA S2 L2A validation: ~0.005 in the visible).
OPTICAL_NOISE_FLOOR = 0.002


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
    haze: float = 0.0  # kept for callers; haze is handled by the test's robustness (see the module docstring)


def _masked_mean(values: F32, weight: B, size: int) -> F32:
    w = weight.astype(np.float32)
    num = ndimage.uniform_filter(np.where(weight, values, 0).astype(np.float32), size=size, mode="nearest")
    den = ndimage.uniform_filter(w, size=size, mode="nearest")
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 1e-3)
    return out


def robust_fit(x: npt.NDArray[np.floating], y: npt.NDArray[np.floating]) -> tuple[float, float]:
    """Gain and offset of y ≈ g·x + o by orthogonal regression with iterative 2.5-sigma clipping.

    Orthogonal (total least squares) rather than ordinary regression because both images carry
    noise: ordinary least squares flattens the gain when the pixels span a narrow range (regression
    dilution); orthogonal regression is what relative radiometric normalisation uses (Canty &
    Nielsen 2008, IR-MAD normalisation).
    """
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok].astype(np.float64), y[ok].astype(np.float64)
    if x.size < 10 or float(np.ptp(x)) < 1e-6:
        return 1.0, float(np.median(y - x)) if x.size else 0.0
    keep = np.ones(x.size, bool)
    g, o = 1.0, float(np.median(y - x))
    for _ in range(4):
        if keep.sum() < 10:
            break
        cov = np.cov(x[keep], y[keep])
        vals, vecs = np.linalg.eigh(cov)
        vx, vy = vecs[:, int(np.argmax(vals))]
        if abs(vx) < 1e-9:
            break
        g = float(vy / vx)
        o = float(y[keep].mean() - g * x[keep].mean())
        r = (y - (g * x + o)) / np.sqrt(1.0 + g * g)
        s = 1.4826 * float(np.median(np.abs(r[keep] - np.median(r[keep]))))
        keep = np.abs(r) <= 2.5 * max(s, 1e-6)
    if not np.isfinite(g) or not 0.2 < g < 5.0:
        return 1.0, float(np.median(y - x))
    return g, o


def nan_median(stack: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Median over axis 0 ignoring NaN (NaN where every layer is NaN); much faster than np.nanmedian."""
    srt = np.sort(stack, axis=0)  # NaN sort last
    n = np.sum(np.isfinite(stack), axis=0)
    lo = np.clip((n - 1) // 2, 0, stack.shape[0] - 1)
    hi = np.clip(n // 2, 0, stack.shape[0] - 1)
    a = np.take_along_axis(srt, lo[None], axis=0)[0]
    b = np.take_along_axis(srt, hi[None], axis=0)[0]
    return np.where(n > 0, 0.5 * (a + b), np.nan).astype(np.float32)


def _subsample(mask: B, limit: int = 20000) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Row and column indices of at most ``limit`` pixels of ``mask``, evenly spread (deterministic)."""
    ys, xs = np.nonzero(mask)
    if ys.size > limit:
        pick = np.linspace(0, ys.size - 1, limit).astype(np.intp)
        ys, xs = ys[pick], xs[pick]
    return ys, xs


def _mad_sigma(v: npt.NDArray[np.floating]) -> float:
    if v.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def _ndvi(bands: dict[str, F32]) -> F32:
    nir, red = bands["B08"].astype(np.float32), bands["B04"].astype(np.float32)
    out = np.zeros_like(nir)
    np.divide(nir - red, nir + red, out=out, where=(nir + red) > 1e-4)
    return out


def pseudo_invariant(current: dict[str, F32], reference: dict[str, F32], stable: B, minimum: int = 200) -> B:
    """Stable pixels that are not vegetated in either date (or all stable pixels when too few are)."""
    if "B08" in current and "B04" in current and "B08" in reference and "B04" in reference:
        pif = stable & (_ndvi(current) < PIF_MAX_NDVI) & (_ndvi(reference) < PIF_MAX_NDVI)
        if int(pif.sum()) >= minimum:
            return pif
    return stable


def optical_reference(
    current: dict[str, F32], scenes: Sequence[dict[str, F32]], clear: Sequence[B], stable: B,
    where: B | None = None,
) -> dict[str, F32]:
    """Median of the reference scenes, each first brought to the current scene's radiometry.

    ``where`` limits the pixels the reference is computed for (NaN elsewhere): the track and its
    surroundings are all the change test needs.
    """
    bands = [b for b in OPTICAL_BANDS if b in current and all(b in s for s in scenes)]
    zone = np.ones(stable.shape, bool) if where is None else where
    zy, zx = np.nonzero(zone)
    stack: dict[str, list[npt.NDArray[np.float32]]] = {b: [] for b in bands}
    for scene, ok in zip(scenes, clear, strict=True):
        pif = pseudo_invariant(current, scene, stable & ok)
        fy, fx = _subsample(pif)
        okz = ok[zy, zx]
        for b in bands:
            g, o = robust_fit(scene[b][fy, fx], current[b][fy, fx])
            stack[b].append(np.where(okz, g * scene[b][zy, zx] + o, np.nan).astype(np.float32))
    out: dict[str, F32] = {}
    for b in bands:
        full = np.full(stable.shape, np.nan, np.float32)
        full[zy, zx] = nan_median(np.stack(stack[b]))
        out[b] = full
    return out


def _robust_covariance(x: npt.NDArray[np.float64], floor: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Location and scatter of the bulk of ``x`` (rows = pixels): iterative 97.5 % chi-square trimming.

    A reweighted estimator in the spirit of the MCD (Rousseeuw 1984): the rows beyond the 97.5 %
    quantile are dropped and the covariance rescaled for the truncation, so a minority of occupied
    pixels does not widen the noise it is tested against.
    """
    p = x.shape[1]
    mu = np.median(x, axis=0)
    mad = np.array([_mad_sigma(x[:, j]) for j in range(p)])
    cov = np.diag(np.maximum(mad, floor) ** 2)
    cut = float(stats.chi2.ppf(0.975, p))
    consistency = 0.975 / float(stats.chi2.cdf(cut, p + 2))
    for _ in range(4):
        d = x - mu
        d2 = np.einsum("ij,jk,ik->i", d, np.linalg.inv(cov), d)
        keep = d2 < cut
        if keep.sum() <= 2 * p:
            break
        mu = x[keep].mean(axis=0)
        cov = np.cov(x[keep].T) * consistency
        cov += np.eye(p) * floor**2 * 1e-2
        # never below the floor in any band (identical scenes must give zero change)
        sd = np.sqrt(np.diag(cov))
        scale = np.maximum(sd, floor) / np.maximum(sd, 1e-12)
        cov = cov * np.outer(scale, scale)
    return mu, cov


def _taps(offset: float) -> list[tuple[int, float]]:
    """Integer offsets and weights of linear interpolation at a fractional offset."""
    lo = int(np.floor(offset))
    frac = float(offset - lo)
    return [(lo, 1.0)] if frac == 0 else [(lo, 1.0 - frac), (lo + 1, frac)]


def optical_change(
    current: dict[str, F32],
    reference: dict[str, F32],
    track: B,
    stable: B,
    *,
    neighbours: B | None = None,
    false_alarm: float = FALSE_ALARM,
) -> Change:
    """Spectral change of each track pixel against the reference (reflectance 0..1).

    ``track`` and ``stable`` already exclude unusable pixels. ``neighbours`` (default: the track and
    the pixels next to it) are the pixels a track pixel may be matched with to absorb sub-pixel
    misregistration — the formation, never the fields beside it.
    """
    bands = [b for b in OPTICAL_BANDS if b in current and b in reference]
    if not bands:
        raise ValueError("no optical bands in common between the scene and its reference")
    metrics: dict[str, float] = {}
    pif = pseudo_invariant(current, reference, stable & np.isfinite(reference[bands[0]]))
    fy, fx = _subsample(pif)
    pred: dict[str, F32] = {}
    for b in bands:
        g, o = robust_fit(reference[b][fy, fx], current[b][fy, fx])
        metrics[f"gain_{b}"] = g
        metrics[f"offset_{b}"] = o
        pred[b] = (g * reference[b] + o).astype(np.float32)
    haze = 0.0

    resid = np.stack([current[b].astype(np.float32) - pred[b] for b in bands], axis=-1)
    finite = np.all(np.isfinite(resid), axis=-1)
    track = track & finite
    n_track = int(track.sum())
    if n_track < 3:
        return _finish(np.zeros(track.shape, np.float32), track, np.inf, metrics, false_alarm, haze)
    ys, xs = np.nonzero(track)
    h, w = track.shape
    nb = ndimage.binary_dilation(track, iterations=1) if neighbours is None else neighbours
    cur = np.stack([current[b][ys, xs].astype(np.float32) for b in bands], axis=-1)
    refstack = np.nan_to_num(np.stack([pred[b] for b in bands], axis=-1))

    def shifted(dy: float, dx: float) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """The reference read at (row + dy, col + dx) for every track pixel (bilinear), and whether
        every pixel it is read from lies on the formation."""
        value = np.zeros_like(cur)
        ok = np.ones(ys.size, bool)
        for iy, wy in _taps(dy):
            for ix, wx in _taps(dx):
                yy, xx = np.clip(ys + iy, 0, h - 1), np.clip(xs + ix, 0, w - 1)
                value += (wy * wx) * refstack[yy, xx]
                ok &= nb[yy, xx]
        return value, ok

    # Global sub-pixel registration: the offset (quarter-pixel steps) at which the reference fits the
    # scene's track best; Sentinel-2 scenes are shifted as a whole, by a few metres.
    scale = np.array([max(_mad_sigma(resid[ys, xs, i]), OPTICAL_NOISE_FLOOR) for i in range(len(bands))], np.float32)
    best, best_cost = (0.0, 0.0), np.inf
    for dy in REGISTRATION_OFFSETS:
        for dx in REGISTRATION_OFFSETS:
            value, _ = shifted(dy, dx)
            cost = float(np.median(np.sum(((cur - value) / scale) ** 2, axis=-1)))
            if cost < best_cost - 1e-9 or (abs(cost - best_cost) <= 1e-9 and abs(dy) + abs(dx) < sum(map(abs, best))):
                best, best_cost = (dy, dx), cost
    metrics["shift_rows"], metrics["shift_cols"] = best
    base, _ = shifted(*best)
    r0 = (cur - base).astype(np.float32)
    mu, cov = _robust_covariance(r0.astype(np.float64), OPTICAL_NOISE_FLOOR)
    whiten = np.linalg.cholesky(np.linalg.inv(cov)).astype(np.float32)  # z = (r - mu) @ whiten
    mu32 = mu.astype(np.float32)

    # Direction of the surroundings' own change (stable pixels within SURROUNDINGS_WINDOW), whitened.
    around = stable & finite
    local = np.stack([_masked_mean(np.nan_to_num(resid[..., i]), around, SURROUNDINGS_WINDOW)[ys, xs]
                      for i in range(len(bands))], -1)
    has_local = _masked_mean(np.ones(track.shape, np.float32), around, SURROUNDINGS_WINDOW)[ys, xs] > 0.05
    v = np.where(has_local[:, None], (local - mu32) @ whiten, 0.0).astype(np.float32)
    vn = np.linalg.norm(v, axis=-1, keepdims=True)
    unit = np.where(vn > SURROUNDINGS_MIN_Z, v / np.maximum(vn, 1e-6), 0.0).astype(np.float32)
    metrics["surroundings_projected"] = float(np.mean(vn[:, 0] > SURROUNDINGS_MIN_Z))

    def distance(r: npt.NDArray[np.float32], u: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        z = (r - mu32) @ whiten
        z = z - np.sum(z * u, axis=-1, keepdims=True) * u
        return np.asarray(np.sum(z * z, axis=-1), dtype=np.float32)

    d2 = distance(r0, unit)
    # What registration leaves (edges of the formation, the MTF): the reference is also read half a
    # pixel away in every direction, over the formation only; the closest candidate counts.
    for ddy in SUBPIXEL_OFFSETS:
        for ddx in SUBPIXEL_OFFSETS:
            if ddy == 0 and ddx == 0:
                continue
            value, ok = shifted(best[0] + ddy, best[1] + ddx)
            if ok.any():
                d2[ok] = np.minimum(d2[ok], distance(cur[ok] - value[ok], unit[ok]))
    stat = np.zeros(track.shape, np.float32)
    stat[ys, xs] = d2
    dof = len(bands)
    threshold = float(stats.chi2.ppf(1.0 - false_alarm, dof))
    metrics["threshold"] = threshold
    metrics |= {f"noise_{b}": float(np.sqrt(cov[i, i])) for i, b in enumerate(bands)}
    return _finish(stat, track, threshold, metrics, false_alarm, haze)


def radar_reference(scenes: Sequence[dict[str, F32]], track: B, bands: Sequence[str] = ("VV", "VH"),
                    where: B | None = None) -> dict[str, F32]:
    """Per-pixel median of same-geometry scenes, each scaled to the same median level on the track.

    The median keeps a car that stood in one reference scene out of the reference; the scaling
    removes calibration and moisture differences between the reference scenes. ``where`` limits
    the pixels computed (NaN elsewhere).
    """
    zone = np.ones(track.shape, bool) if where is None else where
    zy, zx = np.nonzero(zone)
    out: dict[str, F32] = {}
    for b in bands:
        layers = []
        for s in scenes:
            a = s[b].astype(np.float32)
            on = a[track & np.isfinite(a) & (a > 0)]
            z = a[zy, zx]
            z = np.where(np.isfinite(z) & (z > 0), z, np.nan)
            layers.append(z / float(np.median(on)) if on.size else z)
        full = np.full(track.shape, np.nan, np.float32)
        full[zy, zx] = nan_median(np.stack(layers))
        out[b] = full
    return out


def wet_snow_drop_db(current: dict[str, F32], references: Sequence[dict[str, F32]], stable: B) -> float:
    """Change (dB) of the surroundings' median VV+VH backscatter against the same-orbit references.

    Liquid water in a snowpack absorbs C-band: wet snow darkens open ground by several dB, while
    calibration and soil moisture move it by one or two (Nagler & Rott 2000 map wet snow where the
    ratio to a snow-free reference falls below -3 dB). Rolling stock does not darken the ground, so
    a scene far below its reference is wet snow, not traffic.
    """
    ys, xs = _subsample(stable)
    if ys.size < 50 or not references:
        return 0.0

    def level(bands: dict[str, F32]) -> float:
        v = (bands["VV"][ys, xs] + bands["VH"][ys, xs]).astype(np.float64)
        v = v[np.isfinite(v) & (v > 0)]
        return float(np.median(v)) if v.size else float("nan")

    ref = float(np.nanmedian([level(r) for r in references]))
    cur = level(current)
    if not (np.isfinite(ref) and np.isfinite(cur)) or ref <= 0 or cur <= 0:
        return 0.0
    return 10.0 * float(np.log10(cur / ref))


def mean_reference(stack: Sequence[dict[str, F32]], bands: Sequence[str]) -> dict[str, F32]:
    """Per-pixel mean (linear power) of radar scenes, ignoring nodata (kept for callers and tests)."""
    out: dict[str, F32] = {}
    for b in bands:
        arr = np.stack([np.where(np.isfinite(s[b]) & (s[b] > 0), s[b], np.nan) for s in stack]).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out[b] = np.nanmean(arr, axis=0).astype(np.float32)
    return out


def median_reference(stack: Sequence[dict[str, F32]], bands: Sequence[str], valid: Sequence[B]) -> dict[str, F32]:
    """Per-pixel median of reference scenes, ignoring each scene's unusable pixels (no normalisation)."""
    out: dict[str, F32] = {}
    for b in bands:
        arr = np.stack([np.where(v, s[b], np.nan) for s, v in zip(stack, valid, strict=True)]).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out[b] = np.nanmedian(arr, axis=0).astype(np.float32)
    return out


def radar_change(
    current: dict[str, F32], reference: dict[str, F32], n_reference: int, track: B, stable: B,
    *, false_alarm: float = FALSE_ALARM, window: int = RADAR_WINDOW, gain_quantile: float | None = None,
) -> Change:
    """Ratio of backscatter (VV+VH, linear) to the same-geometry reference: a CFAR test along the track.

    Metal rolling stock brightens the track. Under speckle, the ratio of the mean of k pixels of
    the scene to the mean of the same pixels of an n-scene reference follows an F distribution
    with 2·k·ENL and 2·k·n·ENL degrees of freedom (k counted in independent samples), so the
    threshold for the false-alarm rate follows from the ENL, not from tuning. The scene gain is
    measured on the track: its lower quartile against the same distribution's (cars only ever
    brighten, so the lower part of the track's ratios is car-free), then again as the median ratio
    of the track pixels that pass found free of cars (a full yard lights the lower quartile too).
    ``stable`` is only used for a diagnostic.
    """
    cur = (current["VV"] + current["VH"]).astype(np.float32)
    ref = (reference["VV"] + reference["VH"]).astype(np.float32)
    valid = np.isfinite(cur) & np.isfinite(ref) & (ref > 0) & (cur > 0)
    track = track & valid
    n_ref = max(1, int(n_reference))
    metrics: dict[str, float] = {"n_reference": float(n_ref)}
    if int(track.sum()) < 3:
        return _finish(np.zeros(cur.shape, np.float32), track, np.inf, metrics, false_alarm)
    ratio = np.ones_like(cur)
    np.divide(cur, ref, out=ratio, where=valid)
    single = stats.f(2 * S1_ENL, 2 * n_ref * S1_ENL)
    q = RADAR_GAIN_QUANTILE if gain_quantile is None else gain_quantile
    gain = float(np.quantile(ratio[track], q)) / float(single.ppf(q))
    # Ratio of local means over the track pixels of the window (speckle averages, a consist does not).
    lc = _masked_mean(np.where(track, cur, 0).astype(np.float32), track, window)
    lr = _masked_mean(np.where(track, ref, 0).astype(np.float32), track, window)
    k = _masked_mean(np.ones_like(cur), track, window) * window * window  # track pixels in the window
    samples = np.maximum(np.round(k[track]) / S1_SPECKLE_CORRELATION, 1.0)
    levels, inverse = np.unique(samples, return_inverse=True)  # a few distinct window fillings
    thresholds = stats.f.ppf(1.0 - false_alarm, 2 * S1_ENL * levels, 2 * S1_ENL * levels * n_ref)
    stat = np.zeros_like(cur)
    excess = np.zeros_like(cur)
    for step in range(1 + RADAR_GAIN_REFINE):
        if step:
            # Refine the gain on the track pixels away from what the last pass found occupied: with many
            # cars (a full yard) the lower quartile itself is lit, and the first gain is too high.
            free = track & ~ndimage.binary_dilation(excess > 100.0, iterations=window // 2)
            if int(free.sum()) >= max(30, track.sum() // 4):
                gain = float(np.median(ratio[free])) / float(single.median())
        np.divide(lc, gain * lr, out=stat, where=track & (lr > 0))
        # The per-pixel statistic is the ratio in per cent of its own CFAR threshold: occupied above 100.
        excess[track] = 100.0 * stat[track] / thresholds[inverse].astype(np.float32)
    metrics["gain"] = gain
    metrics["threshold"] = 100.0
    metrics["ratio_threshold"] = float(np.median(thresholds[inverse]))
    st = stable & valid
    if st.sum() > 100:
        metrics["stable_ratio"] = float(np.median(ratio[st]) / gain)
    return _finish(excess, track, 100.0, metrics, false_alarm)


def _finish(stat: F32, track: B, threshold: float, metrics: dict[str, float], false_alarm: float,
            haze: float = 0.0) -> Change:
    occupied = track & (stat > threshold)
    n_track = int(track.sum())
    n_occ = int(occupied.sum())
    expected = false_alarm * n_track
    activity = max(0.0, n_occ - expected) / n_track if n_track else 0.0
    metrics = dict(metrics, n_track=float(n_track), n_occupied=float(n_occ))
    return Change(occupied, n_track, n_occ, expected, activity, np.where(track, stat, 0).astype(np.float32),
                  metrics, haze)
