"""The pixels of an AOI grid the change test reads, held as vectors, and each track pixel's window in them.

The change test only ever reads the track, a few pixels around it and a sample of stable pixels
(``railwatch.analysis.change_zone``). Keeping a scene as vectors over those pixels instead of whole
grids makes the per-scene cost and memory follow the track rather than the AOI's area
(bench/kernel.py). What the whole-grid filters used to do (a 7 x 7 mean, a bilinear read a pixel
or two away, a dilation along the track) becomes a gather through :attr:`Zone.window`, built once
per AOI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from scipy.sparse import csr_matrix

#: Half-size of the square window kept around every tested pixel: 3 covers the optical surroundings
#: (7 x 7), the radar window (5 x 5) and the sub-pixel reads of the optical test (at most 2 pixels away).
WINDOW_RADIUS = 3

#: :class:`WindowSums` sums only the usable pixels (a sparse matrix) when fewer than this share of the
#: window entries are usable, else whole columns of the window table (the same means, to float32 rounding).
SPARSE_WINDOW_SHARE = 0.4

_S = TypeVar("_S", bound=np.generic)


@dataclass(frozen=True)
class WindowSums:
    """How to sum, for each window (a row of a window table ``taps``), the ``usable`` pixels in it.

    With few usable pixels in the windows (under :data:`SPARSE_WINDOW_SHARE` of the entries: the optical
    surroundings, stable pixels only at the rim of a track's 7 x 7 window; the radar window along a
    single track) a sparse matrix (windows x zone pixels, ones where a usable pixel lies in a window,
    in the window's column order) whose product with a pixel vector adds them in float64 in the order
    a weighted ``np.bincount`` over ``np.nonzero`` of the table did, bit for bit; otherwise whole
    columns of the table are added in float32 (``matrix`` is None). Building it costs about as much as
    one use; :meth:`Zone.window_sums` keeps the last one per window shape, so that the clear scenes of
    an AOI, which test the same pixels, build it once.
    """

    taps: npt.NDArray[np.int32]
    usable: npt.NDArray[np.bool_]
    count: npt.NDArray[np.intp]  # usable pixels per window
    matrix: Any  # scipy.sparse.csr_matrix (float64), or None: add whole columns

    @classmethod
    def build(cls, usable: npt.NDArray[np.bool_], taps: npt.NDArray[np.int32]) -> WindowSums:
        ok = padded(usable, False)[taps]
        count = ok.sum(axis=1)
        if count.sum() >= SPARSE_WINDOW_SHARE * ok.size:
            return cls(taps, usable, count, None)
        rows, cols = np.nonzero(ok)
        indptr = np.zeros(taps.shape[0] + 1, np.int64)
        np.cumsum(count, out=indptr[1:])
        matrix = csr_matrix((np.ones(rows.size), taps[rows, cols], indptr), shape=(taps.shape[0], usable.size))
        return cls(taps, usable, count, matrix)

    def total(self, values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The sum of ``values`` (a pixel vector: one value, or one row of values, per pixel) over the
        usable pixels of each window (float32; 0 where there are none)."""
        if self.matrix is not None:
            flat = values.reshape(values.shape[0], -1).astype(np.float64)
            return np.asarray(self.matrix @ flat).astype(np.float32).reshape(self.taps.shape[0], *values.shape[1:])
        shape = (-1, *([1] * (values.ndim - 1)))
        masked = padded(np.where(self.usable.reshape(shape), values, 0).astype(np.float32))
        total = np.zeros((self.taps.shape[0], *values.shape[1:]), np.float32)
        for k in range(self.taps.shape[1]):
            total += masked[self.taps[:, k]]
        return total


@dataclass(frozen=True)
class Zone:
    """Some pixels of a grid (the *zone*), in row-major order, and the windows around the tested ones.

    A *pixel vector* is a 1-D array over the zone's pixels (``gather`` makes one from a grid).
    ``window[row[i]]`` lists, for a tested pixel at zone position ``i``, the zone positions of the
    (2R+1)² pixels of the square centred on it, row by row, with coordinates clipped to the grid (as
    ``scipy.ndimage``'s "nearest" edge mode reads them) and -1 where the pixel is not in the zone.
    Index -1 of a vector with one padding element appended (:func:`padded`) reads that padding.
    """

    shape: tuple[int, int]
    flat: npt.NDArray[np.intp]  # flat grid index of each zone pixel, ascending
    row: npt.NDArray[np.int32]  # per zone pixel: its row of ``window``, -1 when it is never tested
    window: npt.NDArray[np.int32]  # (tested pixels, (2R+1)²) zone positions, -1 off the zone
    # The last WindowSums per window shape, with the tested pixels it was built for (window_sums).
    _sums: dict[tuple[int, ...], tuple[npt.NDArray[np.intp], WindowSums]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def build(cls, zone: npt.NDArray[np.bool_], tested: npt.NDArray[np.bool_]) -> Zone:
        """The zone ``zone`` (a grid mask) with windows around the pixels of ``tested`` (which it must hold)."""
        shape = (int(zone.shape[0]), int(zone.shape[1]))
        flat = np.flatnonzero(zone)
        if not np.all(zone[tested]):
            raise ValueError("every tested pixel must lie in the zone")
        lookup = np.full(zone.size, -1, np.int32)  # grid -> zone position, once per AOI
        lookup[flat] = np.arange(flat.size, dtype=np.int32)
        ys, xs = np.divmod(np.flatnonzero(tested), shape[1])
        offsets = range(-WINDOW_RADIUS, WINDOW_RADIUS + 1)
        window = np.empty((ys.size, len(offsets) ** 2), np.int32)
        for k, (dy, dx) in enumerate((dy, dx) for dy in offsets for dx in offsets):
            yy = np.clip(ys + dy, 0, shape[0] - 1)
            xx = np.clip(xs + dx, 0, shape[1] - 1)
            window[:, k] = lookup[yy * shape[1] + xx]
        row = np.full(flat.size, -1, np.int32)
        row[lookup[np.flatnonzero(tested)]] = np.arange(ys.size, dtype=np.int32)
        return cls(shape, flat, row, window)

    @classmethod
    def whole(cls, tested: npt.NDArray[np.bool_]) -> Zone:
        """Every pixel of ``tested``'s grid, with windows around the tested ones (whole-grid callers)."""
        return cls.build(np.ones(tested.shape, bool), tested)

    def gather(self, grid: npt.NDArray[_S]) -> npt.NDArray[_S]:
        """The zone's pixels of a grid-shaped array, as a pixel vector."""
        return np.asarray(grid).reshape(-1)[self.flat]

    def scatter(self, values: npt.NDArray[_S], fill: float | bool) -> npt.NDArray[_S]:
        """A pixel vector back on the whole grid, ``fill`` off the zone."""
        out = np.full(self.shape[0] * self.shape[1], fill, dtype=values.dtype)
        out[self.flat] = values
        return out.reshape(self.shape)

    def windows(self, at: npt.NDArray[np.intp]) -> npt.NDArray[np.int32]:
        """The window rows of the tested pixels at zone positions ``at`` (see :func:`column`)."""
        rows = self.row[at]
        if rows.size and int(rows.min()) < 0:
            raise ValueError("a pixel without a window was tested: the zone's windows must cover the track")
        return self.window[rows]

    def window_sums(self, at: npt.NDArray[np.intp], columns: Sequence[int], usable: npt.NDArray[np.bool_]) -> WindowSums:
        """:meth:`WindowSums.build` of ``usable`` over the windows (``columns``, e.g. :func:`square_columns`)
        of the tested pixels at zone positions ``at``; the last one built for each ``columns`` is kept and
        returned again while ``at`` and ``usable`` are the same (compared, not trusted)."""
        key = tuple(columns)
        hit = self._sums.get(key)  # one entry read and written whole: safe between threads
        if hit is not None and np.array_equal(hit[0], at) and np.array_equal(hit[1].usable, usable):
            return hit[1]
        sums = WindowSums.build(usable.copy(), self.windows(at)[:, list(columns)])
        self._sums[key] = (at.copy(), sums)
        return sums


def column(dy: int, dx: int) -> int:
    """The column of :attr:`Zone.window` that holds the pixel ``dy`` rows and ``dx`` columns away."""
    if max(abs(dy), abs(dx)) > WINDOW_RADIUS:
        raise ValueError(f"the zone's windows reach {WINDOW_RADIUS} pixels, not ({dy}, {dx})")
    return (dy + WINDOW_RADIUS) * (2 * WINDOW_RADIUS + 1) + dx + WINDOW_RADIUS


def square_columns(size: int) -> list[int]:
    """Columns of :attr:`Zone.window` for a ``size`` x ``size`` square (odd ``size``) centred on the pixel."""
    return _columns(size, lambda dy, dx: True)


def diamond_columns(radius: int) -> list[int]:
    """Columns of :attr:`Zone.window` within ``radius`` 4-connected steps: what ``radius`` iterations of
    ``ndimage.binary_dilation`` with its default cross reach."""
    return _columns(2 * radius + 1, lambda dy, dx: abs(dy) + abs(dx) <= radius)


def _columns(size: int, keep: Callable[[int, int], bool]) -> list[int]:
    """Columns of :attr:`Zone.window` for the offsets of a ``size`` x ``size`` square that ``keep(dy, dx)`` accepts."""
    half = size // 2
    if size % 2 != 1:
        raise ValueError(f"windows have an odd width, not {size}")
    return [column(dy, dx) for dy in range(-half, half + 1) for dx in range(-half, half + 1) if keep(dy, dx)]


def padded(values: npt.NDArray[_S], pad: float | bool = 0) -> npt.NDArray[_S]:
    """``values`` with one element ``pad`` appended along the first axis, so that index -1 reads ``pad``."""
    extra = np.full((1, *values.shape[1:]), pad, dtype=values.dtype)
    return np.concatenate([values, extra])
