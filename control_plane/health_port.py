"""A plaintext gRPC port that serves the health service alone, for kubelet's gRPC probes.

kubelet probes speak plaintext gRPC, and the API listeners speak TLS only; this port answers
``grpc.health.v1.Health`` with the replica's own health status and nothing else, so exposing
it inside the pod network reveals no fleet data.
"""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from edgectl.control_plane.errors import ControlPlaneError


def serve_health(servicer: health.HealthServicer, host: str, port: int) -> tuple[grpc.Server, int]:
    """Start a plaintext server for ``servicer`` on host:port (0: a free port); returns it and its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        raise ControlPlaneError(f"cannot listen for health probes on {host}:{port}: {exc}") from exc
    server.start()
    return server, bound
