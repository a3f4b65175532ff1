"""Shared by bench/throughput.py and bench/units.py: a simulated month served by the fake Sentinel Hub.

The fake is the one of the test suite (``tests/fakes/sentinelhub_server.py``): OAuth token, Catalog
search, Process API rendering real GeoTIFFs, processing units in ``x-processingunits-spent``, the
most requests in flight. :class:`BenchSentinelHub` adds a cache of rendered Process answers keyed by
the request body, so N copies of one AOI cost the fake one rendering per scene: the fake stands for
a remote service, and its CPU must not be counted against ours on a 2-core machine.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "service"))

from tests.fakes import AOI_FILE, SIM_DAYS, SIM_END, SIM_SEED  # noqa: E402
from tests.fakes.sentinelhub_server import CATALOG_PATH, PROCESS_PATH, FakeSentinelHub  # noqa: E402

from railwatch.aoi import load_aoi  # noqa: E402
from railwatch.domain import Aoi  # noqa: E402

SECRET_VAR = "RAILWATCH_BENCH_SH_SECRET"
SECRET = "bench-secret"
#: The simulated month, as in the test suite.
MONTH = (datetime(2024, 5, 31, tzinfo=UTC), datetime(2024, 7, 1, tzinfo=UTC))

__all__ = [
    "CATALOG_PATH",
    "MONTH",
    "PROCESS_PATH",
    "SECRET",
    "SECRET_VAR",
    "BenchSentinelHub",
    "aoi_copies",
    "base_aoi",
    "simulated_month",
    "write_config",
]


def base_aoi() -> Aoi:
    aoi, problems = load_aoi(AOI_FILE)
    assert not problems, problems
    return aoi


def aoi_copies(base: Aoi, n: int) -> list[Aoi]:
    """``n`` AOIs with the base's geometry under their own ids: each is searched and fetched on its own."""
    return [dataclasses.replace(base, id=f"bench-{i:04d}", name=f"bench {i}") for i in range(n)]


def simulated_month(root: Path | None = None) -> Path:
    """The month of Tumangang–Khasan scenes the test suite uses (2024-06, seed 7), simulated once."""
    from railwatch.imagery.synthetic import simulate

    root = root or REPO / "var" / "bench-cache" / f"sim-{SIM_END:%Y%m%d}-{SIM_DAYS}-{SIM_SEED}"
    done = root / "complete"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        simulate(base_aoi(), root, days=SIM_DAYS, seed=SIM_SEED, end=SIM_END)
        done.write_text("ok\n")
    return root


class BenchSentinelHub(FakeSentinelHub):
    """The fake with a cache of rendered Process answers (same body, same answer, same PU)."""

    def __init__(self, archive: Path, *, latency: Mapping[str, float] | None = None, validate: bool = True,
                 page_size: int = 100) -> None:
        kwargs: dict[str, Any] = {} if validate else {"openapi": None}
        super().__init__(archive, client_secret=SECRET, page_size=page_size, latency=latency, **kwargs)
        self._answers: dict[str, tuple[int, dict[str, str], bytes, float]] = {}
        self._render_lock = threading.Lock()

    def process(self, body: dict[str, Any], accept: str) -> tuple[int, dict[str, str], bytes]:
        key = json.dumps(body, sort_keys=True) + "|" + accept
        hit = self._answers.get(key)
        if hit is None:
            with self._render_lock:
                hit = self._answers.get(key)
                if hit is None:
                    status, headers, payload = super().process(body, accept)
                    pu = float(headers.get("x-processingunits-spent", 0.0))
                    with self._lock:
                        self.pu_spent -= pu  # added again below, as for every request
                    hit = (status, dict(headers), payload, pu)
                    if status == 200:
                        self._answers[key] = hit
        status, headers, payload, pu = hit
        with self._lock:
            self.pu_spent += pu
        return status, dict(headers), payload

    def counts(self) -> dict[str, int]:
        """Successful requests by endpoint."""
        with self._lock:
            rows = list(self.requests)
        out = {"token": 0, "catalog": 0, "process": 0}
        for r in rows:
            if r.status != 200:
                continue
            if r.path.endswith("/token"):
                out["token"] += 1
            elif r.path == CATALOG_PATH:
                out["catalog"] += 1
            elif r.path == PROCESS_PATH:
                out["process"] += 1
        return out


def write_config(folder: Path, fake: FakeSentinelHub, *, store_url: str, cap: int, executor: str = "",
                 cloud: float = 100.0, extra: str = "") -> Path:
    """A railwatch TOML for the fake (secret in ``$RAILWATCH_BENCH_SH_SECRET``)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / "railwatch.toml"
    cfg.write_text(
        '[imagery]\nprovider = "sentinelhub"\nlookback_days = 30\n'
        f'[imagery.files]\nroot = "{folder / "archive"}"\n'
        "[imagery.sentinelhub]\n"
        f'base_url = "{fake.base_url}"\ntoken_url = "{fake.token_url}"\nclient_id = "{fake.client_id}"\n'
        f'client_secret_env = "{SECRET_VAR}"\nmax_scene_cloud_percent = {cloud}\nbackoff_seconds = 0.2\n'
        f"max_concurrent_requests = {cap}\ntimeout_seconds = 120\n{extra}"
        f'[store]\nurl = "{store_url}"\n'
        f"[executor]\n{executor}\n"
        '[logging]\nlevel = "WARNING"\n'
    )
    return cfg


def temp_folder(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
