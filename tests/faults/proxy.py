"""A TCP proxy a test can cut, heal, truncate and corrupt: the network between one device and a server.

Each accepted connection is relayed to the target by two threads. ``cut()`` closes every live
connection and refuses new ones (as a partition does); ``heal()`` lets them through again.
``truncate_after`` closes the connection once that many bytes went from the server to the device;
``flip_at`` inverts one byte of that direction at that offset. Both fire once.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass


@dataclass
class Injected:
    """What the proxy did to the server -> device stream, and how much it carried."""

    truncated: int = 0
    flipped: int = 0
    downstream_bytes: int = 0
    connections: int = 0


class TcpProxy:
    """Listens on a free loopback port and relays to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.injected = Injected()
        self.truncate_after: int | None = None
        self.flip_at: int | None = None
        self._partitioned = threading.Event()
        self._lock = threading.Lock()
        self._live: list[socket.socket] = []
        self._closed = False
        self._downstream = 0  # bytes server -> device, over all connections (for the one-shot faults)
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Partition: drop every live connection and refuse new ones until ``heal()``."""
        self._partitioned.set()
        with self._lock:
            live, self._live = self._live, []
        for s in live:
            _close(s)

    def heal(self) -> None:
        self._partitioned.clear()

    def close(self) -> None:
        self._closed = True
        self.cut()
        _close(self.listener)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self._partitioned.is_set():
                _close(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._live += [client, server]
                self.injected.connections += 1
            threading.Thread(target=self._relay, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._relay, args=(server, client, True), daemon=True).start()

    def _relay(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if downstream:
                    data, stop = self._tamper(data)
                    if data:
                        dst.sendall(data)
                    if stop:
                        break
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)

    def _tamper(self, data: bytes) -> tuple[bytes, bool]:
        """Apply the one-shot faults to a server -> device block; (bytes to send, close after)."""
        with self._lock:
            start = self._downstream
            self._downstream += len(data)
            self.injected.downstream_bytes += len(data)
            if self.flip_at is not None and start <= self.flip_at < start + len(data):
                i = self.flip_at - start
                data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
                self.flip_at = None
                self.injected.flipped += 1
            if self.truncate_after is not None and start + len(data) > self.truncate_after:
                keep = max(0, self.truncate_after - start)
                self.truncate_after = None
                self.injected.truncated += 1
                return data[:keep], True
        return data, False


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()
