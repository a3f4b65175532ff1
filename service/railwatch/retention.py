"""Archive retention: delete scene files older than ``[daemon] archive_max_age_days``, never one still needed.

A scene file is kept when any of these holds:

- it is younger than the maximum age;
- railwatch has not observed it yet (a backfill or a poll still has to read it);
- it is one of the newest ``reference_scenes`` reference-grade scenes (``ok``/``partial``, not
  elevated) of its sensor and viewing geometry: the reference the next scene is compared with;
- it lies within ``reference_days`` before the opening scene of an open activity alert, or after
  it (the alert's evidence and the reference it was measured against).

Deleting is final for the ``files`` provider; network providers download a pruned scene again if
it is ever needed (a re-run with a new detector version). :func:`plan_prune` decides, purely;
:func:`prune_archive` reads the store and the folder and deletes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from railwatch.domain import USABLE, Aoi, Observation, utc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchivedScene:
    """One scene file of the archive."""

    path: Path
    collection: str
    acquired: datetime


@dataclass
class PruneReport:
    """What one retention run did."""

    deleted: list[Path] = field(default_factory=list)
    kept_needed: int = 0
    bytes_freed: int = 0
    errors: list[str] = field(default_factory=list)


def _reference_grade(o: Observation) -> bool:
    return o.status in USABLE and not o.metrics.get("elevated")


def plan_prune(
    scenes: Iterable[ArchivedScene],
    observations: Sequence[Observation],
    *,
    now: datetime,
    max_age_days: float,
    reference_scenes: int,
    reference_days: int,
    open_alert_starts: Iterable[datetime] = (),
) -> tuple[list[ArchivedScene], int]:
    """(scenes to delete, how many old scenes were kept because they are still needed)."""
    cutoff = utc(now) - timedelta(days=max_age_days)
    observed = {(o.collection, utc(o.acquired)) for o in observations}
    protected: set[tuple[str, datetime]] = set()
    by_geometry: dict[tuple[str, str], list[Observation]] = {}
    for o in observations:
        if _reference_grade(o):
            by_geometry.setdefault((o.collection, o.geometry_key), []).append(o)
    for group in by_geometry.values():
        group.sort(key=lambda o: utc(o.acquired))
        protected.update((o.collection, utc(o.acquired)) for o in group[-reference_scenes:])
    starts = [utc(t) - timedelta(days=reference_days) for t in open_alert_starts]
    guard = min(starts) if starts else None
    delete: list[ArchivedScene] = []
    kept = 0
    for sc in scenes:
        when = utc(sc.acquired)
        if when >= cutoff:
            continue
        key = (sc.collection, when)
        if key not in observed or key in protected or (guard is not None and when >= guard):
            kept += 1
            continue
        delete.append(sc)
    return delete, kept


def _sidecars(path: Path) -> list[Path]:
    return [p for p in (path.with_name(path.name + s) for s in (".aux.xml", ".ovr", ".msk")) if p.exists()]


def prune_archive(
    root: Path,
    store: Any,
    aois: Iterable[Aoi],
    *,
    now: datetime,
    max_age_days: float,
    detector_for: Mapping[str, Any],
    dry_run: bool = False,
) -> PruneReport:
    """Delete the scene files of ``aois`` under ``root`` that :func:`plan_prune` lets go.

    ``detector_for`` maps an AOI id to its effective :class:`~railwatch.config.DetectorSettings`
    (the reference size and window decide what must stay).
    """
    from railwatch.imagery.archive import list_archive

    report = PruneReport()
    for aoi in aois:
        refs, _problems = list_archive(root, aoi.id)
        if not refs:
            continue
        cfg = detector_for[aoi.id]
        observations = store.observations(aoi.id)
        starts = [a.opened_acquired for a in store.alerts(aoi_id=aoi.id, states=["provisional", "confirmed"])
                  if a.kind == "activity" and a.opened_acquired is not None]
        scenes = [ArchivedScene(Path(r.source), r.collection, r.acquired) for r in refs if r.source]
        delete, kept = plan_prune(scenes, observations, now=now, max_age_days=max_age_days,
                                  reference_scenes=cfg.reference_scenes, reference_days=cfg.reference_days,
                                  open_alert_starts=starts)
        report.kept_needed += kept
        for sc in delete:
            if dry_run:
                report.deleted.append(sc.path)
                continue
            try:
                size = sc.path.stat().st_size
                for side in _sidecars(sc.path):
                    side.unlink()
                sc.path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                report.errors.append(f"{sc.path}: {exc.strerror or exc}")
                log.warning("retention could not delete %s: %s", sc.path, exc, extra={"aoi": aoi.id})
                continue
            report.deleted.append(sc.path)
            report.bytes_freed += size
        if delete:
            log.info("retention: %s %d scene file(s) of %s older than %g days (%d old ones kept: still needed)",
                     "would delete" if dry_run else "deleted", len(delete), aoi.id, max_age_days, kept,
                     extra={"aoi": aoi.id})
    return report
