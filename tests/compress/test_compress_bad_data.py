"""Data no comparison can be made on is refused before any artifact: NaN samples, NaN float outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.compress.test_compress_cli import invoke
from tests.compress.test_compress_shapes import _mlp


def test_nan_calibration_samples_are_refused_not_quantized_into_a_nan_model(tmp_path: Path) -> None:
    # Without --eval the calibration samples are scored too: NaN outputs "matched" and a model with NaN
    # scales was signed and written.
    x = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    x[3, 5] = np.nan
    data = tmp_path / "calib.npz"
    np.savez(data, x=x)
    code, text = invoke(
        _mlp(tmp_path / "m.onnx", "n"), "--profile", "x86-cpu-vnni", "--calib", data, "-o", tmp_path / "a"
    )
    assert code == 2, text
    assert "calibration file calib.npz: array 'x' holds NaN in 1 of 16 samples" in text
    assert not (tmp_path / "a").exists()


def test_an_empty_sample_file_says_so(tmp_path: Path) -> None:
    data = tmp_path / "empty.npz"
    np.savez(data, x=np.zeros((0, 16), np.float32))
    code, text = invoke(
        _mlp(tmp_path / "m.onnx", "n"), "--profile", "x86-cpu-vnni", "--eval", data, "-o", tmp_path / "a"
    )
    assert code == 2, text
    assert "evaluation file empty.npz holds no samples" in text


def test_a_float_model_that_outputs_nan_on_the_samples_is_refused(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["l"]), helper.make_node("MatMul", ["l", "w"], ["y"])], "log",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [w],
    )  # fmt: skip
    model = tmp_path / "log.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    data = tmp_path / "d.npz"
    np.savez(data, x=-np.ones((8, 8), np.float32))  # log of a negative number
    code, text = invoke(model, "--profile", "x86-cpu-vnni", "--eval", data, "-o", tmp_path / "a")
    assert code == 2, text
    assert "the float model outputs NaN on the evaluation file d.npz" in text
    assert not (tmp_path / "a").exists()


def test_a_version_the_manifest_refuses_is_refused_before_any_work(tmp_path: Path) -> None:
    # It ran the whole search, then failed writing the manifest with exit 4 (the quality gate's code).
    code, text = invoke(
        _mlp(tmp_path / "m.onnx", "n"), "--profile", "x86-cpu-vnni", "--version", "0", "-o", tmp_path / "a"
    )
    assert code == 2, text
    assert "--version must be a positive integer, got 0" in text and "compress [" not in text


def test_train_without_prune_is_refused_not_ignored(tmp_path: Path) -> None:
    data = tmp_path / "t.npz"
    np.savez(data, x=np.zeros((8, 16), np.float32))
    code, text = invoke(
        _mlp(tmp_path / "m.onnx", "n"), "--profile", "x86-cpu-vnni", "--train", data, "-o", tmp_path / "a"
    )
    assert code == 2, text
    assert "--train recovers accuracy after pruning, and nothing is pruned" in text


def test_a_factory_that_raises_or_is_not_a_function_is_named_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 16), np.float32))
    code, text = invoke("tests.compress.model_factories:needs_a_config", "--eval", data, "-o", tmp_path / "a")
    assert code == 2, text  # a traceback (exit 1) before
    assert (
        "tests.compress.model_factories:needs_a_config() raised RuntimeError: factory needs a config" in text
    )
    code, text = invoke("tests.compress.model_factories:NOT_A_FACTORY", "--eval", data, "-o", tmp_path / "b")
    assert code == 2 and "NOT_A_FACTORY is a int, not a function" in text, text
    # Named before the missing data it would otherwise be asked for.
    code, text = invoke("tests.compress.model_factories:missing", "-o", tmp_path / "c")
    assert code == 2 and "cannot import tests.compress.model_factories:missing" in text, text


def test_a_state_dict_for_a_model_file_is_refused_not_ignored(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not used")
    code, text = invoke(_mlp(tmp_path / "m.onnx", "n"), "--state-dict", weights, "-o", tmp_path / "a")
    assert code == 2, text
    assert "--state-dict loads weights into a package.module:factory model" in text


def test_a_quantize_mode_the_target_cannot_run_is_refused_before_the_model_is_loaded(tmp_path: Path) -> None:
    # The factory would raise if called: the refusal must come first (it came after export and clean-up).
    factory = "tests.compress.model_factories:needs_a_config"
    code, text = invoke(factory, "--quantize", "int8-static", "-o", tmp_path / "a")
    assert code == 2 and "--quantize int8-static needs calibration data" in text, text
    code, text = invoke(factory, "--quantize", "fp16", "--profile", "x86-cpu-vnni", "-o", tmp_path / "b")
    assert code == 2 and "profile x86-cpu-vnni has no execution provider with fp16 kernels" in text, text


@pytest.mark.parametrize(
    ("prune", "message"),
    [
        ("{ratio: 1.5}", "prune: ratio must be a fraction in [0, 1), got 1.5"),  # exit 1 after the export
        ("{ratio: 0.5, ratios: [0.5, -0.25]}", "prune: ratio must be a fraction in [0, 1), got -0.25"),
        ("{ratio: 0.5, round_to: 0}", "finetune_epochs and round_to must be at least 1"),  # ZeroDivisionError
        ("{ratio: 0.5, finetune_epochs: -1}", "got -1, 8 and 600.0"),  # ran no epoch, said nothing
    ],
)
def test_a_recipes_prune_values_out_of_range_are_refused_before_the_model_is_loaded(
    tmp_path: Path, prune: str, message: str
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"passes:\n  - prune: {prune}\n")
    # The factory raises if it is called: the refusal must come first.
    code, text = invoke(
        "tests.compress.model_factories:needs_a_config", "--recipe", recipe, "-o", tmp_path / "a"
    )
    assert code == 2, text
    assert message in " ".join(text.split()) and "needs a config" not in text


def _npy(path: Path) -> None:
    with path.open("wb") as f:
        np.save(f, np.zeros((4, 16), np.float32))  # np.save, not np.savez: one bare array


@pytest.mark.parametrize(
    ("write", "message"),
    [
        # np.load handed back the array and `with` on it was a TypeError traceback (exit 1).
        (_npy, "is one .npy array, not an .npz archive of named arrays"),
        # np.load raised EOFError, which click reports as "Aborted." with exit 1.
        (lambda p: p.write_bytes(b""), "is not a numpy .npz archive (No data left in file)"),
        # Labels saved as Python strings: it said the file "is not a numpy .npz archive".
        (
            lambda p: np.savez(p, x=np.zeros((2, 16), np.float32), labels=np.array(["cat", 1], dtype=object)),
            "array 'labels' cannot be read without unpickling it",
        ),
    ],
)
def test_a_data_file_that_is_not_an_npz_of_numbers_says_what_it_is(
    tmp_path: Path, write, message: str
) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "d.npz"
    write(data)
    code, text = invoke(
        _mlp(tmp_path / "m.onnx", "n"), "--profile", "x86-cpu-vnni", "--eval", data, "-o", tmp_path / "a"
    )
    assert code == 2, text
    assert message in " ".join(text.split()) and "Traceback" not in text
    assert not (tmp_path / "a").exists()


def test_finetune_epochs_without_train_is_refused_not_ignored(tmp_path: Path) -> None:
    code, text = invoke(_mlp(tmp_path / "m.onnx", "n"), "--profile", "x86-cpu-vnni", "--prune", "0.5",
                        "--finetune-epochs", "10", "-o", tmp_path / "a")  # fmt: skip
    assert code == 2, text
    assert (
        "--finetune-epochs sets how long --train recovers a pruned model, and no --train was given"
        in " ".join(text.split())
    )
    assert "compress [" not in text  # before any work


def _token_model(path: Path, dtype: int = TensorProto.INT64) -> Path:
    """Embedding lookup + a linear layer: token ids [n, t] -> vectors [n, t, 16]."""
    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.standard_normal((100, 16)).astype(np.float32), "emb")
    w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["e"], name="lookup"),
         helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")],
        "tokens",
        [helper.make_tensor_value_info("ids", dtype, ["n", "t"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "t", 16])],
        [emb, w],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_int32_token_ids_for_an_int64_input_are_read_as_the_same_ids(tmp_path: Path) -> None:
    """A tokenizer's ids saved as int32 (numpy's default int on Windows) were refused for an int64
    input; every int32 is an int64, so they are converted and the run says so."""
    from edgectl.compress.data import read_samples
    from edgectl.compress.evaluate import Evaluator
    from edgectl.compress.graph import signature

    model = _token_model(tmp_path / "tok.onnx")
    ids = np.random.default_rng(1).integers(0, 100, (24, 8))
    np.savez(tmp_path / "ids32.npz", ids=ids.astype(np.int32))
    np.savez(tmp_path / "ids64.npz", ids=ids.astype(np.int64))
    inputs = signature(onnx.load(str(model)))[0]
    read = read_samples(tmp_path / "ids32.npz", inputs, what="evaluation file")
    assert read.inputs["ids"].dtype == np.int64 and (read.inputs["ids"] == ids).all()
    assert "read array 'ids' as int64" in read.note
    ev = Evaluator(model, read_samples(tmp_path / "ids64.npz", inputs, what="evaluation file"))
    assert ev.quality(model).score == 1.0
    code, text = invoke(
        model, "--quantize", "int8-dynamic", "--eval", tmp_path / "ids32.npz", "-o", tmp_path / "a"
    )
    assert code == 0, text


def test_ids_that_do_not_fit_the_inputs_integer_type_are_still_refused(tmp_path: Path) -> None:
    from edgectl.compress.data import read_samples
    from edgectl.compress.errors import BadInputError
    from edgectl.compress.graph import signature

    model = _token_model(tmp_path / "tok32.onnx", TensorProto.INT32)
    np.savez(tmp_path / "big.npz", ids=np.full((4, 8), 2**40, np.int64))
    with pytest.raises(BadInputError, match="is int64 but the model input is int32"):
        read_samples(tmp_path / "big.npz", signature(onnx.load(str(model)))[0], what="evaluation file")
    np.savez(tmp_path / "neg.npz", ids=np.full((4, 8), -1, np.int64))
    with pytest.raises(BadInputError, match="is int64 but the model input is uint8"):
        u8 = _token_model(tmp_path / "u8.onnx", TensorProto.UINT8)
        read_samples(tmp_path / "neg.npz", signature(onnx.load(str(u8)))[0], what="evaluation file")


def test_a_model_onnx_runtime_cannot_load_is_refused_with_exit_2_not_a_traceback(tmp_path: Path) -> None:
    """torch's dynamo exporter asked for opset 17 converts down from 18 and can leave a Split with
    opset 18's ``num_outputs`` (a user's GPT-2 export): ORT refuses the graph, and compress crashed."""
    graph = helper.make_graph(
        [helper.make_node("Split", ["x"], ["a", "b"], axis=1, num_outputs=2, name="split"),
         helper.make_node("Add", ["a", "b"], ["y"], name="add")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )  # fmt: skip
    model = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    np.savez(tmp_path / "e.npz", x=np.zeros((4, 8), np.float32))
    code, text = invoke(
        model, "--quantize", "int8-dynamic", "--eval", tmp_path / "e.npz", "-o", tmp_path / "a"
    )
    assert code == 2, text
    assert "ONNX Runtime cannot load the float model" in text and "opset_version=18" in text
    assert "Traceback" not in text and not (tmp_path / "a").exists()
