"""Alert notifications: subscribers, the delivery outbox, email and webhook adapters.

The public functions live in :mod:`railwatch.alerts.outbox` and are re-exported here lazily, so
that :mod:`railwatch.config` can import the subscriber models without pulling in SQLAlchemy,
httpx and smtplib.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from railwatch.alerts.subscribers import DeliverySettings, EmailSubscriber, Subscriber, WebhookSubscriber

if TYPE_CHECKING:
    from railwatch.alerts.outbox import (
        DeliveryInfo,
        DispatchReport,
        TestResult,
        dispatch_pending,
        emit_reminders,
        enqueue,
        list_deliveries,
        retry_delivery,
        test_subscriber,
    )
    from railwatch.alerts.payload import Delivery, Notifier

__all__ = [
    "Delivery",
    "DeliveryInfo",
    "DeliverySettings",
    "DispatchReport",
    "EmailSubscriber",
    "Notifier",
    "Subscriber",
    "TestResult",
    "WebhookSubscriber",
    "dispatch_pending",
    "emit_reminders",
    "enqueue",
    "list_deliveries",
    "retry_delivery",
    "test_subscriber",
]

_LAZY = {
    "Delivery": "railwatch.alerts.payload",
    "Notifier": "railwatch.alerts.payload",
    "DeliveryInfo": "railwatch.alerts.outbox",
    "DispatchReport": "railwatch.alerts.outbox",
    "TestResult": "railwatch.alerts.outbox",
    "dispatch_pending": "railwatch.alerts.outbox",
    "emit_reminders": "railwatch.alerts.outbox",
    "enqueue": "railwatch.alerts.outbox",
    "list_deliveries": "railwatch.alerts.outbox",
    "retry_delivery": "railwatch.alerts.outbox",
    "test_subscriber": "railwatch.alerts.outbox",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'railwatch.alerts' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
