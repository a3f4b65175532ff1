from __future__ import annotations

from datetime import UTC, datetime

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from railwatch.domain import S2, Observation, SceneRef
from railwatch.store import MIGRATIONS, Base, Store, _alembic_config, migrate


def test_every_revision_upgrades_to_the_models(store_url: str) -> None:
    engine = create_engine(store_url)
    with engine.connect() as conn:
        script = ScriptDirectory.from_config(_alembic_config(conn))
    revisions = [r.revision for r in reversed(list(script.walk_revisions()))]
    assert revisions[0] == "0001"
    for rev in revisions:  # one revision at a time, as an old database would go
        migrate(engine, rev)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    assert MIGRATIONS.is_dir()
    engine.dispose()


def test_observation_is_idempotent(store_url: str) -> None:
    store = Store(store_url)
    t = datetime(2024, 5, 1, 2, 3, 4, tzinfo=UTC)
    obs = Observation("a", S2, t, "ok", estimated_cars=12.0, metrics={"x": 1}, detector_version="1")
    with store.session() as s:
        store.record_scene(s, SceneRef("a", S2, t, "/p"))
        assert store.save_observation(s, obs) is True
    with store.session() as s:
        store.record_scene(s, SceneRef("a", S2, t, "/p"))
        assert store.save_observation(s, obs) is False
    got = store.observations("a")
    assert len(got) == 1
    assert got[0].acquired == t and got[0].estimated_cars == 12.0 and got[0].metrics == {"x": 1}
    assert store.observed_keys("a") == {(S2, t)}
    store.close()


def test_usage_added_from_many_threads_at_once_loses_nothing(store_url: str) -> None:
    """The executor's AOI threads add to the same month's row at once: every increment counts, and
    the first insert of a new row never collides (it did on PostgreSQL with a read then a write)."""
    from concurrent.futures import ThreadPoolExecutor

    from railwatch.store import Store

    store = Store(store_url)
    rows = [("race", "sentinel-2-l2a", "2026-12", 1, 0.5)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: store.add_usage(rows), range(64)))
    (row,) = store.usage(aoi_id="race")
    assert row.requests == 64 and row.processing_units == 32.0
