"""Imagery providers: the protocol, the local archive reader and the scene simulator.

``files`` reads the archive layout of ``archive``; ``synthetic`` writes it. Network providers
(Sentinel Hub, STAC) cache their downloads in the same layout.
"""

from __future__ import annotations

from railwatch.imagery.base import ImageryProvider
from railwatch.imagery.files import FilesProvider

__all__ = ["FilesProvider", "ImageryProvider"]
