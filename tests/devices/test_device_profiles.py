"""The shipped device profiles load, say true things, and bad profiles fail clearly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from edgectl.devices import (
    DeviceProfile,
    EngineTarget,
    ProfileError,
    list_profiles,
    load_all_profiles,
    load_profile,
)
from edgectl.errors import EdgectlError, UsageError

REQUIRED = {"jetson-orin-nano", "jetson-agx-orin", "x86-gpu", "x86-cpu-vnni", "x86-cpu-avx2", "arm64-cpu"}


def test_every_required_profile_ships_and_validates() -> None:
    names = list_profiles()
    assert set(names) >= REQUIRED
    profiles = load_all_profiles()
    assert [p.name for p in profiles] == names
    for p in profiles:
        assert p.source.name == f"{p.name}.yaml"
        assert p.execution_providers[-1] == "CPUExecutionProvider", "CPU is every chain's last resort"
        assert p.providers_for("fp32"), p.name
        # No runtime we target turns unstructured zeros into speed.
        assert p.sparsity.unstructured is False, p.name


def test_jetson_profiles_carry_real_hardware_facts() -> None:
    nano, agx = load_profile("jetson-orin-nano"), load_profile("jetson-agx-orin")
    for p in (nano, agx):
        assert (p.arch, p.accelerator, p.compute_capabilities) == ("aarch64", "jetson", ("8.7",))
        assert p.engine.tensorrt and p.engine.tensorrt_major == 10 and p.engine.build_on_device
        assert not p.engine.portable_across_device_models
        assert p.providers_for("int8") == ("TensorrtExecutionProvider",)
        assert p.quantization.symmetric_activations and p.quantization.activation_type == "s8"
        assert p.sparsity.structured_2_4  # Ampere sparse tensor cores
    assert nano.memory_mib < agx.memory_mib


def test_gpu_and_cpu_profiles() -> None:
    gpu = load_profile("x86-gpu")
    assert set(gpu.compute_capabilities) == {"7.5", "8.6", "8.9"}  # T4, A10, L4
    assert gpu.providers_for("fp16") == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    vnni, avx2, arm = load_profile("x86-cpu-vnni"), load_profile("x86-cpu-avx2"), load_profile("arm64-cpu")
    for p in (vnni, avx2, arm):
        assert p.execution_providers == ("CPUExecutionProvider",)
        assert not p.supports("fp16") and p.supports("int8")
        assert not p.engine.tensorrt
    assert avx2.quantization.reduce_range and not vnni.quantization.reduce_range
    assert (vnni.quantization.activation_type, vnni.quantization.weight_type) == ("u8", "s8")
    assert arm.quantization.int8_dot_product == "asimddp"
    assert not vnni.supports("bf16")


def test_engine_portability_rules() -> None:
    nano, agx, gpu = (load_profile(n).engine for n in ("jetson-orin-nano", "jetson-agx-orin", "x86-gpu"))
    on_nano = EngineTarget("10.3.0", "8.7", "NVIDIA Jetson Orin Nano Developer Kit")
    on_agx = EngineTarget("10.3.0", "8.7", "NVIDIA Jetson AGX Orin Developer Kit")
    assert nano.compatible(on_nano, on_nano)[0]
    ok, why = agx.compatible(on_nano, on_agx)
    assert not ok and "device_model" in why and "rebuild" in why
    t4_a, t4_b = (
        EngineTarget("10.4.0", "7.5", "Tesla T4"),
        EngineTarget("10.4.0", "7.5", "Tesla T4 (other box)"),
    )
    assert gpu.compatible(t4_a, t4_b)[0]
    ok, why = gpu.compatible(t4_a, EngineTarget("10.5.0", "7.5", "Tesla T4"))
    assert not ok and "tensorrt_version" in why
    ok, why = gpu.compatible(t4_a, EngineTarget("10.4.0", "8.9", "NVIDIA L4"))
    assert not ok and "compute_capability" in why
    assert not load_profile("x86-cpu-vnni").engine.compatible(t4_a, t4_a)[0]


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError) as info:
        load_profile("jetson-nano-classic")
    message = str(info.value)
    assert "jetson-nano-classic" in message
    for name in REQUIRED:
        assert name in message
    assert isinstance(info.value, EdgectlError) and isinstance(info.value, UsageError)
    with pytest.raises(ProfileError, match="unknown device profile"):
        load_profile("../profiles/x86-gpu")  # a name never walks out of the shipped profiles


def test_load_by_path(tmp_path: Path) -> None:
    data = yaml.safe_load(load_profile("arm64-cpu").source.read_text())
    data["name"] = "my-board"
    path = tmp_path / "my-board.yaml"
    path.write_text(yaml.safe_dump(data))
    profile = load_profile(path)
    assert isinstance(profile, DeviceProfile) and profile.name == "my-board" and profile.source == path
    assert load_profile(str(path)) == profile


def _mutated(tmp_path: Path, change: Any) -> Path:
    data = yaml.safe_load(load_profile("jetson-orin-nano").source.read_text())
    change(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _drop(key: str) -> Any:
    return lambda d: d.pop(key)


def _set(section: str | None, key: str, value: Any) -> Any:
    def change(d: dict[str, Any]) -> None:
        (d[section] if section else d)[key] = value

    return change


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        (_drop("memory_mib"), "memory_mib", "is missing"),
        (lambda d: d["engine"].pop("build_on_device"), "engine.build_on_device", "is missing"),
        (_set(None, "memory_mib", "lots"), "memory_mib", "must be an integer"),
        (_set(None, "memory_mib", True), "memory_mib", "must be an integer"),
        (_set(None, "arch", "riscv64"), "arch", "must be one of"),
        (_set(None, "memroy_mib", 1), "memroy_mib", "not a known field"),
        (_set("quantization", "per_chanel", True), "quantization.per_chanel", "not a known field"),
        (_set("quantization", "per_channel", "yes"), "quantization.per_channel", "true or false"),
        (_set("precisions", "int4", ["CPUExecutionProvider"]), "precisions.int4", "not a known field"),
        (_set(None, "execution_providers", ["CoreMLExecutionProvider"]), "execution_providers", "allowed"),
        (_set(None, "compute_capabilities", ["sm_87"]), "compute_capabilities", "'8.7'"),
        (_set("engine", "tied_to", ["driver"]), "engine.tied_to", "allowed"),
        (_set("match", "jetson_models", []), "match.jetson_models", "accelerator is 'jetson'"),
        (_set("precisions", "int8", ["CoreMLExecutionProvider"]), "precisions.int8", "allowed"),
    ],
)
def test_malformed_profile_names_file_and_field(
    tmp_path: Path, change: Any, field: str, problem: str
) -> None:
    path = _mutated(tmp_path, change)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert str(path) in message
    assert f"'{field}'" in message
    assert problem in message


def test_invalid_yaml_and_non_mapping(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\narch: x86_64\n")
    with pytest.raises(ProfileError, match="not valid YAML") as info:
        load_profile(broken)
    assert str(broken) in str(info.value)
    listed = tmp_path / "list.yaml"
    listed.write_text("- name\n- arch\n")
    with pytest.raises(ProfileError, match="must be a mapping"):
        load_profile(listed)
    with pytest.raises(ProfileError, match="no such profile file"):
        load_profile(tmp_path / "absent.yaml")
