"""The notification payload: one versioned JSON document per delivery (docs/alerts.md).

Built once, when the delivery is queued, and stored with it, so a retry sends the same bytes'
worth of facts even when the alert has moved on since, and so the dispatcher needs neither the
AOI files nor the detector. Pure: no I/O, no clock.

Schema version 1 (additions keep the version; a removal or a change of meaning bumps it).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from railwatch import __version__
from railwatch.domain import TIME_FORMAT, iso, utc

__all__ = [
    "EVENT_TYPES",
    "SCHEMA_VERSION",
    "Delivery",
    "Notifier",
    "digest_payload",
    "encode",
    "event_payload",
    "headline",
    "test_payload",
]

SCHEMA_VERSION = 1

#: Alert event types a payload's ``type`` can hold, besides ``digest`` and ``test``.
EVENT_TYPES: tuple[str, ...] = (
    "alert.opened",
    "alert.confirmed",
    "alert.escalated",
    "alert.resolved",
    "alert.stale",
    "alert.reminder",
)


@dataclass(frozen=True)
class Delivery:
    """One notification to send: what a :class:`Notifier` receives."""

    key: str
    """The idempotency key: ``webhook-id``, ``delivery_id`` in the payload, part of the Message-ID."""
    subscriber: str
    event_type: str
    payload: Mapping[str, Any] = field(repr=False)
    id: int | None = None
    alert_id: int | None = None
    attempt: int = 1
    chart_png: bytes | None = field(default=None, repr=False)


class Notifier(Protocol):
    """Sends one delivery, or raises :class:`railwatch.errors.DeliveryError` (``retryable`` flag)."""

    def send(self, delivery: Delivery) -> None: ...


def _num(value: Any) -> float | None:
    """A finite number rounded to 2 decimals, or None (JSON has no NaN)."""
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return round(f, 2) if math.isfinite(f) else None


def _plain(value: Any) -> Any:
    """JSON-ready copy of a GeoJSON-like mapping (tuples become lists)."""
    return json.loads(json.dumps(value, default=list)) if value is not None else None


def _aoi_part(aoi: Any, aoi_id: str) -> dict[str, Any]:
    if aoi is None:
        return {"id": aoi_id, "name": aoi_id, "geometry": None}
    if isinstance(aoi, Mapping):
        return {"id": str(aoi.get("id") or aoi_id), "name": str(aoi.get("name") or aoi_id),
                "geometry": _plain(aoi.get("geometry"))}
    return {"id": str(aoi.id), "name": str(aoi.name or aoi.id), "geometry": _plain(aoi.geometry)}


def scene_id(sensor: str | None, acquired: datetime | None) -> str | None:
    """``<collection>_<YYYYMMDDTHHMMSSZ>``, the id :class:`railwatch.domain.SceneRef` gives a scene."""
    if not sensor or acquired is None:
        return None
    return f"{sensor}_{utc(acquired).strftime(TIME_FORMAT)}"


def event_payload(*, delivery_key: str, event: Any, alert: Any, aoi: Any) -> dict[str, Any]:
    """The payload of one alert event (``event``: an AlertEventRow, ``alert``: its AlertRow).

    ``aoi`` is a :class:`railwatch.domain.Aoi`, a mapping with ``id``/``name``/``geometry`` or None
    (then the AOI id stands for its name and the geometry is null).
    """
    data: Mapping[str, Any] = event.data or {}
    alert_data: Mapping[str, Any] = alert.data or {}
    sensor = data.get("sensor") or alert.sensor
    acquired = event.acquired
    evidence = data.get("evidence", alert_data.get("evidence", []))
    return {
        "schema_version": SCHEMA_VERSION,
        "delivery_id": delivery_key,
        "type": event.type,
        "test": False,
        "event": {
            "id": event.id,
            "type": event.type,
            "created_at": iso(event.created_at),
            "acquired": iso(acquired),
        },
        "alert": {
            "id": alert.id,
            "kind": alert.kind,
            "state": alert.state,
            "opened_acquired": iso(alert.opened_acquired),
            "last_acquired": iso(alert.last_acquired),
            "escalated": bool(alert.escalated),
        },
        "state": alert.state,
        "aoi": _aoi_part(aoi, alert.aoi_id),
        "sensor": sensor,
        "scene": (
            {"id": data.get("scene_id") or scene_id(sensor, acquired), "sensor": sensor, "acquired": iso(acquired)}
            if acquired is not None else None
        ),
        "estimated_cars": {
            "value": _num(alert.estimated_cars),
            "low": _num(alert.estimated_cars_low),
            "high": _num(alert.estimated_cars_high),
        },
        "peak_cars": _num(alert.peak_cars),
        "baseline_cars": _num(alert.baseline_cars),
        "score": _num(alert.score),
        "evidence": [str(e) for e in evidence] if isinstance(evidence, (list, tuple)) else [],
        "railwatch_version": __version__,
    }


def digest_payload(*, delivery_key: str, subscriber: str, max_per_hour: int,
                   events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several held event payloads sent as one, when a subscriber's hourly limit is reached."""
    return {
        "schema_version": SCHEMA_VERSION,
        "delivery_id": delivery_key,
        "type": "digest",
        "test": False,
        "subscriber": subscriber,
        "max_per_hour": max_per_hour,
        "events": [dict(e) for e in events],
        "railwatch_version": __version__,
    }


def test_payload(*, delivery_key: str, subscriber: str, now: datetime) -> dict[str, Any]:
    """A clearly marked test notification: ``type`` "test", ``test`` true, no alert."""
    return {
        "schema_version": SCHEMA_VERSION,
        "delivery_id": delivery_key,
        "type": "test",
        "test": True,
        "subscriber": subscriber,
        "created_at": iso(now),
        "message": "This is a test notification from railwatch. It is not an alert.",
        "railwatch_version": __version__,
    }


test_payload.__test__ = False  # type: ignore[attr-defined]  # not a pytest test, despite the name


def encode(payload: Mapping[str, Any]) -> bytes:
    """The request body: compact UTF-8 JSON with sorted keys (the bytes that are signed)."""
    return json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


_LABELS = {
    "alert.confirmed": "confirmed",
    "alert.escalated": "escalated",
    "alert.resolved": "resolved",
    "alert.stale": "stale",
}


def _oneline(text: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()


def _cars(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def headline(payload: Mapping[str, Any]) -> str:
    """``Tumangang–Khasan: 71 cars vs baseline 14 (confirmed)``: what the subject line says."""
    kind = payload.get("type")
    if kind == "test":
        return f"test notification for subscriber {payload.get('subscriber')!s} (not an alert)"
    if kind == "digest":
        n = len(payload.get("events") or [])
        return f"digest of {n} alert events (limit {payload.get('max_per_hour')} per hour)"
    aoi = _oneline(str((payload.get("aoi") or {}).get("name") or "?"))
    alert = payload.get("alert") or {}
    state = str(payload.get("state") or alert.get("state") or "")
    if alert.get("kind") == "stale" or kind == "alert.stale":
        if kind == "alert.resolved":
            return f"{aoi}: usable imagery again (stale alert resolved)"
        since = alert.get("last_acquired")
        what = f"no usable imagery since {since[:10]}" if since else "no usable imagery"
        label = "stale, reminder" if kind == "alert.reminder" else "stale"
        return f"{aoi}: {what} ({label})"
    est = (payload.get("estimated_cars") or {}).get("value")
    label = _LABELS.get(str(kind), state)
    if kind == "alert.reminder":
        label = f"{state}, reminder"
    return f"{aoi}: {_cars(est)} cars vs baseline {_cars(payload.get('baseline_cars'))} ({label})"
