"""The soak gate of a canary or shadow rollout: what a device's reported trial means.

A device on trial reports (``ReportedState.models[].trial``, kept by the fleet as
``ModelState.trial``) each version's p99 and the agreement between the two. The gate waits until
those are known, fails a device whose candidate agrees too little or is too slow against the
current version, and lets the soak run otherwise; the controller promotes a device that passes.
"""

from __future__ import annotations

from edgectl.control_plane import rollout_store as rs
from edgectl.control_plane.device_state import ModelState

# Agreement counts as known once this many output rows were compared on the device.
MIN_TRIAL_ROWS = 20
# A p99 is judged once each version served this many requests. Over ~20 requests a p99 is the slowest
# one, so one scheduling hiccup of a busy device (300 ms against 0.5 ms) failed an agreeing candidate.
MIN_P99_REQUESTS = 100


def judge_trial(
    r: rs.RolloutRecord, p: rs.ProgressRecord, model: ModelState, now: float
) -> tuple[int, str] | None:
    """The trial's gate as (state, reason): None to go on soaking, D_DESIRED while the measurements
    are not yet known (an agent too old to report them fails at the health timeout), or D_FAILED."""
    s, trial = r.strategy, model.trial or {}
    versions = trial.get("versions", {})
    current = versions.get(str(trial.get("current_version", "")), {})
    candidate = versions.get(str(trial.get("candidate_version", "")), {})
    agreement = trial.get("agreement")
    known = (
        trial.get("candidate_version") == r.artifact_version
        and int(trial.get("compared", 0)) >= MIN_TRIAL_ROWS
        and agreement is not None
        and float(current.get("p99_ms", 0.0)) > 0
        and float(candidate.get("p99_ms", 0.0)) > 0
    )
    if not known:
        if p.deadline is not None and now >= p.deadline:
            why = "no trial report" if not trial else f"{trial.get('compared', 0)} row(s) compared"
            return (
                rs.D_FAILED,
                f"agreement and per-version p99 not known within the {s.health_timeout_s}s health timeout "
                f"({why}; is the agent older than canary/shadow, or serving no traffic?)",
            )
        return rs.D_DESIRED, ""
    assert agreement is not None
    kind = trial.get("agreement_kind", "")
    if s.min_agreement and float(agreement) < s.min_agreement:
        return (
            rs.D_FAILED,
            f"candidate agrees with the current version on {float(agreement):.3f} ({kind}, "
            f"{trial.get('compared')} rows), below {s.min_agreement:.3f}",
        )
    p99_current, p99_candidate = float(current["p99_ms"]), float(candidate["p99_ms"])
    served = min(int(current.get("requests", 0)), int(candidate.get("requests", 0)))
    if s.max_p99_ratio and served < MIN_P99_REQUESTS:
        # Agreement is judged (above); the latency gate waits for a p99 that is not one request's time.
        if p.deadline is not None and now >= p.deadline:
            return (
                rs.D_FAILED,
                f"p99 not judged within the {s.health_timeout_s}s health timeout: a version served {served} "
                f"request(s), the latency gate needs {MIN_P99_REQUESTS} of each (raise --canary-traffic or "
                "--soak, or drop --max-p99-ratio)",
            )
        return rs.D_DESIRED, ""
    if s.max_p99_ratio and p99_candidate > s.max_p99_ratio * p99_current:
        return (
            rs.D_FAILED,
            f"candidate p99 {p99_candidate:.2f} ms above {s.max_p99_ratio:g} x current p99 {p99_current:.2f} ms",
        )
    return None


def trial_summary(r: rs.RolloutRecord, live: rs.LiveDevice | None) -> str:
    """What the device measured of the candidate, for the promotion event."""
    model = live.models.get(r.artifact_name) if live else None
    trial = (model.trial if model else None) or {}
    versions = trial.get("versions", {})
    p99 = [
        float(versions.get(str(trial.get(k)), {}).get("p99_ms", 0.0))
        for k in ("candidate_version", "current_version")
    ]
    agreement = trial.get("agreement")
    measured = (
        f": {trial.get('mode')} agreement {float(agreement):.3f} ({trial.get('agreement_kind')}, "
        f"{trial.get('compared')} rows), p99 {p99[0]:.2f} ms vs {p99[1]:.2f} ms current"
        if agreement is not None
        else ""
    )
    return f"candidate is now the active version{measured}"
