"""Map host facts to the device profile that fits the machine best, with the reason.

The mapping is a pure function of :class:`HostFacts` so it can be checked for a Jetson
or a T4 box on any machine; only :func:`detect` without facts reads the real host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgectl.devices.errors import DeviceError
from edgectl.devices.facts import CudaDevice, HostFacts, gather_facts
from edgectl.devices.profile import DeviceProfile, load_all_profiles

# A box with a usable accelerator should run on it: rank accelerator profiles first.
_ACCELERATOR_RANK = {"jetson": 2, "cuda": 1, "none": 0}


class NoMatchingProfile(DeviceError):
    """No shipped or given profile fits the machine."""


@dataclass(frozen=True)
class Detection:
    """The profile chosen for a machine, why, and why each other profile was not."""

    facts: HostFacts
    profile: DeviceProfile
    reason: str
    rejected: tuple[tuple[str, str], ...]


def _gpu_for(profile: DeviceProfile, facts: HostFacts) -> tuple[CudaDevice | None, str]:
    """The first CUDA device whose compute capability the profile covers, or why none."""
    if not facts.cuda_devices:
        return None, f"no usable GPU: {facts.cuda_absent_reason or 'no CUDA devices'}"
    for dev in facts.cuda_devices:
        if dev.compute_capability in profile.compute_capabilities:
            return dev, f"GPU {dev.index} {dev.name} (sm_{dev.compute_capability.replace('.', '')})"
    seen = ", ".join(f"{d.name} (sm_{d.compute_capability.replace('.', '')})" for d in facts.cuda_devices)
    wanted = ", ".join(profile.compute_capabilities)
    return None, f"GPU {seen} is not one of compute capabilities {wanted}"


def _check(profile: DeviceProfile, facts: HostFacts) -> tuple[bool, str]:
    """Whether ``profile`` fits ``facts``, with the evidence (or the first misfit)."""
    if profile.arch != facts.machine:
        return False, f"needs {profile.arch}, machine is {facts.machine}"
    missing = [f for f in profile.match.cpu_features_all if f not in facts.cpu_flags]
    if missing:
        return False, f"CPU lacks {', '.join(missing)}"
    any_of = [f for f in profile.match.cpu_features_any if f in facts.cpu_flags]
    if profile.match.cpu_features_any and not any_of:
        return False, f"CPU has none of {', '.join(profile.match.cpu_features_any)}"
    features = [*profile.match.cpu_features_all, *any_of]
    evidence = [
        f"{facts.machine} CPU '{facts.cpu_model}' has {', '.join(features) or 'no required features'}"
    ]

    if profile.accelerator == "jetson":
        if not facts.is_jetson:
            return False, "not a Jetson (no /etc/nv_tegra_release, device-tree model does not say Jetson)"
        model = facts.device_model or ""
        pattern = next((p for p in profile.match.jetson_models if p.lower() in model.lower()), None)
        if pattern is None:
            wanted = " or ".join(repr(p) for p in profile.match.jetson_models)
            return False, f"Jetson model {model!r} does not contain {wanted}"
        evidence.insert(0, f"Jetson model {model!r} contains {pattern!r}")
    if profile.accelerator in ("jetson", "cuda"):
        gpu, why = _gpu_for(profile, facts)
        if gpu is None:
            return False, why
        evidence.insert(1 if profile.accelerator == "jetson" else 0, why)
    return True, "; ".join(evidence)


def match_profile(facts: HostFacts, profiles: Sequence[DeviceProfile] | None = None) -> Detection:
    """Choose the most specific profile that ``facts`` satisfy: accelerator first, then CPU features."""
    candidates = list(profiles) if profiles is not None else load_all_profiles()
    fits: list[tuple[DeviceProfile, str]] = []
    rejected: list[tuple[str, str]] = []
    for profile in candidates:
        ok, why = _check(profile, facts)
        if ok:
            fits.append((profile, why))
        else:
            rejected.append((profile.name, why))
    if not fits:
        detail = "; ".join(f"{name}: {why}" for name, why in rejected)
        raise NoMatchingProfile(
            f"no device profile fits this machine ({detail})",
            hint="pass --profile NAME or a profile .yaml written for this device",
        )

    def rank(item: tuple[DeviceProfile, str]) -> tuple[int, int, str]:
        p = item[0]
        specificity = len(p.match.cpu_features_all) + (1 if p.match.cpu_features_any else 0)
        # The name breaks ties so the choice never depends on file order.
        return (-_ACCELERATOR_RANK[p.accelerator], -specificity, p.name)

    best, why = min(fits, key=rank)
    others = [(p.name, f"fits, but {best.name} is more specific") for p, _ in fits if p is not best]
    return Detection(facts=facts, profile=best, reason=why, rejected=tuple(others + rejected))


def detect(facts: HostFacts | None = None, profiles: Sequence[DeviceProfile] | None = None) -> Detection:
    """Map the running machine (or the given ``facts``) to its device profile."""
    return match_profile(facts if facts is not None else gather_facts(), profiles)
