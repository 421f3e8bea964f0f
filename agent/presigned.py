"""Chunks straight from the blob store: the control plane signs URLs, the agent GETs them.

``PresignedTransport`` asks the control plane (over the same gRPC channel, mTLS) for short-lived
URLs of the chunks it lacks (they come with the manifest, in one call, from a control plane that
offers them there; GetChunkUrls otherwise, and for what the manifest answer left out), then fetches each over HTTP(S) with the standard library. A cut
connection resumes with a ``Range`` request from the last byte received (the object is
immutable: its key is the chunk's digest), an expired URL is signed again, and the device never
holds bucket credentials. Like every transport it checks nothing: ``ArtifactFetcher`` verifies
each chunk against its manifest digest before storing it. When the control plane's blob store
hands out no URLs (local disk), the transport says so at once for a while, without asking.
"""

from __future__ import annotations

import http.client
import logging
import ssl
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from edgectl.agent.errors import FetchError, UrlsNotOfferedError
from edgectl.agent.transports import GrpcTransport
from edgectl.protos.v1 import artifacts_pb2 as apb

log = logging.getLogger(__name__)
READ_BLOCK = 1 << 16
NOT_OFFERED_S = 600.0
OFFER_MARGIN_S = 30.0  # URLs from a manifest answer with less life left are signed afresh  # after "no URLs here", ask again this much later (a store can move to S3)


class PresignedTransport:
    """Manifest over gRPC, chunk bytes by presigned HTTP(S) GET from the blob store."""

    name = "presigned"
    # Chunks per fetcher batch: one GetChunkUrls answers them all (a 50 MB artifact in one call),
    # where a gRPC stream is kept to the fetcher's default batch.
    max_batch = 512

    def __init__(
        self,
        control_plane: GrpcTransport,
        *,
        allow_http: bool = False,
        ca_file: Path | None = None,
        timeout_s: float = 30.0,
        resume_tries: int = 3,
    ) -> None:
        self.control_plane = control_plane
        self.prefer_over = control_plane  # after a fallback to Download, the fetcher tries URLs again
        self.allow_http = allow_http  # plaintext URLs (a LAN object store); HTTPS otherwise
        self.timeout_s = timeout_s  # per socket operation: a stalled body counts as cut
        self.resume_tries = resume_tries  # Range resumes of one chunk before the round gives up
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._pool = _Connections(context, timeout_s)
        self._not_offered_until = 0.0
        # (artifact digest, chunk digest -> URL, expiry in epoch seconds) from the last manifest answer
        self._offered: tuple[str, dict[str, apb.ChunkUrl], float] | None = None

    def get_manifest(self, digest: str) -> tuple[bytes, bytes]:
        # One call for the manifest and the chunks' URLs (a control plane that offers none, older
        # or with local blobs, answers the manifest alone, and fetch_chunks asks GetChunkUrls).
        art = self.control_plane.get_artifact(digest, want_chunk_urls=True)
        if art.chunk_urls:
            expires = art.chunk_urls_expire_at.ToSeconds()
            self._offered = (digest, {u.chunk_digest: u for u in art.chunk_urls}, expires)
        return bytes(art.manifest), bytes(art.signatures)

    def _offered_for(self, digest: str) -> dict[str, apb.ChunkUrl]:
        """The URLs the manifest answer of ``digest`` carried, unless they are about to expire."""
        offered = self._offered
        if offered is None or offered[0] != digest or offered[2] - time.time() < OFFER_MARGIN_S:
            return {}
        return offered[1]

    def fetch_chunks(self, digest: str, chunks: list[str]) -> Iterator[tuple[str, bytes]]:
        todo = list(chunks)
        offered = self._offered_for(digest)
        if not offered and time.monotonic() < self._not_offered_until:
            raise UrlsNotOfferedError("the control plane hands out no chunk URLs (its blob store is local)")
        while todo:
            fresh = not offered  # signed for this request, not carried over from the manifest answer
            if offered:
                urls = [offered[c] for c in todo if c in offered]
                offered = {}
            else:
                try:
                    urls = self.control_plane.chunk_urls(digest, todo)
                except UrlsNotOfferedError:
                    self._not_offered_until = time.monotonic() + NOT_OFFERED_S
                    log.info("control plane offers no chunk URLs; fetching through it instead")
                    raise
            for fetched, u in enumerate(urls):
                try:
                    data = self._get(u.url, u.size)
                except _Expired:
                    if fresh and not fetched:
                        raise FetchError(f"the blob store refuses freshly signed URLs for {digest}") from None
                    self._offered = None  # sign the rest afresh, in this round and the next
                    break  # a slow link outlived these URLs: sign the rest again
                todo.remove(u.chunk_digest)
                yield u.chunk_digest, data
            else:
                if fresh:
                    return

    def _get(self, url: str, size: int) -> bytes:
        """The object's bytes (at most ``size`` + 1: a longer one is refused by the fetcher anyway)."""
        scheme = urlsplit(url).scheme
        if scheme != "https" and not (scheme == "http" and self.allow_http):
            raise FetchError(
                f"the control plane handed a {scheme or 'schemeless'} chunk URL; only https is accepted",
                hint="serve the blob store over HTTPS, or run the agent with --blob-urls any",
            )
        got = bytearray()
        failures = 0
        while True:
            try:
                resp = self._pool.get(url, {"Range": f"bytes={len(got)}-"} if got else {})
                try:
                    if resp.status == 403:
                        raise _Expired()
                    if resp.status == 416 and got:
                        return bytes(got)  # nothing past what arrived: the fetcher judges its size
                    if resp.status not in (200, 206):
                        raise FetchError(f"blob store answered HTTP {resp.status} {resp.reason} for a chunk")
                    if got and not _resumes_at(resp, len(got)):
                        got.clear()  # the server ignored the range: take the whole object again
                    while len(got) <= size:
                        block = resp.read(min(READ_BLOCK, size + 1 - len(got)))
                        if not block:
                            break
                        got += block
                    if len(got) <= size and resp.length:
                        # http.client reads a closed socket as a short body, not as an error.
                        raise ConnectionResetError(f"the body stopped {resp.length} bytes short")
                    return bytes(got)
                finally:
                    self._pool.release(url, resp)
            except (http.client.HTTPException, OSError) as exc:
                self._pool.drop(url)
                failures += 1
                if failures > self.resume_tries:
                    raise FetchError(f"blob store GET failed {failures} times: {exc}") from exc
                log.info("chunk GET cut after %d bytes (%s); resuming", len(got), exc)

    def close(self) -> None:
        """Nothing to release: the gRPC channel belongs to the GrpcTransport it shares."""


class _Connections:
    """One kept-alive connection per origin: one TCP (and TLS) handshake per bucket, not per chunk.

    An HTTPS proxy from the environment (``https_proxy``, ``no_proxy``) is used through CONNECT,
    as other HTTP clients do. The transport fetches one chunk at a time, so there is no lock.
    """

    def __init__(self, context: ssl.SSLContext, timeout_s: float) -> None:
        self._context = context
        self._timeout_s = timeout_s
        self._open: dict[str, http.client.HTTPConnection] = {}

    def get(self, url: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        """Send a GET of ``url`` on its origin's connection (opened if needed) and return the answer."""
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        conn = self._open.get(origin)
        if conn is None:
            conn = self._open[origin] = self._connect(parts.scheme, parts.hostname or "", parts.port)
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
        return conn.getresponse()

    def _connect(self, scheme: str, host: str, port: int | None) -> http.client.HTTPConnection:
        if scheme == "http":
            return http.client.HTTPConnection(host, port, timeout=self._timeout_s)
        proxy = urllib.request.getproxies().get("https")
        if proxy and not urllib.request.proxy_bypass(host):
            p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            conn = http.client.HTTPSConnection(
                p.hostname or "", p.port or 3128, timeout=self._timeout_s, context=self._context
            )
            conn.set_tunnel(host, port or 443)
            return conn
        return http.client.HTTPSConnection(host, port, timeout=self._timeout_s, context=self._context)

    def release(self, url: str, resp: http.client.HTTPResponse) -> None:
        """After an answer: keep the connection only if the answer was read to its end."""
        if not resp.isclosed():  # http.client closes an answer read to its end
            self.drop(url)  # unread bytes (an error body, an oversized object) would poison the next GET

    def drop(self, url: str) -> None:
        """Close the origin's connection (cut, stale or unusable); the next GET opens a new one."""
        parts = urlsplit(url)
        conn = self._open.pop(f"{parts.scheme}://{parts.netloc}", None)
        if conn is not None:
            conn.close()


class _Expired(Exception):
    """The blob store refused a URL (403): it expired on a slow link, or the bucket policy changed."""


def _resumes_at(resp: http.client.HTTPResponse, offset: int) -> bool:
    """True when the answer is a 206 whose Content-Range starts at ``offset``."""
    if resp.status != 206:
        return False
    unit, _, rest = (resp.headers.get("Content-Range") or "").partition(" ")
    return unit == "bytes" and rest.split("-", 1)[0] == str(offset)
