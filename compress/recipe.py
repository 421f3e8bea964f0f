"""A recipe is data: which passes run, with their typed parameters; saved into the manifest.

YAML form (each entry names one pass; parameters are optional; order is the run order below)::

    passes:
      - cleanup
      - prune: {ratio: 0.5}
      - quantize: {mode: auto}
      - mixed_precision: {max_float_fraction: 0.25}
      - layout: {channels_last: true}
      - tensorrt: {precision: auto}

Adding a pass: write ``passes/<name>.py`` (a config dataclass and a ``CompressPass``) and add one
field here, at its place in the run order.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from edgectl.compress.errors import BadInputError
from edgectl.compress.passes.base import CompressPass
from edgectl.compress.passes.cleanup import CleanupConfig, CleanupPass
from edgectl.compress.passes.layout import LayoutConfig, LayoutPass
from edgectl.compress.passes.mixed_precision import MixedPrecisionConfig, MixedPrecisionPass
from edgectl.compress.passes.prune import DEFAULT_FINETUNE_EPOCHS, PruneConfig, PrunePass
from edgectl.compress.passes.quant_modes import QuantizeConfig
from edgectl.compress.passes.quantize import QuantizePass
from edgectl.compress.passes.tensorrt import TensorRTConfig, TensorRTPass
from edgectl.compress.quantizer import QUANTIZE_MODES

# --prune auto tries these, largest first. On small models fixed per-op costs dominate int8 latency,
# so only ratios well past one half buy much more speed: 7/8 is worth a try where recovery trains.
AUTO_PRUNE_RATIOS: tuple[float, ...] = (0.875, 0.75, 0.5, 0.25)


@dataclass(frozen=True)
class Recipe:
    """One optional, typed config per pass, in run order; a pass whose config is None does not run.

    Each field's metadata names the pass that runs it; the field name is the pass's name.
    """

    cleanup: CleanupConfig | None = field(default=None, metadata={"pass": CleanupPass()})
    prune: PruneConfig | None = field(default=None, metadata={"pass": PrunePass()})
    quantize: QuantizeConfig | None = field(default=None, metadata={"pass": QuantizePass()})
    mixed_precision: MixedPrecisionConfig | None = field(
        default=None, metadata={"pass": MixedPrecisionPass()}
    )
    layout: LayoutConfig | None = field(default=None, metadata={"pass": LayoutPass()})
    tensorrt: TensorRTConfig | None = field(default=None, metadata={"pass": TensorRTPass()})

    def __post_init__(self) -> None:
        if self.tensorrt is not None and self.cleanup is not None and self.cleanup.fuse_transformer:
            # TensorRT's ONNX parser reads only standard ops: no contrib-op fusions for an engine build.
            object.__setattr__(self, "cleanup", dataclasses.replace(self.cleanup, fuse_transformer=False))

    def passes(self) -> Iterator[tuple[CompressPass[Any], Any]]:
        """Each pass that runs, with its config, in run order."""
        for f in dataclasses.fields(self):
            config = getattr(self, f.name)
            if config is not None:
                yield f.metadata["pass"], config

    def get(self, name: str) -> Any:
        """The config of pass ``name``, or None when the recipe does not run it."""
        return getattr(self, name) if name in {f.name for f in dataclasses.fields(self)} else None

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data, as it goes into the manifest and back through ``from_dict``."""
        return {"passes": [{p.name: dataclasses.asdict(cfg)} for p, cfg in self.passes()]}

    @classmethod
    def from_dict(cls, data: object, *, source: str = "recipe") -> Recipe:
        """Validate plain data (see the module docstring) into a Recipe."""
        if not isinstance(data, Mapping) or not isinstance(data.get("passes"), list):
            raise BadInputError(f"{source} must be a mapping with a 'passes' list")
        kinds = {f.name: f.metadata["pass"] for f in dataclasses.fields(cls)}
        configs: dict[str, Any] = {}
        order: list[str] = []
        for entry in data["passes"]:
            name, params = (entry, {}) if isinstance(entry, str) else _single(entry, source)
            if name not in kinds:
                raise BadInputError(
                    f"{source}: unknown pass {name!r}", hint=f"known passes: {', '.join(kinds)}"
                )
            if name in configs:
                raise BadInputError(f"{source}: pass {name!r} is listed twice")
            configs[name] = _config(kinds[name].config, params or {}, f"{source}: {name}")
            order.append(name)
        if order != [n for n in kinds if n in configs]:
            raise BadInputError(f"{source}: passes must run in the order {' -> '.join(kinds)}")
        return cls(**configs)

    @classmethod
    def load(cls, path: Path) -> Recipe:
        """Read a recipe YAML file."""
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise BadInputError(f"cannot read recipe {path}: {exc}") from exc
        return cls.from_dict(data, source=f"recipe {path.name}")

    @classmethod
    def from_options(
        cls,
        *,
        quantize: str = "auto",
        prune: float | str = 0.0,
        tensorrt: bool = False,
        finetune_epochs: int | None = None,
    ) -> Recipe:
        """The recipe the CLI flags describe (``prune="auto"``: the largest of ``AUTO_PRUNE_RATIOS`` that passes)."""
        if quantize not in QUANTIZE_MODES:
            raise BadInputError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
        quantizing = quantize != "none"
        return cls(
            cleanup=CleanupConfig(),
            prune=_prune_config(prune, finetune_epochs or DEFAULT_FINETUNE_EPOCHS),
            quantize=QuantizeConfig(mode=quantize) if quantizing else None,  # type: ignore[arg-type]
            mixed_precision=MixedPrecisionConfig() if quantizing else None,
            layout=LayoutConfig() if quantizing else None,  # skips itself where int8 is not on ORT's CPU EP
            tensorrt=TensorRTConfig() if tensorrt else None,
        )


def _prune_config(prune: float | str, epochs: int) -> PruneConfig | None:
    if prune == "auto":
        return PruneConfig(ratio=AUTO_PRUNE_RATIOS[0], finetune_epochs=epochs, ratios=AUTO_PRUNE_RATIOS)
    try:
        ratio = float(prune)
    except ValueError:
        raise BadInputError(f"--prune must be a fraction in [0, 1) or auto, got {prune!r}") from None
    if not 0.0 <= ratio < 1.0:
        raise BadInputError(
            f"--prune must be a fraction in [0, 1) or auto, got {prune!r}", hint="e.g. --prune 0.5"
        )
    return PruneConfig(ratio=ratio, finetune_epochs=epochs) if ratio else None


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
