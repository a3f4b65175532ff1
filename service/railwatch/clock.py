"""One clock for the whole service, so tests and soaks can run months in seconds."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    """The real UTC clock. ``RAILWATCH_NOW`` (ISO 8601) pins it, for reproducible runs and tests."""

    def now(self) -> datetime:
        pinned = os.environ.get("RAILWATCH_NOW")
        if pinned:
            dt = datetime.fromisoformat(pinned.replace("Z", "+00:00"))
            return dt if dt.tzinfo else dt.replace(tzinfo=UTC)
        return datetime.now(UTC)


class FixedClock:
    """A clock that only moves when told to."""

    def __init__(self, start: datetime) -> None:
        self._now = start

    def now(self) -> datetime:
        return self._now

    def set(self, when: datetime) -> None:
        self._now = when
