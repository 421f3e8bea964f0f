"""Test devices that speak exactly the MQTT side of docs/protocol.md, many per thread.

tests/contracts/test_contract_device.py holds them to what a real agent does.

Each :class:`SimDevice` has its own paho client and real connection (own client id, Last
Will, retained status and reports). One :class:`SimLoop` thread drives all their sockets
through a selector, so a benchmark can run a thousand devices without a thousand threads.
A device "applies" a desired model instantly (or after ``delay``): it reports the digest active
with ``smoke_test_passed``, or, for a digest in ``bad_digests``, keeps the old one and reports
``failed_digest`` with a reason. It refuses a downgrade without ``rollback: true``. A model
with a maintenance window that is closed is reported as ``staged_digest`` and swapped once the
window opens (``windows=False`` plays an agent that predates windows and swaps at once); an
exclusive desired state that no longer names a model stops it.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgectl.mqtt.wire import DeviceTopics, PayloadError, agent_client_id, decode, encode
from edgectl.protos.v1 import mqtt_pb2
from edgectl.window import MaintenanceWindow

WINDOW_POLL_S = 30.0  # as the agent: look again at least this often while a window is closed


class SimLoop:
    """One thread running many paho clients over a selector; all client calls happen on it."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._rx, self._tx = socket.socketpair()
        self._rx.setblocking(False)
        self._sel.register(self._rx, selectors.EVENT_READ, None)
        self._calls: list[Callable[[], None]] = []
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._clients: list[mqtt.Client] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="sim-devices", daemon=True)
        self._thread.start()

    def call_soon(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._calls.append(fn)
        with contextlib.suppress(OSError):
            self._tx.send(b"x")

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        self.call_soon(lambda: heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn)))

    def run_sync(self, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        done = threading.Event()
        box: list[Any] = []

        def wrapper() -> None:
            try:
                box.append(fn())
            except BaseException as exc:  # handed back to the caller's thread
                box.append(exc)
            done.set()

        self.call_soon(wrapper)
        if not done.wait(timeout):
            raise TimeoutError("sim loop call timed out")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def attach(self, client: mqtt.Client) -> None:
        """Hook a client's socket callbacks into the selector (call on the loop thread)."""

        def opened(c: Any, userdata: Any, sock: Any) -> None:
            self._sel.register(sock, selectors.EVENT_READ, c)

        def closed(c: Any, userdata: Any, sock: Any) -> None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)

        def want_write(c: Any, userdata: Any, sock: Any) -> None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)

        def done_write(c: Any, userdata: Any, sock: Any) -> None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.modify(sock, selectors.EVENT_READ, c)

        client.on_socket_open = opened
        client.on_socket_close = closed
        client.on_socket_register_write = want_write
        client.on_socket_unregister_write = done_write
        self._clients.append(client)

    def detach(self, client: mqtt.Client) -> None:
        if client in self._clients:
            self._clients.remove(client)

    def _run(self) -> None:
        last_misc = time.monotonic()
        while not self._stop:
            timeout = 0.25
            if self._timers:
                timeout = max(0.0, min(timeout, self._timers[0][0] - time.monotonic()))
            for key, mask in self._sel.select(timeout):
                if key.data is None:
                    try:
                        while self._rx.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                client: mqtt.Client = key.data
                if mask & selectors.EVENT_READ:
                    client.loop_read()
                    sock = client.socket()
                    # TLS may hold decrypted bytes the selector cannot see: drain them now.
                    while isinstance(sock, ssl.SSLSocket) and sock.pending() and client.socket() is sock:
                        client.loop_read()
                if mask & selectors.EVENT_WRITE:
                    client.loop_write()
            with self._lock:
                calls, self._calls = self._calls, []
            for fn in calls:
                fn()
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                heapq.heappop(self._timers)[2]()
            if now - last_misc >= 0.5:
                last_misc = now
                for c in list(self._clients):
                    c.loop_misc()  # keepalive pings and retries

    def close(self) -> None:
        self._stop = True
        self.call_soon(lambda: None)
        self._thread.join(timeout=10)
        self._sel.close()
        self._rx.close()
        self._tx.close()


@dataclass
class SimDevice:
    """One simulated agent: its desired-state handling and what it reports."""

    device_id: str
    labels: dict[str, str] = field(default_factory=dict)
    bad_digests: set[str] = field(default_factory=set)
    delay: float = 0.0
    active: dict[str, mqtt_pb2.ActiveModel] = field(default_factory=dict)
    highest_generation: int = 0
    observed_generation: int = 0
    desired_received: int = 0
    published: int = 0
    connected: threading.Event = field(default_factory=threading.Event)
    client: Any = None
    password: str | None = field(default=None, repr=False)  # MQTT username is the device id
    windows: bool = True  # honour maintenance windows; False plays an agent that predates them
    clock: Callable[[], float] = time.time  # the wall clock windows are read on
    stats: mqtt_pb2.ServingStats | None = None  # serving stats to report (None: none, as before)

    @property
    def topics(self) -> DeviceTopics:
        return DeviceTopics(self.device_id)

    def digest(self, name: str) -> str:
        model = self.active.get(name)
        return model.digest if model else ""

    # -- protocol (runs on the loop thread) ---------------------------------------------------

    def on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            return
        client.subscribe(self.topics.desired, qos=1)
        self._publish(self.topics.status, mqtt_pb2.DeviceStatus(device_id=self.device_id, online=True))
        self.report()
        self.connected.set()

    def on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic != self.topics.desired or not msg.payload:
            return
        try:
            desired = decode(bytes(msg.payload), mqtt_pb2.DesiredState)
        except PayloadError:
            return
        self.desired_received += 1
        if desired.generation < self.highest_generation:
            return  # a stale retained message: the protocol says ignore it
        self.highest_generation = desired.generation
        if self.delay > 0:
            self.loop.call_later(self.delay, lambda: self.apply(desired))
        else:
            self.apply(desired)

    def apply(self, desired: mqtt_pb2.DesiredState) -> None:
        if desired.generation < self.highest_generation:
            return
        for name in set(self.active) - {m.name for m in desired.models} if desired.exclusive else ():
            del self.active[name]  # an exclusive order no longer names it: the agent stops serving it
        for want in desired.models:
            current = self.active.get(want.name)
            if current is not None and current.digest == want.digest:
                # Already running what is desired: an earlier refusal is history (as the agent does).
                current.failed_digest, current.failure_reason, current.staged_digest = "", "", ""
                continue
            model = mqtt_pb2.ActiveModel(name=want.name)
            if current is not None:
                model.CopyFrom(current)
                model.failed_digest, model.failure_reason, model.staged_digest = "", "", ""
            opens = self._window_opens(want)
            if opens is not None:
                # Staged at once, swapped only inside the window (as the agent does): look again then.
                model.staged_digest = want.digest
                self.loop.call_later(min(opens, WINDOW_POLL_S), lambda: self.apply(desired))
            elif want.digest in self.bad_digests:
                model.failed_digest = want.digest
                model.failure_reason = "smoke test failed: outputs differ from golden (simulated)"
            elif (
                current is not None
                and current.digest
                and want.version < current.version
                and not want.rollback
            ):
                model.failed_digest = want.digest
                model.failure_reason = (
                    f"refused downgrade {current.version} -> {want.version} without rollback"
                )
            else:
                previous = current.digest if current else ""
                model = mqtt_pb2.ActiveModel(
                    name=want.name, digest=want.digest, version=want.version, smoke_test_passed=True,
                    previous_digest=previous, execution_provider="CPUExecutionProvider",
                )  # fmt: skip
            self.active[want.name] = model
        self.observed_generation = desired.generation
        self.report()

    def _window_opens(self, want: mqtt_pb2.DesiredModel) -> float | None:
        """Seconds until ``want``'s maintenance window opens; None when it may swap now (or when this
        device plays an agent that predates windows)."""
        if not want.window or not self.windows:
            return None
        window = MaintenanceWindow.parse(want.window)
        now = self.clock()
        return None if window.contains(now) else window.next_open(now) - now

    def report(self) -> None:
        state = mqtt_pb2.ReportedState(
            device_id=self.device_id,
            observed_generation=self.observed_generation,
            models=list(self.active.values()),
            health=1,
            agent_version="sim-1",
            profile="x86-cpu-avx2",
            labels=self.labels,
        )
        if self.stats is not None:
            state.stats.CopyFrom(self.stats)
        state.reported_at.GetCurrentTime()
        self._publish(self.topics.reported, state)

    def _publish(self, topic: str, message: Any) -> None:
        self.published += 1
        self.client.publish(topic, encode(message), qos=1, retain=True)

    loop: SimLoop = field(init=False, repr=False)


class SimFleet:
    """Many SimDevices on one loop, connected to a real broker (over TLS when ``tls_ca`` is given)."""

    def __init__(self, host: str, port: int, tls_ca: str | None = None) -> None:
        self.host, self.port = host, port
        self.tls_ca = tls_ca
        self.loop = SimLoop()
        self.devices: dict[str, SimDevice] = {}

    def add(
        self,
        device_id: str,
        labels: dict[str, str] | None = None,
        bad_digests: Iterable[str] = (),
        delay: float = 0.0,
        password: str | None = None,
    ) -> SimDevice:
        device = SimDevice(device_id, dict(labels or {}), set(bad_digests), delay, password=password)
        device.loop = self.loop
        self.devices[device_id] = device
        return device

    def connect(self, device_ids: Iterable[str] | None = None, timeout: float = 30.0) -> None:
        """Connect the devices (all by default) and wait until each has said it is online."""
        chosen = [self.devices[d] for d in (device_ids or list(self.devices))]
        for device in chosen:
            self.loop.run_sync(lambda d=device: self._connect(d))  # type: ignore[misc]
        deadline = time.monotonic() + timeout
        for device in chosen:
            if not device.connected.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"{device.device_id} did not connect to {self.host}:{self.port}")

    def _connect(self, device: SimDevice) -> None:
        # The agent's own client id: a secured broker pins each device's login to it.
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=agent_client_id(device.device_id),
                             protocol=mqtt.MQTTv5)  # fmt: skip
        offline = mqtt_pb2.DeviceStatus(device_id=device.device_id, online=False)
        client.will_set(device.topics.status, encode(offline), qos=1, retain=True)
        if device.password is not None:
            client.username_pw_set(device.device_id, device.password)
        if self.tls_ca is not None:
            client.tls_set(ca_certs=self.tls_ca)
        client.on_connect = device.on_connect
        client.on_message = device.on_message
        client.on_disconnect = lambda c, u, f, rc, p, d=device: self._on_disconnect(d, rc)
        device.client = client
        self.loop.attach(client)
        client.connect(self.host, self.port, keepalive=30, clean_start=True)

    def _on_disconnect(self, device: SimDevice, reason: Any) -> None:
        device.connected.clear()
        if reason.is_failure and device.client is not None:
            self.loop.call_later(0.5, lambda: self._reconnect(device))

    def _reconnect(self, device: SimDevice) -> None:
        if device.client is None:
            return
        try:
            device.client.reconnect()
        except OSError:
            self.loop.call_later(1.0, lambda: self._reconnect(device))

    def disconnect(self, device_id: str, graceful: bool = False) -> None:
        """Drop a device's connection. Graceful, as the agent stops: say offline (a clean
        DISCONNECT fires no Last Will), then DISCONNECT; otherwise the broker fires the Will."""
        device = self.devices[device_id]

        def drop() -> None:
            client = device.client
            if client is None:
                return
            if graceful and device.connected.is_set():
                device._publish(
                    device.topics.status, mqtt_pb2.DeviceStatus(device_id=device_id, online=False)
                )
                client.disconnect()
                client.loop_write()  # flush both on this (the loop's) thread before the socket closes
            device.client = None
            self.loop.detach(client)
            sock = client.socket()
            if sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.loop._sel.unregister(sock)
                sock.close()
            device.connected.clear()

        self.loop.run_sync(drop)

    def snapshot(self, fn: Callable[[dict[str, SimDevice]], Any]) -> Any:
        """Evaluate ``fn`` over the devices on the loop thread (a consistent view)."""
        return self.loop.run_sync(lambda: fn(self.devices))

    def digests(self, name: str) -> dict[str, str]:
        return self.snapshot(lambda devs: {i: d.digest(name) for i, d in devs.items()})  # type: ignore[no-any-return]

    def close(self) -> None:
        for device_id in list(self.devices):
            if self.devices[device_id].client is not None:
                self.disconnect(device_id, graceful=True)
        self.loop.close()


def wait_for(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.05, what: str = "condition"
) -> None:
    """Poll ``predicate`` until true; raise AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
