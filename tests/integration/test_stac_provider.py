"""The STAC provider against a loopback STAC API with COG assets (real pystac-client, real GDAL HTTP)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio

from railwatch.config import Settings
from railwatch.domain import S1, S2, Aoi, SceneRef
from railwatch.errors import ProviderError, ProviderUnavailable
from railwatch.geo import aoi_grid
from railwatch.imagery.archive import scene_path
from railwatch.imagery.stac import StacProvider, needs_offset_removal
from tests.fakes import PERIOD
from tests.fakes.stac_server import S1_RTC, FakeStac

pytest_plugins = ("tests.fakes.fixtures",)


def _all(provider: StacProvider, aoi: Aoi) -> list[SceneRef]:
    return provider.search(aoi, *PERIOD)


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_search_pages_and_groups_tiles(make_stac_provider: Any, fake_stac: FakeStac, tumangang: Aoi,
                                       source_scenes: list[Path], method: str) -> None:
    refs = make_stac_provider(method=method, max_scene_cloud_percent=100.0).search(tumangang, *PERIOD)
    assert [r.scene_id for r in refs] == sorted((p.stem for p in source_scenes), key=lambda s: (s.split("_")[1], s))
    searches = fake_stac.hits_to("/search")
    assert {h.method for h in searches} == {method}
    s2_items = sum(1 for i in fake_stac.items if i["collection"] == S2)
    s2_pages = [h for h in searches if (h.body or {}).get("collections", [S2]) == [S2]] if method == "POST" else None
    if s2_pages is not None:
        assert len(s2_pages) == -(-s2_items // fake_stac.page_size)
        assert [h.body.get("next") for h in s2_pages][1:] == list(range(2, s2_items, 2))
    else:
        assert len(searches) >= -(-len(fake_stac.items) // fake_stac.page_size)
    s2 = [r for r in refs if r.collection == S2]
    assert s2
    assert all(len(r.extra["items"]) == 2 for r in s2)
    for r in (r for r in refs if r.collection == S1):
        item = next(i for i in fake_stac.items if i["id"] == r.source)
        assert r.orbit_direction == item["properties"]["sat:orbit_state"]
        assert r.relative_orbit == item["properties"]["sat:relative_orbit"]


def test_cloud_query_and_unmapped_sensor(make_stac_provider: Any, fake_stac: FakeStac, tumangang: Aoi) -> None:
    provider = make_stac_provider(collections={S2: "sentinel-2-l2a"}, max_scene_cloud_percent=40.0)
    refs = provider.search(tumangang, *PERIOD)
    assert {r.collection for r in refs} == {S2}  # no collection configured for Sentinel-1: skipped
    bodies = [h.body for h in fake_stac.hits_to("/search")]
    assert all(b["query"] == {"eo:cloud_cover": {"lte": 40.0}} for b in bodies)
    clear = {i["properties"]["datetime"][:10] for i in fake_stac.items
             if i["collection"] == S2 and i["properties"]["eo:cloud_cover"] <= 40.0}
    assert {r.acquired.strftime("%Y-%m-%d") for r in refs} == clear


def test_fetch_reads_windows_mosaics_tiles_and_removes_the_offset(
    make_stac_provider: Any, fake_stac: FakeStac, tumangang: Aoi, sim_archive: Path, tmp_path: Path
) -> None:
    provider = make_stac_provider(max_scene_cloud_percent=100.0)
    refs = _all(provider, tumangang)
    grid = aoi_grid(tumangang)
    offsets_removed = 0
    for ref in refs:
        raster = provider.fetch(tumangang, ref)
        path = scene_path(tmp_path / "stac-archive", tumangang.id, ref.collection, ref.acquired)
        with rasterio.open(path) as got, rasterio.open(sim_archive / tumangang.id / f"{ref.scene_id}.tif") as src:
            assert got.crs.to_string() == grid.crs
            assert np.allclose(got.bounds, grid.bounds, atol=grid.transform.a / 2)
            names = list(src.descriptions)
            for band, values in raster.bands.items():
                expected = src.read(names.index(band) + 1)
                if ref.collection == S1:
                    expected = np.where(np.isfinite(expected) & (expected != 0), expected, np.nan).astype(np.float32)
                    assert np.array_equal(values, expected, equal_nan=True), band
                else:
                    assert np.array_equal(values.astype(expected.dtype), expected), (ref.scene_id, band)
        if ref.collection == S2:
            offsets_removed += sum(i["remove_offset"] for i in ref.extra["items"])
    # The fake served some tiles with the +1000 still in the pixels; equality above means it went.
    assert offsets_removed >= 2

    assets = fake_stac.hits_to("/assets/")
    gets = [h for h in assets if h.method == "GET"]
    assert gets
    assert all(h.status == 206 and h.range and h.range.startswith("bytes=") for h in gets)
    per_file: dict[str, int] = {}
    for h in gets:
        per_file[h.path] = per_file.get(h.path, 0) + h.sent
    for name, sent in per_file.items():
        size = (fake_stac.assets_dir / name.rsplit("/", 1)[1]).stat().st_size
        assert sent < size * 0.65, name  # windowed: the blocks under the AOI, not the whole tile

    before = len(fake_stac.hits_to("/assets/"))
    again = make_stac_provider(max_scene_cloud_percent=100.0)
    for ref in _all(again, tumangang):
        again.fetch(tumangang, ref)
    assert len(fake_stac.hits_to("/assets/")) == before  # all from the archive


def test_fetch_without_asset_links_finds_the_scene_again(make_stac_provider: Any, tumangang: Aoi) -> None:
    provider = make_stac_provider(max_scene_cloud_percent=100.0)
    ref = next(r for r in _all(provider, tumangang) if r.collection == S1)
    bare = SceneRef(tumangang.id, ref.collection, ref.acquired, "", ref.orbit_direction, ref.relative_orbit)
    assert np.array_equal(provider.fetch(tumangang, bare).bands["VV"], provider.fetch(tumangang, ref).bands["VV"],
                          equal_nan=True)


def test_search_retries_503_honouring_retry_after(make_stac_provider: Any, fake_stac: FakeStac, tumangang: Aoi) -> None:
    provider = make_stac_provider()
    provider.search(tumangang, *PERIOD)  # opened
    seen = len(fake_stac.hits_to("/search"))
    fake_stac.add_fault("/search", status=503, times=1, retry_after_s=1)
    fake_stac.add_fault("/search", status=429, times=1)
    started = time.monotonic()
    refs = provider.search(tumangang, *PERIOD)
    assert refs
    assert time.monotonic() - started >= 1.0  # Retry-After (seconds, the HTTP convention) honoured
    statuses = [h.status for h in fake_stac.hits_to("/search")[seen:]]
    assert statuses[:3] == [503, 429, 200]


def test_persistent_errors(make_stac_provider: Any, fake_stac: FakeStac, tumangang: Aoi) -> None:
    provider = make_stac_provider(max_attempts=2)
    fake_stac.add_fault("/search", status=500, times=10)
    with pytest.raises(ProviderUnavailable, match="STAC search"):
        provider.search(tumangang, *PERIOD)
    fake_stac.faults.clear()
    fake_stac.add_fault("/search", status=400, times=1)
    with pytest.raises(ProviderError, match="answered 400") as info:
        provider.search(tumangang, *PERIOD)
    assert type(info.value) is ProviderError


def test_missing_asset_is_a_permanent_error(make_stac_provider: Any, fake_stac: FakeStac, tumangang: Aoi,
                                            tmp_path: Path) -> None:
    provider = make_stac_provider()
    ref = next(r for r in _all(provider, tumangang) if r.collection == S1)
    item = ref.extra["items"][0]
    item["assets"]["VH"] = item["assets"]["VH"].replace(".tif", "-withdrawn.tif")
    with pytest.raises(ProviderError, match="404") as info:
        provider.fetch(tumangang, ref)
    assert not isinstance(info.value, ProviderUnavailable)
    assert not list((tmp_path / "stac-archive").rglob("*.tif"))


def test_offset_rule() -> None:
    assert needs_offset_removal({"s2:processing_baseline": "05.10"})
    assert needs_offset_removal({"s2:processing_baseline": "04.00", "earthsearch:boa_offset_applied": False})
    assert not needs_offset_removal({"s2:processing_baseline": "05.10", "earthsearch:boa_offset_applied": True})
    assert not needs_offset_removal({"s2:processing_baseline": "03.01"})
    assert not needs_offset_removal({})


def test_from_settings(tmp_path: Path) -> None:
    s = Settings.model_validate({"imagery": {"provider": "stac", "stac": {
        "url": "http://127.0.0.1:9/stac", "collections": {S1: S1_RTC}, "assets": {"VV": "vv-linear"}}}})
    p = StacProvider.from_settings(s)
    assert p.url == "http://127.0.0.1:9/stac"
    assert p.collections == {S1: S1_RTC}
    assert p.assets["VV"] == "vv-linear"
    assert p.assets["B02"] == "blue"
    assert p.read_threads == 2  # [imagery] read_threads' default
    s3 = Settings.model_validate({"imagery": {"provider": "stac", "read_threads": 3, "stac": s.imagery.stac.model_dump()}})
    assert StacProvider.from_settings(s3).read_threads == 3
    with pytest.raises(ValueError, match="https"):
        Settings.model_validate({"imagery": {"stac": {"url": "http://example.com/stac"}}})
    with pytest.raises(ValueError, match="unknown band"):
        Settings.model_validate({"imagery": {"stac": {"assets": {"B05": "rededge1"}}}})


def _stac_project(tmp: Path, url: str, collections: str, assets: str = "") -> Path:
    (tmp / "config").mkdir(parents=True, exist_ok=True)
    (tmp / "aoi").mkdir(exist_ok=True)
    (tmp / "config" / "railwatch.toml").write_text(
        f'[imagery]\nprovider = "stac"\n[imagery.stac]\nurl = "{url}"\ncollections = {collections}\n{assets}'
        '[store]\nurl = "sqlite:///var/railwatch.db"\n', encoding="utf-8")
    return tmp


def test_provider_test_queries_the_stac_api(fake_stac: FakeStac, tmp_path: Path) -> None:
    """`railwatch provider test` asks the API itself: landing page, collections, an item and its assets."""
    from tests.cli_helpers import railwatch

    good = _stac_project(tmp_path / "good", fake_stac.url, f'{{ "{S2}" = "{S2}", "{S1}" = "{S1_RTC}" }}')
    res = railwatch("provider", "test", cwd=good)
    assert res.code == 0, res.err
    assert "reachable" in res.out
    assert fake_stac.hits_to("/collections/") and fake_stac.hits_to("/search")
    assert not fake_stac.hits_to("/assets/")  # nothing downloaded

    bad = _stac_project(tmp_path / "bad", fake_stac.url, f'{{ "{S2}" = "sentinel-2-l9z" }}')
    res = railwatch("provider", "test", cwd=bad)
    assert res.code == 1
    assert "[imagery.stac] collections.sentinel-2-l2a = 'sentinel-2-l9z': no such collection" in res.err, res.err

    assets = _stac_project(tmp_path / "assets", fake_stac.url, f'{{ "{S2}" = "{S2}" }}',
                           '[imagery.stac.assets]\nB08 = "nir-wrong"\n')
    res = railwatch("provider", "test", cwd=assets)
    assert res.code == 1 and "lacks B08 (asset 'nir-wrong')" in res.err, res.err

    fake_stac.add_fault("/", status=503, times=20)
    down = railwatch("provider", "test", cwd=good)
    assert down.code == 1 and "[imagery.stac] url" in down.err, down.err
