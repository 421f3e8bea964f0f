"""Device profiles (data) and hardware detection. Imported as ``edgectl.devices``.

Importing this package needs only PyYAML: onnxruntime, tensorrt and CUDA are looked up
when facts are gathered, so the agent can import it on any Jetson or CPU box.
One job per module (a test keeps this list complete):

- ``profile``: typed, validated device profiles from the YAML files in ``profiles/``.
- ``facts``: facts about this machine from the kernel and the driver (CPU flags, CUDA, TensorRT).
- ``matching``: the profile that fits the machine best, with the reason.
- ``errors``: bad or unknown device profiles.
"""

from __future__ import annotations

from edgectl.devices.errors import DeviceError, ProfileError
from edgectl.devices.facts import (
    INT8_CPU_FEATURES,
    VNNI_FEATURES,
    CudaDevice,
    HostFacts,
    cpu_flags,
    gather_facts,
)
from edgectl.devices.matching import Detection, NoMatchingProfile, detect, match_profile
from edgectl.devices.profile import (
    DeviceProfile,
    EngineRules,
    EngineTarget,
    MatchRules,
    PrecisionProviders,
    QuantizationHints,
    SparsitySupport,
    list_profiles,
    load_all_profiles,
    load_profile,
)

__all__ = [
    "INT8_CPU_FEATURES",
    "VNNI_FEATURES",
    "CudaDevice",
    "Detection",
    "DeviceError",
    "DeviceProfile",
    "EngineRules",
    "EngineTarget",
    "HostFacts",
    "MatchRules",
    "NoMatchingProfile",
    "PrecisionProviders",
    "ProfileError",
    "QuantizationHints",
    "SparsitySupport",
    "cpu_flags",
    "detect",
    "gather_facts",
    "list_profiles",
    "load_all_profiles",
    "load_profile",
    "match_profile",
]
