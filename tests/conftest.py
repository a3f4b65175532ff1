"""Shared fixtures: store URLs for SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.databases import throwaway_database

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PG_URL = os.environ.get("RAILWATCH_TEST_POSTGRES_URL", "")


def _store_params() -> list[object]:
    params: list[object] = ["sqlite"]
    params.append(pytest.param("postgresql", marks=pytest.mark.skipif(
        not PG_URL, reason="RAILWATCH_TEST_POSTGRES_URL not set")))
    return params


def _database(kind: str, folder: Path) -> contextlib.AbstractContextManager[str]:
    """A fresh, empty database: a SQLite file in ``folder``, or a throw-away PostgreSQL database."""
    return throwaway_database(PG_URL if kind == "postgresql" else "", folder)


@pytest.fixture(params=_store_params())
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a throw-away PostgreSQL database."""
    with _database(request.param, tmp_path) as url:
        yield url


@pytest.fixture(scope="module", params=_store_params())
def module_store_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same, shared by the tests of one module (for module-scoped fixtures that fill it once)."""
    with _database(request.param, tmp_path_factory.mktemp("db")) as url:
        yield url
