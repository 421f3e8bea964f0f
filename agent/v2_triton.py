"""Triton's model-repository views of what the agent serves: ModelConfig, ModelStatistics and
RepositoryIndex as protobuf messages, built once here and rendered by both front-ends (gRPC
returns them, HTTP turns them into Triton's JSON with ``message_to_triton_dict``).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor, json_format
from google.protobuf.message import Message

from edgectl.agent.batching import BatchSettings
from edgectl.agent.codecs import v2_datatype
from edgectl.agent.errors import InvalidInputError, NotServedError
from edgectl.agent.model_stats import Duration
from edgectl.agent.serving import ModelRegistry, ServedModel
from edgectl.protos.inference import grpc_predict_v2_pb2 as pb
from edgectl.protos.inference import model_config_pb2 as mc

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


# Triton's extensions the agent answers "not served" (gRPC UNIMPLEMENTED, HTTP 501, as Triton
# answers what it does not support), each with what to do instead.
_NOT_SERVED = {
    "model_repository": (
        "loading and unloading models",
        "the control plane decides what it runs (deploy with a rollout, or --serve-only another --model-dir)",
    ),
    "system_shared_memory": (
        "system shared memory",
        "send the tensors in the request (raw contents over gRPC, binary data over HTTP)",
    ),
    "cuda_shared_memory": (
        "CUDA shared memory",
        "send the tensors in the request (raw contents over gRPC, binary data over HTTP)",
    ),
    "trace": ("tracing", "the model statistics and the agent's --metrics endpoint show where time goes"),
    "logging": ("changing log settings", "start the agent with --log-level"),
}
# What the server metadata lists: Triton's names of the extensions served here.
EXTENSIONS = ("binary_tensor_data", "model_configuration", "statistics")


# A tensor parameter of Triton's shared-memory extension: the tensor's bytes are in that region.
SHARED_MEMORY_REGION = "shared_memory_region"


def in_shared_memory(kind: str, name: str, region: object) -> InvalidInputError:
    """The refusal of a request whose input or output names a shared-memory region: serving it from
    the request body would leave the caller reading a region nobody wrote."""
    return InvalidInputError(
        f"{kind} {name!r} names shared memory region {region!r}, and shared memory is not served by "
        "the edgectl agent: send the tensors in the request and read the outputs from the response"
    )


def not_served(extension: str) -> NotServedError:
    """The error for a call of a Triton extension the agent does not serve."""
    what, instead = _NOT_SERVED[extension]
    return NotServedError(f"{what} is not served by the edgectl agent: {instead}")


def _data_type(dtype: str) -> mc.DataType.ValueType:
    name = v2_datatype(dtype)
    return mc.DataType.Value("TYPE_STRING" if name == "BYTES" else f"TYPE_{name}")


def model_metadata(registry: ModelRegistry, served: ServedModel) -> pb.ModelMetadataResponse:
    """V2 model metadata: every live version of the name, tensors with the batch dimension as -1."""
    model = served.model
    tm = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=[m.version for m in registry.versions(model.name)],
        platform=PLATFORM,
        inputs=[tm(name=t.name, datatype=v2_datatype(t.dtype), shape=t.wire_shape()) for t in model.inputs],
        outputs=[tm(name=t.name, datatype=v2_datatype(t.dtype), shape=t.wire_shape()) for t in model.outputs],
    )


def model_config(served: ServedModel, settings: BatchSettings) -> mc.ModelConfig:
    """Triton's ModelConfig of one version: with a batch dimension, ``max_batch_size`` is the most
    rows a request may carry, the dynamic batcher's preferred size the micro-batch limit, and dims
    leave the batch dimension out, as Triton's do."""
    model = served.model
    batched = model.batchable
    skip = 1 if batched else 0
    kind = (
        mc.ModelInstanceGroup.KIND_GPU if model.provider in _GPU_PROVIDERS else mc.ModelInstanceGroup.KIND_CPU
    )
    config = mc.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=served.max_batch_size,
        input=[
            mc.ModelInput(name=t.name, data_type=_data_type(t.dtype), dims=t.wire_shape()[skip:])
            for t in model.inputs
        ],
        output=[
            mc.ModelOutput(name=t.name, data_type=_data_type(t.dtype), dims=t.wire_shape()[skip:])
            for t in model.outputs
        ],
        instance_group=[mc.ModelInstanceGroup(name=model.name, kind=kind, count=1)],
        default_model_filename="model.onnx",
    )
    if batched and settings.max_batch_size > 1:
        config.dynamic_batching.max_queue_delay_microseconds = int(settings.max_queue_delay_s * 1e6)
        config.dynamic_batching.preferred_batch_size.append(settings.max_batch_size)
    return config


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics(
    registry: ModelRegistry, name: str = "", version: str = ""
) -> pb.ModelStatisticsResponse:
    """Statistics of every live version (or of ``name``/``version``); the caller checks they exist."""
    out = pb.ModelStatisticsResponse()
    for served in registry.all_versions():
        if (name and served.model.name != name) or (version and served.version != version):
            continue
        snap = served.stats.snapshot()
        out.model_stats.append(
            pb.ModelStatistics(
                name=served.model.name,
                version=served.version,
                last_inference=snap.last_inference_ms,
                inference_count=snap.inference_count,
                execution_count=snap.execution_count,
                inference_stats=pb.InferStatistics(
                    success=_duration(snap.success),
                    fail=_duration(snap.fail),
                    queue=_duration(snap.queue),
                    compute_input=_duration(snap.compute_input),
                    compute_infer=_duration(snap.compute_infer),
                    compute_output=_duration(snap.compute_output),
                    cache_hit=pb.StatisticDuration(),
                    cache_miss=pb.StatisticDuration(),
                ),
                batch_stats=[
                    pb.InferBatchStatistics(
                        batch_size=b.batch_size,
                        compute_input=pb.StatisticDuration(),
                        compute_infer=_duration(b.compute_infer),
                        compute_output=pb.StatisticDuration(),
                    )
                    for b in snap.batches
                ],
            )
        )
    return out


def repository_index(registry: ModelRegistry, ready_only: bool = False) -> pb.RepositoryIndexResponse:
    """Every live version (READY) and, unless ``ready_only``, the versions a swap replaced that are
    still finishing their queued requests (UNAVAILABLE, with the reason)."""
    index = pb.RepositoryIndexResponse.ModelIndex
    out = pb.RepositoryIndexResponse(
        models=[index(name=m.model.name, version=m.version, state="READY") for m in registry.all_versions()]
    )
    if not ready_only:
        live = {(m.model.name, m.version) for m in registry.all_versions()}
        for m in registry.draining():
            if (m.model.name, m.version) not in live:
                reason = "replaced by a newer version; finishing the requests it had queued"
                out.models.append(
                    index(name=m.model.name, version=m.version, state="UNAVAILABLE", reason=reason)
                )
    return out


_INTS = {descriptor.FieldDescriptor.TYPE_INT64, descriptor.FieldDescriptor.TYPE_UINT64}


def _fix_ints(message_desc: Any, value: dict[str, Any]) -> dict[str, Any]:
    # Protobuf's JSON writes 64-bit integers as strings; Triton's HTTP API writes numbers.
    for field in message_desc.fields:
        if field.name not in value:
            continue
        item = value[field.name]
        if field.message_type is not None and not field.message_type.GetOptions().map_entry:
            value[field.name] = (
                [_fix_ints(field.message_type, v) for v in item]
                if isinstance(item, list)
                else _fix_ints(field.message_type, item)
            )
        elif field.type in _INTS:
            value[field.name] = [int(v) for v in item] if isinstance(item, list) else int(item)
    return value


def message_to_triton_dict(message: Message) -> dict[str, Any]:
    """A message as Triton's HTTP API writes it: proto field names, enums by name, integers as numbers."""
    raw = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _fix_ints(message.DESCRIPTOR, raw)
