"""Drift-watch overhead on a ~1 ms model (goal <= 5 % of the request's cost).

An in-process V2 stack serves an MLP (16 features -> 2048 -> 2048 -> 16, one row per request,
~1 ms single-threaded) whose model carries a calibration summary, so each local request also
samples its inputs into the live sketch (16 per-column histograms: the costliest layout). A
sequential gRPC client times requests with the watch on and off alternating request by request
(the end-to-end ratio: the median over rounds of median(on) / median(off)), and the watch's own time inside
the request path is measured; the direct cost of one ``LiveSketch.observe`` against one session
run is printed too.
Run: python benchmarks/bench_drift.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgectl.agent.batching import BatchSettings  # noqa: E402
from edgectl.agent.codecs import encode_request  # noqa: E402
from edgectl.artifact import LiveSketch, summarize_inputs  # noqa: E402
from tests.agent.onnx_models import mlp_model  # noqa: E402
from tests.agent.v2_harness import InProcessV2  # noqa: E402

DIMS = (16, 2048, 2048, 16)
GOAL = 0.05


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and requests")
    args = ap.parse_args()
    rounds, n = (5, 200) if args.quick else (11, 1000)
    rng = np.random.default_rng(0)
    summary = summarize_inputs({"x": rng.standard_normal((2000, DIMS[0])).astype(np.float32)})
    with tempfile.TemporaryDirectory() as tmp:
        path = mlp_model(Path(tmp) / "mlp.onnx", DIMS)
        x = rng.standard_normal((1, DIMS[0])).astype(np.float32)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        sketch = LiveSketch(summary)
        run_s = min(timeit.repeat(lambda: sess.run(None, {"x": x}), number=200, repeat=7)) / 200
        obs_s = min(timeit.repeat(lambda: sketch.observe({"x": x}), number=200, repeat=7)) / 200
        print(
            f"direct: session run {run_s * 1e6:.0f} us, sketch observe {obs_s * 1e6:.1f} us "
            f"({obs_s / run_s:.1%} of the model; goal <= {GOAL:.0%}: {'met' if obs_s / run_s <= GOAL else 'MISSED'})"
        )
        stack = InProcessV2(path, batch=BatchSettings(max_batch_size=1), input_summary=summary)
        served = stack.registry.get("m")
        assert served is not None and served.drift is not None
        live = served.drift
        in_path: list[float] = []
        observe = live.observe

        def timed_observe(feeds: dict[str, np.ndarray]) -> None:
            t0 = time.perf_counter()
            observe(feeds)
            in_path.append(time.perf_counter() - t0)

        live.observe = timed_observe  # type: ignore[method-assign]
        req = encode_request("m", {"x": x})
        pairs: list[float] = []
        t_on: list[float] = []
        t_off: list[float] = []
        for _ in range(rounds):
            # The same stack with the watch on and off, alternating request by request: neighbours
            # share the host's state, so a slow spell lands on both sides. Each round gives one
            # ratio of medians; their spread says how far to trust the median of them.
            got: dict[bool, list[float]] = {True: [], False: []}
            for i in range(2 * n):
                on = bool(i % 2)
                served.drift = live if on else None
                start = time.perf_counter()
                stack.stub.ModelInfer(req, timeout=60)
                got[on].append(time.perf_counter() - start)
            t_on.extend(got[True])
            t_off.extend(got[False])
            pairs.append(statistics.median(got[True]) / statistics.median(got[False]))
        assert live.score() is not None
        stack.close()
    on, off = statistics.median(t_on), statistics.median(t_off)
    cost = statistics.median(in_path)
    share = cost / off
    ratio = statistics.median(pairs)
    print(
        f"in the request path (sequential gRPC, {rounds} rounds of {n} requests each way): request "
        f"{off * 1e6:.0f} us without the watch; the watch's observe {cost * 1e6:.1f} us median = "
        f"{share:.1%} of it (goal <= {GOAL:.0%}: {'met' if share <= GOAL else 'MISSED'})"
    )
    print(
        f"end to end (real V2 gRPC server, drift on vs off alternating per request, {rounds} rounds of "
        f"{n} each way): request time ratio on/off {ratio:.3f}, median of the rounds' ratios of medians "
        f"(rounds {min(pairs):.3f}-{max(pairs):.3f}); all requests {on * 1e6:.0f} vs {off * 1e6:.0f} us "
        f"(goal <= {1 + GOAL:.2f}: {'met' if ratio <= 1 + GOAL else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
