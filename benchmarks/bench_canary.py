"""On-device canary and shadow, measured on this machine (issue targets in parentheses).

1. canary 10 % at 200 req/s (open loop, one agent): the share the candidate answered (10 +- 2 %),
   the agreement and both versions' p99 as the agent would report them after the run;
2. shadow at 0.5x and 2x local capacity, burst off: the current version's share of answers within
   the SLO, shadow off vs on (shadow must not cost more than 1 point), and how many shadow runs
   were skipped to keep it so. At 2x with burst off the box misses the SLO either way; the
   issue's setting (burst on, as in bench_agent.py's SLO section) is not measured here.

Single-threaded ORT, micro-batching off (a small edge box). The load generator runs in a child
process. On a shared host, numbers move with the load average printed first.
Run: python benchmarks/bench_canary.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadgen import run_load  # noqa: E402  (benchmarks/, the script's own folder)

from edgectl.agent.batching import BatchSettings  # noqa: E402
from edgectl.agent.canary import TrialPlan, Trials, TrialSettings  # noqa: E402
from edgectl.agent.codecs import encode_request  # noqa: E402
from edgectl.agent.runtime import SessionSettings, load_model  # noqa: E402
from tests.agent.onnx_models import mlp_model  # noqa: E402
from tests.agent.v2_harness import InProcessV2  # noqa: E402

DIMS = (256, 1024, 1024, 10)
SETTINGS = TrialSettings()  # --cpu-share replaces it


def _stack(work: Path) -> tuple[InProcessV2, Trials]:
    v1 = mlp_model(work / "v1.onnx", DIMS, seeds=[1, 2, 3])
    v2 = mlp_model(work / "v2.onnx", DIMS, seeds=[1, 2, 3])
    served = InProcessV2(v1, version=1, batch=BatchSettings(max_batch_size=1))
    served.registry.pin("m", 1)
    served.registry.install(
        load_model(
            v2, name="m", version=2, digest="sha256:" + "2" * 64, settings=SessionSettings(intra_op_threads=1)
        )
    )
    trials = Trials(served.registry, SETTINGS)
    served.router.trials = trials
    return served, trials


def _wait_idle(trials: Trials) -> None:
    deadline = time.monotonic() + 30
    while not trials.idle() and time.monotonic() < deadline:
        time.sleep(0.05)


def bench_canary(work: Path, quick: bool) -> None:
    seconds = 5.0 if quick else 15.0
    served, trials = _stack(work)
    try:
        trials.set("m", TrialPlan(candidate="2", current="1", percent=10.0))
        got = run_load(["open", served.server.address, "200", str(seconds), "1.0", str(DIMS[0])])
        _wait_idle(trials)
        report = trials.report("m")
        assert report is not None
        by = {v.version: v for v in report.versions}
        total = by["1"].requests + by["2"].requests
        share = by["2"].requests / total
        print(
            f"canary 10% at 200 req/s for {seconds:.0f} s: candidate answered {share:.1%} of {total} "
            f"(goal 10 +- 2 %: {'met' if abs(share - 0.10) <= 0.02 else 'MISSED'}), {int(got['errors'])} errors; "
            f"agreement {report.agreement} ({report.agreement_kind}, {report.compared} rows, "
            f"{report.background_skipped} comparison runs skipped); p99 current {by['1'].p99_ms:.2f} ms, "
            f"candidate {by['2'].p99_ms:.2f} ms"
        )
    finally:
        trials.close()
        served.close()


def bench_shadow(work: Path, quick: bool) -> None:
    seconds = 4.0 if quick else 10.0
    req = encode_request("m", {"x": np.zeros((1, DIMS[0]), np.float32)})
    served, trials = _stack(work)
    try:
        start = time.perf_counter()
        for _ in range(50):
            served.stub.ModelInfer(req)
        per = (time.perf_counter() - start) / 50
    finally:
        trials.close()
        served.close()
    slo_s = max(0.02, 5 * per)
    for load in (0.5, 2.0):
        rate = load / per
        within: dict[str, float] = {}
        skipped = runs = 0
        for mode in ("off", "on"):
            served, trials = _stack(work)
            try:
                if mode == "on":
                    trials.set("m", TrialPlan(candidate="2", current="1", shadow=True))
                got = run_load(
                    ["open", served.server.address, str(rate), str(seconds), str(slo_s), str(DIMS[0])]
                )
                within[mode] = got["within"]
                report = trials.report("m")
                if report is not None:
                    skipped, runs = report.background_skipped, report.background_runs
            finally:
                trials.close()
                served.close()
        cost = (within["off"] - within["on"]) * 100
        print(
            f"shadow at {load:g}x local capacity ({rate:.0f} req/s, SLO {slo_s * 1000:.0f} ms, {seconds:.0f} s): "
            f"within SLO {within['off']:.1%} off, {within['on']:.1%} on (cost {cost:+.1f} points; goal <= 1: "
            f"{'met' if cost <= 1.0 else 'MISSED'}); shadow runs {runs}, skipped {skipped}"
        )


def main() -> None:
    global SETTINGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--shadow-only", action="store_true", help="only the shadow section")
    parser.add_argument("--cpu-share", type=float, default=SETTINGS.cpu_share, help="background CPU budget")
    args = parser.parse_args()
    SETTINGS = TrialSettings(cpu_share=args.cpu_share)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.shadow_only:
            bench_canary(Path(tmp), args.quick)
        bench_shadow(Path(tmp), args.quick)


if __name__ == "__main__":
    main()
