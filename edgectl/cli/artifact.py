"""``edgectl artifact``: look inside a signed model bundle and verify it; push, list and remove
artifacts on the control plane.

Example:
    edgectl artifact inspect out/resnet18-v3.tar --trust ~/.config/edgectl/trusted/
    edgectl artifact inspect out/resnet18-v3/ --json | jq .digest
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from edgectl.artifact.canonical import sha256_digest
from edgectl.artifact.errors import ArtifactError, SignatureError
from edgectl.artifact.keystore import default_trust_store
from edgectl.artifact.manifest import Manifest
from edgectl.artifact.signing import TrustStore, decode_signatures
from edgectl.artifact.verify import read_unverified, verify_bundle
from edgectl.cli.output import Output, OutputOpt, byte_progress, output_format, print_json, show
from edgectl.cli.output import console as _out
from edgectl.cli.output import err_console as _err
from edgectl.cli.remote import CaOpt, JsonOpt, ServerOpt, TokenOpt, ago, connect, message_to_dict
from edgectl.client import push_artifact
from edgectl.errors import EdgectlError, UsageError
from edgectl.protos.v1 import artifacts_pb2

app = typer.Typer(help="Inspect and verify signed model artifacts.", no_args_is_help=True)


@app.callback()
def _artifact() -> None:
    """Inspect and verify signed model artifacts."""


def _trust(paths: list[Path] | None) -> TrustStore:
    if not paths:
        return default_trust_store()
    store = TrustStore()
    for p in paths:
        store.add_path(p)
    return store


def _signers(sig_bytes: bytes | None, trust: TrustStore) -> list[dict[str, Any]]:
    if sig_bytes is None:
        return []
    try:
        _, sigs = decode_signatures(sig_bytes)
    except SignatureError:
        return []  # verification below reports exactly what is wrong with the file
    return [{"key_id": s.key_id, "trusted": s.key_id in trust} for s in sigs]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _render(m: Manifest, digest: str, signers: list[dict[str, Any]]) -> None:
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="bold", no_wrap=True)
    head.add_column(overflow="fold")  # digests are identities: show them whole, never cut
    head.add_row("name", m.name)
    head.add_row("version", f"{m.version}" + (f" (parent {m.parent_version})" if m.parent_version else ""))
    head.add_row("digest", digest)
    head.add_row("created", f"{m.created} by edgectl {m.producer.edgectl_version} on {m.producer.host}")
    head.add_row("target", m.target_profile)
    head.add_row("model", m.model_file)
    sig_text = ", ".join(f"{s['key_id']} ({'trusted' if s['trusted'] else 'NOT trusted'})" for s in signers)
    head.add_row("signers", sig_text or "none")
    ios = "; ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in m.inputs)
    head.add_row("inputs", ios)
    head.add_row("outputs", "; ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in m.outputs))
    if m.trt_engines:
        engines = ", ".join(
            f"{e.device_class}/trt{e.trt_version}/sm{e.compute_capability}" for e in m.trt_engines
        )
        head.add_row("trt engines", engines)
    head.add_row("build engine on device", "yes" if m.engine_build_on_device else "no")
    _out.print(head)

    files = Table(title="files", title_justify="left")
    for col in ("path", "size", "chunks", "sha256"):
        files.add_column(col, justify="right" if col in ("size", "chunks") else "left")
    for f in m.files:
        files.add_row(f.path, _size(f.size), str(len(f.chunks)), f.sha256[:16] + "…")
    _out.print(files)

    if m.metrics:
        metrics = Table(title="metrics", title_justify="left")
        metrics.add_column("metric")
        metrics.add_column("value", justify="right")
        for key, val in sorted(m.metrics.items()):
            if isinstance(val, list | dict):  # per-stage timings, every trial: --json has them whole
                metrics.add_row(key, f"{len(val)} entries (--json)")
            else:
                metrics.add_row(key, json.dumps(val) if not isinstance(val, str) else val)
        _out.print(metrics)


@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="Artifact directory or .tar.")],
    trust: Annotated[
        list[Path] | None,
        typer.Option("--trust", help="Trusted public key (PEM) or directory of them; repeatable."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Show an artifact's manifest and verify it; exits non-zero, saying why, when it is not valid.

    Example: edgectl artifact inspect out/resnet18.tar --trust keys/
    """
    try:
        store = _trust(trust)
        manifest_bytes, sig_bytes = read_unverified(bundle)
        manifest = Manifest.from_bytes(manifest_bytes)
    except EdgectlError as exc:
        _fail(exc, as_json)
    digest = sha256_digest(manifest_bytes)
    signers = _signers(sig_bytes, store)
    error: ArtifactError | None = None
    try:
        verify_bundle(bundle, store)
    except ArtifactError as exc:
        error = exc
    if as_json:
        doc = {
            "name": manifest.name,
            "version": manifest.version,
            "digest": digest,
            "signers": signers,
            "verified": error is None,
            "error": None if error is None else str(error),
            "error_type": None if error is None else type(error).__name__,
            "manifest": manifest.to_dict(),
        }
        print_json(doc)
    else:
        _render(manifest, digest, signers)
        if error is None:
            n = len(manifest.files)
            _out.print(
                f"[green]verified:[/green] signature trusted, {n} files match the manifest", highlight=False
            )
        else:
            _err.print(
                f"[red]NOT valid ({type(error).__name__}):[/red] {error}", highlight=False, soft_wrap=True
            )
    if error is not None:
        raise typer.Exit(error.exit_code)


def _fail(exc: EdgectlError, as_json: bool) -> typer.Exit:
    if as_json:
        print_json({"verified": False, "error": str(exc), "error_type": type(exc).__name__})
    else:
        _err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


# -- on the control plane -------------------------------------------------------------------------


@app.command("push")
def artifact_push(
    path: Path = typer.Argument(..., help="artifact directory or .tar"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Upload a signed artifact; resumes by sending only the chunks the control plane lacks.

    Example: edgectl artifact push out/digits-v3/
    """
    if not path.exists():
        raise UsageError(f"{path} does not exist", hint="pass an artifact directory or .tar")
    with (
        connect(server, token, ca) as client,
        byte_progress(f"pushing {path.name}", not json_out) as progress,
    ):
        result = push_artifact(client, path, progress)
    ref = result.artifact.ref
    if json_out:
        print_json({"artifact": message_to_dict(result.artifact.ref), "chunks_sent": result.chunks_sent,
                    "bytes_sent": result.bytes_sent, "already_present": result.already_present})  # fmt: skip
    elif result.already_present:
        _out.print(f"{ref.name}:{ref.version} {ref.digest} is already on the control plane")
    else:
        _out.print(
            f"pushed {ref.name}:{ref.version} {ref.digest} ({result.chunks_sent} chunks, {result.bytes_sent} bytes sent)"
        )


@app.command("ls")
def artifact_ls(
    name: str = typer.Option("", help="only this artifact name"),
    output: Output | None = OutputOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """List every artifact on the control plane, newest version first (all pages).

    Example: edgectl artifact ls --name digits -o wide
    """
    with connect(server, token, ca) as client:
        artifacts = client.list_all(
            client.artifacts.List, artifacts_pb2.ListArtifactsRequest(name=name), "artifacts"
        )

    def table(wide: bool) -> Table:
        out = Table(
            "name", "version", "digest", "size", "uploaded", "signed by", *(("by", "pinned") if wide else ())
        )
        for a in artifacts:
            row = [a.ref.name, str(a.ref.version), a.ref.digest, str(a.total_size), ago(a.uploaded_at),
                   ",".join(a.key_ids)]  # fmt: skip
            if wide:
                row += [a.uploaded_by or "-", "yes" if a.pinned else "no"]
            out.add_row(*row)
        return out

    data = [
        {k: v for k, v in message_to_dict(a).items() if k not in ("manifest", "signatures")}
        for a in artifacts
    ]
    show(output_format(output, json_out), data, table)


@app.command("rm")
def artifact_rm(
    artifact: str = typer.Argument(..., help="digest, NAME:VERSION or NAME"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
) -> None:
    """Delete an artifact no rollout or device uses; frees the chunks no other artifact shares.

    Example: edgectl artifact rm digits:2
    """
    with connect(server, token, ca) as client:
        art = client.call(client.artifacts.Get, artifacts_pb2.GetArtifactRequest(artifact=artifact))
        freed = client.call(
            client.artifacts.Delete, artifacts_pb2.DeleteArtifactRequest(digest=art.ref.digest)
        )
    _out.print(f"deleted {art.ref.name}:{art.ref.version} ({freed.bytes_freed} bytes freed)")
