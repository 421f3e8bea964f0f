"""The blob store on S3-compatible object storage (AWS S3, MinIO, Ceph RGW, moto), via boto3.

boto3 is imported only here and only when an S3 store is made, so the agent never needs it.
Objects are ``{prefix}sha256/{hex}``; S3 makes an object visible only once fully written, so a
put is atomic, and it is idempotent because the key is the content's digest.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO, cast
from urllib.parse import urlparse

from edgectl.artifact.blobstore import check_digest, check_stream_digest, copy_hashing, key_for
from edgectl.artifact.canonical import DIGEST_PREFIX
from edgectl.artifact.errors import BlobNotFoundError, BlobStoreError, BlobStoreUrlError

ENDPOINT_ENV = "EDGECTL_S3_ENDPOINT"
# Where devices reach the bucket, when not where the control plane does (a CDN, another name).
PUBLIC_ENDPOINT_ENV = "EDGECTL_S3_PUBLIC_ENDPOINT"
# An object's bytes never change (its key is their digest): any cache may keep them for good.
IMMUTABLE = "public, max-age=31536000, immutable"
MAX_URL_TTL_S = 7 * 24 * 3600  # SigV4's own limit on a presigned URL
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
# Blobs up to this size are hashed in memory; bigger ones spool to disk first.
_SPOOL_MAX = 64 << 20


class S3BlobStore:
    """A BlobStore over one bucket and key prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
    ) -> None:
        if client is None:
            import boto3  # lazy: see the module docstring

            client = boto3.client("s3", endpoint_url=endpoint_url or os.environ.get(ENDPOINT_ENV) or None)
        self._s3 = client
        self._public_endpoint = public_endpoint_url or os.environ.get(PUBLIC_ENDPOINT_ENV) or None
        self._presigner: Any = None
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        # Keys per list page and per DeleteObjects call (S3 caps both at 1000).
        self.page_size = 1000

    @classmethod
    def from_url(cls, url: str, *, endpoint_url: str | None = None, client: Any = None) -> S3BlobStore:
        """``s3://bucket/optional/prefix``."""
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise BlobStoreUrlError(f"not an S3 URL: {url!r}", hint="use s3://BUCKET[/PREFIX]")
        return cls(parsed.netloc, parsed.path, client=client, endpoint_url=endpoint_url)

    def __repr__(self) -> str:
        return f"S3BlobStore('s3://{self.bucket}/{self.prefix}')"

    def key(self, digest: str) -> str:
        """The object key of a digest."""
        return f"{self.prefix}sha256/{check_digest(digest)}"

    def _call(self, op: str, digest: str | None, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._s3, op)(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if digest is not None and code in _NOT_FOUND:
                raise BlobNotFoundError(digest, f"s3://{self.bucket}/{self.prefix}") from exc
            if code == "InvalidRange":
                return None
            raise BlobStoreError(f"S3 {op} on bucket {self.bucket!r} failed: {code or exc}") from exc
        except BotoCoreError as exc:
            raise BlobStoreError(f"S3 {op} on bucket {self.bucket!r} failed: {exc}") from exc

    def put(self, data: bytes, *, expected: str | None = None, expected_size: int | None = None) -> str:
        digest = key_for(data, expected, expected_size)
        if not self.has(digest):  # idempotent, and saves the upload when it is already there
            self._call("put_object", None, Key=self.key(digest), Body=data)
        return digest

    def put_stream(self, stream: BinaryIO, *, expected: str | None = None) -> str:
        # The key is the digest, so the whole stream must be hashed before the upload can start.
        if expected is not None:
            check_digest(expected)
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_MAX) as spool:
            digest = copy_hashing(stream, spool)  # type: ignore[arg-type]
            check_stream_digest(expected, digest)
            if not self.has(digest):
                spool.seek(0)
                self._upload(spool, digest)
        return digest

    def _upload(self, fileobj: Any, digest: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._s3.upload_fileobj(fileobj, self.bucket, self.key(digest))
        except (BotoCoreError, ClientError) as exc:
            raise BlobStoreError(f"S3 upload to bucket {self.bucket!r} failed: {exc}") from exc

    def get(self, digest: str) -> bytes:
        resp = self._call("get_object", digest, Key=self.key(digest))
        return cast(bytes, resp["Body"].read())

    def open(self, digest: str) -> BinaryIO:
        resp = self._call("get_object", digest, Key=self.key(digest))
        return cast(BinaryIO, resp["Body"])

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise BlobStoreError(f"invalid byte range offset={offset} length={length}")
        if length == 0:
            return b""
        resp = self._call(
            "get_object", digest, Key=self.key(digest), Range=f"bytes={offset}-{offset + length - 1}"
        )
        # InvalidRange (416): the offset is at or past the end, which read() semantics make empty.
        return b"" if resp is None else cast(bytes, resp["Body"].read())

    def presign_get(self, digest: str, ttl_s: int) -> str:
        """A URL that GETs the blob for ``ttl_s`` seconds with no credentials (a SigV4 query string).

        Signing is local arithmetic (no request to S3), so it costs microseconds per URL.
        """
        if not 1 <= ttl_s <= MAX_URL_TTL_S:
            raise BlobStoreError(f"a presigned URL lives 1 s to 7 days, not {ttl_s} s")
        params = {"Bucket": self.bucket, "Key": self.key(digest), "ResponseCacheControl": IMMUTABLE}
        try:
            return cast(
                str, self._signer().generate_presigned_url("get_object", Params=params, ExpiresIn=ttl_s)
            )
        except Exception as exc:  # botocore raises several unrelated types here (no credentials, ...)
            raise BlobStoreError(
                f"cannot presign a URL for bucket {self.bucket!r}: {exc}",
                hint="give the control plane S3 credentials (AWS_ACCESS_KEY_ID/...) or an IAM role",
            ) from exc

    def _signer(self) -> Any:
        """The client that signs URLs: SigV4 (botocore may default to SigV2 for presigning), aimed
        at the public endpoint when there is one, with the store client's own credentials."""
        if self._presigner is None:
            import boto3
            from botocore.config import Config

            creds = self._s3._request_signer._credentials  # the store's (possibly injected) credentials
            self._presigner = boto3.client(
                "s3",
                endpoint_url=self._public_endpoint or self._s3.meta.endpoint_url,
                region_name=self._s3.meta.region_name,
                aws_access_key_id=creds.access_key if creds else None,
                aws_secret_access_key=creds.secret_key if creds else None,
                aws_session_token=creds.token if creds else None,
                config=Config(signature_version="s3v4"),
            )
        return self._presigner

    def has(self, digest: str) -> bool:
        try:
            self._call("head_object", digest, Key=self.key(digest))
        except BlobNotFoundError:
            return False
        return True

    def size(self, digest: str) -> int:
        return int(self._call("head_object", digest, Key=self.key(digest))["ContentLength"])

    def delete(self, digest: str) -> bool:
        if not self.has(digest):
            return False
        self._call("delete_object", digest, Key=self.key(digest))
        return True

    def iter_digests(self) -> Iterator[str]:
        base = f"{self.prefix}sha256/"
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": base, "MaxKeys": self.page_size}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call("list_objects_v2", None, **kwargs)
            for obj in resp.get("Contents", []):
                name = obj["Key"][len(base) :]
                if len(name) == 64 and "/" not in name:
                    yield DIGEST_PREFIX + name
            if not resp.get("IsTruncated"):
                return
            token = resp.get("NextContinuationToken")

    def gc(self, keep: set[str]) -> list[str]:
        doomed = sorted(d for d in self.iter_digests() if d not in keep)
        step = min(self.page_size, 1000)  # DeleteObjects takes at most 1000 keys
        for i in range(0, len(doomed), step):
            batch = doomed[i : i + step]
            resp = self._call(
                "delete_objects",
                None,
                Delete={"Objects": [{"Key": self.key(d)} for d in batch], "Quiet": True},
            )
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise BlobStoreError(f"S3 gc could not delete {first.get('Key')}: {first.get('Message')}")
        return doomed
