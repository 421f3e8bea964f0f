"""Two versions of a ResNet-18-shaped ONNX model that differ only in the final layer share
>= 90 % of their chunk bytes, float and int8 alike; a device holding v1 fetches only the rest.

The model is built with onnx.helper (conv weights with BatchNorm folded in, as torch's exporter
emits them; a Gemm head): 11.68 M parameters, 46.7 MB fp32, the size of the real ResNet-18.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgectl.artifact import (
    Artifact,
    LocalBlobStore,
    SigningKey,
    TensorSpec,
    TrustStore,
    build_artifact,
    chunks_to_fetch,
    golden_matches,
    load_artifact,
    put_file_chunks,
    reassemble_file,
    shared_bytes,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import NodeProto, TensorProto, helper, numpy_helper  # noqa: E402
from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: E402


def build_resnet18(path: Path, head_seed: int, num_classes: int = 1000) -> int:
    """Write a ResNet-18-shaped model: a fixed backbone (seed 1234) and a head from ``head_seed``."""
    rng = np.random.default_rng(1234)
    inits: list[TensorProto] = []
    nodes: list[NodeProto] = []

    def conv(x: str, cin: int, cout: int, k: int, stride: int, relu: bool, name: str) -> str:
        scale = np.float32(np.sqrt(2.0 / (cin * k * k)))
        inits.append(
            numpy_helper.from_array(
                rng.standard_normal((cout, cin, k, k), np.float32) * scale, f"{name}.weight"
            )
        )
        inits.append(
            numpy_helper.from_array(rng.standard_normal(cout, np.float32) * np.float32(0.01), f"{name}.bias")
        )
        out = f"{name}_out"
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.weight", f"{name}.bias"],
                [out],
                name=f"/{name}/Conv",
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[k // 2] * 4,
            )
        )
        if relu:
            nodes.append(helper.make_node("Relu", [out], [out + "_relu"], name=f"/{name}/Relu"))
            out += "_relu"
        return out

    x = conv("input", 3, 64, 7, 2, True, "conv1")
    nodes.append(
        helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    )
    x, cin = "pool", 64
    for li, cout in enumerate([64, 128, 256, 512], start=1):
        for bi in range(2):
            stride = 2 if li > 1 and bi == 0 else 1
            p = f"layer{li}.{bi}"
            y = conv(conv(x, cin, cout, 3, stride, True, f"{p}.conv1"), cout, cout, 3, 1, False, f"{p}.conv2")
            shortcut = (
                conv(x, cin, cout, 1, stride, False, f"{p}.downsample") if stride != 1 or cin != cout else x
            )
            nodes.append(helper.make_node("Add", [y, shortcut], [f"{p}_add"], name=f"/{p}/Add"))
            nodes.append(helper.make_node("Relu", [f"{p}_add"], [f"{p}_out"], name=f"/{p}/Relu"))
            x, cin = f"{p}_out", cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="/avgpool/GlobalAveragePool"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], axis=1, name="/Flatten"))
    head = np.random.default_rng(head_seed)  # the only thing that differs between versions
    inits.append(
        numpy_helper.from_array(
            head.standard_normal((num_classes, 512), np.float32) * np.float32(0.04), "fc.weight"
        )
    )
    inits.append(
        numpy_helper.from_array(head.standard_normal(num_classes, np.float32) * np.float32(0.01), "fc.bias")
    )
    nodes.append(
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1, name="/fc/Gemm")
    )
    graph = helper.make_graph(
        nodes,
        "resnet18",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgectl-tests"
    )
    model.ir_version = 8
    onnx.save(model, str(path))
    return sum(int(np.prod(t.dims)) for t in inits)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("resnet")
    out: dict[str, Path] = {}
    for version, seed in (("v1", 1), ("v2", 2)):
        fp32 = d / f"{version}.onnx"
        params = build_resnet18(fp32, seed)
        assert 11_500_000 < params < 11_800_000
        int8 = d / f"{version}-int8.onnx"
        quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
        out[f"fp32-{version}"], out[f"int8-{version}"] = fp32, int8
    return out


def _artifact(out: Path, model: Path, version: int, key: SigningKey) -> Artifact:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    (y,) = session.run(None, {"input": x})
    return build_artifact(
        out,
        name="resnet18",
        version=version,
        parent_version=version - 1 if version > 1 else None,
        files={"model.onnx": model},
        input_signature=[TensorSpec("input", "float32", ("batch", 3, 224, 224))],
        output_signature=[TensorSpec("logits", "float32", ("batch", 1000))],
        golden_inputs={"input": x},
        golden_outputs={"logits": y},
        recipe={"quantize": "int8-dynamic"},
        target_profile="cpu-x86",
        metrics={"size_bytes": model.stat().st_size},
        precision_map={},
        source_model_sha256="cd" * 32,
        signing_key=key,
        created="2024-05-01T12:00:00Z",
        golden_atol=1e-3,
        golden_rtol=1e-3,
    )


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_versions_share_chunks(
    tmp_path: Path,
    models: dict[str, Path],
    kind: str,
    signing_key: SigningKey,
    trust: TrustStore,
    capsys: pytest.CaptureFixture[str],
) -> None:
    v1 = _artifact(tmp_path / "v1", models[f"{kind}-v1"], 1, signing_key)
    v2 = _artifact(tmp_path / "v2", models[f"{kind}-v2"], 2, signing_key)
    m1, m2 = v1.manifest.file("model.onnx"), v2.manifest.file("model.onnx")
    assert m1.sha256 != m2.sha256
    shared, total = shared_bytes(m1.chunks, m2.chunks)
    share = shared / total
    with capsys.disabled():
        print(
            f"\n[{kind}] model.onnx {total / 1e6:.1f} MB, {len(m2.chunks)} chunks: v2 shares {share:.1%} of its bytes with v1"
        )
    assert share >= 0.90

    # The control plane holds both versions as chunks; a device holds v1's.
    cp = LocalBlobStore(tmp_path / "cp")
    for art in (v1, v2):
        for f in art.manifest.files:
            put_file_chunks(art.root / f.path, f, cp)
    device = LocalBlobStore(tmp_path / "device")
    for f in v1.manifest.files:
        reassemble_file(cp, f, tmp_path / "scratch" / f.path)
        put_file_chunks(tmp_path / "scratch" / f.path, f, device)

    todo = chunks_to_fetch(v2.manifest, set(device.iter_digests()))
    fetched = sum(c.size for c in todo)
    assert fetched <= 0.10 * total + v2.manifest.file("golden.npz").size
    for c in todo:
        device.put(cp.get(c.digest), expected=c.digest)
    assert chunks_to_fetch(v2.manifest, set(device.iter_digests())) == []

    # Stage v2 on the device from chunks, verify it whole, and smoke-test it in a real session.
    stage = tmp_path / "stage"
    for f in v2.manifest.files:
        reassemble_file(device, f, stage / f.path)
    (stage / "manifest.json").write_bytes(v2.manifest_bytes)
    (stage / "manifest.sig.json").write_bytes((v2.root / "manifest.sig.json").read_bytes())
    loaded = load_artifact(stage, trust)
    assert loaded.digest == v2.digest
    session = ort.InferenceSession(str(loaded.model_path), providers=["CPUExecutionProvider"])
    ins, outs = loaded.golden()
    (y,) = session.run(None, ins)
    ok, why = golden_matches(outs["logits"], y, loaded.manifest.golden)
    assert ok, why
