"""Per-device MQTT identities in mosquitto's dynamic-security plugin.

Each device gets a client (username = device id, random password, pinned to the agent's
client id so that no other login can take over its session) and its own role whose ACLs
confine it to ``edgectl/v1/devices/{id}/``: it may subscribe to and receive its desired state
and chunk data, and publish its reported state, status, events and chunk requests, nothing
else. Receiving is denied by default, so a delivery needs an explicit ACL. The control plane's
role is the only writer of desired state. Usernames starting with ``edgectl-`` belong to the
services, never to a device. Clients are created, disabled and deleted at run time over
``$CONTROL/dynamic-security/v1``, with no broker restart.
"""

from __future__ import annotations

import base64
import hashlib
import json
import queue
import secrets
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from edgectl.mqtt.wire import (
    ALL_SITE_BRIDGES,
    SHARED_CHUNK_REQUESTS,
    TOPIC_ROOT,
    DeviceTopics,
    agent_client_id,
)
from edgectl.security.errors import BrokerAdminError, SecurityError

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
CONTROL_PLANE_ROLE = "edgectl-control-plane"
ADMIN_ROLE = "edgectl-dynsec-admin"
# Every service identity (the control plane's login, its roles) starts with this; a device id
# never may, so enrolling or decommissioning a device cannot replace or delete a service's login.
RESERVED_PREFIX = "edgectl-"
DEFAULT_ACL_ACCESS = {
    "publishClientSend": False,
    "publishClientReceive": False,  # a delivery needs an explicit ACL, like a subscription
    "subscribe": False,
    "unsubscribe": True,
}
# Passwords are 256-bit random secrets, so the hash's cost buys nothing against guessing; a
# low count keeps a fleet's reconnect storm cheap for the broker.
PBKDF2_ITERATIONS = 1000


def new_password() -> str:
    """A random MQTT password (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS) -> dict[str, Any]:
    """The fields dynamic-security stores for a password: PBKDF2-SHA512 over a random salt."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": iterations,
    }


def _acl(acltype: str, topic: str, allow: bool = True) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "priority": 0, "allow": allow}


def is_reserved(device_id: str) -> bool:
    """True for names the broker's service identities use (``edgectl-...``), never a device's."""
    return device_id.lower().startswith(RESERVED_PREFIX)


def check_not_reserved(device_id: str) -> str:
    """Return ``device_id``, or raise when it could collide with a service identity."""
    if is_reserved(device_id):
        raise SecurityError(
            f"device id {device_id[:64]!r} is reserved: names starting with {RESERVED_PREFIX!r} "
            "belong to edgectl's own services",
            hint="pick a device id that does not start with 'edgectl-'",
        )
    return device_id


def device_role_name(device_id: str) -> str:
    return f"edgectl-device-{device_id}"


def device_acls(device_id: str) -> list[dict[str, Any]]:
    """What one device may do: its own subtree, with the read/write split of the protocol."""
    t = DeviceTopics(device_id)
    return [
        _acl("subscribeLiteral", t.desired),
        _acl("subscribeLiteral", t.chunk_data),
        _acl("publishClientReceive", t.desired),
        _acl("publishClientReceive", t.chunk_data),
        _acl("subscribeLiteral", t.logs_request),
        _acl("publishClientReceive", t.logs_request),
        _acl("subscribeLiteral", t.burst_grant),
        _acl("publishClientReceive", t.burst_grant),
        _acl("publishClientSend", t.logs_response),
        _acl("publishClientSend", t.reported),
        _acl("publishClientSend", t.status),
        _acl("publishClientSend", t.events),
        _acl("publishClientSend", t.chunk_requests),
    ]


def control_plane_acls() -> list[dict[str, Any]]:
    """The control plane writes desired state and chunk data, and reads what devices send."""
    root = f"{TOPIC_ROOT}/+"
    return [
        _acl("publishClientSend", f"{root}/desired"),
        _acl("publishClientSend", f"{root}/chunks/data"),
        _acl("publishClientSend", f"{root}/logs/request"),
        _acl("publishClientSend", f"{root}/burst/grant"),
        *[
            _acl(acltype, f"{root}/{kind}")
            for kind in ("reported", "status", "events", "chunks/request", "logs/response")
            for acltype in ("subscribePattern", "publishClientReceive")
        ],
        # Chunk requests reach any one replica; the broker checks a shared subscription as written.
        _acl("subscribePattern", SHARED_CHUNK_REQUESTS),
        # Site brokers' links (the devices behind a lost one go offline).
        _acl("subscribePattern", ALL_SITE_BRIDGES),
        _acl("publishClientReceive", ALL_SITE_BRIDGES),
    ]


def admin_acls() -> list[dict[str, Any]]:
    """Administering the plugin itself (create/disable/delete clients)."""
    return [
        _acl("publishClientSend", f"{CONTROL_TOPIC}/#"),
        # The plugin's answers are checked like any delivery, and receiving is denied by default.
        _acl("publishClientReceive", f"{CONTROL_TOPIC}/#"),
        _acl("subscribePattern", f"{CONTROL_TOPIC}/#"),
    ]


def initial_config(control_plane_username: str, control_plane_password: str) -> dict[str, Any]:
    """A dynamic-security.json with the control plane's client and roles, and no devices yet."""
    return {
        "defaultACLAccess": dict(DEFAULT_ACL_ACCESS),
        "clients": [
            {
                "username": control_plane_username,
                "textName": "edgectl control plane",
                "roles": [{"rolename": CONTROL_PLANE_ROLE}, {"rolename": ADMIN_ROLE}],
                **hash_password(control_plane_password),
            }
        ],
        "groups": [],
        "roles": [
            {"rolename": CONTROL_PLANE_ROLE, "acls": control_plane_acls()},
            {"rolename": ADMIN_ROLE, "acls": admin_acls()},
        ],
    }


def upgrade_config(config: dict[str, Any]) -> bool:
    """Bring a dynamic-security.json written by an older edgectl to today's rules, in place.

    Receiving becomes deny-by-default, the service and device roles get today's ACLs (a device
    role's ACLs follow from its name) and each device's client is pinned to its agent's client
    id, so devices enrolled earlier keep working without re-enrolling. True when anything changed.
    """
    before = json.dumps(config, sort_keys=True)
    config["defaultACLAccess"] = dict(DEFAULT_ACL_ACCESS)
    prefix = device_role_name("")
    for role in config.get("roles", []):
        name = str(role.get("rolename", ""))
        if name == CONTROL_PLANE_ROLE:
            role["acls"] = control_plane_acls()
        elif name == ADMIN_ROLE:
            role["acls"] = admin_acls()
        elif name.startswith(prefix):
            role["acls"] = device_acls(name.removeprefix(prefix))
    for client in config.get("clients", []):
        roles = [str(r.get("rolename", "")) for r in client.get("roles", [])]
        if device_role_name(str(client.get("username", ""))) in roles:
            client["clientid"] = agent_client_id(str(client["username"]))
    return json.dumps(config, sort_keys=True) != before


@dataclass(frozen=True)
class DeviceIdentity:
    """A device's MQTT credentials, returned once at enrollment."""

    device_id: str
    username: str
    password: str


class DynsecAdmin:
    """Sends dynamic-security commands over an MQTT connection the caller owns and waits for answers.

    The caller passes a connected paho client with admin rights; this class subscribes to the
    response topic and correlates each answer with its command.
    """

    def __init__(self, client: Any, timeout: float = 10.0) -> None:
        self._client = client
        self._timeout = timeout
        self._waiting: dict[str, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        client.message_callback_add(RESPONSE_TOPIC, self._on_response)
        result, _mid = client.subscribe(RESPONSE_TOPIC, qos=1)
        if result != 0:
            raise BrokerAdminError(f"cannot subscribe to {RESPONSE_TOPIC} (paho error {result})")

    def _on_response(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            responses = json.loads(message.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            return
        for response in responses:
            with self._lock:
                waiter = self._waiting.pop(str(response.get("correlationData", "")), None)
            if waiter is not None:
                waiter.put(response)

    def run(self, command: str, **fields: Any) -> dict[str, Any]:
        """Run one command; raises BrokerAdminError with the plugin's reason when it fails."""
        correlation = uuid.uuid4().hex
        waiter: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=1)
        with self._lock:
            self._waiting[correlation] = waiter
        payload = json.dumps({"commands": [{"command": command, "correlationData": correlation, **fields}]})
        self._client.publish(CONTROL_TOPIC, payload, qos=1)
        try:
            response = waiter.get(timeout=self._timeout)
        except queue.Empty:
            with self._lock:
                self._waiting.pop(correlation, None)
            raise BrokerAdminError(
                f"the broker did not answer `{command}` within {self._timeout:.0f}s",
                hint="is the dynamic-security plugin loaded and is this client its admin?",
            ) from None
        if response.get("error"):
            raise BrokerAdminError(f"broker refused `{command}`: {response['error']}")
        return response

    def provision_device(self, device_id: str, password: str | None = None) -> DeviceIdentity:
        """Create (or replace) the device's role and client with ``password`` (default: a fresh one)."""
        role = device_role_name(device_id)
        password = password or new_password()
        self.remove_device(device_id)
        self.run("createRole", rolename=role, acls=device_acls(device_id))
        self.run("createClient", username=device_id, password=password, roles=[{"rolename": role}],
                 clientid=agent_client_id(device_id))  # fmt: skip
        return DeviceIdentity(device_id=device_id, username=device_id, password=password)

    def disable_device(self, device_id: str) -> None:
        """Refuse the device's next connection and drop the current one."""
        check_not_reserved(device_id)
        self.run("disableClient", username=device_id)

    def remove_device(self, device_id: str) -> None:
        """Delete the device's client and role; absent ones are fine (idempotent)."""
        check_not_reserved(device_id)
        for command, fields in (
            ("deleteClient", {"username": device_id}),
            ("deleteRole", {"rolename": device_role_name(device_id)}),
        ):
            try:
                self.run(command, **fields)
            except BrokerAdminError as exc:
                if "not found" not in str(exc).lower():
                    raise
