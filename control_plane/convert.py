"""Domain records to protobuf messages and back: the one seam between the two."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from edgectl.control_plane import rollout_store as rs
from edgectl.control_plane.artifact_records import ArtifactRecord
from edgectl.control_plane.audit import AuditRecord
from edgectl.control_plane.chunk_urls import ChunkUrls
from edgectl.control_plane.device_state import DeviceRecord
from edgectl.control_plane.strategy import DEFAULT_HEALTH_TIMEOUT_S, OFFLINE_FAIL, StrategySpec
from edgectl.labels import Selector
from edgectl.mqtt.wire import decode
from edgectl.protos.v1 import artifacts_pb2, common_pb2, fleet_pb2, mqtt_pb2, rollouts_pb2


def ts(seconds: float) -> Timestamp:
    """A protobuf Timestamp for epoch seconds."""
    out = Timestamp()
    set_ts(out, seconds)
    return out


def set_ts(stamp: Timestamp, seconds: float) -> None:
    """Set ``stamp`` (a message's field, in place: no Timestamp built and copied) to epoch seconds."""
    stamp.seconds, stamp.nanos = divmod(int(seconds * 1e9), 1_000_000_000)


def seconds(stamp: Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9


def artifact(record: ArtifactRecord) -> artifacts_pb2.Artifact:
    return artifacts_pb2.Artifact(
        ref=common_pb2.ArtifactRef(digest=record.digest, name=record.name, version=record.version),
        manifest=record.manifest_bytes,
        signatures=record.signatures,
        total_size=record.total_size,
        uploaded_at=ts(record.uploaded_at),
        uploaded_by=record.uploaded_by,
        key_ids=list(record.key_ids),
        pinned=record.pinned,
    )


def chunk_urls(signed: ChunkUrls) -> list[artifacts_pb2.ChunkUrl]:
    return [artifacts_pb2.ChunkUrl(chunk_digest=u.digest, url=u.url, size=u.size) for u in signed.urls]


def device(record: DeviceRecord) -> fleet_pb2.Device:
    active = next(iter(sorted(record.models.values(), key=lambda m: m.name)), None)
    out = fleet_pb2.Device(
        id=record.id,
        labels=record.effective_labels,
        online=record.online,
        health=fleet_pb2.DeviceHealth.ValueType(record.health),
        agent_version=record.agent_version,
        profile=record.profile,
        last_error=record.last_error,
        drift={m.name: m.drift for m in record.models.values() if m.drift is not None},
        burst_cost=float((record.stats or {}).get("burst_cost", 0.0)),
    )
    if active is not None and active.digest:
        out.active.CopyFrom(
            common_pb2.ArtifactRef(digest=active.digest, name=active.name, version=active.version)
        )
        if active.failed_digest and not out.last_error:
            out.last_error = f"refused {active.failed_digest}: {active.failure_reason}"
    if record.desired:
        desired = decode(record.desired.encode(), mqtt_pb2.DesiredState)
        if desired.models:
            m = desired.models[0]
            out.desired.CopyFrom(common_pb2.ArtifactRef(digest=m.digest, name=m.name, version=m.version))
    if record.last_seen is not None:
        out.last_seen.CopyFrom(ts(record.last_seen))
    if record.enrolled_at is not None:
        out.enrolled_at.CopyFrom(ts(record.enrolled_at))
    return out


def selector_from(msg: common_pb2.Selector) -> Selector:
    return Selector(dict(msg.match_labels), tuple(msg.device_ids))


def selector_to(sel: Selector) -> common_pb2.Selector:
    return common_pb2.Selector(match_labels=sel.labels, device_ids=list(sel.device_ids))


def strategy_from(msg: rollouts_pb2.Strategy) -> StrategySpec:
    default = StrategySpec()
    return StrategySpec(
        waves=tuple(msg.waves) or default.waves,
        max_failures=msg.max_failures or "0",
        health_timeout_s=int(msg.health_timeout_seconds or DEFAULT_HEALTH_TIMEOUT_S),
        soak_s=int(msg.soak_seconds),
        max_error_rate=msg.max_error_rate,
        max_p99_ms=msg.max_p99_ms,
        offline_policy=int(msg.offline_policy or OFFLINE_FAIL),
        continuous=msg.continuous,
        start_at=seconds(msg.start_at) if msg.HasField("start_at") else 0.0,
        window=msg.window.strip(),
        pause_after_waves=tuple(sorted(set(msg.pause_after_waves))),
        canary_percent=msg.canary_traffic_percent,
        shadow=msg.shadow,
        min_agreement=msg.min_agreement,
        max_p99_ratio=msg.max_p99_ratio,
    )


def strategy_to(spec: StrategySpec) -> rollouts_pb2.Strategy:
    return rollouts_pb2.Strategy(
        waves=list(spec.waves),
        max_failures=spec.max_failures,
        health_timeout_seconds=spec.health_timeout_s,
        soak_seconds=spec.soak_s,
        max_error_rate=spec.max_error_rate,
        max_p99_ms=spec.max_p99_ms,
        offline_policy=spec.offline_policy,  # type: ignore[arg-type]
        continuous=spec.continuous,
        start_at=ts(spec.start_at) if spec.start_at else None,
        window=spec.window,
        pause_after_waves=list(spec.pause_after_waves),
        canary_traffic_percent=spec.canary_percent,
        shadow=spec.shadow,
        min_agreement=spec.min_agreement,
        max_p99_ratio=spec.max_p99_ratio,
    )


def rollout(view: rs.RolloutView, with_devices: bool = True) -> rollouts_pb2.Rollout:
    r = view.rollout
    out = rollouts_pb2.Rollout(
        id=r.id,
        artifact=common_pb2.ArtifactRef(
            digest=r.artifact_digest, name=r.artifact_name, version=r.artifact_version
        ),
        selector=selector_to(r.selector),
        strategy=strategy_to(r.strategy),
        state=r.state,  # type: ignore[arg-type]
        current_wave=r.current_wave,
        failures=r.failures,
        reason=r.reason,
        created_at=ts(r.created_at),
        updated_at=ts(r.updated_at),
        created_by=r.created_by,
    )
    by_wave: dict[int, list[rs.ProgressRecord]] = {}
    for p in view.devices:
        by_wave.setdefault(p.wave, []).append(p)
    for w in view.waves:
        wave = out.waves.add(index=w.idx, state=w.state)  # type: ignore[arg-type]
        if w.started_at is not None:
            wave.started_at.CopyFrom(ts(w.started_at))
        if w.finished_at is not None:
            wave.finished_at.CopyFrom(ts(w.finished_at))
        if with_devices:
            for p in by_wave.get(w.idx, []):
                added = wave.devices.add(
                    device_id=p.device_id, state=p.state, previous_digest=p.previous_digest, reason=p.reason,  # type: ignore[arg-type]
                )  # fmt: skip
                # In place: a Timestamp built and copied per device was a quarter of a large rollout's Get.
                set_ts(added.updated_at, p.updated_at)
    return out


def event(e: rs.EventRecord, snapshot: rollouts_pb2.Rollout | None = None) -> rollouts_pb2.RolloutEvent:
    out = rollouts_pb2.RolloutEvent(
        sequence=e.seq, rollout_id=e.rollout_id, at=ts(e.at), kind=e.kind, wave=e.wave,
        device_id=e.device_id, message=e.message,
    )  # fmt: skip
    if snapshot is not None:
        out.rollout.CopyFrom(snapshot)
    return out


def audit(record: AuditRecord) -> rollouts_pb2.AuditEntry:
    return rollouts_pb2.AuditEntry(
        id=record.id,
        at=ts(record.at),
        actor=common_pb2.Actor(identity=record.identity, peer=record.peer),
        action=record.action,
        target=record.target,
        details=record.details,
        outcome=record.outcome,
    )
