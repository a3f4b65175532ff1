"""Throw-away stores for tests and benchmarks: a SQLite file, or a database created on a PostgreSQL
server and dropped afterwards."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def throwaway_database(server_url: str, folder: Path, *, prefix: str = "rw_test") -> Iterator[str]:
    """The URL of a fresh, empty database: a SQLite file in ``folder`` when ``server_url`` is empty,
    else a new database on that PostgreSQL server, dropped (its connections ended) on exit."""
    if not server_url:
        yield f"sqlite:///{folder / 'railwatch.db'}"
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n AND pid <> pg_backend_pid()"
            ), {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
