"""The fleet key: the Ed25519 key that signs every desired state, and the chain of its rotations.

It lives in the security dir beside the CA and the token key (``fleet-key.pem``, 0600, made on
first use) and is distinct from every artifact signing key: whoever uploads artifacts cannot
order devices, and whoever holds the fleet key cannot make an artifact devices trust.
Rotation (`edgectl control-plane rotate-fleet-key`) writes the next key, then a statement
signed by the current key that hands trust to it, then makes it current; every replica notices
the new file on its next signature, and the controller re-signs every device's order with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from google.protobuf import json_format

from edgectl.artifact import KeyFileError, SigningKey
from edgectl.artifact.signing import public_key_path, public_pem
from edgectl.control_plane.errors import ControlPlaneError
from edgectl.durable import atomic_write
from edgectl.mqtt.orders import KeyRotation, OrderError, sign
from edgectl.protos.v1 import mqtt_pb2

log = logging.getLogger(__name__)
FLEET_KEY_FILE = "fleet-key.pem"
NEXT_KEY_FILE = "fleet-key-next.pem"
ROTATIONS_FILE = "fleet-key-rotations.json"
LOCK_FILE = "fleet-key.lock"


class FleetKeyring:
    """The current fleet key of a security dir, reloaded when another process rotates it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._key: SigningKey | None = None
        self._rotations: list[mqtt_pb2.SignedPayload] = []

    @classmethod
    def load_or_create(cls, directory: Path) -> FleetKeyring:
        """The keyring of ``directory``, making the first fleet key when there is none."""
        ring = cls(directory)
        path = directory / FLEET_KEY_FILE
        if not path.exists():
            try:
                SigningKey.generate().save(path)
                log.info("made the fleet key %s", path)
            except KeyFileError:
                pass  # another replica made it first (O_EXCL): use theirs
        ring.current()
        return ring

    @property
    def path(self) -> Path:
        return self.directory / FLEET_KEY_FILE

    def _reload(self) -> None:
        self._finish_rotation()
        st = self.path.stat()
        stamp = (st.st_ino, st.st_mtime_ns)
        if stamp == self._stamp:
            return
        try:
            self._key = SigningKey.load(self.path, group_readable=True)  # a Secret volume mounts 0440
        except KeyFileError as exc:
            raise ControlPlaneError(str(exc), hint=exc.hint) from exc
        # Only the chain up to the key that signs: a statement already written for a key that is
        # not current yet (a rotation in progress elsewhere) must not reach agents before it is.
        self._rotations = _chain_to(_read_rotations(self.directory / ROTATIONS_FILE), self._key.key_id)
        self._stamp = stamp
        pub = public_key_path(self.path)
        with contextlib.suppress(OSError):  # the public half operators hand out stays in step
            if not pub.exists() or pub.read_bytes() != public_pem(self._key.public_key):
                atomic_write(pub, public_pem(self._key.public_key), 0o644)

    def current(self) -> SigningKey:
        """The key that signs orders now."""
        with self._lock:
            self._reload()
            assert self._key is not None
            return self._key

    def rotations(self) -> list[mqtt_pb2.SignedPayload]:
        """Every rotation statement so far, oldest first (what each desired state carries)."""
        with self._lock:
            self._reload()
            return list(self._rotations)

    def public_pems(self) -> list[bytes]:
        """The fleet key(s) a device must trust, as Enroll hands them over."""
        return [public_pem(self.current().public_key)]

    def rotate(self, now: float | None = None) -> KeyRotation:
        """Make a new fleet key and the statement, signed by the current one, that hands trust over."""
        with self._lock, _exclusive(self.directory / LOCK_FILE):
            self._reload()
            assert self._key is not None
            old, new = self._key, SigningKey.generate()
            nxt = self.directory / NEXT_KEY_FILE
            nxt.unlink(missing_ok=True)  # left by a rotation that crashed before its statement
            public_key_path(nxt).unlink(missing_ok=True)
            new.save(nxt)
            rotation = KeyRotation(old.key_id, new.public_key, now if now is not None else time.time())
            statements = [*self._rotations, sign(rotation.to_bytes(), old)]
            # The statement is durable before the key becomes current: a crash in between is
            # finished by the next load (_finish_rotation), never leaves a key nobody trusts.
            _write_rotations(self.directory / ROTATIONS_FILE, statements)
            self._finish_rotation()
            self._stamp = None
            self._reload()
            return rotation

    def _finish_rotation(self) -> None:
        """Make the next key current once its statement is durable. Any replica may do it (the
        rotating command, or a replica after that command crashed); a next key whose statement
        is not written yet belongs to a rotation in progress and is left alone."""
        nxt = self.directory / NEXT_KEY_FILE
        if not nxt.exists():
            return
        statements = _read_rotations(self.directory / ROTATIONS_FILE)
        try:
            announced = KeyRotation.from_bytes(bytes(statements[-1].payload)).new_key_id if statements else ""
            pending = SigningKey.load(nxt, group_readable=True).key_id
        except (OrderError, KeyFileError, OSError):
            return  # half-written, or moved away by another process just now
        if announced != pending:
            return
        with contextlib.suppress(FileNotFoundError):  # another process finished it first
            os.replace(nxt, self.path)
        public_key_path(nxt).unlink(missing_ok=True)


def _chain_to(statements: list[mqtt_pb2.SignedPayload], key_id: str) -> list[mqtt_pb2.SignedPayload]:
    """The statements up to the one that hands trust to ``key_id`` (none for the first key)."""
    for i, signed in enumerate(statements):
        with contextlib.suppress(OrderError):
            if KeyRotation.from_bytes(bytes(signed.payload)).new_key_id == key_id:
                return statements[: i + 1]
    return []


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive lock across processes, so two rotations never interleave."""
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_rotations(path: Path) -> list[mqtt_pb2.SignedPayload]:
    if not path.exists():
        return []
    try:
        items = json.loads(path.read_text())
        out = []
        for item in items:
            signed = mqtt_pb2.SignedPayload()
            json_format.ParseDict(item, signed)
            out.append(signed)
        return out
    except (OSError, ValueError, TypeError, json_format.ParseError) as exc:
        raise ControlPlaneError(
            f"cannot read the fleet key rotations {path}: {exc}",
            hint="restore it from backup: agents that missed a rotation need the whole chain",
        ) from exc


def _write_rotations(path: Path, statements: list[mqtt_pb2.SignedPayload]) -> None:
    doc = [json_format.MessageToDict(s) for s in statements]
    atomic_write(path, (json.dumps(doc, indent=1) + "\n").encode(), 0o644)
