"""Presigned chunk URLs over real HTTP fronts: HTTPS checked against the configured CA, and URLs
that expire mid-batch (S3 answers 403) signed again. moto speaks plain HTTP and never expires a
URL, so each test puts a small real server in front of it that does what S3 would.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from edgectl.agent.errors import FetchError
from edgectl.agent.fetch import ArtifactFetcher, FetchSettings
from edgectl.agent.presigned import PresignedTransport
from edgectl.agent.transports import GrpcTransport
from edgectl.artifact import (
    LocalBlobStore,
    SigningKey,
    TrustStore,
    all_chunk_digests,
)  # fmt: skip
from edgectl.artifact.s3store import PUBLIC_ENDPOINT_ENV
from edgectl.broker import MosquittoProcess
from edgectl.security.pki import FleetCA
from tests.agent.presigned_rig import Bucket, bucket, fetch, plane_on, push
from tests.conftest import S3Endpoint

__all__ = ["bucket"]  # a fixture, used by name


class TlsFront:
    """HTTPS in front of moto (which speaks plain HTTP): a certificate from a CA of the test's own."""

    def __init__(self, target: str, cert: Path, key: Path) -> None:
        host, port = target.removeprefix("http://").rsplit(":", 1)
        self.target = (host, int(port))
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(client, server_side=True)
        except (OSError, ssl.SSLError):
            client.close()  # the device refused our certificate: nothing to relay
            return
        upstream = socket.create_connection(self.target)
        threading.Thread(target=_pipe, args=(upstream, tls), daemon=True).start()
        _pipe(tls, upstream)

    def close(self) -> None:
        self.listener.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.close()


def test_https_urls_are_checked_against_the_configured_ca(
    tmp_path: Path, mosquitto: MosquittoProcess, trust: TrustStore, signing_key: SigningKey,
    bucket: Bucket, moto_s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    cert, key, ca = FleetCA.create("blob store test CA").issue_server(["localhost"]).write(tmp_path, "s3")
    front = TlsFront(moto_s3.url, cert, key)
    monkeypatch.setenv(PUBLIC_ENDPOINT_ENV, f"https://localhost:{front.port}")
    try:
        with plane_on(tmp_path, mosquitto, trust, bucket.url) as plane:
            v1 = push(plane, tmp_path, signing_key, 1, (1, 2, 3))
            grpc_transport = GrpcTransport(plane.address, timeout_s=10)

            def fetcher(where: str, ca_file: Path | None) -> ArtifactFetcher:
                presigned = PresignedTransport(grpc_transport, ca_file=ca_file, timeout_s=5, resume_tries=0)
                return ArtifactFetcher(
                    LocalBlobStore(tmp_path / where), [presigned], FetchSettings(max_rounds=1)
                )

            # The system's CAs do not know this bucket's certificate: refused, nothing fetched.
            with pytest.raises(FetchError, match="CERTIFICATE_VERIFY_FAILED"):
                fetch(fetcher("untrusted", None), v1)
            assert not list((tmp_path / "untrusted").glob("sha256/*/*"))
            # Positive control: the same URLs over HTTPS with --blob-ca.
            report = fetch(fetcher("trusted", ca), v1)
            assert (report.transport, report.bytes_fetched) == ("presigned", v1.size)
    finally:
        front.close()


class ExpiringFront:
    """An HTTP front for moto that answers one GET 403 (as S3 does once a URL expired), then relays."""

    def __init__(self, target: str, refuse_request: int) -> None:
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                front.requests += 1
                if front.requests == refuse_request:
                    self.send_error(403, "Request has expired")
                    return
                upstream = urllib.request.Request(target + self.path, headers=dict(self.headers.items()))
                try:
                    with urllib.request.urlopen(upstream, timeout=10) as resp:
                        body, status, headers = resp.read(), resp.status, resp.headers
                except urllib.error.HTTPError as exc:
                    body, status, headers = exc.read(), exc.code, exc.headers
                self.send_response(status)
                for name in ("Content-Type", "Content-Range", "Cache-Control"):
                    if headers.get(name):
                        self.send_header(name, headers[name])
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.requests = 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_urls_that_expire_mid_batch_are_signed_again_for_the_rest(
    tmp_path: Path, mosquitto: MosquittoProcess, trust: TrustStore, signing_key: SigningKey,
    bucket: Bucket, moto_s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    front = ExpiringFront(moto_s3.url, refuse_request=3)
    monkeypatch.setenv(PUBLIC_ENDPOINT_ENV, f"http://127.0.0.1:{front.port}")
    try:
        with plane_on(tmp_path, mosquitto, trust, bucket.url) as plane:
            v1 = push(plane, tmp_path, signing_key, 1, (1, 2, 3))
            one_round = ArtifactFetcher(  # no second round to hide behind: the transport itself recovers
                LocalBlobStore(tmp_path / "device-chunks"),
                [
                    PresignedTransport(
                        GrpcTransport(plane.address, timeout_s=10), allow_http=True, timeout_s=5
                    )
                ],
                FetchSettings(max_rounds=1),
            )
            report = fetch(one_round, v1)
            assert (report.transport, report.bytes_fetched, report.corrupt_chunks) == (
                "presigned",
                v1.size,
                0,
            )
            assert front.requests == len(all_chunk_digests(v1.manifest)) + 1  # the refused one, asked again
    finally:
        front.close()
