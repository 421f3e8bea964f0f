"""Reconcile over a real broker and a real artifact server: converge, delta, refuse, recover."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from edgectl.agent.agent import Agent
from edgectl.artifact import SigningKey
from edgectl.ports import free_port
from edgectl.protos.v1 import mqtt_pb2 as mpb
from tests.agent.conftest import AgentRig, Fleet, V2Client, wait_for
from tests.agent.onnx_models import run_direct

K = mpb.EventKind
X = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)


def _want(bundle_root, x=X):  # type: ignore[no-untyped-def]
    return run_direct(bundle_root / "model.onnx", {"x": x})["y"]


def test_an_agent_that_does_not_serve_still_converges_and_opens_no_listener(rig: AgentRig) -> None:
    """serve=False (the fleet simulator's agents): fetch, verify, load, smoke test, report; no V2."""
    port = free_port()
    v1 = rig.bundles.build(version=1, dims=(4, 8, 3), seeds=[1, 2])
    d1 = rig.server.add(v1.root)
    agent: Agent = rig.agent(serve=False, listen=f"127.0.0.1:{port}")
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d1, version=1))
    rig.fleet.wait_serving("mlp", d1)
    assert agent.server is None and agent.address == "(not serving)"
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))
    outputs, model = agent.registry.infer("mlp", {"x": X})  # loaded, just not exposed
    np.testing.assert_allclose(outputs["y"], _want(v1.root), rtol=1e-5, atol=1e-5)
    assert model.version == 1


def test_converges_then_updates_with_a_delta_and_keeps_the_previous(rig: AgentRig) -> None:
    dims = (64, 512, 512, 8)
    v1 = rig.bundles.build(version=1, dims=dims, seeds=[1, 2, 3])
    v2 = rig.bundles.build(version=2, dims=dims, seeds=[1, 2, 4])  # only the last layer differs
    d1, d2 = rig.server.add(v1.root), rig.server.add(v2.root)
    agent: Agent = rig.agent()
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d1, version=1))
    rig.fleet.wait_serving("mlp", d1)
    client = V2Client(agent.address)
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    y, served_by, version = client.infer("mlp", x)
    np.testing.assert_allclose(y, _want(v1.root, x), rtol=1e-5, atol=1e-5)
    assert (served_by, version) == ("local", "1")
    kinds = rig.fleet.event_kinds(d1)
    for k in (
        K.EVENT_KIND_FETCH_STARTED,
        K.EVENT_KIND_VERIFIED,
        K.EVENT_KIND_STAGED,
        K.EVENT_KIND_SMOKE_TEST_PASSED,
        K.EVENT_KIND_SWAPPED,
    ):
        assert k in kinds

    before = rig.server.served_bytes
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d2, version=2))
    m = rig.fleet.wait_serving("mlp", d2)
    assert m.previous_digest == d1 and m.execution_provider == "CPUExecutionProvider"
    assert rig.fleet.latest().observed_generation == 2  # type: ignore[union-attr]
    delta = rig.server.served_bytes - before
    total = sum(f.size for f in v2.manifest.files)
    assert delta < 0.25 * total, f"fetched {delta} of {total} bytes for a last-layer change"
    y, _, version = client.infer("mlp", x)
    np.testing.assert_allclose(y, _want(v2.root, x), rtol=1e-5, atol=1e-5)
    assert version == "2"
    # The bytes the delta saved are a metric: v1 reused nothing, v2 reused all but its last layer.
    saved = agent.metrics.registry.get_sample_value("edgectl_agent_delta_saved_bytes_total")
    assert saved is not None and 0.75 * total < saved < total
    assert (agent.config.data_dir / "artifacts" / d1.removeprefix("sha256:")).is_dir()  # kept for rollback
    client.close()


def test_corrupted_chunk_and_dropped_stream_are_refetched(rig: AgentRig) -> None:
    v1 = rig.bundles.build(version=1, dims=(64, 1024, 512, 8))
    d1 = rig.server.add(v1.root)
    chunks = [c.digest for f in v1.manifest.files for c in f.chunks]
    assert len(chunks) >= 3
    rig.server.faults.corrupt = {chunks[1]}
    rig.server.faults.drop_after = 2
    rig.agent()
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d1, version=1))
    rig.fleet.wait_serving("mlp", d1)
    assert rig.server.served[chunks[1]] == 2  # the corrupt copy was refused and fetched again
    assert rig.server.served[chunks[0]] == 1  # resumed: what was verified is never fetched twice


def test_refusals_are_reported_and_the_old_model_keeps_serving(rig: AgentRig) -> None:
    good = rig.bundles.build(version=2)
    d_good = rig.server.add(good.root)
    agent: Agent = rig.agent()
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d_good, version=2))
    rig.fleet.wait_serving("mlp", d_good)
    client = V2Client(agent.address)

    bad_golden = rig.bundles.build(version=3, golden_outputs={"y": np.full((2, 3), 42.0, np.float32)})
    untrusted = rig.bundles.build(version=4, key=SigningKey.generate())
    older = rig.bundles.build(version=1, seeds=[7, 8])
    fp16 = rig.bundles.build(version=5, precision="fp16")
    cases = [
        (bad_golden, "smoke test failed"),
        (untrusted, "not a trusted key"),
        (older, "not newer than active version 2"),
        (fp16, "precision fp16 is not supported"),
    ]
    for bundle, reason in cases:
        digest = rig.server.add(bundle.root)
        rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=digest))
        m = rig.fleet.wait_model("mlp", lambda m, d=digest: m.failed_digest == d)
        assert reason in m.failure_reason, m.failure_reason
        assert m.digest == d_good and m.smoke_test_passed
        assert K.EVENT_KIND_REFUSED in rig.fleet.event_kinds(digest)
        y, _, version = client.infer("mlp", X)
        np.testing.assert_allclose(y, _want(good.root), rtol=1e-5, atol=1e-5)
        assert version == "2"

    d_old = rig.server.add(older.root)
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d_old, rollback=True))
    m = rig.fleet.wait_serving("mlp", d_old)
    assert m.failed_digest == "" and m.previous_digest == d_good
    wait_for(lambda: client.infer("mlp", X)[2] == "1", what="rolled back version to serve")
    client.close()


def test_malformed_foreign_and_stale_desired_states_are_ignored(rig: AgentRig) -> None:
    v1, v2 = rig.bundles.build(version=1), rig.bundles.build(version=2, seeds=[3, 4])
    d1, d2 = rig.server.add(v1.root), rig.server.add(v2.root)
    rig.agent()
    rig.fleet.client.publish(rig.fleet.topics.desired, b"{not json", retain=True)
    foreign = mpb.DesiredState(
        device_id="dev-2", generation=99, models=[mpb.DesiredModel(name="mlp", digest=d2)]
    )
    from edgectl.mqtt.wire import encode

    rig.fleet.client.publish(rig.fleet.topics.desired, encode(foreign), retain=True)
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d1, version=1), generation=5)
    rig.fleet.wait_serving("mlp", d1)
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d2, version=2), generation=4)  # stale
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d1, version=1), generation=6)
    wait_for(
        lambda: (r := rig.fleet.latest()) is not None and r.observed_generation == 6, what="generation 6"
    )
    assert rig.fleet.latest().models[0].digest == d1  # type: ignore[union-attr]


def test_broker_restart_and_control_plane_outage_do_not_stop_serving(rig: AgentRig) -> None:
    v1, v2 = rig.bundles.build(version=1), rig.bundles.build(version=2, seeds=[3, 4])
    d1, d2 = rig.server.add(v1.root), rig.server.add(v2.root)
    agent: Agent = rig.agent()
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d1, version=1))
    rig.fleet.wait_serving("mlp", d1)
    client = V2Client(agent.address)

    rig.broker.kill()
    for _ in range(20):
        assert client.infer("mlp", X)[1] == "local"
    rig.server.faults.unavailable = True
    rig.broker.start()
    rig.fleet.close()
    fleet2 = Fleet(rig.broker, "dev-1")
    wait_for(lambda: agent.link is not None and agent.link.connected.is_set(), what="agent to reconnect")
    fleet2.desire(mpb.DesiredModel(name="mlp", digest=d2, version=2), generation=10)
    wait_for(lambda: K.EVENT_KIND_FAILED in fleet2.event_kinds(d2), what="a FAILED (will retry) event")
    np.testing.assert_allclose(client.infer("mlp", X)[0], _want(v1.root), rtol=1e-5, atol=1e-5)
    rig.server.faults.unavailable = False
    fleet2.wait_serving("mlp", d2, timeout=30)
    assert fleet2.latest().models[0].failed_digest == ""  # type: ignore[union-attr]
    fleet2.close()
    client.close()


def test_artifacts_unfit_for_the_device_are_refused_with_the_reason(rig: AgentRig) -> None:
    # A GPU profile on this CPU-only onnxruntime, with 1 MiB for models.
    good = rig.bundles.build(version=1, target_profile="x86-gpu")
    d_good = rig.server.add(good.root)
    agent: Agent = rig.agent(profile="x86-gpu", memory_limit_mib=1)
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d_good, version=1))
    m = rig.fleet.wait_serving("mlp", d_good)
    assert m.execution_provider == "CPUExecutionProvider"  # fp32 falls back along the chain
    cases = [
        # fp16 runs only on TensorRT/CUDA in this profile, and this onnxruntime has neither.
        (
            rig.bundles.build(version=2, precision="fp16", target_profile="x86-gpu"),
            "no execution provider here runs fp16",
        ),
        # ~1.1 MB of weights: about 2 MiB to serve, over the 1 MiB budget.
        (
            rig.bundles.build(version=3, dims=(256, 1024, 16), target_profile="x86-gpu"),
            "this device allows 1 MiB",
        ),
    ]
    client = V2Client(agent.address)
    for bundle, reason in cases:
        digest = rig.server.add(bundle.root)
        rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=digest))
        m = rig.fleet.wait_model("mlp", lambda m, d=digest: m.failed_digest == d)
        assert reason in m.failure_reason, m.failure_reason
        assert m.digest == d_good and m.smoke_test_passed
        assert K.EVENT_KIND_REFUSED in rig.fleet.event_kinds(digest)
        assert client.infer("mlp", X)[2] == "1"
    client.close()
