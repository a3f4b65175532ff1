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
    Sentinel-1 IW GRD equivalent number of looks. (A test of whole regions of such windows,
    :func:`radar_regions`, is built and measured but not enabled.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from scipy import ndimage, special, stats
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from railwatch.detect.quality import OPTICAL_BANDS
from railwatch.detect.zone import WindowSums, Zone, column, diamond_columns, padded, square_columns

F32 = npt.NDArray[np.float32]
B = npt.NDArray[np.bool_]
_S = TypeVar("_S", bound=np.generic)
_F = TypeVar("_F", bound=np.floating)

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
#: Radar region test (docs/detector.md §4, "A test of whole occupied regions"): built and measured on
#: the tuning seeds, **not enabled** — it improved the Sentinel-1 count (MAPE 51 % -> 40 %, Spearman
#: 0.46 -> 0.56) but the alert F1 fell from 0.72 to 0.69. ``radar_change(..., regions=True)`` runs it.
RADAR_REGION_TEST = False
#: Radar region test: candidates are the track pixels whose ratio of track means over this window passes
#: the F quantile of this (lenient) false-alarm rate, with degrees of freedom from the track pixels
#: actually in the window.
RADAR_CANDIDATE_WINDOW = 3
RADAR_CANDIDATE_FALSE_ALARM = 0.2
#: Radar region test: each 8-connected region of candidates is accepted when the z-score of the log of
#: its summed ratio (Σ scene / Σ gain x reference, against log F with the region's own degrees of
#: freedom) passes :data:`RADAR_REGION_Z` for its size class, which holds pure speckle to
#: ``RADAR_REGION_FALSE_REGIONS`` false regions per 1 000 track pixels per scene in all, the same number in
#: each size class (:data:`RADAR_REGION_SIZES`; regions of more than 24 pixels are then all accepted).
#: The thresholds come from the Monte Carlo of ``bench/radar_regions.py``: per-pixel Gamma speckle of
#: shape ENL / speckle correlation (a sum of m pixels carries m / 2 independent looks of ENL 4.4, as the
#: test assumes), the reference the mean of n such scenes, on generic track masks.
RADAR_REGION_FALSE_REGIONS = 3.0
#: Upper bounds (pixels) of the region size classes; regions larger than the last form the last class.
RADAR_REGION_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24)
#: z thresholds per size class (``len(RADAR_REGION_SIZES) + 1`` of them), by reference scenes (1-6; more
#: scenes read the row of 6, slightly conservative: the thresholds fall as the reference grows).
RADAR_REGION_Z: dict[int, tuple[float, ...]] = {
    1: (3.05, 2.43, 2.49, 2.58, 2.73, 2.63, 2.79, 2.64, 2.71, -10.00),
    2: (2.56, 2.20, 2.33, 2.40, 2.59, 2.51, 2.64, 2.53, 2.65, -10.00),
    3: (2.34, 2.10, 2.23, 2.35, 2.51, 2.45, 2.59, 2.49, 2.60, -10.00),
    4: (2.24, 2.03, 2.20, 2.31, 2.47, 2.42, 2.60, 2.49, 2.59, -10.00),
    5: (2.16, 1.99, 2.18, 2.28, 2.46, 2.38, 2.55, 2.47, 2.55, -10.00),
    6: (2.13, 1.96, 2.15, 2.24, 2.42, 2.38, 2.53, 2.47, 2.55, -10.00),
}
#: False occupied pixels per track pixel that the thresholds let through under that speckle model, by
#: reference scenes (Monte Carlo). Not subtracted (the region test reports no expected false alarms):
#: white speckle of ENL 4.4 (independent pixels) gives 0.2 %, and subtracting the model's 2.6 % made the
#: tuning seeds' raw count worse (docs/detector.md §9).
RADAR_REGION_FALSE_PIXELS: dict[int, float] = {1: 0.0262, 2: 0.0266, 3: 0.0258, 4: 0.0265, 5: 0.0261, 6: 0.0264}
#: Optical: the window (pixels, 70 m) over which the surroundings' change is measured.
SURROUNDINGS_WINDOW = 7
#: Optical: a surroundings change is projected out only when it is this significant (whitened units).
SURROUNDINGS_MIN_Z = 2.0
#: Optical: offsets (pixels) tried around the registered position for what registration leaves:
#: Sentinel-2 multi-temporal co-registration is specified at 0.3 pixel (2 sigma).
SUBPIXEL_OFFSETS = (-0.5, 0.0, 0.5)
#: Optical: offsets (pixels) searched for the scene's global registration against its reference. All
#: 81: a coarse-to-fine search (half-pixel grid, then quarter steps around its best) was tried and
#: lost the optimum in one scene of 36 (a low-contrast winter scene, whose cost surface has several
#: minima), with 7 times the occupied pixels.
REGISTRATION_OFFSETS = (-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0)
#: Optical: the registration search and the noise covariance read at most this many track pixels,
#: evenly spread: one shift and one 4 x 4 covariance per scene are as well determined by 2 000 pixels
#: as by 40 000, at a twentieth of the arithmetic.
TRACK_SAMPLE = 2000
#: Optical: radiometric fits use at most this many pseudo-invariant pixels, evenly spread. The gain of an
#: orthogonal fit over 5 000 pixels with 0.005 reflectance noise spread over 0.1 is known to about 0.1 %
#: (a residual of 1e-4 reflectance, a twentieth of the noise floor); every optical scene makes about 30 fits.
FIT_SAMPLE = 5000
#: Optical: pixels whose NDVI exceeds this in either date are not used to normalise (vegetation).
PIF_MAX_NDVI = 0.3
#: Optical: with fewer pseudo-invariant pixels than this, a fit stands on every stable pixel.
PIF_MINIMUM = 200
#: Optical: orthogonal fits of a radiometric normalisation, each on the pixels the previous one left
#: within 2.5 robust sigma (:func:`robust_fit`).
FIT_PASSES = 4
#: Optical: the fits that bring each reference scene to the current scene's radiometry (24 per scene:
#: six scenes, four bands) take fewer pixels and passes than the scene's own fit to its reference. Their
#: errors only jitter the layers of a per-pixel median that :func:`optical_change` fits to the scene once
#: more: over 1 000 pixels the gain is known to about 0.2 % and the offset to about 2e-4 reflectance, a
#: tenth of the noise floor; two clipping rounds remove what the pseudo-invariant pixels let through
#: (a new roof, a parked lorry). A fit costs about a sixth of a full one.
REFERENCE_FIT_SAMPLE = 1000
REFERENCE_FIT_PASSES = 3
#: Optical: a radiometric fit measures a gain only when its pixels' scatter is elongated: the variance
#: along its major axis at least this many times that across it (the pixels span at least about five
#: noise units). Pseudo-invariant pixels of one material (a bare yard, a desert, snow) form a round
#: cloud whose axis is noise: an orthogonal fit then returned an arbitrary gain that scrambled the
#: band (docs/detector.md §2); such a fit is an offset only (gain 1, the median difference).
FIT_MIN_ELONGATION = 25.0
#: Optical: floor of the residual standard deviation per band (reflectance). Sentinel-2 L2A surface
#: reflectance uncertainty is a few thousandths (ESA S2 L2A validation: ~0.005 in the visible).
OPTICAL_NOISE_FLOOR = 0.002


@dataclass(frozen=True)
class Change:
    """Per-scene change measure on the usable track pixels.

    ``occupied`` and ``magnitude`` have the shape of the arrays the test was given: pixel vectors over
    a zone in the pipeline, whole grids once :meth:`on_grid` has put them back.
    """

    occupied: B  # occupied track pixels
    n_track: int  # usable track pixels
    n_occupied: int
    expected_false: float  # false positives expected among the usable track pixels
    activity: float  # occupied share of the usable track beyond the false-alarm level (0..1)
    magnitude: F32  # per-pixel change statistic (0 off the track)
    metrics: dict[str, float] = field(default_factory=dict)
    haze: float = 0.0  # kept for callers; haze is handled by the test's robustness (see the module docstring)

    def on_grid(self, zone: Zone) -> Change:
        """The same change with its per-pixel arrays on the whole grid (it was measured on ``zone``'s pixels)."""
        return replace(self, occupied=zone.scatter(self.occupied, False), magnitude=zone.scatter(self.magnitude, 0.0))


def _vectors(bands: dict[str, F32]) -> dict[str, F32]:
    """Whole-grid bands as pixel vectors over every pixel of the grid (see :meth:`Zone.whole`)."""
    return {b: v.reshape(-1) for b, v in bands.items()}


# Quantiles of the F and chi-square laws the tests read, cached: a frozen scipy distribution costs about
# a millisecond to build and each call a few hundred microseconds of argument checking, the whole
# of a small AOI's radar test otherwise (bench/kernel.py); the values are scipy's own, bit for bit.
@lru_cache(maxsize=1024)
def _f_ppf(q: float, d1: float, d2: float) -> float:
    return float(stats.f.ppf(q, d1, d2))


@lru_cache(maxsize=1024)
def _chi2_ppf(q: float, dof: float) -> float:
    return float(stats.chi2.ppf(q, dof))


@lru_cache(maxsize=1024)
def _chi2_cdf(x: float, dof: float) -> float:
    return float(stats.chi2.cdf(x, dof))


def _window_mean(values: F32, sums: WindowSums) -> tuple[F32, npt.NDArray[np.intp]]:
    """Mean of ``values`` (a pixel vector: one value, or one row of values, per pixel) over the usable
    pixels of each window of ``sums`` (0 where there are none), and how many pixels each mean took.

    The masked local mean a whole-grid ``ndimage.uniform_filter`` used to give, read only around the
    pixels tested (:meth:`Zone.window_sums`; a window entry off the zone reads nothing).
    """
    shape = (-1, *([1] * (values.ndim - 1)))
    total = sums.total(values)
    count = sums.count
    mean = np.zeros_like(total)
    np.divide(total, count.reshape(shape).astype(np.float32), out=mean, where=count.reshape(shape) > 0)
    return mean, count


def robust_fit(
    x: npt.NDArray[np.floating], y: npt.NDArray[np.floating], passes: int = FIT_PASSES,
) -> tuple[float, float]:
    """Gain and offset of y ≈ g·x + o by orthogonal regression with iterative 2.5-sigma clipping.

    Orthogonal (total least squares) rather than ordinary regression because both images carry
    noise: ordinary least squares flattens the gain when the pixels span a narrow range (regression
    dilution); orthogonal regression is what relative radiometric normalisation uses (Canty &
    Nielsen 2008, IR-MAD normalisation). A Sentinel-2 scene takes about 30 of these fits (every band
    of every reference scene, then of the reference), so the 2 x 2 eigenproblem is solved in closed
    form, the medians by a single-index partition (:func:`_median`), and nothing is computed that the
    result does not read: the median of y - x only when the fit falls back to it, no clipping after
    the last of the ``passes`` fits (``FIT_PASSES`` by default).

    A gain needs pixels that span a range: when the scatter of the pixels a pass fits is not elongated
    (major-axis variance under ``FIT_MIN_ELONGATION`` times the minor's: one material and its noise),
    its axis says nothing about the gain and the fit is the median offset with gain 1.
    """
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.all():  # (a fit's sample is usually all finite: no copy through a mask)
        x, y = x[ok], y[ok]
    x, y = x.astype(np.float64), y.astype(np.float64)
    if x.size < 10 or float(x.max() - x.min()) < 1e-6:  # np.ptp, without its wrapper
        return 1.0, float(_median(y - x)) if x.size else 0.0
    keep: B | None = None  # every pixel, until the first clipping
    g: float | None = None
    o = 0.0
    for step in range(passes):
        if keep is None:
            xk, yk = x, y
        elif np.count_nonzero(keep) < 10:
            break
        else:
            xk, yk = x[keep], y[keep]
        # The means as ndarray.mean takes them (the same pairwise sum over the same count), without its wrapper.
        mx, my = float(np.add.reduce(xk)) / xk.size, float(np.add.reduce(yk)) / yk.size
        dx, dy = xk - mx, yk - my
        # einsum, not a BLAS dot: a threaded dot of 20 000 values stalls on a busy machine.
        sxx, syy, sxy = (float(np.einsum("i,i", a, b)) for a, b in ((dx, dx), (dy, dy), (dx, dy)))
        # The major axis of the scatter matrix [[sxx, sxy], [sxy, syy]] (its slope, from whichever
        # of its two equivalent forms does not cancel).
        half = 0.5 * (sxx - syy)
        root = float(np.hypot(half, sxy))
        mean_var = 0.5 * (sxx + syy)
        if mean_var + root < FIT_MIN_ELONGATION * (mean_var - root):
            g = None  # a round cloud: its axis is noise, the gain is not measurable
            break
        if half >= 0:
            slope = sxy / (half + root) if half + root > 0 else 0.0
        elif sxy == 0:
            break  # a vertical major axis: no gain
        else:
            slope = (root - half) / sxy
        if 1.0 / np.sqrt(1.0 + slope * slope) < 1e-9:
            break
        g = slope
        o = my - g * mx
        if step == passes - 1:
            break  # the clipping below would only serve a further pass
        r = (y - (g * x + o)) / np.sqrt(1.0 + g * g)
        rk = r if keep is None else r[keep]
        s = 1.4826 * float(_median(np.abs(rk - _median(rk))))
        keep = np.abs(r) <= 2.5 * max(s, 1e-6)
    if g is None or not np.isfinite(g) or not 0.2 < g < 5.0:
        return 1.0, float(_median(y - x))
    return g, o


def _median(v: npt.NDArray[_F]) -> Any:
    """``np.median(v, axis=-1)`` of finite values, the very same numbers, about 5x faster.

    ``np.median`` partitions at two indices at once for an even count, which numpy does without its
    vectorised selection (x86-simd-sort); one single-index partition and the maximum of the lower
    part give the same two order statistics, and their mean is taken in the same dtype. A numpy
    scalar for a 1-D array, else an array of the medians of the last axis. NaN are not handled (they
    sort last): every caller passes finite values.
    """
    n = v.shape[-1]
    half = n // 2
    part = np.partition(v, half, axis=-1)
    if n % 2:
        return part[..., half]
    return 0.5 * (part[..., :half].max(axis=-1) + part[..., half])


#: Stacks of up to this many layers are sorted by compare-exchange passes over whole layers in
#: :func:`nan_median` (about 4x faster than ``np.sort`` along axis 0 for the usual 6 reference scenes;
#: the passes grow with the square of the layers, so deeper stacks use ``np.sort``).
NETWORK_SORT_LAYERS = 12
#: Optimal sorting networks (comparator pairs, in order) by number of layers; checked on every 0-1 input
#: in the tests (the 0-1 principle). Six is the default ``reference_scenes``.
SORT_NETWORKS: dict[int, list[tuple[int, int]]] = {
    6: [(0, 5), (1, 3), (2, 4), (1, 2), (3, 4), (0, 3), (2, 5), (0, 1), (2, 3), (4, 5), (1, 2), (3, 4)],
}


def nan_median(stack: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Median over axis 0 ignoring NaN (NaN where every layer is NaN); much faster than np.nanmedian.

    The two middle layers of each pixel are read by flat index rather than ``np.take_along_axis``,
    and NaN become +inf by ``np.fmin`` (which ignores NaN) rather than ``np.where`` with a scalar:
    the same numbers, at a third of the cost of those steps.
    """
    k = stack.shape[0]
    if k <= NETWORK_SORT_LAYERS:
        # A sorting network of element-wise min/max between layers, NaN as +inf so that it sorts last
        # (the median below only reads finite layers): the usual six references take the optimal
        # 12-comparator network, other depths odd-even transposition (k passes). Any network that sorts
        # gives the same layers, bit for bit.
        srt = np.fmin(stack, np.float32(np.inf))
        rows = list(srt)
        spare = np.empty_like(rows[0]) if rows else None
        pairs = SORT_NETWORKS.get(k) or [(i, i + 1) for step in range(k) for i in range(step % 2, k - 1, 2)]
        for i, j in pairs:  # in place, through one spare row: no allocation per comparator
            np.minimum(rows[i], rows[j], out=spare)
            np.maximum(rows[i], rows[j], out=rows[j])
            rows[i], spare = spare, rows[i]
        srt = np.stack(rows)
    else:
        srt = np.sort(stack, axis=0)  # NaN sort last
    # Finite layers per pixel, counted in bytes (k <= 255 layers; np.count_nonzero along an axis goes
    # through intp and takes four times as long).
    if k <= 255:
        n = np.isfinite(stack).view(np.uint8).sum(axis=0, dtype=np.uint8).reshape(-1)
    else:
        n = np.count_nonzero(np.isfinite(stack), axis=0).reshape(-1)
    size = n.size
    if size and k and int(n.min()) == k:
        # Every layer finite at every pixel (clear references): the middle layers themselves.
        a, b = srt[(k - 1) // 2].reshape(-1), srt[k // 2].reshape(-1)
        return (0.5 * (a + b)).astype(np.float32).reshape(stack.shape[1:])
    n = n.astype(np.intp)
    flat = srt.reshape(-1)
    at = np.arange(size)
    a = flat[np.maximum((n - 1) // 2, 0) * size + at]  # n // 2 < k: no upper bound to clip
    b = flat[n // 2 * size + at]
    return np.where(n > 0, 0.5 * (a + b), np.nan).astype(np.float32).reshape(stack.shape[1:])


def spread_sample(mask: B, limit: int = FIT_SAMPLE) -> npt.NDArray[np.intp]:
    """Flat indices of at most ``limit`` pixels of ``mask`` (any shape), evenly spread (deterministic)."""
    return _spread(np.flatnonzero(mask), limit)


def _spread(idx: npt.NDArray[np.intp], limit: int) -> npt.NDArray[np.intp]:
    """At most ``limit`` of the sorted flat indices ``idx``, evenly spread (as :func:`spread_sample`)."""
    if idx.size > limit:
        idx = idx[np.linspace(0, idx.size - 1, limit).astype(np.intp)]
    return idx


def _at(values: npt.NDArray[_S], idx: npt.NDArray[np.intp]) -> npt.NDArray[_S]:
    """``values`` (a grid or a pixel vector) at the flat indices ``idx``."""
    return values.reshape(-1)[idx]


def _mad_sigma(v: npt.NDArray[np.floating]) -> float:
    """Robust standard deviation (1.4826 x the median absolute deviation) of finite values."""
    if v.size == 0:
        return 0.0
    return float(1.4826 * _median(np.abs(v - _median(v))))


def ndvi(bands: dict[str, F32]) -> F32:
    nir, red = bands["B08"].astype(np.float32), bands["B04"].astype(np.float32)
    out = np.zeros_like(nir)
    np.divide(nir - red, nir + red, out=out, where=(nir + red) > 1e-4)
    return out


def pseudo_invariant(current: dict[str, F32], reference: dict[str, F32], stable: B, minimum: int = PIF_MINIMUM) -> B:
    """Stable pixels that are not vegetated in either date (or all stable pixels when too few are).

    The NDVI is computed at the stable pixels only (the same numbers as on the whole array there).
    """
    if "B08" in current and "B04" in current and "B08" in reference and "B04" in reference:
        idx = np.flatnonzero(stable)
        return _invariant(stable, idx, _ndvi_at(current, idx), _ndvi_at(reference, idx), minimum)
    return stable


def _ndvi_at(bands: dict[str, F32], idx: npt.NDArray[np.intp]) -> F32:
    """The NDVI at the flat indices ``idx`` (the same numbers as :func:`ndvi` there)."""
    return ndvi({b: _at(bands[b], idx) for b in ("B08", "B04")})


def _invariant_at(
    idx: npt.NDArray[np.intp], ndvi_current: F32, ndvi_reference: F32, minimum: int,
) -> npt.NDArray[np.intp]:
    """The pseudo-invariant pixels among the flat indices ``idx`` (both dates' NDVI at them given), or
    ``idx`` itself when fewer than ``minimum`` are."""
    keep = idx[(ndvi_current < PIF_MAX_NDVI) & (ndvi_reference < PIF_MAX_NDVI)]
    return idx if keep.size < minimum else keep


def _invariant(stable: B, idx: npt.NDArray[np.intp], ndvi_current: F32, ndvi_reference: F32, minimum: int) -> B:
    """:func:`pseudo_invariant` given both dates' NDVI at ``idx`` = ``np.flatnonzero(stable)``."""
    keep = _invariant_at(idx, ndvi_current, ndvi_reference, minimum)
    if keep is idx:
        return stable
    pif = np.zeros(stable.shape, bool)
    pif.reshape(-1)[keep] = True
    return pif


def covering_bands(bands: Sequence[str]) -> list[str]:
    """The bands of an optical reference that :func:`optical_reference` computes at every pixel it
    covers, even with ``where``: the NDVI pair when both are there (they choose the pseudo-invariant
    pixels), else the first band. Where they are finite, some reference scene is clear."""
    return ["B04", "B08"] if "B04" in bands and "B08" in bands else list(bands)[:1]


def covered(reference: dict[str, F32]) -> B:
    """Where an optical reference is computed (its :func:`covering_bands` are finite): where some
    reference scene is clear."""
    return np.logical_and.reduce([np.isfinite(reference[b]) for b in covering_bands(list(reference))])


def _fit_candidates(reference: dict[str, F32], stable: B) -> B:
    """The stable pixels a scene's fit to its reference may stand on: those the reference covers."""
    return stable & covered(reference)


def optical_reference(
    current: dict[str, F32], scenes: Sequence[dict[str, F32]], clear: Sequence[B], stable: B,
    *, where: B | None = None, ndvis: Sequence[F32 | None] | None = None,
) -> dict[str, F32]:
    """Median of the reference scenes, each first brought to the current scene's radiometry
    (:func:`optical_reference_and_fit`, without the fit sample)."""
    return optical_reference_and_fit(current, scenes, clear, stable, where=where, ndvis=ndvis)[0]


def optical_reference_and_fit(
    current: dict[str, F32], scenes: Sequence[dict[str, F32]], clear: Sequence[B], stable: B,
    *, where: B | None = None, ndvis: Sequence[F32 | None] | None = None,
) -> tuple[dict[str, F32], npt.NDArray[np.intp] | None]:
    """Median of the reference scenes, each first brought to the current scene's radiometry; with
    ``where``, also the pixels :func:`optical_change` fits the scene's gains against it on (its ``fit``:
    :func:`fit_sample` of the current scene and this reference over ``stable``, which computing the
    reference at ``where`` chooses anyway), else None.

    Pixel by pixel, so the arrays may be whole grids or pixel vectors over a zone: the pipeline passes
    its change zone (the track, its surroundings and a sample of stable pixels), all the change test
    reads; the gains are then fitted on that sample's pseudo-invariant pixels.

    ``where`` (optional) limits the pixels the reference is computed at (NaN elsewhere) to those the
    change test reads: ``where`` itself (the windows of the tested pixels), and the stable pixels that
    :func:`optical_change` chooses its fit from — every one of them in the NDVI bands, which choose
    the pseudo-invariant pixels, the fit's sample in the other bands. At those pixels the values are
    exactly those of the whole computation, and so is the change measured.

    ``ndvis`` (optional): the :func:`ndvi` of the current scene and then of each reference scene, over
    the same pixels as the bands (a prepared scene's, computed once; None where not known): the same
    numbers as computing it here.
    """
    bands = [b for b in OPTICAL_BANDS if b in current and all(b in s for s in scenes)]
    has_ndvi = covering_bands(bands) == ["B04", "B08"]
    known = list(ndvis) if ndvis is not None else [None] * (1 + len(scenes))

    def ndvi_at(i: int, of: dict[str, F32], at: npt.NDArray[np.intp]) -> F32:
        pre = known[i]
        return _at(pre, at) if pre is not None else _ndvi_at(of, at)

    idx = np.flatnonzero(stable)
    ndvi_now = ndvi_at(0, current, idx) if has_ndvi else None
    fits: list[dict[str, tuple[float, float]]] = []
    for i, (scene, ok) in enumerate(zip(scenes, clear, strict=True), start=1):
        inside = _at(ok, idx)
        usable = idx[inside]  # = np.flatnonzero(stable & ok)
        # The pseudo-invariant pixels as indices (_invariant's mask, without building it).
        pif = usable
        if ndvi_now is not None:
            pif = _invariant_at(usable, ndvi_now[inside], ndvi_at(i, scene, usable), PIF_MINIMUM)
        fit = _spread(pif, REFERENCE_FIT_SAMPLE)
        fits.append({b: robust_fit(_at(scene[b], fit), _at(current[b], fit), REFERENCE_FIT_PASSES)
                     for b in bands})

    def medians_at(wanted: Sequence[str], pixels: npt.NDArray[np.intp] | None) -> dict[str, F32]:
        """The median of the normalised scenes in each band of ``wanted`` (at ``pixels`` only, NaN elsewhere).

        Each layer is written into one stack in place (the same float32 operations as ``g * x + o``), and
        a scene's cloudy pixels are gathered once for all the bands.
        """
        n = stable.size if pixels is None else pixels.size
        cloudy = [~(ok.reshape(-1) if pixels is None else _at(ok, pixels)) for ok in clear]
        out: dict[str, F32] = {}
        for b in wanted:
            stack = np.empty((len(scenes), n), np.float32)
            for row, scene, bad, fit in zip(stack, scenes, cloudy, fits, strict=True):
                g, o = fit[b]
                if pixels is None:
                    row[:] = scene[b].reshape(-1)
                else:
                    np.take(scene[b].reshape(-1), pixels, out=row)
                row *= g
                row += o
                row[bad] = np.nan
            median = nan_median(stack)
            if pixels is None:
                out[b] = median.reshape(stable.shape)
            else:
                out[b] = np.full(stable.shape, np.nan, np.float32)
                out[b].reshape(-1)[pixels] = median
        return out

    if where is None:
        return medians_at(bands, None), None
    # The NDVI bands wherever optical_change may choose its fit; then the fit it will choose.
    first = covering_bands(bands)
    reference = medians_at(first, np.flatnonzero(where | stable))
    sample = fit_sample(current, reference, stable)
    fit = np.zeros(stable.shape, bool)
    fit.reshape(-1)[sample] = True
    reference |= medians_at([b for b in bands if b not in reference], np.flatnonzero(where | fit))
    return {b: reference[b] for b in bands}, sample


def fit_sample(current: dict[str, F32], reference: dict[str, F32], stable: B) -> npt.NDArray[np.intp]:
    """The pixels a scene's gains against its reference are fitted on (flat indices): an even sample of
    the pseudo-invariant pixels among the stable ones the reference covers."""
    return spread_sample(pseudo_invariant(current, reference, _fit_candidates(reference, stable)))


def _robust_covariance(x: npt.NDArray[np.float64], floor: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Location and scatter of the bulk of ``x`` (rows = pixels): iterative 97.5 % chi-square trimming.

    A reweighted estimator in the spirit of the MCD (Rousseeuw 1984): the rows beyond the 97.5 %
    quantile are dropped and the covariance rescaled for the truncation, so a minority of occupied
    pixels does not widen the noise it is tested against.
    """
    p = x.shape[1]
    mu = _median(np.ascontiguousarray(x.T))
    mad = np.array([_mad_sigma(x[:, j]) for j in range(p)])
    cov = np.diag(np.maximum(mad, floor) ** 2)
    cut = _chi2_ppf(0.975, p)
    consistency = 0.975 / _chi2_cdf(cut, p + 2)
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


@lru_cache(maxsize=8)
def _registration_batches(
    offsets: tuple[tuple[float, float], ...],
) -> list[list[tuple[tuple[int, int], npt.NDArray[np.float32]]]]:
    """The batches of :func:`_registration_costs` for ``offsets``: per batch, each integer tap that some
    offset of the batch uses and its weights (one per offset, shaped to broadcast over the pixels and
    bands). The same for every scene, so computed once."""
    taps = [(iy, ix) for iy in (-1, 0, 1) for ix in (-1, 0, 1)]
    weights = np.zeros((len(offsets), len(taps)), np.float32)
    for o, (dy, dx) in enumerate(offsets):
        for iy, wy in _taps(dy):
            for ix, wx in _taps(dx):
                weights[o, taps.index((iy, ix))] = wy * wx
    weights.setflags(write=False)  # shared by every call
    return [[(tap, weights[batch, k][:, None, None]) for k, tap in enumerate(taps) if weights[batch, k].any()]
            for batch in np.array_split(np.arange(len(offsets)), max(1, len(offsets) // 9))]


def _registration_costs(
    offsets: Sequence[tuple[float, float]], cur: npt.NDArray[np.float32],
    read: Callable[[int, int], tuple[npt.NDArray[np.float32], B]], scale: npt.NDArray[np.float32],
) -> list[float]:
    """The median whitened squared residual of the track at each registration offset.

    The reference at an offset within one pixel is a bilinear sum of the 3 x 3 integer taps around
    each pixel (``read``), so the offsets are evaluated a batch at a time with one weight per tap
    (zero for the taps an offset does not use: the same sums, in the same order, as reading each
    offset on its own). A tap no offset of the batch uses is skipped: adding its zero products
    would not change a bit, and a batch of one row offset uses only three or six of the nine taps.
    """
    costs: list[float] = []
    # Band-major copies (bands x pixels), so that every operation below runs over contiguous pixels: the
    # same float32 operations on the same elements as over (pixels x bands).
    cur_t = np.ascontiguousarray(cur.T)
    taps_t: dict[tuple[int, int], npt.NDArray[np.float32]] = {}
    for used in _registration_batches(tuple(offsets)):
        value = np.zeros((used[0][1].shape[0], *cur_t.shape), np.float32)
        product = np.empty_like(value)
        for (iy, ix), w in used:
            if (iy, ix) not in taps_t:
                taps_t[(iy, ix)] = np.ascontiguousarray(read(iy, ix)[0].T)
            np.multiply(w, taps_t[(iy, ix)][None], out=product)
            value += product
        # The whitened squared residual summed over the bands, band by band in np.sum's order (the same
        # float32 numbers, without a reduction over a four-wide axis or a broadcast division: half the time).
        total = np.zeros((value.shape[0], value.shape[2]), np.float32)
        for b in range(cur_t.shape[0]):
            d = (cur_t[b] - value[:, b]) / scale[b]
            total += d * d
        costs += [float(c) for c in _median(total)]
    return costs


def _register(cur: npt.NDArray[np.float32], read: Callable[[int, int], tuple[npt.NDArray[np.float32], B]],
              scale: npt.NDArray[np.float32]) -> tuple[float, float]:
    """The offset (rows, columns) within one pixel at which the reference fits ``cur`` best: the
    least median whitened squared residual (:func:`_registration_costs`) over ``REGISTRATION_OFFSETS``
    in both directions; ties go to the smaller shift."""
    best, best_cost = (0.0, 0.0), np.inf
    offsets = [(dy, dx) for dy in REGISTRATION_OFFSETS for dx in REGISTRATION_OFFSETS]
    for (dy, dx), cost in zip(offsets, _registration_costs(offsets, cur, read, scale), strict=True):
        if cost < best_cost - 1e-9 or (abs(cost - best_cost) <= 1e-9 and abs(dy) + abs(dx) < sum(map(abs, best))):
            best, best_cost = (dy, dx), cost
    return best


def optical_change(
    current: dict[str, F32],
    reference: dict[str, F32],
    track: B,
    stable: B,
    *,
    zone: Zone | None = None,
    neighbours: B | None = None,
    false_alarm: float = FALSE_ALARM,
    fit: npt.NDArray[np.intp] | None = None,
) -> Change:
    """Spectral change of each track pixel against the reference (reflectance 0..1).

    ``fit`` (optional): the pixels the scene's gains against the reference are fitted on, when the caller
    has them (:func:`optical_reference_and_fit`); by default :func:`fit_sample` of ``stable``.

    ``track`` and ``stable`` already exclude unusable pixels. ``neighbours`` (default: the track and
    the pixels next to it) are the pixels a track pixel may be matched with to absorb sub-pixel
    misregistration — the formation, never the fields beside it. The arrays are pixel vectors over
    ``zone``, whose windows cover ``track`` (the pipeline's case: the cost follows the track); without a
    zone they are whole grids, and so is the change returned.
    """
    if zone is None:
        whole = Zone.whole(track)
        nb = ndimage.binary_dilation(track, iterations=1) if neighbours is None else neighbours
        return optical_change(_vectors(current), _vectors(reference), track.reshape(-1), stable.reshape(-1),
                              zone=whole, neighbours=nb.reshape(-1), false_alarm=false_alarm, fit=fit).on_grid(whole)
    if neighbours is None:
        raise ValueError("neighbours are required with a zone")
    bands = [b for b in OPTICAL_BANDS if b in current and b in reference]
    if not bands:
        raise ValueError("no optical bands in common between the scene and its reference")
    metrics: dict[str, float] = {}
    if fit is None:
        fit = fit_sample(current, reference, stable)
    pred: dict[str, F32] = {}
    for b in bands:
        g, o = robust_fit(reference[b][fit], current[b][fit])
        metrics[f"gain_{b}"] = g
        metrics[f"offset_{b}"] = o
        pred[b] = (g * reference[b] + o).astype(np.float32)
    haze = 0.0

    columns = [current[b].astype(np.float32) - pred[b] for b in bands]
    resid = np.stack(columns, axis=-1)
    finite = np.logical_and.reduce([np.isfinite(c) for c in columns])  # np.all over a 4-wide axis is slow
    track = track & finite
    n_track = int(track.sum())
    if n_track < 3:
        return _finish(np.zeros(track.shape, np.float32), track, np.inf, metrics, false_alarm, haze)
    at = np.flatnonzero(track)
    win = zone.windows(at)
    cur = np.stack([current[b][at].astype(np.float32) for b in bands], axis=-1)
    refstack = padded(np.nan_to_num(np.stack([pred[b] for b in bands], axis=-1)))  # off the zone reads 0
    formation = padded(neighbours, False)
    reads: dict[tuple[int, int], tuple[npt.NDArray[np.float32], B]] = {}

    def read(iy: int, ix: int) -> tuple[npt.NDArray[np.float32], B]:
        """The reference ``iy`` rows and ``ix`` columns off every track pixel, and whether that is formation."""
        if (iy, ix) not in reads:
            taps = win[:, column(iy, ix)]
            reads[(iy, ix)] = refstack[taps], formation[taps]
        return reads[(iy, ix)]

    def shifted(dy: float, dx: float) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """The reference read at (row + dy, col + dx) for every track pixel (bilinear), and whether
        every pixel it is read from lies on the formation."""
        value = np.zeros_like(cur)
        ok = np.ones(at.size, bool)
        for iy, wy in _taps(dy):
            for ix, wx in _taps(dx):
                ref_at, on_formation = read(iy, ix)
                value += (wy * wx) * ref_at
                ok &= on_formation
        return value, ok

    # Global sub-pixel registration: the offset (quarter-pixel steps) at which the reference fits the
    # scene's track best; Sentinel-2 scenes are shifted as a whole, by a few metres.
    scale = np.array([max(_mad_sigma(resid[at, i]), OPTICAL_NOISE_FLOOR) for i in range(len(bands))], np.float32)
    some: npt.NDArray[np.intp] | slice = slice(None)  # every track pixel, or an even sample of TRACK_SAMPLE
    if at.size > TRACK_SAMPLE:
        some = np.linspace(0, at.size - 1, TRACK_SAMPLE).astype(np.intp)
    sampled: dict[tuple[int, int], tuple[npt.NDArray[np.float32], B]] = {}

    def read_some(iy: int, ix: int) -> tuple[npt.NDArray[np.float32], B]:
        if (iy, ix) not in sampled:
            ref_at, on_formation = read(iy, ix)
            sampled[(iy, ix)] = ref_at[some], on_formation[some]
        return sampled[(iy, ix)]

    best = _register(cur[some], read_some, scale)
    metrics["shift_rows"], metrics["shift_cols"] = best
    base, _ = shifted(*best)
    r0 = (cur - base).astype(np.float32)
    mu, cov = _robust_covariance(r0[some].astype(np.float64), OPTICAL_NOISE_FLOOR)
    whiten = np.linalg.cholesky(np.linalg.inv(cov)).astype(np.float32)  # z = (r - mu) @ whiten
    mu32 = mu.astype(np.float32)

    # Direction of the surroundings' own change (stable pixels within SURROUNDINGS_WINDOW), whitened.
    local, n_local = _window_mean(resid, zone.window_sums(at, square_columns(SURROUNDINGS_WINDOW), stable & finite))
    has_local = n_local > 0
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
    stat[at] = d2
    dof = len(bands)
    threshold = _chi2_ppf(1.0 - false_alarm, dof)
    metrics["threshold"] = threshold
    metrics |= {f"noise_{b}": float(np.sqrt(cov[i, i])) for i, b in enumerate(bands)}
    return _finish(stat, track, threshold, metrics, false_alarm, haze)


def _log_f_moments(d1: npt.NDArray[np.float64], d2: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64],
                                                                                    npt.NDArray[np.float64]]:
    """Mean and variance of log F(d1, d2): log(X1/d1) - log(X2/d2) with X chi-square, E log(X/d) =
    digamma(d/2) - log(d/2) and Var = trigamma(d/2)."""
    h1, h2 = d1 / 2.0, d2 / 2.0
    mean = special.digamma(h1) - np.log(h1) - special.digamma(h2) + np.log(h2)
    var = special.polygamma(1, h1) + special.polygamma(1, h2)
    return mean, var


@dataclass(frozen=True)
class RadarRegions:
    """The candidate regions of one radar scene (see :func:`radar_regions`), over the tested pixels ``at``."""

    candidate: B  # per tested pixel: a candidate
    statistic: F32  # per tested pixel: its window ratio in per cent of its candidate threshold
    label: npt.NDArray[np.intp]  # per candidate (in the order of ``at[candidate]``): its region
    size: npt.NDArray[np.float64]  # per region: pixels
    z: npt.NDArray[np.float64]  # per region: z-score of the log of its summed ratio


def radar_regions(cur: F32, scaled_ref: F32, n_ref: int, track: B, win: npt.NDArray[np.int32],
                  *, window: int = RADAR_CANDIDATE_WINDOW,
                  candidate_false_alarm: float = RADAR_CANDIDATE_FALSE_ALARM) -> RadarRegions:
    """Candidate track pixels and their 8-connected regions, each with the z-score of its summed ratio.

    ``cur`` and ``scaled_ref`` (the reference times the scene gain) are pixel vectors, ``track`` the
    usable track pixels and ``win`` their window rows (:meth:`Zone.windows` of ``flatnonzero(track)``).
    A pixel is a candidate when the ratio of the means of the track pixels of its ``window`` x ``window``
    window passes the F quantile 1 - ``candidate_false_alarm`` for k = (track pixels in the window) / 2
    independent samples. Under speckle, the ratio of the sums over a region of m pixels follows
    F(2·L·m/2, 2·L·m/2·n); the z-score is that of its log against the log-F mean and variance, so that one
    scale serves every region size (selection still biases it upward: the thresholds are calibrated by
    Monte Carlo, :data:`RADAR_REGION_Z`).
    """
    at = np.flatnonzero(track)
    local, count = _window_mean(np.stack([cur, scaled_ref], axis=-1),
                                WindowSums.build(track, win[:, square_columns(window)]))
    lc, lr = local[:, 0], local[:, 1]
    ratio = np.zeros(at.size, np.float32)
    np.divide(lc, lr, out=ratio, where=lr > 0)
    sizes, which = np.unique(count, return_inverse=True)
    k = np.maximum(sizes / S1_SPECKLE_CORRELATION, 1.0)
    limit = stats.f.ppf(1.0 - candidate_false_alarm, 2 * S1_ENL * k, 2 * S1_ENL * k * n_ref)[which]
    statistic = (100.0 * ratio / limit).astype(np.float32)
    candidate = (statistic > 100.0) & (count > 0)
    picked = at[candidate]
    n = picked.size
    if n == 0:
        empty = np.zeros(0)
        return RadarRegions(candidate, statistic, np.zeros(0, np.intp), empty, empty)
    # 8-connected regions of candidates: an edge to every candidate among the 3 x 3 neighbours.
    index = np.full(cur.shape[0] + 1, -1, np.intp)  # zone position -> candidate number; the pad reads -1
    index[picked] = np.arange(n)
    neighbours = index[win[candidate][:, [c for c in square_columns(3) if c != column(0, 0)]]]
    rows, cols = np.nonzero(neighbours >= 0)
    graph = coo_matrix((np.ones(rows.size, np.int8), (rows, neighbours[rows, cols])), shape=(n, n))
    n_regions, label = connected_components(graph, directed=False)
    size = np.bincount(label, minlength=n_regions).astype(np.float64)
    sum_cur = np.bincount(label, weights=cur[picked].astype(np.float64), minlength=n_regions)
    sum_ref = np.bincount(label, weights=scaled_ref[picked].astype(np.float64), minlength=n_regions)
    d1 = 2.0 * S1_ENL * np.maximum(size / S1_SPECKLE_CORRELATION, 1.0)
    mean, var = _log_f_moments(d1, d1 * n_ref)
    z = (np.log(sum_cur / sum_ref) - mean) / np.sqrt(var)
    return RadarRegions(candidate, statistic, label.astype(np.intp), size, z)


def radar_region_threshold(size: npt.NDArray[np.float64], n_ref: int) -> npt.NDArray[np.float64]:
    """The z a candidate region of ``size`` pixels must pass (:data:`RADAR_REGION_Z`)."""
    row = np.asarray(RADAR_REGION_Z[min(max(int(n_ref), 1), max(RADAR_REGION_Z))], np.float64)
    return np.asarray(row[np.searchsorted(np.asarray(RADAR_REGION_SIZES), size, side="left")], np.float64)


def radar_reference(scenes: Sequence[dict[str, F32]], track: B, bands: Sequence[str] = ("VV", "VH"),
                    where: B | None = None) -> dict[str, F32]:
    """Per-pixel median of same-geometry scenes, each scaled to the same median level on the track.

    The median keeps a car that stood in one reference scene out of the reference; the scaling
    removes calibration and moisture differences between the reference scenes. Pixel by pixel: the
    arrays may be whole grids or pixel vectors over a zone. ``where`` limits the pixels computed (NaN
    elsewhere): the radar test reads the reference on the track only. It must cover ``track``, so that
    each scene is read at those pixels only, its track level included.
    """
    if where is not None and np.count_nonzero(track & ~where):
        raise ValueError("where must cover the track")

    def computed(v: npt.NDArray[_S]) -> npt.NDArray[_S]:
        return v if where is None else v[where]

    on_track = computed(track)
    out: dict[str, F32] = {}
    for b in bands:
        layers = []
        for s in scenes:
            a = computed(s[b]).astype(np.float32)
            ok = np.isfinite(a) & (a > 0)
            on = a[on_track & ok]
            z = np.where(ok, a, np.nan)
            layers.append(z / float(_median(on)) if on.size else z)
        median = nan_median(np.stack(layers))
        if where is not None:
            median, part = np.full(track.shape, np.nan, np.float32), median
            median[where] = part
        out[b] = median
    return out


def wet_snow_drop_db(current: dict[str, F32], references: Sequence[dict[str, F32]], stable: B) -> float:
    """Change (dB) of the surroundings' median VV+VH backscatter against the same-orbit references.

    Liquid water in a snowpack absorbs C-band: wet snow darkens open ground by several dB, while
    calibration and soil moisture move it by one or two (Nagler & Rott 2000 map wet snow where the
    ratio to a snow-free reference falls below -3 dB). Rolling stock does not darken the ground, so
    a scene far below its reference is wet snow, not traffic.
    """
    idx = spread_sample(stable)
    if idx.size < 50 or not references:
        return 0.0

    def level(bands: dict[str, F32]) -> float:
        v = (_at(bands["VV"], idx) + _at(bands["VH"], idx)).astype(np.float64)
        v = v[np.isfinite(v) & (v > 0)]
        return float(_median(v)) if v.size else float("nan")

    ref = float(np.nanmedian([level(r) for r in references]))
    cur = level(current)
    if not (np.isfinite(ref) and np.isfinite(cur)) or ref <= 0 or cur <= 0:
        return 0.0
    return 10.0 * float(np.log10(cur / ref))


def mean_reference(stack: Sequence[dict[str, F32]], bands: Sequence[str]) -> dict[str, F32]:
    """Per-pixel mean (linear power) of radar scenes, ignoring nodata (kept for callers and tests).

    NaN where no scene has data; computed without ``np.nanmean`` so that nothing warns (silencing a
    warning swaps the process-wide filters, which is not safe beside other threads).
    """
    out: dict[str, F32] = {}
    for b in bands:
        arr = np.stack([np.asarray(s[b], np.float32) for s in stack])
        ok = np.isfinite(arr) & (arr > 0)
        total = np.where(ok, arr, 0).sum(axis=0, dtype=np.float64)
        n = ok.sum(axis=0)
        mean = np.full(total.shape, np.nan)
        np.divide(total, n, out=mean, where=n > 0)
        out[b] = mean.astype(np.float32)
    return out


def median_reference(stack: Sequence[dict[str, F32]], bands: Sequence[str], valid: Sequence[B]) -> dict[str, F32]:
    """Per-pixel median of reference scenes, ignoring each scene's unusable pixels (no normalisation);
    NaN where none is usable (:func:`nan_median`: nothing warns)."""
    return {b: nan_median(np.stack([np.where(v, s[b], np.nan) for s, v in zip(stack, valid, strict=True)])
                          .astype(np.float32)) for b in bands}


def radar_change(
    current: dict[str, F32], reference: dict[str, F32], n_reference: int, track: B, stable: B,
    *, zone: Zone | None = None, false_alarm: float = FALSE_ALARM, window: int = RADAR_WINDOW,
    gain_quantile: float | None = None, regions: bool = RADAR_REGION_TEST,
) -> Change:
    """Ratio of backscatter (VV+VH, linear) to the same-geometry reference: a CFAR test along the track.

    Metal rolling stock brightens the track. Under speckle, the ratio of the mean of k pixels of
    the scene to the mean of the same pixels of an n-scene reference follows an F distribution
    with 2·k·ENL and 2·k·n·ENL degrees of freedom (k counted in independent samples), so the
    thresholds follow from the ENL, not from tuning. The scene gain is measured on the track: its
    lower quartile against the same distribution's (cars only ever brighten, so the lower part of the
    track's ratios is car-free), then again as the median ratio of the track pixels that a ``window``
    x ``window`` CFAR pass at ``false_alarm`` found free of cars (a full yard lights the lower quartile
    too); its occupied windows are the occupied pixels, ``false_alarm`` of the track expected false.
    ``regions=True`` (measured, not enabled: :data:`RADAR_REGION_TEST`) counts instead with
    :func:`radar_regions`: lenient 3 x 3 candidates, their 8-connected regions, each accepted whole when
    the z-score of its summed ratio passes :data:`RADAR_REGION_Z` for its size; every candidate of an
    accepted region is occupied, and no false alarms are expected (:data:`RADAR_REGION_FALSE_PIXELS`).
    ``stable`` is only used for a diagnostic. The arrays are pixel vectors over ``zone``, whose windows
    cover ``track``; without a zone they are whole grids, and so is the change returned.
    """
    if zone is None:
        whole = Zone.whole(track)
        return radar_change(_vectors(current), _vectors(reference), n_reference, track.reshape(-1),
                            stable.reshape(-1), zone=whole, false_alarm=false_alarm, window=window,
                            gain_quantile=gain_quantile, regions=regions).on_grid(whole)
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
    single = (2 * S1_ENL, 2 * n_ref * S1_ENL)  # the F law of one pixel's ratio
    q = RADAR_GAIN_QUANTILE if gain_quantile is None else gain_quantile
    gain = float(np.quantile(ratio[track], q)) / _f_ppf(q, *single)
    # Ratio of local means over the track pixels of the window (speckle averages, a consist does not).
    at = np.flatnonzero(track)
    win = zone.windows(at)
    # Scene and reference side by side: one pass over the windows, each column summed as on its own.
    local, _ = _window_mean(np.stack([cur, ref], axis=-1), zone.window_sums(at, square_columns(window), track))
    lc, lr = local[:, 0], local[:, 1]
    # Independent samples per window: the test has always counted the whole window (window² pixels),
    # not only its track pixels; kept as it is so that the detector's figures do not move.
    samples = max(window * window / S1_SPECKLE_CORRELATION, 1.0)
    threshold = _f_ppf(1.0 - false_alarm, 2 * S1_ENL * samples, 2 * S1_ENL * samples * n_ref)
    near = win[:, diamond_columns(window // 2)]
    stat = np.zeros(at.size, np.float32)
    excess = np.zeros_like(cur)
    for step in range(1 + RADAR_GAIN_REFINE):
        if step:
            # Refine the gain on the track pixels away from what the last pass found occupied: with many
            # cars (a full yard) the lower quartile itself is lit, and the first gain is too high.
            free = at[~padded(excess > 100.0, False)[near].any(axis=1)]
            if free.size >= max(30, at.size // 4):
                gain = float(_median(ratio[free])) / _f_ppf(0.5, *single)
        np.divide(lc, gain * lr, out=stat, where=lr > 0)
        # The per-pixel statistic is the ratio in per cent of its own CFAR threshold: occupied above 100.
        excess[at] = 100.0 * stat / np.float32(threshold)
    metrics["gain"] = gain
    metrics["threshold"] = 100.0
    if not regions:
        metrics["ratio_threshold"] = threshold
    st = stable & valid
    if st.sum() > 100:
        metrics["stable_ratio"] = float(_median(ratio[st]) / gain)
    if not regions:
        return _finish(excess, track, 100.0, metrics, false_alarm)
    # The region test (docs/detector.md §4): lenient candidates, their 8-connected regions, each accepted
    # or rejected as a whole by its summed ratio; every pixel of an accepted region is occupied.
    found = radar_regions(cur, (gain * ref).astype(np.float32), n_ref, track, win)
    accepted = found.z > radar_region_threshold(found.size, n_ref)
    statistic = found.statistic
    counted = np.zeros(at.size, bool)
    counted[np.flatnonzero(found.candidate)[accepted[found.label]]] = True
    # Candidates of rejected regions are shown at most at the threshold: not counted.
    statistic = np.where(counted, statistic, np.minimum(statistic, 100.0)).astype(np.float32)
    out = np.zeros_like(cur)
    out[at] = statistic
    metrics["regions"] = float(found.size.size)
    metrics["regions_accepted"] = float(np.count_nonzero(accepted))
    return _finish(out, track, 100.0, metrics, 0.0)  # no expected false alarms: see RADAR_REGION_FALSE_PIXELS


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
