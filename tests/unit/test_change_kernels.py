"""The change test's fast kernels give the very numbers of the plain numpy they replace.

The accuracy benchmark's three-count calibration turns any change in the raw estimates into
random accuracy deltas, so speed-ups of the detector are exact, not merely close — except the
window mean's sparse path, which sums in another order (float32 rounding; detector 2.4.0).
"""

from __future__ import annotations

import numpy as np
import pytest

from railwatch.detect.change import (
    FIT_MIN_ELONGATION,
    REFERENCE_FIT_PASSES,
    _median,
    _registration_costs,
    robust_fit,
)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 11, 20000, 20001])
def test_median_is_numpy_median(n: int, dtype: type) -> None:
    rng = np.random.default_rng(n)
    v = rng.normal(size=n).astype(dtype)
    v[: n // 3] = v[0]  # ties
    got = _median(v)
    assert got == np.median(v) and got.dtype == np.median(v).dtype
    rows = rng.normal(size=(5, n)).astype(dtype)
    got_rows = _median(rows)
    assert np.array_equal(got_rows, np.median(rows, axis=-1)) and got_rows.dtype == rows.dtype


def _plain_robust_fit(x: np.ndarray, y: np.ndarray, passes: int = 4) -> tuple[float, float]:
    """The fit as first written (np.median, ``passes`` clipping passes, the last one unused), with the
    elongation test of 2.5.0 (a round cloud gives an offset only)."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok].astype(np.float64), y[ok].astype(np.float64)
    if x.size < 10 or float(np.ptp(x)) < 1e-6:
        return 1.0, float(np.median(y - x)) if x.size else 0.0
    keep = np.ones(x.size, bool)
    g, o = 1.0, float(np.median(y - x))
    for _ in range(passes):
        if np.count_nonzero(keep) < 10:
            break
        xk, yk = x[keep], y[keep]
        mx, my = float(xk.mean()), float(yk.mean())
        dx, dy = xk - mx, yk - my
        sxx, syy, sxy = (float(np.einsum("i,i", a, b)) for a, b in ((dx, dx), (dy, dy), (dx, dy)))
        half = 0.5 * (sxx - syy)
        root = float(np.hypot(half, sxy))
        if 0.5 * (sxx + syy) + root < FIT_MIN_ELONGATION * (0.5 * (sxx + syy) - root):
            return 1.0, float(np.median(y - x))
        if half >= 0:
            slope = sxy / (half + root) if half + root > 0 else 0.0
        elif sxy == 0:
            break
        else:
            slope = (root - half) / sxy
        if 1.0 / np.sqrt(1.0 + slope * slope) < 1e-9:
            break
        g = slope
        o = my - g * mx
        r = (y - (g * x + o)) / np.sqrt(1.0 + g * g)
        rk = r[keep]
        s = 1.4826 * float(np.median(np.abs(rk - np.median(rk))))
        keep = np.abs(r) <= 2.5 * max(s, 1e-6)
    if not np.isfinite(g) or not 0.2 < g < 5.0:
        return 1.0, float(np.median(y - x))
    return g, o


@pytest.mark.parametrize("seed", range(40))
def test_robust_fit_is_the_plain_fit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.choice([5, 12, 200, 2001, 20000]))
    x = rng.uniform(0.02, 0.3, n).astype(np.float32)
    y = (rng.uniform(0.1, 6.0) * x + rng.normal(0, 0.01, n)).astype(np.float32)
    if seed % 3 == 0:
        y[: n // 5] += 0.1  # outliers to clip
    if seed % 5 == 0:
        x[::7] = np.nan
    if seed % 11 == 0:
        x[:] = 0.1  # no spread: the median offset
    if seed % 7 == 0:
        x = (0.14 + rng.normal(0, 0.005, n)).astype(np.float32)  # one material: a round cloud
        y = (x + 0.01 + rng.normal(0, 0.005, n)).astype(np.float32)
    passes = 3 if seed % 2 else 4
    assert robust_fit(x, y, passes) == _plain_robust_fit(x, y, passes)


@pytest.mark.parametrize("seed", range(20))
def test_a_round_cloud_of_one_material_gives_an_offset_not_an_arbitrary_gain(seed: int) -> None:
    """Pseudo-invariant pixels of one material (a bare yard): their scatter is round, its axis is noise.
    The orthogonal fit returned gains anywhere in (0.2, 5) for such clouds (on the analysis-kernel
    archive a reference band was scrambled and one scene's count doubled with the fit's sample); the
    fit is now the median offset."""
    rng = np.random.default_rng(seed)
    n = int(rng.choice([300, 1000, 5000]))
    x = (0.14 + rng.normal(0, 0.004, n)).astype(np.float32)
    y = (x + 0.012 + rng.normal(0, 0.004, n)).astype(np.float32)
    g, o = robust_fit(x, y)
    assert g == 1.0
    assert abs(o - 0.012) < 0.001


@pytest.mark.parametrize("gain", [0.9, 1.0, 1.08, 1.25])
def test_a_gain_is_measured_over_pixels_that_span_a_range(gain: float) -> None:
    """Roofs, roads and bare soil from 0.03 to 0.3: the gain is measured, to a few tenths of a per cent
    from the 1 000 pixels of a reference scene's fit."""
    rng = np.random.default_rng(7)
    x = rng.uniform(0.03, 0.3, 1000).astype(np.float32)
    y = (gain * x + 0.004 + rng.normal(0, 0.005, x.size)).astype(np.float32)
    g, o = robust_fit(x + rng.normal(0, 0.005, x.size).astype(np.float32), y, REFERENCE_FIT_PASSES)
    assert abs(g - gain) < 0.01 * gain
    assert abs(o - 0.004) < 0.003


def test_registration_costs_skip_unused_taps_exactly() -> None:
    rng = np.random.default_rng(3)
    cur = rng.normal(size=(500, 4)).astype(np.float32)
    grids = {(iy, ix): rng.normal(size=(500, 4)).astype(np.float32) for iy in (-1, 0, 1) for ix in (-1, 0, 1)}
    scale = np.full(4, 0.5, np.float32)
    steps = (-1.0, -0.75, -0.5, 0.0, 0.25, 1.0)
    offsets = [(dy, dx) for dy in steps for dx in steps]

    def read(iy: int, ix: int) -> tuple[np.ndarray, np.ndarray]:
        return grids[(iy, ix)], np.ones(500, bool)

    got = _registration_costs(offsets, cur, read, scale)
    for (dy, dx), cost in zip(offsets, got, strict=True):
        value = np.zeros_like(cur)  # every tap added, zero weights included, as before
        for iy in (-1, 0, 1):
            for ix in (-1, 0, 1):
                wy = max(0.0, 1.0 - abs(dy - iy))
                wx = max(0.0, 1.0 - abs(dx - ix))
                value += np.float32(wy * wx) * grids[(iy, ix)]
        assert cost == float(np.median(np.sum(((cur - value) / scale) ** 2, axis=-1)))


def test_the_sorting_networks_sort_every_input() -> None:
    """The 0-1 principle: a comparator network that sorts every sequence of 0s and 1s sorts everything."""
    import itertools

    from railwatch.detect.change import SORT_NETWORKS

    for k, pairs in SORT_NETWORKS.items():
        for bits in itertools.product((0, 1), repeat=k):
            v = list(bits)
            for i, j in pairs:
                v[i], v[j] = min(v[i], v[j]), max(v[i], v[j])
            assert v == sorted(v), (k, bits)


@pytest.mark.parametrize("layers", [1, 2, 5, 6, 7, 13])
def test_nan_median_is_numpy_nanmedian(layers: int) -> None:
    import warnings

    from railwatch.detect.change import nan_median

    rng = np.random.default_rng(layers)
    stack = rng.normal(size=(layers, 30, 40)).astype(np.float32)
    stack[rng.random(stack.shape) < 0.3] = np.nan
    stack[:, 0, :5] = np.nan  # no finite layer
    stack[0, 1, 0], stack[-1, 1, 1] = np.inf, -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = np.nanmedian(stack[:, 2:], axis=0)  # rows without infinities: the median of the finite layers
    got = nan_median(stack)
    assert got.shape == stack.shape[1:] and got.dtype == np.float32
    assert np.array_equal(got[2:], want.astype(np.float32), equal_nan=True)
    assert np.all(np.isnan(got[0, :5]))


@pytest.mark.parametrize("layers", [1, 2, 5, 6, 7, 13])
def test_nan_median_of_finite_stacks_is_numpy_median(layers: int) -> None:
    """Every layer finite at every pixel (clear references) takes a shortcut: the same numbers."""
    from railwatch.detect.change import nan_median

    stack = np.random.default_rng(layers).normal(size=(layers, 30, 40)).astype(np.float32)
    got = nan_median(stack)
    assert got.shape == stack.shape[1:] and got.dtype == np.float32
    assert np.array_equal(got, np.median(stack, axis=0).astype(np.float32))
    stack[0, 3, 4] = np.nan  # one pixel short of a layer: the general path, the same elsewhere
    assert np.array_equal(np.delete(nan_median(stack).reshape(-1), 3 * 40 + 4),
                          np.delete(got.reshape(-1), 3 * 40 + 4))


@pytest.mark.parametrize("share", [0.05, 0.2, 0.6])
@pytest.mark.parametrize("columns", [0, 2])
def test_window_mean_is_the_masked_mean_of_the_window(share: float, columns: int) -> None:
    """Sparse (few usable pixels) or by whole columns, the mean of the usable pixels of each window."""
    from railwatch.detect.change import _window_mean
    from railwatch.detect.zone import WindowSums

    rng = np.random.default_rng(int(share * 100) + columns)
    n_zone, n_tested, width = 500, 120, 25
    values = rng.normal(size=(n_zone, columns) if columns else n_zone).astype(np.float32)
    usable = rng.random(n_zone) < share
    taps = rng.integers(-1, n_zone, (n_tested, width)).astype(np.int32)  # -1: off the zone
    mean, count = _window_mean(values, WindowSums.build(usable, taps))
    for i in range(n_tested):
        picked = [t for t in taps[i] if t >= 0 and usable[t]]
        assert count[i] == len(picked)
        want = values[picked].astype(np.float64).mean(axis=0) if picked else np.zeros(values.shape[1:])
        assert np.allclose(mean[i], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cloud", [False, True])
@pytest.mark.parametrize("scl", [True, False])
def test_quality_on_the_zone_is_the_grid_quality_there(cloud: bool, scl: bool) -> None:
    from railwatch.detect.quality import _is, optical_quality, radar_quality
    from railwatch.detect.zone import Zone

    rng = np.random.default_rng(int(cloud) + 2 * int(scl))
    shape = (80, 90)
    track = np.zeros(shape, bool)
    track[40:43, 5:85] = True
    zone_mask = np.zeros(shape, bool)
    zone_mask[37:46, 2:88] = True
    zone_mask.reshape(-1)[::17] = True
    zone = Zone.build(zone_mask, track)
    codes = rng.choice([4, 5, 6], size=shape)
    bands = {b: rng.integers(1, 3000, size=shape).astype(np.uint16) for b in ("B02", "B03", "B04", "B08")}
    bands["B03"][40, 10:14] = 0
    if cloud:
        codes[20:38, 30:50] = 9  # a cloud off the zone whose edge reaches the track
        codes[41, 60:62] = 3
        codes[0:5, 0:5] = 11
        bands["B02"][20:38, 30:50] = bands["B04"][20:38, 30:50] = 5000
    if scl:
        bands["SCL"] = codes.astype(np.uint8)
        assert np.array_equal(_is(bands["SCL"], (3, 9, 11)), np.isin(bands["SCL"], (3, 9, 11)))
    kw = {"nodata_fraction": 0.5, "snow_fraction": 0.3, "cloudy_fraction": 0.5, "partial_fraction": 0.1}
    whole = optical_quality(bands, track, **kw)
    on_zone = optical_quality(bands, track, zone=zone, **kw)
    assert (on_zone.status, on_zone.reason, on_zone.fractions) == (whole.status, whole.reason, whole.fractions)
    assert np.array_equal(on_zone.clear, zone.gather(whole.clear))
    assert whole.fractions["cloud_edge"] > 0 or not cloud
    radar = {"VV": rng.random(shape).astype(np.float32), "VH": rng.random(shape).astype(np.float32)}
    radar["VV"][41, 10:30] = np.nan
    rwhole = radar_quality(radar, track, nodata_fraction=0.5, partial_fraction=0.01)
    rzone = radar_quality(radar, track, nodata_fraction=0.5, partial_fraction=0.01, zone=zone)
    assert (rzone.status, rzone.fractions) == (rwhole.status, rwhole.fractions)
    assert np.array_equal(rzone.clear, zone.gather(rwhole.clear))


@pytest.mark.parametrize("shift", [(0.0, 0.0), (0.25, -0.75), (-1.0, 0.5), (0.75, 0.25)])
def test_registration_finds_a_known_sub_pixel_shift(shift: tuple[float, float]) -> None:
    """The search lands on the exact shift of a smooth scene read bilinearly at that offset."""
    from scipy import ndimage

    from railwatch.detect.change import _register

    rng = np.random.default_rng(7)
    ref = np.stack([ndimage.gaussian_filter(rng.normal(size=(40, 40)), 2.5) for _ in range(4)], axis=-1)
    ref = ref.astype(np.float32)
    rows, cols = np.mgrid[3:37, 3:37].reshape(2, -1)

    def read(iy: int, ix: int) -> tuple[np.ndarray, np.ndarray]:
        return ref[rows + iy, cols + ix], np.ones(rows.size, bool)

    dy, dx = shift
    y0, x0 = int(np.floor(dy)), int(np.floor(dx))
    fy, fx = dy - y0, dx - x0
    cur = ((1 - fy) * (1 - fx) * read(y0, x0)[0] + (1 - fy) * fx * read(y0, x0 + 1)[0]
           + fy * (1 - fx) * read(y0 + 1, x0)[0] + fy * fx * read(y0 + 1, x0 + 1)[0]).astype(np.float32)
    assert _register(cur, read, np.ones(4, np.float32)) == shift


def test_mean_and_median_references_are_numpy_nan_statistics_without_warnings() -> None:
    """The evidence pictures' references: np.nanmean / np.nanmedian of the usable pixels, NaN where
    none is usable, and no warning (silencing one is not thread-safe)."""
    import warnings

    from railwatch.detect.change import mean_reference, median_reference

    rng = np.random.default_rng(3)
    scenes = [{"VV": rng.gamma(4.4, 0.01, (20, 30)).astype(np.float32)} for _ in range(5)]
    valid = [rng.random((20, 30)) < 0.7 for _ in scenes]
    for s, v in zip(scenes, valid, strict=True):
        s["VV"][~v] = 0.0  # nodata
    for v in valid:
        v[0, :4] = False  # no usable scene there
    for s in scenes:
        s["VV"][0, :4] = 0.0
    stack = np.stack([np.where(v, s["VV"], np.nan) for s, v in zip(scenes, valid, strict=True)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want_mean, want_median = np.nanmean(stack, axis=0), np.nanmedian(stack, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean = mean_reference(scenes, ["VV"])["VV"]
        median = median_reference(scenes, ["VV"], valid)["VV"]
    assert np.allclose(mean, want_mean, rtol=1e-6, equal_nan=True)
    assert np.array_equal(median, want_median.astype(np.float32), equal_nan=True)
    assert np.all(np.isnan(mean[0, :4])) and np.all(np.isnan(median[0, :4]))


def test_optical_reference_where_the_test_reads_gives_the_same_change() -> None:
    """The reference computed only where the optical test reads it (``where``: the tested pixels'
    windows; the stable pixels in the NDVI bands) gives the very change of the whole reference."""
    from railwatch.detect.change import optical_change, optical_reference
    from railwatch.detect.zone import Zone

    rng = np.random.default_rng(11)
    shape = (60, 80)
    track = np.zeros(shape, bool)
    track[28:31, 5:75] = True
    stable = np.ones(shape, bool)
    stable[24:35, :] = False
    vegetated = rng.random(shape) < 0.5

    def scene(gain: float) -> dict[str, np.ndarray]:
        nir = np.where(vegetated, 0.35, 0.18) + rng.normal(0, 0.01, shape)
        out = {b: (gain * (0.08 + 0.02 * i + rng.normal(0, 0.005, shape))).astype(np.float32)
               for i, b in enumerate(("B02", "B03", "B04"))}
        out["B08"] = (gain * nir).astype(np.float32)
        return out

    refs = [scene(g) for g in (0.9, 1.0, 1.1, 0.95)]
    clear = [rng.random(shape) < 0.9 for _ in refs]
    current = scene(1.05)
    current["B04"][29, 20:30] += 0.06  # a consist
    zone = Zone.whole(track)
    vec = {b: v.reshape(-1) for b, v in current.items()}
    flat_refs = [{b: v.reshape(-1) for b, v in r.items()} for r in refs]
    windows = zone.windows(np.flatnonzero(track))
    reads = np.zeros(track.size, bool)
    reads[windows[windows >= 0]] = True
    st = stable.reshape(-1)
    whole = optical_reference(vec, flat_refs, [c.reshape(-1) for c in clear], st)
    part = optical_reference(vec, flat_refs, [c.reshape(-1) for c in clear], st, where=reads)
    for b in whole:
        computed = np.isfinite(part[b])
        assert computed[reads].all() and np.array_equal(part[b][computed], whole[b][computed])
    assert np.isfinite(part["B04"][st]).all() and not np.isfinite(part["B02"][st]).all()
    ok_whole = np.isfinite(whole["B04"]) & np.isfinite(whole["B08"])
    ok_part = np.isfinite(part["B04"]) & np.isfinite(part["B08"])
    a = optical_change(vec, whole, track.reshape(-1) & ok_whole, st & ok_whole, zone=zone, neighbours=track.reshape(-1))
    b = optical_change(vec, part, track.reshape(-1) & ok_part, st & ok_part, zone=zone, neighbours=track.reshape(-1))
    assert a.n_occupied > 0
    assert a.metrics == b.metrics and np.array_equal(a.magnitude, b.magnitude) and np.array_equal(a.occupied, b.occupied)


def test_window_sums_are_kept_for_the_same_pixels_and_rebuilt_for_others() -> None:
    """The clear scenes of an AOI test the same pixels: their window sums are built once, and a scene whose
    usable pixels differ gets its own (compared, not trusted), with the means of a fresh build."""
    from railwatch.detect.change import _window_mean
    from railwatch.detect.zone import WindowSums, Zone, square_columns

    rng = np.random.default_rng(5)
    track = np.zeros((40, 50), bool)
    track[18:21, 3:47] = True
    zone = Zone.build(np.ones(track.shape, bool), track)
    at = np.flatnonzero(track.reshape(-1))
    usable = rng.random(track.size) < 0.3
    first = zone.window_sums(at, square_columns(7), usable)
    assert zone.window_sums(at, square_columns(7), usable.copy()) is first
    assert zone.window_sums(at, square_columns(5), usable) is not first  # another window: its own
    other = usable.copy()
    other[np.flatnonzero(usable)[0]] = False
    again = zone.window_sums(at, square_columns(7), other)
    assert again is not first
    values = rng.normal(size=(track.size, 4)).astype(np.float32)
    fresh = WindowSums.build(other, zone.windows(at)[:, square_columns(7)])
    assert all(np.array_equal(a, b) for a, b in zip(_window_mean(values, again), _window_mean(values, fresh), strict=True))
    assert zone.window_sums(at[1:], square_columns(7), other) is not again  # other tested pixels


def test_the_fit_the_reference_chooses_is_the_one_the_change_test_would() -> None:
    """optical_reference_and_fit hands optical_change the fit sample it would otherwise draw again."""
    from railwatch.detect.change import covered, fit_sample, optical_reference_and_fit

    rng = np.random.default_rng(9)
    n = 4000
    scenes = [{b: rng.uniform(0.02, 0.4, n).astype(np.float32) for b in ("B02", "B03", "B04", "B08")}
              for _ in range(4)]
    clear = [rng.random(n) < 0.9 for _ in range(3)]
    stable = rng.random(n) < 0.6
    where = rng.random(n) < 0.3
    reference, fit = optical_reference_and_fit(scenes[0], scenes[1:], clear, stable, where=where)
    assert fit is not None and fit.size > 0
    assert np.array_equal(fit, fit_sample(scenes[0], reference, stable & covered(reference)))
    assert optical_reference_and_fit(scenes[0], scenes[1:], clear, stable)[1] is None
