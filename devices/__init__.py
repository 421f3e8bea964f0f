"""Device profiles (data) and hardware detection. Imported as ``edgectl.devices``.

Importing this package needs only PyYAML: onnxruntime, tensorrt and CUDA are looked up
when facts are gathered, so the agent can import it on any Jetson or CPU box.
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
