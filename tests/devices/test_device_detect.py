"""Host facts come from the real machine; the facts-to-profile mapping is checked per device class."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import subprocess
import sys

import pytest

from edgectl.devices import (
    VNNI_FEATURES,
    CudaDevice,
    HostFacts,
    NoMatchingProfile,
    cpu_flags,
    detect,
    gather_facts,
    match_profile,
)


def _flags(line: str) -> frozenset[str]:
    return frozenset(line.split())


# Real flag sets, copied from /proc/cpuinfo of each kind of machine (x86 trimmed to what matters).
ORIN_FLAGS = _flags(
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
    "asimddp uscat ilrcpc flagm paca pacg"
)
GRAVITON2_FLAGS = _flags(
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs"
)
HASWELL_FLAGS = _flags("fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi1 bmi2 movbe popcnt")
CASCADE_LAKE_FLAGS = HASWELL_FLAGS | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
ALDER_LAKE_FLAGS = HASWELL_FLAGS | {"avx_vnni"}
SAPPHIRE_RAPIDS_FLAGS = CASCADE_LAKE_FLAGS | {"amx_tile", "amx_int8", "amx_bf16", "avx512_bf16"}
L4T_R36 = "R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8"
NO_DRIVER = "no NVIDIA driver: libcuda.so.1 cannot be loaded"


def jetson(model: str, gpu: bool = True, memory: int = 7620) -> HostFacts:
    devices = (CudaDevice(0, "Orin", "8.7", memory),) if gpu else ()
    return HostFacts(
        machine="aarch64",
        cpu_model="unknown",
        cpu_flags=ORIN_FLAGS,
        memory_total_mib=memory,
        device_model=model,
        l4t_release=L4T_R36,
        cuda_driver_version="12.6" if gpu else None,
        cuda_devices=devices,
        cuda_absent_reason=None if gpu else NO_DRIVER,
    )


def x86(flags: frozenset[str], *gpus: CudaDevice) -> HostFacts:
    return HostFacts(
        machine="x86_64",
        cpu_model="Intel(R) Xeon(R)",
        cpu_flags=flags,
        memory_total_mib=64000,
        cuda_driver_version="12.4" if gpus else None,
        cuda_devices=gpus,
        cuda_absent_reason=None if gpus else NO_DRIVER,
    )


def test_orin_nano_maps_to_its_profile() -> None:
    d = detect(jetson("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"))
    assert d.profile.name == "jetson-orin-nano"
    assert "Orin Nano" in d.reason and "sm_87" in d.reason


def test_agx_orin_maps_to_its_profile() -> None:
    d = detect(jetson("NVIDIA Jetson AGX Orin Developer Kit", memory=30536))
    assert d.profile.name == "jetson-agx-orin"
    assert "AGX Orin" in d.reason
    rejected = dict(d.rejected)
    assert "does not contain" in rejected["jetson-orin-nano"]
    assert "more specific" in rejected["arm64-cpu"]


def test_jetson_without_a_usable_gpu_falls_back_to_cpu_and_says_why() -> None:
    d = detect(jetson("NVIDIA Jetson Orin Nano Developer Kit", gpu=False))
    assert d.profile.name == "arm64-cpu"
    assert "libcuda" in dict(d.rejected)["jetson-orin-nano"]


def test_jetson_model_without_a_profile_is_not_taken_for_another() -> None:
    d = detect(jetson("NVIDIA Jetson Orin NX Engineering Reference Developer Kit"))
    assert d.profile.name == "arm64-cpu"


def test_x86_with_t4_maps_to_gpu_profile() -> None:
    t4 = CudaDevice(0, "Tesla T4", "7.5", 15095)
    d = detect(x86(CASCADE_LAKE_FLAGS, t4))
    assert d.profile.name == "x86-gpu"
    assert "Tesla T4" in d.reason and "sm_75" in d.reason
    assert detect(x86(HASWELL_FLAGS, CudaDevice(0, "NVIDIA L4", "8.9", 22491))).profile.name == "x86-gpu"
    assert detect(x86(HASWELL_FLAGS, CudaDevice(0, "NVIDIA A10", "8.6", 22731))).profile.name == "x86-gpu"


def test_gpu_outside_the_profile_class_is_not_claimed() -> None:
    d = detect(x86(SAPPHIRE_RAPIDS_FLAGS, CudaDevice(0, "NVIDIA H100 80GB HBM3", "9.0", 81080)))
    assert d.profile.name == "x86-cpu-vnni"
    assert "sm_90" in dict(d.rejected)["x86-gpu"]


@pytest.mark.parametrize("flags", [CASCADE_LAKE_FLAGS, ALDER_LAKE_FLAGS, SAPPHIRE_RAPIDS_FLAGS])
def test_vnni_cpus_map_to_vnni_profile(flags: frozenset[str]) -> None:
    d = detect(x86(flags))
    assert d.profile.name == "x86-cpu-vnni"
    assert "vnni" in d.reason
    assert "libcuda" in dict(d.rejected)["x86-gpu"]


def test_avx2_only_cpu_maps_to_avx2_profile() -> None:
    d = detect(x86(HASWELL_FLAGS))
    assert d.profile.name == "x86-cpu-avx2"
    assert "none of avx512_vnni, avx_vnni" in dict(d.rejected)["x86-cpu-vnni"]


def test_arm64_server_and_non_jetson_board_map_to_arm64_cpu() -> None:
    graviton = HostFacts("aarch64", "unknown", GRAVITON2_FLAGS, 16000)
    assert detect(graviton).profile.name == "arm64-cpu"
    pi = HostFacts("aarch64", "BCM2835", GRAVITON2_FLAGS, 8000, device_model="Raspberry Pi 5 Model B Rev 1.0")
    d = detect(pi)
    assert d.profile.name == "arm64-cpu" and not pi.is_jetson
    assert "not a Jetson" in dict(d.rejected)["jetson-orin-nano"]


def test_machine_without_any_profile_gets_a_clear_error() -> None:
    old_atom = HostFacts("x86_64", "Intel(R) Atom(TM)", frozenset({"sse4_2", "ssse3"}), 4000)
    with pytest.raises(NoMatchingProfile) as info:
        detect(old_atom)
    assert "x86-cpu-avx2: CPU lacks avx2" in str(info.value) and "--profile" in str(info.value)
    with pytest.raises(NoMatchingProfile, match="needs x86_64, machine is riscv64"):
        match_profile(HostFacts("riscv64", "sifive", frozenset(), 4000))


def _proc_flags() -> frozenset[str]:
    """The first processor's flags, read here independently of the code under test."""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.split(":")[0].strip() in ("flags", "Features"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _proc_mem_mib() -> int:
    with open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemTotal"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no MemTotal")


def test_gatherer_reports_this_machine() -> None:
    facts = gather_facts()
    assert facts.machine == {"amd64": "x86_64", "arm64": "aarch64"}.get(
        os.uname().machine, os.uname().machine
    )
    assert facts.cpu_flags == _proc_flags()
    assert facts.memory_total_mib == _proc_mem_mib()
    features = facts.int8_features()
    for name in ("avx2", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "asimddp"):
        assert features[name] == (name in _proc_flags())
    assert facts.is_jetson == os.path.exists("/etc/nv_tegra_release")

    try:
        ctypes.CDLL("libcuda.so.1")
        has_driver = True
    except OSError:
        has_driver = False
    if has_driver:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
        assert len(facts.cuda_devices) == listed.count("GPU ")
        assert all(d.total_memory_mib > 0 and "." in d.compute_capability for d in facts.cuda_devices)
    else:
        assert facts.cuda_devices == () and "libcuda.so.1" in (facts.cuda_absent_reason or "")

    assert (facts.tensorrt_version is None) == (importlib.util.find_spec("tensorrt") is None)
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        assert facts.onnxruntime_version == onnxruntime.__version__
        assert list(facts.onnxruntime_providers) == onnxruntime.get_available_providers()

    # The real host maps to a profile whose requirements it really meets.
    d = detect()
    assert d.profile.arch == facts.machine
    assert set(d.profile.match.cpu_features_all) <= _proc_flags()


def test_devices_imports_and_detects_without_onnxruntime_or_torch() -> None:
    # Blocking the modules in sys.modules makes them unimportable, as on a bare Jetson image.
    code = (
        "import sys\n"
        "for m in ('onnxruntime', 'torch', 'onnx', 'tensorrt'): sys.modules[m] = None\n"
        "import edgectl.devices as d\n"
        "facts = d.gather_facts()\n"
        "assert facts.onnxruntime_version is None and 'not installed' in facts.onnxruntime_absent_reason\n"
        "print(d.detect(facts).profile.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == detect().profile.name
    code = "import sys, edgectl.devices; print(sorted({'torch','onnxruntime','onnx'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cpu_flags_is_the_one_reader_and_compress_asks_it() -> None:
    """devices.cpu_flags() reads this CPU's flags; compress's VNNI question goes through it."""
    from edgectl.compress.quantizer import cpu_has_vnni

    flags = cpu_flags()
    assert flags == _proc_flags() == gather_facts().cpu_flags
    assert cpu_has_vnni() == bool(flags & {"avx512_vnni", "avx_vnni"}) == bool(VNNI_FEATURES & flags)
