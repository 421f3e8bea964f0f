"""The peers ``edgectl compress`` is timed against: ORT's quantizer as shipped and as a careful user
sets it for x86, and NNCF's post-training quantization (the ``bench`` extra).

NNCF's telemetry (``openvino-telemetry``, which would write a client id under ``~/intel`` and send
events) is switched off before NNCF is imported: ``NNCF_CI`` makes NNCF use a stub, and ``CI`` makes
the telemetry package decline before it touches the home folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx

from edgectl.compress.data import SampleSet


def _reader(calib: SampleSet) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.it = iter(calib.batches(8))

        def get_next(self) -> Any:
            return next(self.it, None)

    return Reader()


def ort_default(src: Path, dst: Path, mode: str, calib: SampleSet | None) -> None:
    """What a user gets from ORT with no options: plain quantize_dynamic / quantize_static."""
    from onnxruntime.quantization import quantize_dynamic, quantize_static

    if mode == "dynamic":
        quantize_dynamic(str(src), str(dst))
        return
    assert calib is not None
    quantize_static(str(src), str(dst), _reader(calib))


def ort_by_hand(src: Path, dst: Path, calib: SampleSet) -> None:
    """ORT static int8 as a careful user configures it for x86: QOperator, U8S8, per-channel weights."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(str(src), str(dst), _reader(calib), quant_format=QuantFormat.QOperator, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip


def nncf_unavailable() -> str | None:
    """Why NNCF cannot be a peer here (not installed, or fails to import), or None when it can."""
    os.environ["NNCF_CI"] = "1"
    ci = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        import nncf  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install's own error
        return f"nncf not importable ({type(exc).__name__}: {exc}); `pip install -e .[bench]` installs it"
    finally:
        if ci is None:
            del os.environ["CI"]
        else:
            os.environ["CI"] = ci
    return None


def nncf_ptq(src: Path, dst: Path, calib: SampleSet) -> None:
    """NNCF post-training quantization of the ONNX model for CPU, as its documentation shows it."""
    if (why := nncf_unavailable()) is not None:
        raise RuntimeError(why)
    import nncf

    items = [dict(batch) for batch in calib.batches(1)]
    quantized = nncf.quantize(onnx.load(str(src)), nncf.Dataset(items), target_device=nncf.TargetDevice.CPU,
                              subset_size=len(items))  # fmt: skip
    onnx.save(quantized, str(dst))
