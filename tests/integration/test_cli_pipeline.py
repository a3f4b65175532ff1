"""The pipeline end to end through the real CLI on a simulated archive (issue: foundation)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.cli_helpers import ROOT, project, railwatch

AOI = "tumangang-khasan"
STATUSES = {"ok", "partial", "cloudy", "haze", "snow", "nodata", "unreadable", "failed"}


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory: pytest.TempPathFactory, module_store_url: str) -> Path:
    """A simulated archive backfilled into the store: SQLite, and PostgreSQL where it is configured."""
    tmp = project(tmp_path_factory.mktemp("pipeline"), store_url=module_store_url)
    sim = railwatch("simulate", "--aoi", AOI, "--out", "var/archive", "--days", "150", "--seed", "11",
                    "--end", "2025-06-30", "--surge", "2025-05-20:160:12", "--no-progress", cwd=tmp)
    assert sim.code == 0, sim.err
    # One corrupt scene and one misnamed file: reported and skipped, the rest still counts.
    (tmp / "var/archive" / AOI / "sentinel-2-l2a_20250101T020000Z.tif").write_bytes(b"II*\x00 not really a tiff")
    (tmp / "var/archive" / AOI / "notes_about_this_folder.tif").write_bytes(b"")
    res = railwatch("backfill", "--no-progress", cwd=tmp)
    assert res.code == 0, res.err
    return tmp


def test_history_json(backfilled: Path) -> None:
    res = railwatch("history", "--aoi", AOI, "--format", "json", cwd=backfilled)
    assert res.code == 0, res.err
    rows = res.json()
    assert isinstance(rows, list) and len(rows) > 40
    truth = (backfilled / "var/archive" / AOI / "truth.csv").read_text().splitlines()
    assert len(rows) == len(truth) - 1 + 1  # every simulated scene plus the corrupt one
    for r in rows:
        assert r["acquired"].endswith("Z") and r["acquired"][10] == "T"
        assert r["sensor"] in {"sentinel-2-l2a", "sentinel-1-grd"}
        assert r["status"] in STATUSES
        assert isinstance(r["alert"], bool)
        assert r["estimated_cars"] is None or isinstance(r["estimated_cars"], (int, float))
        if r["estimated_cars"] is not None:
            assert r["estimated_cars_low"] <= r["estimated_cars"] <= r["estimated_cars_high"]
    corrupt = [r for r in rows if r["acquired"] == "2025-01-01T02:00:00Z"]
    assert len(corrupt) == 1 and corrupt[0]["status"] == "unreadable" and corrupt[0]["reason"]
    assert sum(1 for r in rows if r["estimated_cars"] is not None) > 20
    assert all(r["estimated_cars"] is None for r in rows if r["status"] not in {"ok", "partial"})


def test_surge_opens_an_alert(backfilled: Path) -> None:
    res = railwatch("alerts", "--format", "json", cwd=backfilled)
    assert res.code == 0, res.err
    alerts = res.json()
    during = [a for a in alerts if "2025-05-20" <= a["acquired"][:10] <= "2025-06-06"]
    assert during, alerts
    a = during[0]
    for key in ("id", "kind", "aoi", "acquired", "sensor", "estimated_cars", "peak_cars", "baseline_cars", "state"):
        assert key in a
    assert a["kind"] == "activity" and a["aoi"] == AOI
    assert a["peak_cars"] >= a["baseline_cars"]
    assert a["state"] in {"provisional", "confirmed", "resolved"}


def test_reprocessing_is_idempotent(backfilled: Path) -> None:
    before = railwatch("history", "--aoi", AOI, "--format", "json", cwd=backfilled).json()
    alerts_before = railwatch("alerts", "--format", "json", cwd=backfilled).json()
    again = railwatch("backfill", "--aoi", AOI, "--no-progress", cwd=backfilled)
    assert again.code == 0, again.err
    assert "0 new scene" in again.err
    assert railwatch("history", "--aoi", AOI, "--format", "json", cwd=backfilled).json() == before
    assert railwatch("alerts", "--format", "json", cwd=backfilled).json() == alerts_before


def test_status_is_one_object_and_csv_works(backfilled: Path) -> None:
    res = railwatch("status", "--format", "json", cwd=backfilled)
    assert res.code == 0, res.err
    st = res.json()
    assert isinstance(st, dict)
    row = next(a for a in st["aois"] if a["aoi"] == AOI)
    assert row["scenes"] > 40 and row["last_scene"]
    csv_out = railwatch("history", "--aoi", AOI, "--format", "csv", cwd=backfilled)
    assert csv_out.out.splitlines()[0].startswith("acquired,sensor,status,estimated_cars")


def test_run_once_with_a_broken_aoi_goes_on_and_exits_1(backfilled: Path, tmp_path: Path) -> None:
    work = project(tmp_path)
    shutil.copytree(backfilled / "var/archive", work / "var/archive")
    (work / "aoi" / "broken.geojson").write_text("{ not json")
    res = railwatch("run", "--once", "--no-progress", cwd=work, env={"RAILWATCH_NOW": "2025-07-01T00:00:00Z"})
    assert res.code == 1
    assert "broken.geojson" in res.err
    hist = railwatch("history", "--aoi", AOI, "--format", "json", cwd=work).json()
    # The look-back window (30 days) was processed for the valid AOI.
    assert hist and min(r["acquired"] for r in hist) >= "2025-06-01"


def test_config_error_exit_2_names_file_and_key(tmp_path: Path) -> None:
    work = project(tmp_path, extra_toml='[detector]\nalert_sigma = "loud"\nbogus = 1\n')
    res = railwatch("status", cwd=work)
    assert res.code == 2
    assert "railwatch.toml" in res.err and "alert_sigma" in res.err and "bogus" in res.err
    res = railwatch("status", cwd=work, env={"RAILWATCH_STORE__NOPE": "x"})
    assert res.code == 2 and "RAILWATCH_STORE__NOPE" in res.err


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    work = project(tmp_path)
    assert railwatch("history", "--aoi", "nowhere", cwd=work).code == 2
    assert railwatch("backfill", "--since", "yesterday", cwd=work).code == 2
    assert railwatch("frobnicate", cwd=work).code == 2


def test_aoi_validate_and_list(tmp_path: Path) -> None:
    work = project(tmp_path, aois=("tumangang-khasan", "sinuiju-dandong"))
    ok = railwatch("aoi", "validate", "--format", "json", cwd=work)
    assert ok.code == 0 and all(r["valid"] for r in ok.json())
    (work / "aoi" / "swapped.geojson").write_text(
        '{"type":"FeatureCollection","features":[{"type":"Feature","properties":{"kind":"aoi","id":"swapped",'
        '"name":"x"},"geometry":{"type":"Polygon","coordinates":[[[42.4,130.6],[42.5,130.6],[42.5,130.7],'
        '[42.4,130.6]]]}}]}'
    )
    bad = railwatch("aoi", "validate", "--format", "json", cwd=work)
    assert bad.code == 1
    rows = {r["id"]: r for r in bad.json()}
    assert not rows["swapped"]["valid"] and rows["swapped"]["problems"]
    listed = railwatch("aoi", "list", "--format", "json", cwd=work)
    assert {r["id"] for r in listed.json()} == {"tumangang-khasan", "sinuiju-dandong"}


def test_config_check_masks_secrets(tmp_path: Path) -> None:
    work = project(tmp_path)
    res = railwatch("config", "check", "--format", "json", cwd=work,
                    env={"RAILWATCH_SENTINELHUB_CLIENT_SECRET": "very-secret-value-123"})
    assert res.code == 0, res.err
    assert "very-secret-value-123" not in res.out + res.err
    assert res.json()["imagery"]["sentinelhub"]["client_secret"] == "********"


def test_demo_runs_and_draws_the_chart(tmp_path: Path) -> None:
    # As in the quick start: from the project root, but writing into its own folder.
    res = railwatch("demo", "--out", str(tmp_path / "demo"), "--no-progress", cwd=ROOT)
    assert res.code == 0, res.err
    png = tmp_path / "demo" / "activity.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert "alert" in res.out
