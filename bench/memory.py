#!/usr/bin/env python3
"""Memory benchmark: peak RSS of a backfill of a large AOI, in a child process.

Writes a synthetic AOI (a square with a rail line every kilometre, see bench/kernel.py) and a
realistic archive — Sentinel-2 every 5 days and Sentinel-1 from two orbit geometries every 6 days —
then runs ``Monitor.backfill`` over it, exactly as ``railwatch backfill`` does, in a fresh child
process, and reports the child's peak resident set size (``ru_maxrss``), its RSS before the first
scene (Python and the libraries), the time per scene and how often a scene was read (reference
scenes that fell out of the byte-bounded scene cache are read again).

    .venv/bin/python bench/memory.py                 # 100 km², 60 days (32 scenes), ~3 min on 2 cores
    .venv/bin/python bench/memory.py --full          # 400 km² (~2000 x 2000 px), 120 days (64 scenes)
    .venv/bin/python bench/memory.py --unbounded     # also run with an unbounded scene cache, to compare

Target (issue 8): peak RSS under 1.5 GiB at 400 km².
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kernel  # bench/kernel.py: the synthetic AOI and archive, the measured backfill)

TARGET_BYTES = int(1.5 * 2**30)
S1_GEOMETRIES = (("descending", 61, 21), ("ascending", 134, 9))


def run(km2: float, days: int, work: Path, *, unbounded: bool, inline: bool = False) -> list[dict[str, Any]]:
    folder = work / kernel.aoi_id(km2)
    folder.mkdir(parents=True, exist_ok=True)
    aoi_path = kernel.write_aoi(folder, km2)
    aoi = kernel.load(aoi_path)
    archive = folder / "archive"
    t = time.perf_counter()
    n = kernel.write_archive(aoi, archive, days // 5, days // 6, s1_geometries=S1_GEOMETRIES)
    print(f"  {km2:g} km²: {n} scenes written in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    out = []
    for label, budget in (("bounded", None), *((("unbounded", 2**62),) if unbounded else ())):
        t = time.perf_counter()
        res = kernel._call(inline, kernel.measure_railwatch, str(aoi_path), str(archive), str(folder), budget)
        scenes = res["scenes"]
        out.append({
            "km2": km2, "cache": label, "cache_bytes": res["cache_bytes"], "grid_px": res["grid_px"],
            "scenes": len(scenes), "reads": res["reads"], "statuses": res["statuses"],
            "s2_s": statistics.median(s["seconds"] for s in kernel.steady(scenes, kernel.S2)),
            "s1_s": statistics.median(s["seconds"] for s in kernel.steady(scenes, kernel.S1)),
            "wall_s": res["wall_s"], "masks_s": res["masks_s"], "rss_start": res["rss_start"],
            "peak_rss": res["peak_rss"],
        })
        print(f"  {label}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return out


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = (f"{'km²':>5} {'grid Mpx':>8} {'cache':>9} {'budget MiB':>10} {'scenes':>6} {'reads':>5} "
            f"{'S2 s/scene':>10} {'S1 s/scene':>10} {'backfill s':>10} {'RSS start MiB':>13} {'peak RSS MiB':>12} "
            f"{'< 1.5 GiB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        budget = "-" if r["cache_bytes"] is None or r["cache_bytes"] >= 2**60 else f"{r['cache_bytes'] / 2**20:.0f}"
        lines.append(
            f"{r['km2']:>5g} {r['grid_px'] / 1e6:>8.2f} {r['cache']:>9} {budget:>10} {r['scenes']:>6} {r['reads']:>5} "
            f"{r['s2_s']:>10.2f} {r['s1_s']:>10.2f} {r['wall_s']:>10.0f} {r['rss_start'] / 2**20:>13.0f} "
            f"{r['peak_rss'] / 2**20:>12.0f} {'yes' if r['peak_rss'] < TARGET_BYTES else 'NO':>9}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="400 km² over 120 days (64 scenes) instead of 100 km² over 60")
    ap.add_argument("--km2", type=float, help="AOI size in km² (overrides the default)")
    ap.add_argument("--days", type=int, help="days of scenes (S2 every 5, S1 every 6 per geometry)")
    ap.add_argument("--unbounded", action="store_true", help="also run with an unbounded scene cache")
    ap.add_argument("--inline", action="store_true", help="run in this process (tests only: RSS is this process's)")
    ap.add_argument("--workdir", type=Path, help="where the archive is written (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    km2 = args.km2 or (400.0 if args.full else 100.0)
    days = args.days or (120 if args.full else 60)
    print(f"memory benchmark: {km2:g} km², {days} days of scenes", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="railwatch-memory-") as tmp:
        rows = run(km2, days, args.workdir or Path(tmp), unbounded=args.unbounded, inline=args.inline)
    print("\nBackfill in a child process: peak RSS (ru_maxrss); reads = scene files read (misses of the scene cache).")
    print(table(rows))
    print(f"Machine: {kernel.os.cpu_count()} CPU(s), {kernel._cpu_name()}.")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
