"""Write the compressed model as a signed edgectl artifact, atomically: all of it or nothing.

The bundle is built in a hidden sibling folder of ``out_dir`` and renamed into place only when
complete, so a failed or interrupted run never leaves a half-written artifact behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgectl.artifact import Artifact, DriftSummary, SigningKey, TensorSpec, TrtEngine, build_artifact
from edgectl.compress.errors import BadInputError
from edgectl.compress.graph import INT8_COMPUTE_OPS, cpu_session

# Nodes that carry the weights and FLOPs; the precision map lists these (quantized forms included).
_COMPUTE = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "Attention", "LSTM", "GRU"}
_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")


def check_out_dir(out_dir: Path) -> None:
    """Refuse an output folder that already holds something, before any work is done."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise BadInputError(
            f"output {out_dir} already exists and is not empty", hint="choose a new -o folder"
        )


def check_versions(version: int, parent_version: int | None) -> None:
    """Refuse a version the manifest would refuse, before any work is done (it failed at the end)."""
    from edgectl.artifact.errors import ManifestError
    from edgectl.artifact.manifest import check_version

    try:
        check_version(version, "--version")
        if parent_version is not None:
            check_version(parent_version, "the parent version")
    except ManifestError as exc:
        raise BadInputError(str(exc), hint="artifact versions count up from 1, e.g. --version 2") from exc


def artifact_name(raw: str) -> str:
    """A valid artifact name from a user's name or a model file stem."""
    name = _NAME_RE.sub("-", raw).strip("-._")[:128]
    return name or "model"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def precision_map(model_path: Path) -> dict[str, str]:
    """Per compute node: ``int8`` when it runs on quantized inputs, ``fp16`` or ``fp32`` otherwise."""
    model = onnx.load(str(model_path), load_external_data=False)
    produced_by = {o: n.op_type for n in model.graph.node for o in n.output}
    half = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    out: dict[str, str] = {}
    for node in model.graph.node:
        base = node.op_type
        if base in INT8_COMPUTE_OPS:
            out[node.name.removesuffix("_quant")] = "int8"
        elif base in _COMPUTE:
            fed = [produced_by.get(i) for i in node.input]
            if "DequantizeLinear" in fed:
                out[node.name] = "int8"
            elif any(i in half for i in node.input) or ("Cast" in fed and half):
                out[node.name] = "fp16"
            else:
                out[node.name] = "fp32"
    return out


def write_artifact(
    out_dir: Path,
    *,
    model: Path,
    name: str,
    version: int,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    golden_feed: Mapping[str, np.ndarray],
    recipe: Mapping[str, Any],
    profile: str,
    metrics: Mapping[str, Any],
    source_sha256: str,
    quantized: bool,
    files: Mapping[str, Path] | None = None,
    engines: Sequence[TrtEngine] = (),
    parent_version: int | None = None,
    sign_key: Path | None = None,
    input_summary: DriftSummary | None = None,
) -> Artifact:
    """Build and sign the bundle for ``model`` (plus ``files``, e.g. engines) into ``out_dir``.

    ``out_dir`` is created and must not exist non-empty.
    """
    check_out_dir(out_dir)
    key = SigningKey.load(sign_key) if sign_key is not None else None
    golden_out = cpu_session(model, threads=0).run(None, dict(golden_feed))
    bundle = {"model.onnx": model, **(files or {})}
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        built = build_artifact(
            staging,
            name=name,
            version=version,
            files=bundle,
            input_signature=list(inputs),
            output_signature=list(outputs),
            golden_inputs=dict(golden_feed),
            golden_outputs={o.name: np.asarray(v) for o, v in zip(outputs, golden_out, strict=True)},
            recipe=recipe,
            target_profile=profile,
            metrics=metrics,
            precision_map=precision_map(model),
            source_model_sha256=source_sha256,
            parent_version=parent_version,
            signing_key=key,
            trt_engines=list(engines),
            engine_build_on_device=not engines,
            # Same model on another CPU can round int8 differently; the outputs must still agree closely.
            golden_min_cosine=0.999 if quantized else None,
            input_summary=input_summary,
        )
        if out_dir.exists():
            out_dir.rmdir()  # checked empty above
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Artifact(out_dir, built.manifest, built.manifest_bytes)
