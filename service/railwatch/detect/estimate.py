"""Rail cars from occupied track pixels: a physical model with an honest interval.

Occupied track length = (occupied pixels − expected false alarms) × metres of centreline per lit
pixel (total centreline length / the tested pixels a consist on each centreline lights, summed over the
centrelines: ``railwatch.aoi.lit_pixels``; a yard's shared pixel stands for one track's metres).
Cars = occupied length / car length (~15 m over buffers), scaled to the whole track when
only a clear part was seen, times the per-AOI, per-sensor calibration scale (1 without calibration).

The 80 % interval is drawn in log(1 + cars): the model error (calibration residual spread, or a
wide default without calibration) and the counting noise of the occupied pixels add in quadrature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: z of the two-sided 80 % normal interval.
Z80 = 1.2816
#: Model error (standard deviation of log(1 + cars)) without calibration: the physical model
#: stands alone, its scale is known to a factor of about two (car types, contrast, sub-pixel
#: mixing), so the 80 % interval spans about ×/÷ 2.5.
UNCALIBRATED_LOG_SIGMA = 0.7
#: Kept for callers of the first version: the relative error without calibration.
UNCALIBRATED_REL_SIGMA = UNCALIBRATED_LOG_SIGMA


@dataclass(frozen=True)
class CarEstimate:
    cars: float
    low: float
    high: float
    raw: float  # before calibration
    count_sd: float  # counting noise of ``raw`` (cars, before calibration)


def estimate_cars(
    *,
    n_occupied: int,
    expected_false: float,
    n_usable: int,
    n_track: int,
    metres_per_pixel: float,
    car_length_m: float,
    scale: float = 1.0,
    rel_sigma: float | None = None,
    sensor: str | None = None,
) -> CarEstimate:
    """Cars on the whole track with an 80 % interval (model error and counting noise combined).

    ``rel_sigma`` is the model error as a standard deviation of log(1 + cars) — the calibration's
    residual spread; None means uncalibrated. ``sensor`` is informational.
    """
    if n_usable <= 0:
        raise ValueError("no usable track pixels")
    cover = n_track / n_usable
    per_px = metres_per_pixel / car_length_m * cover
    raw = max(0.0, n_occupied - expected_false) * per_px
    count_sd = math.sqrt(n_occupied + expected_false) * per_px
    return interval(raw, count_sd, scale, rel_sigma)


def interval(raw: float, count_sd: float, scale: float, log_sigma: float | None) -> CarEstimate:
    """The calibrated estimate of a raw (physical-model) count and its 80 % interval."""
    cars = raw * scale
    sigma_model = UNCALIBRATED_LOG_SIGMA if log_sigma is None else log_sigma
    sigma_count = count_sd * scale / (cars + 1.0)
    sigma = math.sqrt(sigma_model**2 + sigma_count**2)
    centre = math.log1p(cars)
    low = max(0.0, math.expm1(centre - Z80 * sigma))
    high = math.expm1(centre + Z80 * sigma)
    return CarEstimate(cars=cars, low=low, high=high, raw=raw, count_sd=count_sd)
