"""The change detector: pure numpy functions from arrays to measurements (no I/O, no clock).

``quality`` decides whether a scene can be used on the AOI's track pixels; ``optical`` and ``sar``
measure the change of the track pixels against a reference of the same place; ``estimate`` turns
occupied track pixels into rail cars with an interval.
"""

from __future__ import annotations

DETECTOR_VERSION = "1.0.0"
