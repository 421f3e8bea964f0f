"""Which timed model ships: the execution providers timing runs on, the fastest passing candidate, and
the refusal when none passed."""

from __future__ import annotations

from collections.abc import Sequence

from edgectl.compress.errors import QualityGateError
from edgectl.compress.evaluate import Trial
from edgectl.devices import DeviceProfile


def timing_providers(profile: DeviceProfile) -> tuple[tuple[str, ...], bool]:
    """The target's execution providers this onnxruntime has, and whether its first choice is among them."""
    import onnxruntime as ort

    here = set(ort.get_available_providers())
    usable = tuple(
        ep for ep in profile.execution_providers if ep in here and ep != "TensorrtExecutionProvider"
    )
    # TensorRT engines are built, not timed, here: the EP that times an ONNX model here is the next one.
    first = next((ep for ep in profile.execution_providers if ep != "TensorrtExecutionProvider"), "")
    return (usable or ("CPUExecutionProvider",)), first in here


def fastest_passing(passing: list[Trial], tie: float = 0.03) -> Trial:
    """The fastest passing model; within ``tie`` (timing noise) of it, the smallest file wins.

    Files within 1 % of the smallest size are the same size (one set of weights in another layout, a
    padded stem): among those the fastest wins, not the one a few bytes smaller.
    """
    # A model whose timing stopped early lost a paired comparison with a racer still timed: its
    # percentile, over fewer (earlier) rounds, must not beat the winner's on a change of load.
    passing = [t for t in passing if t.latency and not t.latency.stopped_early] or passing
    fastest = min(t.latency.p50_ms for t in passing if t.latency) if any(t.latency for t in passing) else None
    if fastest is None:
        return passing[0]
    close = [t for t in passing if t.latency and t.latency.p50_ms <= fastest * (1 + tie)]
    smallest = min(t.size_bytes or 0 for t in close)
    same_size = [t for t in close if (t.size_bytes or 0) <= smallest * 1.01]
    return min(same_size, key=lambda t: t.latency.p50_ms if t.latency else 0.0)


def off_target_note(profile: DeviceProfile, providers: tuple[str, ...]) -> str:
    """What the user is told when the target's execution provider is not in this onnxruntime."""
    first = next(ep for ep in profile.execution_providers if ep != "TensorrtExecutionProvider")
    return (
        f"timed on {', '.join(providers)}: this onnxruntime lacks {first}, {profile.name}'s execution "
        "provider, so the speed-ups are this host's and no candidate was required to beat the float "
        "model on the target"
    )


# What to do when no quantized model beats the float one.
FLOAT_HINT = "use --quantize none to package the float model, or raise --max-drop"


def nothing_passed(
    candidates: Sequence[Trial], must_beat: bool, max_drop: float, metric: str, profile: str,
    trials: list[dict[str, object]],
) -> QualityGateError:  # fmt: skip
    """The refusal when no candidate passed: they missed ``--max-drop``, or (with a model to beat) some
    were raced clearly slower than it before their full evaluation, which is not a quality miss."""
    raced = [t for t in candidates if t.raced_slower]
    if raced and must_beat:
        others = sum(1 for t in candidates if t.quality is not None and not t.raced_slower)
        missed = f", the other {others} missed --max-drop {max_drop}" if others else ""
        return QualityGateError(
            f"no quantized model is faster than the float model on {profile}: {len(raced)} raced clearly "
            f"slower before their full evaluation ({raced[0].name}: {raced[0].note}){missed}; no artifact written",
            hint=FLOAT_HINT,
            trials=trials,
        )
    scored = [t for t in candidates if t.quality is not None]
    best = max(scored, key=lambda t: t.quality.score if t.quality else 0.0, default=None)
    what = f"best drop {best.drop:.4f} ({best.name})" if best and best.drop is not None else "nothing built"
    return QualityGateError(
        f"no candidate met --max-drop {max_drop} ({metric}); {what}; no artifact written",
        hint="raise --max-drop, pass better --calib data, prune less, or use --quantize none",
        trials=trials,
    )
