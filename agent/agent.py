"""The agent process: wires config, state, fetcher, runtime, V2 server, MQTT link and reconcile loop.

Start order matters for "never serve nothing": the V2 server and the models named in the state
file come up first, from local disk alone; the broker and the control plane are reached after,
in the background, and losing either never touches what is served.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import onnxruntime as ort

from edgectl.addresses import parse_host_port
from edgectl.agent.artifacts import LocalArtifacts, load_and_smoke_test
from edgectl.agent.batching import BatchSettings
from edgectl.agent.burst import BurstCost, BurstSettings
from edgectl.agent.canary import Trials
from edgectl.agent.config import AgentConfig, build_trust, read_credentials
from edgectl.agent.diagnostics import bundle_json
from edgectl.agent.enroll import device_tls, enroll
from edgectl.agent.errors import ConfigError
from edgectl.agent.fetch import ArtifactFetcher, FetchSettings
from edgectl.agent.fleet_grant import FleetAllowance
from edgectl.agent.http_server import HttpV2Server
from edgectl.agent.input_check import RequestLimits
from edgectl.agent.log_ring import process_ring
from edgectl.agent.metrics import AgentMetrics
from edgectl.agent.mqtt_link import MqttLink, MqttSettings
from edgectl.agent.orders import FleetTrust
from edgectl.agent.presigned import PresignedTransport
from edgectl.agent.reconcile import Reconciler, ReconcileSettings
from edgectl.agent.router import InferenceRouter
from edgectl.agent.runtime import SessionSettings
from edgectl.agent.serving import ModelRegistry
from edgectl.agent.state import StateStore
from edgectl.agent.tls import burst_credentials, serving_security
from edgectl.agent.transports import ArtifactTransport, GrpcTransport, MqttChunkTransport
from edgectl.agent.v2_server import InferenceServicer, V2Server
from edgectl.agent.verify import DeviceFit, memory_limit, provider_order
from edgectl.artifact import MANIFEST_NAME, ArtifactError, TrustStore, default_trust_store, load_artifact
from edgectl.devices import DeviceError, DeviceProfile, HostFacts, gather_facts, load_profile, match_profile
from edgectl.protos.v1 import mqtt_pb2 as mpb

log = logging.getLogger(__name__)
DEFAULT_MQTT = "mqtt://127.0.0.1:1883"
PRESIGNED_RETRY_S = 300.0  # after falling back to gRPC Download, try presigned URLs again this much later


class _MqttReporter:
    """Reported state (retained) and events over the link; dropped silently while offline."""

    def __init__(self, link: MqttLink) -> None:
        self.link = link

    def report(self, state: mpb.ReportedState) -> None:
        self.link.publish(self.link.topics.reported, state, retain=True)

    def event(self, event: mpb.DeviceEvent) -> None:
        self.link.publish(self.link.topics.events, event)


class _NoReporter:
    def report(self, state: mpb.ReportedState) -> None:
        pass

    def event(self, event: mpb.DeviceEvent) -> None:
        pass


def _agent_version() -> str:
    from edgectl import __version__

    return str(__version__)


def resolve_profile(config: AgentConfig, facts: HostFacts) -> DeviceProfile:
    """The configured profile, else the one detected from this host's facts."""
    try:
        return load_profile(config.profile) if config.profile else match_profile(facts).profile
    except DeviceError as exc:
        raise ConfigError(str(exc), hint="pass --profile NAME (see `edgectl doctor`)") from exc


class Agent:
    """One device agent; ``start()`` returns once serving, ``stop()`` shuts everything down.

    ``serve=False`` keeps the device side (MQTT, reconcile, fetch, verify, load, smoke test) but
    opens no KServe V2 listener: a fleet simulator's agents, which nobody calls. ``grpc_options``
    are added to the control-plane channel's options.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        serve: bool = True,
        grpc_options: Sequence[tuple[str, Any]] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock``: wall time for maintenance windows (tests inject one; order expiry stays real)."""
        self.config = config
        self.clock = clock
        self._grpc_options = tuple(grpc_options)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.facts = gather_facts()
        self.profile = resolve_profile(config, self.facts)
        self.metrics = AgentMetrics()
        # Recent lines for `edgectl devices logs`: bounded, secrets redacted as they are captured.
        self.log_ring = process_ring()
        self.registry = ModelRegistry(
            BatchSettings(
                config.max_batch_size,
                config.max_queue_delay_ms / 1000.0,
                max_request_rows=config.max_request_rows,
            ),
            self.metrics,
            keep_versions=config.keep_versions,
        )
        # The fleet budget's grants reach the burst budget through this; half spent, report at once.
        self.fleet_allowance = FleetAllowance(
            on_low=lambda: self.reconciler.request_report() if self.reconciler else None
        )
        self.router = InferenceRouter(
            self.registry,
            self.metrics,
            BurstSettings(
                target=config.burst,
                slo_s=config.slo_ms / 1000.0,
                timeout_s=config.burst_timeout_s,
                credentials=burst_credentials(
                    ca=config.burst_ca,
                    token_file=config.burst_token_file,
                    cert=config.burst_cert,
                    key=config.burst_key,
                ),
                cost=BurstCost(
                    per_1k_requests=config.burst_price_per_1k,
                    per_second=config.burst_price_per_second,
                    budget=config.burst_budget,
                    period_s=config.burst_budget_period_s,
                    when_spent="refuse" if config.burst_when_spent == "refuse" else "local",
                ),
                fleet=self.fleet_allowance,
            ),
            RequestLimits(max_request_bytes=config.max_request_mib << 20),
        )
        # Canary / shadow trials that signed orders ask for; the router's hook consults them.
        self.trials = Trials(self.registry)
        self.router.trials = self.trials
        self.fit = DeviceFit(
            self.profile,
            tuple(ort.get_available_providers()),
            memory_limit(self.profile, config.memory_limit_mib, self.facts.memory_total_mib),
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.link: MqttLink | None = None
        self.reconciler: Reconciler | None = None
        self.creds = read_credentials(config.data_dir)
        if config.enroll_token and not config.serve_only:
            if self.creds is None:
                self.creds = enroll(config, _agent_version(), self.profile.name)
            else:
                log.info("already enrolled (%s exists); ignoring the enrollment token", config.data_dir)
        self.tls = device_tls(config.data_dir, self.creds)
        self.server: V2Server | None = None
        self.http: HttpV2Server | None = None
        if serve:
            self._build_listeners()
        if config.serve_only:
            self.trust = self._serve_only_trust()
        else:
            self.trust = build_trust(config, self.creds)
            self._build_fleet_side()

    def _build_listeners(self) -> None:
        cfg = self.config
        if cfg.tls_fleet and self.tls is None:
            raise ConfigError("--tls-fleet needs an enrolled device (no certificate in the data dir)")
        security = serving_security(
            cert=cfg.tls_cert,
            key=cfg.tls_key,
            client_ca=cfg.tls_client_ca,
            token_file=cfg.token_file,
            fleet=(self.tls.cert_pem, self.tls.key_pem) if cfg.tls_fleet and self.tls else None,
        )
        servicer = InferenceServicer(self.registry, self.router)
        self.server = V2Server(servicer, cfg.listen, security=security)
        if cfg.http_listen:
            self.http = HttpV2Server(
                self.registry,
                self.router,
                cfg.http_listen,
                middlewares=security.http_middlewares() if security else (),
                ssl_context=security.ssl_context(cfg.data_dir / "tls") if security else None,
            )

    @property
    def address(self) -> str:
        return self.server.address if self.server is not None else "(not serving)"

    def _serve_only_trust(self) -> TrustStore:
        try:
            return build_trust(self.config, self.creds)
        except ConfigError:
            return default_trust_store()  # the local user's own key, as `edgectl compress` signs by default

    def _build_fleet_side(self) -> None:
        cfg = self.config
        artifacts = LocalArtifacts(cfg.data_dir, self.trust)
        mqtt_transport = MqttChunkTransport(lambda req: self.link.request_chunks(req) if self.link else None)
        transports: list[ArtifactTransport] = []
        if cfg.transport in ("auto", "grpc") and cfg.control_plane:
            credentials = self.tls.grpc_credentials() if self.tls else None
            grpc_transport = GrpcTransport(
                cfg.control_plane, credentials=credentials, options=self._grpc_options
            )
            if cfg.blob_urls != "off":  # bytes from the blob store when offered; Download otherwise
                transports.append(
                    PresignedTransport(grpc_transport, allow_http=cfg.blob_urls == "any", ca_file=cfg.blob_ca)
                )
            transports.append(grpc_transport)
        if cfg.transport in ("auto", "mqtt"):
            transports.append(mqtt_transport)
        presigned = any(isinstance(t, PresignedTransport) for t in transports)
        fetcher = ArtifactFetcher(
            artifacts.chunks,
            transports,
            FetchSettings(
                bandwidth_bps=cfg.bandwidth_limit,
                reserve_bytes=cfg.min_free_disk_mib << 20,
                # A fallback to Download (a failed S3 GET) is not for good: URLs get a new try.
                sticky_s=PRESIGNED_RETRY_S if presigned else None,
            ),
        )
        self.link = MqttLink(
            MqttSettings(
                url=cfg.mqtt or (self.creds.mqtt_url if self.creds else "") or DEFAULT_MQTT,
                device_id=cfg.device_id,
                username=self.creds.mqtt_username if self.creds else None,
                password=self.creds.mqtt_password if self.creds else None,
                ca_file=str(self.tls.ca_file if self.tls else cfg.ca_file)
                if self.tls or cfg.ca_file
                else None,
            ),
            on_desired=lambda ds: self.reconciler.submit(ds) if self.reconciler else None,
            on_chunk=mqtt_transport.deliver,
            on_connected=lambda: self.reconciler.request_report() if self.reconciler else None,
            on_log_request=self._answer_logs,
            on_grant=self.fleet_allowance.apply,
        )
        self.reconciler = Reconciler(
            ReconcileSettings(
                device_id=cfg.device_id,
                fit=self.fit,
                facts=self.facts,
                labels=dict(cfg.labels),
                heartbeat_s=cfg.heartbeat_s,
                idle_report_s=cfg.idle_report_s,
                progress_interval_s=cfg.progress_interval_s,
                drift_threshold=cfg.drift_threshold,
                intra_op_threads=cfg.intra_op_threads,
                engine_cache_dir=cfg.data_dir / "engine-cache",
            ),
            StateStore(cfg.data_dir / "state.json"),
            artifacts,
            fetcher,
            self.registry,
            self.metrics,
            _MqttReporter(self.link),
            FleetTrust.load(cfg.data_dir, self.creds, cfg.fleet_key),
            clock=self.clock,
            trials=self.trials,
        )

    def _serve_local_dir(self) -> None:
        assert self.config.model_dir is not None
        root = self.config.model_dir
        bundles = (
            [root]
            if (root / MANIFEST_NAME).exists() or root.suffix == ".tar"
            else sorted(p for p in root.iterdir() if (p / MANIFEST_NAME).exists() or p.suffix == ".tar")
        )
        if not bundles:
            raise ConfigError(f"{root} holds no artifact (no manifest.json, no .tar)")
        for path in bundles:
            try:
                artifact = load_artifact(path, self.trust)
            except ArtifactError as exc:
                raise ConfigError(f"cannot serve {path}: {exc}") from exc
            settings = SessionSettings(
                providers=provider_order(self.profile, self.fit.available_providers),
                intra_op_threads=self.config.intra_op_threads,
            )
            self.registry.install(load_and_smoke_test(artifact, settings))

    def start(self) -> None:
        """Serve what is on disk, then connect to the fleet in the background."""
        if self.config.metrics_listen:
            metrics = parse_host_port(self.config.metrics_listen, what="--metrics", listen=True)
            self.metrics.serve(metrics.host, metrics.port)
        if self.config.serve_only:
            self._serve_local_dir()
        elif self.reconciler is not None:
            self.reconciler.restore()
        if self.server is not None:
            self.server.start()
        if self.http is not None:
            self.http.start()
        if self.reconciler is not None and self.link is not None:
            loop = threading.Thread(
                target=self.reconciler.run, args=(self._stop,), name="reconcile", daemon=True
            )
            loop.start()
            self._threads.append(loop)
            self.link.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5.0)
        if self.link is not None:
            self.link.stop()
        if self.http is not None:
            self.http.stop()
        if self.server is not None:
            self.server.stop(1.0)
        self.router.close()
        self.trials.close()
        self.registry.close()

    def _answer_logs(self, request: mpb.LogRequest) -> None:
        """Send the recent lines the control plane asked for (only it may publish to our request topic)."""
        if self.link is None:
            return
        if not request.bundle:
            self.link.publish(
                self.link.topics.logs_response, self.log_ring.answer(request, self.config.device_id)
            )
            return
        # a bundle runs the doctor's checks: off paho's network thread, which must not block
        threading.Thread(target=self._answer_bundle, args=(request,), name="bundle", daemon=True).start()

    def _answer_bundle(self, request: mpb.LogRequest) -> None:
        link = self.link
        if link is None:
            return
        answer = self.log_ring.answer(request, self.config.device_id)
        try:
            answer.bundle_json = bundle_json(self.config, self.registry, link.connected.is_set())
        except Exception:  # a bundle that cannot be built must not take the logs with it
            log.exception("support bundle failed")
            answer.bundle_json = json.dumps({"error": "the agent could not build its bundle; see logs.txt"})
        link.publish(link.topics.logs_response, answer)

    def run_forever(self) -> None:
        """start(), then block until SIGINT/SIGTERM, then stop()."""
        done = threading.Event()

        def _signal(signum: int, frame: FrameType | None) -> None:
            done.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        self.start()
        log.info("agent %s serving KServe V2 on %s", self.config.device_id or "(serve-only)", self.address)
        print(f"listening {self.address}", flush=True)
        if self.http is not None:
            print(f"listening http {self.http.address}", flush=True)
        while not done.wait(1.0):
            pass
        self.stop()
