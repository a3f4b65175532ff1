"""Calibration of the physical car model with analysts' counts (pure: rows in, a scale out).

An analyst counts the rail cars on some days (``acquired,cars`` in a CSV file, ISO date or datetime,
UTC). Each count is matched to the same UTC day's usable scenes of each sensor; per sensor, the
scale that maps the physical model's raw estimate onto the counts is fitted robustly in log space,

    log(1 + cars) ≈ log(1 + scale · raw),        scale = argmin Σ |residual| / b + log(scale)² / (2 · σ₀²)

an L1 fit (a Laplace error of standard deviation ``PRIOR_LOG_SIGMA``, b = that / √2) with a Gaussian prior
on log(scale) centred on the physical model (σ₀ = ``SCALE_PRIOR_LOG_SIGMA``, its own stated uncertainty:
a factor of about two). Between the counts' own kinks the L1 cost changes by 2 / b per unit of log(scale),
so counts that agree fix the scale alone; the prior only holds back a scale that barely any count
supports — one count on a raw estimate of half a car cannot drag the model by a factor of 20.

The residual spread (the model error that remains) is the standard deviation of those residuals,
shrunk towards a prior so that three counts cannot claim a precision they do not have:

    sigma² = (PRIOR_WEIGHT · PRIOR_LOG_SIGMA² + Σ residual²) / (PRIOR_WEIGHT + n − 1)

The estimate's 80 % interval then uses ``sigma · sqrt(1 + 1/n)`` (the scale itself is uncertain).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

from railwatch.detect.estimate import UNCALIBRATED_LOG_SIGMA

#: Prior model error after calibration, std of log(1 + cars): what one sensor's occupancy count
#: typically misses from scene to scene (car types, sub-pixel mixing, which tracks are used).
PRIOR_LOG_SIGMA = 0.35
#: Weight of that prior, in counts (a few counts do not outweigh it, dozens do).
PRIOR_WEIGHT = 4.0
#: Scales are searched in this range (the physical model is not off by more than a factor of 20).
SCALE_RANGE = (0.05, 20.0)
#: Prior standard deviation of log(scale) around the uncalibrated physical model (scale 1): the model's own
#: uncertainty, a factor of about two.
SCALE_PRIOR_LOG_SIGMA = UNCALIBRATED_LOG_SIGMA


class CountsError(ValueError):
    """A counts file that cannot be read; the message names the file, the line and what to fix."""


@dataclass(frozen=True)
class Count:
    """One analyst count: the UTC day (and time, if given) and the number of cars."""

    acquired: datetime
    cars: float
    has_time: bool = False

    @property
    def day(self) -> date:
        return self.acquired.date()


@dataclass(frozen=True)
class Calibration:
    """A fitted per-sensor calibration."""

    scale: float
    log_sigma: float  # model error used for intervals (already includes the scale's own uncertainty)
    n: int
    residual_sd: float  # spread of the fit's own residuals (diagnostic)
    #: The scale the counts alone give (the plain L1 fit, without the prior): far from ``scale`` when the
    #: counts barely support a scale (raw estimates near 0), which ``calibrate`` reports.
    counts_scale: float | None = None


def _parse_time(text: str) -> tuple[datetime, bool]:
    t = text.strip()
    if not t:
        raise ValueError("empty")
    if len(t) == 10:
        d = date.fromisoformat(t)
        return datetime(d.year, d.month, d.day, 12, tzinfo=UTC), False
    dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    return dt, True


def read_counts(source: Path | str | io.TextIOBase) -> list[Count]:
    """Counts from a CSV with columns ``acquired,cars`` (ISO date or datetime, UTC; cars ≥ 0).

    Every problem is collected and reported together with its line number.
    """
    name = str(source) if isinstance(source, (str, Path)) else "counts"
    try:
        text = Path(source).read_text(encoding="utf-8-sig") if isinstance(source, (str, Path)) else source.read()
    except OSError as exc:
        raise CountsError(f"{name}: cannot read: {exc.strerror}") from exc
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip() for f in (reader.fieldnames or [])]
    missing = [c for c in ("acquired", "cars") if c not in fields]
    if missing:
        raise CountsError(f"{name}: missing column(s) {', '.join(missing)}; expected a header 'acquired,cars'")
    out: list[Count] = []
    problems: list[str] = []
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not any(row.values()):
            continue
        try:
            when, has_time = _parse_time(row["acquired"])
        except ValueError:
            problems.append(f"line {line}: acquired {row['acquired']!r} is not an ISO date or datetime (YYYY-MM-DD)")
            continue
        try:
            cars = float(row["cars"])
        except ValueError:
            problems.append(f"line {line}: cars {row['cars']!r} is not a number")
            continue
        if not math.isfinite(cars) or cars < 0:
            problems.append(f"line {line}: cars must be a number ≥ 0, got {row['cars']!r}")
            continue
        out.append(Count(when, cars, has_time))
    if problems:
        raise CountsError(f"{name}: " + "; ".join(problems))
    if not out:
        raise CountsError(f"{name}: no counts (expected rows 'acquired,cars')")
    return out


def assign_counts(
    counts: Iterable[Count], scenes: Sequence[tuple[str, datetime]],
) -> tuple[dict[tuple[str, datetime], float], list[Count]]:
    """Which scenes ``(sensor, acquired)`` each count describes, and the counts that match none.

    A count is matched to the same UTC day's scenes of each sensor: with a time, to the closest
    scene of each sensor that day; with a date only, to every scene of that day. A later count for
    the same scene wins.
    """
    by_day: dict[date, list[tuple[str, datetime]]] = {}
    for sensor, acquired in scenes:
        by_day.setdefault(acquired.astimezone(UTC).date(), []).append((sensor, acquired))
    out: dict[tuple[str, datetime], float] = {}
    unmatched: list[Count] = []
    for c in counts:
        same = by_day.get(c.day, [])
        if not same:
            unmatched.append(c)
            continue
        if c.has_time:
            closest: dict[str, tuple[str, datetime]] = {}
            for sensor, acquired in same:
                best = closest.get(sensor)
                if best is None or abs(acquired - c.acquired) < abs(best[1] - c.acquired):
                    closest[sensor] = (sensor, acquired)
            same = list(closest.values())
        for key in same:
            out[key] = c.cars
    return out, unmatched


def fit_scale(pairs: Sequence[tuple[float, float]], *, prior_log_sigma: float = PRIOR_LOG_SIGMA,
              prior_weight: float = PRIOR_WEIGHT,
              scale_prior_log_sigma: float | None = SCALE_PRIOR_LOG_SIGMA) -> Calibration:
    """Scale and model error from ``(raw, cars)`` pairs: robust (L1) in log(1 + ·) space, held near the
    physical model by a prior on log(scale) (``scale_prior_log_sigma``; None: the plain L1 fit)."""
    if not pairs:
        raise ValueError("no matched counts to calibrate with")
    raw = np.array([max(0.0, float(r)) for r, _ in pairs])
    cars = np.array([max(0.0, float(c)) for _, c in pairs])
    if not np.any(raw > 0):
        raise ValueError("every matched scene has a raw estimate of 0: nothing to scale")
    grid = np.exp(np.linspace(math.log(SCALE_RANGE[0]), math.log(SCALE_RANGE[1]), 2001))
    resid = np.log1p(cars)[None, :] - np.log1p(grid[:, None] * raw[None, :])
    b = PRIOR_LOG_SIGMA / math.sqrt(2.0)  # the Laplace scale of one count's log error
    cost = np.abs(resid).sum(axis=1) / b
    if scale_prior_log_sigma is not None:
        cost += np.log(grid) ** 2 / (2.0 * scale_prior_log_sigma**2)

    def argmin(c: npt.NDArray[np.float64]) -> float:
        best = np.flatnonzero(c <= c.min() + 1e-9)
        return float(np.exp(np.mean(np.log(grid[best]))))  # the middle of a flat minimum (the plain L1 fit's)

    scale = argmin(cost)
    plain = argmin(np.abs(resid).sum(axis=1) / b) if scale_prior_log_sigma is not None else scale
    r = np.log1p(cars) - np.log1p(scale * raw)
    n = len(pairs)
    ss = float(np.sum(r**2))
    sigma = math.sqrt((prior_weight * prior_log_sigma**2 + ss) / (prior_weight + max(n - 1, 0)))
    return Calibration(scale=scale, log_sigma=sigma * math.sqrt(1.0 + 1.0 / n), n=n,
                       residual_sd=float(np.std(r)) if n > 1 else 0.0, counts_scale=plain)


#: A geometry needs this many usable scenes before its level is compared with the others'.
GEOMETRY_MIN_SCENES = 6
#: Geometries are not assumed to differ by more than this factor (a wilder ratio is a broken archive).
GEOMETRY_FACTOR_RANGE = (0.25, 4.0)
#: Separator of the per-geometry calibration keys (``sentinel-1-grd|descending:61``).
GEOMETRY_SEP = "|"


def geometry_key_of(sensor: str, geometry: str) -> str:
    """The calibration key of one radar geometry of ``sensor``."""
    return f"{sensor}{GEOMETRY_SEP}{geometry}"


def geometry_factors(rows: Iterable[tuple[str, float]], *, min_scenes: int = GEOMETRY_MIN_SCENES) -> dict[str, float]:
    """Per geometry, the factor that brings its raw counts to the sensor's common level.

    Ascending and descending passes (and different relative orbits) see the same yard under
    different incidence and aspect angles, so the same cars light a different number of pixels. Over
    months every geometry sees the same traffic, so the ratio of their usual raw counts (medians of
    ``(geometry, raw)`` over the usable scenes: robust to the surges and outliers every geometry
    shares) is their relative sensitivity. Each geometry is scaled to the median raw count of all
    scenes; a geometry with fewer than ``min_scenes`` scenes, or whose median is 0, keeps 1.
    """
    by: dict[str, list[float]] = {}
    for g, raw in rows:
        by.setdefault(g, []).append(max(0.0, float(raw)))
    pooled = [v for vs in by.values() for v in vs]
    if len(by) < 2 or not pooled:
        return {g: 1.0 for g in by}
    common = float(np.median(pooled))
    out: dict[str, float] = {}
    for g, vs in by.items():
        med = float(np.median(vs))
        if len(vs) < min_scenes or med <= 0 or common <= 0:
            out[g] = 1.0
        else:
            out[g] = float(np.clip(common / med, *GEOMETRY_FACTOR_RANGE))
    return out
