"""railwatch: watch rail traffic at border crossings from satellite imagery."""

from __future__ import annotations

__version__ = "0.1.0"
