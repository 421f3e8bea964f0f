"""What every edgectl process exports besides its own metrics: process numbers and a build_info.

Shared by the agent and the control plane, each on a registry of its own (several can live in
one process). prometheus_client comes with either extra, so it is imported here, not at the top
of the core package.
"""

from __future__ import annotations

import platform
from typing import Any

import edgectl

BUILD_INFO = "edgectl_build_info"


def add_process_metrics(registry: Any, component: str) -> None:
    """Register ``process_*``, ``python_info`` and ``edgectl_build_info{component,version,python}`` = 1."""
    from prometheus_client import Gauge, PlatformCollector, ProcessCollector

    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    info = Gauge(BUILD_INFO, "The running edgectl build (always 1)", ["component", "version", "python"],
                 registry=registry)  # fmt: skip
    info.labels(component, edgectl.__version__, platform.python_version()).set(1)
