"""Network addresses as users write them: ``HOST:PORT`` and broker URLs, parsed in one place.

Every flag, config file and listener goes through :func:`parse_host_port` or
:func:`parse_mqtt_url`, so an IPv6 literal (``[::1]:8001``, ``mqtt://[::1]:1883``) works
everywhere or nowhere, and a bad address gets the same message from every command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from edgectl.errors import UsageError

MQTT_PORT = 1883
MQTTS_PORT = 8883
# paho and mosquitto also accept tcp:// and ssl://; they mean mqtt:// and mqtts://.
_MQTT_SCHEMES = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True}
_WILDCARD_HOSTS = ("0.0.0.0", "::")
_HOST_PORT_HINT = "write HOST:PORT, e.g. 127.0.0.1:7443, or [::1]:7443 for IPv6"
_MQTT_HINT = "write mqtt://HOST:PORT or mqtts://HOST:PORT, e.g. mqtt://127.0.0.1:1883"


class AddressError(UsageError):
    """A HOST:PORT or broker URL that cannot be used as written."""


@dataclass(frozen=True)
class HostPort:
    """A host (name, IPv4, or IPv6 without brackets) and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        """``host:port``, with the brackets an IPv6 literal needs (``[::1]:8001``)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def dialable(self) -> HostPort:
        """Where a client on this machine reaches a listener: a wildcard host becomes loopback."""
        return HostPort("127.0.0.1", self.port) if self.host in _WILDCARD_HOSTS else self


def parse_host_port(
    text: str, *, what: str = "address", default_host: str | None = None, listen: bool = False
) -> HostPort:
    """``HOST:PORT``, ``[v6]:PORT`` or (with ``default_host``) ``:PORT``; AddressError says what is wrong.

    ``listen``: the address is bound, not dialled, so port 0 (the OS picks one) is allowed.
    """

    def bad(why: str) -> AddressError:
        return AddressError(f"invalid {what} {text!r}: {why}", hint=_HOST_PORT_HINT)

    stripped = text.strip()
    if stripped.startswith("["):
        host, sep, rest = stripped[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise bad("an IPv6 literal is written [ADDR]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = stripped.rpartition(":")
        if not sep:
            raise bad("no port")
        if ":" in host:
            raise bad("an IPv6 literal needs brackets")
    if not port_text.isdigit() or int(port_text) > 65535 or (int(port_text) == 0 and not listen):
        raise bad(f"the port must be a number in {0 if listen else 1}..65535")
    if not host:
        if default_host is None:
            raise bad("no host")
        host = default_host
    return HostPort(host, int(port_text))


@dataclass(frozen=True)
class MqttUrl:
    """A broker URL: ``mqtt://[user:pass@]host[:port]``, or ``mqtts://`` for TLS."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log line

    @property
    def scheme(self) -> str:
        """``mqtts`` with TLS, else ``mqtt``."""
        return "mqtts" if self.tls else "mqtt"

    def public(self) -> str:
        """The URL without credentials: what devices are told and logs may show."""
        return f"{self.scheme}://{HostPort(self.host, self.port)}"


def parse_mqtt_url(url: str) -> MqttUrl:
    """``mqtt://``/``mqtts://`` (or bare ``host:port``, meaning mqtt://) into an MqttUrl.

    The port defaults to 1883 for mqtt and 8883 for mqtts; user and password are URL-decoded.
    """
    parts = urlsplit(url.strip() if "://" in url else f"mqtt://{url.strip()}")
    if parts.scheme not in _MQTT_SCHEMES or not parts.hostname:
        raise AddressError(f"{url!r} is not an MQTT URL", hint=_MQTT_HINT)
    tls = _MQTT_SCHEMES[parts.scheme]
    try:
        port = parts.port
    except ValueError:  # urllib raises on a port that is not a number or out of range
        port = 0
    if port == 0:
        raise AddressError(f"MQTT URL {url!r}: the port is not a number in 1..65535", hint=_MQTT_HINT)
    return MqttUrl(
        parts.hostname,
        port or (MQTTS_PORT if tls else MQTT_PORT),
        tls,
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
    )
