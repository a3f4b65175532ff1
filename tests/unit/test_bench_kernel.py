"""The analysis-kernel and memory benchmarks run end to end on a tiny AOI (so the scripts cannot rot).

No timing is asserted: only that every method ran, agreed on the pixels, and the tables came out.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def kernel() -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("kernel")
    finally:
        sys.path.remove(str(BENCH))


def test_kernel_benchmark_runs_on_a_tiny_aoi(kernel: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kernel.json"
    assert kernel.main(["--sizes", "0.25", "--scenes", "4", "--repeat", "1", "--rw-repeat", "1", "--inline",
                        "--workdir", str(tmp_path), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rw/floor" in printed and "S2" in printed and "S1" in printed and "Read-ahead 2:" in printed
    assert "A pair of scenes (one per sensor), wall: 0.25 km²:" in printed and "x the floor's" in printed
    rows = json.loads(out.read_text(encoding="utf-8"))["rows"]
    (row,) = rows
    assert row["read_ahead"] == 2 and row["read_threads"] == 2  # the configuration's defaults
    assert "GDAL decodes each file's blocks on 2 thread(s) for every method" in printed
    assert row["backfill_scenes"] == 8 and row["backfill_cpu_s"] > 0 and row["backfill_wall_s"] > 0
    assert row["track_px"] > 0 and row["grid_px"] > row["track_px"] and row["masks_s"] > 0
    assert set(row["statuses"]) == {"ok"}  # the synthetic scenes are clear
    for coll, entry in row["collections"].items():
        assert entry["railwatch_s"] > 0 and entry["railwatch_cpu_s"] > 0 and entry["floor_s"] > 0, coll
        assert entry["n_reference"] >= 2  # steady state reached the change test
        assert entry["railwatch_reads_per_scene"] == 1.0  # its own file, read ahead or not, and no reference again
        floor = entry["floor_last"]
        assert floor["count"] > 0
        if "rasterstats_last" in entry:  # same pixels (centre sampling): the same mean
            for band, value in floor.items():
                assert entry["rasterstats_last"][band] == pytest.approx(value, rel=1e-5), band


def test_memory_benchmark_runs_on_a_tiny_aoi(kernel: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        memory = importlib.import_module("memory")
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "memory.json"
    assert memory.main(["--km2", "0.25", "--days", "20", "--inline", "--workdir", str(tmp_path),
                        "--json", str(out)]) == 0
    assert "peak RSS" in capsys.readouterr().out
    (row,) = json.loads(out.read_text(encoding="utf-8"))
    assert row["scenes"] == 4 + 2 * 3 and row["peak_rss"] > 0 and row["reads"] >= row["scenes"]
