"""The recipe and the pass contract: every pass runs through one ``run(state, config, ctx)``."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgectl.compress.evaluate import Trial
from edgectl.compress.passes.base import STAGES, CompressPass, ModelState, PassContext, PassResult
from edgectl.compress.passes.cleanup import CleanupConfig
from edgectl.compress.passes.tensorrt import TensorRTConfig
from edgectl.compress.pipeline import CompressRequest, run
from edgectl.compress.recipe import Recipe


def test_each_field_names_its_pass_and_stages_follow_the_run_order() -> None:
    fields = dataclasses.fields(Recipe)
    kinds = [f.metadata["pass"] for f in fields]
    assert [k.name for k in kinds] == [f.name for f in fields]
    ranks = [STAGES.index(k.stage) for k in kinds]
    assert ranks == sorted(ranks)
    assert all(dataclasses.is_dataclass(k.config) for k in kinds)


def test_a_tensorrt_recipe_never_fuses_contrib_ops() -> None:
    assert Recipe(cleanup=CleanupConfig(), tensorrt=TensorRTConfig()).cleanup == CleanupConfig(
        fuse_transformer=False
    )
    assert Recipe.from_options(tensorrt=True).to_dict()["passes"][0]["cleanup"]["fuse_transformer"] is False
    assert Recipe.from_options().cleanup == CleanupConfig()


@dataclass(frozen=True)
class CopyConfig:
    """A pass the project does not ship: copies the float model and says so."""

    label: str = "copied"


class CopyPass(CompressPass[CopyConfig]):
    """Writes a byte copy of the float model and scores it as its own row."""

    name = "copy"
    stage = "float"
    config = CopyConfig

    def run(self, state: ModelState, config: CopyConfig, ctx: PassContext) -> PassResult:
        out = ctx.path("copy")
        shutil.copyfile(state.model, out)
        trial = ctx.judge(Trial(config.label, "copy", out))
        return PassResult(replace(state, model=out, base=trial), (trial,), {"copy": {"label": config.label}})


@dataclass(frozen=True)
class RecipeWithCopy(Recipe):
    """A new pass is a class and one recipe field."""

    copy: CopyConfig | None = field(default=None, metadata={"pass": CopyPass()})


def test_a_new_pass_is_one_class_and_one_recipe_field(
    tiny_onnx: Path, images: np.ndarray, tmp_path: Path
) -> None:
    recipe: Any = RecipeWithCopy.from_dict({"passes": [{"copy": {"label": "my copy"}}]})
    assert recipe.copy == CopyConfig("my copy") and recipe.quantize is None
    np.savez(tmp_path / "eval.npz", image=images)
    out = tmp_path / "out"
    result = run(
        CompressRequest(model=str(tiny_onnx), out_dir=out, recipe=recipe, eval=tmp_path / "eval.npz",
                        latency_rounds=1)
    )  # fmt: skip
    assert [t.name for t in result.trials] == ["float (baseline)", "my copy"]
    assert result.chosen.name == "my copy" and result.chosen.drop == 0.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["copy"] == {"label": "my copy"}
    assert manifest["recipe"]["recipe"] == {"passes": [{"copy": {"label": "my copy"}}]}


def test_the_quality_gate_is_one_rule_with_its_margins() -> None:
    from edgectl.compress.evaluate import QualityGate

    gate = QualityGate(0.005)
    assert gate.admits(0.005) and gate.admits(0.005 + 1e-13) and not gate.admits(0.0051)
    assert gate.within_reach(0.0068) and not gate.within_reach(
        0.02
    )  # smoothing closes the first, not the second
    assert not gate.hopeless(0.05) and gate.hopeless(0.06)
    assert (
        QualityGate(0.0).hopeless(0.051)
        and QualityGate(0.1).hopeless(0.51)
        and not QualityGate(0.1).hopeless(0.5)
    )
    # A cosine moves smoothly: five budgets (and a point over the budget) is already far enough.
    assert (
        QualityGate(0.005).hopeless(0.026, continuous=True)
        and not QualityGate(0.005).hopeless(0.024, continuous=True)
        and not QualityGate(0.0).hopeless(0.009, continuous=True)
        and QualityGate(0.0).hopeless(0.011, continuous=True)
    )
