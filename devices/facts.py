"""Facts about the running machine, read from the kernel and the driver, never guessed.

Nothing here imports torch, onnxruntime or tensorrt at module import time: the agent
runs on Jetsons whose Python stack may lack any of them, and ``gather_facts`` reports
each missing piece with the reason instead of failing.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import importlib.util
import platform
from dataclasses import dataclass, field
from pathlib import Path

# CPU features that decide how fast int8 runs; the doctor prints them all.
INT8_CPU_FEATURES = ("avx2", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "asimddp")
# The x86 int8 dot-product instructions (AVX-512 VNNI, or AVX-VNNI on client cores).
VNNI_FEATURES = frozenset({"avx512_vnni", "avx_vnni"})
CPUINFO = Path("/proc/cpuinfo")

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}
# cuDeviceGetAttribute ids from cuda.h (CUdevice_attribute).
_CU_ATTR_CC_MAJOR = 75
_CU_ATTR_CC_MINOR = 76


@dataclass(frozen=True)
class CudaDevice:
    """One GPU as the CUDA driver reports it."""

    index: int
    name: str
    compute_capability: str
    total_memory_mib: int


@dataclass(frozen=True)
class HostFacts:
    """What the running machine is and has; the input of profile matching."""

    machine: str
    cpu_model: str
    cpu_flags: frozenset[str]
    memory_total_mib: int
    # /proc/device-tree/model (any ARM board) and /etc/nv_tegra_release (Jetson only).
    device_model: str | None = None
    l4t_release: str | None = None
    cuda_driver_version: str | None = None
    cuda_devices: tuple[CudaDevice, ...] = ()
    cuda_absent_reason: str | None = None
    tensorrt_version: str | None = None
    tensorrt_absent_reason: str | None = None
    onnxruntime_version: str | None = None
    onnxruntime_providers: tuple[str, ...] = ()
    onnxruntime_absent_reason: str | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def is_jetson(self) -> bool:
        """A Jetson shows an L4T release file or says so in its device-tree model."""
        return self.l4t_release is not None or "jetson" in (self.device_model or "").lower()

    def int8_features(self) -> dict[str, bool]:
        """Each int8-relevant CPU feature and whether this CPU has it."""
        return {name: name in self.cpu_flags for name in INT8_CPU_FEATURES}


def normalize_machine(machine: str) -> str:
    """Map ``platform.machine()`` spellings (AMD64, arm64) to x86_64 / aarch64."""
    lowered = machine.strip().lower()
    return _ARCH_ALIASES.get(lowered, lowered)


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """The CPU model and feature flags from /proc/cpuinfo (x86 ``flags``, ARM ``Features``)."""
    model, flags = "", ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key in ("flags", "features") and not flags:
            flags = value
        elif key in ("model name", "hardware", "cpu model") and not model:
            model = value
    return model or "unknown", frozenset(flags.split())


def parse_meminfo(text: str) -> int:
    """MemTotal from /proc/meminfo, in MiB (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def _read(path: Path) -> str | None:
    try:
        # device-tree strings end in NUL.
        return path.read_bytes().decode("utf-8", "replace").strip("\x00").strip()
    except OSError:
        return None


def _cuda_facts() -> tuple[str | None, tuple[CudaDevice, ...], str | None]:
    """Driver version, devices and, when none, why: straight from libcuda via ctypes."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return None, (), f"no NVIDIA driver: libcuda.so.1 cannot be loaded ({exc})"

    def check(rc: int, call: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{call} returned CUDA error {rc}")

    try:
        check(cuda.cuInit(0), "cuInit")
        version = ctypes.c_int()
        check(cuda.cuDriverGetVersion(ctypes.byref(version)), "cuDriverGetVersion")
        driver = f"{version.value // 1000}.{(version.value % 1000) // 10}"
        count = ctypes.c_int()
        check(cuda.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        devices = []
        for index in range(count.value):
            dev = ctypes.c_int()
            check(cuda.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
            name = ctypes.create_string_buffer(256)
            check(cuda.cuDeviceGetName(name, len(name), dev), "cuDeviceGetName")
            major, minor = ctypes.c_int(), ctypes.c_int()
            check(cuda.cuDeviceGetAttribute(ctypes.byref(major), _CU_ATTR_CC_MAJOR, dev), "cc major")
            check(cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CU_ATTR_CC_MINOR, dev), "cc minor")
            mem = ctypes.c_size_t()
            check(cuda.cuDeviceTotalMem_v2(ctypes.byref(mem), dev), "cuDeviceTotalMem_v2")
            devices.append(
                CudaDevice(
                    index=index,
                    name=name.value.decode("utf-8", "replace"),
                    compute_capability=f"{major.value}.{minor.value}",
                    total_memory_mib=mem.value // (1024 * 1024),
                )
            )
    except (RuntimeError, AttributeError) as exc:
        return None, (), f"the CUDA driver is present but unusable: {exc}"
    if not devices:
        return driver, (), "the CUDA driver reports no devices"
    return driver, tuple(devices), None


def _tensorrt_facts() -> tuple[str | None, str | None]:
    """TensorRT's version without importing it when package metadata exists."""
    if importlib.util.find_spec("tensorrt") is None:
        return None, "the tensorrt Python package is not installed (pip install 'edgectl[tensorrt]')"
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt_cu12", "tensorrt-libs"):
        try:
            return importlib.metadata.version(dist), None
        except importlib.metadata.PackageNotFoundError:
            continue
    # JetPack's apt package installs the module without pip metadata.
    try:
        module = importlib.import_module("tensorrt")
    except Exception as exc:  # a broken native install raises anything; report it, never crash
        return None, f"tensorrt is installed but fails to import: {exc}"
    return str(getattr(module, "__version__", "unknown")), None


def _onnxruntime_facts() -> tuple[str | None, tuple[str, ...], str | None]:
    if importlib.util.find_spec("onnxruntime") is None:
        return None, (), "onnxruntime is not installed (pip install 'edgectl[agent]')"
    try:
        ort = importlib.import_module("onnxruntime")
        return str(ort.__version__), tuple(ort.get_available_providers()), None
    except Exception as exc:  # a broken wheel (wrong CUDA libs) should be reported, not fatal
        return None, (), f"onnxruntime is installed but fails to import: {exc}"


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty when it cannot be read)."""
    return parse_cpuinfo(_read(CPUINFO) or "")[1]


def gather_facts() -> HostFacts:
    """Read the running machine's facts: CPU, memory, Jetson, CUDA, TensorRT, onnxruntime."""
    cpuinfo = _read(CPUINFO) or ""
    model, flags = parse_cpuinfo(cpuinfo)
    meminfo = _read(Path("/proc/meminfo")) or ""
    tegra = _read(Path("/etc/nv_tegra_release"))
    driver, devices, cuda_reason = _cuda_facts()
    trt_version, trt_reason = _tensorrt_facts()
    ort_version, providers, ort_reason = _onnxruntime_facts()
    notes = []
    if not cpuinfo:
        notes.append("/proc/cpuinfo is unreadable: CPU features unknown")
    return HostFacts(
        machine=normalize_machine(platform.machine()),
        cpu_model=model,
        cpu_flags=flags,
        memory_total_mib=parse_meminfo(meminfo),
        device_model=_read(Path("/proc/device-tree/model")),
        # First line only, e.g. "# R36 (release), REVISION: 4.0, GCID: ..., BOARD: generic, ...".
        l4t_release=tegra.splitlines()[0].lstrip("# ").strip() if tegra else None,
        cuda_driver_version=driver,
        cuda_devices=devices,
        cuda_absent_reason=cuda_reason,
        tensorrt_version=trt_version,
        tensorrt_absent_reason=trt_reason,
        onnxruntime_version=ort_version,
        onnxruntime_providers=providers,
        onnxruntime_absent_reason=ort_reason,
        notes=tuple(notes),
    )
