#!/usr/bin/env python3
"""The Monte Carlo behind the radar region test's thresholds (docs/detector.md §9; built, not enabled).

Pure speckle on generic track masks (single tracks 12 m wide at several angles, and yards of parallel
tracks), with per-pixel Gamma speckle of shape ENL / speckle correlation (4.4 / 2: a sum of m pixels then
carries m / 2 independent looks of ENL 4.4, what the test assumes of GRDH's 20 m resolution on 10 m
pixels), the reference the mean of n such scenes, the scene gain 1. Every candidate region
(:func:`railwatch.detect.change.radar_regions`) is recorded with its size and z-score; per size class
(``RADAR_REGION_SIZES``) the z threshold is the quantile that lets ``RADAR_REGION_FALSE_REGIONS`` / (number
of classes) false regions per 1 000 track pixels through (-10, i.e. every region, where the class holds
fewer), with the false occupied pixels that then pass. Prints the two tables of railwatch/detect/change.py
(the shipped ones: ``--reps 1000``; the region test is built but not enabled, RADAR_REGION_TEST):

    .venv/bin/python bench/radar_regions.py --reps 1000   # about 40 s on one core
    .venv/bin/python bench/radar_regions.py --check    # the false regions and pixels the shipped tables give
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import numpy.typing as npt

from railwatch.detect.change import (
    RADAR_REGION_FALSE_REGIONS,
    RADAR_REGION_SIZES,
    S1_ENL,
    S1_SPECKLE_CORRELATION,
    radar_region_threshold,
    radar_regions,
)
from railwatch.detect.zone import Zone

#: Track half-width in pixels (the service's 6 m on 10 m pixels).
HALF_WIDTH_PX = 0.6


def generic_track(shape: tuple[int, int] = (160, 400)) -> npt.NDArray[np.bool_]:
    """Single tracks at 0, 20, 45 and 70 degrees and two yards (3 and 8 parallel tracks 4.5 m apart)."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    track = np.zeros(shape, bool)

    def line(y0: float, x0: float, angle_deg: float, half: float, x_range: tuple[int, int]) -> None:
        a = np.radians(angle_deg)
        d = np.abs(-(xx - x0) * np.sin(a) + (yy - y0) * np.cos(a))
        along = (xx - x0) * np.cos(a) + (yy - y0) * np.sin(a)
        track[(d <= half) & (along >= 0) & (along <= x_range[1] - x_range[0])] = True

    line(10.3, 5, 0.0, HALF_WIDTH_PX, (5, 395))
    line(20.0, 5, 20.0, HALF_WIDTH_PX, (5, 300))
    line(30.0, 120, 45.0, HALF_WIDTH_PX, (0, 160))
    line(40.0, 250, 70.0, HALF_WIDTH_PX, (0, 120))
    for i in range(3):  # a small yard
        line(70.0 + 0.45 * i, 20, 0.0, HALF_WIDTH_PX, (20, 220))
    for i in range(8):  # a large one
        line(110.0 + 0.45 * i, 20, 0.0, HALF_WIDTH_PX, (20, 380))
    return track


def null_regions(n_ref: int, reps: int, seed: int = 0) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], int]:
    """Sizes and z-scores of every candidate region of ``reps`` pure-speckle scenes, and the track pixels."""
    track = generic_track()
    zone = Zone.whole(track)
    flat = track.reshape(-1)
    win = zone.windows(np.flatnonzero(flat))
    rng = np.random.default_rng(seed)
    shape = S1_ENL / S1_SPECKLE_CORRELATION
    sizes, zs = [], []
    for _ in range(reps):
        cur = rng.gamma(shape, 1.0 / shape, flat.size).astype(np.float32)
        ref = rng.gamma(shape * n_ref, 1.0 / (shape * n_ref), flat.size).astype(np.float32)
        found = radar_regions(cur, ref, n_ref, flat, win)
        sizes.append(found.size)
        zs.append(found.z)
    return np.concatenate(sizes), np.concatenate(zs), int(flat.sum())


def thresholds(n_ref: int, reps: int, false_regions: float = RADAR_REGION_FALSE_REGIONS) -> tuple[list[float], float]:
    size, z, n_track = null_regions(n_ref, reps)
    edges = np.asarray(RADAR_REGION_SIZES)
    cls = np.searchsorted(edges, size, side="left")
    allowed = false_regions / (edges.size + 1) * n_track / 1000.0 * reps  # false regions per class
    out = []
    for i in range(edges.size + 1):
        zi = np.sort(z[cls == i])[::-1]
        k = int(np.floor(allowed))
        out.append(float(zi[k]) if k < zi.size else -10.0)
    passed = z > np.asarray(out)[cls]
    return out, float(size[passed].sum() / reps / n_track)


def check(n_ref: int, reps: int) -> tuple[float, float]:
    """False regions per 1 000 track pixels and false occupied pixels per track pixel of the shipped tables."""
    size, z, n_track = null_regions(n_ref, reps, seed=1)
    passed = z > radar_region_threshold(size, n_ref)
    return float(passed.sum() / reps / n_track * 1000.0), float(size[passed].sum() / reps / n_track)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=400, help="simulated speckle scenes per mask and reference size (default 400)")
    ap.add_argument("--check", action="store_true",
                    help="measure the false regions and pixels the shipped tables let through, instead of deriving tables")
    ap.add_argument("--false-regions", type=float, default=RADAR_REGION_FALSE_REGIONS,
                    help="false regions per 1000 track pixels per scene (default: the shipped setting)")
    args = ap.parse_args(argv)
    if args.check:
        for n in range(1, 7):
            regions, pixels = check(n, args.reps)
            print(f"n_ref {n}: {regions:.2f} false regions per 1000 track px, {pixels:.4f} false px per track px")
        return 0
    rows, false_px = {}, {}
    for n in range(1, 7):
        rows[n], false_px[n] = thresholds(n, args.reps, args.false_regions)
    print("RADAR_REGION_Z: dict[int, tuple[float, ...]] = {")
    for n, row in rows.items():
        print(f"    {n}: ({', '.join(f'{v:.2f}' for v in row)}),")
    print("}")
    print("RADAR_REGION_FALSE_PIXELS: dict[int, float] = {")
    print("    " + ", ".join(f"{n}: {v:.4f}" for n, v in false_px.items()) + ",")
    print("}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
