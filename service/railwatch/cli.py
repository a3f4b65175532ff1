"""The railwatch command line: parse, call, print. Logs go to stderr, results to stdout.

Exit codes: 0 success, 1 the command ran but something failed, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from railwatch import __version__
from railwatch.domain import Aoi, iso, utc
from railwatch.errors import AoiError, ConfigError, CredentialsError, RailwatchError, StoreError

log = logging.getLogger("railwatch")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

HELP = """\
railwatch watches rail traffic at border crossings from Sentinel-1 (radar) and Sentinel-2
(optical) imagery. For each area of interest (AOI, a GeoJSON file in aoi/) it finds new scenes,
measures activity on the rail-track pixels against a reference of the same place, estimates rail
cars, compares them with a rolling baseline and opens an alert when activity is unusual.

Start here:
  railwatch demo                       simulate a surge at Tumangang–Khasan and catch it (no network)
  railwatch aoi validate               check the AOI files
  railwatch backfill --aoi ID          process the archive (or provider) history of one AOI
  railwatch run --once                 one polling pass over every AOI
  railwatch history --aoi ID           one row per scene
  railwatch alerts                     the alerts (`alerts ack ID`, `alerts dismiss ID --reason …`)
  railwatch report --aoi ID            chart, before/after quicklooks, GeoJSON and an HTML page
  railwatch silence add --aoi ID ...   no notifications for an AOI until a date
  railwatch status                     per AOI: last scene, activity, baseline, open alerts

Configuration: config/railwatch.toml (or --config PATH, or $RAILWATCH_CONFIG); any key can be
overridden with RAILWATCH_<SECTION>__<KEY>. Listings take --format table|json|csv.
Exit codes: 0 ok, 1 something failed, 2 usage or configuration error.
"""


class UsageError(RailwatchError):
    """A command line that cannot be carried out as given (exit code 2)."""


# --- output ---------------------------------------------------------------------------------
def _stdout_console() -> Any:
    from rich.console import Console

    return Console(soft_wrap=False, width=max(100, shutil.get_terminal_size((140, 20)).columns))


def rich_escape(text: str) -> str:
    """Text that rich prints as it is: a message naming a config section (``[imagery.stac] url``)
    would otherwise be read as markup and vanish."""
    from rich.markup import escape

    return escape(text)


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def emit(rows: list[dict[str, Any]] | dict[str, Any], fmt: str, *, title: str = "",
         columns: Sequence[str] | None = None) -> None:
    """Print rows (or one object) as a rich table, one JSON document, or CSV."""
    if fmt == "json":
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
        return
    items = [rows] if isinstance(rows, dict) else rows
    cols = list(columns or (items[0].keys() if items else []))
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in items:
            w.writerow({k: _cell(r.get(k)) for k in cols})
        sys.stdout.write(buf.getvalue())
        return
    from rich.table import Table

    table = Table(title=title or None, show_lines=False)
    for c in cols:
        table.add_column(c, overflow="fold")
    for r in items:
        table.add_row(*(_cell(r.get(c)) for c in cols))
    if not items:
        _stdout_console().print(f"{title}: nothing to show" if title else "nothing to show")
        return
    _stdout_console().print(table)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.1f}"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v)
    return str(v)


@contextmanager
def progress_bar(label: str, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr; yields a callback (done, total)."""
    if not enabled:
        yield lambda _d, _t: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=_stderr_console(), transient=False) as prog:
        task = prog.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            prog.update(task, completed=done, total=total)

        yield update


# --- logging --------------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    CONTEXT = ("aoi", "scene", "job", "alert", "delivery")

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        for k in self.CONTEXT:
            if hasattr(record, k):
                out[k] = getattr(record, k)
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str, fmt: str) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if fmt == "json":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    else:
        from rich.logging import RichHandler

        handler = RichHandler(console=_stderr_console(), show_path=False, rich_tracebacks=False,
                              log_time_format="%H:%M:%S")
    root.addHandler(handler)
    root.setLevel(level)
    # httpx logs full URLs at INFO (a webhook URL may carry a token): keep it at WARNING.
    for noisy in ("sentinelhub", "urllib3", "rasterio", "matplotlib", "alembic", "apscheduler", "PIL", "httpx",
                  "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


# --- shared helpers -------------------------------------------------------------------------
def _parse_date(text: str) -> datetime:
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an ISO date or datetime (YYYY-MM-DD), got {text!r}") from exc
    return utc(dt)


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from exc


def load(args: argparse.Namespace) -> Any:
    from railwatch.config import load_settings

    settings = load_settings(Path(args.config) if args.config else None)
    setup_logging(args.log_level or settings.logging.level, args.log_format or settings.logging.format)
    return settings


def open_store(settings: Any) -> Any:
    from railwatch.store import Store

    return Store(settings.store.url)


def make_provider(settings: Any) -> Any:
    """The configured imagery provider (one plain mapping from config names to constructors)."""
    from railwatch.imagery.files import FilesProvider

    kind = settings.imagery.provider
    if kind == "files":
        return FilesProvider(settings.imagery.files.root, read_threads=settings.imagery.read_threads)
    if kind == "sentinelhub":
        from railwatch.imagery.sentinelhub import SentinelHubProvider

        return SentinelHubProvider.from_settings(settings)
    if kind == "stac":
        from railwatch.imagery.stac import StacProvider

        return StacProvider.from_settings(settings)
    raise ConfigError([f"[imagery] provider: unknown provider {kind!r}"], source=settings.source)


def load_aois(settings: Any, only: str | None = None) -> tuple[list[Aoi], dict[Path, AoiError]]:
    """Valid AOIs (reporting invalid files), or just ``only``; an unknown id is a usage error."""
    from railwatch.aoi import load_aoi_dir

    scan = load_aoi_dir(settings.aoi.dir, max_area_km2=settings.aoi.max_area_km2)
    for path, err in scan.errors.items():
        log.error("invalid AOI file skipped: %s", err, extra={"aoi": path.stem})
    for aoi_id, warns in scan.warnings.items():
        for w in warns:
            log.warning("AOI %s: %s", aoi_id, w, extra={"aoi": aoi_id})
    if only is None:
        return scan.aois, scan.errors
    chosen = [a for a in scan.aois if a.id == only]
    if not chosen:
        bad = {p: e for p, e in scan.errors.items() if p.stem == only}
        if bad:
            return [], bad
        known = ", ".join(sorted(a.id for a in scan.aois)) or "none"
        raise UsageError(f"no AOI {only!r} in {settings.aoi.dir} (known: {known})")
    return chosen, {}


# --- commands -------------------------------------------------------------------------------
def cmd_config_check(args: argparse.Namespace) -> int:
    from railwatch.config import masked_dump

    settings = load(args)
    data = masked_dump(settings)
    data["source"] = settings.source
    if args.format == "json":
        emit(data, "json")
    else:
        import tomllib  # noqa: F401  (the output below is TOML-like for people)

        _stdout_console().print(f"# configuration from {settings.source}, secrets masked", markup=False)
        _print_toml(data)
    return EXIT_OK


def _print_toml(data: dict[str, Any], prefix: str = "") -> None:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict) and k != "source"}
    if scalars:
        if prefix:
            print(f"\n[{prefix}]")
        for k, v in scalars.items():
            print(f"{k} = {json.dumps(v)}")
    for k, v in data.items():
        if isinstance(v, dict):
            _print_toml(v, f"{prefix}.{k}" if prefix else k)


def cmd_aoi_validate(args: argparse.Namespace) -> int:
    from railwatch.aoi import aoi_summary, load_aoi

    settings = load(args)
    paths = [Path(p) for p in args.paths] or sorted(Path(settings.aoi.dir).glob("*.geojson"))
    if not paths:
        log.error("no AOI files in %s", settings.aoi.dir)
        return EXIT_FAILED
    rows = []
    failed = 0
    for p in paths:
        try:
            aoi, warnings = load_aoi(p, max_area_km2=settings.aoi.max_area_km2)
            s = aoi_summary(aoi)
            rows.append({"file": str(p), "id": aoi.id, "valid": True, "area_km2": round(s["area_km2"], 2),
                         "track_km": round(s["track_km"], 2), "problems": [], "warnings": warnings})
        except AoiError as exc:
            failed += 1
            rows.append({"file": str(p), "id": p.stem, "valid": False, "problems": exc.problems, "warnings": []})
    if args.format == "table":
        for r in rows:
            mark = "[green]valid[/]" if r["valid"] else "[red]INVALID[/]"
            _stdout_console().print(f"{mark} {rich_escape(str(r['file']))}" + (f"  ({r['area_km2']} km², {r['track_km']} km of track)"
                                                              if r["valid"] else ""))
            for prob in r["problems"]:
                _stdout_console().print(f"    [red]✗[/] {rich_escape(prob)}", markup=True, highlight=False)
            for w in r["warnings"]:
                _stdout_console().print(f"    [yellow]![/] {rich_escape(w)}", markup=True, highlight=False)
    else:
        emit(rows, args.format, columns=["file", "id", "valid", "area_km2", "track_km", "problems", "warnings"])
    return EXIT_FAILED if failed else EXIT_OK


def cmd_aoi_list(args: argparse.Namespace) -> int:
    from railwatch.aoi import aoi_summary

    settings = load(args)
    aois, errors = load_aois(settings)
    rows = []
    for a in aois:
        s = aoi_summary(a)
        rows.append({"id": a.id, "name": a.name, "area_km2": round(s["area_km2"], 2), "track_km": round(s["track_km"], 2),
                     "sensors": list(a.settings.get("sensors") or settings.imagery.sensors),
                     "survey": s.get("survey"), "path": str(a.path)})
    emit(rows, args.format, title="AOIs", columns=["id", "name", "area_km2", "track_km", "sensors", "survey", "path"])
    return EXIT_FAILED if errors else EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    from railwatch.imagery.synthetic import SurgeSpec, simulate

    settings = load(args)
    aois, errors = load_aois(settings, args.aoi)
    if not aois:
        raise next(iter(errors.values()))
    try:
        surges = [SurgeSpec.parse(s) for s in args.surge] if args.surge else None
        with progress_bar(f"simulating {args.aoi}", not args.no_progress) as prog:
            result = simulate(aois[0], Path(args.out), days=args.days, seed=args.seed, start=args.start,
                              end=args.end, surges=surges, quiet=args.quiet, progress=prog)
    except (ValueError, FileExistsError) as exc:
        raise UsageError(str(exc)) from exc
    per_sensor = ", ".join(f"{n} {c}" for c, n in result.scenes_per_sensor.items())
    episodes = "; ".join(f"surge {e.number}: {e.start}..{e.end} peak {e.peak_cars} cars" for e in result.episodes)
    _stderr_console().print(f"wrote {result.folder}: {per_sensor} scenes from {result.start} to {result.end}"
                            + (f"; {episodes}" if episodes else "; no surge"), highlight=False)
    return EXIT_OK


def _history_rows(store: Any, aoi_id: str, since: datetime | None = None) -> list[dict[str, Any]]:
    obs = store.observations(aoi_id, since=since)
    alerted = {(e.data.get("sensor"), e.acquired) for e in store.events(aoi_id=aoi_id) if e.acquired is not None}
    rows = []
    for o in obs:
        rows.append({
            "aoi": o.aoi_id,
            "acquired": iso(o.acquired),
            "sensor": o.collection,
            "scene_id": f"{o.collection}_{o.acquired:%Y%m%dT%H%M%SZ}",
            "status": o.status,
            "reason": o.reason,
            "estimated_cars": o.estimated_cars,
            "estimated_cars_low": o.estimated_cars_low,
            "estimated_cars_high": o.estimated_cars_high,
            "baseline_cars": o.metrics.get("baseline_cars"),
            "threshold_cars": o.metrics.get("threshold_cars"),
            "activity": o.activity,
            "clear_fraction": o.clear_fraction,
            "geometry": o.geometry_key,
            "alert": bool(o.metrics.get("elevated")) or (o.collection, o.acquired) in alerted,
            "detector_version": o.detector_version,
        })
    return rows


HISTORY_COLUMNS = ["acquired", "sensor", "status", "estimated_cars", "estimated_cars_low", "estimated_cars_high",
                   "baseline_cars", "alert", "reason"]


def cmd_history(args: argparse.Namespace) -> int:
    settings = load(args)
    load_aois(settings, args.aoi)
    store = open_store(settings)
    emit(_history_rows(store, args.aoi, args.since), args.format, title=f"history of {args.aoi}",
         columns=HISTORY_COLUMNS)
    return EXIT_OK


def _alert_rows(store: Any, aoi_id: str | None = None, states: Sequence[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    names = {}
    for a in store.alerts(aoi_id=aoi_id, states=states):
        rows.append({
            "id": a.id,
            "kind": a.kind,
            "aoi": a.aoi_id,
            "acquired": iso(a.opened_acquired),
            "sensor": a.sensor,
            "state": a.state,
            "estimated_cars": a.estimated_cars,
            "estimated_cars_low": a.estimated_cars_low,
            "estimated_cars_high": a.estimated_cars_high,
            "peak_cars": a.peak_cars,
            "baseline_cars": a.baseline_cars,
            "score": a.score,
            "sensors": list(a.sensors_seen or []),
            "escalated": bool(a.escalated),
            "last_acquired": iso(a.last_acquired),
            "resolved_at": iso(a.resolved_at),
            "opened_at": iso(a.opened_at),
            "notified": not a.suppressed,
            "acknowledged_at": iso(getattr(a, "acknowledged_at", None)),
            "ack_note": getattr(a, "ack_note", None),
            "dismissed_at": iso(getattr(a, "dismissed_at", None)),
            "dismissed_reason": getattr(a, "dismissed_reason", None),
        })
        names[a.id] = a.aoi_id
    return rows


ALERT_COLUMNS = ["id", "kind", "aoi", "acquired", "sensor", "state", "estimated_cars", "peak_cars", "baseline_cars",
                 "sensors", "resolved_at"]


def cmd_alerts(args: argparse.Namespace) -> int:
    """List alerts; `alerts ack ID [--note …]` confirms one, `alerts dismiss ID --reason …` closes a false alarm."""
    if args.action is not None:
        return _alert_feedback(args)
    settings = load(args)
    store = open_store(settings)
    states = ["provisional", "confirmed"] if args.open else None
    emit(_alert_rows(store, args.aoi, states), args.format, title="alerts", columns=ALERT_COLUMNS)
    return EXIT_OK


def _alert_feedback(args: argparse.Namespace) -> int:
    """`alerts ack ID [--note …]` (an analyst confirms it) or `alerts dismiss ID --reason …` (a false alarm:
    closed as `dismissed`, no resolution notice)."""
    from railwatch.clock import SystemClock
    from railwatch.triage import acknowledge, dismiss

    if args.id is None:
        raise UsageError(f"alerts {args.action} needs the alert ID (see `railwatch alerts`)")
    if args.open or args.aoi:
        raise UsageError(f"alerts {args.action} takes an alert ID, not --aoi/--open")
    if args.action == "dismiss":
        if not (args.reason or "").strip():
            raise UsageError("alerts dismiss needs --reason \"…\": why is it a false alarm?")
        if args.note:
            raise UsageError("alerts dismiss takes --reason, not --note")
    elif args.reason:
        raise UsageError("alerts ack takes --note, not --reason")
    settings = load(args)
    store = open_store(settings)
    now = SystemClock().now()
    try:
        if args.action == "ack":
            acknowledge(store, args.id, note=args.note, now=now)
        else:
            gone = dismiss(store, args.id, reason=args.reason, now=now)
            cancelled = (gone.data or {}).get("cancelled_deliveries") or []
            if cancelled:
                _stderr_console().print(
                    f"cancelled {len(cancelled)} queued notification(s) of alert {args.id} "
                    f"(deliveries {', '.join(map(str, cancelled))}: now suppressed)", highlight=False)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    row = next(r for r in _alert_rows(store) if r["id"] == args.id)
    emit(row, args.format, title=f"alert {args.id}",
         columns=["id", "aoi", "state", "acquired", "estimated_cars", "acknowledged_at", "ack_note", "dismissed_at",
                  "dismissed_reason"])
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from railwatch.clock import SystemClock
    from railwatch.store import redact_url
    from railwatch.triage import active_silences, feedback_counts

    settings = load(args)
    aois, errors = load_aois(settings)
    store = open_store(settings)
    polls = store.poll_states()
    now = SystemClock().now()
    month = now.strftime("%Y-%m")
    usage = store.usage()
    silences = active_silences(store, now)
    feedback = feedback_counts(store)
    out_aois = []
    for a in aois:
        obs = store.observations(a.id)
        usable = [o for o in obs if o.usable]
        last = obs[-1] if obs else None
        last_ok = usable[-1] if usable else None
        open_alerts = store.alerts(aoi_id=a.id, states=["provisional", "confirmed"])
        mine = [p for p in polls if p.aoi_id == a.id]
        out_aois.append({
            "aoi": a.id,
            "name": a.name,
            "scenes": len(obs),
            "last_scene": iso(last.acquired) if last else None,
            "last_scene_sensor": last.collection if last else None,
            "last_scene_status": last.status if last else None,
            "last_activity": last_ok.estimated_cars if last_ok else None,
            "last_activity_at": iso(last_ok.acquired) if last_ok else None,
            "baseline_cars": last_ok.metrics.get("baseline_cars") if last_ok else None,
            "open_alerts": [x.id for x in open_alerts],
            "last_poll": iso(max((p.last_poll_at for p in mine if p.last_poll_at), default=None)),
            "last_error": next((p.last_error for p in mine if p.last_error), "") or None,
            "silenced": a.id in silences,
            "silenced_until": iso(silences[a.id].until) if a.id in silences else None,
            "silence": ({"id": silences[a.id].id, "until": iso(silences[a.id].until),
                         "reason": silences[a.id].reason} if a.id in silences else None),
            "alerts_acked": feedback.get(a.id, {}).get("acked", 0),
            "alerts_dismissed": feedback.get(a.id, {}).get("dismissed", 0),
            "requests_month": sum(u.requests for u in usage if u.aoi_id == a.id and u.month == month),
            "processing_units_month": round(sum(u.processing_units for u in usage
                                                if u.aoi_id == a.id and u.month == month), 4),
        })
    budget = settings.imagery.sentinelhub.monthly_pu_budget
    spent = sum(u.processing_units for u in usage if u.month == month)
    status = {
        "version": __version__,
        "store": redact_url(settings.store.url),
        "provider": settings.imagery.provider,
        "aois": out_aois,
        "invalid_aoi_files": {str(p): e.problems for p, e in errors.items()},
        "usage": _usage_by_month(usage),
        "budget": {"month": month, "monthly_pu_budget": budget, "processing_units_spent": round(spent, 4),
                   "paused": bool(budget is not None and spent >= budget)},
    }
    if args.format == "json":
        emit(status, "json")
    else:
        emit(out_aois, args.format, title=f"railwatch {__version__} — store {status['store']}",
             columns=["aoi", "scenes", "last_scene", "last_scene_status", "last_activity", "baseline_cars",
                      "open_alerts", "last_poll", "last_error", "silenced_until", "alerts_acked", "alerts_dismissed"])
        for p, probs in status["invalid_aoi_files"].items():
            _stderr_console().print(f"[red]invalid AOI file[/] {rich_escape(f'{p}: ' + '; '.join(probs))}")
        if status["usage"]:
            emit(status["usage"], args.format, title="provider usage per month",
                 columns=["month", "requests", "processing_units"])
        if status["budget"]["paused"]:
            _stderr_console().print(f"[red]processing-unit budget spent[/] for {month}: polling paused until next month")
    return EXIT_OK


def _usage_by_month(usage: Sequence[Any]) -> list[dict[str, Any]]:
    months: dict[str, dict[str, Any]] = {}
    for u in usage:
        m = months.setdefault(u.month, {"month": u.month, "requests": 0, "processing_units": 0.0, "by_aoi": {}})
        m["requests"] += u.requests
        m["processing_units"] = round(m["processing_units"] + u.processing_units, 4)
        per = m["by_aoi"].setdefault(u.aoi_id, {"requests": 0, "processing_units": 0.0})
        per["requests"] += u.requests
        per["processing_units"] = round(per["processing_units"] + u.processing_units, 4)
    return list(months.values())


def _run_aois(settings: Any, aois: list[Aoi], runner: Callable[[Any, Aoi, Callable[[int, int], None]], Any],
              show_progress: bool) -> tuple[list[Any], int]:
    """Run every AOI, one failure never stopping the others; returns results and the failure count."""
    failures = 0
    results: list[Any] = []
    for a in aois:
        with progress_bar(a.id, show_progress) as prog:
            try:
                res = runner(settings, a, prog)
            except CredentialsError:
                raise
            except RailwatchError as exc:
                log.error("AOI %s failed: %s", a.id, exc, extra={"aoi": a.id})
                failures += 1
                continue
        failures += _record_result(a, res, results)
    return results, failures


def _record_result(a: Aoi, res: Any, results: list[Any]) -> int:
    """Keep one AOI's result and log it; 1 when the AOI's pass failed, else 0."""
    results.append(res)
    log.info("AOI %s: %d scene(s) found, %d new %s%s", a.id, res.found, res.new, dict(res.statuses),
             f", error: {res.error}" if res.error else "", extra={"aoi": a.id})
    return 1 if res.error else 0


def _run_jobs(settings: Any, executor: Any, jobs: list[Any], show_progress: bool) -> tuple[list[Any], int]:
    """Run AOI jobs on the executor ([executor], docs/scale-out.md); returns results and the failure count.

    One at a time (``max_workers = 1`` or a single AOI, local): in this thread with a progress bar of
    scenes per AOI. Otherwise concurrently, with one bar of AOIs done; a credentials error is
    raised once every job has finished.
    """
    if executor.kind == "local" and (executor.max_workers <= 1 or len(jobs) <= 1):
        by_id = {j.aoi.id: j for j in jobs}
        return _run_aois(settings, [j.aoi for j in jobs],
                         lambda _s, a, prog: executor.run_one(by_id[a.id], progress=prog), show_progress)
    done = 0
    with progress_bar(f"{len(jobs)} AOIs, {executor.max_workers} at once ({executor.kind})", show_progress) as prog:
        prog(0, len(jobs))

        def on_done(_outcome: Any) -> None:
            nonlocal done
            done += 1
            prog(done, len(jobs))

        outcomes = executor.map(jobs, on_done=on_done)
    failures = 0
    results: list[Any] = []
    for o in outcomes:
        a = o.job.aoi
        if o.error is not None:
            if isinstance(o.error, CredentialsError):
                raise o.error
            log.error("AOI %s failed: %s", a.id, o.error, extra={"aoi": a.id})
            failures += 1
            continue
        res = o.result
        failures += _record_result(a, res, results)
    return results, failures


def _with_workers(settings: Any, args: argparse.Namespace) -> Any:
    """``--workers N`` overrides ``[executor] max_workers``."""
    workers = getattr(args, "workers", None)
    if workers is not None:
        if not 1 <= workers <= 256:
            raise UsageError(f"--workers: expected a number from 1 to 256, got {workers}")
        settings.executor.max_workers = workers
    return settings


def cmd_backfill(args: argparse.Namespace) -> int:
    from railwatch.clock import SystemClock
    from railwatch.executor import AoiJob, executor_for
    from railwatch.monitor import MISSION_START

    settings = _with_workers(load(args), args)
    aois, errors = load_aois(settings, args.aoi)
    store = open_store(settings)
    since, until = args.since or MISSION_START, args.until or SystemClock().now()
    jobs = [AoiJob(aoi=a, since=since, until=until, suppressed=not args.notify, kind="backfill") for a in aois]
    with executor_for(settings, store, make_provider(settings)) as executor:
        results, failures = _run_jobs(settings, executor, jobs, not args.no_progress)
    events = [e for r in results for e in r.events]
    opened = sum(1 for _, t in events if t == "alert.opened")
    _stderr_console().print(
        f"backfill done: {sum(r.new for r in results)} new scene(s) over {len(results)} AOI(s), {opened} alert(s) opened"
        + ("" if args.notify else " (notifications suppressed; --notify sends them)")
    )
    return EXIT_FAILED if failures or errors else EXIT_OK


#: ``calibrate`` says so when the model's prior holds a sensor's scale more than this factor away from the
#: scale its counts alone give (docs/detector.md §6).
HELD_SCALE_NOTE = 1.25


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Fit the AOI's per-sensor car scale to analysts' counts (CSV `acquired,cars`, ISO date or datetime,
    UTC) matched to the same day's scenes, and update the estimates already recorded. Alerts already
    decided are not sent again. Counts accumulate: a later file adds to the earlier ones."""
    from railwatch.detect.calibrate import CountsError, read_counts
    from railwatch.monitor import Monitor

    settings = load(args)
    aois, errors = load_aois(settings, args.aoi)
    if not aois:
        raise next(iter(errors.values()))
    try:
        counts = read_counts(Path(args.counts))
    except CountsError as exc:
        raise UsageError(str(exc)) from exc
    store = open_store(settings)
    monitor = Monitor(settings, store, make_provider(settings))
    report = monitor.calibrate(aois[0], counts)
    rows = [{"aoi": args.aoi, "sensor": sensor} | info for sensor, info in report["sensors"].items()]
    if args.format == "json":
        emit({"aoi": args.aoi, "counts": len(counts), "sensors": report["sensors"],
              "unmatched": report.get("unmatched", []), "updated_observations": report.get("updated", 0)}, "json")
    else:
        emit(rows, args.format, title=f"calibration of {args.aoi}",
             columns=["aoi", "sensor", "counts", "scale", "counts_scale", "log_sigma", "residual_sd", "error"])
    for sensor, info in report["sensors"].items():
        held, alone = info.get("scale"), info.get("counts_scale")
        if held and alone and abs(math.log(alone / held)) > math.log(HELD_SCALE_NOTE):
            _stderr_console().print(
                f"{sensor}: the counts alone would set a scale of {alone:g}; the model's prior holds it at "
                f"{held:g}, because the counted scenes' own estimates say little (near 0 cars, or far apart). "
                "Counts on busier days, or more of them, settle it.", highlight=False, markup=False)
    if args.format != "json" and report.get("unmatched"):
        _stderr_console().print(f"{len(report['unmatched'])} count(s) matched no scene of that UTC day: "
                                + ", ".join(report["unmatched"]), highlight=False, markup=False)
    if not report["sensors"]:
        _stderr_console().print("no count matched a usable scene: nothing calibrated "
                                "(counts are matched to scenes of the same UTC day; backfill first)")
        return EXIT_FAILED
    return EXIT_FAILED if any("error" in v for v in report["sensors"].values()) else EXIT_OK


def cmd_reprocess(args: argparse.Namespace) -> int:
    """Recompute the recorded observations of an AOI from the archive with the current detector and AOI
    (after an upgrade or an AOI edit). Alerts already sent are not sent again; alerts or events that only
    the new results yield are recorded, their notifications suppressed."""
    from railwatch.detect import DETECTOR_VERSION
    from railwatch.monitor import Monitor

    settings = load(args)
    aois, errors = load_aois(settings, args.aoi)
    if not aois:
        raise next(iter(errors.values()))
    store = open_store(settings)
    monitor = Monitor(settings, store, make_provider(settings))
    with progress_bar(f"reprocess {args.aoi}", not args.no_progress) as prog:
        result = monitor.reprocess(aois[0], args.since, progress=prog)
    opened = sum(1 for _, t in result.events if t == "alert.opened")
    _stderr_console().print(
        f"reprocess done: {result.new} of {result.found} observation(s) recomputed with detector {DETECTOR_VERSION} "
        f"{dict(result.statuses)}; {len(result.events)} new alert event(s) recorded ({opened} opened), "
        "notifications suppressed" + (f"; error: {result.error}" if result.error else ""), highlight=False)
    return EXIT_FAILED if result.error else EXIT_OK


def run_once(settings: Any, store: Any, provider: Any, aois: list[Aoi], show_progress: bool = False) -> int:
    """One polling pass over every AOI on the configured executor; returns the number of AOIs that failed."""
    from railwatch.clock import SystemClock
    from railwatch.executor import executor_for, poll_jobs

    jobs = poll_jobs(settings, aois, SystemClock().now())
    with executor_for(settings, store, provider) as executor:
        _results, failures = _run_jobs(settings, executor, jobs, show_progress)
    try:
        from railwatch.alerts.outbox import dispatch_pending
    except ImportError:
        return failures
    from railwatch.clock import SystemClock

    dispatch_pending(store, settings, now=SystemClock().now())  # the daemon's clock too (RAILWATCH_NOW)
    return failures


def cmd_run(args: argparse.Namespace) -> int:
    settings = _with_workers(load(args), args)
    store = open_store(settings)
    provider = make_provider(settings)
    if args.once:
        aois, errors = load_aois(settings)
        failures = run_once(settings, store, provider, aois, not args.no_progress)
        from railwatch.scheduler import watch_freshness

        watch_freshness(settings, store, provider, aois)
        return EXIT_FAILED if failures or errors else EXIT_OK
    from railwatch.scheduler import run_daemon

    return run_daemon(settings, store, provider)


def cmd_deliveries(args: argparse.Namespace) -> int:
    """List notification deliveries, or send one again now (`deliveries retry ID`)."""
    from railwatch.alerts.outbox import list_deliveries, retry_delivery

    settings = load(args)
    store = open_store(settings)
    if args.action == "retry":
        if args.id is None:
            raise UsageError("deliveries retry needs the delivery ID (see `railwatch deliveries`)")
        info = retry_delivery(store, settings, args.id)
        emit(info.as_dict(), args.format, title=f"delivery {args.id}",
             columns=["id", "subscriber", "event", "state", "attempts", "last_error", "next_attempt"])
        return EXIT_OK if info.state == "delivered" else EXIT_FAILED
    rows = [d.as_dict() for d in list_deliveries(store, failed_only=args.failed)]
    emit(rows, args.format, title="deliveries",
         columns=["id", "subscriber", "event", "aoi_id", "state", "attempts", "last_error", "next_attempt"])
    return EXIT_OK


def cmd_subscribers(args: argparse.Namespace) -> int:
    """List subscribers, or send each (or one) a clearly marked test notification through the real path."""
    from railwatch.alerts.outbox import test_subscriber

    settings = load(args)
    subs = list(settings.subscribers)
    if args.action == "list":
        emit([{"name": x.name, "kind": x.kind, "aois": list(getattr(x, "aois", []) or ["*"]),
               "min_state": getattr(x, "min_state", None), "resolved": getattr(x, "resolved", None)} for x in subs],
             args.format, title="subscribers", columns=["name", "kind", "aois", "min_state", "resolved"])
        return EXIT_OK
    names = [args.name] if args.name else [x.name for x in subs]
    if not names:
        raise UsageError("no [[subscribers]] configured")
    rows = []
    for name in names:
        r = test_subscriber(settings, name)
        rows.append({"subscriber": r.subscriber, "kind": r.kind, "ok": r.ok, "detail": r.detail, "key": r.key})
    emit(rows, args.format, title="test notifications", columns=["subscriber", "kind", "ok", "detail", "key"])
    return EXIT_OK if all(r["ok"] for r in rows) else EXIT_FAILED


def cmd_report(args: argparse.Namespace) -> int:
    """Write activity.png, quicklook-<alert>.png, changes-<alert>.geojson and report.html for one AOI."""
    from railwatch.clock import SystemClock
    from railwatch.evidence import write_report

    settings = load(args)
    aois, errors = load_aois(settings, args.aoi)
    if not aois:
        raise next(iter(errors.values()))
    store = open_store(settings)
    out = Path(args.out or Path("reports") / args.aoi)
    # The provider is made only when a quicklook needs scenes (a chart alone needs no credentials).
    result = write_report(store, settings, aois[0], out, now=SystemClock().now(), since=args.since,
                          latest=args.latest)
    rows = [{"file": str(path), "what": key} for key, path in result.files.items()]
    if args.format == "json":
        emit({"aoi": args.aoi, "out": str(out), "files": {k: str(v) for k, v in result.files.items()},
              "alerts": result.alerts, "problems": result.problems}, "json")
    else:
        emit(rows, args.format, title=f"report of {args.aoi}", columns=["what", "file"])
    for problem in result.problems:
        log.error("report of %s: %s", args.aoi, problem, extra={"aoi": args.aoi})
    return EXIT_FAILED if result.problems else EXIT_OK


SILENCE_COLUMNS = ["id", "aoi", "state", "starts_at", "until", "reason", "created_by", "removed_at"]


def cmd_silence(args: argparse.Namespace) -> int:
    """Silence an AOI's notifications for a while (it keeps recording and opening alerts), list or remove silences."""
    import getpass

    from railwatch.clock import SystemClock
    from railwatch.triage import add_silence, list_silences, remove_silence

    settings = load(args)
    now = SystemClock().now()
    if args.action == "add":
        load_aois(settings, args.aoi)  # an unknown AOI is a usage error
        store = open_store(settings)
        try:
            by = args.by or getpass.getuser()
        except (KeyError, OSError):  # no user name in a bare container
            by = ""
        try:
            info = add_silence(store, args.aoi, until=args.until, reason=args.reason, now=now, created_by=by)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        emit(info.as_dict(now), args.format, title=f"silence {info.id}", columns=SILENCE_COLUMNS)
        return EXIT_OK
    store = open_store(settings)
    if args.action == "remove":
        info = remove_silence(store, args.id, now=now)
        emit(info.as_dict(now), args.format, title=f"silence {info.id} removed", columns=SILENCE_COLUMNS)
        return EXIT_OK
    rows = [x.as_dict(now) for x in list_silences(store, now=now, aoi_id=args.aoi, include_inactive=args.all)]
    emit(rows, args.format, title="silences" if args.all else "silences in force", columns=SILENCE_COLUMNS)
    return EXIT_OK


def cmd_provider_test(args: argparse.Namespace) -> int:
    settings = load(args)
    kind = settings.imagery.provider
    problems: list[str] = []
    if kind == "files":
        root = Path(settings.imagery.files.root)
        if not root.is_dir():
            problems.append(f"[imagery.files] root: {root} is not a folder (create it or run `railwatch simulate`)")
    elif kind == "sentinelhub":
        from railwatch.imagery.sentinelhub import check_sentinelhub

        problems = check_sentinelhub(settings)
    elif kind == "stac":
        from railwatch.imagery.stac import StacProvider

        problems = StacProvider.from_settings(settings).check()
    else:
        make_provider(settings)
    if problems:
        for p in problems:
            _stderr_console().print(f"[red]✗[/] {rich_escape(p)}", highlight=False)
        return EXIT_FAILED
    _stdout_console().print(f"[green]✓[/] provider {kind!r} is reachable and accepts the configured credentials")
    return EXIT_OK


_SHORT_SENSOR = {"sentinel-2-l2a": "S2", "sentinel-1-grd": "S1"}


def _demo_counts(store: Any, aoi_id: str, truth: Path, *, before: date, per_sensor: int = 3) -> Path | None:
    """Analysts' counts for the demo: the simulated truth of ``per_sensor`` usable scenes of each
    sensor, spread over the ordinary days before the surge, written as ``analyst-counts.csv`` beside
    the truth (the format `railwatch calibrate` reads). None when there are too few such scenes."""
    import csv

    if not truth.is_file():
        return None
    with truth.open(encoding="utf-8") as f:
        cars = {(r["sensor"], r["acquired"]): r["cars"] for r in csv.DictReader(f)}
    ordinary = [o for o in store.observations(aoi_id) if o.usable and o.acquired.date() < before - timedelta(days=3)]
    picked: list[tuple[str, str]] = []
    for sensor in _SHORT_SENSOR:
        usable = [o for o in ordinary if o.collection == sensor]
        if len(usable) >= per_sensor:
            step = (len(usable) - 1) / (per_sensor - 1)
            picked += [(sensor, str(iso(usable[round(i * step)].acquired))) for i in range(per_sensor)]
    rows = sorted({(when, cars[(s, when)]) for s, when in picked if (s, when) in cars})
    if not rows:
        return None
    out = truth.with_name("analyst-counts.csv")
    out.write_text("acquired,cars\n" + "".join(f"{w},{c}\n" for w, c in rows), encoding="utf-8")
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    """Simulate the shipped Tumangang–Khasan AOI with a surge, backfill it and show what railwatch saw."""
    from railwatch.config import Settings, load_settings
    from railwatch.imagery.files import FilesProvider
    from railwatch.imagery.synthetic import SurgeSpec, simulate
    from railwatch.monitor import Monitor
    from railwatch.report import write_chart
    from railwatch.store import Store

    base = load_settings(Path(args.config) if args.config else None)
    setup_logging(args.log_level or "WARNING", args.log_format or base.logging.format)
    out = Path(args.out).resolve()
    archive = out / "archive"
    db = out / "railwatch.db"
    if out.exists():
        shutil.rmtree(archive, ignore_errors=True)
        for p in out.glob("railwatch.db*"):
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings.model_validate(base.model_dump(exclude={"secrets", "source"}) | {
        "store": {"url": f"sqlite:///{db}"},
        "imagery": base.imagery.model_dump() | {"provider": "files", "files": {"root": archive}},
    })
    settings.source = "demo"
    aois, errors = load_aois(settings, args.aoi)
    if not aois:
        raise next(iter(errors.values()))
    aoi = aois[0]
    end = datetime.now(UTC).date() if args.end is None else args.end
    surge_start = end - timedelta(days=max(12, args.days // 4))
    surges = [SurgeSpec(surge_start, args.surge_cars, 10)]
    console = _stderr_console()
    console.print(f"[bold]railwatch demo[/]: {aoi.name} — simulating {args.days} days of Sentinel-1/-2 scenes "
                  f"with a surge to ~{args.surge_cars} rail cars from {surge_start}")
    t0 = time.monotonic()
    with progress_bar("simulate", not args.no_progress) as prog:
        simulate(aoi, archive, days=args.days, seed=args.seed, end=end, surges=surges, progress=prog)
    store = Store(settings.store.url)
    monitor = Monitor(settings, store, FilesProvider(archive, read_threads=settings.imagery.read_threads))
    with progress_bar("backfill", not args.no_progress) as prog:
        result = monitor.backfill(aoi, notify=False, progress=prog)
    counts = _demo_counts(store, aoi.id, archive / aoi.id / "truth.csv", before=surge_start)
    if counts is not None:
        from railwatch.detect.calibrate import read_counts

        cal = monitor.calibrate(aoi, read_counts(counts))
        scales = ", ".join(f"{_SHORT_SENSOR.get(k, k)} x{v['scale']:.2f}" for k, v in cal["sensors"].items()
                           if v.get("scale") is not None)
        console.print(f"calibrated with {sum(1 for _ in counts.open()) - 1} analyst counts ({counts.name}: "
                      f"the simulated truth of ordinary days, as an analyst would count them): {scales}",
                      markup=False, highlight=False)
    rows = _history_rows(store, aoi.id)
    short = _SHORT_SENSOR
    compact = [{
        "acquired (UTC)": r["acquired"][:16].replace("T", " "),
        "sensor": short.get(r["sensor"], r["sensor"]),
        "status": r["status"],
        "cars": r["estimated_cars"],
        "80% interval": (f"{r['estimated_cars_low']:.0f}–{r['estimated_cars_high']:.0f}"
                         if r["estimated_cars"] is not None else ""),
        "baseline": r["baseline_cars"],
        "alert": "ALERT" if r["alert"] else "",
    } for r in rows]
    emit(compact, "table", title=f"{aoi.name}: activity per scene")
    alerts = _alert_rows(store, aoi.id)
    emit(alerts, "table", title="alerts",
         columns=["id", "state", "acquired", "sensor", "estimated_cars", "peak_cars", "baseline_cars", "sensors",
                  "resolved_at"])
    for a in alerts:
        _stdout_console().print(
            f"ALERT #{a['id']} ({a['state']}): {aoi.name} opened by the {a['sensor']} scene of {a['acquired']} — "
            f"latest {a['estimated_cars']:.0f} cars against a baseline of {a['baseline_cars']:.0f}, peak {a['peak_cars']:.0f}",
            markup=False, highlight=False,
        )
    chart = write_chart(out / "activity.png", f"{aoi.name} — estimated rail cars (simulated demo)",
                        store.observations(aoi.id), store.alerts(aoi_id=aoi.id))
    elapsed = time.monotonic() - t0
    console.print(
        f"\n{result.new} scenes processed in {elapsed:.0f} s: {dict(result.statuses)}; "
        f"{sum(1 for a in alerts if a['kind'] == 'activity')} alert(s).\n"
        f"  archive  {archive}/{aoi.id}/  (truth.csv: what was simulated)\n"
        f"  store    {db}\n"
        f"  chart    {chart}\n"
        f"Explore it: RAILWATCH_STORE__URL=sqlite:///{db} railwatch history --aoi {aoi.id}",
        markup=False, highlight=False,
    )
    return EXIT_OK if alerts else EXIT_FAILED


# --- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentParser(add_help=False)
    fmt.add_argument("--format", choices=["table", "json", "csv"], default="table",
                     help="table for people (default), json (one document on stdout) or csv")
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    p = argparse.ArgumentParser(prog="railwatch", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"railwatch {__version__}")
    p.add_argument("--config", metavar="PATH", help="TOML configuration (default: $RAILWATCH_CONFIG or config/railwatch.toml)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="override [logging] level")
    p.add_argument("--log-format", choices=["text", "json"], help="override [logging] format")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    d = sub.add_parser("demo", parents=[quiet], help="simulate a surge at Tumangang–Khasan and detect it (no network)",
                       description=cmd_demo.__doc__)
    d.add_argument("--out", default="demo-output", help="working folder of the demo (default: demo-output)")
    d.add_argument("--aoi", default="tumangang-khasan", help="AOI to simulate (default: tumangang-khasan)")
    d.add_argument("--days", type=int, default=150, help="days simulated (default: 150)")
    d.add_argument("--seed", type=int, default=7, help="random seed (default: 7)")
    d.add_argument("--end", type=_day, help="last simulated day (default: today)")
    d.add_argument("--surge-cars", type=int, default=73, help="peak rail cars of the surge (default: 73)")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("config", help="inspect the configuration")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    cc = csub.add_parser("check", parents=[fmt], help="validate and print the resolved configuration, secrets masked")
    cc.set_defaults(func=cmd_config_check)

    a = sub.add_parser("aoi", help="areas of interest")
    asub = a.add_subparsers(dest="aoi_command", metavar="ACTION", required=True)
    av = asub.add_parser("validate", parents=[fmt], help="validate AOI files (exit 1 when any is invalid)")
    av.add_argument("paths", nargs="*", metavar="PATH", help="files to check (default: every file in [aoi] dir)")
    av.set_defaults(func=cmd_aoi_validate)
    al = asub.add_parser("list", parents=[fmt], help="list the configured AOIs")
    al.set_defaults(func=cmd_aoi_list)

    s = sub.add_parser("simulate", parents=[quiet], help="write a realistic simulated archive for an AOI",
                       description="Write <out>/<aoi-id>/<collection>_<time>.tif scenes with rail cars, clouds, "
                                   "haze, snow and speckle, plus truth.csv. The detector never reads the truth.")
    s.add_argument("--aoi", required=True, help="AOI id (a file in [aoi] dir)")
    s.add_argument("--out", required=True, help="archive root to write")
    s.add_argument("--days", type=int, default=365, help="days to simulate (default 365)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--start", type=_day, help="first day (default: so that the period ends today)")
    s.add_argument("--end", type=_day, help="last day (default: today)")
    s.add_argument("--surge", action="append", metavar="DATE:CARS[:DAYS]",
                   help="a surge starting DATE peaking at CARS cars (repeatable; default: one random surge)")
    s.add_argument("--quiet", action="store_true", help="no surge at all (a quiet period)")
    s.set_defaults(func=cmd_simulate)

    b = sub.add_parser("backfill", parents=[quiet], help="process all scenes in a period (alerts recorded, not sent)")
    b.add_argument("--aoi", help="only this AOI (default: all)")
    b.add_argument("--since", type=_parse_date, help="first acquisition date (default: mission start)")
    b.add_argument("--until", type=_parse_date, help="last acquisition date (default: now)")
    b.add_argument("--notify", action="store_true", help="also notify subscribers of alerts opened by this backfill")
    b.add_argument("--workers", type=int, metavar="N", help="AOIs processed at once (default: [executor] max_workers)")
    b.set_defaults(func=cmd_backfill)

    r = sub.add_parser("run", parents=[quiet], help="poll for new imagery (daemon), or one pass with --once")
    r.add_argument("--once", action="store_true", help="one polling pass over all AOIs, then exit")
    r.add_argument("--workers", type=int, metavar="N", help="AOIs polled at once (default: [executor] max_workers)")
    r.set_defaults(func=cmd_run)

    h = sub.add_parser("history", parents=[fmt], help="one row per scene of an AOI")
    h.add_argument("--aoi", required=True)
    h.add_argument("--since", type=_parse_date)
    h.set_defaults(func=cmd_history)

    al2 = sub.add_parser("alerts", parents=[fmt], help="alerts, newest last; `alerts ack ID` / `alerts dismiss ID`",
                         description=cmd_alerts.__doc__)
    al2.add_argument("action", nargs="?", choices=["ack", "dismiss"],
                     help="ack: an analyst confirms alert ID; dismiss: a false alarm, closed without a resolution notice")
    al2.add_argument("id", nargs="?", type=int, help="alert id (for ack and dismiss)")
    al2.add_argument("--aoi")
    al2.add_argument("--open", action="store_true", help="only open alerts")
    al2.add_argument("--note", help="ack: what the analyst saw")
    al2.add_argument("--reason", help="dismiss (required): why it is a false alarm")
    al2.set_defaults(func=cmd_alerts)

    rp = sub.add_parser("report", parents=[fmt], help="activity chart, before/after quicklooks, GeoJSON and an HTML page",
                        description=cmd_report.__doc__)
    rp.add_argument("--aoi", required=True, help="AOI id")
    rp.add_argument("--out", help="folder to write (default: reports/<aoi-id>)")
    rp.add_argument("--since", type=_parse_date, help="only scenes and alerts from this date")
    rp.add_argument("--latest", action="store_true", help="quicklook and GeoJSON of the latest alert only")
    rp.set_defaults(func=cmd_report)

    si = sub.add_parser("silence", help="silence an AOI's notifications for a while", description=cmd_silence.__doc__)
    sisub = si.add_subparsers(dest="action", metavar="ACTION", required=True)
    sia = sisub.add_parser("add", parents=[fmt], help="silence an AOI until a date (alerts are still recorded)")
    sia.add_argument("--aoi", required=True, help="AOI id")
    sia.add_argument("--until", required=True, type=_parse_date,
                     help="when the silence lifts by itself (YYYY-MM-DD = 00:00 UTC that day, or a full ISO time)")
    sia.add_argument("--reason", required=True, help="why (shown in `silence list` and `status`)")
    sia.add_argument("--by", help="who silenced it (default: the current user)")
    sia.set_defaults(func=cmd_silence)
    sil = sisub.add_parser("list", parents=[fmt], help="silences in force (all of them with --all)")
    sil.add_argument("--aoi", help="only this AOI")
    sil.add_argument("--all", action="store_true", help="also expired and removed silences")
    sil.set_defaults(func=cmd_silence)
    sir = sisub.add_parser("remove", parents=[fmt], help="end a silence now")
    sir.add_argument("id", type=int, help="silence id (see `silence list`)")
    sir.set_defaults(func=cmd_silence)

    st = sub.add_parser("status", parents=[fmt], help="per AOI: last scene, activity, baseline, open alerts")
    st.set_defaults(func=cmd_status)

    dl = sub.add_parser("deliveries", parents=[fmt], help="notification deliveries; `deliveries retry ID` sends one now",
                        description=cmd_deliveries.__doc__)
    dl.add_argument("action", nargs="?", choices=["retry"], help="retry: send delivery ID again now")
    dl.add_argument("id", nargs="?", type=int, help="delivery id (for retry)")
    dl.add_argument("--failed", action="store_true", help="only retrying and dead deliveries")
    dl.set_defaults(func=cmd_deliveries)

    sb = sub.add_parser("subscribers", help="email and webhook subscribers", description=cmd_subscribers.__doc__)
    sbsub = sb.add_subparsers(dest="action", metavar="ACTION", required=True)
    sbl = sbsub.add_parser("list", parents=[fmt], help="configured subscribers")
    sbl.set_defaults(func=cmd_subscribers, name=None)
    sbt = sbsub.add_parser("test", parents=[fmt], help="send a marked test notification and report the result")
    sbt.add_argument("name", nargs="?", help="subscriber name (default: all)")
    sbt.set_defaults(func=cmd_subscribers)

    ca = sub.add_parser("calibrate", parents=[fmt], help="fit an AOI's car scale to analysts' counts (CSV acquired,cars)",
                        description=cmd_calibrate.__doc__)
    ca.add_argument("--aoi", required=True, help="AOI id")
    ca.add_argument("counts", metavar="COUNTS.csv", help="CSV with columns acquired,cars (ISO date or datetime, UTC)")
    ca.set_defaults(func=cmd_calibrate)

    rp = sub.add_parser("reprocess", parents=[quiet], help="recompute an AOI's observations with the current detector",
                        description=cmd_reprocess.__doc__)
    rp.add_argument("--aoi", required=True, help="AOI id")
    rp.add_argument("--since", type=_parse_date, help="first acquisition to recompute (default: all)")
    rp.set_defaults(func=cmd_reprocess)

    pv = sub.add_parser("provider", help="the imagery provider")
    psub = pv.add_subparsers(dest="provider_command", metavar="ACTION", required=True)
    pt = psub.add_parser("test", help="check the provider's endpoints and credentials")
    pt.set_defaults(func=cmd_provider_test)
    return p


#: How an error ends a command: message prefix and exit code; the first matching class wins.
ERROR_EXITS: tuple[tuple[type[RailwatchError], str, int], ...] = (
    (ConfigError, "configuration error: ", EXIT_USAGE),
    (UsageError, "", EXIT_USAGE),
    (AoiError, "invalid AOI: ", EXIT_FAILED),
    (CredentialsError, "credentials refused: ", EXIT_FAILED),
    (StoreError, "store error: ", EXIT_FAILED),
    (RailwatchError, "", EXIT_FAILED),
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except RailwatchError as exc:
        prefix, code = next((p, c) for kind, p, c in ERROR_EXITS if isinstance(exc, kind))
        print(f"railwatch: {prefix}{exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return 130
