"""The imagery provider protocol: what monitor.py knows about any source of scenes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol, runtime_checkable

from railwatch.domain import COLLECTIONS, Aoi, Raster, SceneRef


@runtime_checkable
class ImageryProvider(Protocol):
    """Finds scenes of an AOI and fetches them as rasters on the AOI's grid.

    ``search`` returns the acquisitions with ``since < acquired <= until`` of the given
    collections, sorted by time; ``fetch`` returns one scene's bands or raises
    ``railwatch.errors.ProviderError`` (``SceneUnreadable`` for a file that breaks the archive
    contract, ``ProviderUnavailable`` for a transient failure).
    """

    name: str

    def search(
        self, aoi: Aoi, since: datetime, until: datetime, collections: Sequence[str] = COLLECTIONS
    ) -> list[SceneRef]: ...

    def fetch(self, aoi: Aoi, ref: SceneRef) -> Raster: ...
