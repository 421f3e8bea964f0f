"""`edgectl infer`: one KServe V2 request to any V2 server (an agent, Triton, KServe), outputs printed."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edgectl.addresses import parse_host_port
from edgectl.errors import UsageError


def infer(
    server: str = typer.Option(..., help="KServe V2 gRPC endpoint HOST:PORT"),
    model: str = typer.Option(..., help="model name"),
    input_file: Path = typer.Option(..., "--input", help=".npz with one array per model input"),
    json_out: bool = typer.Option(False, "--json", help="print outputs as JSON"),
    timeout: float = typer.Option(30.0, help="seconds to wait for the answer"),
) -> None:
    """Send one inference request over KServe V2 gRPC and print the outputs.

    Example: edgectl infer --server 127.0.0.1:8001 --model digits --input x.npz
    """
    import grpc
    import numpy as np

    from edgectl.agent.codecs import decode_response, encode_request, response_parameters
    from edgectl.client import RemoteError
    from edgectl.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc

    target = str(parse_host_port(server, what="--server"))
    try:
        with np.load(input_file, allow_pickle=False) as npz:
            inputs = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"cannot read {input_file}: {exc}", hint="pass an .npz written by numpy.savez"
        ) from exc
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            response = stub.ModelInfer(encode_request(model, inputs), timeout=timeout)
        except grpc.RpcError as exc:
            # The server's status picks the exit code, as for the control plane: a model not served
            # there is 6, an unreachable server 9, a wrong input 2 (docs/cli.md, "Exit codes").
            raise RemoteError(exc.code(), f"{server}: {exc.details()}") from exc
    outputs = decode_response(response)
    params = response_parameters(response)
    if json_out:
        doc = {
            "model": response.model_name,
            "version": response.model_version,
            "served_by": params.get("served_by", ""),
            "outputs": {
                k: {"shape": list(v.shape), "dtype": str(v.dtype), "data": v.tolist()}
                for k, v in outputs.items()
            },
        }
        print(json.dumps(doc))
        return
    print(
        f"model {response.model_name} version {response.model_version} served by {params.get('served_by', '?')}"
    )
    for name, value in outputs.items():
        print(f"{name} {value.dtype}{list(value.shape)}:\n{value}")
