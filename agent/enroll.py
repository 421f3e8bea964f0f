"""Enrollment: trade a one-time token for this device's credentials, once, and keep them 0600.

The agent makes its own key (EC P-256) and sends only a CSR, so the private key never leaves
the device. The control plane answers with a client certificate signed by the fleet CA, a
random MQTT password (provisioned in the broker), the broker URL, the trusted artifact keys and
the fleet key that signs its desired states.
Enrollment talks to the control plane's people listener (TLS, no client certificate yet),
checking its certificate against the fleet CA the operator handed over with the token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import json_format

from edgectl.agent.config import CREDENTIALS_FILE, AgentConfig
from edgectl.agent.errors import ConfigError
from edgectl.agent.orders import FLEET_KEYS_FILE
from edgectl.durable import atomic_write
from edgectl.protos.v1 import fleet_pb2 as fpb
from edgectl.protos.v1 import fleet_pb2_grpc as fpb_grpc
from edgectl.security.files import check_private

log = logging.getLogger(__name__)
KEY_FILE = "device.key"
CA_FILE = "fleet-ca.crt"


class EnrollmentError(ConfigError):
    """The control plane refused the enrollment token, or could not be reached to use it."""


def make_key_and_csr(device_id: str) -> tuple[bytes, bytes]:
    """(private key PEM, CSR PEM) for a new device key whose CSR names ``device_id``."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def enroll(config: AgentConfig, agent_version: str = "", profile: str = "") -> fpb.DeviceCredentials:
    """Exchange ``config.enroll_token`` at the control plane; writes the key and credentials 0600."""
    server = config.enroll_server or config.control_plane
    if not config.enroll_token or not server:
        raise ConfigError("enrollment needs --enroll-token and --enroll-server (or --control-plane)")
    if config.ca_file is None:
        raise ConfigError(
            "enrollment needs --ca-file: the fleet CA that the control plane's certificate chains to",
            hint="the operator hands it over with the token (ca.crt from `edgectl broker config`)",
        )
    try:
        ca_pem = config.ca_file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read --ca-file {config.ca_file}: {exc}") from exc
    key_pem, csr_pem = make_key_and_csr(config.device_id)
    request = fpb.EnrollRequest(
        device_id=config.device_id, token=config.enroll_token, csr_pem=csr_pem,
        agent_version=agent_version, profile=profile,
    )  # fmt: skip
    with grpc.secure_channel(server, grpc.ssl_channel_credentials(root_certificates=ca_pem)) as channel:
        try:
            creds: fpb.DeviceCredentials = fpb_grpc.FleetServiceStub(channel).Enroll(request, timeout=30)
        except grpc.RpcError as exc:
            hint = (
                "is --enroll-server the control plane's TLS listener (not the agents' mTLS one), and "
                "does --ca-file hold the fleet CA that signed its certificate?"
                if exc.code() == grpc.StatusCode.UNAVAILABLE
                else "tokens are one-time and expire: ask for a new one with `edgectl devices enroll "
                f"{config.device_id}`"
            )
            raise EnrollmentError(
                f"enrollment of {config.device_id} at {server} failed: {exc.code().name}: {exc.details()}",
                hint=hint,
            ) from exc
    if not creds.ca_cert_pem:
        creds.ca_cert_pem = ca_pem
    # The fleet keys of this enrollment replace any earlier ones (FleetTrust writes them anew).
    (config.data_dir / FLEET_KEYS_FILE).unlink(missing_ok=True)
    atomic_write(config.data_dir / KEY_FILE, key_pem, 0o600)
    atomic_write(config.data_dir / CREDENTIALS_FILE, json_format.MessageToJson(creds).encode(), 0o600)
    atomic_write(config.data_dir / CA_FILE, bytes(creds.ca_cert_pem), 0o644)
    log.info("enrolled %s; credentials kept in %s", config.device_id, config.data_dir)
    return creds


@dataclass(frozen=True)
class DeviceTls:
    """What the agent presents and trusts on its TLS links, from its enrollment."""

    ca_file: Path
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        """mTLS to the control plane's agent listener."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem, private_key=self.key_pem, certificate_chain=self.cert_pem
        )


def device_tls(data_dir: Path, creds: fpb.DeviceCredentials | None) -> DeviceTls | None:
    """The enrolled client certificate and key, or None for a device enrolled without one."""
    key_path = data_dir / KEY_FILE
    if creds is None or not creds.client_cert_pem or not key_path.is_file():
        return None
    check_private(key_path, "device key", error=ConfigError)
    ca_file = data_dir / CA_FILE
    if not ca_file.is_file():
        atomic_write(ca_file, bytes(creds.ca_cert_pem), 0o644)
    return DeviceTls(ca_file, bytes(creds.ca_cert_pem), bytes(creds.client_cert_pem), key_path.read_bytes())
