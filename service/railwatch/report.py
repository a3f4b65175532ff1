"""Pictures for people: the activity chart (estimated cars per sensor vs the baseline, alerts marked).

Pure: observations and alert rows in, PNG bytes out (matplotlib, Agg backend). The quicklooks,
change GeoJSON and the HTML report are in :mod:`railwatch.evidence`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from railwatch.domain import S1, S2, Observation, utc

SENSOR_STYLE = {S2: ("Sentinel-2 (optical)", "tab:blue", "o"), S1: ("Sentinel-1 (radar)", "tab:orange", "s")}
#: Scenes without an estimate, drawn in a strip at the top: status -> (height in axes fraction, marker, label).
UNUSABLE_STYLE: dict[str, tuple[float, str, str]] = {
    "cloudy": (0.975, "^", "cloudy"),
    "haze": (0.95, "v", "haze"),
    "snow": (0.925, "*", "snow"),
    "nodata": (0.90, "x", "no data"),
    "unreadable": (0.875, "X", "unreadable / failed"),
    "failed": (0.875, "X", "unreadable / failed"),
}
#: Kept for callers of the first version (height of each unusable status as a share of the y range).
UNUSABLE_Y = {k: v[0] for k, v in UNUSABLE_STYLE.items()}
STATE_COLOUR = {"provisional": "#f4a261", "confirmed": "#e63946", "resolved": "#adb5bd", "dismissed": "#dee2e6"}


def _count_points(counts: Iterable[Any] | None) -> list[tuple[datetime, float]]:
    """Analyst counts as (time, cars): tuples, mappings or objects with ``acquired``/``cars``."""
    out: list[tuple[datetime, float]] = []
    for c in counts or ():
        if isinstance(c, Mapping):
            when, cars = c.get("acquired") or c.get("date"), c.get("cars", c.get("count"))
        elif isinstance(c, (tuple, list)):
            when, cars = c[0], c[1]
        else:
            when = getattr(c, "acquired", None) or getattr(c, "date", None)
            cars = getattr(c, "cars", getattr(c, "count", None))
        if isinstance(when, datetime) and cars is not None:
            out.append((utc(when), float(cars)))
    return sorted(out)


def _recorded_counts(observations: Sequence[Observation]) -> list[tuple[datetime, float]]:
    """The analysts' counts `railwatch calibrate` kept on observations (``metrics["analyst_cars"]``),
    one point per counted day (a count matched to scenes of both sensors is drawn once)."""
    seen: dict[tuple[Any, float], datetime] = {}
    for o in sorted(observations, key=lambda o: o.acquired):
        cars = (o.metrics or {}).get("analyst_cars")
        if cars is not None:
            seen.setdefault((utc(o.acquired).date(), float(cars)), utc(o.acquired))
    return sorted((when, cars) for (_day, cars), when in seen.items())


def activity_chart(
    title: str,
    observations: Sequence[Observation],
    alerts: Sequence[Any],
    *,
    counts: Iterable[Any] | None = None,
    since: datetime | None = None,
) -> bytes:
    """A PNG: estimated cars per sensor with their 80 % interval, the baseline band and the alert
    threshold, alert periods shaded by state, scenes without an estimate marked by reason, and
    analysts' counts as points when given.

    ``alerts`` are objects with ``opened_acquired``, ``last_acquired``, ``resolved_at``, ``state``
    and ``id`` (store rows do; ``acknowledged_at`` marks an analyst's confirmation when present).
    ``counts``: (time, cars) pairs, mappings or objects with ``acquired``/``cars``; by default the
    counts `railwatch calibrate` recorded on the observations.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    def days(ts: Iterable[datetime]) -> npt.NDArray[np.float64]:
        return np.asarray(mdates.date2num(list(ts)), dtype=np.float64)

    def values(vs: Iterable[Any]) -> npt.NDArray[np.float64]:
        return np.asarray([np.nan if v is None else float(v) for v in vs], dtype=np.float64)

    if since is not None:
        observations = [o for o in observations if utc(o.acquired) >= utc(since)]
    fig, ax = plt.subplots(figsize=(13, 5.2), dpi=110)
    ax.xaxis_date()
    usable = [o for o in observations if o.usable]
    for sensor, (label, colour, marker) in SENSOR_STYLE.items():
        pts = sorted((o for o in usable if o.collection == sensor), key=lambda o: o.acquired)
        if not pts:
            continue
        t = days(o.acquired for o in pts)
        ax.plot(t, values(o.estimated_cars for o in pts), marker=marker, ms=4, lw=1.2, color=colour,
                label=f"{label}: estimate")
        ax.fill_between(t, values(o.estimated_cars_low or 0 for o in pts), values(o.estimated_cars_high or 0 for o in pts),
                        color=colour, alpha=0.15, lw=0, label=f"{label}: 80 % interval")
        base = [(o.acquired, float(o.metrics["baseline_cars"]), float(o.metrics.get("baseline_spread") or 0.0))
                for o in pts if o.metrics.get("baseline_cars") is not None]
        if base:
            bt = days(b[0] for b in base)
            ax.plot(bt, values(b[1] for b in base), ls="--", lw=1, color=colour, alpha=0.8,
                    label=f"{label.split()[0]}: baseline ± spread")
            ax.fill_between(bt, values(max(0.0, b[1] - b[2]) for b in base), values(b[1] + b[2] for b in base),
                            color=colour, alpha=0.08, lw=0, hatch="//", edgecolor=colour)
        thr = [(o.acquired, o.metrics.get("threshold_cars")) for o in pts if o.metrics.get("threshold_cars") is not None]
        if thr:
            ax.plot(days(b[0] for b in thr), values(b[1] for b in thr), ls=":", lw=1.1, color=colour, alpha=0.7,
                    label=f"{label.split()[0]}: alert threshold")
    analyst = _count_points(counts) if counts is not None else _recorded_counts(observations)
    if since is not None:
        analyst = [c for c in analyst if c[0] >= utc(since)]
    if analyst:
        ax.scatter(days(c[0] for c in analyst), values(c[1] for c in analyst), marker="D", s=36, color="black", zorder=5,
                   label="analyst count")
    top = max([o.estimated_cars_high or 0 for o in usable] + [c[1] for c in analyst] + [10.0]) * 1.18
    ax.set_ylim(0, top)
    shown: set[str] = set()
    for a in alerts:
        if a.opened_acquired is None:
            continue
        end = a.resolved_at or a.last_acquired or a.opened_acquired
        end = max(end, a.opened_acquired + timedelta(days=1))
        if since is not None and utc(end) < utc(since):
            continue
        lab = f"alert ({a.state})" if a.state not in shown else None
        shown.add(a.state)
        x0, x1 = days([a.opened_acquired, end])
        ax.axvspan(float(x0), float(x1), color=STATE_COLOUR.get(a.state, "#f4a261"), alpha=0.25, label=lab,
                   hatch="xx" if a.state == "dismissed" else None)
        mark = " ✓" if getattr(a, "acknowledged_at", None) and a.state != "dismissed" else ""
        mark = " ✗" if a.state == "dismissed" else mark
        ax.annotate(f"#{a.id}{mark}", (float(x0), 0.83), xycoords=ax.get_xaxis_transform(), fontsize=8,
                    va="top")
    tr = ax.get_xaxis_transform()  # x in data, y in axes fraction: the strip stays put whatever the y range
    by_label: dict[str, list[Observation]] = {}
    for o in observations:
        if o.usable:
            continue
        style = UNUSABLE_STYLE.get(o.status)
        key = style[2] if style else "no estimate yet (building the reference)"
        by_label.setdefault(key, []).append(o)
    for label, obs in by_label.items():
        style = UNUSABLE_STYLE.get(obs[0].status)
        y, marker = (style[0], style[1]) if style else (0.02, "|")
        ax.scatter(days(o.acquired for o in obs), values([y] * len(obs)), transform=tr, marker=marker, s=22, color="dimgrey",
                   label=f"scene without estimate: {label}")
    times = [o.acquired for o in observations] + [c[0] for c in analyst]
    if times:  # markers drawn in axes units do not widen the x range by themselves
        lo, hi = days([min(times) - timedelta(days=2), max(times) + timedelta(days=2)])
        ax.set_xlim(float(lo), float(hi))
    ax.set_title(title)
    ax.set_ylabel("estimated rail cars")
    ax.set_xlabel("acquisition date (UTC)")
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    if not observations:
        ax.text(0.5, 0.5, "no scenes in this period", transform=ax.transAxes, ha="center", va="center")
    fig.autofmt_xdate()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_chart(
    path: Path,
    title: str,
    observations: Sequence[Observation],
    alerts: Sequence[Any],
    *,
    counts: Iterable[Any] | None = None,
    since: datetime | None = None,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(activity_chart(title, observations, alerts, counts=counts, since=since))
    return path
