"""bench/accuracy/run.py's what-if replays: ``--detector`` takes only the alert rule's settings."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "accuracy"


@pytest.fixture(scope="module")
def run() -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("run")
    finally:
        sys.path.remove(str(BENCH))


def _scene(day: int, est: float, truth: int) -> dict[str, Any]:
    return {"acquired": f"2024-01-{day:02d}T09:00:00Z", "sensor": "sentinel-1-grd", "status": "ok",
            "geometry": "ascending:134", "clear_fraction": 1.0, "threshold": None, "baseline": None, "est": est,
            "low": est, "high": est, "alert": False, "truth": truth, "cloud": 0.0, "snow": False,
            "surge": int(truth > 20), "haze": 0.0, "calibration": False}


def _saved(tmp_path: Path) -> Path:
    """One case whose last two scenes stand 12 cars above a level of 10 (spread floored at 3.3)."""
    scenes = [_scene(d, 10.0, 10) for d in range(1, 9)] + [_scene(9, 22.0, 30), _scene(10, 22.0, 30)]
    case = {"case": {"aoi": "a", "seed": 1, "quiet": False}, "name": "a_1", "scenes": scenes, "alerts": [],
            "surges": [{"episode": "1", "start": "2024-01-09", "end": "2024-01-10", "peak_cars": "30"}],
            "counts": [], "calibration": {}, "seconds": {}}
    (tmp_path / "cases-tune.json").write_text(json.dumps([case]), encoding="utf-8")
    return tmp_path


def test_a_rule_setting_is_replayed_over_the_saved_cases(run: Any, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    work = _saved(tmp_path)
    assert run.main(["--split", "tune", "--rescore", "--work", str(work)]) == 0
    assert _caught(capsys.readouterr().out) == "1/1"  # 22 > 10 + 2.5 x 3.3: opened on the second scene
    assert run.main(["--split", "tune", "--rescore", "--work", str(work), "--detector", "alert_min_cars=15"]) == 0
    out = capsys.readouterr().out
    assert "alert rule replayed with alert_min_cars=15" in out
    assert _caught(out) == "0/1"  # a floor of 15 cars above the level holds it back


def _caught(table: str) -> str:
    """The 'all sensors' cell of the table's 'surge episodes caught' row."""
    row = next(line for line in table.splitlines() if line.startswith("| surge episodes caught"))
    return row.split("|")[2].strip()


@pytest.mark.parametrize(("arg", "message"), [
    ("reference_scenes=3", "not a setting of the alert rule"),
    ("alert_sigma=-1", "greater than 0"),
    ("alert_sigma", "KEY=VALUE"),
])
def test_detector_overrides_are_checked(run: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        arg: str, message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        run.main(["--split", "tune", "--rescore", "--work", str(_saved(tmp_path)), "--detector", arg])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_the_best_scale_per_archive_separates_calibration_from_count_error(run: Any) -> None:
    truth = [5, 10, 12, 20, 40]
    assert run._best_scale([2.0 * t for t in truth], truth) == pytest.approx(0.5, rel=0.01)
    scenes = [_scene(d, 3.0 * t, t) for d, t in enumerate([8, 10, 12, 14, 30, 10, 9, 11], start=1)]
    case = {"case": {"aoi": "a", "seed": 1, "quiet": False}, "name": "a_1", "scenes": scenes, "alerts": [],
            "surges": [], "counts": [("sentinel-1-grd", "2024-01-01T09:00:00Z", 8)], "calibration": {}, "seconds": {}}
    r = run.score([case], "sentinel-1-grd")
    assert r["mape"] == pytest.approx(2.0)  # read 3x: a calibration that missed by 3x
    assert r["best_scale_mape"] < 0.02 and r["best_scale_spearman"] == pytest.approx(1.0)
    row = next(line for line in run.table({"Sentinel-1": r}).splitlines() if line.startswith("| oracle: best scale"))
    assert "1 % / " in row or "0 % / " in row
