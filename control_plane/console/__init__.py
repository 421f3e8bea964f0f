"""The read-only fleet web console, served by the control plane (``--console-listen``)."""

from __future__ import annotations

from edgectl.control_plane.console.server import ConsoleServer, tls_context
from edgectl.control_plane.console.views import Sources

__all__ = ["ConsoleServer", "Sources", "tls_context"]
