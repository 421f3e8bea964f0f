"""A recipe is data: the passes to run, in order, with their parameters; saved into the manifest.

YAML form (each entry names one pass; parameters are optional)::

    passes:
      - cleanup
      - prune: {ratio: 0.5}
      - quantize: {mode: auto, max_drop: 0.005}
      - mixed_precision: {max_float_fraction: 0.25}
      - tensorrt: {precision: auto}
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from edgectl.compress.errors import BadInputError
from edgectl.compress.passes.cleanup import CleanupConfig
from edgectl.compress.passes.mixed_precision import MixedPrecisionConfig
from edgectl.compress.passes.prune import PruneConfig
from edgectl.compress.passes.tensorrt import TensorRTConfig

QuantizeMode = Literal["auto", "int8-static", "int8-dynamic", "fp16", "none"]
QUANTIZE_MODES: tuple[str, ...] = ("auto", "int8-static", "int8-dynamic", "fp16", "none")


@dataclass(frozen=True)
class QuantizeStep:
    """The quantization search: which mode, whether to measure format candidates, calibration sample cap."""

    mode: QuantizeMode = "auto"
    search: bool = True
    calibration: Literal["auto", "minmax", "entropy", "percentile"] = "auto"
    calib_samples: int = 64


# The pass names a recipe may use, in the only order that makes sense, and their config types.
PASSES: dict[str, type] = {
    "cleanup": CleanupConfig,
    "prune": PruneConfig,
    "quantize": QuantizeStep,
    "mixed_precision": MixedPrecisionConfig,
    "tensorrt": TensorRTConfig,
}


@dataclass(frozen=True)
class Recipe:
    """Pass configs by name, in run order; absent passes do not run."""

    steps: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def get(self, name: str) -> Any:
        """The config of pass ``name``, or None when the recipe does not run it."""
        return next((cfg for n, cfg in self.steps if n == name), None)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data, as it goes into the manifest and back through ``from_dict``."""
        return {"passes": [{name: dataclasses.asdict(cfg)} for name, cfg in self.steps]}

    @classmethod
    def from_dict(cls, data: object, *, source: str = "recipe") -> Recipe:
        """Validate plain data (see the module docstring) into a Recipe."""
        if not isinstance(data, Mapping) or not isinstance(data.get("passes"), list):
            raise BadInputError(f"{source} must be a mapping with a 'passes' list")
        steps: list[tuple[str, Any]] = []
        for entry in data["passes"]:
            name, params = (entry, {}) if isinstance(entry, str) else _single(entry, source)
            if name not in PASSES:
                raise BadInputError(
                    f"{source}: unknown pass {name!r}", hint=f"known passes: {', '.join(PASSES)}"
                )
            if any(n == name for n, _ in steps):
                raise BadInputError(f"{source}: pass {name!r} is listed twice")
            steps.append((name, _config(PASSES[name], params or {}, f"{source}: {name}")))
        order = [n for n in PASSES if any(s == n for s, _ in steps)]
        if [n for n, _ in steps] != order:
            raise BadInputError(f"{source}: passes must run in the order {' -> '.join(PASSES)}")
        return cls(tuple(steps))

    @classmethod
    def load(cls, path: Path) -> Recipe:
        """Read a recipe YAML file."""
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise BadInputError(f"cannot read recipe {path}: {exc}") from exc
        return cls.from_dict(data, source=f"recipe {path.name}")

    @classmethod
    def from_options(cls, *, quantize: str = "auto", prune: float = 0.0, tensorrt: bool = False) -> Recipe:
        """The recipe the CLI flags describe."""
        if quantize not in QUANTIZE_MODES:
            raise BadInputError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
        steps: list[tuple[str, Any]] = [("cleanup", CleanupConfig())]
        if prune:
            steps.append(("prune", PruneConfig(ratio=prune)))
        if quantize != "none":
            steps.append(("quantize", QuantizeStep(mode=quantize)))  # type: ignore[arg-type]
            steps.append(("mixed_precision", MixedPrecisionConfig()))
        if tensorrt:
            steps.append(("tensorrt", TensorRTConfig()))
        return cls(tuple(steps))


def _single(entry: object, source: str) -> tuple[str, Mapping[str, Any] | None]:
    if not isinstance(entry, Mapping) or len(entry) != 1:
        raise BadInputError(
            f"{source}: each pass is a name or a one-key mapping name: {{params}}, got {entry!r}"
        )
    ((name, params),) = entry.items()
    if params is not None and not isinstance(params, Mapping):
        raise BadInputError(f"{source}: parameters of {name!r} must be a mapping")
    return str(name), params


def _config(kind: type, params: Mapping[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise BadInputError(
            f"{where}: unknown parameter(s) {', '.join(unknown)}", hint=f"known: {', '.join(fields)}"
        )
    clean: dict[str, Any] = {}
    hints = typing.get_type_hints(kind)
    for key, value in params.items():
        if typing.get_origin(hints[key]) is Literal and value not in typing.get_args(hints[key]):
            allowed = ", ".join(map(str, typing.get_args(hints[key])))
            raise BadInputError(f"{where}: {key} must be one of {allowed}, got {value!r}")
        default = getattr(kind(), key)
        # YAML gives lists where configs hold tuples, ints where floats are meant.
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default) and default is not None:
            raise BadInputError(f"{where}: {key} must be {type(default).__name__}, got {value!r}")
        clean[key] = value
    return kind(**clean)
