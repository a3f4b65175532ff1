"""Run the real `railwatch` CLI in a subprocess against files in a temp dir."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RAILWATCH = [sys.executable, "-m", "railwatch"]


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def railwatch(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> Result:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RAILWATCH_")}
    full_env.update({"COLUMNS": "200", "NO_COLOR": "1"})
    full_env.update(env or {})
    p = subprocess.run([*RAILWATCH, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
                       check=False)
    return Result(p.returncode, p.stdout, p.stderr)


def project(tmp: Path, aois: tuple[str, ...] = ("tumangang-khasan",), extra_toml: str = "",
            store_url: str | None = None) -> Path:
    """A working folder with config/railwatch.toml, aoi/ (copies of shipped AOIs) and var/."""
    (tmp / "aoi").mkdir(parents=True, exist_ok=True)
    (tmp / "config").mkdir(exist_ok=True)
    for a in aois:
        shutil.copy(ROOT / "aoi" / f"{a}.geojson", tmp / "aoi" / f"{a}.geojson")
    url = store_url or "sqlite:///var/railwatch.db"
    (tmp / "config" / "railwatch.toml").write_text(
        f'[aoi]\ndir = "aoi"\n[imagery]\nprovider = "files"\n[imagery.files]\nroot = "var/archive"\n'
        f'[store]\nurl = "{url}"\n{extra_toml}'
    )
    return tmp
