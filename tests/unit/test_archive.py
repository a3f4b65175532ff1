"""The local archive contract (docs/archive.md): naming, reading, validation, writing, the files provider."""

from __future__ import annotations

import math
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

from railwatch.domain import S1, S2, Aoi, Raster
from railwatch.errors import SceneUnreadable
from railwatch.imagery import FilesProvider, ImageryProvider
from railwatch.imagery.archive import (
    list_archive,
    parse_scene_filename,
    read_scene,
    scene_filename,
    scene_path,
    write_scene,
)

UTM = CRS.from_epsg(32652)
TRANSFORM = Affine(10.0, 0.0, 385000.0, 0.0, -10.0, 4698000.0)
T0 = datetime(2024, 3, 1, 1, 47, 31, tzinfo=UTC)


def make_aoi(aoi_id: str = "tumangang-test", lon: float = 130.62, lat: float = 42.42) -> Aoi:
    """A ~2 x 1.5 km yard: three parallel 1 km sidings 5 m apart and a through line."""
    dlon = 1.0 / (111.32 * math.cos(math.radians(lat)))  # degrees per km
    dlat = 1.0 / 111.1
    w, h = dlon, 0.75 * dlat
    poly = {"type": "Polygon", "coordinates": [[[lon - w, lat - h], [lon + w, lat - h], [lon + w, lat + h],
                                                [lon - w, lat + h], [lon - w, lat - h]]]}
    tracks = [
        {"type": "Feature", "properties": {"kind": "siding"},
         "geometry": {"type": "LineString", "coordinates": [[lon - 0.5 * dlon, lat + (i - 1) * 0.005 * dlat],
                                                            [lon + 0.5 * dlon, lat + (i - 1) * 0.005 * dlat]]}}
        for i in range(3)
    ]
    tracks.append({"type": "Feature", "properties": {"kind": "main"},
                   "geometry": {"type": "LineString", "coordinates": [[lon - 1.2 * w, lat - 0.15 * dlat],
                                                                      [lon + 1.2 * w, lat - 0.03 * dlat]]}})
    return Aoi(id=aoi_id, name="Test yard", geometry=poly, tracks=tuple(tracks))


def s2_raster(seed: int = 0, shape: tuple[int, int] = (20, 30), crs: object = UTM) -> Raster:
    rng = np.random.default_rng(seed)
    bands = {b: rng.integers(1, 6000, shape).astype(np.uint16) for b in ("B02", "B03", "B04", "B08")}
    bands["B02"][0, 0] = 0  # nodata stays 0
    bands["SCL"] = rng.integers(0, 12, shape).astype(np.uint8)
    return Raster(bands=bands, crs=crs, transform=TRANSFORM, tags={"PRODUCER": "test"})


def s1_raster(seed: int = 0, shape: tuple[int, int] = (20, 30), direction: str = "descending",
              orbit: int = 61) -> Raster:
    rng = np.random.default_rng(seed)
    bands = {"VV": rng.gamma(4.4, 0.063 / 4.4, shape).astype(np.float32),
             "VH": rng.gamma(4.4, 0.0126 / 4.4, shape).astype(np.float32)}
    bands["VV"][1, 1] = np.nan
    return Raster(bands=bands, crs=UTM, transform=TRANSFORM,
                  tags={"ORBIT_DIRECTION": direction, "RELATIVE_ORBIT": str(orbit)})


def write_raw(path: Path, arrays: dict[str, np.ndarray], *, crs: object = UTM,
              transform: Affine = TRANSFORM, tags: dict[str, str] | None = None) -> Path:
    """Write a GeoTIFF directly with rasterio, bypassing write_scene (as a user's own file would be)."""
    first = next(iter(arrays.values()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotGeoreferencedWarning for the no-CRS case
        with rasterio.open(path, "w", driver="GTiff", width=first.shape[1], height=first.shape[0],
                           count=len(arrays), dtype=first.dtype, crs=crs, transform=transform) as dst:
            for i, (name, arr) in enumerate(arrays.items(), start=1):
                dst.write(arr, i)
                dst.set_band_description(i, name)
            if tags:
                dst.update_tags(**tags)
    return path


# -- naming -------------------------------------------------------------------------------------


def test_scene_filename_round_trips() -> None:
    name = scene_filename(S2, T0)
    assert name == "sentinel-2-l2a_20240301T014731Z.tif"
    assert parse_scene_filename(name) == (S2, T0)
    assert scene_path("/data", "x", S1, T0) == Path("/data/x/sentinel-1-grd_20240301T014731Z.tif")


@pytest.mark.parametrize("name", [
    "sentinel-2-l2a_20240301.tif",
    "sentinel-3-olci_20240301T014731Z.tif",
    "sentinel-2-l2a_20241301T014731Z.tif",
    "sentinel-2-l2a_20240301T014731Z.tiff",
    "sentinel-2-l2a_20240301T014731.tif",
    "readme.txt",
])
def test_parse_rejects_names_that_break_the_rule(name: str) -> None:
    assert parse_scene_filename(name) is None


# -- round trips --------------------------------------------------------------------------------


def test_s2_round_trip_keeps_values_descriptions_and_tags(tmp_path: Path) -> None:
    raster = s2_raster()
    path = write_scene(tmp_path, "a", S2, T0, raster)
    assert path == tmp_path / "a" / "sentinel-2-l2a_20240301T014731Z.tif"
    with rasterio.open(path) as ds:
        assert ds.descriptions == ("B02", "B03", "B04", "B08", "SCL")
        assert ds.dtypes[0] == "uint16"
        assert ds.nodata == 0
    back = read_scene(path, S2)
    for band, arr in raster.bands.items():
        np.testing.assert_array_equal(back.bands[band], arr)
    assert back.bands["B04"].dtype == np.uint16
    assert back.bands["SCL"].dtype == np.uint8
    assert back.crs == UTM
    assert back.transform == TRANSFORM
    assert back.tags["PRODUCER"] == "test"
    assert not list((tmp_path / "a").glob(".*"))  # no temporary file left behind


def test_s1_round_trip_keeps_values_tags_and_nodata(tmp_path: Path) -> None:
    raster = s1_raster()
    path = write_scene(tmp_path, "a", S1, T0, raster)
    back = read_scene(path, S1)
    np.testing.assert_array_equal(back.bands["VV"], raster.bands["VV"])  # NaN == NaN here
    np.testing.assert_array_equal(back.bands["VH"], raster.bands["VH"])
    assert back.bands["VV"].dtype == np.float32
    assert math.isnan(back.bands["VV"][1, 1])
    assert back.tags["ORBIT_DIRECTION"] == "descending"
    assert back.tags["RELATIVE_ORBIT"] == "61"


@pytest.mark.parametrize("collection", [S2, S1])
def test_several_decoding_threads_read_the_same_pixels(tmp_path: Path, collection: str) -> None:
    # 600 x 700 px: written tiled (256 x 256 blocks), so GDAL has several blocks to decode at once.
    raster = s2_raster(3, (600, 700)) if collection == S2 else s1_raster(3, (600, 700))
    path = write_scene(tmp_path, "a", collection, T0, raster)
    with rasterio.open(path) as ds:
        assert ds.block_shapes[0] == (256, 256)
    one, four = read_scene(path, collection), read_scene(path, collection, threads=4)
    for band, arr in one.bands.items():
        assert four.bands[band].dtype == arr.dtype
        np.testing.assert_array_equal(four.bands[band], arr)
    assert (four.crs, four.transform, four.tags) == (one.crs, one.transform, one.tags)


def test_scenes_are_written_with_zstd_or_deflate_where_gdal_has_no_zstd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from railwatch.imagery import archive

    raster = s2_raster(4, (300, 300))
    path = write_scene(tmp_path / "a", "a", S2, T0, raster)
    with rasterio.open(path) as ds:
        assert ds.compression is not None and ds.compression.value.upper() == archive.default_codec().upper()
    assert archive.default_codec() == "zstd"  # rasterio's wheels carry it; a build without it falls back below
    monkeypatch.setattr(archive, "default_codec", lambda: "deflate")
    path = write_scene(tmp_path / "b", "a", S2, T0, raster)
    with rasterio.open(path) as ds:
        assert ds.compression.value.upper() == "DEFLATE"
    for p in (tmp_path / "a", tmp_path / "b"):  # lossless either way
        back = read_scene(scene_path(p, "a", S2, T0), S2)
        for band, arr in raster.bands.items():
            np.testing.assert_array_equal(back.bands[band], arr)


def test_extra_bands_are_kept_after_the_required_ones(tmp_path: Path) -> None:
    raster = s2_raster()
    bands = {"B11": np.full(raster.shape, 7, np.uint16), **raster.bands}
    path = write_scene(tmp_path, "a", S2, T0, Raster(bands, raster.crs, raster.transform))
    with rasterio.open(path) as ds:
        assert ds.descriptions == ("B02", "B03", "B04", "B08", "SCL", "B11")
    np.testing.assert_array_equal(read_scene(path, S2).bands["B08"], raster.bands["B08"])


def test_write_replaces_an_existing_scene_atomically(tmp_path: Path) -> None:
    write_scene(tmp_path, "a", S2, T0, s2_raster(1))
    path = write_scene(tmp_path, "a", S2, T0, s2_raster(2))
    np.testing.assert_array_equal(read_scene(path, S2).bands["B03"], s2_raster(2).bands["B03"])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [path.name]


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    raster = s2_raster()
    bad = Raster({**raster.bands, "B08": np.zeros((5, 5), np.uint16)}, raster.crs, raster.transform)
    with pytest.raises(ValueError, match="B08"):
        write_scene(tmp_path, "a", S2, T0, bad)
    assert list((tmp_path / "a").iterdir()) == []


def test_write_refuses_a_raster_without_required_bands(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="VH"):
        write_scene(tmp_path, "a", S1, T0, Raster({"VV": np.ones((3, 3), np.float32)}, UTM, TRANSFORM))


# -- what is accepted ---------------------------------------------------------------------------


def test_epsg_4326_file_is_accepted(tmp_path: Path) -> None:
    raster = s2_raster(crs=CRS.from_epsg(4326))
    geo = Affine(0.0001, 0.0, 130.6, 0.0, -0.0001, 42.43)
    path = write_raw(tmp_path / "s.tif", dict(raster.bands) | {"SCL": raster.bands["SCL"].astype(np.uint16)},
                     crs=CRS.from_epsg(4326), transform=geo)
    back = read_scene(path, S2)
    assert back.crs == CRS.from_epsg(4326)
    assert back.transform == geo
    np.testing.assert_array_equal(back.bands["B08"], raster.bands["B08"])


def test_s1_float64_is_cast_and_zero_becomes_nan(tmp_path: Path) -> None:
    vv = np.full((4, 4), 0.05)
    vv[0, 0] = 0.0
    path = write_raw(tmp_path / "s.tif", {"VH": np.full((4, 4), 0.01), "VV": vv, "angle": np.full((4, 4), 39.0)})
    back = read_scene(path, S1)
    assert back.bands["VV"].dtype == np.float32
    assert math.isnan(back.bands["VV"][0, 0])
    assert back.bands["VV"][1, 1] == pytest.approx(0.05)
    assert set(back.bands) == {"VV", "VH"}  # found by description, not by position


# -- what is rejected, and why ------------------------------------------------------------------


def test_random_bytes_are_reported_as_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "junk.tif"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(SceneUnreadable, match="not a GeoTIFF / corrupt") as err:
        read_scene(path, S2)
    assert str(path) in str(err.value)


def test_truncated_tiff_is_reported_as_corrupt(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    big = Raster({b: rng.integers(1, 60000, (300, 300)).astype(np.uint16) for b in ("B02", "B03", "B04", "B08")}
                 | {"SCL": np.full((300, 300), 4, np.uint8)}, UTM, TRANSFORM)
    path = write_scene(tmp_path, "a", S2, T0, big)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SceneUnreadable, match="not a GeoTIFF / corrupt"):
        read_scene(path, S2)


def test_missing_band_names_the_band_and_what_was_found(tmp_path: Path) -> None:
    bands = {b: np.ones((4, 4), np.uint16) for b in ("B02", "B03", "B04", "SCL")}
    path = write_raw(tmp_path / "s.tif", bands)
    with pytest.raises(SceneUnreadable, match=r"missing band\(s\) B08 \(found: B02, B03, B04, SCL\)"):
        read_scene(path, S2)


def test_band_descriptions_are_case_sensitive(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "s.tif", {"vv": np.ones((4, 4), np.float32), "VH": np.ones((4, 4), np.float32)})
    with pytest.raises(SceneUnreadable, match=r"missing band\(s\) VV \(found: vv, VH\)"):
        read_scene(path, S1)


def test_file_without_descriptions_says_so(tmp_path: Path) -> None:
    path = tmp_path / "s.tif"
    with rasterio.open(path, "w", driver="GTiff", width=4, height=4, count=2, dtype="float32",
                       crs=UTM, transform=TRANSFORM) as dst:
        dst.write(np.ones((2, 4, 4), np.float32))
    with pytest.raises(SceneUnreadable, match=r"missing band\(s\) VV, VH \(found: no band descriptions\)"):
        read_scene(path, S1)


def test_wrong_dtype_is_named(tmp_path: Path) -> None:
    s1 = write_raw(tmp_path / "s1.tif", {"VV": np.ones((4, 4), np.int16), "VH": np.ones((4, 4), np.int16)})
    with pytest.raises(SceneUnreadable, match="band VV has dtype int16, expected float32"):
        read_scene(s1, S1)
    s2 = write_raw(tmp_path / "s2.tif", {b: np.ones((4, 4), np.float32) for b in ("B02", "B03", "B04", "B08", "SCL")})
    with pytest.raises(SceneUnreadable, match="band B02 has dtype float32, expected uint16"):
        read_scene(s2, S2)


def test_no_crs_is_rejected(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "s.tif", {"VV": np.ones((4, 4), np.float32), "VH": np.ones((4, 4), np.float32)},
                     crs=None)
    with pytest.raises(SceneUnreadable, match="no CRS"):
        read_scene(path, S1)


def test_reads_in_several_threads_leave_the_warning_filters_as_they_were(tmp_path: Path) -> None:
    """The readers silence GDAL's warnings with ``catch_warnings``, which swaps the process-wide filter
    list: one thread at a time, or two of them interleaved can leave ``ignore`` in place for good."""
    from concurrent.futures import ThreadPoolExecutor

    good = write_scene(tmp_path, "a", S1, T0, s1_raster())
    bad = write_raw(tmp_path / "s.tif", {"VV": np.ones((4, 4), np.float32), "VH": np.ones((4, 4), np.float32)},
                    crs=None)  # warns (not georeferenced) on open
    before = list(warnings.filters)

    def read(i: int) -> str:
        try:
            return read_scene(good if i % 2 else bad, S1).bands["VV"].dtype.name
        except SceneUnreadable:
            return "unreadable"

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(read, range(200)))
    assert results.count("float32") == results.count("unreadable") == 100
    assert warnings.filters == before


def test_decibel_sigma0_is_rejected(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "s.tif", {"VV": np.full((4, 4), -12.0, np.float32),
                                          "VH": np.full((4, 4), -19.0, np.float32)})
    with pytest.raises(SceneUnreadable, match="band VV looks like decibels"):
        read_scene(path, S1)


def test_scl_codes_outside_the_esa_range_are_rejected(tmp_path: Path) -> None:
    bands = {b: np.ones((4, 4), np.uint16) for b in ("B02", "B03", "B04", "B08")}
    bands["SCL"] = np.full((4, 4), 255, np.uint16)
    path = write_raw(tmp_path / "s.tif", bands)
    with pytest.raises(SceneUnreadable, match=r"band SCL has codes outside 0\.\.11 \(e\.g\. 255\)"):
        read_scene(path, S2)


# -- listing and the files provider -------------------------------------------------------------


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    t = datetime(2024, 3, 1, 1, 47, 31, tzinfo=UTC)
    write_scene(tmp_path, "yard", S2, t, s2_raster(1))
    write_scene(tmp_path, "yard", S2, t.replace(day=6), s2_raster(2))
    write_scene(tmp_path, "yard", S1, datetime(2024, 3, 3, 21, 29, 31, tzinfo=UTC), s1_raster(3))
    write_scene(tmp_path, "yard", S1, datetime(2024, 3, 4, 9, 5, 31, tzinfo=UTC),
                s1_raster(4, direction="ascending", orbit=134))
    # An S1 scene without orbit tags, and files that are not scenes.
    write_raw(tmp_path / "yard" / "sentinel-1-grd_20240305T090531Z.tif",
              {"VV": np.ones((4, 4), np.float32), "VH": np.ones((4, 4), np.float32)})
    folder = tmp_path / "yard"
    (folder / "truth.csv").write_text("acquired\n")
    (folder / "surges.csv").write_text("episode\n")
    (folder / ".sentinel-2-l2a_20240311T014731Z.tif.tmp").write_bytes(b"partial")
    (folder / ".DS_Store").write_bytes(b"")
    (folder / "sentinel-2-l2a_20240301T014731Z.tif.aux.xml").write_text("<PAMDataset/>")
    (folder / "notes.txt").write_text("hello")
    (folder / "sentinel-2-l2a_2024-03-16.tif").write_bytes(b"x")
    (folder / "landsat-8_20240301T014731Z.tif").write_bytes(b"x")
    (folder / "sentinel-1-grd_20241301T000000Z.tif").write_bytes(b"x")
    return tmp_path


def test_list_archive_sorts_scenes_reads_orbits_and_reports_misnamed(archive: Path) -> None:
    refs, problems = list_archive(archive, "yard")
    assert [r.scene_id for r in refs] == [
        "sentinel-2-l2a_20240301T014731Z",
        "sentinel-1-grd_20240303T212931Z",
        "sentinel-1-grd_20240304T090531Z",
        "sentinel-1-grd_20240305T090531Z",
        "sentinel-2-l2a_20240306T014731Z",
    ]
    assert all(r.aoi_id == "yard" and Path(r.source).exists() for r in refs)
    orbits = {r.scene_id: (r.orbit_direction, r.relative_orbit) for r in refs}
    assert orbits["sentinel-1-grd_20240303T212931Z"] == ("descending", 61)
    assert orbits["sentinel-1-grd_20240304T090531Z"] == ("ascending", 134)
    assert orbits["sentinel-1-grd_20240305T090531Z"] == (None, None)
    assert orbits["sentinel-2-l2a_20240301T014731Z"] == (None, None)
    reported = {p.name: why for p, why in problems}
    assert set(reported) == {"notes.txt", "sentinel-2-l2a_2024-03-16.tif", "landsat-8_20240301T014731Z.tif",
                             "sentinel-1-grd_20241301T000000Z.tif"}
    assert "not a .tif" in reported["notes.txt"]
    assert "unknown collection 'landsat-8'" in reported["landsat-8_20240301T014731Z.tif"]
    assert reported["sentinel-2-l2a_2024-03-16.tif"] == "acquisition time '2024-03-16' is not YYYYMMDDTHHMMSSZ (UTC)"
    assert "not a valid UTC date" in reported["sentinel-1-grd_20241301T000000Z.tif"]


def test_list_archive_of_a_missing_folder_is_empty(tmp_path: Path) -> None:
    assert list_archive(tmp_path, "nowhere") == ([], [])


def test_list_archive_lists_a_corrupt_scene_and_fetch_reports_it(tmp_path: Path) -> None:
    folder = tmp_path / "yard"
    folder.mkdir()
    (folder / "sentinel-1-grd_20240301T000000Z.tif").write_bytes(b"not a tiff at all")
    provider = FilesProvider(tmp_path)
    aoi = make_aoi("yard")
    refs = provider.search(aoi, datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 12, 1, tzinfo=UTC))
    assert len(refs) == 1
    assert refs[0].orbit_direction is None
    with pytest.raises(SceneUnreadable, match="not a GeoTIFF / corrupt"):
        provider.fetch(aoi, refs[0])


def test_files_provider_filters_window_and_collections(archive: Path) -> None:
    provider = FilesProvider(archive)
    assert isinstance(provider, ImageryProvider)
    assert provider.name == "files"
    aoi = make_aoi("yard")
    since = datetime(2024, 3, 1, 1, 47, 31, tzinfo=UTC)  # exclusive
    until = datetime(2024, 3, 4, 9, 5, 31, tzinfo=UTC)  # inclusive
    refs = provider.search(aoi, since, until, [S1, S2])
    assert [r.scene_id for r in refs] == ["sentinel-1-grd_20240303T212931Z", "sentinel-1-grd_20240304T090531Z"]
    assert len(provider.problems) == 4
    only_s2 = provider.search(aoi, datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 4, 1, tzinfo=UTC), [S2])
    assert [r.acquired.day for r in only_s2] == [1, 6]
    # Naive datetimes are taken as UTC.
    assert len(provider.search(aoi, datetime(2024, 3, 5), datetime(2024, 3, 7), [S1, S2])) == 2
    raster = provider.fetch(aoi, only_s2[1])
    np.testing.assert_array_equal(raster.bands["B02"], s2_raster(2).bands["B02"])


def test_files_provider_fetch_without_source_uses_the_layout(archive: Path) -> None:
    from railwatch.domain import SceneRef

    provider = FilesProvider(archive)
    ref = SceneRef("yard", S1, datetime(2024, 3, 3, 21, 29, 31, tzinfo=UTC))
    raster = provider.fetch(make_aoi("yard"), ref)
    np.testing.assert_array_equal(raster.bands["VH"], s1_raster(3).bands["VH"])


def test_rasterios_spurious_in_memory_georeferencing_warning_is_silenced_but_not_a_files() -> None:
    """reproject/rasterize on arrays, from several threads, now and then warn "Dataset has no geotransform"
    (a race in rasterio; seen in the executor tests and the throughput benchmark). Importing railwatch
    silences that warning from rasterio.warp and rasterio.features only; opening a file without
    georeferencing still warns (and read_scene reports it). In a fresh interpreter: pytest manages
    warning filters itself."""
    import subprocess
    import sys

    code = (
        "import warnings, railwatch\n"
        "from rasterio.errors import NotGeoreferencedWarning as W\n"
        "t = 'Dataset has no geotransform, gcps, or rpcs. The identity matrix will be returned.'\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    for m in ('rasterio.warp', 'rasterio.features', 'rasterio'):\n"
        "        warnings.warn_explicit(t, W, m + '.py', 1, module=m)\n"
        "print([w.filename for w in seen])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.strip() == "['rasterio.py']"
