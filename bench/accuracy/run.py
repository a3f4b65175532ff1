#!/usr/bin/env python3
"""Accuracy benchmark: simulated archives with known truth, the real pipeline through the CLI.

For every case (AOI, seed, kind) it

1. simulates 18 months of Sentinel-1/-2 scenes (`railwatch simulate`, default surges: a medium one,
   2.5-3x the usual level for 14-28 days, and a large one, 3-5x for 21-42 days) — or a quiet year
   with no surge;
2. backfills them with `railwatch backfill` in a subprocess, with a temporary configuration;
3. calibrates with three analyst counts per sensor taken from the truth (`railwatch calibrate`),
   on ordinary days spread over the period (those scenes are left out of the error figures);
4. reads `railwatch history` and `railwatch alerts` as JSON and scores them against truth.csv.

Seeds are split once and for all: TUNE seeds (100-109) are the ones the detector and the alert rule
may be tuned on, REPORT seeds (200-209) are held out and are what docs/detector.md reports.
`--split` picks one; the default is `report`.

    .venv/bin/python bench/accuracy/run.py                 # default: held-out seeds, ~10 min on 2 cores
    .venv/bin/python bench/accuracy/run.py --split tune    # the tuning seeds
    .venv/bin/python bench/accuracy/run.py --full          # every shipped AOI, ten seeds (hours)

Nothing here is imported by the service; the detector never sees truth.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
S2, S1 = "sentinel-2-l2a", "sentinel-1-grd"
SENSORS = (S2, S1)
#: The explicit split: tune on these, report on those.
SPLITS = {"tune": tuple(range(100, 110)), "report": tuple(range(200, 210))}
#: The simulated period: 18 months ending well before today (the simulator writes nothing in the future).
START = date(2024, 1, 1)
DAYS = 548
QUIET_DAYS = 365
#: Days between usable passes of one sensor: Sentinel-2 every 5 days, Sentinel-1 every 6 (two orbits).
REVISIT_DAYS = {S2: 5.0, S1: 6.0}
#: One revisit, for "caught when an alert opens between a surge's start and its end plus one revisit".
ALERT_GRACE_DAYS = 6.0
FULL_YARD = 40
#: The `[detector]` settings the alert rule reads (docs/detector.md §7): what ``--detector`` may replay.
RULE_KEYS = ("min_history", "baseline_days", "alert_sigma", "alert_ratio", "alert_min_cars", "resolve_ratio",
             "escalation_ratio", "open_min_clear", "open_min_clear_optical", "optical_opens_alone", "confirm_days",
             "single_scene_factor", "geometry_baseline_fallback")
CALIBRATION_COUNTS = 3

DEFAULT_AOIS = ("tumangang-khasan", "sinuiju-dandong")
FULL_AOIS = ("tumangang-khasan", "sinuiju-dandong", "suifenhe-grodekovo", "manzhouli-zabaikalsk", "brest-malaszewicze")


@dataclass(frozen=True)
class Case:
    aoi: str
    seed: int
    quiet: bool = False

    @property
    def name(self) -> str:
        return f"{self.aoi}_{self.seed}{'_quiet' if self.quiet else ''}"


def plan(split: str, full: bool, aois: Sequence[str] | None, n_seeds: int | None) -> list[Case]:
    seeds = SPLITS[split]
    chosen = tuple(aois) if aois else (FULL_AOIS if full else DEFAULT_AOIS)
    k = n_seeds or (len(seeds) if full else 3)
    cases = [Case(a, s) for a in chosen for s in seeds[:k]]
    # Quiet years: one per AOI (two by default), on the next seed so they are not copies of a surge case.
    cases += [Case(a, seeds[min(k, len(seeds) - 1)], quiet=True) for a in chosen]
    return cases


# --- running the pipeline ------------------------------------------------------------------
def _cli(args: Sequence[str], config: Path | None, log: Path) -> str:
    cmd = [str(REPO / ".venv" / "bin" / "railwatch")]
    if not Path(cmd[0]).exists():
        cmd = [sys.executable, "-m", "railwatch"]
    if config is not None:
        cmd += ["--config", str(config)]
    cmd += list(args)
    env = dict(os.environ)
    env.pop("RAILWATCH_CONFIG", None)
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    with log.open("a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n{out.stderr}\n")
    if out.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr[-2000:]}")
    return out.stdout


def _config(work: Path, archive: Path, db: Path) -> Path:
    path = work / "railwatch.toml"
    path.write_text(
        "[aoi]\n"
        f'dir = "{REPO / "aoi"}"\n'
        "[imagery]\n"
        'provider = "files"\n'
        "[imagery.files]\n"
        f'root = "{archive}"\n'
        "[store]\n"
        f'url = "sqlite:///{db}"\n'
        "[logging]\n"
        'level = "WARNING"\n',
        encoding="utf-8",
    )
    return path


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def calibration_counts(history: list[dict[str, Any]], truth: dict[tuple[str, str], dict[str, str]],
                       n: int = CALIBRATION_COUNTS) -> list[tuple[str, str, int]]:
    """Three counts per sensor, as an analyst would give them: ordinary days spread over the period,
    on usable scenes, on days when the other sensor has no scene (a count names one scene)."""
    days: dict[str, set[str]] = {s: set() for s in SENSORS}
    for r in history:
        days[r["sensor"]].add(r["acquired"][:10])
    out = []
    for sensor in SENSORS:
        other = days[S1 if sensor == S2 else S2]
        pool = [r for r in history if r["sensor"] == sensor and r["estimated_cars"] is not None
                and r["acquired"][:10] not in other
                and truth[(sensor, r["acquired"])]["surge"] == "0"
                and float(truth[(sensor, r["acquired"])]["cloud_fraction"]) == 0.0
                and truth[(sensor, r["acquired"])]["snow"] == "false"]
        if not pool:
            continue
        picks = [pool[round(i * (len(pool) - 1) / max(1, n - 1))] for i in range(n)] if len(pool) >= n else pool
        for r in picks:
            out.append((sensor, r["acquired"], int(truth[(sensor, r["acquired"])]["cars"])))
    return out


def haze_of_scenes(aoi_id: str, seed: int, truth_rows: list[dict[str, str]]) -> dict[str, float]:
    """Haze strength of each Sentinel-2 scene, re-drawn from the simulator's own sky draw.

    truth.csv does not carry haze; the simulator draws each scene's sky first from a generator
    seeded by (seed, 10, timestamp), so the same call here returns the same haze. Bench only.
    """
    import numpy as np

    from railwatch.aoi import load_aoi
    from railwatch.imagery import synthetic as sy

    aoi, _ = load_aoi(REPO / "aoi" / f"{aoi_id}.geojson")
    west, south, east, north = aoi.bbox
    lon, lat = (west + east) / 2, (south + north) / 2
    times = [datetime.fromisoformat(r["acquired"].replace("Z", "+00:00")) for r in truth_rows]
    local = [(t + timedelta(hours=lon / 15.0)).date() for t in times]
    weather = sy.simulate_weather(seed, min(local), max(local), lat)
    out = {}
    for r, t, d in zip(truth_rows, times, local, strict=True):
        if r["sensor"] == S2:
            sky = sy.draw_sky(np.random.default_rng([seed, 10, int(t.timestamp())]), t, weather[d], lat)
            out[r["acquired"]] = float(sky.haze)
    return out


def run_case(case: Case, work_root: Path) -> dict[str, Any]:
    work = work_root / case.name
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    log.write_text("", encoding="utf-8")
    archive = work / "archive"
    folder = archive / case.aoi
    t0 = time.monotonic()
    days = QUIET_DAYS if case.quiet else DAYS
    stamp = work / "simulated.json"
    params = {"aoi": case.aoi, "seed": case.seed, "quiet": case.quiet, "start": START.isoformat(), "days": days}
    if not (stamp.exists() and json.loads(stamp.read_text()) == params and (folder / "truth.csv").exists()):
        sim = ["simulate", "--aoi", case.aoi, "--out", str(archive), "--start", START.isoformat(), "--days", str(days),
               "--seed", str(case.seed), "--no-progress"] + (["--quiet"] if case.quiet else [])
        _cli(sim, _config(work, archive, work / "unused.db"), log)
        stamp.write_text(json.dumps(params), encoding="utf-8")
    t_sim = time.monotonic() - t0
    db = work / "railwatch.db"
    for p in work.glob("railwatch.db*"):
        p.unlink()
    config = _config(work, archive, db)
    t1 = time.monotonic()
    _cli(["backfill", "--aoi", case.aoi, "--no-progress", "--since", "2020-01-01"], config, log)
    t_backfill = time.monotonic() - t1
    truth_rows = _read_csv(folder / "truth.csv")
    truth = {(r["sensor"], r["acquired"]): r for r in truth_rows}
    surges = _read_csv(folder / "surges.csv")
    history = json.loads(_cli(["history", "--aoi", case.aoi, "--format", "json"], config, log))
    before = {(r["sensor"], r["acquired"]): r for r in history}  # the physical model alone
    counts = calibration_counts(history, truth)
    counts_csv = work / "counts.csv"
    counts_csv.write_text("acquired,cars\n" + "".join(f"{a},{c}\n" for _, a, c in counts), encoding="utf-8")
    calibration = json.loads(_cli(["calibrate", "--aoi", case.aoi, str(counts_csv), "--format", "json"], config, log))
    history = json.loads(_cli(["history", "--aoi", case.aoi, "--format", "json"], config, log))
    alerts = json.loads(_cli(["alerts", "--aoi", case.aoi, "--format", "json"], config, log))
    haze = haze_of_scenes(case.aoi, case.seed, truth_rows)
    scenes = []
    for r in history:
        t = truth[(r["sensor"], r["acquired"])]
        scenes.append({
            "acquired": r["acquired"], "sensor": r["sensor"], "status": r["status"], "geometry": r["geometry"],
            "clear_fraction": r["clear_fraction"], "threshold": r["threshold_cars"], "baseline": r["baseline_cars"],
            "est": r["estimated_cars"], "low": r["estimated_cars_low"], "high": r["estimated_cars_high"],
            "alert": r["alert"], "truth": int(t["cars"]), "cloud": float(t["cloud_fraction"]),
            "snow": t["snow"] == "true", "surge": int(t["surge"]), "haze": haze.get(r["acquired"], 0.0),
            "calibration": (r["sensor"], r["acquired"]) in {(s, a) for s, a, _ in counts},
            "uncalibrated": [before[(r["sensor"], r["acquired"])][k]
                             for k in ("estimated_cars", "estimated_cars_low", "estimated_cars_high")],
        })
    return {
        "case": asdict(case), "name": case.name, "surges": surges, "scenes": scenes,
        "alerts": [{k: a.get(k) for k in ("id", "kind", "acquired", "sensor", "state", "peak_cars", "escalated")}
                   for a in alerts if a.get("kind") == "activity"],
        "calibration": calibration, "counts": counts,
        "seconds": {"simulate": round(t_sim, 1), "backfill": round(t_backfill, 1),
                    "total": round(time.monotonic() - t0, 1)},
    }


# --- scoring -------------------------------------------------------------------------------
def _day(text: str) -> date:
    return date.fromisoformat(text[:10])


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 3:
        return math.nan
    from scipy import stats

    return float(stats.spearmanr(x, y).statistic)


def _auc(pos: Sequence[float], neg: Sequence[float]) -> float:
    if not pos or not neg:
        return math.nan
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _mape(est: Sequence[float], truth: Sequence[float]) -> float:
    if not est:
        return math.nan
    return statistics.fmean(abs(e - t) / max(t, 1.0) for e, t in zip(est, truth, strict=True))


def _best_scale(est: Sequence[float], truth: Sequence[float]) -> float:
    """The one factor k that brings ``est`` closest to ``truth`` in the calibration's own terms: the least
    sum of |log(1 + k·est) − log(1 + truth)| (the L1 fit of docs/detector.md §6), over k from 0.05 to 20."""
    import numpy as np

    e, t = np.asarray(est, float), np.log1p(np.asarray(truth, float))
    if not e.size:
        return 1.0
    ks = np.geomspace(0.05, 20.0, 801)
    cost = np.abs(np.log1p(ks[:, None] * e[None, :]) - t[None, :]).sum(axis=1)
    return float(ks[int(np.argmin(cost))])


def _clear(s: dict[str, Any]) -> bool:
    """A scene that saw the ground: Sentinel-2 without cloud, snow or haze; Sentinel-1 always."""
    if s["sensor"] == S1:
        return True
    return s["cloud"] == 0.0 and not s["snow"] and s["haze"] == 0.0


def _detections(case: dict[str, Any], sensor: str | None) -> list[tuple[datetime, dict[str, Any] | None]]:
    """What counts as an alert: for all sensors the alerts the service opened (with the opening scene);
    for one sensor, each run of consecutive elevated usable scenes of that sensor (its first scene)."""
    by_time = {(s["sensor"], s["acquired"]): s for s in case["scenes"]}
    if sensor is None:
        return [(_ts(a["acquired"]), by_time.get((a["sensor"], a["acquired"]))) for a in case["alerts"]]
    out = []
    previous = False
    for s in case["scenes"]:
        if s["sensor"] != sensor or s["est"] is None:
            continue
        if _elevated(s) and not previous:
            out.append((_ts(s["acquired"]), s))
        previous = _elevated(s)
    return out


def _elevated(s: dict[str, Any]) -> bool:
    """Above the alert threshold (history's `alert` also marks scenes that only carried an event)."""
    if "threshold" in s:
        return s["est"] is not None and s["threshold"] is not None and float(s["est"]) > float(s["threshold"])
    return bool(s["alert"])


def score(cases: list[dict[str, Any]], sensor: str | None) -> dict[str, Any]:
    tp = fp = caught = episodes = 0
    delays: list[float] = []
    nuisance = {"cloudy": 0, "snowy": 0, "hazy": 0, "radar_on_snow_days": 0}
    for case in cases:
        windows = [(_day(e["start"]), _day(e["end"]) + timedelta(days=ALERT_GRACE_DAYS)) for e in case["surges"]]
        starts = [_day(e["start"]) for e in case["surges"]]
        hit = [False] * len(windows)
        first: list[float | None] = [None] * len(windows)
        for when, scene in _detections(case, sensor):
            inside = [i for i, (a, b) in enumerate(windows) if a <= when.date() <= b]
            if inside:
                tp += 1
                for i in inside:
                    hit[i] = True
                    d = (when - datetime.combine(starts[i], datetime.min.time(), tzinfo=UTC)).total_seconds() / 86400
                    first[i] = d if first[i] is None else min(first[i], d)
            else:
                fp += 1
                if scene is not None and scene["sensor"] == S2:
                    nuisance["cloudy"] += scene["cloud"] > 0.0
                    nuisance["snowy"] += scene["snow"]
                    nuisance["hazy"] += scene["haze"] > 0.0
                elif scene is not None and scene["snow"]:
                    nuisance["radar_on_snow_days"] += 1
        episodes += len(windows)
        caught += sum(hit)
        delays += [d for d in first if d is not None]
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = caught / episodes if episodes else math.nan
    f1 = 2 * precision * recall / (precision + recall) if precision and recall and not math.isnan(precision) else 0.0
    out: dict[str, Any] = {"episodes": episodes, "caught": caught, "alerts": tp + fp, "false_alerts": fp,
                           "precision": precision, "recall": recall, "f1": f1,
                           "first_alert_days_median": statistics.median(delays) if delays else math.nan,
                           "first_alert_days_max": max(delays) if delays else math.nan,
                           "false_on_cloudy_snowy_hazy": nuisance}
    if sensor is None:
        return out
    def scored(scenes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The scenes whose counts are scored: clear, estimated, not a calibration scene."""
        return [s for s in scenes if s["sensor"] == sensor and s["est"] is not None
                and s["status"] in ("ok", "partial") and not s["calibration"] and _clear(s)]

    clear = [s for c in cases for s in scored(c["scenes"])]
    est = [float(s["est"]) for s in clear]
    tru = [float(s["truth"]) for s in clear]
    surge = [(float(s["est"]), float(s["truth"])) for s in clear if s["surge"]]
    covered = [s["low"] <= s["truth"] <= s["high"] for s in clear if s["low"] is not None and s["high"] is not None]
    # The same intervals before calibration (the physical model alone), where the run recorded them.
    covered_raw = [s["uncalibrated"][1] <= s["truth"] <= s["uncalibrated"][2]
                   for s in clear if s.get("uncalibrated") and None not in s["uncalibrated"]]
    # The naive guess: the usual level, i.e. the median of the AOI's own calibration counts, for every scene.
    naive_e, naive_t, naive_se, naive_st = [], [], [], []
    for c in cases:
        own = [n for s_, _a, n in c["counts"] if s_ == sensor]
        if not own:
            continue
        usual = statistics.median(own)
        for s in scored(c["scenes"]):
            naive_e.append(usual)
            naive_t.append(float(s["truth"]))
            if s["surge"]:
                naive_se.append(usual)
                naive_st.append(float(s["truth"]))
    # The same scenes with the best scale per archive instead of the one three counts gave: what a perfect
    # calibration could reach; the gap to the figures above is the calibration's share of the error.
    best_e, best_t, best_se, best_st = [], [], [], []
    for c in cases:
        own = scored(c["scenes"])
        k = _best_scale([float(s["est"]) for s in own], [float(s["truth"]) for s in own])
        for s in own:
            best_e.append(k * float(s["est"]))
            best_t.append(float(s["truth"]))
            if s["surge"]:
                best_se.append(k * float(s["est"]))
                best_st.append(float(s["truth"]))
    out |= {
        "scenes": len(clear),
        "mape": _mape(est, tru),
        "surge_scenes": len(surge),
        "surge_mape": _mape([e for e, _ in surge], [t for _, t in surge]),
        "spearman": _spearman(est, tru),
        "auc_full_vs_ordinary": _auc([e for e, t in zip(est, tru, strict=True) if t >= FULL_YARD],
                                     [e for e, t in zip(est, tru, strict=True) if t < FULL_YARD]),
        "full_yard_scenes": sum(1 for t in tru if t >= FULL_YARD),
        "coverage80": statistics.fmean(covered) if covered else math.nan,
        "coverage80_uncalibrated": statistics.fmean(covered_raw) if covered_raw else math.nan,
        "naive_mape": _mape(naive_e, naive_t),
        "naive_surge_mape": _mape(naive_se, naive_st),
        "best_scale_mape": _mape(best_e, best_t),
        "best_scale_surge_mape": _mape(best_se, best_st),
        "best_scale_spearman": _spearman(best_e, best_t),
    }
    return out


def replayed(cases: list[dict[str, Any]], *, perfect: bool = False,
             settings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The cases with their alerts decided by the alert rule replayed over the calibrated history
    (what `railwatch reprocess` does after `railwatch calibrate`); with ``perfect``, every usable
    scene's estimate is first replaced by the truth: what a perfect car counter would give on the same
    scenes (clouds, snow, haze and gaps stay). ``settings`` override `[detector]` keys of the rule
    (``--detector``)."""
    import copy

    from railwatch.baseline import replay
    from railwatch.config import DetectorSettings
    from railwatch.domain import Observation

    cfg = DetectorSettings.model_validate(settings or {})
    out = []
    for c in cases:
        c2 = copy.deepcopy(c)
        for s in c2["scenes"]:
            if perfect and s["est"] is not None:
                s["est"] = s["low"] = s["high"] = float(s["truth"])
        obs = [Observation(c["case"]["aoi"], s["sensor"], _ts(s["acquired"]), s["status"],
                           estimated_cars=None if s["est"] is None else float(s["est"]),
                           clear_fraction=s.get("clear_fraction"), geometry_key=s["geometry"]) for s in c2["scenes"]]
        rep = replay(obs, cfg)
        thresholds = {(o.collection, o.acquired): o.metrics.get("threshold_cars") for o in rep.observations}
        for s in c2["scenes"]:
            s["threshold"] = thresholds.get((s["sensor"], _ts(s["acquired"])))
        c2["alerts"] = [{"acquired": e.opened_acquired.strftime("%Y-%m-%dT%H:%M:%SZ"), "sensor": e.sensor}
                        for e in rep.episodes]
        out.append(c2)
    return out


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{100 * v:.0f} %" if pct else f"{v:.2f}"
    return str(v)


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        ("surge episodes caught", "caught", False, lambda r: f"{r['caught']}/{r['episodes']}"),
        ("alerts (false)", "alerts", False, lambda r: f"{r['alerts']} ({r['false_alerts']})"),
        ("alert precision", "precision", True, None),
        ("alert recall", "recall", True, None),
        ("alert F1", "f1", False, None),
        ("first alert, days after start (median / max)", None, False,
         lambda r: f"{_fmt(r['first_alert_days_median'])} / {_fmt(r['first_alert_days_max'])}"),
        ("false alerts opened by optical scenes with cloud / snow / haze", None, False,
         lambda r: "/".join(str(r["false_on_cloudy_snowy_hazy"][k]) for k in ("cloudy", "snowy", "hazy"))),
        ("false alerts opened by radar scenes on snow days", None, False,
         lambda r: str(r["false_on_cloudy_snowy_hazy"]["radar_on_snow_days"])),
        ("clear scenes scored (surge scenes)", None, False,
         lambda r: f"{r['scenes']} ({r['surge_scenes']})" if "scenes" in r else "–"),
        ("car-count MAPE (naive usual level)", None, False,
         lambda r: f"{_fmt(r['mape'], True)} ({_fmt(r['naive_mape'], True)})" if "mape" in r else "–"),
        ("surge-scene MAPE (naive usual level)", None, False,
         lambda r: f"{_fmt(r['surge_mape'], True)} ({_fmt(r['naive_surge_mape'], True)})" if "mape" in r else "–"),
        ("Spearman (naive: –)", "spearman", False, None),
        ("AUC full yard (>=40) vs ordinary (naive 0.50)", None, False,
         lambda r: f"{_fmt(r['auc_full_vs_ordinary'])} (n={r['full_yard_scenes']})" if "mape" in r else "–"),
        ("80 % interval coverage", "coverage80", True, None),
        ("80 % interval coverage before calibration (physical model alone)", "coverage80_uncalibrated", True, None),
        ("oracle: best scale per archive (all truth): MAPE / surge MAPE / Spearman", None, False,
         lambda r: (f"{_fmt(r['best_scale_mape'], True)} / {_fmt(r['best_scale_surge_mape'], True)} / "
                    f"{_fmt(r['best_scale_spearman'])}") if "mape" in r else "–"),
    ]
    names = list(results)
    width = max(len(r[0]) for r in rows) + 2
    lines = ["| metric | " + " | ".join(names) + " |", "| --- | " + " | ".join("---" for _ in names) + " |"]
    for label, key, pct, fn in rows:
        cells = []
        for n in names:
            r = results[n]
            if fn is not None:
                cells.append(fn(r))
            else:
                cells.append(_fmt(r.get(key), pct) if key in r else "–")
        lines.append(f"| {label:<{width}}| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _detector_overrides(pairs: Sequence[str], ap: argparse.ArgumentParser) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as validated `[detector]` settings (a bad key or value is a usage error)."""
    from pydantic import ValidationError

    from railwatch.config import DetectorSettings

    raw: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            ap.error(f"--detector takes KEY=VALUE, not {pair!r}")
        if key.strip() not in RULE_KEYS:
            ap.error(f"--detector {key.strip()}: not a setting of the alert rule (the backfill is not re-run); "
                     f"one of {', '.join(RULE_KEYS)}")
        raw[key.strip()] = value.strip()
    try:
        return DetectorSettings.model_validate(raw).model_dump(include=set(raw))
    except ValidationError as exc:
        err = exc.errors()[0]
        ap.error(f"--detector {'.'.join(str(x) for x in err['loc'])}: {err['msg']}")
    return {}  # not reached: ap.error exits


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=sorted(SPLITS), default="report",
                    help="tune: seeds 100-109 (for tuning); report: seeds 200-209 (held out, default)")
    ap.add_argument("--full", action="store_true", help="every shipped AOI and all ten seeds of the split")
    ap.add_argument("--aoi", action="append", help="only these AOIs (repeatable)")
    ap.add_argument("--seeds", type=int, help="number of seeds of the split per AOI (default 3, all with --full)")
    ap.add_argument("--cases", type=int, help="only the first N cases of the plan (quick iterations; default: all)")
    ap.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="cases run in parallel")
    ap.add_argument("--work", default=str(REPO / "bench" / "out" / "accuracy"),
                    help="working folder (archives are kept and reused between runs)")
    ap.add_argument("--json", help="also write every figure and every scene to this JSON file")
    ap.add_argument("--rescore", action="store_true", help="score the cases saved by the last run without running them")
    ap.add_argument("--detector", action="append", default=[], metavar="KEY=VALUE",
                    help="replay the alert rule with this [detector] setting of the rule (repeatable, e.g. "
                         "alert_sigma=2.0; with --rescore a what-if in seconds): " + ", ".join(RULE_KEYS))
    args = ap.parse_args(argv)
    overrides = _detector_overrides(args.detector, ap)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cases = plan(args.split, args.full, args.aoi, args.seeds)
    if args.cases:
        cases = cases[: args.cases]
    if not args.rescore:
        print(f"split {args.split}: seeds {SPLITS[args.split][0]}-{SPLITS[args.split][-1]} "
              f"({'tuning' if args.split == 'tune' else 'held out, never tuned on'}); {len(cases)} case(s): "
              + ", ".join(c.name for c in cases), file=sys.stderr)
    t0 = time.monotonic()
    saved = work / f"cases-{args.split}.json"
    if args.rescore:
        done = json.loads(saved.read_text())
    else:
        done = []
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(run_case, c, work): c for c in cases}
            for fut, c in futures.items():
                res = fut.result()
                print(f"  {c.name}: {res['seconds']} s", file=sys.stderr)
                done.append(res)
        saved.write_text(json.dumps(done))
    calibrated = replayed(done, settings=overrides)
    results = {"all sensors (alerts)": score(calibrated, None), "Sentinel-2": score(calibrated, S2),
               "Sentinel-1": score(calibrated, S1),
               "ceiling: perfect counts, same rule": score(replayed(done, perfect=True, settings=overrides), None)}
    backfill_alerts = score(done, None)
    print(f"\nrailwatch accuracy benchmark — split {args.split} (seeds {', '.join(str(s) for s in sorted({c['case']['seed'] for c in done}))}), "
          f"AOIs {', '.join(sorted({c['case']['aoi'] for c in done}))}; "
          f"{sum(1 for c in done if not c['case']['quiet'])} surge case(s) of {DAYS} days, "
          f"{sum(1 for c in done if c['case']['quiet'])} quiet year(s); {time.monotonic() - t0:.0f} s"
          + (f"; alert rule replayed with {', '.join(args.detector)}" if overrides else "") + "\n")
    print(table(results))
    print(f"\nDuring the uncalibrated backfill (before the three counts) the service opened {backfill_alerts['alerts']} "
          f"alert(s), {backfill_alerts['false_alerts']} false (F1 {_fmt(backfill_alerts['f1'])}); the table scores the "
          "calibrated pipeline: the alert rule replayed over the calibrated history, as `railwatch reprocess` does.")
    print("\nAlerts: the service's alerts (all sensors); per sensor: runs of elevated scenes of that sensor; ceiling: "
          "the alert rule fed the true count on every scene the pipeline could use (clouds, snow, haze and gaps "
          "stay). A surge is "
          f"caught when an alert opens between its start and its end + {ALERT_GRACE_DAYS:.0f} days. Counts: clear "
          f"scenes (Sentinel-2 without cloud, snow or haze), after calibration with {CALIBRATION_COUNTS} counts per "
          "sensor and AOI, the calibration scenes left out.")
    if args.json:
        Path(args.json).write_text(json.dumps({"split": args.split, "results": results, "cases": done}, indent=1,
                                              default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
