"""Rail cars from occupied track pixels: a physical model with an honest interval.

Occupied track length = (occupied pixels − expected false alarms) × metres of track per track
pixel (total centreline length / track pixels, so parallel sidings sharing a pixel count twice).
Cars = occupied length / car length (~15 m over buffers), scaled to the whole track when only a
clear part was seen, times the per-AOI, per-sensor calibration scale (1 without calibration).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: z of the two-sided 80 % normal interval.
Z80 = 1.2816
#: Relative model error without calibration (car types, contrast, mixing): a wide, honest default.
UNCALIBRATED_REL_SIGMA = 0.45


@dataclass(frozen=True)
class CarEstimate:
    cars: float
    low: float
    high: float
    raw: float  # before calibration


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
) -> CarEstimate:
    """Cars on the whole track with an 80 % interval (counting noise and model error combined)."""
    if n_usable <= 0:
        raise ValueError("no usable track pixels")
    cover = n_track / n_usable
    per_px = metres_per_pixel / car_length_m * cover
    raw = max(0.0, n_occupied - expected_false) * per_px
    cars = raw * scale
    rel = UNCALIBRATED_REL_SIGMA if rel_sigma is None else rel_sigma
    sd_count = math.sqrt(n_occupied + expected_false) * per_px * scale
    sd = math.sqrt(sd_count**2 + (rel * cars) ** 2)
    return CarEstimate(cars=cars, low=max(0.0, cars - Z80 * sd), high=cars + Z80 * sd, raw=raw)
