"""Device profiles: typed, validated views of the YAML files in ``devices/profiles/``.

A profile says what a class of device can run (precisions per execution provider, EP
order, memory for models), how compress should quantize for it (hints only: compress
measures candidates anyway), and when a TensorRT engine built elsewhere is usable on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NoReturn, cast

import yaml

from edgectl.devices.errors import ProfileError

Arch = Literal["x86_64", "aarch64"]
Accelerator = Literal["none", "cuda", "jetson"]
Precision = Literal["fp32", "fp16", "int8"]
IntType = Literal["u8", "s8"]

ARCHES: tuple[Arch, ...] = ("x86_64", "aarch64")
ACCELERATORS: tuple[Accelerator, ...] = ("none", "cuda", "jetson")
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8")
INT_TYPES: tuple[IntType, ...] = ("u8", "s8")
EXECUTION_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
# What a TensorRT engine can be tied to; the agent compares these before loading one.
ENGINE_KEYS = ("tensorrt_version", "compute_capability", "device_model")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_CC_RE = re.compile(r"^\d+\.\d+$")


@dataclass(frozen=True)
class PrecisionProviders:
    """Which execution providers run each precision on this device (empty: not at all)."""

    fp32: tuple[str, ...]
    fp16: tuple[str, ...]
    int8: tuple[str, ...]


@dataclass(frozen=True)
class QuantizationHints:
    """Where to start the int8 search for this device; compress still measures."""

    format: Literal["qdq", "qoperator"]
    activation_type: IntType
    weight_type: IntType
    per_channel: bool
    symmetric_activations: bool
    # 7-bit weights avoid the VPMADDUBSW saturation of AVX2 CPUs without VNNI.
    reduce_range: bool
    # The CPU instruction that makes int8 fast here (avx512_vnni, avx_vnni, asimddp), if any.
    int8_dot_product: str | None


@dataclass(frozen=True)
class SparsitySupport:
    """Whether pruned weights can become speed here, not just smaller files."""

    unstructured: bool
    structured_2_4: bool


@dataclass(frozen=True)
class MatchRules:
    """The host facts a machine must show to be mapped to this profile."""

    cpu_features_all: tuple[str, ...]
    cpu_features_any: tuple[str, ...]
    # Substrings of /proc/device-tree/model; only Jetson profiles set them.
    jetson_models: tuple[str, ...]


@dataclass(frozen=True)
class EngineTarget:
    """What one TensorRT engine was built for, or what a host offers."""

    tensorrt_version: str
    compute_capability: str
    device_model: str


@dataclass(frozen=True)
class EngineRules:
    """When a serialized TensorRT engine may be reused instead of rebuilt."""

    tensorrt: bool
    tensorrt_major: int | None
    jetpack: str | None
    tied_to: tuple[str, ...]
    portable_across_device_models: bool
    build_on_device: bool

    def compatible(self, built_for: EngineTarget, host: EngineTarget) -> tuple[bool, str]:
        """Say whether an engine built for ``built_for`` may run on ``host``, and why not."""
        if not self.tensorrt:
            return False, "this profile does not use TensorRT engines"
        keys = set(self.tied_to)
        if not self.portable_across_device_models:
            keys.add("device_model")
        for key in ENGINE_KEYS:
            if key in keys and getattr(built_for, key) != getattr(host, key):
                return False, (
                    f"engine built for {key}={getattr(built_for, key)!r}, "
                    f"host has {getattr(host, key)!r}; rebuild the engine on this device"
                )
        return True, "engine matches " + ", ".join(k for k in ENGINE_KEYS if k in keys)


@dataclass(frozen=True)
class DeviceProfile:
    """One class of target device, as compress, the control plane and the agent see it."""

    name: str
    description: str
    arch: Arch
    memory_mib: int
    accelerator: Accelerator
    compute_capabilities: tuple[str, ...]
    execution_providers: tuple[str, ...]
    precisions: PrecisionProviders
    quantization: QuantizationHints
    sparsity: SparsitySupport
    match: MatchRules
    engine: EngineRules
    source: Path

    def supports(self, precision: str) -> bool:
        """Whether some execution provider of this device runs ``precision``."""
        return bool(self.providers_for(precision))

    def providers_for(self, precision: str) -> tuple[str, ...]:
        """The execution providers, in preference order, that run ``precision`` here."""
        if precision not in PRECISIONS:
            return ()
        allowed = set(getattr(self.precisions, precision))
        return tuple(ep for ep in self.execution_providers if ep in allowed)


class _Section:
    """Reads one YAML mapping with type checks; every error names the file and field."""

    def __init__(self, data: object, source: Path, where: str) -> None:
        self.source, self.where = source, where
        if not isinstance(data, dict):
            self.fail(where or "<top level>", f"must be a mapping, got {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.seen: set[str] = set()

    def fail(self, field: str, problem: str) -> NoReturn:
        raise ProfileError(
            f"{self.source}: field '{field}' {problem}",
            hint="fix the profile; see devices/profiles/*.yaml for the schema",
        )

    def _path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def _get(self, key: str) -> Any:
        self.seen.add(key)
        if key not in self.data:
            self.fail(self._path(key), "is missing")
        return self.data[key]

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str) or not value.strip():
            self.fail(self._path(key), f"must be a non-empty string, got {value!r}")
        return value

    def optional_text(self, key: str) -> str | None:
        """A string or an explicit null: the key must still be present, so typos surface."""
        return None if self._get(key) is None else self.text(key)

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self.text(key)
        if value not in allowed:
            self.fail(self._path(key), f"must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def integer(self, key: str, minimum: int = 0) -> int:
        value = self._get(key)
        # bool is an int in Python; `memory_mib: true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(self._path(key), f"must be an integer >= {minimum}, got {value!r}")
        return value

    def optional_integer(self, key: str, minimum: int = 0) -> int | None:
        return None if self._get(key) is None else self.integer(key, minimum)

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            self.fail(self._path(key), f"must be true or false, got {value!r}")
        return value

    def names(self, key: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
        value = self._get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(self._path(key), f"must be a list of strings, got {value!r}")
        for item in value:
            if allowed is not None and item not in allowed:
                self.fail(self._path(key), f"has {item!r}; allowed: {', '.join(allowed)}")
        if len(set(value)) != len(value):
            self.fail(self._path(key), f"lists a name twice: {value!r}")
        return tuple(value)

    def section(self, key: str) -> _Section:
        return _Section(self._get(key), self.source, self._path(key))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            self.fail(self._path(unknown[0]), "is not a known field (typo?)")


def _parse(raw: object, source: Path) -> DeviceProfile:
    top = _Section(raw, source, "")
    name = top.text("name")
    if not _NAME_RE.match(name):
        top.fail("name", f"must be lower-case letters, digits and dashes, got {name!r}")
    arch = cast(Arch, top.choice("arch", ARCHES))
    accelerator = cast(Accelerator, top.choice("accelerator", ACCELERATORS))
    ccs = top.names("compute_capabilities")
    for cc in ccs:
        if not _CC_RE.match(cc):
            top.fail("compute_capabilities", f"has {cc!r}; write compute capabilities as '8.7'")
    if (accelerator == "none") == bool(ccs):
        top.fail("compute_capabilities", f"must be empty exactly when accelerator is 'none' ({name})")
    eps = top.names("execution_providers", EXECUTION_PROVIDERS)

    prec = top.section("precisions")
    by_precision = {p: prec.names(p, eps) if p in prec.data else () for p in PRECISIONS}
    prec.seen.update(PRECISIONS)
    prec.done()
    precisions = PrecisionProviders(**by_precision)
    if not precisions.fp32:
        top.fail("precisions.fp32", "must name at least one execution provider")

    q = top.section("quantization")
    quant = QuantizationHints(
        format=cast(Literal["qdq", "qoperator"], q.choice("format", ("qdq", "qoperator"))),
        activation_type=cast(IntType, q.choice("activation_type", INT_TYPES)),
        weight_type=cast(IntType, q.choice("weight_type", INT_TYPES)),
        per_channel=q.flag("per_channel"),
        symmetric_activations=q.flag("symmetric_activations"),
        reduce_range=q.flag("reduce_range"),
        int8_dot_product=q.optional_text("int8_dot_product"),
    )
    q.done()

    s = top.section("sparsity")
    sparsity = SparsitySupport(unstructured=s.flag("unstructured"), structured_2_4=s.flag("structured_2_4"))
    s.done()

    m = top.section("match")
    match = MatchRules(
        cpu_features_all=m.names("cpu_features_all"),
        cpu_features_any=m.names("cpu_features_any"),
        jetson_models=m.names("jetson_models"),
    )
    m.done()
    if (accelerator == "jetson") != bool(match.jetson_models):
        top.fail("match.jetson_models", "must be set exactly when accelerator is 'jetson'")

    e = top.section("engine")
    engine = EngineRules(
        tensorrt=e.flag("tensorrt"),
        tensorrt_major=e.optional_integer("tensorrt_major", minimum=8),
        jetpack=e.optional_text("jetpack"),
        tied_to=e.names("tied_to", ENGINE_KEYS),
        portable_across_device_models=e.flag("portable_across_device_models"),
        build_on_device=e.flag("build_on_device"),
    )
    e.done()
    if engine.tensorrt != ("TensorrtExecutionProvider" in eps):
        top.fail("engine.tensorrt", "must be true exactly when TensorrtExecutionProvider is listed")

    profile = DeviceProfile(
        name=name,
        description=top.text("description"),
        arch=arch,
        memory_mib=top.integer("memory_mib", minimum=64),
        accelerator=accelerator,
        compute_capabilities=ccs,
        execution_providers=eps,
        precisions=precisions,
        quantization=quant,
        sparsity=sparsity,
        match=match,
        engine=engine,
        source=source,
    )
    top.done()
    return profile


def _profiles_dir() -> Path:
    return Path(str(resources.files("edgectl.devices").joinpath("profiles")))


def list_profiles() -> list[str]:
    """The names of the profiles shipped with edgectl, sorted."""
    return sorted(p.stem for p in _profiles_dir().glob("*.yaml"))


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load a shipped profile by name, or any profile YAML by path, validated."""
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith((".yaml", ".yml")) or path.is_file()):
        path = _profiles_dir() / f"{text}.yaml"
        # A name is never a path: "../x" must not reach outside the shipped profiles.
        if not _NAME_RE.match(text) or not path.is_file():
            raise ProfileError(
                f"unknown device profile {text!r}",
                hint=f"known profiles: {', '.join(list_profiles())}; or pass a path to a .yaml file",
            )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such profile file", hint="check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read the profile: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}", hint="fix the YAML syntax") from exc
    profile = _parse(raw, path)
    if path.parent == _profiles_dir() and profile.name != path.stem:
        raise ProfileError(f"{path}: field 'name' is {profile.name!r} but the file is {path.stem}.yaml")
    return profile


def load_all_profiles() -> list[DeviceProfile]:
    """Every shipped profile, loaded and validated, sorted by name."""
    return [load_profile(name) for name in list_profiles()]
