"""The freshness watch, pure: how often each sensor should bring a usable scene, and when an AOI is stale.

An AOI is *stale* when railwatch has been blind there for too long: no new usable scene (quality
status ``ok``/``partial``) from its sensors for ``stale_after_revisits`` x the sensor's
expected revisit. With ``scope="all"`` (the default) every sensor of the AOI must be overdue, so a
cloudy month for Sentinel-2 while Sentinel-1 still sees the tracks is not stale; ``scope="any"``
raises it as soon as one sensor is overdue. No I/O and no clock here: ``now`` is an argument.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from railwatch.domain import S1, S2, iso, utc

#: Expected days between usable acquisitions. Sentinel-2A/B/C: 5 days at the equator, less at
#: higher latitudes. Sentinel-1: 12-day repeat per orbit geometry; with both ascending and descending
#: passes (or two satellites, S1A + S1C) a border crossing is seen about every 6 days.
DEFAULT_REVISIT_DAYS: Mapping[str, float] = {S2: 5.0, S1: 6.0}
DEFAULT_STALE_AFTER_REVISITS = 3.0

Scope = Literal["all", "any"]


@dataclass(frozen=True)
class SensorFreshness:
    """One sensor of one AOI: its last usable scene and when it becomes overdue."""

    sensor: str
    revisit_days: float
    last_usable: datetime | None
    #: ``last_usable`` (or the time watching began) + one revisit: when the next scene was expected.
    expected_by: datetime | None
    #: ``last_usable`` (or the time watching began) + stale_after_revisits x revisit.
    overdue_after: datetime | None
    overdue: bool

    def as_dict(self) -> dict[str, Any]:
        return {"sensor": self.sensor, "revisit_days": self.revisit_days, "last_usable": iso(self.last_usable),
                "expected_by": iso(self.expected_by), "overdue_after": iso(self.overdue_after),
                "overdue": self.overdue}


@dataclass(frozen=True)
class Verdict:
    """Whether an AOI is stale at ``now``, with the evidence an alert carries."""

    aoi_id: str
    now: datetime
    stale: bool
    #: The newest usable acquisition over all sensors (None when there has never been one).
    last_usable: datetime | None
    #: When the next usable scene was due: the latest sensor's due time (``all``), the earliest (``any``).
    expected_by: datetime | None
    #: When the AOI becomes (or became) stale; None when it cannot be judged.
    stale_after: datetime | None
    sensors: tuple[SensorFreshness, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        return {"aoi": self.aoi_id, "now": iso(self.now), "stale": self.stale, "last_usable": iso(self.last_usable),
                "expected_by": iso(self.expected_by), "stale_after": iso(self.stale_after),
                "sensors": [s.as_dict() for s in self.sensors]}


def revisit_for(sensor: str, revisit_days: Mapping[str, float] | None = None) -> float:
    """Expected days between usable scenes of ``sensor`` (configured, else the default, else 12)."""
    table = revisit_days if revisit_days is not None else DEFAULT_REVISIT_DAYS
    return float(table.get(sensor, DEFAULT_REVISIT_DAYS.get(sensor, 12.0)))


def judge(
    aoi_id: str,
    now: datetime,
    sensors: Sequence[str],
    last_usable: Mapping[str, datetime | None],
    *,
    revisit_days: Mapping[str, float] | None = None,
    stale_after_revisits: float = DEFAULT_STALE_AFTER_REVISITS,
    scope: Scope = "all",
    watching_since: datetime | None = None,
) -> Verdict:
    """Decide whether ``aoi_id`` is stale at ``now``.

    ``last_usable`` maps a sensor to the acquisition time of its newest usable scene. A sensor with
    none is measured from ``watching_since`` (when railwatch started watching the AOI); without
    that it cannot be judged and never counts as overdue.
    """
    if stale_after_revisits <= 0:
        raise ValueError(f"stale_after_revisits must be > 0, got {stale_after_revisits}")
    now = utc(now)
    since = utc(watching_since) if watching_since is not None else None
    per: list[SensorFreshness] = []
    for sensor in sensors:
        revisit = revisit_for(sensor, revisit_days)
        last = last_usable.get(sensor)
        last = utc(last) if last is not None else None
        anchor = last if last is not None else since
        if anchor is None:
            per.append(SensorFreshness(sensor, revisit, None, None, None, False))
            continue
        expected = anchor + timedelta(days=revisit)
        overdue_after = anchor + timedelta(days=revisit * stale_after_revisits)
        per.append(SensorFreshness(sensor, revisit, last, expected, overdue_after, now > overdue_after))
    judged = [p for p in per if p.overdue_after is not None]
    if not judged:
        stale, stale_after = False, None
    elif scope == "any":
        stale = any(p.overdue for p in judged)
        stale_after = min(p.overdue_after for p in judged if p.overdue_after is not None)
    else:
        # Blind only when every sensor is overdue: a sensor that cannot be judged keeps it fresh.
        stale = len(judged) == len(per) and all(p.overdue for p in judged)
        stale_after = max(p.overdue_after for p in judged if p.overdue_after is not None)
    lasts = [p.last_usable for p in per if p.last_usable is not None]
    expecteds = [p.expected_by for p in per if p.expected_by is not None]
    return Verdict(
        aoi_id=aoi_id, now=now, stale=stale,
        last_usable=max(lasts) if lasts else None,
        expected_by=(min(expecteds) if scope == "any" else max(expecteds)) if expecteds else None,
        stale_after=stale_after,
        sensors=tuple(per),
    )


#: What :func:`transition` asks the caller to do.
Action = Literal["open", "resolve", "none"]


def transition(verdict: Verdict, alert_open: bool) -> Action:
    """``open`` a stale alert, ``resolve`` the open one, or do nothing."""
    if verdict.stale and not alert_open:
        return "open"
    if not verdict.stale and alert_open:
        return "resolve"
    return "none"
