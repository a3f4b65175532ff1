"""pytest fixtures for the provider tests: a simulated source archive, the fakes, providers.

A test module enables them with ``pytest_plugins = ("tests.fakes.fixtures",)``; the constants and
helpers they share live in ``tests.fakes``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from railwatch.domain import Aoi

from . import AOI_FILE, SIM_DAYS, SIM_END, SIM_SEED, SleepRecorder
from .sentinelhub_server import OPENAPI_PATH, FakeSentinelHub
from .stac_server import FakeStac


@pytest.fixture(scope="session")
def tumangang() -> Aoi:
    """The shipped Tumangang–Khasan AOI."""
    from railwatch.aoi import load_aoi

    aoi, problems = load_aoi(AOI_FILE)
    assert not problems, problems
    return aoi


@pytest.fixture(scope="session")
def sim_archive(tmp_path_factory: pytest.TempPathFactory, tumangang: Aoi) -> Path:
    """A month of simulated Sentinel-1/-2 scenes of the AOI: the fakes' source of truth."""
    from railwatch.imagery.synthetic import simulate

    root = tmp_path_factory.mktemp("source-archive")
    simulate(tumangang, root, days=SIM_DAYS, seed=SIM_SEED, end=SIM_END)
    return root


@pytest.fixture(scope="session")
def source_scenes(sim_archive: Path, tumangang: Aoi) -> list[Path]:
    return sorted((sim_archive / tumangang.id).glob("*.tif"))


@pytest.fixture
def openapi_description() -> Path:
    """The real Sentinel Hub API description, or a skip when ../shared/data is absent."""
    if not OPENAPI_PATH.exists():
        pytest.skip(f"{OPENAPI_PATH} absent (shared reference data not available)")
    return OPENAPI_PATH


@pytest.fixture
def fake_sh(sim_archive: Path) -> Iterator[FakeSentinelHub]:
    """A fake Sentinel Hub on 127.0.0.1 serving the simulated archive, three items per Catalog page."""
    from sentinelhub import SentinelHubDownloadClient

    SentinelHubDownloadClient.clear_cache()
    fake = FakeSentinelHub(sim_archive, page_size=3)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
        SentinelHubDownloadClient.clear_cache()


@pytest.fixture
def sleeps() -> SleepRecorder:
    return SleepRecorder()


@pytest.fixture
def make_sh_provider(fake_sh: FakeSentinelHub, tmp_path: Path, sleeps: SleepRecorder) -> Callable[..., Any]:
    """Build a SentinelHubProvider against the fake; keyword arguments override the defaults."""
    from railwatch.imagery.sentinelhub import SentinelHubProvider

    def make(**overrides: Any) -> SentinelHubProvider:
        kwargs: dict[str, Any] = dict(
            client_id=fake_sh.client_id, client_secret=fake_sh.client_secret, archive_root=tmp_path / "archive",
            base_url=fake_sh.base_url, token_url=fake_sh.token_url, max_attempts=4, backoff_seconds=0.02,
            backoff_max_seconds=1.0, timeout_seconds=5.0, sleep=sleeps, max_scene_cloud_percent=100.0,
        )
        kwargs.update(overrides)
        return SentinelHubProvider(**kwargs)

    return make


@pytest.fixture(scope="session")
def _stac_server(sim_archive: Path) -> Iterator[FakeStac]:
    fake = FakeStac(sim_archive, page_size=2)
    fake.start()  # writes ~70 COGs: once per session
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def fake_stac(_stac_server: FakeStac) -> FakeStac:
    """A STAC API on 127.0.0.1 serving the simulated archive as COG assets (two items per page);
    recorded requests and faults are reset for each test."""
    _stac_server.reset()
    return _stac_server


@pytest.fixture
def make_stac_provider(fake_stac: FakeStac, tmp_path: Path) -> Callable[..., Any]:
    """Build a StacProvider against the fake; keyword arguments override the defaults."""
    from railwatch.imagery.stac import StacProvider

    def make(**overrides: Any) -> StacProvider:
        kwargs: dict[str, Any] = dict(
            url=fake_stac.url, archive_root=tmp_path / "stac-archive",
            collections={"sentinel-2-l2a": "sentinel-2-l2a", "sentinel-1-grd": "sentinel-1-rtc"},
            max_attempts=3, backoff_seconds=0.02, timeout_seconds=5.0,
        )
        kwargs.update(overrides)
        return StacProvider(**kwargs)

    return make


__all__ = [
    "_stac_server",
    "fake_sh",
    "fake_stac",
    "make_sh_provider",
    "make_stac_provider",
    "openapi_description",
    "sim_archive",
    "sleeps",
    "source_scenes",
    "tumangang",
]
