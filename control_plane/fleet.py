"""The fleet inventory: enrollment, credentials, labels, decommissioning, and live device state.

Live state (online, active models, health, last seen) comes only from what agents publish;
:meth:`Fleet.apply` folds a batch of decoded MQTT observations into the store in one
transaction, so a thousand heartbeats cost one commit, not a thousand.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Callable

from edgectl.control_plane.db import Tx
from edgectl.control_plane.device_state import (
    DEVICE_COLUMNS,
    DeviceRecord,
    Reported,
    ReportRow,
    Status,
)
from edgectl.control_plane.errors import InvalidArgument, NotFound, PermissionDenied
from edgectl.control_plane.identity import (
    Credentials,
    DeviceIdentities,
    EnrollmentTokenRecord,
    hash_secret,
    hash_token,
    verify_secret,
)
from edgectl.control_plane.store import StateStore, dumps, loads
from edgectl.labels import Selector, check_labels
from edgectl.mqtt.wire import SITE_LABEL, DeviceIdError, check_device_id

log = logging.getLogger(__name__)
DEFAULT_TOKEN_TTL_S = 3600


def _device_id(device_id: str) -> str:
    try:
        return check_device_id(device_id)
    except DeviceIdError as exc:
        raise InvalidArgument(str(exc)) from exc


class Fleet:
    """Devices, their enrollment and their live state, kept in the state store."""

    def __init__(
        self,
        store: StateStore,
        trusted_keys: list[bytes] | None = None,
        mqtt_url: str = "",
        auto_register: bool = True,
        identities: DeviceIdentities | None = None,
        fleet_keys: Callable[[], list[bytes]] | None = None,
    ) -> None:
        self.store = store
        self.trusted_keys = list(trusted_keys or [])
        self.fleet_keys = fleet_keys or (lambda: [])  # none: an insecure plane sends unsigned states
        self.mqtt_url = mqtt_url
        self.auto_register = auto_register
        self.identities = identities

    # -- enrollment ---------------------------------------------------------------------------

    def create_token(self, device_id: str, labels: dict[str, str], ttl_s: int = 0) -> EnrollmentTokenRecord:
        """A one-time token for ``device_id``; only its hash is stored."""
        _device_id(device_id)
        check_labels(labels)
        if ttl_s < 0:
            raise InvalidArgument("ttl_seconds must not be negative")
        token = secrets.token_urlsafe(24)
        now = time.time()
        expires = now + (ttl_s or DEFAULT_TOKEN_TTL_S)
        with self.store.tx() as tx:
            tx.execute(
                "INSERT INTO enrollment_tokens (token_hash, device_id, labels, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (hash_token(token), device_id, dumps(labels), now, expires),
            )
        return EnrollmentTokenRecord(device_id, token, expires)

    def enroll(
        self, device_id: str, token: str, agent_version: str = "", profile: str = "", csr_pem: bytes = b""
    ) -> Credentials:
        """Exchange a one-time token for fresh credentials; the password is returned here only.

        The token is spent first (once, even across replicas); then, with ``identities`` set, the
        CSR is signed by the fleet CA and the MQTT identity provisioned in the broker, outside any
        transaction so that a slow broker never holds the state store. If that fails, the token
        is given back and nothing else is stored.
        """
        _device_id(device_id)
        password = secrets.token_urlsafe(32)
        hashed = hash_secret(password)
        now = time.time()
        token_hash = hash_token(token)
        with self.store.tx() as tx:
            row = tx.one(
                "SELECT device_id, labels, expires_at, used_at FROM enrollment_tokens WHERE token_hash = ?",
                (token_hash,),
            )
            if row is None or row[0] != device_id:
                raise PermissionDenied(
                    f"enrollment token is not valid for device {device_id}",
                    hint="ask the operator for a new one: edgectl devices enroll " + device_id,
                )
            if float(row[2]) < now:
                raise PermissionDenied(
                    "enrollment token has expired", hint="make a new one with a longer --ttl"
                )
            # Conditional: a concurrent Enroll with the same token (another replica) finds it spent.
            if (
                row[3] is not None
                or tx.execute(
                    "UPDATE enrollment_tokens SET used_at = ? WHERE token_hash = ? AND used_at IS NULL",
                    (now, token_hash),
                )
                != 1
            ):
                raise PermissionDenied(
                    "enrollment token was already used", hint="tokens are one-time; make a new one"
                )
            labels = loads(row[1], {})
        cert = None
        try:
            if self.identities is not None:
                cert = self.identities.issue_certificate(device_id, csr_pem)
                self.identities.provision(device_id, password, labels.get(SITE_LABEL, ""))
            with self.store.tx() as tx:
                tx.execute("DELETE FROM tombstones WHERE id = ?", (device_id,))
                self._ensure_device(tx, device_id, now)
                tx.execute(
                    "UPDATE devices SET labels = ?, enrolled_at = ?, mqtt_username = ?, password_hash = ?, "
                    "agent_version = ?, profile = ?, cert_sha256 = ? WHERE id = ?",
                    (dumps(labels), now, device_id, hashed, agent_version, profile,
                     cert.sha256 if cert else "", device_id),
                )  # fmt: skip
        except BaseException:
            with self.store.tx() as tx:  # give the token back: the device may try again
                tx.execute(
                    "UPDATE enrollment_tokens SET used_at = NULL WHERE token_hash = ? AND used_at = ?",
                    (token_hash, now),
                )
            raise
        return Credentials(
            device_id, device_id, password, self.trusted_keys, self._broker_url(labels),
            cert.cert_pem if cert else b"", cert.ca_pem if cert else b"", self.fleet_keys(),
        )  # fmt: skip

    def certificate_current(self, device_id: str, cert_sha256: str) -> bool:
        """True when the device is in the inventory and this is the certificate its last enrollment got.

        Decommissioning or re-enrolling a device thus revokes its earlier certificates at once.
        """
        with self.store.tx() as tx:
            row = tx.one("SELECT cert_sha256 FROM devices WHERE id = ?", (device_id,))
        return bool(row and row[0]) and hmac.compare_digest(str(row[0]), cert_sha256)  # type: ignore[index]

    def check_password(self, device_id: str, password: str) -> bool:
        """True when ``password`` is the device's current MQTT password (for a broker auth hook)."""
        with self.store.tx() as tx:
            row = tx.one("SELECT password_hash FROM devices WHERE id = ?", (device_id,))
        return bool(row and row[0]) and verify_secret(password, str(row[0]))  # type: ignore[index]

    @staticmethod
    def _ensure_device(tx: Tx, device_id: str, now: float) -> None:
        if tx.one("SELECT 1 FROM devices WHERE id = ?", (device_id,)) is None:
            tx.execute("INSERT INTO devices (id, created_at) VALUES (?, ?)", (device_id, now))

    # -- inventory ----------------------------------------------------------------------------

    def get(self, device_id: str) -> DeviceRecord:
        with self.store.tx() as tx:
            row = tx.one(f"SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?", (device_id,))
        if row is None:
            raise NotFound(
                f"device {device_id} is not in the inventory", hint="list devices with `edgectl devices ls`"
            )
        return DeviceRecord.from_row(row)

    def list_devices(
        self, selector: Selector | None = None, offset: int = 0, limit: int = 0
    ) -> list[DeviceRecord]:
        """Devices sorted by id; an empty or absent selector lists them all."""
        with self.store.tx() as tx:
            rows = tx.all(f"SELECT {DEVICE_COLUMNS} FROM devices ORDER BY id")
        devices = [DeviceRecord.from_row(r) for r in rows]
        if selector is not None and not selector.empty:
            devices = [d for d in devices if selector.matches(d.id, d.effective_labels)]
        return devices[offset : offset + limit] if limit else devices[offset:]

    def label(self, device_id: str, set_labels: dict[str, str], remove: list[str]) -> DeviceRecord:
        check_labels(set_labels)
        with self.store.tx() as tx:
            row = tx.one("SELECT labels FROM devices WHERE id = ?", (device_id,))
            if row is None:
                raise NotFound(f"device {device_id} is not in the inventory")
            labels = {k: v for k, v in loads(row[0], {}).items() if k not in remove}
            labels.update(set_labels)
            tx.execute("UPDATE devices SET labels = ? WHERE id = ?", (dumps(labels), device_id))
        return self.get(device_id)

    def _broker_url(self, labels: dict[str, str]) -> str:
        """The broker an enrolling device is told to use: its site's broker, else the central one."""
        site = self.identities.broker_url(labels.get(SITE_LABEL, "")) if self.identities else None
        return site or self.mqtt_url

    def decommission(self, device_id: str) -> bool:
        """Revoke the device's credentials, then forget it and its enrollment tokens; a tombstone
        stops auto-registration. True when the device had joined; False when it had only been
        enrolled (a token minted, never used): then withdrawing its tokens is all there is to do.

        The broker revokes first (it drops the device at once), outside any transaction; when it
        fails nothing changes, and a retry is safe because revoking is idempotent.
        """
        if self.identities is not None:
            try:
                record = self.get(device_id)
            except NotFound:
                record = None  # enrolled at most: the broker holds no identity for it
            if record is not None:
                self.identities.revoke(device_id, record.effective_labels.get(SITE_LABEL, ""))
        with self.store.tx() as tx:
            joined = tx.execute("DELETE FROM devices WHERE id = ?", (device_id,)) > 0
            withdrawn = tx.execute("DELETE FROM enrollment_tokens WHERE device_id = ?", (device_id,))
            if not joined and not withdrawn:
                raise NotFound(
                    f"device {device_id} is not in the inventory and has no pending enrollment",
                    hint="list devices with `edgectl devices ls`",
                )
            tx.execute("DELETE FROM tombstones WHERE id = ?", (device_id,))
            tx.execute("INSERT INTO tombstones (id, at) VALUES (?, ?)", (device_id, time.time()))
        return joined

    # -- live state from MQTT -----------------------------------------------------------------

    def apply(self, observations: list[Reported | Status]) -> set[str]:
        """Fold a batch of observations into the store (last one per device wins); returns device ids touched."""
        reported: dict[str, Reported] = {}
        status: dict[str, Status] = {}
        for obs in observations:
            if isinstance(obs, Reported):
                reported[obs.device_id] = obs
            else:
                status[obs.device_id] = obs
        touched: set[str] = set()
        ids = sorted(set(reported) | set(status))
        with self.store.tx() as tx:
            # Only the batch's devices are looked up: what a batch costs must not grow with the fleet.
            known = _existing(tx, "devices", ids)
            dead = _existing(tx, "tombstones", [i for i in ids if i not in known])
            for device_id in ids:
                if device_id not in known:
                    if not self.auto_register or device_id in dead:
                        continue
                    self._ensure_device(tx, device_id, time.time())
                touched.add(device_id)
                if device_id in reported:
                    self._write_reported(tx, reported[device_id])
                if device_id in status:
                    s = status[device_id]
                    tx.execute(
                        "UPDATE devices SET online = ?, last_seen = CASE WHEN ? = 1 THEN ? ELSE last_seen END "
                        "WHERE id = ?",
                        (int(s.online), int(s.online), s.received_at, device_id),
                    )
        return touched

    def site_offline(self, site: str) -> list[str]:
        """Mark offline every online device labelled ``site=<site>`` (its site broker lost the center)."""
        with self.store.tx() as tx:
            rows = tx.all("SELECT id, labels, reported_labels FROM devices WHERE online = 1")
            ids = [r[0] for r in rows if {**loads(r[2], {}), **loads(r[1], {})}.get(SITE_LABEL) == site]
            tx.executemany("UPDATE devices SET online = 0 WHERE id = ? AND online = 1", [(i,) for i in ids])
        return ids

    @staticmethod
    def _write_reported(tx: Tx, obs: Reported) -> None:
        tx.execute(
            "UPDATE devices SET reported_labels = ?, agent_version = ?, profile = ?, health = ?, last_error = ?, "
            "observed_generation = ?, models = ?, stats = ?, last_seen = ? WHERE id = ?",
            (*obs.row, obs.received_at, obs.device_id),
        )

    def touch(self, seen: dict[str, tuple[float, ReportRow]]) -> list[str]:
        """Advance the last-seen time of devices whose reports changed nothing else, in one
        transaction; returns those whose row no longer holds that report (re-enrolled,
        decommissioned, or written by another leader since), which were left as they are."""
        stale: list[str] = []
        with self.store.tx() as tx:
            for device_id, (at, row) in sorted(seen.items()):
                changed = tx.execute(
                    "UPDATE devices SET last_seen = CASE WHEN last_seen IS NULL OR last_seen < ? THEN ? "
                    "ELSE last_seen END WHERE id = ? AND reported_labels = ? AND agent_version = ? "
                    "AND profile = ? AND health = ? AND last_error = ? AND observed_generation = ? "
                    "AND models = ? AND stats = ?",
                    (at, at, device_id, *row),
                )
                if changed == 0:
                    stale.append(device_id)
        return stale

    def counts(self) -> dict[str, int]:
        """Devices by state for metrics: online, offline."""
        with self.store.tx() as tx:
            rows = tx.all("SELECT online, COUNT(*) FROM devices GROUP BY online")
        out = {"online": 0, "offline": 0}
        for online, n in rows:
            out["online" if online else "offline"] += int(n)
        return out


def _existing(tx: Tx, table: str, ids: list[str]) -> set[str]:
    """Which of ``ids`` have a row in ``table`` (devices or tombstones), in chunks of 500 parameters."""
    found: set[str] = set()
    for i in range(0, len(ids), 500):
        part = ids[i : i + 500]
        marks = ", ".join("?" for _ in part)
        found.update(str(r[0]) for r in tx.all(f"SELECT id FROM {table} WHERE id IN ({marks})", part))
    return found
