"""gRPC credentials for the two listeners of a control plane and for the clients that call them."""

from __future__ import annotations

import grpc


def tls_server_credentials(cert_pem: bytes, key_pem: bytes) -> grpc.ServerCredentials:
    """TLS without client certificates: people and CI authenticate with bearer tokens."""
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])


def mtls_server_credentials(cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> grpc.ServerCredentials:
    """mTLS: only clients with a certificate from the fleet CA complete the handshake."""
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True
    )


def channel_credentials(
    ca_pem: bytes,
    *,
    token: str | None = None,
    client_cert_pem: bytes | None = None,
    client_key_pem: bytes | None = None,
) -> grpc.ChannelCredentials:
    """Trust the fleet CA; present a client certificate and/or a bearer token when given."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=client_key_pem, certificate_chain=client_cert_pem
    )
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return creds
