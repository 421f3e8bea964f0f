"""What one device's reported state means for the rollout moving it, right now.

Healthy (smoke test passed and, with a soak, its error rate, p99 and the trial gate held for the
soak), failed (a refusal it reported for this desired state, a missed soak bound, or no healthy
report before the deadline), skipped (decommissioned, or offline with the skip policy), or still
waiting (with the maintenance window it waits for). Pure: the controller acts on the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgectl.control_plane import rollout_store as rs
from edgectl.control_plane.strategy import OFFLINE_SKIP
from edgectl.control_plane.trial_gate import judge_trial


@dataclass(frozen=True)
class Verdict:
    """What a device's reported state means for the rollout right now."""

    state: int  # a device rollout state, or D_DESIRED to keep waiting
    reason: str = ""
    soak_started: bool = False


def judge_device(
    r: rs.RolloutRecord, p: rs.ProgressRecord, live: rs.LiveDevice | None, now: float
) -> Verdict:
    """Judge one device of a wave from its latest reported state (soak, trial gate, deadline, window)."""
    if live is None:
        return Verdict(rs.D_SKIPPED, "decommissioned during the rollout")
    s = r.strategy
    model = live.models.get(r.artifact_name)
    if model and model.digest == r.artifact_digest and model.smoke_test_passed:
        if s.soak_s <= 0:
            return Verdict(rs.D_HEALTHY)
        error_rate, p99 = float(live.stats.get("error_rate", 0.0)), float(live.stats.get("p99_ms", 0.0))
        if s.max_error_rate and error_rate > s.max_error_rate:
            return Verdict(
                rs.D_FAILED, f"error rate {error_rate:.3f} above {s.max_error_rate:.3f} during soak"
            )
        if s.max_p99_ms and p99 > s.max_p99_ms:
            return Verdict(rs.D_FAILED, f"p99 latency {p99:.1f} ms above {s.max_p99_ms:.1f} ms during soak")
        if s.trial and p.previous_digest not in ("", r.artifact_digest):
            trial_verdict = judge_trial(r, p, model, now)
            if trial_verdict is not None:
                return Verdict(*trial_verdict)
        if p.healthy_since is None:
            return Verdict(rs.D_DESIRED, soak_started=True)
        return Verdict(rs.D_HEALTHY) if now - p.healthy_since >= s.soak_s else Verdict(rs.D_DESIRED)
    # A failure counts only once the device has seen this desired state, not from an old report.
    if model and model.failed_digest == r.artifact_digest and live.observed_generation >= p.generation:
        return Verdict(rs.D_FAILED, model.failure_reason or "the device refused the artifact")
    waiting = model is not None and model.staged_digest == r.artifact_digest
    if p.deadline is not None and now >= p.deadline:
        if not live.online:
            if s.offline_policy == OFFLINE_SKIP:
                return Verdict(rs.D_SKIPPED, f"offline for the whole {s.health_timeout_s}s health timeout")
            return Verdict(rs.D_FAILED, f"offline: no healthy report within {s.health_timeout_s}s")
        return Verdict(rs.D_FAILED, f"not healthy within the {s.health_timeout_s}s health timeout")
    return Verdict(rs.D_DESIRED, f"staged, waiting for the window {s.window}" if waiting else "")
