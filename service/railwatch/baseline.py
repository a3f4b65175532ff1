"""Rolling robust baseline and the alert rule (pure: observations and settings in, decisions out).

Baseline: median and MAD of the usable estimates of earlier observations of the same sensor and
(for radar) the same orbit geometry within ``baseline_days`` (every geometry of the sensor while this
one is short of history and reads at the others' level: ``geometry_baseline_fallback``), leaving out
observations that were themselves elevated, so a surge does not raise its own baseline; the median
ignores the odd outlier, and the spread is floored at counting noise (√(level + 1)) so a very steady
history is not hair-trigger.

An alert opens when ``estimated_cars`` exceeds

    threshold = level + max(alert_sigma × spread, (alert_ratio − 1) × level, alert_min_cars)

after at least ``min_history`` baseline observations, on a scene that saw at least
``open_min_clear`` of the track (a partial scene's estimate is extrapolated from a part; an optical
scene must see ``open_min_clear_optical`` of it: no cloud or shadow within the grown mask), and only
when the last judged scene before it (any sensor, within ``confirm_days``, with a baseline and a
threshold) was above its threshold too, or when this radar scene alone is ``single_scene_factor``
times as far above the baseline as the threshold: one noisy scene does not open an alert, a surge
(weeks long) is seen twice in a row. An optical scene never opens alone (``optical_opens_alone``):
its count misses or inflates whole car types (docs/detector.md §9). While
open it updates (latest and peak), is confirmed by a second elevated pass or by the other sensor,
escalates once when an estimate reaches ``escalation_ratio`` × the opening estimate, and resolves
after two usable observations back near the baseline (below ``resolve_ratio`` × baseline or
halfway to the threshold, whichever is higher). Clouds, snow, haze and missing data never open,
update or resolve an alert.

:func:`replay` runs the same rule over a whole history in memory (reprocessing, calibration).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from railwatch.config import DetectorSettings
from railwatch.domain import S2, Observation

OPENED, CONFIRMED, ESCALATED, RESOLVED = "alert.opened", "alert.confirmed", "alert.escalated", "alert.resolved"
QUIET_TO_RESOLVE = 2
#: A radar geometry short of history borrows its sensor's baseline (``geometry_baseline_fallback``) once
#: it has this many judged scenes of its own ...
FALLBACK_MIN_OWN = 3
#: ... whose median is within this factor of the other geometries' median. The Sentinel-1 count scatters
#: by a log standard deviation of about 0.4 (docs/detector.md §9), so the medians of three or more scenes
#: of two geometries at the same level differ by less than 2x about 95 % of the time; a new orbit that
#: reads the yard at another level builds its own baseline first.
FALLBACK_MAX_RATIO = 2.0


@dataclass(frozen=True)
class Baseline:
    level: float
    spread: float
    n: int
    #: The last usable scene before this one (any sensor, within ``confirm_days``) was above its own
    #: threshold: a second elevated scene in a row may open an alert.
    prior_elevated: bool = False


class History(list[Observation]):
    """Comparable earlier observations (the baseline's), and the usable scenes of every sensor just before."""

    def __init__(self, items: Sequence[Observation] = (), recent: Sequence[Observation] = ()) -> None:
        super().__init__(items)
        self.recent: tuple[Observation, ...] = tuple(recent)


@dataclass(frozen=True)
class OpenAlert:
    """The facts about an open alert that the rule needs."""

    sensor: str
    opened_acquired: datetime
    opening_cars: float
    peak_cars: float
    state: str
    escalated: bool
    quiet_count: int = 0


@dataclass(frozen=True)
class Decision:
    elevated: bool
    baseline: Baseline | None
    threshold: float | None
    events: tuple[str, ...] = ()
    quiet_count: int = 0
    notes: dict[str, Any] = field(default_factory=dict)


def history_for(obs: Observation, observations: Sequence[Observation], cfg: DetectorSettings) -> History:
    """Earlier usable observations comparable with ``obs`` (same sensor and geometry; every geometry of the
    sensor while this one has fewer than ``min_history`` that read at the others' level:
    ``geometry_baseline_fallback``) in the window;
    ``.recent`` holds the usable estimates of every sensor of the last ``confirm_days`` (for the
    two-scenes-in-a-row rule)."""
    start = obs.acquired - timedelta(days=cfg.baseline_days)
    recent_start = obs.acquired - timedelta(days=cfg.confirm_days)
    sensor = [o for o in observations if o.collection == obs.collection and start <= o.acquired < obs.acquired and o.usable]
    same = [o for o in sensor if o.geometry_key == obs.geometry_key]
    if cfg.geometry_baseline_fallback and len(_judged(same)) < cfg.min_history:
        # A radar geometry short of history of its own (the start of a watch, or after a winter of
        # wet-snow scenes) is judged against the sensor's when its few scenes read at the same level:
        # calibration brings every geometry to the sensor's level (docs/detector.md §6), and until this
        # geometry can judge, a surge's scenes fall out of the two-in-a-row test.
        others = [o for o in sensor if o.geometry_key != obs.geometry_key]
        if _same_level(_judged(same), _judged(others)):
            same = sensor
    recent = sorted(
        (o for o in observations
         if recent_start <= o.acquired < obs.acquired and o.usable and o.estimated_cars is not None),
        key=lambda o: (o.acquired, o.collection),
    )
    return History(same, recent)


def _judged(history: Sequence[Observation]) -> list[float]:
    """The estimates a baseline is computed from (elevated observations left out)."""
    return [float(o.estimated_cars) for o in history if o.estimated_cars is not None and not o.metrics.get("elevated")]


def _same_level(own: Sequence[float], others: Sequence[float]) -> bool:
    """Whether a geometry's few judged estimates (``own``) read at the level of the sensor's other geometries."""
    if len(own) < FALLBACK_MIN_OWN or not others:
        return False
    a, b = statistics.median(own) + 1.0, statistics.median(others) + 1.0
    return max(a / b, b / a) <= FALLBACK_MAX_RATIO


def compute_baseline(history: Sequence[Observation], clip_sigma: float = 4.0) -> Baseline | None:
    """Median and spread of the history's estimates, robust to the odd outlier and to earlier surges.

    Elevated observations are already left out. An earlier surge that was not (yet) flagged — too
    little history when it came — is dropped here: values more than ``clip_sigma`` lower-half
    spreads above the median (the lower half of the history cannot contain a surge) do not count.
    """
    vals = _judged(history)
    if not vals:
        return None
    level = statistics.median(vals)
    lower = [level - v for v in vals if v <= level]
    spread0 = max(1.4826 * statistics.median(lower) if lower else 0.0, (level + 1.0) ** 0.5, 1.0)
    kept = [v for v in vals if v <= level + clip_sigma * spread0]
    level = statistics.median(kept)
    mad = statistics.median([abs(v - level) for v in kept])
    spread = max(1.4826 * mad, (level + 1.0) ** 0.5, 1.0)
    # The persistence test looks at the last scene that was judged: one still building its reference
    # or its baseline (no threshold) cannot say whether the yard was elevated, and must not reset it.
    recent = [o for o in getattr(history, "recent", ()) if "threshold_cars" in o.metrics]
    prior = bool(recent) and bool(recent[-1].metrics.get("elevated"))
    return Baseline(level=level, spread=spread, n=len(vals), prior_elevated=prior)


def alert_threshold(b: Baseline, cfg: DetectorSettings) -> float:
    return b.level + max(cfg.alert_sigma * b.spread, (cfg.alert_ratio - 1.0) * b.level, cfg.alert_min_cars)


def single_scene_threshold(b: Baseline, cfg: DetectorSettings) -> float:
    """The level one scene alone must exceed to open an alert (without a second elevated scene)."""
    return b.level + cfg.single_scene_factor * (alert_threshold(b, cfg) - b.level)


def _calm(est: float, b: Baseline, thr: float, cfg: DetectorSettings) -> bool:
    return est < max(b.level * cfg.resolve_ratio, b.level + 0.5 * (thr - b.level))


def decide(obs: Observation, baseline: Baseline | None, alert: OpenAlert | None, cfg: DetectorSettings) -> Decision:
    """What this observation means for the AOI's activity alert."""
    if not obs.usable or obs.estimated_cars is None:
        return Decision(False, baseline, None, (), alert.quiet_count if alert else 0)
    if baseline is None or baseline.n < cfg.min_history:
        return Decision(False, baseline, None, (), alert.quiet_count if alert else 0,
                        {"why": f"baseline has {baseline.n if baseline else 0} of {cfg.min_history} observations"})
    est = float(obs.estimated_cars)
    thr = alert_threshold(baseline, cfg)
    elevated = est > thr
    if alert is None:
        clear = 1.0 if obs.clear_fraction is None else float(obs.clear_fraction)
        optical = obs.collection == S2
        min_clear = max(cfg.open_min_clear, cfg.open_min_clear_optical) if optical else cfg.open_min_clear
        if elevated and clear < min_clear:
            return Decision(True, baseline, thr, (), 0,
                            {"why": f"elevated, but only {clear:.0%} of the track seen (opening needs "
                                    f"{min_clear:.0%})"})
        alone = not optical or cfg.optical_opens_alone
        if elevated and not baseline.prior_elevated and (not alone or est <= single_scene_threshold(baseline, cfg)):
            why = ("elevated; an alert opens on a second elevated scene in a row, or on one (radar) far above the "
                   "threshold") if alone else "elevated; an optical scene opens an alert only as the second elevated scene in a row"
            return Decision(True, baseline, thr, (), 0, {"why": why})
        return Decision(elevated, baseline, thr, (OPENED,) if elevated else ())
    events: list[str] = []
    if elevated:
        second_pass = obs.collection != alert.sensor or obs.acquired != alert.opened_acquired
        if alert.state == "provisional" and second_pass:
            events.append(CONFIRMED)
        if not alert.escalated and est >= cfg.escalation_ratio * alert.opening_cars:
            events.append(ESCALATED)
        return Decision(True, baseline, thr, tuple(events), 0)
    quiet = alert.quiet_count + 1 if _calm(est, baseline, thr, cfg) else alert.quiet_count
    if quiet >= QUIET_TO_RESOLVE:
        return Decision(False, baseline, thr, (RESOLVED,), quiet)
    return Decision(False, baseline, thr, (), quiet)


def decision_metrics(d: Decision) -> dict[str, Any]:
    """What an observation records about its decision (``history`` shows baseline and threshold)."""
    out: dict[str, Any] = {"elevated": d.elevated}
    if d.baseline is not None:
        out |= {"baseline_cars": round(d.baseline.level, 2), "baseline_spread": round(d.baseline.spread, 2),
                "baseline_n": d.baseline.n}
    if d.threshold is not None:
        out["threshold_cars"] = round(d.threshold, 2)
    return out


@dataclass
class AlertEpisode:
    """An alert as the rule sees it while replaying a history."""

    sensor: str
    geometry_key: str
    opened_acquired: datetime
    opening: Observation
    opening_cars: float
    peak_cars: float
    latest: Observation
    baseline_cars: float
    score: float
    state: str = "provisional"
    escalated: bool = False
    quiet_count: int = 0
    resolved_at: datetime | None = None
    sensors: list[str] = field(default_factory=list)
    passes: int = 1
    events: list[tuple[str, Observation]] = field(default_factory=list)

    def snapshot(self) -> OpenAlert:
        return OpenAlert(self.sensor, self.opened_acquired, self.opening_cars, self.peak_cars, self.state,
                         self.escalated, self.quiet_count)


@dataclass(frozen=True)
class Replay:
    """Every observation with its decision metrics, and the alert episodes the rule produced."""

    observations: list[Observation]
    episodes: list[AlertEpisode]


class Replayer:
    """The alert rule run incrementally over a history in memory (no store, no events sent)."""

    def __init__(self, cfg: DetectorSettings) -> None:
        self.cfg = cfg
        self.done: list[Observation] = []
        self.episodes: list[AlertEpisode] = []
        self.current: AlertEpisode | None = None

    def step(self, obs: Observation) -> Observation:
        """Decide one observation (later than every one before); returns it with its decision metrics."""
        base = dict(obs.metrics)
        for k in ("elevated", "baseline_cars", "baseline_spread", "baseline_n", "threshold_cars"):
            base.pop(k, None)
        obs = replace(obs, metrics=base)
        b = compute_baseline(history_for(obs, self.done, self.cfg))
        current = self.current
        d = decide(obs, b, current.snapshot() if current else None, self.cfg)
        obs = replace(obs, metrics=base | decision_metrics(d))
        self.done.append(obs)
        if OPENED in d.events:
            assert d.baseline is not None and obs.estimated_cars is not None
            est = float(obs.estimated_cars)
            current = AlertEpisode(
                sensor=obs.collection, geometry_key=obs.geometry_key, opened_acquired=obs.acquired, opening=obs,
                opening_cars=est, peak_cars=est, latest=obs, baseline_cars=round(d.baseline.level, 2),
                score=round((est - d.baseline.level) / d.baseline.spread, 2), sensors=[obs.collection],
            )
            self.current = current
            self.episodes.append(current)
        if current is None:
            return obs
        if d.elevated and OPENED not in d.events and obs.estimated_cars is not None:
            current.latest = obs
            current.peak_cars = max(current.peak_cars, float(obs.estimated_cars))
            current.passes += 1
            if d.baseline is not None:
                current.score = max(current.score, round((obs.estimated_cars - d.baseline.level) / d.baseline.spread, 2))
            if obs.collection not in current.sensors:
                current.sensors.append(obs.collection)
        if CONFIRMED in d.events:
            current.state = "confirmed"
        if ESCALATED in d.events:
            current.escalated = True
        current.quiet_count = d.quiet_count
        current.events.extend((e, obs) for e in d.events)
        if RESOLVED in d.events:
            current.state = "resolved"
            current.resolved_at = obs.acquired
            self.current = None
        return obs


def replay(observations: Sequence[Observation], cfg: DetectorSettings) -> Replay:
    """Run the baseline and alert rule over a history in time order, in memory.

    Returns the observations with ``elevated``, ``baseline_cars`` and ``threshold_cars`` recomputed
    and the alert episodes (opened, confirmed, escalated, resolved) the rule yields, so that a
    reprocessing or a calibration can reconcile the store with them.
    """
    r = Replayer(cfg)
    done = [r.step(o) for o in sorted(observations, key=lambda o: (o.acquired, o.collection))]
    return Replay(done, r.episodes)
