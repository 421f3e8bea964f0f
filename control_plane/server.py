"""The control plane process: gRPC API, state store, MQTT bus, leader election, controller.

Every replica serves the API and answers MQTT chunk requests (a shared subscription: the broker
gives each to one live replica); the leader alone subscribes to the fleet's reports and steps rollouts. ``ControlPlane.start()`` returns once the API
listens; ``serve()`` blocks until a signal.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edgectl.addresses import HostPort, parse_mqtt_url
from edgectl.artifact import TrustStore, open_blob_store, public_pem
from edgectl.control_plane import rollout_store as rs
from edgectl.control_plane.artifacts import ArtifactStore
from edgectl.control_plane.audit import AuditLog
from edgectl.control_plane.burst_grants import (
    BurstBudgetCollector,
    BurstGrants,
    FleetBurstBudget,
    budget_status,
)
from edgectl.control_plane.bus import FleetBus
from edgectl.control_plane.chunk_server import ChunkServer
from edgectl.control_plane.config import ControlPlaneConfig, listen_address, load_security, load_trust
from edgectl.control_plane.controller import RolloutController
from edgectl.control_plane.controller_loop import ControllerLoop
from edgectl.control_plane.desired import OrderSigner
from edgectl.control_plane.device_logs import DeviceLogs
from edgectl.control_plane.errors import ControlPlaneError
from edgectl.control_plane.fleet import Fleet
from edgectl.control_plane.health_port import serve_health
from edgectl.control_plane.ingest import FleetIngest
from edgectl.control_plane.leader import LeaderElection, leader_lock_for
from edgectl.control_plane.limits import PeerBudget, StreamLimiter
from edgectl.control_plane.metrics import Metrics
from edgectl.control_plane.revocations import TokenRevocations
from edgectl.control_plane.rollouts import Rollouts
from edgectl.control_plane.rpc import Hooks
from edgectl.control_plane.security import (
    BrokerAdminLink,
    FleetIdentities,
    SiteBroker,
    cert_fingerprint,
)
from edgectl.control_plane.servicers import ArtifactServicer, AuditServicer, FleetServicer, RolloutServicer
from edgectl.control_plane.store import StateStore
from edgectl.logs import name_os_thread
from edgectl.protos.v1 import (
    artifacts_pb2,
    artifacts_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    rollouts_pb2,
    rollouts_pb2_grpc,
)
from edgectl.security.grpc_auth import AuthInterceptor, Identity
from edgectl.security.tokens import Claims

log = logging.getLogger(__name__)
SERVICE_NAMES = (
    artifacts_pb2.DESCRIPTOR.services_by_name["ArtifactService"].full_name,
    fleet_pb2.DESCRIPTOR.services_by_name["FleetService"].full_name,
    rollouts_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name,
    rollouts_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
)
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
PEOPLE_RPCS_PER_WORKER = 16
DEVICE_STREAMS = 4  # open streams one device may hold (it downloads one artifact at a time)


class ControlPlane:
    """One replica of the control plane, assembled from its parts."""

    def __init__(
        self,
        config: ControlPlaneConfig,
        trust: TrustStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock``: the rollouts' time (schedules, windows, deadlines); tests inject one."""
        self.config = config
        self.security = load_security(config)
        broker = self.security.broker_credentials if self.security else None
        mqtt_url = config.mqtt_url or (broker.url if broker else "mqtt://127.0.0.1:1883")
        self.trust = trust if trust is not None else load_trust(config.trust)
        if len(self.trust) == 0:
            log.warning("no trusted signing keys: every artifact upload will be refused (pass --trust)")
        self.store = StateStore(config.state_url, config.db_pool_size)
        self.blobs = open_blob_store(config.blobs)
        self.artifacts = ArtifactStore(self.store, self.blobs, self.trust)
        keys = [public_pem(self.trust.get(k)) for k in self.trust.key_ids()]  # type: ignore[arg-type]
        self.admin_link = BrokerAdminLink(broker) if broker else None
        if self.security is not None and broker is None:
            log.warning(
                "no broker credentials in the security dir: enrollment issues certificates but cannot "
                "provision devices' MQTT identities (run `edgectl broker config --out` on that directory)"
            )
        sites = {b.site: b for b in map(SiteBroker.load, config.site_brokers)} if self.security else {}
        identities = FleetIdentities(self.security.ca, self.admin_link, sites) if self.security else None
        self.identities = identities
        device_url = config.device_mqtt_url or parse_mqtt_url(mqtt_url).public()
        fleet_key = self.security.fleet_key if self.security else None
        self.fleet = Fleet(self.store, keys, device_url, config.auto_register, identities,
                           fleet_key.public_pems if fleet_key else None)  # fmt: skip
        self.revocations = TokenRevocations(self.store)
        self.metrics = Metrics(self.store, self.fleet)
        self.bus = FleetBus(
            mqtt_url,
            on_error=lambda kind: self.metrics.mqtt_errors.labels(kind).inc(),
            username=broker.username if broker else None,
            password=broker.password if broker else None,
            ca_file=broker.ca_file if broker else None,
            device_events=config.device_events,
        )
        self.controller = RolloutController(
            self.store, self.bus, on_wave_done=lambda seconds: self.metrics.wave_seconds.observe(seconds),
            signer=OrderSigner(fleet_key, config.order_ttl_s) if fleet_key else None, clock=clock,
        )  # fmt: skip
        self.loop = ControllerLoop(self.controller, config.tick_seconds)
        self.rollouts = Rollouts(self.store, self.artifacts, self.fleet, wake=self.loop.wake, clock=clock)
        self.audit = AuditLog(self.store)
        self.chunks = ChunkServer(
            self.artifacts, self.bus, deployed=self._deployed if self.security else None,
            count=self.metrics.count_mqtt,
        )  # fmt: skip
        self.bus.serve_chunk_requests(self.chunks.submit)  # every replica answers, leading or not
        self.device_logs = DeviceLogs(self.bus, self.fleet)
        self.bus.on_log_response = self.device_logs.on_message
        # The fleet's burst budget: grants out to agents, refilled from their reports (the leader's).
        budget = None
        if config.fleet_burst_budget is not None:
            budget = FleetBurstBudget(config.fleet_burst_budget, config.fleet_burst_period_s)
        self.burst_budget = budget
        self.grants = BurstGrants(budget, functools.partial(self.bus.publish, retain=True), clock=clock)
        if budget is not None:  # one more read of the devices per scrape, only when there is a budget
            self.metrics.registry.register(BurstBudgetCollector(self.fleet.list_devices, budget, clock))
        self.ingest = FleetIngest(
            self.store, self.fleet, self.bus, self.loop.wake, self.metrics.count_mqtt,
            republish=self.controller.republish_all, on_reported=self.grants.observe,
        )  # fmt: skip
        self.election = LeaderElection(
            leader_lock_for(config.state_url), self._lead, self._follow, interval=config.leader_interval
        )
        self.health = health.HealthServicer()
        self._server: grpc.Server | None = None
        self._device_server: grpc.Server | None = None
        self._health_server: grpc.Server | None = None
        self.console: Any = None  # edgectl.control_plane.console.ConsoleServer once started
        self.enroll_failures = PeerBudget(config.enroll_failure_burst, config.enroll_failure_refill_s)
        self.port = 0
        self.health_port = 0
        self.device_port = 0
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        """Where people and CI call (TLS + token, or plaintext in insecure mode)."""
        host = listen_address(self.config.listen, "--listen").host
        return str(HostPort(host, self.port).dialable())

    @property
    def device_address(self) -> str:
        """Where agents call with their client certificate (the same as ``address`` when insecure)."""
        if self.security is None:
            return self.address
        host = listen_address(self.config.device_listen, "--device-listen").host
        return str(HostPort(host, self.device_port).dialable())

    def _record_denied(self, who: Identity | None, method: str, code: grpc.StatusCode, message: str) -> None:
        """Count every refusal; audit those of a known identity (a stranger cannot fill the log)."""
        self.metrics.grpc_errors.labels(method, code.name).inc()
        if who is None:
            log.info("refused an unauthenticated call", extra={"method": method, "reason": message})
            return
        name = f"device:{who.subject}" if who.via == "mtls" else who.subject
        try:
            self.audit.record(name, who.peer, method, "", json.dumps({"refused": message}), code.name)
        except Exception:  # the refusal stands even when the audit write fails
            log.exception("cannot audit a refused call", extra={"method": method})

    def _certificate_current(self, device_id: str, cert_pem: bytes) -> bool:
        try:
            return self.fleet.certificate_current(device_id, cert_fingerprint(cert_pem))
        except Exception:  # an unreadable certificate or an unreachable store: refuse, never crash
            log.exception("cannot check a client certificate", extra={"device": device_id})
            return False

    def _deployed(self, device_id: str) -> set[str]:
        with self.store.tx() as tx:
            return rs.deployed_digests(tx, device_id)

    def _token_revoked(self, claims: Claims) -> bool:
        try:
            return self.revocations.revoked(claims.token_id)
        except Exception:  # an unreachable store: refuse (as for certificates), never crash
            log.exception("cannot check a token's revocation", extra={"subject": claims.subject})
            return True

    @property
    def leading(self) -> bool:
        return self.election.leading.is_set()

    def _grpc_server(
        self, auth: AuthInterceptor, hooks: Hooks, workers: int, max_rpcs: int | None
    ) -> grpc.Server:
        """A gRPC server with every service, its own worker pool and its own stream caps."""
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix="grpc", initializer=name_os_thread
            ),
            interceptors=[auth],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
            maximum_concurrent_rpcs=max_rpcs,
        )
        artifacts_pb2_grpc.add_ArtifactServiceServicer_to_server(
            ArtifactServicer(self.artifacts, hooks, self._deployed, self.config.blob_url_ttl_s), server
        )
        fleet_pb2_grpc.add_FleetServiceServicer_to_server(
            FleetServicer(self.fleet, hooks, self.bus.clear_device, self.revocations,
                          self.security.verifier if self.security else None, self.enroll_failures,
                          self.device_logs, self._burst_status),
            server,
        )  # fmt: skip
        rollouts_pb2_grpc.add_RolloutServiceServicer_to_server(RolloutServicer(self.rollouts, hooks), server)
        rollouts_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(self.audit, hooks), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        return server

    def start(self) -> None:
        """Bind the API, connect to the broker and join the leader election; returns at once."""
        count = lambda method, code: self.metrics.grpc_errors.labels(method, code).inc()  # noqa: E731
        workers = self.config.workers
        # People share half the pool for streams (unary calls always find a thread); each caller
        # gets a few. Agents have their own listener and pool, so people cannot starve them.
        hooks = Hooks(self.audit, count, StreamLimiter(self.config.streams_per_caller, max(1, workers // 2)))
        verifier = self.security.verifier if self.security else None
        auth = AuthInterceptor(
            verifier,
            certificate_current=self._certificate_current if self.security else None,
            token_revoked=self._token_revoked if self.security else None,
            on_denied=self._record_denied,
        )
        # Past this many calls in flight people get RESOURCE_EXHAUSTED at once instead of an ever
        # longer queue; generous, as a fleet's agents enroll here too. In insecure mode agents share
        # this one listener for everything, so it stays unbounded there.
        max_rpcs = workers * PEOPLE_RPCS_PER_WORKER if self.security is not None else None
        server = self._grpc_server(auth, hooks, workers, max_rpcs)
        device_server = None
        try:
            people = str(listen_address(self.config.listen, "--listen"))
            if self.security is None:
                self.port = server.add_insecure_port(people)
            else:
                self.port = server.add_secure_port(people, self.security.people_credentials())
                device_hooks = Hooks(self.audit, count, StreamLimiter(DEVICE_STREAMS, 1 << 30))
                device_server = self._grpc_server(auth, device_hooks, self.config.device_workers, None)
                self.device_port = device_server.add_secure_port(
                    str(listen_address(self.config.device_listen, "--device-listen")),
                    self.security.device_credentials(),
                )
        except RuntimeError as exc:
            raise ControlPlaneError(f"cannot listen on {self.config.listen}: {exc}") from exc
        if device_server is not None:
            device_server.start()
            self._device_server = device_server
        server.start()
        self._server = server
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.metrics_listen:
            metrics = listen_address(self.config.metrics_listen, "--metrics-listen")
            self.metrics.serve(metrics.host, metrics.port)
        if self.config.health_listen:
            probes = listen_address(self.config.health_listen, "--health-listen")
            self._health_server, self.health_port = serve_health(self.health, probes.host, probes.port)
        if self.config.console_listen:
            self._start_console(listen_address(self.config.console_listen, "--console-listen"))
        self.bus.start()
        self.chunks.start()
        self.election.start()
        log.info(
            "control plane listening",
            extra={"address": self.address, "devices": self.device_address, "state": self.store.dialect,
                   "secured": self.security is not None},
        )  # fmt: skip

    def _start_console(self, where: HostPort) -> None:
        """The web console reads the same domain objects in-process; the same tokens let people in."""
        from edgectl.control_plane.console import ConsoleServer, Sources, tls_context  # aiohttp: only here

        sources = Sources(self.fleet, self.rollouts, self.artifacts, self.audit)
        tls = tls_context(self.security.server) if self.security else None
        verifier = self.security.verifier if self.security else None
        self.console = ConsoleServer(sources, verifier, self._token_revoked, tls)
        self.console.start(where.host, where.port)

    def _burst_status(self) -> fleet_pb2.BurstBudgetStatus:
        return budget_status(self.fleet.list_devices(), self.burst_budget, self.grants.clock())

    def _lead(self) -> None:
        # The ingest republishes every desired state on the CONNECTED marker that subscribing queues.
        self.grants.start()
        self.ingest.start()
        self.bus.subscribe_fleet()
        self.loop.start()

    def _follow(self) -> None:
        self.loop.stop()
        self.bus.unsubscribe_fleet()
        self.ingest.stop()
        self.grants.stop()

    def stop(self, grace: float = 2.0) -> None:
        """Stop serving and release leadership (another replica may take over)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        for server in (self._server, self._device_server):
            if server is not None:
                server.stop(grace).wait(grace + 1)
        if self._health_server is not None:
            self._health_server.stop(0)
        self.election.stop()
        self.chunks.stop()
        self.bus.stop()
        if self.admin_link is not None:
            self.admin_link.close()
        if self.identities is not None:
            self.identities.close()
        if self.console is not None:
            self.console.stop()
        self.metrics.stop()
        self.store.close()

    def serve(self) -> None:
        """Start, then block until SIGINT/SIGTERM."""
        self.start()
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        done.wait()
        self.stop()
