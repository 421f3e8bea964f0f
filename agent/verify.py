"""Every check between a desired digest and a model the agent will run, each with a refusal reason.

Signature and digest first (nothing else in a manifest is trusted before), then identity
(name/version match the desired state), anti-rollback, and fitness for this device (precision,
execution provider, memory). A failed check is a ``RefusedError`` whose message becomes the
reported ``failure_reason``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgectl.agent.errors import RefusedError
from edgectl.artifact import (
    ArtifactError,
    Manifest,
    TrustStore,
    VerifiedManifest,
    is_newer,
    sha256_digest,
    verify_manifest,
)
from edgectl.devices import DeviceProfile

# Serving needs the weights plus activations and the runtime's own arenas: a rough 2x of the file.
MEMORY_FACTOR = 2.0


@dataclass(frozen=True)
class DeviceFit:
    """What this device offers: its profile, the EPs this onnxruntime has, and memory for models."""

    profile: DeviceProfile
    available_providers: tuple[str, ...]
    memory_limit_mib: int


def verify_signed(
    digest: str, manifest_bytes: bytes, signature_bytes: bytes, trust: TrustStore
) -> VerifiedManifest:
    """The manifest, once its bytes hash to ``digest`` and a trusted key signed them."""
    actual = sha256_digest(manifest_bytes)
    if actual != digest:
        raise RefusedError(f"manifest bytes hash to {actual}, not the desired {digest}")
    if not signature_bytes:
        raise RefusedError("artifact is unsigned", hint="sign it with `edgectl keys` and upload it again")
    try:
        return verify_manifest(manifest_bytes, signature_bytes, trust)
    except ArtifactError as exc:
        raise RefusedError(f"signature check failed: {exc}") from exc


def check_identity(manifest: Manifest, name: str, version: int) -> None:
    """The desired serving name (and version, when the desired state gives one) must match."""
    if manifest.name != name:
        raise RefusedError(f"artifact is named {manifest.name!r}, desired state serves it as {name!r}")
    if version and manifest.version != version:
        raise RefusedError(f"artifact is version {manifest.version}, desired state says {version}")


def check_rollback(manifest: Manifest, active_version: int | None, rollback: bool) -> None:
    """Anti-rollback: an older (or equal) version only when the desired state marks ``rollback``."""
    if rollback or active_version is None:
        return
    if not is_newer(manifest.version, active_version):
        raise RefusedError(
            f"version {manifest.version} is not newer than active version {active_version} "
            "and the desired state does not mark it as a rollback"
        )


def usable_providers(manifest: Manifest, fit: DeviceFit) -> tuple[str, ...]:
    """EPs that run every precision the manifest uses, in the profile's order, present here."""
    precisions = set(manifest.precision.values()) or {"fp32"}
    usable: list[str] = []
    for ep in fit.profile.execution_providers:
        if ep in fit.available_providers and all(ep in fit.profile.providers_for(p) for p in precisions):
            usable.append(ep)
    return tuple(usable)


def check_fit(manifest: Manifest, fit: DeviceFit) -> tuple[str, ...]:
    """Refuse an artifact this device cannot run; returns the EPs that can run it, best first."""
    precisions = sorted(set(manifest.precision.values()) or {"fp32"})
    unsupported = [p for p in precisions if not fit.profile.supports(p)]
    if unsupported:
        raise RefusedError(
            f"precision {', '.join(unsupported)} is not supported by profile {fit.profile.name} "
            f"(supports {', '.join(p for p in ('fp32', 'fp16', 'int8') if fit.profile.supports(p))})"
        )
    providers = usable_providers(manifest, fit)
    if not providers:
        wanted = sorted({ep for p in precisions for ep in fit.profile.providers_for(p)})
        raise RefusedError(
            f"no execution provider here runs {', '.join(precisions)}: needs one of {', '.join(wanted)}, "
            f"this onnxruntime has {', '.join(fit.available_providers)}"
        )
    model_bytes = manifest.file(manifest.model_file).size
    need_mib = model_bytes * MEMORY_FACTOR / (1 << 20)
    if need_mib > fit.memory_limit_mib:
        raise RefusedError(
            f"model needs about {need_mib:.0f} MiB to serve; this device allows {fit.memory_limit_mib} MiB"
        )
    return providers


def memory_limit(profile: DeviceProfile, override_mib: int | None, host_total_mib: int | None) -> int:
    """The memory budget for models: the override, else the profile's, capped by what the host has."""
    limit = override_mib if override_mib else profile.memory_mib
    return min(limit, host_total_mib) if host_total_mib else limit


def provider_order(profile: DeviceProfile, available: Sequence[str]) -> tuple[str, ...]:
    """The profile's EP order restricted to what this onnxruntime offers (CPU always last)."""
    order = [ep for ep in profile.execution_providers if ep in available]
    return tuple(order) or ("CPUExecutionProvider",)
