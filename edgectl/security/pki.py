"""The fleet CA: one self-signed root that signs the broker's and control plane's server
certificates and the agents' client certificates (mTLS).

Keys are ECDSA P-256: small, fast on Jetson-class CPUs, supported by gRPC and mosquitto.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgectl.security.errors import SecurityError
from edgectl.security.files import check_private, write_private, write_public

CA_DAYS = 3650
LEAF_DAYS = 825


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class IssuedCert:
    """A certificate with its private key (PEM), and the CA certificate that signed it."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    def write(self, directory: Path, name: str) -> tuple[Path, Path, Path]:
        """Write ``name.crt``, ``name.key`` (0600) and ``ca.crt``; returns their paths."""
        cert, key, ca = directory / f"{name}.crt", directory / f"{name}.key", directory / "ca.crt"
        write_public(cert, self.cert_pem)
        write_private(key, self.key_pem)
        write_public(ca, self.ca_pem)
        return cert, key, ca


class FleetCA:
    """Issues the fleet's certificates from one root key."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(cls, common_name: str = "edgectl fleet CA") -> FleetCA:
        """A new root, valid ten years."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load_or_create(cls, directory: Path, *, group_readable: bool = False) -> FleetCA:
        """The CA kept in ``directory`` (``ca.crt`` + ``ca.key``), made on first use."""
        cert_path, key_path = directory / "ca.crt", directory / "ca.key"
        if cert_path.exists() and key_path.exists():
            return cls.load(cert_path, key_path, group_readable=group_readable)
        ca = cls.create()
        write_private(key_path, _pem_key(ca.key))
        write_public(cert_path, ca.cert_pem)
        return ca

    @classmethod
    def load(cls, cert_path: Path, key_path: Path, *, group_readable: bool = False) -> FleetCA:
        """The CA in these files; its key must be readable by its owner only (or group, see check_private)."""
        if key_path.exists():
            check_private(key_path, "fleet CA key", group_readable=group_readable)
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise SecurityError(f"cannot load the fleet CA from {cert_path}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SecurityError(f"{key_path} is not an EC private key")
        return cls(cert, key)

    def issue_server(self, hostnames: list[str]) -> IssuedCert:
        """A server certificate for the broker or control plane, valid for these names and IPs."""
        if not hostnames:
            raise SecurityError("a server certificate needs at least one hostname or IP address")
        sans: list[x509.GeneralName] = []
        for name in hostnames:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._leaf(hostnames[0], key.public_key(), ExtendedKeyUsageOID.SERVER_AUTH, sans)
        return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), self.cert_pem)

    def issue_client(self, identity: str) -> IssuedCert:
        """A client certificate whose CN is ``identity`` (a device id), with a new key."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._leaf(identity, key.public_key(), ExtendedKeyUsageOID.CLIENT_AUTH, [])
        return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), self.cert_pem)

    def sign_csr(self, csr_pem: bytes, identity: str) -> bytes:
        """Sign a device's CSR as a client certificate for ``identity``; the CSR's own CN is ignored."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise SecurityError(f"not a PEM certificate signing request: {exc}") from exc
        if not csr.is_signature_valid:
            raise SecurityError("the CSR's signature does not verify")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise SecurityError("the CSR must carry an EC (P-256) public key")
        cert = self._leaf(identity, public_key, ExtendedKeyUsageOID.CLIENT_AUTH, [])
        return cert.public_bytes(serialization.Encoding.PEM)

    def _leaf(
        self,
        common_name: str,
        public_key: ec.EllipticCurvePublicKey,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName],
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.key, hashes.SHA256())


def certificate_identity(cert_pem: bytes) -> str:
    """The CN of a PEM certificate: the identity a client certificate asserts."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise SecurityError("the certificate has no common name")
    return str(names[0].value)
