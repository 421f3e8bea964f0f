"""Free TCP ports on loopback, for servers that tests and `edgectl up` start."""

from __future__ import annotations

import socket
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> bool:
    """True once ``host:port`` accepts a TCP connection, False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def parse_address(text: str, *, default_host: str = "127.0.0.1", what: str = "address") -> tuple[str, int]:
    """Parse ``HOST:PORT``, ``:PORT`` or ``[v6]:PORT``; a UsageError says what a valid one looks like."""
    from edgectl.errors import UsageError

    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"invalid {what} {text!r}", hint="use HOST:PORT, e.g. 127.0.0.1:7443")
    host = host.strip("[]") or default_host
    return host, int(port_text)
