"""A secured control plane's secrets and identities, loaded from one directory.

The directory is the one `edgectl broker config --out DIR` writes: the fleet CA (``ca.crt``,
``ca.key``) and the control plane's broker credentials. The control plane adds its token key
(``token.key``) and the fleet key that signs desired states (``fleet-key.pem``), both made on
first use, and issues its own gRPC server certificate from the CA at
start. Enrollment signs device CSRs with the CA and provisions the device's MQTT identity in
mosquitto's dynamic-security plugin over a dedicated admin connection.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import ssl
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from paho.mqtt.enums import CallbackAPIVersion

from edgectl.addresses import parse_mqtt_url
from edgectl.control_plane.errors import ControlPlaneError, InvalidArgument, Unavailable
from edgectl.control_plane.fleet_key import FleetKeyring
from edgectl.control_plane.identity import IssuedCertificate
from edgectl.security.dynsec import RESPONSE_TOPIC, DynsecAdmin
from edgectl.security.errors import BrokerAdminError, SecurityError
from edgectl.security.files import check_private
from edgectl.security.grpc_tls import mtls_server_credentials, tls_server_credentials
from edgectl.security.pki import FleetCA, IssuedCert
from edgectl.security.tokens import TokenIssuer, TokenVerifier

log = logging.getLogger(__name__)
TOKEN_KEY_FILE = "token.key"
BROKER_CREDENTIALS_FILE = "control-plane-credentials.json"
SITE_FILE = "site.json"  # in a site broker's directory: its name and the URL its devices use


@dataclass(frozen=True)
class BrokerCredentials:
    """The control plane's own MQTT identity, as `edgectl broker config` wrote it."""

    url: str
    username: str
    password: str
    ca_file: str | None

    @classmethod
    def load(cls, path: Path, *, group_readable: bool = False) -> BrokerCredentials:
        check_private(path, "broker credentials file", group_readable=group_readable)
        try:
            data = json.loads(path.read_text())
            url = str(data["url"]).replace("://0.0.0.0:", "://127.0.0.1:")  # a listen address, not a host
            return cls(url, str(data["username"]), str(data["password"]), _ca_beside(path, data.get("ca")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ControlPlaneError(
                f"cannot read the broker credentials {path}: {exc}", hint="rerun `edgectl broker config`"
            ) from exc

    def __repr__(self) -> str:  # never let the password reach a log line
        return f"BrokerCredentials(url={self.url!r}, username={self.username!r}, password='***')"


def _ca_beside(credentials: Path, ca: str | None) -> str | None:
    """The broker CA: as written, else relative to the credentials file, else the ca.crt beside it.

    `edgectl broker config` writes an absolute path; when the directory is copied or mounted
    elsewhere (a Kubernetes Secret), the CA that travelled with it is the one beside the file.
    """
    if not ca:
        return None
    written = Path(ca)
    if not written.is_absolute():
        return str(credentials.parent / written)
    beside = credentials.parent / "ca.crt"
    return str(beside) if not written.exists() and beside.exists() else ca


def default_tls_names(listen_hosts: list[str]) -> list[str]:
    """Names the server certificate covers: loopback, this host's name, and the listen hosts."""
    names = ["localhost", "127.0.0.1", socket.gethostname()]
    names += [h for h in listen_hosts if h not in ("", "0.0.0.0", "::")]
    return list(dict.fromkeys(names))


def cert_fingerprint(cert_pem: bytes) -> str:
    """sha256 of the certificate's DER bytes, hex: what the store keeps to revoke it."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(Encoding.DER)
    return hashlib.sha256(der).hexdigest()


class BrokerAdminLink:
    """A dedicated MQTT connection with dynamic-security admin rights, connected on first use."""

    def __init__(self, credentials: BrokerCredentials, timeout: float = 10.0) -> None:
        self.credentials = credentials
        self.timeout = timeout
        self.url = parse_mqtt_url(credentials.url)
        self._lock = threading.Lock()
        self._admin: DynsecAdmin | None = None
        self._connected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"edgectl-cp-admin-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )  # fmt: skip
        self.client.username_pw_set(credentials.username, credentials.password)
        if self.url.tls:
            self.client.tls_set(ca_certs=credentials.ca_file, cert_reqs=ssl.CERT_REQUIRED)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self._connected.clear()
        self._started = False

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the admin connection", extra={"reason": str(reason)})
            return
        client.subscribe(RESPONSE_TOPIC, qos=1)  # again after every reconnect (clean session)
        self._connected.set()

    def admin(self) -> DynsecAdmin:
        with self._lock:
            if not self._started:
                self.client.connect_async(self.url.host, self.url.port, keepalive=30)
                self.client.loop_start()
                self._started = True
            if not self._connected.wait(self.timeout):
                raise Unavailable(
                    f"cannot reach the broker's admin API at {self.url.host}:{self.url.port}",
                    hint="is mosquitto running with the config `edgectl broker config` wrote?",
                )
            if self._admin is None:
                self._admin = DynsecAdmin(self.client, timeout=self.timeout)
            return self._admin

    def close(self) -> None:
        if self._started:
            self.client.disconnect()
            self.client.loop_stop()


@dataclass(frozen=True)
class SiteBroker:
    """A site broker (`edgectl broker config --bridge-to`): its devices' identities live there too."""

    site: str
    device_url: str  # what its devices are told to connect to; the control plane administers it there
    link: BrokerAdminLink

    @classmethod
    def load(cls, directory: Path) -> SiteBroker:
        """From the site broker's config directory: site.json and its control-plane credentials."""
        try:
            info = json.loads((directory / SITE_FILE).read_text())
            site, url = str(info["site"]), str(info["device_url"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ControlPlaneError(
                f"{directory} is not a site broker's directory: {exc}",
                hint="make it with `edgectl broker config --out DIR --bridge-to URL --site NAME ...`",
            ) from exc
        creds = BrokerCredentials.load(directory / BROKER_CREDENTIALS_FILE)
        return cls(
            site, url, BrokerAdminLink(BrokerCredentials(url, creds.username, creds.password, creds.ca_file))
        )


class FleetIdentities:
    """Per-device identities of a secured fleet: client certificates and broker users.

    A device labelled ``site=NAME`` of a known site broker gets its broker identity there as
    well as on the central broker (its bridge relays for it), and is told to use the site broker.
    """

    def __init__(
        self, ca: FleetCA, broker: BrokerAdminLink | None, sites: dict[str, SiteBroker] | None = None
    ) -> None:
        self.ca = ca
        self.broker = broker
        self.sites = dict(sites or {})

    def broker_url(self, site: str) -> str | None:
        known = self.sites.get(site)
        return known.device_url if known else None

    def issue_certificate(self, device_id: str, csr_pem: bytes) -> IssuedCertificate | None:
        if not csr_pem:
            raise InvalidArgument(
                "this fleet uses client certificates: Enroll needs a CSR (csr_pem)",
                hint="enroll with `edgectl agent run --enroll-token ...`, which makes a key and a CSR",
            )
        try:
            cert = self.ca.sign_csr(csr_pem, device_id)
        except SecurityError as exc:
            raise InvalidArgument(str(exc), hint="send a PEM CSR over an EC P-256 key") from exc
        return IssuedCertificate(cert, self.ca.cert_pem, cert_fingerprint(cert))

    def _links(self, site: str) -> list[BrokerAdminLink]:
        links = [self.broker] if self.broker is not None else []
        return links + ([self.sites[site].link] if site in self.sites else [])

    def provision(self, device_id: str, password: str, site: str = "") -> None:
        for link in self._links(site):
            try:
                link.admin().provision_device(device_id, password)
            except BrokerAdminError as exc:
                raise Unavailable(str(exc), hint=exc.hint) from exc

    def revoke(self, device_id: str, site: str = "") -> None:
        for link in self._links(site):
            try:
                link.admin().remove_device(device_id)
            except BrokerAdminError as exc:
                raise Unavailable(str(exc), hint=exc.hint) from exc

    def close(self) -> None:
        for known in self.sites.values():
            known.link.close()


class FleetSecurity:
    """The CA, token key, fleet key and server certificate of a secured control plane."""

    def __init__(
        self,
        directory: Path,
        tls_names: list[str],
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        # group_readable: replicas read these from a Kubernetes Secret volume (root:fsGroup 0440).
        self.ca = FleetCA.load_or_create(directory, group_readable=True)
        self.issuer = TokenIssuer.load_or_create(directory / TOKEN_KEY_FILE, group_readable=True)
        self.fleet_key = FleetKeyring.load_or_create(directory)
        if tls_cert is not None and tls_key is not None:
            self.server = IssuedCert(tls_cert.read_bytes(), tls_key.read_bytes(), self.ca.cert_pem)
        else:
            self.server = self.ca.issue_server(tls_names)
        creds = directory / BROKER_CREDENTIALS_FILE
        self.broker_credentials = (
            BrokerCredentials.load(creds, group_readable=True) if creds.exists() else None
        )

    @property
    def verifier(self) -> TokenVerifier:
        return self.issuer.verifier()

    def people_credentials(self) -> grpc.ServerCredentials:
        return tls_server_credentials(self.server.cert_pem, self.server.key_pem)

    def device_credentials(self) -> grpc.ServerCredentials:
        return mtls_server_credentials(self.server.cert_pem, self.server.key_pem, self.ca.cert_pem)
