#!/usr/bin/env python3
"""Pipeline throughput: N AOIs polled end to end against a slow fake Sentinel Hub, local vs Dask.

Each AOI is a copy of Tumangang–Khasan under its own id, polled once over the last six days of the
simulated month (2024-06-25 … 07-01: one Sentinel-2 and one Sentinel-1 scene, as a real poll every
few days finds), so a poll is a token (once per process), two Catalog searches and two Process
requests, then detection and the store. The fake answers after a realistic latency (token 0.3 s,
Catalog 0.5 s, Process 1.5 s, times ``--latency-scale``) and records the most requests in flight.

For each N and executor it prints AOIs per hour, requests, the most requests in flight against the
cap, and the provider-bound ideal: the sum of the requests' latencies divided by the cap, the least
time any client can take when the provider serves at most ``cap`` requests at once. ``ideal/wall``
near 1 means the provider, not railwatch, bounds the throughput.

    .venv/bin/python bench/throughput.py                        # 10 and 100 AOIs, ~5 min on 2 cores
    .venv/bin/python bench/throughput.py --full                 # also 1000 AOIs (~40 min)
    .venv/bin/python bench/throughput.py --aois 10 --latency-scale 0.2 --executors local

The local executor runs ``--workers`` AOI jobs in threads of one process with one provider; the
Dask executor a ``LocalCluster`` of two worker processes with ``--workers``/2 threads each, the cap
held cluster-wide by a ``distributed.Semaphore``. The store is SQLite in a temporary folder
(``--store postgresql://…`` to use PostgreSQL: a fresh database is created and dropped per run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fake import (
    SECRET,
    SECRET_VAR,
    BenchSentinelHub,
    aoi_copies,
    base_aoi,
    simulated_month,
    temp_folder,
    write_config,
)
from tests.fakes.databases import throwaway_database

#: Realistic latencies in seconds (issue 8: token 300 ms, Process 1.5 s; Catalog ~0.5 s).
LATENCY = {"token": 0.3, "catalog": 0.5, "process": 1.5}
WINDOW = (datetime(2024, 6, 25, tzinfo=UTC), datetime(2024, 7, 1, tzinfo=UTC))


def fresh_store(base: str, folder: Path) -> contextlib.AbstractContextManager[str]:
    """A new empty store: a SQLite file in ``folder``, or a throw-away database on the PostgreSQL server."""
    return throwaway_database(base, folder, prefix="rw_bench")


def run_case(fake: BenchSentinelHub, n: int, kind: str, *, cap: int, workers: int, store_base: str,
             latency: dict[str, float], client: Any) -> dict[str, Any]:
    from railwatch.config import load_settings
    from railwatch.executor import AoiJob, DaskExecutor, LocalExecutor, reset_worker_state
    from railwatch.imagery.sentinelhub import SentinelHubProvider
    from railwatch.store import Store

    folder = temp_folder(f"rw-bench-{kind}-{n}-")
    aois = aoi_copies(base_aoi(), n)
    jobs = [AoiJob(a, WINDOW[0], WINDOW[1], suppressed=True, kind="poll") for a in aois]
    with fresh_store(store_base, folder) as url:
        cfg = write_config(folder, fake, store_url=url, cap=cap,
                           executor=f'kind = "{kind}"\nmax_workers = {workers}\nmax_concurrent_requests = {cap}')
        settings = load_settings(cfg, environ={SECRET_VAR: SECRET}, cwd=folder)
        store = Store(url)  # migrated here, before the clock starts
        fake.reset()
        t0 = time.monotonic()
        if kind == "local":
            executor: Any = LocalExecutor(settings, store, SentinelHubProvider.from_settings(settings))
        else:
            executor = DaskExecutor(settings, client=client)
        outcomes = executor.map(jobs)
        wall = time.monotonic() - t0
        executor.close()
        failed = [o for o in outcomes if o.error is not None or not o.result.ok]
        scenes = sum(o.result.new for o in outcomes if o.result is not None)
        observed = sum(len(store.observations(a.id)) for a in aois)
        store.close()
        if kind == "dask":
            client.run(reset_worker_state)  # close the workers' connections to this store
    counts = fake.counts()
    ideal = sum(counts[k] * latency[k] for k in counts) / cap
    return {
        "aois": n, "executor": kind, "workers": workers, "cap": cap, "wall_s": round(wall, 2),
        "aois_per_hour": round(n / wall * 3600), "scenes": scenes, "observed": observed,
        "failed": len(failed), "requests": counts, "max_in_flight": fake.in_flight_max,
        "ideal_s": round(ideal, 2), "ideal_over_wall": round(ideal / wall, 2),
        "pu": round(fake.pu_spent, 3),
        "first_error": (str(failed[0].error or failed[0].result.error)[:200] if failed else None),
    }


def print_table(rows: Sequence[dict[str, Any]], latency: dict[str, float]) -> None:
    lat = ", ".join(f"{k} {v:g} s" for k, v in latency.items())
    print(f"\nPipeline throughput — fake Sentinel Hub latency: {lat}; one poll per AOI (2 scenes)")
    head = (f"{'AOIs':>5} {'executor':>8} {'workers':>7} {'wall s':>8} {'AOIs/hour':>10} {'token':>5} "
            f"{'catalog':>7} {'process':>7} {'in flight':>9} {'ideal s':>8} {'ideal/wall':>10} {'failed':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        q = r["requests"]
        print(f"{r['aois']:>5} {r['executor']:>8} {r['workers']:>7} {r['wall_s']:>8.1f} {r['aois_per_hour']:>10,} "
              f"{q['token']:>5} {q['catalog']:>7} {q['process']:>7} {str(r['max_in_flight']) + '/' + str(r['cap']):>9} "
              f"{r['ideal_s']:>8.1f} {r['ideal_over_wall']:>10.2f} {r['failed']:>6}")
    print("ideal = Σ(requests × latency) / cap: the least time a client can take when the provider serves at most "
          "`cap` requests at once; in flight = the most requests the fake served at once (must reach the cap, "
          "never pass it).")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aois", type=int, nargs="+", default=[10, 100], help="AOI counts (default: 10 100)")
    ap.add_argument("--full", action="store_true", help="also 1000 AOIs")
    ap.add_argument("--executors", default="local,dask", help="comma-separated: local, dask (default: both)")
    ap.add_argument("--cap", type=int, default=4, help="provider requests in flight (default 4)")
    ap.add_argument("--workers", type=int, default=8, help="AOI jobs at once (default 8)")
    ap.add_argument("--latency-scale", type=float, default=1.0,
                    help="multiply the realistic latencies (token 0.3 s, Catalog 0.5 s, Process 1.5 s); default 1")
    ap.add_argument("--store", default=os.environ.get("RAILWATCH_BENCH_POSTGRES_URL", ""),
                    help="PostgreSQL server URL for the store (default: SQLite; or $RAILWATCH_BENCH_POSTGRES_URL)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    sizes = sorted(set(args.aois + ([1000] if args.full else [])))
    kinds = [k.strip() for k in args.executors.split(",") if k.strip()]
    latency = {k: v * args.latency_scale for k, v in LATENCY.items()}
    os.environ[SECRET_VAR] = SECRET  # Dask workers read it from their environment
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")  # here and in the worker processes
    import logging

    logging.basicConfig(level=logging.WARNING)
    for noisy in ("distributed", "railwatch", "rasterio"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    archive = simulated_month()
    fake = BenchSentinelHub(archive, latency=latency, validate=False)
    fake.start()
    client = cluster = None
    rows = []
    try:
        if "dask" in kinds:
            from distributed import Client, LocalCluster

            t0 = time.monotonic()
            cluster = LocalCluster(processes=True, n_workers=2, threads_per_worker=max(1, args.workers // 2),
                                   dashboard_address=":0")
            client = Client(cluster, set_as_default=False)
            client.run(lambda: __import__("railwatch.executor"))  # imports paid before the clock starts
            print(f"Dask LocalCluster: 2 worker processes x {max(1, args.workers // 2)} threads, "
                  f"started in {time.monotonic() - t0:.1f} s (not counted)")
        for n in sizes:
            for kind in kinds:
                row = run_case(fake, n, kind, cap=args.cap, workers=args.workers, store_base=args.store,
                               latency=latency, client=client)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        fake.stop()
    print(f"\nmachine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}; store: {'PostgreSQL' if args.store else 'SQLite'}; "
          f"fake: Process answers rendered once per scene and cached, request validation off")
    print_table(rows, latency)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    bad = [r for r in rows if r["failed"] or r["max_in_flight"] > r["cap"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
