"""gRPC servicers: validate, convert, call the domain object. Errors become status codes here only.

Every method goes through :func:`~edgectl.control_plane.rpc.rpc`, which maps domain errors to
codes, counts failures, and writes the audit entry of each mutating call, success or not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

from edgectl.artifact import all_chunk_digests
from edgectl.control_plane import convert
from edgectl.control_plane import rollout_store as rs
from edgectl.control_plane.artifacts import ArtifactStore
from edgectl.control_plane.audit import AuditLog
from edgectl.control_plane.chunk_urls import DEFAULT_URL_TTL_S, MAX_OFFERS, ChunkUrls, ChunkUrlSigner
from edgectl.control_plane.device_logs import DeviceLogs
from edgectl.control_plane.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable
from edgectl.control_plane.fleet import Fleet
from edgectl.control_plane.limits import PeerBudget, peer_host
from edgectl.control_plane.revocations import TokenRevocations
from edgectl.control_plane.rollouts import Rollouts
from edgectl.control_plane.rpc import Hooks, Note, Servicer, caller, next_token, page, rpc
from edgectl.labels import check_labels
from edgectl.protos.v1 import (
    artifacts_pb2,
    artifacts_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    rollouts_pb2,
    rollouts_pb2_grpc,
)
from edgectl.security.dynsec import is_reserved
from edgectl.security.grpc_auth import current_identity
from edgectl.security.tokens import TokenVerifier

# Enroll is public: every field is bounded before anything else reads it (bytes or characters).
ENROLL_FIELD_LIMITS = {"device_id": 128, "token": 256, "agent_version": 128, "profile": 128, "csr_pem": 16384}

SNAPSHOT_EVENTS = frozenset(
    {"created", "state_changed", "wave_started", "wave_succeeded", "rollback_started"}
)


class ArtifactServicer(Servicer, artifacts_pb2_grpc.ArtifactServiceServicer):
    def __init__(
        self,
        artifacts: ArtifactStore,
        hooks: Hooks,
        deployed: Callable[[str], set[str]] | None = None,
        url_ttl_s: int = DEFAULT_URL_TTL_S,
    ) -> None:
        self.artifacts = artifacts
        self.hooks = hooks
        self.deployed = deployed  # device id -> the digests it may fetch (None: no scoping)
        self.signer = ChunkUrlSigner(artifacts, url_ttl_s)  # presigned chunk URLs (s3:// blobs)
        self._offer_parts: dict[str, tuple[ChunkUrls, artifacts_pb2.Artifact]] = {}

    def _for_caller(self, ref: str) -> Any:
        """Resolve ``ref`` to its record; a device (mTLS) may see only what was deployed to it."""
        record = self.artifacts.resolve(ref)
        who = current_identity()
        device = who.subject if who is not None and who.via == "mtls" else None
        if self.deployed is not None and device is not None and record.digest not in self.deployed(device):
            raise PermissionDenied(
                f"artifact {record.digest} is not deployed to device {device}",
                hint="a device fetches only what its desired state names (or the version before it)",
            )
        return record

    @rpc("ArtifactService/PlanUpload", mutating=True)
    def PlanUpload(self, request: artifacts_pb2.PlanUploadRequest, context: Any, note: Note) -> Any:
        plan = self.artifacts.plan_upload(request.manifest, request.signatures)
        note.target = plan.digest
        note.details = {"missing_chunks": len(plan.missing_chunks), "already_complete": plan.already_complete}
        return artifacts_pb2.PlanUploadResponse(
            digest=plan.digest, missing_chunks=plan.missing_chunks, already_complete=plan.already_complete
        )

    @rpc("ArtifactService/Upload", mutating=True)
    def Upload(
        self, request_iterator: Iterator[artifacts_pb2.UploadRequest], context: Any, note: Note
    ) -> Any:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("body") != "header":
            raise InvalidArgument("the first Upload message must be the header with the artifact digest")
        digest = first.header.digest
        note.target = digest
        manifest = self.artifacts.planned_manifest(digest)
        wanted = all_chunk_digests(manifest)
        received = chunks = 0
        for message in request_iterator:
            if message.WhichOneof("body") != "chunk":
                raise InvalidArgument("only chunk messages may follow the Upload header")
            self.artifacts.receive_chunk(manifest, message.chunk.digest, message.chunk.data, wanted)
            received += len(message.chunk.data)
            chunks += 1
        note.details = {"digest": digest, "chunks": chunks, "bytes": received}
        record = self.artifacts.commit_upload(digest, caller())
        return artifacts_pb2.UploadResponse(
            artifact=convert.artifact(record), bytes_received=received, chunks_received=chunks
        )

    @rpc("ArtifactService/List")
    def List(self, request: artifacts_pb2.ListArtifactsRequest, context: Any, note: Note) -> Any:
        offset, limit = page(request.page)
        records = self.artifacts.list_artifacts(request.name, offset, limit)
        return artifacts_pb2.ListArtifactsResponse(
            artifacts=[convert.artifact(r) for r in records],
            next_page_token=next_token(offset, limit, len(records)),
        )

    @rpc("ArtifactService/Get")
    def Get(self, request: artifacts_pb2.GetArtifactRequest, context: Any, note: Note) -> Any:
        record = self._for_caller(request.artifact)
        answer = convert.artifact(record)
        if request.want_chunk_urls:
            # The same scoping as GetChunkUrls (_for_caller above), in one call instead of two: the
            # two gRPC calls per device were most of a presigned rollout's control-plane CPU.
            signed = self.signer.offered(record.digest)
            if signed is not None and signed.urls:
                answer.MergeFrom(self._offer_part(record.digest, signed))
        return answer

    def _offer_part(self, digest: str, signed: ChunkUrls) -> artifacts_pb2.Artifact:
        """The URLs as an Artifact fragment to merge, built once per signer answer (not per device:
        a 50 MB artifact's 166 URLs cost more to build in Python than the rest of the call)."""
        kept = self._offer_parts.get(digest)
        if kept is not None and kept[0] is signed:
            return kept[1]
        part = artifacts_pb2.Artifact(chunk_urls=convert.chunk_urls(signed))
        part.chunk_urls_expire_at.CopyFrom(convert.ts(signed.expires_at))
        if len(self._offer_parts) >= MAX_OFFERS:
            self._offer_parts.clear()
        self._offer_parts[digest] = (signed, part)  # one dict write: atomic under the GIL
        return part

    @rpc("ArtifactService/Download", streaming=True)
    def Download(self, request: artifacts_pb2.DownloadRequest, context: Any, note: Note) -> Iterator[Any]:
        digest = self._for_caller(request.digest).digest
        if request.chunks:
            pieces = self.artifacts.download_chunks(digest, list(request.chunks))
        elif request.path:
            pieces = self.artifacts.download_file(digest, request.path, request.offset)
        else:
            raise InvalidArgument("Download needs a file path (with an offset) or a list of chunk digests")
        for p in pieces:
            yield artifacts_pb2.DownloadChunk(
                path=p.path, offset=p.offset, chunk_digest=p.digest, data=p.data
            )

    @rpc("ArtifactService/GetChunkUrls")
    def GetChunkUrls(self, request: artifacts_pb2.GetChunkUrlsRequest, context: Any, note: Note) -> Any:
        # The same scoping as Download: a URL is the bytes, so a device gets URLs only for what
        # its desired state names (or the version before it).
        digest = self._for_caller(request.digest).digest
        signed = self.signer.urls(digest, list(request.chunks))
        return artifacts_pb2.GetChunkUrlsResponse(
            urls=convert.chunk_urls(signed),
            expires_at=convert.ts(signed.expires_at),
        )

    @rpc("ArtifactService/Delete", mutating=True, target="digest")
    def Delete(self, request: artifacts_pb2.DeleteArtifactRequest, context: Any, note: Note) -> Any:
        digest = self.artifacts.resolve(request.digest).digest
        note.target = digest
        return artifacts_pb2.DeleteArtifactResponse(bytes_freed=self.artifacts.delete(digest))


class FleetServicer(Servicer, fleet_pb2_grpc.FleetServiceServicer):
    def __init__(
        self,
        fleet: Fleet,
        hooks: Hooks,
        on_decommission: Callable[[str], None],
        revocations: TokenRevocations,
        verifier: TokenVerifier | None,
        enroll_failures: PeerBudget | None = None,
        device_logs: DeviceLogs | None = None,
        burst_status: Callable[[], fleet_pb2.BurstBudgetStatus] | None = None,
    ) -> None:
        self.fleet = fleet
        self.burst_status = burst_status
        self.device_logs = device_logs
        self.hooks = hooks
        self.on_decommission = on_decommission
        self.revocations = revocations
        self.verifier = verifier
        self.enroll_failures = enroll_failures

    @rpc("FleetService/CreateEnrollmentToken", mutating=True, target="device_id")
    def CreateEnrollmentToken(
        self, request: fleet_pb2.CreateEnrollmentTokenRequest, context: Any, note: Note
    ) -> Any:
        _not_reserved(request.device_id)
        token = self.fleet.create_token(request.device_id, dict(request.labels), int(request.ttl_seconds))
        return fleet_pb2.EnrollmentToken(
            device_id=token.device_id, token=token.token, expires_at=convert.ts(token.expires_at)
        )

    @rpc(
        "FleetService/DeviceLogs", mutating=True, target="device_id"
    )  # audited: who read which device's logs
    def DeviceLogs(self, request: fleet_pb2.DeviceLogsRequest, context: Any, note: Note) -> Any:
        if self.device_logs is None:
            raise Unavailable("this control plane cannot reach devices for logs (no broker link)")
        return self.device_logs.fetch(request.device_id, request.since_unix, request.max_lines,
                                      request.timeout_seconds, bundle=request.bundle)  # fmt: skip

    def Enroll(self, request: fleet_pb2.EnrollRequest, context: Any) -> Any:
        """Public: a peer that failed too often is held off before any work (and any audit row)."""
        if self.enroll_failures is not None:
            peer = peer_host(context.peer())
            wait = self.enroll_failures.blocked_for(peer)
            if wait > 0:
                self.hooks.count_error("/edgectl.v1.FleetService/Enroll", "RESOURCE_EXHAUSTED")
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"too many failed enrollments from {peer}: try again in {wait:.0f}s")  # fmt: skip
        return self._enroll(request, context)

    @rpc("FleetService/Enroll", mutating=True, target="device_id")
    def _enroll(self, request: fleet_pb2.EnrollRequest, context: Any, note: Note) -> Any:
        try:
            for name, limit in ENROLL_FIELD_LIMITS.items():
                if len(getattr(request, name)) > limit:
                    raise InvalidArgument(f"Enroll's {name} is longer than {limit}")
            _not_reserved(request.device_id)
            creds = self.fleet.enroll(
                request.device_id, request.token, request.agent_version, request.profile, request.csr_pem
            )
        except (InvalidArgument, PermissionDenied, NotFound):
            if self.enroll_failures is not None:
                self.enroll_failures.charge(peer_host(context.peer()))
            raise
        return fleet_pb2.DeviceCredentials(
            device_id=creds.device_id, mqtt_username=creds.mqtt_username, mqtt_password=creds.mqtt_password,
            trusted_keys=creds.trusted_keys, mqtt_url=creds.mqtt_url, client_cert_pem=creds.client_cert_pem,
            ca_cert_pem=creds.ca_cert_pem, fleet_keys=creds.fleet_keys,
        )  # fmt: skip

    @rpc("FleetService/ListDevices")
    def ListDevices(self, request: fleet_pb2.ListDevicesRequest, context: Any, note: Note) -> Any:
        offset, limit = page(request.page, default=1000)
        devices = self.fleet.list_devices(convert.selector_from(request.selector), offset, limit)
        return fleet_pb2.ListDevicesResponse(
            devices=[convert.device(d) for d in devices],
            next_page_token=next_token(offset, limit, len(devices)),
        )

    @rpc("FleetService/GetBurstBudget")
    def GetBurstBudget(self, request: fleet_pb2.GetBurstBudgetRequest, context: Any, note: Note) -> Any:
        if self.burst_status is None:
            raise Unavailable("this control plane does not keep burst budgets")
        return self.burst_status()

    @rpc("FleetService/GetDevice")
    def GetDevice(self, request: fleet_pb2.GetDeviceRequest, context: Any, note: Note) -> Any:
        return convert.device(self.fleet.get(request.id))

    @rpc("FleetService/LabelDevice", mutating=True, target="id")
    def LabelDevice(self, request: fleet_pb2.LabelDeviceRequest, context: Any, note: Note) -> Any:
        check_labels(dict(request.set))
        return convert.device(self.fleet.label(request.id, dict(request.set), list(request.remove)))

    @rpc("FleetService/DecommissionDevice", mutating=True, target="id")
    def DecommissionDevice(
        self, request: fleet_pb2.DecommissionDeviceRequest, context: Any, note: Note
    ) -> Any:
        joined = self.fleet.decommission(request.id)
        self.on_decommission(request.id)
        return fleet_pb2.DecommissionDeviceResponse(enrollment_only=not joined)

    @rpc("FleetService/RevokeToken", mutating=True, target="token_id")
    def RevokeToken(self, request: fleet_pb2.RevokeTokenRequest, context: Any, note: Note) -> Any:
        done = self.revocations.revoke(
            self.verifier, token=request.token, token_id=request.token_id, by=caller(), reason=request.reason
        )
        note.target = done.token_id
        note.details["subject"] = done.subject
        return fleet_pb2.RevokeTokenResponse(
            token_id=done.token_id, subject=done.subject, newly_revoked=done.newly_revoked
        )


def _not_reserved(device_id: str) -> None:
    if is_reserved(device_id):  # the broker's service logins live under that prefix
        raise InvalidArgument(
            f"device id {device_id[:64]!r} is reserved (names starting with 'edgectl-' belong to edgectl's services)",
            hint="pick another device id",
        )


class RolloutServicer(Servicer, rollouts_pb2_grpc.RolloutServiceServicer):
    def __init__(self, rollouts: Rollouts, hooks: Hooks) -> None:
        self.rollouts = rollouts
        self.hooks = hooks

    @rpc("RolloutService/Create", mutating=True)
    def Create(self, request: rollouts_pb2.CreateRolloutRequest, context: Any, note: Note) -> Any:
        view = self.rollouts.create(
            request.artifact,
            convert.selector_from(request.selector),
            convert.strategy_from(request.strategy),
            caller(),
        )
        note.target = view.rollout.id
        return convert.rollout(view)

    @rpc("RolloutService/Get")
    def Get(self, request: rollouts_pb2.GetRolloutRequest, context: Any, note: Note) -> Any:
        return convert.rollout(self.rollouts.get(request.id))

    @rpc("RolloutService/List")
    def List(self, request: rollouts_pb2.ListRolloutsRequest, context: Any, note: Note) -> Any:
        offset, limit = page(request.page)
        views = self.rollouts.list_rollouts([int(s) for s in request.states], offset, limit)
        return rollouts_pb2.ListRolloutsResponse(
            rollouts=[convert.rollout(v, with_devices=False) for v in views],
            next_page_token=next_token(offset, limit, len(views)),
        )

    @rpc("RolloutService/Watch", streaming=True)
    def Watch(self, request: rollouts_pb2.WatchRolloutRequest, context: Any, note: Note) -> Iterator[Any]:
        seq = request.after_sequence
        while context.is_active():
            events = self.rollouts.events_after(request.id, seq)
            for e in events:
                snapshot = (
                    convert.rollout(self.rollouts.get(request.id)) if e.kind in SNAPSHOT_EVENTS else None
                )
                yield convert.event(e, snapshot)
                seq = e.seq
            if not events:
                if self.rollouts.get(request.id).rollout.state in rs.TERMINAL:
                    return
                with self.rollouts.changed:
                    # Other replicas write too, so poll as well as wait for local notifications.
                    self.rollouts.changed.wait(0.5)

    def _action(self, name: str, request: rollouts_pb2.RolloutActionRequest) -> Any:
        view = getattr(self.rollouts, name)(request.id, request.reason)
        return convert.rollout(view)

    @rpc("RolloutService/Pause", mutating=True, target="id")
    def Pause(self, request: rollouts_pb2.RolloutActionRequest, context: Any, note: Note) -> Any:
        return self._action("pause", request)

    @rpc("RolloutService/Resume", mutating=True, target="id")
    def Resume(self, request: rollouts_pb2.RolloutActionRequest, context: Any, note: Note) -> Any:
        return self._action("resume", request)

    @rpc("RolloutService/Abort", mutating=True, target="id")
    def Abort(self, request: rollouts_pb2.RolloutActionRequest, context: Any, note: Note) -> Any:
        return self._action("abort", request)

    @rpc("RolloutService/Rollback", mutating=True, target="id")
    def Rollback(self, request: rollouts_pb2.RolloutActionRequest, context: Any, note: Note) -> Any:
        return self._action("rollback", request)


class AuditServicer(Servicer, rollouts_pb2_grpc.AuditServiceServicer):
    def __init__(self, audit: AuditLog, hooks: Hooks) -> None:
        self.audit = audit
        self.hooks = hooks

    @rpc("AuditService/List")
    def List(self, request: rollouts_pb2.ListAuditRequest, context: Any, note: Note) -> Any:
        offset, limit = page(request.page)
        since = convert.seconds(request.range.since) if request.range.HasField("since") else None
        until = convert.seconds(request.range.until) if request.range.HasField("until") else None
        records = self.audit.entries(since, until, request.action, offset, limit)
        return rollouts_pb2.ListAuditResponse(
            entries=[convert.audit(r) for r in records],
            next_page_token=next_token(offset, limit, len(records)),
        )
