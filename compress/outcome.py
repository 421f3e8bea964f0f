"""What a compress run measured, as the artifact's manifest carries it (``metrics``).

Quality against the float model, latency and the speed-ups (against the model as given and against
the best float graph, like for like), size, MACs, parameters, every trial row and the time taken.
"""

from __future__ import annotations

import platform
from typing import Any

from edgectl.compress.data import SampleSet
from edgectl.compress.evaluate import Evaluator, Trial
from edgectl.compress.quantizer import cpu_has_vnni


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 4)


def artifact_metrics(
    baseline: Trial,
    chosen: Trial,
    trials: list[Trial],
    ev: Evaluator,
    data: SampleSet,
    max_drop: float,
    seconds: float,
    providers: tuple[str, ...],
) -> dict[str, Any]:
    """The manifest's ``metrics``: the artifact format's well-known flat numbers, then the details."""
    assert baseline.quality and chosen.quality
    b_lat, c_lat = baseline.latency, chosen.latency
    floats = [t.latency.p50_ms for t in trials if t.latency and t.stage in ("baseline", "cleanup")]
    best_float = min(floats, default=None)
    return {
        # The artifact format's well-known keys first (flat numbers), then the details.
        "quality_metric": ev.metric,
        "quality_metric_source": ev.scorer.source,
        "baseline_quality": round(baseline.quality.score, 6),
        "compressed_quality": round(chosen.quality.score, 6),
        "quality_drop": round(chosen.drop or 0.0, 6),
        "max_drop": max_drop,
        "min_cosine": round(chosen.quality.min_cosine, 6),
        "eval_samples": data.count,
        "eval_data": data.source,
        "baseline_latency_ms": b_lat.p50_ms if b_lat else None,
        "latency_ms": c_lat.p50_ms if c_lat else None,
        "baseline_latency_p90_ms": b_lat.p90_ms if b_lat else None,
        "latency_p90_ms": c_lat.p90_ms if c_lat else None,
        "speedup": _ratio(b_lat.p50_ms if b_lat else None, c_lat.p50_ms if c_lat else None),
        # Like for like: the float graph after the same clean-up the compressed model had, when faster.
        "speedup_vs_best_float": _ratio(best_float, c_lat.p50_ms if c_lat else None),
        # A model exported at a fixed batch is timed on one such batch (``SampleSet.feed``).
        "latency_measured_on": f"{', '.join(providers)}, intra_op_num_threads=1, batch {data.fixed_batch or 1}, "
        "interleaved, "
        f"{platform.machine()}{' VNNI' if cpu_has_vnni() else ''}",
        "baseline_size_bytes": baseline.size_bytes,
        "size_bytes": chosen.size_bytes,
        "size_ratio": _ratio(baseline.size_bytes, chosen.size_bytes),
        "baseline_macs": baseline.macs,
        "macs": chosen.macs,
        "baseline_params": baseline.params,
        "params": chosen.params,
        "trials": [t.to_dict() for t in trials],
        "time_to_artifact_s": round(seconds, 2),
    }
