"""The activity chart draws the analysts' counts that `railwatch calibrate` recorded."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from railwatch.domain import S1, S2, Observation
from railwatch.report import _recorded_counts, activity_chart

T0 = datetime(2025, 3, 1, 2, 0, tzinfo=UTC)


def _obs(sensor: str, day: int, hour: int, cars: float, analyst: float | None = None) -> Observation:
    metrics = {"analyst_cars": analyst} if analyst is not None else {}
    return Observation("a", sensor, T0 + timedelta(days=day, hours=hour), "ok", estimated_cars=cars,
                       estimated_cars_low=cars * 0.7, estimated_cars_high=cars * 1.4, metrics=metrics)


def test_recorded_counts_are_drawn_once_per_counted_day() -> None:
    obs = [_obs(S1, 0, 20, 12.0, analyst=14), _obs(S2, 0, 1, 11.0, analyst=14), _obs(S2, 5, 1, 13.0),
           _obs(S1, 9, 20, 40.0, analyst=52)]
    assert _recorded_counts(obs) == [(T0 + timedelta(hours=1), 14.0), (T0 + timedelta(days=9, hours=20), 52.0)]
    png = activity_chart("a", obs, [])
    assert png.startswith(b"\x89PNG") and png != activity_chart("a", obs, [], counts=[])  # counts=[]: none drawn
