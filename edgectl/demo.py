"""`edgectl demo`: the main job end to end on one machine, with nothing to configure.

Starts a local fleet (broker, control plane, two edge agents, a cloud burst endpoint), trains
the digits CNN, compresses it into a signed int8 artifact, rolls it out in waves, classifies
digits through an agent with the stock KServe V2 client, rolls out a pruned v2, then a v3
whose on-device smoke test fails: the rollout stops and the moved devices go back to v2.

Every step checks what it shows; the demo exits non-zero the moment one does not hold.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from edgectl.artifact import SigningKey, TrustStore, build_artifact, load_artifact, public_pem
from edgectl.endpoints import Endpoints
from edgectl.errors import EdgectlError
from edgectl.localfleet import LocalFleet

DEMO_NAME = "digits"
EDGE_SELECTOR = {"tier": "edge"}


class DemoError(EdgectlError):
    """A step of the demo did not do what it shows."""


@dataclass
class DemoReport:
    """What the demo measured, step by step (for --json and for tests)."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, step: str, seconds: float, **facts: Any) -> None:
        self.steps.append({"step": step, "seconds": round(seconds, 2), **facts})


class Demo:
    """The demo's steps over one local fleet; ``run()`` does them in order."""

    def __init__(self, data_dir: Path, console: Console, agents: int = 2) -> None:
        self.data_dir = data_dir
        self.console = console
        self.agents = agents
        self.report = DemoReport()
        self.work = data_dir / "demo"
        self.key_path = data_dir / "keys" / "demo.pem"
        self.endpoints: Endpoints | None = None

    # -- plumbing ----------------------------------------------------------------------------

    @contextmanager
    def step(self, title: str) -> Iterator[dict[str, Any]]:
        """Print the step, time it, record its facts."""
        self.console.rule(f"[bold]{title}")
        facts: dict[str, Any] = {}
        started = time.perf_counter()
        yield facts
        seconds = time.perf_counter() - started
        self.report.add(title, seconds, **facts)
        self.console.print(f"[dim]{title}: {seconds:.1f} s[/]")

    def _signing_key(self) -> SigningKey:
        if self.key_path.exists():
            return SigningKey.load(self.key_path)
        self.key_path.parent.mkdir(parents=True, exist_ok=True)
        key = SigningKey.generate()
        key.save(self.key_path)
        pub = self.key_path.with_name("demo.pub.pem")
        pub.write_bytes(public_pem(key.public_key))
        return key

    # -- the steps ---------------------------------------------------------------------------

    def run(self) -> DemoReport:
        started = time.perf_counter()
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        key = self._signing_key()
        fleet = LocalFleet(self.data_dir, agents=self.agents, trust=[self.key_path.with_name("demo.pub.pem")])
        try:
            with self.step("1. start a local fleet") as facts:
                self.endpoints = fleet.start()
                facts.update(control_plane=self.endpoints.control_plane, agents=len(self.endpoints.agents),
                             secure=self.endpoints.secure)  # fmt: skip
                self.console.print(
                    f"broker {self.endpoints.mqtt}, control plane {self.endpoints.control_plane}, "
                    f"agents {', '.join(a.device_id + '@' + a.v2 for a in self.endpoints.agents)}, "
                    f"cloud burst endpoint {self.endpoints.cloud.v2 if self.endpoints.cloud else '-'}"
                )
                self.console.print(
                    "secured: TLS broker with one identity per agent (enrolled with one-time tokens), "
                    "gRPC over TLS with an admin token, artifacts trusted only when signed by the demo key"
                )
            model, data = self._train()
            v1 = self._compress(model, data, version=1, prune=0.0, key=key)
            self._deploy(v1, expect_success=True, title="4. deploy v1 in waves 1,100% to tier=edge")
            self._infer(data, version=1)
            v2 = self._compress(model, data, version=2, prune=0.25, key=key)
            self._deploy(v2, expect_success=True, title="7. deploy v2 (pruned 25 %)")
            v3 = self._broken_release(v2, key)
            self._deploy(v3, expect_success=False, title="9. deploy v3: wave 1 fails its smoke test")
            self._infer(data, version=2)
        finally:
            fleet.stop()
        self.report.seconds = time.perf_counter() - started
        self.console.rule(f"[bold green]demo done in {self.report.seconds:.0f} s")
        return self.report

    def _train(self) -> tuple[Any, dict[str, np.ndarray]]:
        from edgectl.compress.digits import digits_data, train_digits_cnn

        with self.step("2. train a small CNN on scikit-learn's digits") as facts:
            x_train, y_train, x_test, y_test = digits_data()
            model = train_digits_cnn()
            accuracy = _torch_accuracy(model, x_test, y_test)
            facts.update(float_accuracy=round(accuracy, 4), train=len(y_train), test=len(y_test))
            self.console.print(f"float accuracy on {len(y_test)} held-out digits: {accuracy:.1%}")
            data = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
            np.savez(self.work / "calib.npz", image=x_train[:256])
            np.savez(self.work / "eval.npz", image=x_test, labels=y_test)
        return model, data

    def _compress(
        self, model: Any, data: dict[str, np.ndarray], *, version: int, prune: float, key: SigningKey
    ) -> Path:
        from edgectl.compress.pipeline import compress_module
        from edgectl.compress.recipe import Recipe
        from edgectl.devices import detect

        title = (
            "3. compress v1: int8, accuracy-gated"
            if version == 1
            else f"6. compress v{version}: prune {prune:.0%} + int8"
        )
        out = self.work / f"{DEMO_NAME}-v{version}"
        with self.step(title) as facts:
            result = compress_module(
                model, out,
                name=DEMO_NAME, version=version, parent_version=version - 1 if version > 1 else None,
                profile=detect().profile.name, recipe=Recipe.from_options(quantize="int8-static", prune=prune),
                calib=self.work / "calib.npz", eval=self.work / "eval.npz", max_drop=0.01,
                sign_key=self.key_path,
            )  # fmt: skip
            base, chosen = result.baseline, result.chosen
            facts.update(digest=result.digest, **_trial_facts(base, "float"), **_trial_facts(chosen, "int8"))
            self.console.print(
                f"{DEMO_NAME}:{version} {_short(result.digest)}  accuracy {_q(base)} → {_q(chosen)}, "
                f"size {_size(base)} → {_size(chosen)}, p50 {_ms(base)} → {_ms(chosen)}"
            )
        return out

    def _client(self) -> Any:
        from edgectl.client import ControlPlaneClient, resolve_credentials

        assert self.endpoints is not None
        credentials = resolve_credentials(data_dir=self.data_dir)  # the fleet CA and up's admin token
        return ControlPlaneClient(self.endpoints.control_plane, credentials=credentials)

    def _deploy(self, bundle: Path, *, expect_success: bool, title: str) -> None:
        from edgectl.client import push_artifact
        from edgectl.protos.v1 import common_pb2, rollouts_pb2

        with self.step(title) as facts, self._client() as client:
            pushed = push_artifact(client, bundle)
            ref = pushed.artifact.ref
            self.console.print(f"pushed {ref.name}:{ref.version} ({pushed.bytes_sent} bytes sent)")
            rollout = client.call(client.rollouts.Create, rollouts_pb2.CreateRolloutRequest(
                artifact=ref.digest,
                selector=common_pb2.Selector(match_labels=EDGE_SELECTOR),
                strategy=rollouts_pb2.Strategy(waves=["1", "100%"], max_failures="0", health_timeout_seconds=60),
            ))  # fmt: skip
            final = self._follow(client, rollout.id)
            state = rollouts_pb2.RolloutState.Name(final.state).removeprefix("ROLLOUT_STATE_").lower()
            facts.update(rollout=final.id, state=state, reason=final.reason)
            succeeded = final.state == rollouts_pb2.ROLLOUT_STATE_SUCCEEDED
            if succeeded != expect_success:
                raise DemoError(
                    f"rollout {final.id} of {ref.name}:{ref.version} ended {state}: {final.reason}"
                )
            if not succeeded:
                self.console.print(f"[yellow]rollout {final.id} {state}[/]: {final.reason}")
                self._await_versions(client, ref.version - 1, facts)
            else:
                self._await_versions(client, ref.version, facts)

    def _follow(self, client: Any, rollout_id: str) -> Any:
        """Print the rollout's events as the control plane streams them; return the final rollout."""
        import grpc

        from edgectl.protos.v1 import rollouts_pb2

        try:
            for event in client.rollouts.Watch(rollouts_pb2.WatchRolloutRequest(id=rollout_id), timeout=180):
                where = f" [cyan]{event.device_id}[/]" if event.device_id else ""
                self.console.print(f"  #{event.sequence} {event.kind}{where} {event.message}".rstrip())
        except grpc.RpcError as exc:
            raise client.error(exc) from None
        return client.call(client.rollouts.Get, rollouts_pb2.GetRolloutRequest(id=rollout_id))

    def _await_versions(
        self, client: Any, version: int, facts: dict[str, Any], timeout: float = 60.0
    ) -> None:
        """Every edge agent reports ``version`` active (after a rollback too)."""
        from edgectl.protos.v1 import fleet_pb2

        deadline = time.monotonic() + timeout
        while True:
            devices = client.call(client.fleet.ListDevices, fleet_pb2.ListDevicesRequest()).devices
            edge = [d for d in devices if d.labels.get("tier") == "edge"]
            active = {d.id: d.active.version for d in edge}
            if edge and all(v == version for v in active.values()):
                facts["active"] = active
                self.console.print(
                    f"every edge agent serves {DEMO_NAME}:{version}: {', '.join(sorted(active))}"
                )
                return
            if time.monotonic() > deadline:
                raise DemoError(
                    f"edge agents did not all serve {DEMO_NAME}:{version} within {timeout:.0f}s: {active}"
                )
            time.sleep(0.3)

    def _infer(self, data: dict[str, np.ndarray], *, version: int) -> None:
        try:
            import tritonclient.grpc as triton
        except ImportError as exc:
            raise DemoError(
                "the demo's inference step needs tritonclient", hint="pip install 'tritonclient[grpc]'"
            ) from exc

        assert self.endpoints is not None
        agent = self.endpoints.agents[0]
        title = (
            "5. classify digits through an agent with tritonclient" if version == 1 else "10. v2 still serves"
        )
        with self.step(title) as facts:
            client = triton.InferenceServerClient(agent.v2)
            images, labels = data["x_test"], data["y_test"]
            correct, served = 0, set()
            for start in range(0, len(labels), 64):
                batch = images[start : start + 64]
                tensor = triton.InferInput("image", list(batch.shape), "FP32")
                tensor.set_data_from_numpy(batch)
                result = client.infer(DEMO_NAME, [tensor])
                response = result.get_response()
                logits = result.as_numpy(response.outputs[0].name)
                correct += int((np.argmax(logits, axis=1) == labels[start : start + 64]).sum())
                served.add(
                    response.parameters["served_by"].string_param
                    if "served_by" in response.parameters
                    else "?"
                )
                served_version = response.model_version
            accuracy = correct / len(labels)
            facts.update(agent=agent.device_id, accuracy=round(accuracy, 4), served_by=sorted(served),
                         model_version=served_version)  # fmt: skip
            self.console.print(
                f"{len(labels)} digits through {agent.device_id} ({agent.v2}): accuracy {accuracy:.1%}, "
                f"model version {served_version}, served by {', '.join(sorted(served))}"
            )
            if str(served_version) != str(version):
                raise DemoError(
                    f"{agent.device_id} answered with version {served_version}, expected {version}"
                )
            if accuracy < 0.9:
                raise DemoError(f"accuracy through the agent is {accuracy:.1%}; expected ≥ 90 %")

    def _broken_release(self, good: Path, key: SigningKey) -> Path:
        """v3: v2's golden pair over a model whose last layer was zeroed after it was recorded.

        A valid, signed, trusted artifact: only the on-device smoke test can catch it, and does.
        """
        import onnx
        from onnx import numpy_helper

        out = self.work / f"{DEMO_NAME}-v3"
        with self.step("8. build v3: a broken export, validly signed") as facts:
            trust = TrustStore()
            trust.add(key.public_key)
            src = load_artifact(good, trust)
            model = onnx.load(str(good / src.manifest.model_file))
            last = _last_weight(model)
            last.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(last)), last.name))
            broken = self.work / "broken.onnx"
            onnx.save(model, str(broken))
            golden_in, golden_out = src.golden()
            m = src.manifest
            art = build_artifact(
                out, name=m.name, version=3, parent_version=2, files={m.model_file: broken},
                input_signature=m.inputs, output_signature=m.outputs,
                golden_inputs=golden_in, golden_outputs=golden_out, recipe=m.recipe,
                target_profile=m.target_profile, metrics=m.metrics, precision_map=m.precision,
                source_model_sha256=m.source_model_sha256, signing_key=key,
                golden_atol=m.golden.atol, golden_rtol=m.golden.rtol, golden_min_cosine=m.golden.min_cosine,
            )  # fmt: skip
            facts.update(digest=art.digest, zeroed=last.name)
            self.console.print(
                f"{DEMO_NAME}:3 {_short(art.digest)}: weights {last.name} zeroed after the golden pair"
            )
        return out


def _last_weight(model: Any) -> Any:
    """The initializer of the last Gemm/MatMul/Conv in the graph: the classifier's weights."""
    names = {init.name: init for init in model.graph.initializer}
    for node in reversed(model.graph.node):
        if node.op_type in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul", "Conv", "QLinearConv"):
            for name in node.input:
                if name in names and len(names[name].dims) >= 2:
                    return names[name]
    for node in reversed(model.graph.node):  # QDQ: the weight feeds a DequantizeLinear
        if (
            node.op_type == "DequantizeLinear"
            and node.input[0] in names
            and len(names[node.input[0]].dims) >= 2
        ):
            return names[node.input[0]]
    raise DemoError("found no weight matrix to break in the model")


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def _torch_accuracy(model: Any, images: np.ndarray, labels: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        logits = model(torch.from_numpy(images)).numpy()
    return float((np.argmax(logits, axis=1) == labels).mean())


def _trial_facts(trial: Any, prefix: str) -> dict[str, Any]:
    quality = trial.quality.score if trial.quality else None
    return {f"{prefix}_quality": quality, f"{prefix}_bytes": trial.size_bytes}


def _q(trial: Any) -> str:
    return f"{trial.quality.score:.1%}" if trial.quality else "-"


def _size(trial: Any) -> str:
    value = getattr(trial, "size_bytes", None)
    return f"{value / 1024:.0f} KiB" if value else "-"


def _ms(trial: Any) -> str:
    latency = getattr(trial, "latency", None)
    p50 = getattr(latency, "p50_ms", None)
    return f"{p50:.2f} ms" if p50 else "-"
