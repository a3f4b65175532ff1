"""Helpers for tests that run the real daemon (``railwatch run``) as a subprocess.

A :class:`Site` is a throw-away deployment in a tmp folder: AOI files, a files-provider archive
(hard links into a simulated archive made once per module), a SQLite store and a config with a free
loopback port. A :class:`DaemonProcess` starts ``railwatch --config … run`` there, reads its JSON
log lines, probes /healthz and /metrics, and signals or kills it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
SHIPPED_AOI = REPO / "aoi" / "tumangang-khasan.geojson"
#: The venv's entry point, next to the interpreter running the tests.
RAILWATCH = str(Path(sys.executable).with_name("railwatch"))

T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_aoi(folder: Path, aoi_id: str, *, source: Path = SHIPPED_AOI, **settings: Any) -> Path:
    """A copy of a shipped AOI under another id, its own poll settings dropped (``settings`` added)."""
    doc = json.loads(source.read_text(encoding="utf-8"))
    props = doc["features"][0]["properties"]
    props["id"] = aoi_id
    props["name"] = f"test {aoi_id}"
    for key in ("poll_interval_minutes", "jitter_seconds", "schedule"):
        props.pop(key, None)
    props.update(settings)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{aoi_id}.geojson"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


@dataclass(frozen=True)
class Scene:
    sensor: str
    acquired: datetime
    path: Path

    @property
    def scene_id(self) -> str:
        return f"{self.sensor}_{self.acquired:%Y%m%dT%H%M%SZ}"


def archive_scenes(folder: Path) -> list[Scene]:
    """The scenes of one AOI folder of an archive, in time order, from the simulator's truth.csv."""
    out = []
    with (folder / "truth.csv").open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            when = datetime.fromisoformat(row["acquired"].replace("Z", "+00:00")).astimezone(UTC)
            out.append(Scene(row["sensor"], when, folder / f"{row['sensor']}_{when:%Y%m%dT%H%M%SZ}.tif"))
    return sorted(out, key=lambda s: (s.acquired, s.sensor))


@dataclass
class Site:
    """One deployment in a tmp folder."""

    root: Path
    port: int = field(default_factory=free_port)
    now: str = "2024-07-01T00:00:00Z"
    daemon: dict[str, Any] = field(default_factory=dict)
    subscribers: list[dict[str, Any]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    #: The store; default a SQLite file in the site.
    store_url: str = ""

    def __post_init__(self) -> None:
        self.aoi_dir.mkdir(parents=True, exist_ok=True)
        self.archive.mkdir(parents=True, exist_ok=True)
        self.write_config()

    @property
    def aoi_dir(self) -> Path:
        return self.root / "aoi"

    @property
    def archive(self) -> Path:
        return self.root / "archive"

    @property
    def db(self) -> Path:
        return self.root / "var" / "railwatch.db"

    @property
    def config(self) -> Path:
        return self.root / "railwatch.toml"

    def add_aoi(self, aoi_id: str, scenes: Iterable[Scene], **settings: Any) -> Path:
        """An AOI file plus hard links to ``scenes`` in the archive folder of that id."""
        folder = self.archive / aoi_id
        folder.mkdir(parents=True, exist_ok=True)
        for sc in scenes:
            dest = folder / sc.path.name
            if not dest.exists():
                link_or_copy(sc.path, dest)
        return write_aoi(self.aoi_dir, aoi_id, **settings)

    def write_config(self) -> None:
        daemon = {"poll_interval_minutes": 0.02, "jitter_seconds": 0, "listen": f"127.0.0.1:{self.port}",
                  "rescan_seconds": 3600, "shutdown_grace_seconds": 20, "dispatch_seconds": 0.5} | self.daemon
        lines = [
            "[aoi]", f'dir = "{self.aoi_dir}"',
            "[imagery]", "lookback_days = 400",
            "[imagery.files]", f'root = "{self.archive}"',
            "[store]", f'url = "{self.url}"',
            "[daemon]", *(f"{k} = {json.dumps(v)}" for k, v in daemon.items()),
            "[logging]", 'level = "INFO"', 'format = "json"',
        ]
        for sub in self.subscribers:
            lines.append("[[subscribers]]")
            lines.extend(f"{k} = {json.dumps(v)}" for k, v in sub.items())
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAILWATCH_")}
        env |= {"RAILWATCH_NOW": self.now, "NO_COLOR": "1", "COLUMNS": "200"} | self.env
        return env

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([RAILWATCH, "--config", str(self.config), *args], env=self.environ(),
                              capture_output=True, text=True, timeout=timeout, check=False)

    def cli_json(self, *args: str) -> Any:
        done = self.cli(*args, "--format", "json")
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    @property
    def url(self) -> str:
        """The store's URL: the one given, or the SQLite file ``db``."""
        return self.store_url or f"sqlite:///{self.db}"

    def history(self, aoi_id: str) -> list[dict[str, Any]]:
        return list(self.cli_json("history", "--aoi", aoi_id))

    def alerts(self) -> list[dict[str, Any]]:
        return list(self.cli_json("alerts"))

    def start(self, **kw: Any) -> DaemonProcess:
        return DaemonProcess(self, **kw).start()


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies (Linux ``PR_SET_PDEATHSIG``), so a
    killed test run never leaves a daemon behind."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


class DaemonProcess:
    """``railwatch --config … run`` in a subprocess, its stderr (JSON log lines) in a file."""

    _count = 0

    def __init__(self, site: Site, *, extra_env: Mapping[str, str] | None = None) -> None:
        DaemonProcess._count += 1
        self.site = site
        self.log_path = site.root / f"daemon-{DaemonProcess._count}.log"
        self.extra_env = dict(extra_env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    # --- process ---------------------------------------------------------------------------
    def start(self) -> DaemonProcess:
        env = self.site.environ() | self.extra_env
        with self.log_path.open("wb") as err:
            self.proc = subprocess.Popen([RAILWATCH, "--config", str(self.site.config), "run"], env=env,
                                         stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def wait_exit(self, timeout: float = 30) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon still running after {timeout} s\n{self.tail()}") from None

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; the exit code."""
        if not self.running():
            assert self.proc is not None
            return int(self.proc.returncode)
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def close(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- logs ------------------------------------------------------------------------------
    def text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def tail(self, n: int = 4000) -> str:
        return f"--- daemon log {self.log_path} (tail) ---\n{self.text()[-n:]}"

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.text().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def messages(self, contains: str = "") -> list[str]:
        return [r["message"] for r in self.logs() if contains in r.get("message", "")]

    def scenes_logged(self, aoi_id: str) -> list[str]:
        """Scene ids the pipeline recorded, in log order (the monitor logs each after its commit)."""
        return [r["scene"] for r in self.logs()
                if r.get("logger") == "railwatch.monitor" and r.get("aoi") == aoi_id and "scene" in r]

    def wait_for(self, check: Callable[[], T | None], timeout: float, what: str) -> T:
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = check()
            except OSError:  # the endpoint is not up yet (or is going down)
                value = None
            if value:
                return value
            if not self.running():
                raise AssertionError(f"daemon exited (rc {self.proc.returncode if self.proc else None}) "
                                     f"while waiting for {what}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{self.tail()}")
            time.sleep(0.1)

    def wait_log(self, contains: str, timeout: float = 30, count: int = 1) -> list[str]:
        return self.wait_for(lambda: (m := self.messages(contains)) and len(m) >= count and m, timeout,
                             f"{count} log line(s) with {contains!r}")

    # --- HTTP ------------------------------------------------------------------------------
    def get(self, path: str) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.site.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()

    def healthz(self) -> tuple[int, dict[str, Any]]:
        code, body = self.get("/healthz")
        return code, json.loads(body)

    def wait_healthy(self, timeout: float = 30) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            try:
                code, doc = self.healthz()
            except (OSError, ValueError):
                return None
            return doc if code == 200 else None

        return self.wait_for(probe, timeout, "/healthz 200")

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        """(sample name, labels, value) of every sample on /metrics, parsed by prometheus_client."""
        from prometheus_client.parser import text_string_to_metric_families

        code, body = self.get("/metrics")
        assert code == 200
        return [(s.name, dict(s.labels), float(s.value))
                for fam in text_string_to_metric_families(body.decode()) for s in fam.samples]

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels`` (0 when none)."""
        return sum(v for n, lab, v in self.metrics() if n == name and all(lab.get(k) == x for k, x in labels.items()))


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def link_or_copy(src: str | Path, dest: str | Path) -> None:
    """Hard-link a file (the daemon only reads the archive), copying across file systems."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def copy_tree_links(src: Path, dest: Path) -> None:
    """Hard-link a folder tree."""
    shutil.copytree(src, dest, copy_function=link_or_copy, dirs_exist_ok=True)
