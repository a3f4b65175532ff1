"""The monitor's prepared-scene cache is bounded by bytes and evicts the least useful scenes first."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from railwatch import monitor as monitor_mod
from railwatch.analysis import Prepared
from railwatch.config import DetectorSettings, Settings
from railwatch.detect.quality import Quality
from railwatch.domain import S1, S2, Aoi, SceneRef
from railwatch.monitor import Monitor, prepared_nbytes

T0 = datetime(2024, 5, 1, 2, 0, tzinfo=UTC)
AOI = Aoi("cache-test", "Cache test", {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}, ())
SHAPE = (100, 100)  # an S2 scene: 4 float32 bands + the clear mask = 170 000 bytes


class _Ctx:
    aoi = AOI


class _Provider:
    name = "fake"

    def __init__(self) -> None:
        self.fetched: list[tuple[str, datetime]] = []

    def search(self, *a: Any, **k: Any) -> list[SceneRef]:
        return []

    def fetch(self, aoi: Aoi, ref: SceneRef) -> Any:
        self.fetched.append((ref.collection, ref.acquired))
        return ref


def _prepare(status: dict[datetime, str]) -> Any:
    def prepare(ctx: Any, ref: SceneRef, raster: Any, cfg: DetectorSettings) -> Prepared:
        n = 4 if ref.collection == S2 else 2
        bands = {f"b{i}": np.zeros(SHAPE, np.float32) for i in range(n)}
        q = Quality(status.get(ref.acquired, "ok"), "", np.ones(SHAPE, bool))
        return Prepared(ref, bands, q, "optical" if ref.collection == S2 else "descending:61")

    return prepare


@pytest.fixture
def monitor(monkeypatch: pytest.MonkeyPatch) -> tuple[Monitor, _Provider, dict[datetime, str]]:
    status: dict[datetime, str] = {}
    monkeypatch.setattr(monitor_mod, "prepare", _prepare(status))
    provider = _Provider()
    m = Monitor(Settings.model_validate({}), None, provider, event_hook=lambda *a: None)  # type: ignore[arg-type]
    return m, provider, status


def _load(m: Monitor, collection: str, day: int) -> Prepared:
    ref = SceneRef(AOI.id, collection, T0 + timedelta(days=day))
    return m._load(_Ctx(), ref, DetectorSettings())  # type: ignore[arg-type]


def _cached_bytes(m: Monitor) -> int:
    return sum(prepared_nbytes(p) for p in m._prepared.values())


def test_prepared_nbytes_counts_bands_and_mask() -> None:
    p = _prepare({})(None, SceneRef(AOI.id, S2, T0), None, DetectorSettings())
    assert prepared_nbytes(p) == 4 * 100 * 100 * 4 + 100 * 100


def test_cache_stays_within_its_byte_budget(monitor: tuple[Monitor, _Provider, dict[datetime, str]]) -> None:
    m, provider, _ = monitor
    m.cache_bytes = 5 * 170_000  # five S2 scenes
    for day in range(20):
        _load(m, S2, day)
        assert _cached_bytes(m) <= m.cache_bytes
        assert m._prepared_bytes == _cached_bytes(m)
    assert len(m._prepared) == 5
    # the latest scenes are the ones kept, and a hit does not fetch again
    n = len(provider.fetched)
    _load(m, S2, 19)
    assert len(provider.fetched) == n


def test_a_scene_larger_than_the_budget_is_returned_not_cached(
    monitor: tuple[Monitor, _Provider, dict[datetime, str]],
) -> None:
    m, _, _ = monitor
    m.cache_bytes = 1000
    assert _load(m, S2, 0).bands
    _load(m, S2, 1)
    assert not m._prepared and m._prepared_bytes == 0


def test_cache_count_limit_still_applies(monitor: tuple[Monitor, _Provider, dict[datetime, str]]) -> None:
    m, _, _ = monitor
    m.cache_bytes = 10**12
    for day in range(40):
        _load(m, S1, day)
    assert len(m._prepared) == max(monitor_mod.SCENE_CACHE_SCENES, 4 * DetectorSettings().reference_scenes)


def test_eviction_order(monitor: tuple[Monitor, _Provider, dict[datetime, str]]) -> None:
    m, _, status = monitor
    refs = DetectorSettings().reference_scenes
    status[T0 + timedelta(days=3)] = "cloudy"  # never a reference
    m.cache_bytes = 10**12
    for day in range(refs + 3):  # S2 days 0..refs+2: days 0 and 1 have `refs` newer usable S2 scenes
        _load(m, S2, day)
    _load(m, S1, 0)
    order = monitor_mod._eviction_order(m._prepared, refs, (AOI.id, S1, "descending:61"), m._group_used)
    keys = [(k[1], (k[2] - T0).days) for k in order]
    assert keys[0] == (S2, 3)  # the cloudy scene
    assert keys[1:3] == [(S2, 0), (S2, 1)]  # superseded, the oldest first
    assert keys[3] == (S1, 0)  # the group just used is needed last
    assert keys[4:] == [(S2, d) for d in range(2, refs + 3) if d != 3]
    # from the S2 group's point of view the S1 group, used after it, goes before its own older scenes
    order = monitor_mod._eviction_order(m._prepared, refs, (AOI.id, S2, "optical"), m._group_used)
    assert [(k[1], (k[2] - T0).days) for k in order][3] == (S2, 2)


def _backfill_reads(m: Monitor, provider: _Provider, days: int, refs: int) -> int:
    """Scenes in time order (S2 every 5 days, S1 every 6), each loaded with its latest ``refs`` earlier ones."""
    events = sorted([(S2, 5 * i) for i in range(days // 5)] + [(S1, 6 * i + 1) for i in range(days // 6)],
                    key=lambda e: e[1])
    seen: dict[str, list[int]] = {S2: [], S1: []}
    for coll, day in events:
        _load(m, coll, day)
        for d in seen[coll][-refs:]:
            _load(m, coll, d)
        seen[coll].append(day)
    return len(provider.fetched)


def test_a_tight_budget_keeps_whole_groups_instead_of_thrashing(
    monitor: tuple[Monitor, _Provider, dict[datetime, str]],
) -> None:
    m, provider, _ = monitor
    refs = DetectorSettings().reference_scenes
    # room for the S1 group's references and one S2 scene, not for both groups' references
    m.cache_bytes = (refs + 1) * 90_000 + 170_000
    reads = _backfill_reads(m, provider, 120, refs)
    scenes = 120 // 5 + 120 // 6
    # plain LRU re-reads every reference of every scene here (the group needed next is always the
    # least recently used); this keeps the S1 group and re-reads only S2 references
    assert reads <= scenes + (120 // 5) * refs
    assert m._prepared_bytes <= m.cache_bytes
