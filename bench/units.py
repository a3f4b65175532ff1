#!/usr/bin/env python3
"""Requests and processing units per AOI-month, per sensor, against the fake Sentinel Hub.

One AOI (Tumangang–Khasan) is polled over the simulated month (2024-06) through the real provider
and Monitor, as ``railwatch backfill`` does, then polled again over the same month. The fake
validates every request against the real API description and bills each Process request by the
documented PU formula from the request itself (output size, evalscript input bands, sample type,
orthorectification), as the service does in ``x-processingunits-spent``. The benchmark checks and
prints:

* requests and PU per sensor for the month (and per scene), with the default cloud filter
  (``max_scene_cloud_percent = 90``: scenes over it are not fetched) and without it;
* that the second poll of the same month sends no Process request and spends no PU (only the
  Catalog searches, which cost no PU);
* that every request asks only for the AOI: Catalog ``bbox`` = the AOI's bounding box, Process
  ``bbox`` and size = the AOI's 10 m UTM grid, and only the bands the detector needs;
* the formula's PU per scene and per month for every shipped AOI (its grid size decides).

    .venv/bin/python bench/units.py          # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fake import (
    CATALOG_PATH,
    MONTH,
    PROCESS_PATH,
    REPO,
    SECRET,
    SECRET_VAR,
    BenchSentinelHub,
    base_aoi,
    simulated_month,
    temp_folder,
    write_config,
)

S2, S1 = "sentinel-2-l2a", "sentinel-1-grd"


def one_month(fake: BenchSentinelHub, cloud: float) -> dict[str, Any]:
    from railwatch.config import load_settings
    from railwatch.geo import aoi_grid
    from railwatch.imagery.sentinelhub import SentinelHubProvider
    from railwatch.monitor import Monitor
    from railwatch.store import Store

    folder = temp_folder("rw-units-")
    cfg = write_config(folder, fake, store_url=f"sqlite:///{folder / 'railwatch.db'}", cap=4, cloud=cloud)
    settings = load_settings(cfg, environ={SECRET_VAR: SECRET}, cwd=folder)
    store = Store(settings.store.url)
    provider = SentinelHubProvider.from_settings(settings)
    aoi = base_aoi()
    monitor = Monitor(settings, store, provider)

    fake.reset()
    first = monitor.backfill(aoi, *MONTH)
    first_requests = list(fake.requests)
    first_pu = fake.pu_spent
    fake.reset()
    second = monitor.backfill(aoi, *MONTH)
    second_requests = list(fake.requests)
    second_pu = fake.pu_spent

    per: dict[str, dict[str, float]] = defaultdict(lambda: {"scenes": 0, "catalog": 0, "process": 0, "pu": 0.0})
    for u in store.usage():
        per[u.collection]["pu"] += u.processing_units
    obs = store.observations(aoi.id)
    for o in obs:
        per[o.collection]["scenes"] += 1
    for r in first_requests:
        if r.status != 200 or not isinstance(r.body, dict):
            continue
        if r.path == CATALOG_PATH:
            per[r.body["collections"][0]]["catalog"] += 1
        elif r.path == PROCESS_PATH:
            per[r.body["input"]["data"][0]["type"]]["process"] += 1

    # Only the AOI: bounding boxes, grid and bands of every request.
    grid = aoi_grid(aoi)
    problems: list[str] = []
    bands: dict[str, list[str]] = {}
    for r in first_requests:
        if not isinstance(r.body, dict):
            continue
        if r.path == CATALOG_PATH:
            if [round(v, 6) for v in r.body["bbox"]] != [round(v, 6) for v in aoi.bbox]:
                problems.append(f"catalog bbox {r.body['bbox']} is not the AOI's {aoi.bbox}")
        elif r.path == PROCESS_PATH:
            box = r.body["input"]["bounds"]["bbox"]
            out = r.body["output"]
            if any(abs(a - b) > grid.transform.a / 2 for a, b in zip(box, grid.bounds, strict=True)):
                problems.append(f"process bbox {box} is not the AOI grid {grid.bounds}")
            if (out.get("width"), out.get("height")) != (grid.width, grid.height):
                problems.append(f"process size {out.get('width')}x{out.get('height')} is not {grid.width}x{grid.height}")
            from tests.fakes.sentinelhub_server import parse_evalscript

            bands[r.body["input"]["data"][0]["type"]] = parse_evalscript(r.body["evalscript"]).inputs
    store.close()
    return {
        "cloud_filter": cloud, "per_sensor": {k: dict(v) for k, v in sorted(per.items())},
        "first": {"new": first.new, "found": first.found, "requests": len([r for r in first_requests if r.status == 200]),
                  "pu": round(first_pu, 4)},
        "second": {"new": second.new, "process_requests": len([r for r in second_requests if r.path == PROCESS_PATH]),
                   "catalog_requests": len([r for r in second_requests if r.path == CATALOG_PATH]),
                   "pu": round(second_pu, 4)},
        "grid": f"{grid.width}x{grid.height}", "bands": bands, "problems": problems,
    }


def shipped_aois() -> list[dict[str, Any]]:
    from railwatch.aoi import load_aoi
    from railwatch.geo import aoi_grid
    from railwatch.imagery.sentinelhub import request_units

    rows = []
    for path in sorted((REPO / "aoi").glob("*.geojson")):
        aoi, _problems = load_aoi(path)
        if aoi is None:
            continue
        grid = aoi_grid(aoi)
        s2, s1 = request_units(S2, grid), request_units(S1, grid)
        rows.append({"aoi": aoi.id, "grid": f"{grid.width}x{grid.height}", "km2": round(grid.width * grid.height / 1e4, 1),
                     "pu_s2_scene": round(s2, 4), "pu_s1_scene": round(s1, 4),
                     # revisit of the simulated month: 6 Sentinel-2 and 5 Sentinel-1 acquisitions
                     "pu_month": round(6 * s2 + 5 * s1, 2)})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("railwatch").setLevel(logging.ERROR)

    fake = BenchSentinelHub(simulated_month(), validate=True)
    fake.start()
    try:
        runs = [one_month(fake, 90.0), one_month(fake, 100.0)]
    finally:
        fake.stop()
    shipped = shipped_aois()

    print("\nRequests and processing units per AOI-month (Tumangang–Khasan, simulated 2024-06, fake Sentinel Hub "
          "billing by the documented formula)")
    head = f"{'cloud filter':>12} {'sensor':>15} {'scenes':>6} {'catalog':>7} {'process':>7} {'PU':>8} {'PU/scene':>8}"
    print(head)
    print("-" * len(head))
    for run in runs:
        total = {"scenes": 0, "catalog": 0, "process": 0, "pu": 0.0}
        for sensor, v in run["per_sensor"].items():
            for k in total:
                total[k] += v[k]
            print(f"{run['cloud_filter']:>11g}% {sensor:>15} {v['scenes']:>6.0f} {v['catalog']:>7.0f} {v['process']:>7.0f} "
                  f"{v['pu']:>8.3f} {v['pu'] / max(v['process'], 1):>8.4f}")
        print(f"{run['cloud_filter']:>11g}% {'month':>15} {total['scenes']:>6.0f} {total['catalog']:>7.0f} "
              f"{total['process']:>7.0f} {total['pu']:>8.3f}")
    print("(+1 token request per provider session; Catalog searches cost requests, not PU; a scene over the "
          "cloud filter's limit is dropped by the Catalog search and never fetched)")
    for run in runs:
        s = run["second"]
        print(f"second poll of the same month (cloud filter {run['cloud_filter']:g}%): {s['new']} new scene(s), "
              f"{s['process_requests']} Process request(s), {s['catalog_requests']} Catalog request(s), {s['pu']:g} PU")
    run = runs[0]
    print(f"every request only for the AOI: Catalog bbox = AOI bbox, Process bbox and size = AOI grid {run['grid']} "
          f"(10 m UTM): {'yes' if not run['problems'] else 'NO: ' + '; '.join(run['problems'][:3])}")
    for sensor, names in sorted(run["bands"].items()):
        print(f"bands requested for {sensor}: {', '.join(names)} (dataMask is free)")
    print("\nPU per scene and per month for the shipped AOIs (formula; month = 6 Sentinel-2 + 5 Sentinel-1 "
          "acquisitions, as simulated)")
    head = f"{'AOI':>28} {'grid':>11} {'grid km²':>8} {'PU/S2 scene':>11} {'PU/S1 scene':>11} {'PU/month':>9}"
    print(head)
    print("-" * len(head))
    for r in shipped:
        print(f"{r['aoi']:>28} {r['grid']:>11} {r['km2']:>8} {r['pu_s2_scene']:>11.4f} {r['pu_s1_scene']:>11.4f} "
              f"{r['pu_month']:>9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "shipped": shipped}, indent=2) + "\n")
    ok = all(not r["problems"] and r["second"]["process_requests"] == 0 and r["second"]["pu"] == 0 for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
