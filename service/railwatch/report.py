"""Pictures for people: the activity chart (estimated cars per sensor vs the baseline, alerts marked)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from railwatch.domain import S1, S2, Observation

SENSOR_STYLE = {S2: ("Sentinel-2 (optical)", "tab:blue", "o"), S1: ("Sentinel-1 (radar)", "tab:orange", "s")}
UNUSABLE_Y = {"cloudy": 0.98, "haze": 0.95, "snow": 0.92, "nodata": 0.89, "unreadable": 0.86, "failed": 0.86}
STATE_COLOUR = {"provisional": "#f4a261", "confirmed": "#e63946", "resolved": "#adb5bd", "dismissed": "#dee2e6"}


def activity_chart(title: str, observations: Sequence[Observation], alerts: Sequence[Any]) -> bytes:
    """A PNG: estimated cars per sensor with their 80 % interval, the baseline, alert periods shaded.

    ``alerts`` are objects with ``opened_acquired``, ``last_acquired``, ``resolved_at``, ``state``
    and ``id`` (store rows do).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.8), dpi=110)
    usable = [o for o in observations if o.usable]
    for sensor, (label, colour, marker) in SENSOR_STYLE.items():
        pts = sorted((o for o in usable if o.collection == sensor), key=lambda o: o.acquired)
        if not pts:
            continue
        t = [o.acquired for o in pts]
        ax.plot(t, [o.estimated_cars for o in pts], marker=marker, ms=4, lw=1.2, color=colour, label=label)
        ax.fill_between(t, [o.estimated_cars_low or 0 for o in pts], [o.estimated_cars_high or 0 for o in pts],
                        color=colour, alpha=0.15, lw=0)
        base = [(o.acquired, o.metrics.get("baseline_cars")) for o in pts if o.metrics.get("baseline_cars") is not None]
        if base:
            ax.plot([b[0] for b in base], [b[1] for b in base], ls="--", lw=1, color=colour, alpha=0.8,
                    label=f"baseline ({label.split()[0]})")
        thr = [(o.acquired, o.metrics.get("threshold_cars")) for o in pts if o.metrics.get("threshold_cars") is not None]
        if thr:
            ax.plot([b[0] for b in thr], [b[1] for b in thr], ls=":", lw=0.9, color=colour, alpha=0.6)
    top = max([o.estimated_cars_high or 0 for o in usable] + [10.0]) * 1.1
    ax.set_ylim(0, top)
    shown: set[str] = set()
    for a in alerts:
        if a.opened_acquired is None:
            continue
        end = a.resolved_at or a.last_acquired or a.opened_acquired
        end = max(end, a.opened_acquired + timedelta(days=1))
        lab = f"alert ({a.state})" if a.state not in shown else None
        shown.add(a.state)
        ax.axvspan(a.opened_acquired, end, color=STATE_COLOUR.get(a.state, "#f4a261"), alpha=0.25, label=lab)
        ax.annotate(f"#{a.id}", (a.opened_acquired, top * 0.97), fontsize=8, va="top")
    bad = [o for o in observations if not o.usable and o.status in UNUSABLE_Y]
    if bad:
        ax.scatter([o.acquired for o in bad], [UNUSABLE_Y[o.status] * top for o in bad], marker="x", s=14,
                   color="grey", label="unusable scene (cloud/haze/snow/no data)")
    ax.set_title(title)
    ax.set_ylabel("estimated rail cars")
    ax.set_xlabel("acquisition date (UTC)")
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    fig.autofmt_xdate()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_chart(path: Path, title: str, observations: Sequence[Observation], alerts: Sequence[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(activity_chart(title, observations, alerts))
    return path


