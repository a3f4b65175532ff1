"""A provider that reads the local scene archive (docs/archive.md); no network."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from railwatch.domain import COLLECTIONS, Aoi, Raster, SceneRef, utc
from railwatch.imagery.archive import list_archive, read_scene, scene_path


class FilesProvider:
    """Scenes from ``<root>/<aoi-id>/<collection>_<YYYYMMDDTHHMMSSZ>.tif``.

    ``problems`` holds the misnamed files (path, reason) found by the last ``search``, so the
    caller can report them; they are never returned as scenes. ``fetch`` keeps no state, so it may
    run in several threads at once (a pass's read-ahead thread, the executor's AOI threads).
    """

    name = "files"

    def __init__(self, root: Path | str, *, read_threads: int = 1) -> None:
        self.root = Path(root)
        #: GDAL threads decoding one scene (``[imagery] read_threads``, :func:`read_scene`).
        self.read_threads = read_threads
        self.problems: list[tuple[Path, str]] = []

    def __repr__(self) -> str:
        return f"FilesProvider(root={str(self.root)!r})"

    def search(
        self, aoi: Aoi, since: datetime, until: datetime, collections: Sequence[str] = COLLECTIONS
    ) -> list[SceneRef]:
        """The AOI's archived scenes of ``collections`` with ``since < acquired <= until``."""
        lo, hi = utc(since), utc(until)
        wanted = set(collections)
        refs, self.problems = list_archive(self.root, aoi.id)
        return [r for r in refs if r.collection in wanted and lo < r.acquired <= hi]

    def fetch(self, aoi: Aoi, ref: SceneRef) -> Raster:
        """Read and validate one scene (``SceneUnreadable`` with the reason if it breaks the contract)."""
        path = Path(ref.source) if ref.source else scene_path(self.root, aoi.id, ref.collection, ref.acquired)
        return read_scene(path, ref.collection, threads=self.read_threads)
