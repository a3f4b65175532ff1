"""Rolling robust baseline and the alert rule (pure: observations and settings in, decisions out).

Baseline: median and MAD of the usable estimates of earlier observations of the same sensor and
(for radar) the same orbit geometry within ``baseline_days``, leaving out observations that were
themselves elevated, so a surge does not raise its own baseline.

An alert opens when ``estimated_cars`` exceeds
``level + max(alert_sigma × spread, (alert_ratio − 1) × level, alert_min_cars)`` after at least
``min_history`` baseline observations. While open it updates (latest and peak), is confirmed by a
second elevated pass or by the other sensor, escalates once when an estimate reaches
``escalation_ratio`` × the opening estimate, and resolves after two consecutive usable
observations back below the midpoint between the baseline and the opening threshold.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from railwatch.config import DetectorSettings
from railwatch.domain import Observation

OPENED, CONFIRMED, ESCALATED, RESOLVED = "alert.opened", "alert.confirmed", "alert.escalated", "alert.resolved"
QUIET_TO_RESOLVE = 2


@dataclass(frozen=True)
class Baseline:
    level: float
    spread: float
    n: int


@dataclass(frozen=True)
class OpenAlert:
    """The facts about an open alert that the rule needs."""

    sensor: str
    opened_acquired: datetime
    opening_cars: float
    peak_cars: float
    state: str
    escalated: bool
    quiet_count: int = 0


@dataclass(frozen=True)
class Decision:
    elevated: bool
    baseline: Baseline | None
    threshold: float | None
    events: tuple[str, ...] = ()
    quiet_count: int = 0
    notes: dict[str, Any] = field(default_factory=dict)


def history_for(obs: Observation, observations: Sequence[Observation], cfg: DetectorSettings) -> list[Observation]:
    """Earlier usable observations comparable with ``obs`` (same sensor and geometry) in the window."""
    start = obs.acquired - timedelta(days=cfg.baseline_days)
    return [
        o
        for o in observations
        if o.collection == obs.collection
        and o.geometry_key == obs.geometry_key
        and start <= o.acquired < obs.acquired
        and o.usable
    ]


def compute_baseline(history: Sequence[Observation]) -> Baseline | None:
    vals = [float(o.estimated_cars) for o in history if o.estimated_cars is not None and not o.metrics.get("elevated")]
    if not vals:
        return None
    level = statistics.median(vals)
    mad = statistics.median([abs(v - level) for v in vals])
    # Floor the spread at Poisson-like counting noise so a very steady history is not hair-trigger.
    spread = max(1.4826 * mad, (level + 1.0) ** 0.5, 1.0)
    return Baseline(level=level, spread=spread, n=len(vals))


def alert_threshold(b: Baseline, cfg: DetectorSettings) -> float:
    return b.level + max(cfg.alert_sigma * b.spread, (cfg.alert_ratio - 1.0) * b.level, cfg.alert_min_cars)


def decide(obs: Observation, baseline: Baseline | None, alert: OpenAlert | None, cfg: DetectorSettings) -> Decision:
    """What this observation means for the AOI's activity alert."""
    if not obs.usable or obs.estimated_cars is None:
        return Decision(False, baseline, None, (), alert.quiet_count if alert else 0)
    if baseline is None or baseline.n < cfg.min_history:
        return Decision(False, baseline, None, (), alert.quiet_count if alert else 0,
                        {"why": f"baseline has {baseline.n if baseline else 0} of {cfg.min_history} observations"})
    est = float(obs.estimated_cars)
    thr = alert_threshold(baseline, cfg)
    elevated = est > thr
    if alert is None:
        return Decision(elevated, baseline, thr, (OPENED,) if elevated else ())
    events: list[str] = []
    if elevated:
        second_pass = obs.collection != alert.sensor or obs.acquired != alert.opened_acquired
        if alert.state == "provisional" and second_pass:
            events.append(CONFIRMED)
        if not alert.escalated and est >= cfg.escalation_ratio * alert.opening_cars:
            events.append(ESCALATED)
        return Decision(True, baseline, thr, tuple(events), 0)
    calm = est < baseline.level + 0.5 * (thr - baseline.level)
    quiet = alert.quiet_count + 1 if calm else alert.quiet_count
    if quiet >= QUIET_TO_RESOLVE:
        return Decision(False, baseline, thr, (RESOLVED,), quiet)
    return Decision(False, baseline, thr, (), quiet)
