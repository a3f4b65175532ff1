"""The daemon's Prometheus metrics, in a registry of their own (never the process-global one).

Counters count what this process did since it started; the ``*_timestamp_seconds`` gauges are
read from the store after each poll (unix time on railwatch's clock), so they survive restarts.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "DaemonMetrics"]

#: Job durations: a dispatcher run takes milliseconds, a first poll of a big AOI many minutes.
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class DaemonMetrics:
    """Every metric ``railwatch run`` exports on ``GET /metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.up = Gauge("railwatch_up", "1 while the scheduler runs", registry=r)
        self.start_time = Gauge("railwatch_start_time_seconds", "When the daemon started (unix time)", registry=r)
        self.aois = Gauge("railwatch_aois", "Valid AOIs being polled", registry=r)
        self.aoi_invalid = Gauge("railwatch_aoi_file_invalid",
                                 "1 for each AOI file that failed validation and is skipped", ["file"], registry=r)
        self.aoi_errors = Counter("railwatch_aoi_file_errors", "AOI files found invalid by a rescan",
                                  ["file"], registry=r)
        self.scenes = Counter("railwatch_scenes_processed", "Scenes observed, by AOI, sensor and status",
                              ["aoi", "sensor", "status"], registry=r)
        self.alerts_opened = Counter("railwatch_alerts_opened", "Alerts opened, by AOI and kind",
                                     ["aoi", "kind"], registry=r)
        self.alert_events = Counter("railwatch_alert_events", "Alert events recorded, by AOI and type",
                                    ["aoi", "type"], registry=r)
        self.deliveries = Counter("railwatch_deliveries", "Outbox deliveries, by outcome", ["outcome"], registry=r)
        self.polls = Counter("railwatch_polls", "Poll jobs, by AOI and outcome", ["aoi", "outcome"], registry=r)
        self.provider_requests = Counter("railwatch_provider_requests", "Provider requests (when it reports usage)",
                                         ["aoi", "sensor"], registry=r)
        self.provider_pu = Counter("railwatch_provider_processing_units",
                                   "Processing units spent (when the provider reports usage)", ["aoi", "sensor"],
                                   registry=r)
        self.provider_errors = Counter("railwatch_provider_errors", "Polls that stopped on a provider error",
                                       ["aoi"], registry=r)
        self.last_success = Gauge("railwatch_last_successful_poll_timestamp_seconds",
                                  "Last poll of the AOI that reached the provider without error", ["aoi"], registry=r)
        self.last_new_scene = Gauge("railwatch_last_new_scene_timestamp_seconds",
                                    "Acquisition time of the newest scene recorded for the AOI", ["aoi"],
                                    registry=r)
        self.last_usable = Gauge("railwatch_last_usable_scene_timestamp_seconds",
                                 "Acquisition time of the newest usable scene, by AOI and sensor", ["aoi", "sensor"],
                                 registry=r)
        self.stale = Gauge("railwatch_aoi_stale", "1 while the AOI has a stale (no usable data) alert open",
                           ["aoi"], registry=r)
        self.sensor_overdue = Gauge("railwatch_sensor_overdue",
                                    "1 when the sensor has brought no usable scene for stale_after_revisits revisits",
                                    ["aoi", "sensor"], registry=r)
        self.jobs = Counter("railwatch_jobs", "Jobs run, by kind and outcome", ["job", "outcome"], registry=r)
        self.jobs_skipped = Counter("railwatch_jobs_skipped",
                                    "Runs skipped because the previous run of the job was still going", ["job"],
                                    registry=r)
        self.job_duration = Histogram("railwatch_job_duration_seconds", "Job run time, by kind", ["job"],
                                      buckets=_DURATION_BUCKETS, registry=r)
        self.archive_pruned = Counter("railwatch_archive_pruned_files", "Archive scene files deleted by retention",
                                      registry=r)
        self.archive_pruned_bytes = Counter("railwatch_archive_pruned_bytes", "Bytes freed by archive retention",
                                            registry=r)
        self._usage_seen: dict[tuple[str, str, str], tuple[float, float]] = {}
        self._invalid_files: set[str] = set()
        self._sensors: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    # --- helpers the daemon calls -------------------------------------------------------------
    def set_invalid_files(self, files: Iterable[str]) -> None:
        """Make ``railwatch_aoi_file_invalid`` list exactly ``files``."""
        wanted = set(files)
        with self._lock:
            for f in self._invalid_files - wanted:
                self.aoi_invalid.remove(f)
            for f in wanted:
                self.aoi_invalid.labels(file=f).set(1)
            self._invalid_files = wanted

    def forget_aoi(self, aoi_id: str) -> None:
        """Drop the per-AOI gauges of an AOI that is no longer configured."""
        for gauge in (self.last_success, self.last_new_scene, self.stale):
            with contextlib.suppress(KeyError):
                gauge.remove(aoi_id)
        with self._lock:
            sensors = self._sensors.pop(aoi_id, set())
        for gauge in (self.last_usable, self.sensor_overdue):
            for sensor in sensors:
                with contextlib.suppress(KeyError):
                    gauge.remove(aoi_id, sensor)

    def set_overdue(self, aoi_id: str, sensor: str, overdue: bool) -> None:
        with self._lock:
            self._sensors.setdefault(aoi_id, set()).add(sensor)
        self.sensor_overdue.labels(aoi=aoi_id, sensor=sensor).set(1 if overdue else 0)

    def prime_usage(self, usage: Iterable[Any]) -> None:
        """Remember cumulative usage rows without counting them (what was spent before this process)."""
        with self._lock:
            for row in usage:
                key = (str(row.aoi_id), str(row.collection), str(row.month))
                self._usage_seen[key] = (float(row.requests), float(row.processing_units))

    def observe_usage(self, usage: Iterable[Any]) -> None:
        """Add cumulative usage rows (aoi_id, collection, month, requests, processing_units) as deltas.

        A row that went down (its source was drained) counts in full again.
        """
        with self._lock:
            for row in usage:
                key = (str(row.aoi_id), str(row.collection), str(row.month))
                req, pu = float(row.requests), float(row.processing_units)
                seen_req, seen_pu = self._usage_seen.get(key, (0.0, 0.0))
                d_req = req - seen_req if req >= seen_req else req
                d_pu = pu - seen_pu if pu >= seen_pu else pu
                self._usage_seen[key] = (req, pu)
                if d_req > 0:
                    self.provider_requests.labels(aoi=key[0], sensor=key[1]).inc(d_req)
                if d_pu > 0:
                    self.provider_pu.labels(aoi=key[0], sensor=key[1]).inc(d_pu)

    def set_timestamps(self, aoi_id: str, *, last_success: datetime | None, last_scene: datetime | None,
                       last_usable: Mapping[str, datetime | None]) -> None:
        if last_success is not None:
            self.last_success.labels(aoi=aoi_id).set(last_success.timestamp())
        if last_scene is not None:
            self.last_new_scene.labels(aoi=aoi_id).set(last_scene.timestamp())
        for sensor, when in last_usable.items():
            if when is not None:
                with self._lock:
                    self._sensors.setdefault(aoi_id, set()).add(sensor)
                self.last_usable.labels(aoi=aoi_id, sensor=sensor).set(when.timestamp())

