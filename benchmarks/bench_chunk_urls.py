"""Control-plane CPU per device fetch: presigned chunk URLs (S3) vs the bytes through gRPC Download.

Starts a throwaway mosquitto, the control plane as its own process (its CPU read from /proc), and
for each blob store pushes one artifact of each size, then plays N devices' fetches against it the
way the agent's transports make them: ``Get`` (the manifest) and then either ``GetChunkUrls`` in the
presigned transport's batches (``s3``: moto's S3 server) or ``Download`` in the fetcher's batches
of 32 chunks (``local``: the local-disk store). The bytes of the URLs' GETs never reach the
control plane, so they are not played here (``bench_fleet.py --blobs s3`` moves them for real).

    python benchmarks/bench_chunk_urls.py                 # 5 and 50 MB, 100 fetches (s3), 20 (local)
    python benchmarks/bench_chunk_urls.py --sizes-mb 5 --fetches 50
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for tests.harness and the other benchmarks

from benchmarks.bench_fleet import S3Site, cpu_seconds  # noqa: E402
from edgectl.agent.fetch import FetchSettings  # noqa: E402
from edgectl.agent.presigned import PresignedTransport  # noqa: E402
from edgectl.artifact import SigningKey, all_chunk_digests  # noqa: E402
from edgectl.broker import BrokerConfig, MosquittoProcess  # noqa: E402
from edgectl.protos.v1 import artifacts_pb2 as apb  # noqa: E402
from tests.harness.fleet import FleetRig, sized_artifact  # noqa: E402


def per_fetch_ms(rig: FleetRig, digest: str, chunks: list[str], s3: bool, fetches: int) -> float:
    """Control-plane CPU milliseconds per device fetch of ``chunks``."""
    stub = rig.client.artifacts
    assert rig.cp.proc is not None
    batch = PresignedTransport.max_batch if s3 else FetchSettings().chunks_per_request
    before = cpu_seconds(rig.cp.proc.pid)
    for _ in range(fetches):
        stub.Get(apb.GetArtifactRequest(artifact=digest))
        for i in range(0, len(chunks), batch):
            part = chunks[i : i + batch]
            if s3:
                stub.GetChunkUrls(apb.GetChunkUrlsRequest(digest=digest, chunks=part))
            else:
                for _piece in stub.Download(apb.DownloadRequest(digest=digest, chunks=part)):
                    pass
    return (cpu_seconds(rig.cp.proc.pid) - before) / fetches * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[5.0, 50.0])
    parser.add_argument("--fetches", type=int, default=100, help="device fetches per size (local: a fifth)")
    args = parser.parse_args()
    results: dict[tuple[str, float], tuple[int, float]] = {}
    for store in ("s3", "local"):
        work = Path(tempfile.mkdtemp(prefix="edgectl-bench-urls-"))
        broker = MosquittoProcess(BrokerConfig(data_dir=work / "broker"))
        broker.start()
        site = S3Site() if store == "s3" else None
        rig = FleetRig(
            work / "fleet", broker, SigningKey.generate(), "warning", blobs=site.url if site else None
        )
        try:
            for i, size_mb in enumerate(args.sizes_mb):
                art = sized_artifact(work, rig.key, i + 1, int(size_mb * 1e6))
                digest = rig.push(art)
                chunks = sorted(all_chunk_digests(art.manifest))
                fetches = args.fetches if site else max(1, args.fetches // 5)
                per_fetch_ms(rig, digest, chunks, site is not None, 1)  # warm: first signatures, caches
                results[store, size_mb] = (
                    len(chunks),
                    per_fetch_ms(rig, digest, chunks, site is not None, fetches),
                )
        finally:
            rig.close()
            broker.stop()
            if site:
                site.close()
            shutil.rmtree(work, ignore_errors=True)
    print("control-plane CPU per device fetch (Get + chunk URLs, or Get + Download):")
    for size_mb in args.sizes_mb:
        n, s3_ms = results["s3", size_mb]
        _, local_ms = results["local", size_mb]
        print(f"  {size_mb:5.0f} MB ({n:4d} chunks): presigned {s3_ms:6.2f} ms   Download {local_ms:7.2f} ms"
              f"   ({local_ms / s3_ms:.0f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
