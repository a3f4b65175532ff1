"""Loopback test doubles of remote services: a fake Sentinel Hub and a STAC API with COG assets.

Both serve scenes from a simulated archive (``<root>/<aoi>/<collection>_<time>.tif``, as
``railwatch.imagery.synthetic.simulate`` writes it) so tests can compare what a provider
downloaded with the source pixels.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, date, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
AOI_FILE = REPO / "aoi" / "tumangang-khasan.geojson"
#: The simulated month: acquisitions from 2024-06-01 to 2024-06-30 (Sentinel-2 baseline >= 04.00).
SIM_END = date(2024, 6, 30)
SIM_DAYS = 30
SIM_SEED = 7
PERIOD = (datetime(2024, 5, 31, tzinfo=UTC), datetime(2024, 7, 1, tzinfo=UTC))


class SleepRecorder:
    """A ``sleep`` that sleeps and records how long it was asked to."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self._lock = threading.Lock()

    def __call__(self, seconds: float) -> None:
        with self._lock:
            self.calls.append(seconds)
        time.sleep(seconds)
