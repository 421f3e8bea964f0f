"""edgectl: compress models for edge devices and roll them out to a fleet in gated waves."""

from __future__ import annotations

__version__ = "0.1.0"
