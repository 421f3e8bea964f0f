"""Sensitivity-guided mixed precision: when no quantized model meets the budget, keep the worst nodes float.

The nodes are ranked by ``edgectl.compress.sensitivity.rank_nodes``; ``exclusion_steps`` gives
growing sets of the worst nodes to keep in float (1, 2, 4, ... up to the cap), the first set that
meets the budget is then bisected down to the fewest float nodes that still pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from edgectl.compress.evaluate import Trial
from edgectl.compress.passes.base import CompressPass, ModelState, PassContext, PassResult
from edgectl.compress.passes.quantize import SEARCH_NOTE, QuantSearch, SearchResult
from edgectl.compress.sensitivity import NodeSensitivity, rank_nodes


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """At most ``max_float_fraction`` of the quantizable nodes may stay in float."""

    max_float_fraction: float = 0.25
    # Float nodes together may hold at most this share of the quantizable weights: keeping a
    # 12M-parameter embedding table float would buy little quality and give back most of the size.
    max_float_weight_fraction: float = 0.1
    samples: int = 8


def float_candidates(ranked: list[NodeSensitivity], config: MixedPrecisionConfig) -> list[NodeSensitivity]:
    """The ranking, minus nodes too large to keep float within the weight budget (in rank order)."""
    total = sum(s.params for s in ranked) or 1
    budget = config.max_float_weight_fraction * total
    out, used = [], 0
    for s in ranked:
        if used + s.params <= budget:
            out.append(s)
            used += s.params
    return out


def exclusion_steps(ranked: list[NodeSensitivity], config: MixedPrecisionConfig) -> list[int]:
    """How many of the worst nodes to keep float at each retry: 1, 2, 4, ... up to the cap."""
    cap = max(1, int(len(ranked) * config.max_float_fraction))
    steps, k = [], 1
    while k < cap:
        steps.append(k)
        k *= 2
    return [*steps, cap] if ranked else []


class MixedPrecisionPass(CompressPass[MixedPrecisionConfig]):
    """Keep the fewest most-sensitive nodes in float that bring the best quantized model inside the budget."""

    name = "mixed_precision"
    stage = "quantize"
    config = MixedPrecisionConfig

    def run(self, state: ModelState, config: MixedPrecisionConfig, ctx: PassContext) -> PassResult:
        """Nothing to do when a quantized candidate already passes; else rank nodes and retry with floats."""
        note = state.notes.get(SEARCH_NOTE)
        if note is None:
            return PassResult(state, (), {"mixed_precision": _record([], [], ctx.gate.max_drop)})
        found, search = note
        assert isinstance(found, SearchResult) and isinstance(search, QuantSearch)
        best = found.best
        # The ranking simulates int8 weights and activations; a passing candidate needs no float nodes.
        int8 = best is not None and best.mode in ("int8-static", "int8-dynamic")
        if best is None or not int8 or any(t.passed for t in found.trials):
            return PassResult(state, (), {"mixed_precision": _record([], [], ctx.gate.max_drop)})
        ctx.progress("ranking nodes by sensitivity")
        ranking = rank_nodes(found.base, ctx.calib or ctx.data, best, samples=config.samples)
        pool = float_candidates(ranking, config)
        steps = sorted({k for k in exclusion_steps(ranking, config) if k < len(pool)} | {len(pool)})
        trials: list[Trial] = []

        def attempt(k: int) -> bool:
            names = tuple(s.node for s in pool[:k])
            t = search.trial(
                found.base,
                best.with_(exclude=names),
                "mixed-precision",
                f"worst {len(names)} node(s) kept float",
            )
            trials.append(t)
            return bool(t.passed)

        failed, passed_at = 0, None
        for k in steps if pool else []:
            if attempt(k):
                passed_at = k
                break
            failed = k
        # Between the last k that failed and the first that passed, bisect for the fewest float nodes.
        while passed_at is not None and passed_at - failed > 1:
            mid = (failed + passed_at) // 2
            if attempt(mid):
                passed_at = mid
            else:
                failed = mid
        excluded = [s.node for s in pool[:passed_at]] if passed_at is not None else []
        new = replace(state, candidates=state.candidates + tuple(trials))
        return PassResult(
            new, tuple(trials), {"mixed_precision": _record(excluded, ranking, ctx.gate.max_drop)}
        )

    def finish(self, record: dict[str, Any], chosen: Trial) -> dict[str, Any]:
        """The fastest passing model may keep more nodes float than the fewest that passed: report its own."""
        if not chosen.config:
            return record
        info = record["mixed_precision"]
        excluded = [str(n) for n in chosen.config.get("exclude", [])]  # type: ignore[attr-defined]
        return {"mixed_precision": {**info, **_reason(excluded, info["max_drop"])}}


def _reason(excluded: list[str], max_drop: float) -> dict[str, Any]:
    text = f"kept the {len(excluded)} most sensitive node(s) in float to meet max_drop={max_drop}"
    return {"excluded": excluded, "reason": text if excluded else ""}


def _record(excluded: list[str], ranking: list[NodeSensitivity], max_drop: float) -> dict[str, Any]:
    shown = [s.to_dict() for s in ranking[: max(10, len(excluded))]]
    return {**_reason(excluded, max_drop), "ranking": shown, "max_drop": max_drop}
