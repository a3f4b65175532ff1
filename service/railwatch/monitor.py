"""One AOI end to end: search -> fetch -> detect -> decide -> record.

Knows only the provider protocol, the store and the pure detector/baseline; the CLI and the
daemon call :meth:`Monitor.poll` (new scenes in the look-back window) or :meth:`Monitor.backfill`.
A pass over several new scenes reads the next one in a background thread while it analyses the
current one (:class:`ReadAhead`, ``[imagery] read_ahead``); what it records does not change.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from railwatch.analysis import AoiContext, Prepared, analyse, geometry_key, prepare
from railwatch.baseline import (
    CONFIRMED,
    ESCALATED,
    OPENED,
    RESOLVED,
    Decision,
    OpenAlert,
    compute_baseline,
    decide,
    decision_metrics,
    history_for,
)
from railwatch.clock import Clock, SystemClock
from railwatch.config import DetectorSettings, Settings, effective_detector
from railwatch.domain import Aoi, Observation, SceneRef, utc
from railwatch.errors import (
    CredentialsError,
    ProviderError,
    ProviderUnavailable,
    QuotaExceeded,
    SceneUnreadable,
)
from railwatch.imagery.base import ImageryProvider
from railwatch.store import AlertEventRow, AlertRow, Store

if TYPE_CHECKING:
    from types import TracebackType

log = logging.getLogger(__name__)

#: Earliest date a backfill searches from by default (Sentinel-1A's first data).
MISSION_START = datetime(2014, 10, 1, tzinfo=UTC)

EventHook = Callable[[Session, AlertEventRow, AlertRow, Aoi, bool], None]

#: Prepared scenes (float bands on the AOI's change zone, see analysis.Prepared) kept for reuse as
#: references: at most this many bytes of pixels, and at most max(SCENE_CACHE_SCENES, 4 x
#: reference_scenes) scenes. A 100 km² AOI (1000 x 1000 px, a rail line every km: 89 000 zone pixels)
#: takes 1.5 MB per Sentinel-2 and 0.8 MB per Sentinel-1 scene (17 and 9 MB when whole grids were
#: kept), so the scene count binds first; the byte budget guards AOIs with far more track
#: (bench/memory.py measures it).
SCENE_CACHE_BYTES = 512 * 2**20
SCENE_CACHE_SCENES = 24

_CacheKey = tuple[str, str, datetime]


def _cache_key(aoi_id: str, ref: SceneRef) -> _CacheKey:
    return (aoi_id, ref.collection, utc(ref.acquired))


def read_prepared(provider: ImageryProvider, ctx: AoiContext, ref: SceneRef, cfg: DetectorSettings) -> Prepared:
    """One scene fetched and prepared: what a scene-cache miss costs, and all a read-ahead thread runs
    (no monitor state: the AOI context, the reference and the settings are only read)."""
    return prepare(ctx, ref, provider.fetch(ctx.aoi, ref), cfg)


class ReadAhead:
    """Reads the next new scenes of a pass in one background thread while the current one is analysed.

    The thread runs :func:`read_prepared` for up to ``depth`` scenes after the one the main thread is
    on; the main thread keeps everything that touches the monitor (the scene cache and its byte
    count, the references, the store) and takes each scene read ahead where :meth:`Monitor._load`
    would have read it, so results are those of a pass without read-ahead. Scene i+1 is started once
    scene i and its references are loaded (:meth:`loaded`): with ``depth`` 1 the provider sees the
    same calls in the same order, one at a time, and an error of scene i+1 (unreadable, quota spent,
    outage) is raised when the main thread takes it; with ``depth`` 2 (the default) the calls are still
    one at a time, and a pass that stops on an outage or a spent quota at scene i may have asked for
    scene i+1 as well (the same scenes, in the same order, as long as the cache holds the references).
    A scene already cached, or read ahead, is not read ahead again. Closing cancels the reads not
    started and waits for the one running (at most one fetch); its result is dropped. ``depth`` 0, or
    a single scene, starts no thread. Memory: up to ``depth`` prepared scenes beyond the cache's
    budget, and the raw bands of the one being read.
    """

    def __init__(self, monitor: Monitor, ctx: AoiContext, refs: Sequence[SceneRef], cfg: DetectorSettings,
                 depth: int) -> None:
        self._monitor = monitor
        self._ctx = ctx
        self._refs = refs
        self._cfg = cfg
        self._depth = depth
        self._cursor = 0  # the scene the main thread is on
        self._started = 1  # scenes from here on have not been considered for reading ahead
        self._pending: dict[int, Future[Prepared]] = {}
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def take(self, ref: SceneRef) -> Future[Prepared] | None:
        """The read of ``ref``, the scene the main thread is on, if it was read ahead."""
        if _cache_key(self._ctx.aoi.id, self._refs[self._cursor]) != _cache_key(self._ctx.aoi.id, ref):
            raise RuntimeError(f"read-ahead out of step: on {self._refs[self._cursor].scene_id}, asked for {ref.scene_id}")
        return self._pending.pop(self._cursor, None)

    def loaded(self) -> None:
        """The current scene and its references are loaded (or the scene failed): start reading the
        next ones and move on to the next scene."""
        stop = min(self._cursor + 1 + self._depth, len(self._refs))
        ahead = {_cache_key(self._ctx.aoi.id, self._refs[j]) for j in self._pending}
        for j in range(max(self._started, self._cursor + 1), stop):
            ref = self._refs[j]
            key = _cache_key(self._ctx.aoi.id, ref)
            if key in self._monitor._prepared or key in ahead:
                continue  # _load finds it in the cache: reading it now would be a second fetch
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="railwatch-read-ahead")
            self._pending[j] = self._pool.submit(read_prepared, self._monitor.provider, self._ctx, ref, self._cfg)
            ahead.add(key)
        self._started = max(self._started, stop)
        self._cursor += 1

    def close(self) -> None:
        """Cancel the reads not started, wait for the one running, drop their results."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()


def prepared_nbytes(p: Prepared) -> int:
    """Bytes of pixels a prepared scene holds (its bands, its usable-pixel mask and its NDVI on the zone
    and, when kept, bands and mask on the whole grid)."""
    arrays = [*p.bands.values(), p.quality.clear, p.ndvi,
              *((*p.grid.bands.values(), p.grid.clear) if p.grid else ())]
    return int(sum(getattr(a, "nbytes", 0) for a in arrays))


def _eviction_order(
    cache: OrderedDict[_CacheKey, Prepared], reference_scenes: int, current: tuple[str, str, str] | None = None,
    used: dict[tuple[str, str, str], int] | None = None,
) -> list[_CacheKey]:
    """Cache keys, the first to evict first.

    A scene's group is (AOI, collection, geometry): a scene's references are the latest earlier
    usable scenes of its group. First go scenes that can never be a reference (not ``ok``/
    ``partial``), then superseded ones (``reference_scenes`` newer usable scenes of their group are
    cached), oldest first. Then, when the budget cannot hold every group's references, the group
    needed last goes first: groups are visited in turn (Sentinel-2, then each orbit of Sentinel-1),
    so that is the ``current`` group (just used), then the other groups most recently used first,
    each oldest scene first. Plain LRU would evict exactly the group needed next, every time.
    """
    def group(k: _CacheKey) -> tuple[str, str, str]:
        return (k[0], k[1], cache[k].geometry_key)

    unusable = [k for k, p in cache.items() if p.quality.status not in ("ok", "partial")]
    skip = set(unusable)
    newer: Counter[tuple[str, str, str]] = Counter()
    superseded: list[_CacheKey] = []
    for k in sorted((k for k in cache if k not in skip), key=lambda k: k[2], reverse=True):
        if newer[group(k)] >= reference_scenes:
            superseded.append(k)
        newer[group(k)] += 1
    superseded.reverse()  # the oldest first
    skip.update(superseded)
    last = used or {}
    rest = sorted((k for k in cache if k not in skip),
                  key=lambda k: (group(k) != current, -last.get(group(k), 0), k[2]))
    return unusable + superseded + rest


@dataclass
class AoiResult:
    """What one pass over one AOI did."""

    aoi_id: str
    found: int = 0
    new: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    events: list[tuple[int, str]] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _default_event_hook(settings: Settings, store: Store) -> EventHook | None:
    """The delivery outbox: one delivery row per matching subscriber, in the event's transaction.

    Notified events (not a backfill's suppressed ones) carry the activity chart for email.
    """
    try:
        from railwatch.alerts.outbox import enqueue
    except ImportError:
        return None

    def hook(s: Session, ev: AlertEventRow, alert: AlertRow, aoi: Aoi, suppressed: bool) -> None:
        chart = None
        if not suppressed and any(getattr(sub, "kind", "") == "email" for sub in settings.subscribers):
            from railwatch.report import activity_chart

            chart = activity_chart(f"{aoi.name} — estimated rail cars", store.observations(aoi.id, session=s),
                                   [alert])
        enqueue(s, settings, ev, alert, aoi, suppressed=suppressed, chart_png=chart)

    return hook


class Monitor:
    """Runs the pipeline for AOIs against one provider and one store."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        provider: ImageryProvider,
        *,
        clock: Clock | None = None,
        event_hook: EventHook | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.provider = provider
        self.clock = clock or SystemClock()
        self.event_hook = event_hook if event_hook is not None else _default_event_hook(settings, store)
        self._contexts: dict[str, AoiContext] = {}
        self._prepared: OrderedDict[tuple[str, str, datetime], Prepared] = OrderedDict()
        self._prepared_bytes = 0
        self._uses = 0  # a clock of cache look-ups: when each scene group was last used
        self._group_used: dict[tuple[str, str, str], int] = {}
        #: Byte budget of the prepared-scene cache (see :data:`SCENE_CACHE_BYTES`).
        self.cache_bytes = SCENE_CACHE_BYTES

    # --- entry points -----------------------------------------------------------------------
    def poll(self, aoi: Aoi, *, progress: Callable[[int, int], None] | None = None) -> AoiResult:
        """New scenes in the look-back window (late-published scenes are not lost), notifying."""
        now = self.clock.now()
        since = now - timedelta(days=self.settings.imagery.lookback_days)
        return self.run(aoi, since, now, suppressed=False, progress=progress)

    def backfill(
        self,
        aoi: Aoi,
        since: datetime | None = None,
        until: datetime | None = None,
        *,
        notify: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> AoiResult:
        """Every scene in [since, until]; alerts are recorded, their deliveries suppressed unless notify."""
        return self.run(aoi, since or MISSION_START, until or self.clock.now(), suppressed=not notify, progress=progress)

    def run(
        self,
        aoi: Aoi,
        since: datetime,
        until: datetime,
        *,
        suppressed: bool,
        progress: Callable[[int, int], None] | None = None,
    ) -> AoiResult:
        result = AoiResult(aoi.id)
        sensors = list(aoi.settings.get("sensors") or self.settings.imagery.sensors)
        self._seed_budget()
        try:
            return self._run(aoi, since, until, sensors, result, suppressed=suppressed, progress=progress)
        finally:
            self._persist_usage()

    def _seed_budget(self) -> None:
        """A provider with a monthly budget learns what this store already recorded as spent."""
        if hasattr(self.provider, "spent_this_month"):
            month = self.clock.now().strftime("%Y-%m")
            self.provider.spent_this_month = sum(u.processing_units for u in self.store.usage(month=month))

    def _persist_usage(self) -> None:
        drain = getattr(self.provider, "drain_usage", None)
        if drain is not None:
            self.store.add_usage([tuple(u) for u in drain()])

    def _run(
        self, aoi: Aoi, since: datetime, until: datetime, sensors: list[str], result: AoiResult, *,
        suppressed: bool, progress: Callable[[int, int], None] | None,
    ) -> AoiResult:
        try:
            refs = self.provider.search(aoi, utc(since), utc(until), sensors)
        except ProviderError as exc:
            result.error = str(exc)
            self._record_poll(aoi, sensors, error=result.error)
            if isinstance(exc, CredentialsError):
                raise
            log.warning("search failed for AOI %s: %s", aoi.id, exc, extra={"aoi": aoi.id})
            return result
        result.found = len(refs)
        try:
            self.process(aoi, refs, result, suppressed=suppressed, progress=progress)
        except QuotaExceeded as exc:
            result.error = f"processing-unit budget spent, polling paused until next month: {exc}"
            log.warning("AOI %s: %s", aoi.id, result.error, extra={"aoi": aoi.id})
        except ProviderUnavailable as exc:
            result.error = str(exc)
            log.warning("AOI %s stopped: %s", aoi.id, exc, extra={"aoi": aoi.id})
        self._record_poll(aoi, sensors, error=result.error, refs=refs)
        return result

    # --- the pipeline -----------------------------------------------------------------------
    def process(
        self,
        aoi: Aoi,
        refs: Sequence[SceneRef],
        result: AoiResult,
        *,
        suppressed: bool,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Observe every scene of ``refs`` not yet observed, in time order, and decide alerts."""
        cfg = effective_detector(self.settings, aoi.settings.get("detector"))
        observed = self.store.observed_keys(aoi.id)
        new = sorted(
            (r for r in refs if (r.collection, utc(r.acquired)) not in observed),
            key=lambda r: (utc(r.acquired), r.collection),
        )
        result.new = len(new)
        if not new:
            return
        new = [replace(ref, acquired=utc(ref.acquired)) for ref in new]
        ctx = self._context(aoi)
        history = self.store.observations(aoi.id)
        sources = self.store.scene_sources(aoi.id)
        calibration = self.store.calibrations(aoi.id)
        with self._read_ahead(ctx, new, cfg) as ahead:
            for i, ref in enumerate(new):
                obs = self._observe(ctx, ref, history, sources, cfg, calibration, ahead)
                with self.store.session() as s:
                    self.store.record_scene(s, ref)
                    obs, events = self._decide_and_record(s, aoi, obs, history, cfg, suppressed)
                history.append(obs)
                sources[(ref.collection, ref.acquired)] = ref.source
                result.statuses[obs.status] += 1
                result.events.extend(events)
                log.info(
                    "scene %s %s: %s%s", aoi.id, ref.scene_id, obs.status,
                    f", {obs.estimated_cars:.1f} cars" if obs.estimated_cars is not None else "",
                    extra={"aoi": aoi.id, "scene": ref.scene_id},
                )
                if progress:
                    progress(i + 1, len(new))

    def _read_ahead(self, ctx: AoiContext, refs: Sequence[SceneRef], cfg: DetectorSettings) -> ReadAhead:
        """The read-ahead of a pass over ``refs`` (``[imagery] read_ahead`` scenes; none for one scene)."""
        return ReadAhead(self, ctx, refs, cfg, self.settings.imagery.read_ahead if len(refs) > 1 else 0)

    def _context(self, aoi: Aoi) -> AoiContext:
        ctx = self._contexts.get(aoi.id)
        if ctx is None or ctx.aoi != aoi:
            ctx = AoiContext.build(aoi, self.settings.aoi.track_half_width_m)
            self._contexts[aoi.id] = ctx
        return ctx

    def _load(self, ctx: AoiContext, ref: SceneRef, cfg: DetectorSettings,
              pending: Future[Prepared] | None = None) -> Prepared:
        """A prepared scene from the cache, else read (or taken from ``pending``, its read-ahead: a
        scene cached when it would have been read ahead is not read ahead) and cached."""
        key = _cache_key(ctx.aoi.id, ref)
        self._uses += 1
        hit = self._prepared.get(key)
        if hit is not None:
            self._prepared.move_to_end(key)
            self._group_used[(key[0], key[1], hit.geometry_key)] = self._uses
            return hit
        prepared = pending.result() if pending is not None else read_prepared(self.provider, ctx, ref, cfg)
        self._prepared[key] = prepared
        self._prepared_bytes += prepared_nbytes(prepared)
        group = (key[0], key[1], prepared.geometry_key)
        self._group_used[group] = self._uses
        self._trim_cache(group, cfg)
        return prepared

    def _trim_cache(self, current: tuple[str, str, str], cfg: DetectorSettings) -> None:
        """Hold the prepared-scene cache within max(:data:`SCENE_CACHE_SCENES`, 4 x reference_scenes)
        scenes and :attr:`cache_bytes` bytes, evicting in :func:`_eviction_order` (``current`` is the
        group of the scene just loaded). Evicting a scene the caller still holds only uncaches it.
        """
        limit = max(SCENE_CACHE_SCENES, 4 * cfg.reference_scenes)
        if len(self._prepared) <= limit and self._prepared_bytes <= self.cache_bytes:
            return
        for victim in _eviction_order(self._prepared, cfg.reference_scenes, current, self._group_used):
            if len(self._prepared) <= limit and self._prepared_bytes <= self.cache_bytes:
                break
            self._prepared_bytes -= prepared_nbytes(self._prepared.pop(victim))

    def _load_scene(
        self, ctx: AoiContext, ref: SceneRef, history: Sequence[Observation],
        sources: dict[tuple[str, datetime], str], cfg: DetectorSettings, pending: Future[Prepared] | None,
    ) -> Observation | tuple[Prepared, list[Prepared]]:
        """The scene and its references, or the observation of a scene that could not be read
        (``unreadable``, ``failed``); an outage, a spent quota or refused credentials are raised."""
        from railwatch.detect import DETECTOR_VERSION

        try:
            scene = self._load(ctx, ref, cfg, pending)
        except (ProviderUnavailable, QuotaExceeded, CredentialsError):
            raise
        except ProviderError as exc:
            return Observation(aoi_id=ctx.aoi.id, collection=ref.collection, acquired=ref.acquired,
                               geometry_key=geometry_key(ref), reason=str(exc), detector_version=DETECTOR_VERSION,
                               status="unreadable" if isinstance(exc, SceneUnreadable) else "failed")
        return scene, self._references(ctx, ref, scene.geometry_key, history, sources, cfg)

    def _references(
        self, ctx: AoiContext, ref: SceneRef, gkey: str, history: Sequence[Observation],
        sources: dict[tuple[str, datetime], str], cfg: DetectorSettings,
    ) -> list[Prepared]:
        start = ref.acquired - timedelta(days=cfg.reference_days)
        earlier = [
            o for o in history
            if o.collection == ref.collection and o.geometry_key == gkey and start <= o.acquired < ref.acquired
            and o.status in ("ok", "partial") and not o.metrics.get("elevated")
        ][-cfg.reference_scenes:]
        out: list[Prepared] = []
        for o in earlier:
            src = sources.get((o.collection, o.acquired), "")
            try:
                out.append(self._load(ctx, SceneRef(ctx.aoi.id, o.collection, o.acquired, src), cfg))
            except ProviderError as exc:  # a reference that vanished from the archive is skipped
                log.warning("reference scene %s %s unavailable: %s", ctx.aoi.id, o.acquired, exc)
        return out

    def _observe(
        self, ctx: AoiContext, ref: SceneRef, history: Sequence[Observation],
        sources: dict[tuple[str, datetime], str], cfg: DetectorSettings, calibration: dict[str, Any],
        ahead: ReadAhead | None = None,
    ) -> Observation:
        loaded = self._load_scene(ctx, ref, history, sources, cfg, ahead.take(ref) if ahead is not None else None)
        if ahead is not None:
            ahead.loaded()  # the next scene is read while this one is analysed
        if isinstance(loaded, Observation):
            return loaded
        scene, refs = loaded
        from railwatch.detect.calibrate import geometry_key_of

        # A radar geometry calibrated on its own (its level brought to the sensor's) wins over the sensor's.
        cal = calibration.get(geometry_key_of(ref.collection, scene.geometry_key)) or calibration.get(ref.collection)
        return analyse(
            ctx, scene, refs, cfg,
            scale=cal.scale if cal else 1.0,
            rel_sigma=cal.log_sigma if cal else None,
        )

    def _decide_and_record(
        self, s: Session, aoi: Aoi, obs: Observation, history: Sequence[Observation], cfg: DetectorSettings,
        suppressed: bool,
    ) -> tuple[Observation, list[tuple[int, str]]]:
        baseline = compute_baseline(history_for(obs, history, cfg))
        row = self.store.open_alert(s, aoi.id)
        snapshot = None
        if row is not None:
            snapshot = OpenAlert(
                sensor=row.sensor or "",
                opened_acquired=utc(row.opened_acquired) if row.opened_acquired else obs.acquired,
                opening_cars=row.opening_cars or 0.0,
                peak_cars=row.peak_cars or 0.0,
                state=row.state,
                escalated=row.escalated,
                quiet_count=int((row.data or {}).get("quiet_count", 0)),
            )
        d = decide(obs, baseline, snapshot, cfg)
        obs = replace(obs, metrics=dict(obs.metrics) | decision_metrics(d))
        self.store.save_observation(s, obs)
        events = self._apply(s, aoi, obs, d, row, suppressed)
        return obs, events

    def _apply(
        self, s: Session, aoi: Aoi, obs: Observation, d: Decision, row: AlertRow | None, suppressed: bool,
    ) -> list[tuple[int, str]]:
        out: list[tuple[int, str]] = []
        if OPENED in d.events:
            assert d.baseline is not None
            row = AlertRow(
                kind="activity", aoi_id=aoi.id, sensor=obs.collection, geometry_key=obs.geometry_key,
                state="provisional", opened_acquired=obs.acquired, last_acquired=obs.acquired,
                opened_at=self.clock.now(), updated_at=self.clock.now(), opening_cars=obs.estimated_cars,
                estimated_cars=obs.estimated_cars, estimated_cars_low=obs.estimated_cars_low,
                estimated_cars_high=obs.estimated_cars_high, peak_cars=obs.estimated_cars,
                baseline_cars=round(d.baseline.level, 2), score=self._score(obs, d),
                sensors_seen=[obs.collection], passes=1, escalated=False, suppressed=suppressed,
                data={"quiet_count": 0},
            )
            s.add(row)
            s.flush()
        if row is None:
            return out
        if d.elevated and OPENED not in d.events:
            row.estimated_cars = obs.estimated_cars
            row.estimated_cars_low = obs.estimated_cars_low
            row.estimated_cars_high = obs.estimated_cars_high
            row.peak_cars = max(row.peak_cars or 0.0, obs.estimated_cars or 0.0)
            row.last_acquired = obs.acquired
            row.passes = (row.passes or 0) + 1
            row.score = max(row.score or 0.0, self._score(obs, d))
            if obs.collection not in (row.sensors_seen or []):
                row.sensors_seen = [*(row.sensors_seen or []), obs.collection]
        if CONFIRMED in d.events:
            row.state = "confirmed"
        if ESCALATED in d.events:
            row.escalated = True
        if RESOLVED in d.events:
            row.state = "resolved"
            row.resolved_at = obs.acquired
        row.data = dict(row.data or {}) | {"quiet_count": d.quiet_count}
        row.updated_at = self.clock.now()
        for ev_type in d.events:
            data = {
                "acquired": obs.acquired.isoformat(), "sensor": obs.collection,
                "estimated_cars": obs.estimated_cars, "estimated_cars_low": obs.estimated_cars_low,
                "estimated_cars_high": obs.estimated_cars_high, "baseline_cars": row.baseline_cars,
                "peak_cars": row.peak_cars, "state": row.state,
            }
            ev = self.store.add_event(s, row, ev_type, acquired=obs.acquired, data=data, suppressed=suppressed)
            if ev is None:
                continue
            out.append((row.id, ev_type))
            log.info("alert %s %s for AOI %s (%s)", row.id, ev_type, aoi.id, obs.collection,
                     extra={"aoi": aoi.id, "alert": row.id})
            if self.event_hook is not None:
                self.event_hook(s, ev, row, aoi, suppressed)
        return out

    @staticmethod
    def _score(obs: Observation, d: Decision) -> float:
        if d.baseline is None or obs.estimated_cars is None:
            return 0.0
        return round((obs.estimated_cars - d.baseline.level) / d.baseline.spread, 2)

    def _record_poll(self, aoi: Aoi, sensors: Sequence[str], *, error: str | None,
                     refs: Sequence[SceneRef] = ()) -> None:
        now = self.clock.now()
        with self.store.session() as s:
            for coll in sensors:
                st = self.store.poll_state(s, aoi.id, coll)
                st.last_poll_at = now
                st.last_error = error or ""
                if error is None:
                    st.last_success_at = now
                times = [utc(r.acquired) for r in refs if r.collection == coll]
                if times and (st.last_scene_acquired is None or max(times) > st.last_scene_acquired):
                    st.last_scene_acquired = max(times)

    # --- reprocessing and calibration ---------------------------------------------------------
    def reprocess(
        self, aoi: Aoi, since: datetime | None = None, *, progress: Callable[[int, int], None] | None = None,
    ) -> AoiResult:
        """Recompute the recorded observations from ``since`` (default: all) with the current detector.

        Each scene is fetched again (from the archive or the provider cache) and analysed with the
        current detector, AOI and calibration; analysts' counts kept on the observations carry over
        and refit the calibration; then the alert rule is replayed over the whole history. Alerts and
        events already recorded are kept and never recorded or sent again; alerts or events that
        only the new results yield are recorded suppressed (no notification goes out for the past).
        """
        from railwatch.baseline import Replayer
        from railwatch.detect import DETECTOR_VERSION

        result = AoiResult(aoi.id)
        cfg = effective_detector(self.settings, aoi.settings.get("detector"))
        start = utc(since) if since is not None else MISSION_START
        old = self.store.observations(aoi.id)
        todo = [o for o in old if o.acquired >= start]
        result.found = len(todo)
        ctx = self._context(aoi)
        scenes = self.store.scene_refs(aoi.id)
        sources = {k: r.source for k, r in scenes.items()}
        calibration = self.store.calibrations(aoi.id)
        replayer = Replayer(cfg)
        history: list[Observation] = [replayer.step(o) for o in old if o.acquired < start]
        fresh: list[Observation] = []
        self._prepared.clear()  # the detector or the AOI changed: nothing cached is trusted
        self._group_used.clear()
        self._prepared_bytes = 0
        refs = [scenes.get((o.collection, o.acquired)) or SceneRef(aoi.id, o.collection, o.acquired) for o in todo]
        refs = [replace(ref, acquired=utc(ref.acquired)) for ref in refs]
        with self._read_ahead(ctx, refs, cfg) as ahead:
            for i, (o, ref) in enumerate(zip(todo, refs, strict=True)):
                try:
                    new = self._observe(ctx, ref, history, sources, cfg, calibration, ahead)
                except (ProviderUnavailable, QuotaExceeded) as exc:
                    result.error = f"reprocessing stopped at {o.acquired.isoformat()}: {exc}"
                    log.warning("AOI %s: %s", aoi.id, result.error, extra={"aoi": aoi.id})
                    break
                keep = {k: o.metrics[k] for k in ("analyst_cars",) if k in o.metrics}
                new = replayer.step(replace(new, metrics=dict(new.metrics) | keep))
                history.append(new)
                fresh.append(new)
                result.statuses[new.status] += 1
                if progress:
                    progress(i + 1, len(todo))
        result.new = len(fresh)
        with self.store.session() as s:
            self.store.save_observations(s, fresh)
        log.info("AOI %s: %d observation(s) recomputed with detector %s", aoi.id, len(fresh), DETECTOR_VERSION,
                 extra={"aoi": aoi.id})
        if any("analyst_cars" in o.metrics for o in self.store.observations(aoi.id)):
            self.recalibrate(aoi)
        result.events.extend(self._replay_alerts(aoi, cfg, start))
        return result

    def calibrate(self, aoi: Aoi, counts: Sequence[Any]) -> dict[str, Any]:
        """Keep analysts' counts on the same UTC day's observations, refit the AOI's per-sensor scale
        and update the estimates already recorded (alert decisions are not sent again).

        Returns a report: per sensor the matched counts, the scale and its residual spread, and the
        counts that matched no scene.
        """
        from railwatch.detect.calibrate import assign_counts

        obs = self.store.observations(aoi.id)
        assigned, unmatched = assign_counts(counts, [(o.collection, o.acquired) for o in obs])
        changed = {
            (o.collection, o.acquired): replace(o, metrics=dict(o.metrics) | {"analyst_cars": assigned[(o.collection, o.acquired)]})
            for o in obs if (o.collection, o.acquired) in assigned
        }
        with self.store.session() as s:
            self.store.save_observations(s, list(changed.values()))
        report = self.recalibrate(aoi)
        report["unmatched"] = [c.acquired.date().isoformat() for c in unmatched]
        return report

    def recalibrate(self, aoi: Aoi) -> dict[str, Any]:
        """Refit the per-sensor scale from the counts kept on the observations and rescale the estimates."""
        from railwatch.baseline import Replayer
        from railwatch.detect.calibrate import fit_scale, geometry_factors, geometry_key_of
        from railwatch.detect.estimate import interval

        cfg = effective_detector(self.settings, aoi.settings.get("detector"))
        obs = self.store.observations(aoi.id)
        report: dict[str, Any] = {"aoi": aoi.id, "sensors": {}}
        cals = {}
        # Per sensor, each geometry's raw counts are first brought to the sensor's common level (the
        # geometries see the same yard from different angles: detect.calibrate.geometry_factors), then
        # one scale is fitted to all the sensor's counts.
        factors: dict[str, dict[str, float]] = {}
        for sensor in sorted({o.collection for o in obs}):
            factors[sensor] = geometry_factors(
                (o.geometry_key, float(o.metrics["raw_cars"])) for o in obs
                if o.collection == sensor and o.usable and "raw_cars" in o.metrics)
            f = factors[sensor]
            pairs = [(float(o.metrics["raw_cars"]) * f.get(o.geometry_key, 1.0), float(o.metrics["analyst_cars"]))
                     for o in obs
                     if o.collection == sensor and o.usable and "analyst_cars" in o.metrics and "raw_cars" in o.metrics]
            if not pairs:
                continue
            try:
                cal = fit_scale(pairs)
            except ValueError as exc:
                report["sensors"][sensor] = {"counts": len(pairs), "error": str(exc)}
                continue
            cals[sensor] = cal
            report["sensors"][sensor] = {"counts": cal.n, "scale": round(cal.scale, 4),
                                         "log_sigma": round(cal.log_sigma, 4), "residual_sd": round(cal.residual_sd, 4)}
            if cal.counts_scale is not None:
                report["sensors"][sensor]["counts_scale"] = round(cal.counts_scale, 4)
            if len(f) > 1:
                report["sensors"][sensor]["geometry_factors"] = {g: round(v, 4) for g, v in sorted(f.items())}
        if not cals:
            return report
        with self.store.session() as s:
            for sensor, cal in cals.items():
                self.store.save_calibration(s, aoi.id, sensor, scale=cal.scale, log_sigma=cal.log_sigma, n_counts=cal.n,
                                            now=self.clock.now())
                for g, v in factors[sensor].items() if len(factors[sensor]) > 1 else ():
                    self.store.save_calibration(s, aoi.id, geometry_key_of(sensor, g), scale=cal.scale * v,
                                                log_sigma=cal.log_sigma, n_counts=cal.n, now=self.clock.now())
        updated = []
        for o in obs:
            fitted = cals.get(o.collection)
            if fitted is None or not o.usable or "raw_cars" not in o.metrics:
                updated.append(o)
                continue
            scale = fitted.scale * factors[o.collection].get(o.geometry_key, 1.0)
            est = interval(float(o.metrics["raw_cars"]), float(o.metrics.get("raw_cars_sd", 0.0)), scale,
                           fitted.log_sigma)
            updated.append(replace(
                o, estimated_cars=round(est.cars, 2), estimated_cars_low=round(est.low, 2),
                estimated_cars_high=round(est.high, 2),
                metrics=dict(o.metrics) | {"scale": round(scale, 4), "log_sigma": round(fitted.log_sigma, 4)},
            ))
        # Baselines and thresholds follow the new scale; alerts already decided keep their states and
        # events (nothing is sent again), their numbers follow the new scale.
        replayer = Replayer(cfg)
        replayed = [replayer.step(o) for o in sorted(updated, key=lambda o: (o.acquired, o.collection))]
        with self.store.session() as s:
            n = self.store.save_observations(s, replayed)
            report["alerts_rescaled"] = self._rescale_alerts(s, aoi, replayed)
        report["updated"] = n
        return report

    def _rescale_alerts(self, s: Session, aoi: Aoi, observations: Sequence[Observation]) -> int:
        """Bring the numbers of the AOI's recorded activity alerts to the recalibrated estimates: opening,
        latest (with its interval) and peak estimate, and the baseline at the opening scene. States and
        events stay as they were decided (nothing is sent again). Returns how many alerts changed."""
        by_time = {o.acquired: o for o in observations if o.usable}
        changed = 0
        for r in self.store.alerts(aoi_id=aoi.id):
            if r.kind != "activity" or r.opened_acquired is None:
                continue
            opening = by_time.get(utc(r.opened_acquired))
            latest = by_time.get(utc(r.last_acquired)) if r.last_acquired is not None else None
            if opening is None:
                continue
            end = utc(r.last_acquired) if r.last_acquired is not None else opening.acquired
            span = [o.estimated_cars for t, o in by_time.items()
                    if opening.acquired <= t <= end and o.collection in (r.sensors_seen or [r.sensor or ""])
                    and o.estimated_cars is not None]
            row = s.merge(r)
            row.opening_cars = opening.estimated_cars
            if latest is not None:
                row.estimated_cars = latest.estimated_cars
                row.estimated_cars_low = latest.estimated_cars_low
                row.estimated_cars_high = latest.estimated_cars_high
            row.peak_cars = max([c for c in span if c is not None] or [opening.estimated_cars or 0.0])
            if opening.metrics.get("baseline_cars") is not None:
                row.baseline_cars = float(opening.metrics["baseline_cars"])
            changed += 1
        return changed

    def _replay_alerts(self, aoi: Aoi, cfg: DetectorSettings, since: datetime) -> list[tuple[int, str]]:
        """Bring the store's alerts in line with the rule replayed over the whole history.

        Episodes are matched to recorded alerts by their opening scene. Recorded events are never
        recorded again (store.add_event dedupes); new ones are recorded suppressed. A recorded open
        alert that the replay no longer sees (opened at or after ``since``) is resolved, suppressed.
        """
        from railwatch.baseline import OPENED as _OPENED
        from railwatch.baseline import replay

        rep = replay(self.store.observations(aoi.id), cfg)
        out: list[tuple[int, str]] = []
        now = self.clock.now()
        rows = [r for r in self.store.alerts(aoi_id=aoi.id) if r.kind == "activity"]
        with self.store.session() as s:
            self.store.save_observations(s, [o for o in rep.observations if o.acquired >= since])
            by_open = {(r.sensor, utc(r.opened_acquired)): r for r in rows if r.opened_acquired is not None}
            matched: set[int] = set()
            for ep in rep.episodes:
                row = by_open.get((ep.sensor, ep.opened_acquired))
                if row is not None:
                    row = s.merge(row)
                elif ep.opened_acquired < since:
                    continue  # opened before the reprocessed period: nothing of it was recomputed
                else:
                    o = ep.opening
                    row = AlertRow(
                        kind="activity", aoi_id=aoi.id, sensor=ep.sensor, geometry_key=ep.geometry_key,
                        state="provisional", opened_acquired=ep.opened_acquired, last_acquired=ep.opened_acquired,
                        opened_at=now, updated_at=now, opening_cars=o.estimated_cars, estimated_cars=o.estimated_cars,
                        estimated_cars_low=o.estimated_cars_low, estimated_cars_high=o.estimated_cars_high,
                        peak_cars=o.estimated_cars, baseline_cars=ep.baseline_cars, score=ep.score,
                        sensors_seen=[ep.sensor], passes=1, escalated=False, suppressed=True,
                        data={"quiet_count": 0, "reprocessed": True},
                    )
                    s.add(row)
                    s.flush()
                matched.add(row.id)
                if ep.latest.acquired >= since:
                    row.estimated_cars = ep.latest.estimated_cars
                    row.estimated_cars_low = ep.latest.estimated_cars_low
                    row.estimated_cars_high = ep.latest.estimated_cars_high
                    row.last_acquired = ep.latest.acquired
                    row.peak_cars = max(row.peak_cars or 0.0, ep.peak_cars)
                    row.passes = max(row.passes or 0, ep.passes)
                    row.sensors_seen = sorted(set(row.sensors_seen or []) | set(ep.sensors))
                if ep.state == "confirmed" and row.state == "provisional":
                    row.state = "confirmed"
                if ep.escalated:
                    row.escalated = True
                if ep.state == "resolved" and row.state in ("provisional", "confirmed"):
                    row.state = "resolved"
                    row.resolved_at = ep.resolved_at
                row.data = dict(row.data or {}) | {"quiet_count": ep.quiet_count}
                row.updated_at = now
                for ev_type, o in ep.events:
                    if o.acquired < since:
                        continue
                    data = {
                        "acquired": o.acquired.isoformat(), "sensor": o.collection,
                        "estimated_cars": o.estimated_cars, "estimated_cars_low": o.estimated_cars_low,
                        "estimated_cars_high": o.estimated_cars_high, "baseline_cars": row.baseline_cars,
                        "peak_cars": row.peak_cars, "state": row.state, "reprocessed": True,
                    }
                    ev = self.store.add_event(s, row, ev_type, acquired=o.acquired, data=data, suppressed=True)
                    if ev is None:
                        continue
                    out.append((row.id, ev_type))
                    if self.event_hook is not None:
                        self.event_hook(s, ev, row, aoi, True)
                    if ev_type == _OPENED:
                        log.info("reprocessing opened alert %s for AOI %s (suppressed)", row.id, aoi.id,
                                 extra={"aoi": aoi.id, "alert": row.id})
            for r in rows:
                if r.id in matched or r.state not in ("provisional", "confirmed"):
                    continue
                if r.opened_acquired is None or utc(r.opened_acquired) < since:
                    continue
                row = s.merge(r)
                row.state = "resolved"
                row.resolved_at = now
                row.data = dict(row.data or {}) | {"resolved_by": "reprocessing: the current detector does not see it"}
                ev = self.store.add_event(s, row, RESOLVED, acquired=None,
                                          data={"dedupe": f"reprocess:{now.isoformat()}", "state": "resolved",
                                                "reprocessed": True}, suppressed=True)
                if ev is not None:
                    out.append((row.id, RESOLVED))
                    if self.event_hook is not None:
                        self.event_hook(s, ev, row, aoi, True)
        return out
