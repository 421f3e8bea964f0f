"""On-device canary and shadow, measured on this machine (issue targets in parentheses).

1. canary 10 % at 200 req/s (open loop, one agent): the share the candidate answered (10 +- 2 %),
   the agreement and both versions' p99 as the agent would report them after the run;
2. shadow at 2x local capacity, burst on (a second agent process as the cloud V2 endpoint) and
   burst off: the share of the current version's answers within the SLO, shadow off vs on (shadow
   must not cost more than 1 point), and how many shadow runs were skipped to keep it so; then
   at 0.5x, where the box is often idle and shadow runs on a good share of the requests.

The shadow section is built to survive a loaded host: each round measures local capacity and the
unloaded p99 first, sets the rate to twice that capacity and the SLO to a multiple of that p99,
then runs one open-loop load during which shadow is switched on and off every second (the round
decides which comes first). Requests are classified by when they were sent; each pair of
neighbouring slices gives one paired difference, and the goal is read from their median.

Single-threaded ORT, micro-batching off (a small edge box). The edge agent runs in this process on
CPU 0; the load generator and the cloud endpoint run as child processes on CPU 1, as if other
machines. Numbers move with the load average printed first.
Run: python benchmarks/bench_canary.py [--quick] [--only canary|shadow]
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloud import cloud_endpoint, pin_this_process, split_cpus  # noqa: E402  (benchmarks/)
from loadgen import run_load  # noqa: E402
from sections import run_sections  # noqa: E402
from trace_load import read_trace, start_trace  # noqa: E402

from edgectl.agent.batching import BatchSettings  # noqa: E402
from edgectl.agent.canary import TrialPlan, Trials, TrialSettings  # noqa: E402
from edgectl.agent.codecs import encode_request  # noqa: E402
from edgectl.agent.runtime import SessionSettings, load_model  # noqa: E402
from edgectl.ports import free_port  # noqa: E402
from tests.agent.onnx_models import mlp_model  # noqa: E402
from tests.agent.v2_harness import InProcessV2  # noqa: E402

DIMS = (256, 1024, 1024, 10)
# Shadow at 2x capacity needs request rates the load generator and the cloud can keep up with on
# one spare core: a weight-bound MLP (a few ms a request) that batches well in the cloud.
SHADOW_DIMS = (2048, 8192, 10)
SLO_P99_MULTIPLE = 3.0  # the SLO: this many times the unloaded p99 measured in the same round
SLO_FLOOR_S = 0.02
SLICE_S = 1.0  # shadow is switched on and off every slice of one run
SETTLE_S = 0.25  # requests sent this early in a slice are not counted: the last slice lingers


def _stack(
    work: Path, dims: tuple[int, ...] = DIMS, burst: str | None = None, slo_s: float = 0.1
) -> tuple[InProcessV2, Trials]:
    """v1 current and v2 candidate (same weights) of "m", v1 pinned; a trial hook on the router."""
    tag = "x".join(map(str, dims))
    v1, v2 = work / f"v1-{tag}.onnx", work / f"v2-{tag}.onnx"
    if not v1.exists():
        mlp_model(v1, dims, seeds=[1, 2, 3][: len(dims) - 1])
        mlp_model(v2, dims, seeds=[1, 2, 3][: len(dims) - 1])
    served = InProcessV2(v1, version=1, batch=BatchSettings(max_batch_size=1), burst=burst, slo_s=slo_s)
    served.registry.pin("m", 1)
    served.registry.install(
        load_model(
            v2, name="m", version=2, digest="sha256:" + "2" * 64, settings=SessionSettings(intra_op_threads=1)
        )
    )
    trials = Trials(served.registry, TrialSettings())
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


def _unloaded(served: InProcessV2, dim: int, n: int) -> tuple[float, float]:
    """(median, p99) seconds of ``n`` sequential single-row requests: the box's unloaded service."""
    req = encode_request("m", {"x": np.zeros((1, dim), np.float32)})
    for _ in range(5):
        served.stub.ModelInfer(req)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        served.stub.ModelInfer(req)
        times.append(time.perf_counter() - start)
    times.sort()
    return statistics.median(times), times[min(n - 1, int(0.99 * n))]


def _slices(got: dict[str, list[float]], slo_s: float, seconds: float) -> list[tuple[float, float]]:
    """Per slice of the run: (share of its requests answered within the SLO, share burst), counting
    requests sent after the slice's first ``SETTLE_S`` (the last slice's mode still lingers there)."""
    n = round(seconds / SLICE_S)
    ok, total, burst = [0] * n, [0] * n, [0] * n
    for sent, latency, b in zip(got["sent"], got["latency"], got["burst"], strict=True):
        k = int(sent // SLICE_S)
        if k >= n or sent - k * SLICE_S < SETTLE_S:
            continue
        total[k] += 1
        ok[k] += 0 <= latency <= slo_s
        burst[k] += int(b)
    return [(o / t, b / t) if t else (float("nan"), 0.0) for o, b, t in zip(ok, burst, total, strict=True)]


def _shadow_rounds(work: Path, quick: bool, burst: str | None, cpus: set[int], load: float = 2.0) -> None:
    rounds, seconds = (2, 10.0) if quick else (5, 20.0)
    diffs: list[float] = []  # per pair of neighbouring slices: points within SLO, off minus on
    within: dict[bool, list[float]] = {False: [], True: []}
    bursts: list[float] = []
    runs = skipped = 0
    slos: list[float] = []
    rates: list[float] = []
    plan = TrialPlan(candidate="2", current="1", shadow=True)
    for r in range(rounds):
        served, trials = _stack(work, SHADOW_DIMS, burst)
        try:
            # Capacity and the SLO, measured now: the host's load drifts between rounds.
            per, p99 = _unloaded(served, SHADOW_DIMS[0], 60 if quick else 120)
            slo_s = max(SLO_FLOOR_S, SLO_P99_MULTIPLE * p99)
            rate = load / per
            served.router.settings = dataclasses.replace(served.router.settings, slo_s=slo_s)
            slos.append(slo_s)
            rates.append(rate)
            proc, start_at = start_trace(served.server.address, rate, seconds, SHADOW_DIMS[0], cpus)
            # Shadow on and off in alternating slices of one run; the round sets which comes first.
            modes = [(k + r) % 2 == 1 for k in range(round(seconds / SLICE_S))]
            for k, on in enumerate(modes):
                time.sleep(max(0.0, start_at + k * SLICE_S - time.monotonic()))
                report = trials.report("m")
                if report is not None:
                    runs += report.background_runs
                    skipped += report.background_skipped
                trials.set("m", plan if on else None)
            got = read_trace(proc)
            report = trials.report("m")
            if report is not None:
                runs += report.background_runs
                skipped += report.background_skipped
        finally:
            trials.close()
            served.close()
        slices = _slices(got, slo_s, seconds)
        for k, (share, burst_share) in enumerate(slices):
            within[modes[k]].append(share)
            if modes[k]:
                bursts.append(burst_share)
        # Neighbouring slices as pairs, the first pair left out (the queue is still filling).
        for k in range(2, len(slices) - 1, 2):
            (a, _), (b, _) = slices[k], slices[k + 1]
            off, on = (a, b) if modes[k + 1] else (b, a)
            diffs.append((off - on) * 100)
    cost = statistics.median(diffs)
    quart = statistics.quantiles(diffs, n=4)
    print(
        f"shadow at {load:g}x local capacity, burst {'on' if burst else 'off'} ({statistics.median(rates):.0f} req/s, "
        f"SLO {statistics.median(slos) * 1000:.0f} ms = {SLO_P99_MULTIPLE:g}x the unloaded p99, both "
        f"measured in each round; {rounds} rounds x {seconds:.0f} s, shadow switched every {SLICE_S:g} s; "
        f"MLP {SHADOW_DIMS}): within SLO {statistics.median(within[False]):.1%} shadow off, "
        f"{statistics.median(within[True]):.1%} on (median slices); cost {cost:+.1f} points, median of "
        f"{len(diffs)} paired slices (quartiles {quart[0]:+.1f} to {quart[-1]:+.1f}; goal <= 1: "
        f"{'met' if cost <= 1.0 else 'MISSED'}); burst share with shadow {statistics.median(bursts):.1%}; "
        f"shadow runs {runs}, skipped {skipped}"
    )


def bench_shadow(work: Path, quick: bool) -> None:
    edge_cpus, other_cpus = split_cpus()
    restore = pin_this_process(edge_cpus)
    port = free_port()
    cloud = cloud_endpoint(work, port, SHADOW_DIMS, other_cpus)
    try:
        _shadow_rounds(work, quick, f"127.0.0.1:{port}", other_cpus)
        # Burst off at 2x: the queue only grows, so the SLO is lost with shadow or without.
        _shadow_rounds(work, quick, None, other_cpus)
        # Below capacity the box is often idle and shadow runs on a good share of the requests.
        _shadow_rounds(work, quick, f"127.0.0.1:{port}", other_cpus, load=0.5)
    finally:
        cloud.terminate()
        cloud.wait(10)
        pin_this_process(restore)


SECTIONS: dict[str, Callable[[Path, bool], None]] = {"canary": bench_canary, "shadow": bench_shadow}


if __name__ == "__main__":
    run_sections(__doc__.splitlines()[0], SECTIONS, "edgectl-bench-canary-")
