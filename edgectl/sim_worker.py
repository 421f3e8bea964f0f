"""A fleet simulator's worker process: K real agents until SIGTERM (``python -m edgectl.sim_worker SPEC.json``).

It dies with the process that started it, lifts its open-file limit (every agent holds sockets),
and can run with its wall clock shifted (``EDGECTL_SIM_CLOCK_OFFSET_S``) for the clock-skew faults.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import logging
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path

from edgectl.sim import CLOCK_OFFSET_ENV, READY_SUFFIX, AgentHost, SimDevice, SimSettings


def shift_clock(offset_s: float) -> None:
    """Make the agent's wall-clock reads in this process ``offset_s`` off.

    The agent reads the wall clock through ``datetime.now`` and protobuf timestamps (reported_at,
    event times); those are shifted. ``time.time`` is left alone: gRPC's Python layer turns
    timeouts into deadlines with it and its C core checks them against the real clock, so
    shifting one without the other would fake a failure no real skew causes (libfaketime, which
    shifts every clock of the process alike, is the thorough alternative).
    """
    from google.protobuf.timestamp_pb2 import Timestamp

    real_now = datetime.datetime.now

    class _SkewedDatetime(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> _SkewedDatetime:
            t = real_now(tz) + datetime.timedelta(seconds=offset_s)
            return cls.fromtimestamp(t.timestamp(), tz)

    datetime.datetime = _SkewedDatetime  # type: ignore[misc]
    Timestamp.GetCurrentTime = lambda self: self.FromNanoseconds(  # type: ignore[method-assign]
        time.time_ns() + int(offset_s * 1e9)
    )


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the process that started it dies (no orphaned fleets)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _raise_open_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_worker(spec_path: Path) -> None:
    """The worker process: start every agent of the spec, mark ready, run until SIGTERM."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _die_with_parent()
    offset = float(os.environ.get(CLOCK_OFFSET_ENV, "0") or 0)
    if offset:
        shift_clock(offset)
    _raise_open_files()
    spec = json.loads(spec_path.read_text())
    host = AgentHost(SimSettings.from_dict(spec["settings"]))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    try:
        for d in spec["devices"]:
            host.start(SimDevice(**d))
        spec_path.with_name(spec_path.name + READY_SUFFIX).write_text(str(os.getpid()))
        print(f"ready: {len(host.agents)} agents", flush=True)
        done.wait()
    finally:
        host.close()


if __name__ == "__main__":
    run_worker(Path(sys.argv[1]))
