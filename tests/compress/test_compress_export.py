"""The export pass: dynamo first, TorchScript when dynamo cannot capture the model, parity always."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from edgectl.compress.errors import BadInputError, ExportError, ParityError
from edgectl.compress.graph import cpu_session
from edgectl.compress.passes.export import ExportConfig, export_module, input_names

torch = pytest.importorskip("torch")
nn = torch.nn


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(image)), 1))


class DataDependent(nn.Module):
    """Python control flow on a tensor's value: torch.export refuses it, TorchScript tracing records one branch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x) * 2
        return self.fc(x)


class Noisy(nn.Module):
    """Dropout left in training mode: the ONNX graph and torch disagree run to run."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc(x))


def test_dynamo_export_has_dynamic_batch_and_parity(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((3, 1, 6, 6)).astype(np.float32)
    report = export_module(Small().eval(), {"image": x}, tmp_path / "m.onnx")
    assert report.exporter == "dynamo" and report.dynamo_error is None
    assert report.min_cosine > 0.99999
    dim0 = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param  # symbolic: any batch size runs
    out = cpu_session(tmp_path / "m.onnx").run(None, {"image": np.concatenate([x, x, x])})[0]
    assert out.shape == (9, 3)


def test_falls_back_to_torchscript_when_dynamo_cannot_capture(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = np.abs(np.random.default_rng(0).standard_normal((2, 6))).astype(np.float32)  # sum > 0 branch
    module = DataDependent().eval()
    report = export_module(module, {"x": x}, tmp_path / "m.onnx")
    assert report.exporter == "torchscript"
    assert report.dynamo_error is not None  # the real reason dynamo gave up is kept for the manifest
    got = cpu_session(tmp_path / "m.onnx").run(None, {"x": x})[0]
    np.testing.assert_allclose(got, module(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_dynamo_only_reports_why(tmp_path: Path) -> None:
    x = np.ones((2, 6), dtype=np.float32)
    with pytest.raises(ExportError, match="dynamo export failed"):
        export_module(
            DataDependent().eval(), {"x": x}, tmp_path / "m.onnx", config=ExportConfig(exporter="dynamo")
        )


def test_parity_check_catches_a_model_that_differs(tmp_path: Path) -> None:
    x = np.ones((4, 6), dtype=np.float32)
    with pytest.raises(ParityError, match=r"differs from torch"):
        export_module(
            Noisy().train(), {"x": x}, tmp_path / "m.onnx", config=ExportConfig(exporter="torchscript")
        )


def test_missing_sample_for_a_forward_argument(tmp_path: Path) -> None:
    assert input_names(Small()) == ["image"]
    arrays = {"img": np.ones((2, 1, 6, 6), np.float32), "other": np.ones((2, 3), np.float32)}
    with pytest.raises(BadInputError, match="image"):
        export_module(Small().eval(), arrays, tmp_path / "m.onnx")
    # One input and one array cannot be ambiguous, whatever the array is called.
    assert export_module(Small().eval(), {"img": arrays["img"]}, tmp_path / "m.onnx").exporter == "dynamo"


def test_a_torch_export_pt2_file_is_exported_with_parity(tmp_path: Path) -> None:
    from edgectl.compress.passes.export import load_program

    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((3, 1, 6, 6)).astype(np.float32)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(
        Small().eval(), (torch.from_numpy(x),), dynamic_shapes={"image": {0: batch}}
    )
    torch.export.save(program, str(tmp_path / "small.pt2"))
    module, names, loaded = load_program(tmp_path / "small.pt2")
    assert names == ["image"]
    report = export_module(module, {"image": x}, tmp_path / "m.onnx", names=names, program=loaded)
    assert report.exporter == "dynamo" and report.min_cosine > 0.99999
    out = cpu_session(tmp_path / "m.onnx").run(None, {"image": np.concatenate([x, x])})[0]
    assert out.shape == (6, 3)


def test_a_file_that_is_not_a_pt2_is_refused(tmp_path: Path) -> None:
    from edgectl.compress.passes.export import load_program

    (tmp_path / "junk.pt2").write_bytes(b"not a zip archive")
    with pytest.raises(BadInputError, match=r"not a torch.export \.pt2 file"):
        load_program(tmp_path / "junk.pt2")


def test_a_pt2_exported_in_train_mode_is_refused_with_the_eval_hint(tmp_path: Path) -> None:
    # Its BatchNorm uses batch statistics and its Dropout drops: the program is not the served model.
    from edgectl.compress.passes.export import load_program

    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(),
                        nn.Linear(4 * 36, 3))  # fmt: skip
    x = (torch.randn(2, 1, 8, 8),)
    torch.export.save(torch.export.export(net.train(), x), str(tmp_path / "train.pt2"))
    with pytest.raises(BadInputError, match=r"exported in train\(\) mode: its BatchNorm, Dropout") as caught:
        load_program(tmp_path / "train.pt2")
    assert "model.eval()" in (caught.value.hint or "")
    torch.export.save(torch.export.export(net.eval(), x), str(tmp_path / "eval.pt2"))
    assert load_program(tmp_path / "eval.pt2")[1] == ["input"]


class PaddedEncoder(nn.Module):
    """Token ids and a padding mask through nn.TransformerEncoder, as a sentence encoder is written."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)


def test_an_encoder_with_a_padding_mask_exports_with_parity(tmp_path: Path) -> None:
    # In eval mode torch's fast path answers 0 at padded tokens (nested tensors); the graph computes
    # the plain path's values there, so parity failed ("differs from torch by up to 3.89").
    rng = np.random.default_rng(0)
    mask = np.ones((4, 10), np.float32)
    mask[:, 6:] = 0
    arrays = {"input_ids": rng.integers(0, 50, (4, 10)).astype(np.int64), "attention_mask": mask}
    report = export_module(
        PaddedEncoder().eval(), arrays, tmp_path / "enc.onnx", config=ExportConfig(exporter="torchscript")
    )
    assert report.min_cosine > 0.999
    assert torch.backends.mha.get_fastpath_enabled()  # the user's setting is restored


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_dict_of_outputs_names_the_onnx_outputs_by_its_keys(tmp_path: Path, exporter: str) -> None:
    """A detector returning {"logits": ..., "box": ...} got outputs output_0, output_1: the artifact's
    outputs no longer said which head was which."""

    class Heads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cls, self.box = torch.nn.Linear(8, 3), torch.nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.cls(x), "box": self.box(x)}

    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    out = tmp_path / "m.onnx"
    export_module(Heads().eval(), {"x": x}, out, config=ExportConfig(exporter=exporter))
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["logits", "box"]
    logits, box = cpu_session(out, threads=1).run(None, {"x": x})
    assert logits.shape == (4, 3) and box.shape == (4, 4)
