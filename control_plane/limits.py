"""Bounds on what one caller can take from the control plane: open streams and failed enrollments.

A viewer's token used to open enough ``Watch`` streams to occupy every worker thread, and an
anonymous peer could try ``Enroll`` as fast as it liked; both limits here answer
RESOURCE_EXHAUSTED with what to do instead, before any work is done.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from edgectl.control_plane.errors import ControlPlaneError


class LimitExceeded(ControlPlaneError):
    """A caller asked for more than its share; the message says how much and what to do."""


class StreamLimiter:
    """Counts open streaming calls per caller and in all; refuses one over either cap."""

    def __init__(self, per_caller: int, total: int) -> None:
        self.per_caller = per_caller
        self.total = total
        self._open: dict[str, int] = {}
        self._shared = 0
        self._lock = threading.Lock()

    def acquire(self, caller: str, method: str, shared: bool = True) -> None:
        """Take a slot for ``caller`` or raise LimitExceeded; pair with :meth:`release`.

        ``shared=False`` skips the total (a device or dev-mode caller counts only against its own cap).
        """
        with self._lock:
            mine = self._open.get(caller, 0)
            if mine >= self.per_caller:
                raise LimitExceeded(
                    f"{caller} already has {mine} open streams (at most {self.per_caller} per caller); "
                    f"{method} refused",
                    hint="close a stream you no longer read (e.g. another `rollout watch`) and retry",
                )
            if shared and self._shared >= self.total:
                raise LimitExceeded(
                    f"the control plane serves {self.total} streams already; {method} refused",
                    hint="retry shortly, or poll with Get/List instead of streaming",
                )
            self._open[caller] = mine + 1
            self._shared += shared

    def release(self, caller: str, shared: bool = True) -> None:
        with self._lock:
            self._shared -= shared
            left = self._open.get(caller, 0) - 1
            if left > 0:
                self._open[caller] = left
            else:
                self._open.pop(caller, None)


@dataclass
class _Bucket:
    tokens: float
    at: float


class PeerBudget:
    """A token bucket per peer: ``burst`` tokens at once, one back every ``refill_s``.

    Enrollment spends one per failure only, so a fleet enrolling hundreds of devices from one
    host with valid tokens is never slowed while a peer guessing tokens is held off; the MQTT
    chunk server spends one per byte sent to a device. The number of peers remembered is
    bounded, oldest forgotten first.
    """

    def __init__(
        self,
        burst: int,
        refill_s: float,
        max_peers: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.refill_s = refill_s
        self.max_peers = max_peers
        self._clock = clock
        self._peers: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def _bucket(self, peer: str, now: float) -> _Bucket:
        bucket = self._peers.get(peer)
        if bucket is None:
            bucket = self._peers[peer] = _Bucket(float(self.burst), now)
            while len(self._peers) > self.max_peers:
                self._peers.popitem(last=False)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) / self.refill_s)
        bucket.at = now
        self._peers.move_to_end(peer)
        return bucket

    def blocked_for(self, peer: str, need: float = 1.0) -> float:
        """Seconds until ``peer`` has ``need`` tokens (0: now)."""
        with self._lock:
            return self._wait(self._bucket(peer, self._clock()), need)

    def charge(self, peer: str, amount: float = 1.0) -> None:
        """Spend ``amount`` of ``peer``'s budget (never below empty)."""
        with self._lock:
            bucket = self._bucket(peer, self._clock())
            bucket.tokens = max(0.0, bucket.tokens - amount)

    def take(self, peer: str, amount: float) -> float:
        """Spend ``amount`` if ``peer`` has it and return 0, else spend nothing and return the wait.

        The wait is inf for more than the bucket ever holds: no waiting makes that fit.
        """
        if amount > self.burst:
            return math.inf
        with self._lock:
            bucket = self._bucket(peer, self._clock())
            wait = self._wait(bucket, amount)
            if not wait:
                bucket.tokens -= amount
            return wait

    def _wait(self, bucket: _Bucket, need: float) -> float:
        return 0.0 if bucket.tokens >= need else (need - bucket.tokens) * self.refill_s


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer (``ipv4:1.2.3.4:555`` -> ``1.2.3.4``): one budget per host."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]") or rest
    return peer
