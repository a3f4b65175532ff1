"""The Sentinel Hub provider against a loopback fake Sentinel Hub (real sentinelhub-py, real HTTP).

The fake serves a simulated month of the shipped Tumangang–Khasan AOI; values are compared with
those source files.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import requests

from railwatch.config import load_settings
from railwatch.domain import S1, S2, Aoi
from railwatch.errors import (
    ConfigError,
    CredentialsError,
    ProviderError,
    ProviderUnavailable,
    QuotaExceeded,
    SceneUnreadable,
)
from railwatch.geo import aoi_grid
from railwatch.imagery.archive import scene_path
from railwatch.imagery.sentinelhub import (
    PRESETS,
    SentinelHubProvider,
    check_sentinelhub,
    endpoints,
    group_acquisitions,
    processing_units,
    relative_orbit,
    request_units,
)
from tests.fakes import PERIOD, SleepRecorder
from tests.fakes.sentinelhub_server import CATALOG_PATH, PROCESS_PATH, FakeSentinelHub

SECRET_VAR = "RW_TEST_SH_SECRET"

pytest_plugins = ("tests.fakes.fixtures",)


def _source(sim_archive: Path, aoi: Aoi, scene_id: str) -> Path:
    return sim_archive / aoi.id / f"{scene_id}.tif"


def _all(provider: SentinelHubProvider, aoi: Aoi) -> list[Any]:
    return provider.search(aoi, *PERIOD)


# ------------------------------------------------------------------------------------------ search


def test_search_follows_pages_and_groups_granules(make_sh_provider: Any, fake_sh: FakeSentinelHub, tumangang: Aoi,
                                                  source_scenes: list[Path]) -> None:
    refs = _all(make_sh_provider(), tumangang)
    expected = sorted(p.stem for p in source_scenes)
    s2_items = sum(1 for p in source_scenes if p.stem.startswith(S2)) * fake_sh.s2_granules
    # One ref per acquisition although every Sentinel-2 acquisition came as two tile granules.
    assert sorted(r.scene_id for r in refs) == expected
    assert [r.acquired for r in refs] == sorted(r.acquired for r in refs)
    catalog = fake_sh.requests_to(CATALOG_PATH)
    assert all(r.status == 200 for r in catalog)
    s2_pages = [r for r in catalog if r.body["collections"] == [S2]]
    assert len(s2_pages) == -(-s2_items // fake_sh.page_size) >= 3  # several pages, all fetched
    assert [p.body.get("next") for p in s2_pages] == [None, *range(3, 3 * len(s2_pages) - 2, 3)]
    s2 = [r for r in refs if r.collection == S2]
    assert all(len(r.extra["item_ids"]) == fake_sh.s2_granules for r in s2)
    assert all(r.extra["time_to"] > r.extra["time_from"] for r in s2)


def test_sentinel1_refs_carry_orbit_derived_from_absolute_orbit(make_sh_provider: Any, fake_sh: FakeSentinelHub,
                                                                tumangang: Aoi, sim_archive: Path) -> None:
    refs = [r for r in _all(make_sh_provider(), tumangang) if r.collection == S1]
    assert refs
    for r in refs:
        with rasterio.open(_source(sim_archive, tumangang, r.scene_id)) as ds:
            tags = ds.tags()
        assert r.orbit_direction == tags["ORBIT_DIRECTION"].lower()
        assert r.relative_orbit == int(tags["RELATIVE_ORBIT"])  # the catalogue gave only sat:absolute_orbit
    items = fake_sh.catalog_items(S1)
    assert all("sat:relative_orbit" not in i["properties"] and "sat:absolute_orbit" in i["properties"] for i in items)


def test_search_window_is_exclusive_of_since_inclusive_of_until(make_sh_provider: Any, tumangang: Aoi) -> None:
    provider = make_sh_provider()
    refs = _all(provider, tumangang)
    first, last = refs[0].acquired, refs[-1].acquired
    inner = provider.search(tumangang, first, last)
    assert inner[0].acquired > first
    assert inner[-1].acquired == last
    assert len(inner) == len(refs) - 1


def test_catalog_filters_cloud_and_sentinel1_mode(make_sh_provider: Any, fake_sh: FakeSentinelHub, tumangang: Aoi) -> None:
    make_sh_provider(max_scene_cloud_percent=40.0).search(tumangang, *PERIOD)
    bodies = [r.body for r in fake_sh.requests_to(CATALOG_PATH)]
    s2 = next(b for b in bodies if b["collections"] == [S2])
    s1 = next(b for b in bodies if b["collections"] == [S1])
    assert s2["filter"] == {"op": "<=", "args": [{"property": "eo:cloud_cover"}, 40.0]}
    assert s2["filter-lang"] == "cql2-json"
    terms = {a["args"][0]["property"]: a["args"][1] for a in s1["filter"]["args"]}
    assert terms == {"sar:instrument_mode": "IW", "s1:polarization": "DV", "s1:resolution": "HIGH"}
    cloudy = [i for i in fake_sh.catalog_items(S2) if i["properties"]["eo:cloud_cover"] > 40.0]
    refs = make_sh_provider(max_scene_cloud_percent=40.0).search(tumangang, *PERIOD, collections=[S2])
    assert len(refs) == len(fake_sh.catalog_items(S2)) // fake_sh.s2_granules - len(cloudy) // fake_sh.s2_granules


# ------------------------------------------------------------------------------------------- fetch


def test_fetch_matches_source_on_the_requested_grid_and_is_archived_once(
    make_sh_provider: Any, fake_sh: FakeSentinelHub, tumangang: Aoi, sim_archive: Path, tmp_path: Path
) -> None:
    provider = make_sh_provider()
    refs = _all(provider, tumangang)
    grid = aoi_grid(tumangang)
    for ref in refs:
        raster = provider.fetch(tumangang, ref)
        path = scene_path(tmp_path / "archive", tumangang.id, ref.collection, ref.acquired)
        assert path.exists()
        with rasterio.open(path) as got, rasterio.open(_source(sim_archive, tumangang, ref.scene_id)) as src:
            assert got.crs.to_string() == grid.crs
            assert (got.width, got.height) == (grid.width, grid.height)
            assert np.allclose(got.bounds, grid.bounds, atol=grid.transform.a / 2)
            names = list(src.descriptions)
            for band, values in raster.bands.items():
                expected = src.read(names.index(band) + 1)
                if ref.collection == S2:
                    # Acquisitions of 2024 have processing baseline >= 04.00: the fake adds the +1000
                    # offset unless the request asks for harmonizeValues, so equality proves it did.
                    assert np.array_equal(values.astype(np.uint16), expected), band
                else:
                    exp = np.where(np.isfinite(expected) & (expected != 0), expected, np.nan)
                    assert np.array_equal(values, exp.astype(np.float32), equal_nan=True), band
            if ref.collection == S1:
                assert got.tags()["ORBIT_DIRECTION"] == ref.orbit_direction
                assert int(got.tags()["RELATIVE_ORBIT"]) == ref.relative_orbit
    assert len(fake_sh.requests_to(PROCESS_PATH)) == len(refs)

    # A second provider over the same archive (a restart): search again, fetch everything, no download.
    again = make_sh_provider()
    for ref in _all(again, tumangang):
        again.fetch(tumangang, ref)
    assert len(fake_sh.requests_to(PROCESS_PATH)) == len(refs)
    assert [u for u in again.usage if u.processing_units > 0] == []


def test_process_request_body(make_sh_provider: Any, fake_sh: FakeSentinelHub, tumangang: Aoi) -> None:
    provider = make_sh_provider()
    refs = _all(provider, tumangang)
    s2 = next(r for r in refs if r.collection == S2)
    s1 = next(r for r in refs if r.collection == S1)
    provider.fetch(tumangang, s2)
    provider.fetch(tumangang, s1)
    grid = aoi_grid(tumangang)
    b2, b1 = (r.body for r in fake_sh.requests_to(PROCESS_PATH))
    for body in (b2, b1):
        bounds = body["input"]["bounds"]
        assert bounds["properties"]["crs"] == f"http://www.opengis.net/def/crs/EPSG/0/{grid.crs.split(':')[1]}"
        assert bounds["bbox"] == list(grid.bounds)
        assert (body["output"]["width"], body["output"]["height"]) == (grid.width, grid.height)
        assert body["input"]["data"][0]["dataFilter"]["mosaickingOrder"] == "leastRecent"
    assert b2["input"]["data"][0]["processing"] == {"harmonizeValues": True}
    assert b1["input"]["data"][0]["processing"] == {"orthorectify": True, "backCoeff": "SIGMA0_ELLIPSOID"}
    assert b1["input"]["data"][0]["dataFilter"]["acquisitionMode"] == "IW"
    tr = b2["input"]["data"][0]["dataFilter"]["timeRange"]
    assert tr["from"] <= s2.extra["time_from"]
    assert tr["to"] >= s2.extra["time_to"]
    assert {r["identifier"] for r in b2["output"]["responses"]} == {"bands", "scl"}
    assert all(r.headers["accept"] == "application/x-tar" for r in fake_sh.requests_to(PROCESS_PATH))


def test_fake_validates_bodies_against_the_api_description(openapi_description: Path, fake_sh: FakeSentinelHub) -> None:
    assert fake_sh.validator is not None
    token = requests.post(fake_sh.token_url, data={"grant_type": "client_credentials", "client_id": fake_sh.client_id,
                                                   "client_secret": fake_sh.client_secret}, timeout=5).json()
    assert token["token_type"] == "Bearer"
    assert token["expires_in"] == 3599
    auth = {"Authorization": f"Bearer {token['access_token']}"}
    bad = requests.post(fake_sh.base_url + PROCESS_PATH, json={"input": {"bounds": {"bbox": [1, 2, 3]}, "data": []}},
                        headers=auth, timeout=5)
    assert bad.status_code == 400
    err = bad.json()["error"]
    assert err["code"] == "COMMON_BAD_PAYLOAD"
    assert "evalscript" in err["message"]
    assert "too short" in err["message"]
    cql_text = requests.post(fake_sh.base_url + CATALOG_PATH, headers=auth, timeout=5, json={
        "collections": [S2], "filter": "eo:cloud_cover < 10", "filter-lang": "cql2-text", "limit": 5})
    assert cql_text.status_code == 400  # a POST body filter is CQL2-JSON in the description


# -------------------------------------------------------------------------------------------- faults


def test_429_and_500_are_retried_and_the_run_completes(make_sh_provider: Any, fake_sh: FakeSentinelHub,
                                                        tumangang: Aoi, sleeps: SleepRecorder) -> None:
    fake_sh.add_fault(CATALOG_PATH, times=2, status=500)
    fake_sh.add_fault(PROCESS_PATH, times=2, status=429, retry_after_ms=300)
    fake_sh.add_fault(PROCESS_PATH, times=1, status=503)
    provider = make_sh_provider()
    started = time.monotonic()
    refs = _all(provider, tumangang)
    for ref in refs:
        provider.fetch(tumangang, ref)
    assert time.monotonic() - started < 20
    statuses = [r.status for r in fake_sh.requests_to(PROCESS_PATH)]
    assert statuses[:4] == [429, 429, 503, 200]
    assert statuses.count(200) == len(refs)
    assert sum(1 for s in sleeps.calls if s >= 0.3) >= 2  # Retry-After (milliseconds) honoured
    assert max(sleeps.calls) <= 1.0  # backoff_max_seconds


def test_persistent_server_errors_are_unavailable_and_archive_nothing(make_sh_provider: Any, fake_sh: FakeSentinelHub,
                                                                       tumangang: Aoi, tmp_path: Path) -> None:
    provider = make_sh_provider(max_attempts=3)
    ref = _all(provider, tumangang)[0]
    fake_sh.add_fault(PROCESS_PATH, times=3, status=502)
    with pytest.raises(ProviderUnavailable, match="502 after 3 attempt"):
        provider.fetch(tumangang, ref)
    assert not list((tmp_path / "archive").rglob("*.tif"))
    assert provider.fetch(tumangang, ref).shape == aoi_grid(tumangang).shape  # the next poll succeeds


def test_timeouts_are_bounded(make_sh_provider: Any, fake_sh: FakeSentinelHub, tumangang: Aoi) -> None:
    provider = make_sh_provider(max_attempts=2, timeout_seconds=0.3)
    fake_sh.add_fault(CATALOG_PATH, "slow", times=2, seconds=1.0)
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable, match="timed out after 2 attempt"):
        provider.search(tumangang, *PERIOD)
    assert time.monotonic() - started < 2.0


def test_truncated_answer_is_retried(make_sh_provider: Any, fake_sh: FakeSentinelHub, tumangang: Aoi) -> None:
    provider = make_sh_provider()
    ref = _all(provider, tumangang)[0]
    fake_sh.add_fault(PROCESS_PATH, "truncate", times=1)
    assert provider.fetch(tumangang, ref).shape == aoi_grid(tumangang).shape
    assert len(fake_sh.requests_to(PROCESS_PATH)) == 2


def test_other_4xx_is_a_permanent_scene_error_not_retried(make_sh_provider: Any, fake_sh: FakeSentinelHub,
                                                          tumangang: Aoi) -> None:
    provider = make_sh_provider()
    ref = _all(provider, tumangang)[0]
    fake_sh.add_fault(PROCESS_PATH, times=1, status=400)
    with pytest.raises(ProviderError) as info:
        provider.fetch(tumangang, ref)
    assert type(info.value) is ProviderError
    assert "(400)" in str(info.value)
    assert ref.scene_id in str(info.value)
    assert len(fake_sh.requests_to(PROCESS_PATH)) == 1


def test_corrupt_tiff_is_scene_unreadable_and_not_archived(make_sh_provider: Any, fake_sh: FakeSentinelHub,
                                                           tumangang: Aoi, tmp_path: Path) -> None:
    provider = make_sh_provider()
    ref = _all(provider, tumangang)[0]
    fake_sh.add_fault(PROCESS_PATH, "corrupt", times=1)
    with pytest.raises(SceneUnreadable, match="corrupt GeoTIFF"):
        provider.fetch(tumangang, ref)
    assert not list((tmp_path / "archive").rglob("*.tif"))


def test_wrong_secret_is_a_credentials_error_without_the_secret(make_sh_provider: Any, fake_sh: FakeSentinelHub,
                                                                tumangang: Aoi) -> None:
    secret = "very-wrong-secret-4711"
    provider = make_sh_provider(client_secret=secret, secret_env=SECRET_VAR)
    with pytest.raises(CredentialsError) as info:
        provider.search(tumangang, *PERIOD)
    msg = str(info.value)
    assert "[imagery.sentinelhub] client_id / client_secret_env" in msg
    assert f"${SECRET_VAR}" in msg
    assert secret not in msg
    assert secret not in repr(provider)
    assert not fake_sh.requests_to(CATALOG_PATH)  # stopped at the token endpoint


def test_403_for_a_spent_quota_is_not_a_credentials_error(make_sh_provider: Any, fake_sh: FakeSentinelHub,
                                                          tumangang: Aoi) -> None:
    provider = make_sh_provider()
    ref = _all(provider, tumangang)[0]
    fake_sh.add_fault(PROCESS_PATH, status=403, message="Monthly processing units quota exceeded")
    with pytest.raises(QuotaExceeded, match="quota is spent"):
        provider.fetch(tumangang, ref)
    fake_sh.add_fault(PROCESS_PATH, status=403, message="Insufficient permissions for collection")
    with pytest.raises(CredentialsError, match="answered 403"):
        provider.fetch(tumangang, ref)


def test_revoked_token_is_a_credentials_error(make_sh_provider: Any, fake_sh: FakeSentinelHub, tumangang: Aoi) -> None:
    provider = make_sh_provider()
    ref = _all(provider, tumangang)[0]
    fake_sh.tokens.clear()
    with pytest.raises(CredentialsError, match="answered 401"):
        provider.fetch(tumangang, ref)


# ------------------------------------------------------------------------------------ cost, budget


def test_processing_units_are_accounted_per_aoi_collection_and_month(make_sh_provider: Any, fake_sh: FakeSentinelHub,
                                                                     tumangang: Aoi) -> None:
    provider = make_sh_provider(clock=lambda: datetime(2026, 11, 28, tzinfo=UTC))
    refs = _all(provider, tumangang)
    for ref in refs:
        provider.fetch(tumangang, ref)
    grid = aoi_grid(tumangang)
    n2 = sum(r.collection == S2 for r in refs)
    n1 = sum(r.collection == S1 for r in refs)
    area = grid.width * grid.height / 512**2
    assert request_units(S2, grid) == pytest.approx(area * 5 / 3)
    assert request_units(S1, grid) == pytest.approx(area * 2 / 3 * 2 * 2)
    usage = {u.collection: u for u in provider.usage}
    pages = {c: sum(1 for r in fake_sh.requests_to(CATALOG_PATH) if r.body["collections"] == [c]) for c in (S1, S2)}
    assert usage[S2].requests == n2 + pages[S2]
    assert usage[S1].requests == n1 + pages[S1]
    assert usage[S2].processing_units == pytest.approx(n2 * request_units(S2, grid))
    assert usage[S1].processing_units == pytest.approx(n1 * request_units(S1, grid))
    assert {u.month for u in provider.usage} == {"2026-11"}
    assert {u.aoi_id for u in provider.usage} == {tumangang.id}
    assert provider.spent_this_month == pytest.approx(fake_sh.pu_spent)


def test_budget_stops_before_a_request_that_would_overrun_it(make_sh_provider: Any, fake_sh: FakeSentinelHub,
                                                             tumangang: Aoi) -> None:
    now = [datetime(2026, 11, 28, tzinfo=UTC)]
    provider = make_sh_provider(monthly_pu_budget=5.0, clock=lambda: now[0])
    provider.spent_this_month = 4.5  # seeded by the caller from its store
    ref = next(r for r in _all(provider, tumangang) if r.collection == S2)
    with pytest.raises(QuotaExceeded, match="monthly_pu_budget") as info:
        provider.fetch(tumangang, ref)
    assert "2026-12-01" in str(info.value)
    assert not fake_sh.requests_to(PROCESS_PATH)
    now[0] = datetime(2026, 12, 1, 0, 5, tzinfo=UTC)  # a new month: the budget is fresh
    assert provider.spent_this_month == 0.0
    provider.fetch(tumangang, ref)
    assert provider.spent_this_month == pytest.approx(request_units(S2, aoi_grid(tumangang)))


def test_concurrent_fetches_respect_max_concurrent_requests(make_sh_provider: Any, fake_sh: FakeSentinelHub,
                                                            tumangang: Aoi) -> None:
    provider = make_sh_provider(max_concurrent_requests=2)
    refs = _all(provider, tumangang)[:6]
    fake_sh.add_fault(PROCESS_PATH, "slow", times=6, seconds=0.3)
    errors: list[BaseException] = []

    def work(ref: Any) -> None:
        try:
            provider.fetch(tumangang, ref)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r,)) for r in refs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert fake_sh.in_flight_max == 2
    assert len(fake_sh.requests_to(PROCESS_PATH)) == len(refs)


# -------------------------------------------------------------------------------- pure helpers


def test_processing_unit_formula_minimums() -> None:
    assert processing_units(512, 512, input_bands=3, float32=False) == 1.0
    assert processing_units(512, 512, input_bands=3, float32=True, orthorectify=True) == 4.0
    assert processing_units(10, 10, input_bands=3, float32=False) == pytest.approx(0.01)  # area factor floor
    assert processing_units(10, 10, input_bands=1, float32=False) == 0.005  # per-request floor


def test_relative_orbit_formulas() -> None:
    t = datetime(2024, 6, 1, tzinfo=UTC)
    assert relative_orbit("sentinel-1a", 73, t) == 1
    assert relative_orbit("sentinel-1a", 73 + 175 * 300 + 41, t) == 42
    assert relative_orbit("sentinel-1b", 27 + 174, t) == 175
    assert relative_orbit("SENTINEL-1C", 172 + 9, datetime(2025, 5, 1, tzinfo=UTC)) == 10
    assert relative_orbit("sentinel-1c", 99 + 9, datetime(2026, 8, 1, tzinfo=UTC)) == 10
    assert relative_orbit("sentinel-1c", 500, datetime(2026, 6, 15, tzinfo=UTC)) is None  # manoeuvre
    assert relative_orbit("sentinel-1a", None, t) is None


def test_grouping_splits_platforms_and_passes() -> None:
    t = datetime(2024, 6, 1, 1, 47, 30, 600000, tzinfo=UTC)

    def f(i: str, dt: datetime, platform: str) -> dict[str, Any]:
        return {"id": i, "properties": {"datetime": dt.isoformat(), "platform": platform}}

    refs = group_acquisitions("x", S2, [
        f("a", t, "sentinel-2a"), f("b", t + timedelta(seconds=5), "sentinel-2a"),
        f("c", t + timedelta(seconds=8), "sentinel-2b"), f("d", t + timedelta(days=2), "sentinel-2a")])
    assert [r.extra["item_ids"] for r in refs] == [["a", "b"], ["c"], ["d"]]
    assert refs[0].acquired == datetime(2024, 6, 1, 1, 47, 31, tzinfo=UTC)  # earliest, rounded to the second


# ------------------------------------------------------------------------------ settings, check


def _settings(tmp_path: Path, fake: FakeSentinelHub | None, **sh: Any) -> Path:
    section: dict[str, Any] = {"client_id": fake.client_id if fake else "someone", "client_secret_env": SECRET_VAR}
    if fake is not None:
        section |= {"base_url": fake.base_url, "token_url": fake.token_url}
    section |= sh
    cfg = tmp_path / "rw.toml"
    lines = ["[imagery]", 'provider = "sentinelhub"', "[imagery.files]", f'root = "{tmp_path / "archive"}"',
             "[imagery.sentinelhub]"] + [f"{k} = {json.dumps(v)}" for k, v in section.items()]
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def test_from_settings_presets_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    env = {SECRET_VAR: "s3cret"}
    s = load_settings(_settings(tmp_path, None), environ=env, cwd=tmp_path)
    assert endpoints(s) == PRESETS["cdse"]
    s = load_settings(_settings(tmp_path, None, preset="sentinel-hub"), environ=env, cwd=tmp_path)
    assert endpoints(s) == PRESETS["sentinel-hub"]
    s = load_settings(_settings(tmp_path, None, base_url="https://example.test/"), environ=env, cwd=tmp_path)
    assert endpoints(s) == ("https://example.test", PRESETS["cdse"][1])
    provider = SentinelHubProvider.from_settings(s)
    assert provider._config.sh_base_url == "https://example.test"
    assert provider._config.max_download_attempts == s.imagery.sentinelhub.max_attempts
    assert provider._config.max_retries == s.imagery.sentinelhub.max_attempts
    assert provider.read_threads == s.imagery.read_threads == 2
    assert "s3cret" not in repr(provider)
    assert not (tmp_path / "home" / ".config" / "sentinelhub").exists()  # never touched
    with pytest.raises(ConfigError, match=SECRET_VAR):
        SentinelHubProvider.from_settings(load_settings(_settings(tmp_path, None), environ={}, cwd=tmp_path))


def test_check_sentinelhub(tmp_path: Path, fake_sh: FakeSentinelHub) -> None:
    ok = load_settings(_settings(tmp_path, fake_sh), environ={SECRET_VAR: fake_sh.client_secret}, cwd=tmp_path)
    assert check_sentinelhub(ok) == []
    assert any(r.path == CATALOG_PATH for r in fake_sh.requests)

    wrong = load_settings(_settings(tmp_path, fake_sh), environ={SECRET_VAR: "not-the-secret-123"}, cwd=tmp_path)
    problems = check_sentinelhub(wrong)
    assert problems == [f"token endpoint {fake_sh.token_url} answered 401: client_id or the secret in ${SECRET_VAR} "
                        "is wrong ([imagery.sentinelhub] client_id / client_secret_env)"]
    assert "not-the-secret-123" not in " ".join(problems)

    unset = load_settings(_settings(tmp_path, fake_sh), environ={}, cwd=tmp_path)
    assert check_sentinelhub(unset) == [f"secret variable {SECRET_VAR} not set ([imagery.sentinelhub] client_secret_env)"]

    with socket_closed() as port:
        gone = load_settings(_settings(tmp_path, None, base_url=f"http://127.0.0.1:{port}",
                                       token_url=f"http://127.0.0.1:{port}/token"),
                             environ={SECRET_VAR: "x"}, cwd=tmp_path)
        problems = check_sentinelhub(gone)
    assert problems == [f"cannot reach token endpoint http://127.0.0.1:{port}/token: connection refused"]


class socket_closed:
    """A loopback port with nothing listening on it."""

    def __enter__(self) -> int:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = int(s.getsockname()[1])
        s.close()
        return self.port

    def __exit__(self, *exc: object) -> None:
        return None


# -------------------------------------------------------------------------------- the real CLI


def _cli_project(tmp_path: Path, fake: FakeSentinelHub) -> Path:
    from tests.cli_helpers import project

    root = project(tmp_path / "proj")
    (root / "config" / "railwatch.toml").write_text(
        '[aoi]\ndir = "aoi"\n'
        '[imagery]\nprovider = "sentinelhub"\nlookback_days = 3650\n'
        '[imagery.files]\nroot = "var/archive"\n'
        "[imagery.sentinelhub]\n"
        f'base_url = "{fake.base_url}"\ntoken_url = "{fake.token_url}"\nclient_id = "{fake.client_id}"\n'
        f'client_secret_env = "{SECRET_VAR}"\nbackoff_seconds = 0.05\nmax_attempts = 3\ntimeout_seconds = 20\n'
        '[store]\nurl = "sqlite:///var/railwatch.db"\n'
    )
    return root


def test_cli_backfill_and_run_once_download_each_scene_once(tmp_path: Path, fake_sh: FakeSentinelHub, tumangang: Aoi,
                                                            source_scenes: list[Path]) -> None:
    from tests.cli_helpers import railwatch

    root = _cli_project(tmp_path, fake_sh)
    env = {SECRET_VAR: fake_sh.client_secret}
    fake_sh.add_fault(PROCESS_PATH, times=1, status=429, retry_after_ms=100)
    res = railwatch("backfill", "--aoi", tumangang.id, "--since", "2024-06-01", "--until", "2024-07-01",
                    "--no-progress", cwd=root, env=env)
    assert res.code == 0, res.err
    n_s2 = sum(1 for s in fake_sh.scenes if s.collection == S2 and (s.cloud_cover or 0.0) <= 90.0)  # default filter
    n_s1 = sum(1 for p in source_scenes if p.stem.startswith(S1))
    archived = sorted((root / "var" / "archive" / tumangang.id).glob("*.tif"))
    assert len(archived) == n_s2 + n_s1
    assert [r.status for r in fake_sh.requests_to(PROCESS_PATH)].count(200) == n_s2 + n_s1
    history = railwatch("history", "--aoi", tumangang.id, "--format", "json", cwd=root, env=env)
    assert history.code == 0, history.err
    assert len(history.json()) == n_s2 + n_s1
    # Processing units are recorded per AOI and month, as the fake accounted them.
    status = railwatch("status", "--format", "json", cwd=root, env=env).json()
    row = next(a for a in status["aois"] if a["aoi"] == tumangang.id)
    assert abs(row["processing_units_month"] - fake_sh.pu_spent) < 1e-3
    assert row["requests_month"] >= n_s2 + n_s1
    assert status["usage"][0]["by_aoi"][tumangang.id]["processing_units"] == pytest.approx(fake_sh.pu_spent, abs=1e-3)

    # A new store over the same archive (as after losing the database): every scene is observed
    # again, none is downloaded again.
    (root / "var" / "railwatch.db").unlink()
    res = railwatch("run", "--once", "--no-progress", cwd=root, env=env)
    assert res.code == 0, res.err
    assert [r.status for r in fake_sh.requests_to(PROCESS_PATH)].count(200) == n_s2 + n_s1
    history = railwatch("history", "--aoi", tumangang.id, "--format", "json", cwd=root, env=env)
    assert len(history.json()) == n_s2 + n_s1


def test_cli_wrong_secret_stops_with_exit_1(tmp_path: Path, fake_sh: FakeSentinelHub) -> None:
    from tests.cli_helpers import railwatch

    root = _cli_project(tmp_path, fake_sh)
    secret = "wrong-secret-from-env-0815"
    res = railwatch("run", "--once", "--no-progress", cwd=root, env={SECRET_VAR: secret})
    assert res.code == 1
    assert "[imagery.sentinelhub] client_id / client_secret_env" in res.err
    assert secret not in res.out + res.err
    test = railwatch("provider", "test", cwd=root, env={SECRET_VAR: secret})
    assert test.code == 1
    assert f"token endpoint {fake_sh.token_url} answered 401" in " ".join(test.err.split())
    assert secret not in test.out + test.err
    ok = railwatch("provider", "test", cwd=root, env={SECRET_VAR: fake_sh.client_secret})
    assert ok.code == 0, ok.err


def test_cli_monthly_budget_pauses_polling(tmp_path: Path, fake_sh: FakeSentinelHub, tumangang: Aoi,
                                           source_scenes: list[Path]) -> None:
    from tests.cli_helpers import railwatch

    root = _cli_project(tmp_path, fake_sh)
    cfg = root / "config" / "railwatch.toml"
    cfg.write_text(cfg.read_text().replace("timeout_seconds = 20\n", "timeout_seconds = 20\nmonthly_pu_budget = 4.0\n"))
    env = {SECRET_VAR: fake_sh.client_secret}
    res = railwatch("backfill", "--aoi", tumangang.id, "--since", "2024-06-01", "--until", "2024-07-01",
                    "--no-progress", cwd=root, env=env)
    assert res.code == 1
    assert "budget" in res.err
    assert 0 < fake_sh.pu_spent <= 4.0
    status = railwatch("status", "--format", "json", cwd=root, env=env).json()
    assert status["budget"]["monthly_pu_budget"] == 4.0
    row = next(a for a in status["aois"] if a["aoi"] == tumangang.id)
    assert "budget" in (row["last_error"] or "")
    # A second pass the same month spends nothing more.
    spent = fake_sh.pu_spent
    again = railwatch("run", "--once", "--no-progress", cwd=root, env=env)
    assert again.code == 1
    assert fake_sh.pu_spent == spent
