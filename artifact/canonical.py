"""Canonical JSON: the one byte encoding of a manifest, so its sha256 is its identity.

Rules (a strict, Python-native cousin of RFC 8785):
- UTF-8, object keys sorted by code point, no whitespace between tokens (``,`` and ``:``),
  non-ASCII characters written as themselves, not as ``\\uXXXX`` escapes;
- integers as plain decimal digits; booleans and null as ``true``/``false``/``null``;
- floats as Python's ``repr``: the shortest decimal string that reads back to the same IEEE-754
  double (``0.1``, ``1e-05``, ``1.0``), so a float stays a float and an int an int on a round trip;
  NaN and the infinities are refused, since JSON has no spelling for them;
- duplicate keys are refused when parsing, and ``parse_canonical`` refuses any bytes that do not
  re-encode to themselves: one manifest, one digest.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from edgectl.artifact.errors import ManifestError

DIGEST_PREFIX = "sha256:"


def canonical_bytes(value: Any) -> bytes:
    """Encode ``value`` as canonical JSON bytes; raises ManifestError on NaN/inf or non-JSON types."""
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"value cannot be encoded as canonical JSON: {exc}") from exc
    return text.encode("utf-8")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, val in pairs:
        if key in out:
            raise ManifestError(f"duplicate JSON key {key!r}")
        out[key] = val
    return out


def _no_constant(name: str) -> Any:
    raise ManifestError(f"JSON constant {name} is not allowed (floats must be finite)")


def parse_json(data: bytes, *, what: str = "manifest") -> Any:
    """Parse UTF-8 JSON strictly: no duplicate keys, no NaN/Infinity."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{what} is not UTF-8: {exc}") from exc
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{what} is not valid JSON: {exc}") from exc


def parse_canonical(data: bytes, *, what: str = "manifest") -> Any:
    """Parse bytes that must already be canonical; anything else would allow two digests for one meaning."""
    value = parse_json(data, what=what)
    if canonical_bytes(value) != data:
        raise ManifestError(
            f"{what} is not in canonical form (sorted keys, no whitespace)",
            hint="it was edited by hand or re-serialised; rebuild the artifact instead",
        )
    return value


def sha256_digest(data: bytes) -> str:
    """The ``sha256:<64 hex>`` form used for every identity in edgectl."""
    return DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


def is_digest(value: object) -> bool:
    """True for a well-formed ``sha256:<64 lowercase hex>`` string."""
    return (
        isinstance(value, str) and value.startswith(DIGEST_PREFIX) and is_hex64(value[len(DIGEST_PREFIX) :])
    )


def is_hex64(value: object) -> bool:
    """True for 64 lowercase hex characters (a bare sha256)."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def digest_hex(digest: str) -> str:
    """The 64 hex characters of a ``sha256:`` digest; raises ValueError when malformed."""
    if not is_digest(digest):
        raise ValueError(f"not a sha256 digest: {digest!r} (expected 'sha256:' + 64 lowercase hex)")
    return digest[len(DIGEST_PREFIX) :]
