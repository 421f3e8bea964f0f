"""Tiny models and data for the compress tests: built in well under a second each, real ORT sessions."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from edgectl.compress.data import SampleSet
from edgectl.compress.evaluate import Latency

torch = pytest.importorskip("torch")
nn = torch.nn


class TinyCNN(nn.Module):
    """Conv-BN-ReLU x2, MaxPool, Flatten, Linear: the chain every pass must handle."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(image)))
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(torch.flatten(x, 1))


class ResidualCNN(nn.Module):
    """A residual add, a depthwise conv and global pooling: the dependency cases of pruning."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.a = nn.Conv2d(32, 32, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.b = nn.Conv2d(32, 32, 1)
        self.head = nn.Conv2d(32, 48, 1)
        self.fc = nn.Linear(48, 5)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(image))
        y = self.b(torch.relu(self.dw(torch.relu(self.a(x)))))
        x = torch.relu(x + y)
        x = torch.relu(self.head(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics so folding them is observable."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def export_ts(module: nn.Module, example: np.ndarray, path: Path, *, keep_bn: bool = False) -> Path:
    """TorchScript export with a dynamic batch (fast; dynamo is exercised in test_compress_export)."""
    mode = torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (torch.from_numpy(example),),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            training=mode,
            do_constant_folding=not keep_bn,
        )
    return path


@pytest.fixture(autouse=True)
def _config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep the default signing key of every test in its own temporary config folder."""
    monkeypatch.setenv("EDGECTL_CONFIG_DIR", str(tmp_path / "config"))
    yield


@pytest.fixture(scope="session")
def images() -> np.ndarray:
    return np.random.default_rng(0).random((48, 1, 8, 8), dtype=np.float32)


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory, images: np.ndarray) -> Path:
    torch.manual_seed(0)
    return export_ts(randomize_bn(TinyCNN()), images[:2], tmp_path_factory.mktemp("m") / "tiny.onnx")


@pytest.fixture(scope="session")
def tiny_bn_onnx(tmp_path_factory: pytest.TempPathFactory, images: np.ndarray) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "tiny_bn.onnx"
    return export_ts(randomize_bn(TinyCNN()), images[:2], path, keep_bn=True)


@pytest.fixture(scope="session")
def residual_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    x = np.random.default_rng(1).random((2, 3, 16, 16), dtype=np.float32)
    return export_ts(ResidualCNN(), x, tmp_path_factory.mktemp("m") / "residual.onnx")


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The packaged digits CNN, trained once per session, as ONNX, weights, calibration and eval files."""
    from edgectl.compress.digits import digits_data, train_digits_cnn, write_npz_files

    model = train_digits_cnn()
    root = tmp_path_factory.mktemp("digits")
    files = write_npz_files(root, calib_samples=128)
    torch.save(model.state_dict(), root / "weights.pt")
    x_train = digits_data()[0]
    return {
        "onnx": export_ts(model, x_train[:2], root / "digits.onnx"),
        "calib": files.calib,
        "eval": files.eval,
        "weights": root / "weights.pt",
        "root": root,
        "model": model,
    }


def outlier_mlp(path: Path) -> SampleSet:
    """Write a two-MatMul MLP to ``path``; return samples whose channel 3 is a 60x outlier."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32) * 0.2, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32) * 0.2, "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
        [w1, w2],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = rng.standard_normal((64, 32)).astype(np.float32)
    x[:, 3] *= 60.0  # one outlier channel, as transformer activations have
    return SampleSet({"x": x}, None, "t")


def masked_attention(path: Path, *, dim: int = 32, seed: int = 0) -> Path:
    """Write a one-head self-attention block with an additive -inf padding mask, as BERT exports have.

    Inputs ``x`` [n, t, dim] (token vectors) and ``mask`` [n, t] (1 = token, 0 = padding); output
    ``y`` [n, t, dim]. The mask becomes ``Where(mask == 0, -inf, 0)`` added to the scores.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def weight(name: str) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal((dim, dim)) * 0.2).astype(np.float32), name)

    consts = [
        weight("wq"), weight("wk"), weight("wv"), weight("wo"),
        numpy_helper.from_array(np.array(-np.inf, np.float32), "neg_inf"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(0, np.int64), "zero_i"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array(1 / np.sqrt(dim), np.float32), "scale"),
    ]  # fmt: skip
    node = helper.make_node
    nodes = [
        node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
        node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="k_t"),
        node("MatMul", ["q", "kt"], ["s0"], name="scores"),
        node("Mul", ["s0", "scale"], ["s1"], name="scale_scores"),
        node("Equal", ["mask", "zero_i"], ["pad"], name="is_pad"),
        node("Where", ["pad", "neg_inf", "zero"], ["bias0"], name="mask_bias"),
        node("Unsqueeze", ["bias0", "axis1"], ["bias"], name="mask_unsqueeze"),
        node("Add", ["s1", "bias"], ["s2"], name="apply_mask"),
        node("Softmax", ["s2"], ["p"], axis=-1, name="softmax"),
        node("MatMul", ["p", "v"], ["c"], name="context"),
        node("MatMul", ["c", "wo"], ["o"], name="o_proj"),
        node("Add", ["o", "x"], ["y"], name="residual"),
    ]
    graph = helper.make_graph(
        nodes, "masked_attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "t", dim]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["n", "t"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "t", dim])],
        consts,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def token_samples(
    count: int, *, seed: int, scale: float = 1.0, tokens: int = 12, dim: int = 32
) -> dict[str, np.ndarray]:
    """Token vectors and a padding mask (every sample has 3..tokens real tokens) for ``masked_attention``."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((count, tokens, dim)) * scale).astype(np.float32)
    lengths = rng.integers(3, tokens + 1, size=count)
    mask = (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.int64)
    return {"x": x, "mask": mask}


INT8_OPS = ("QLinear", "Integer", "DynamicQuantize", "QuantizeLinear")


def cost_model(models: Sequence[Path], feed: dict[str, np.ndarray]) -> list[Latency]:
    """A deterministic stand-in for timing: a model with int8 kernels takes half the float's time.

    Unit tests never assert measured speed (a shared host makes it noise); they inject this instead.
    """
    import onnx

    out = []
    for path in models:
        ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
        ms = 0.5 if any(k in op for op in ops for k in INT8_OPS) else 1.0
        out.append(Latency(ms, ms, 1))
    return out
