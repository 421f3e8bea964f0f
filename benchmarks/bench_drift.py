"""Drift-watch overhead on a ~1 ms model (goal <= 5 % of the request's cost).

An in-process V2 stack serves an MLP (16 features -> 2048 -> 2048 -> 16, one row per request,
~1 ms single-threaded) whose model carries a calibration summary, so each local request also
samples its inputs into the live sketch (16 per-column histograms: the costliest layout). A
sequential gRPC client times requests with the watch on and off in alternating rounds, and the
watch's own time inside the request path is measured; the direct cost of one
``LiveSketch.observe`` against one session run is printed too.
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
BLOCK = 50


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
        t_on: list[float] = []
        t_off: list[float] = []
        for r in range(rounds * n // BLOCK):
            # The same stack with the watch on and off in short alternating blocks, each request
            # timed: a second stack, a fixed order or long blocks differ by more than the effect here.
            order = [(live, t_on), (None, t_off)]
            for sketch, out in order if r % 2 else order[::-1]:
                served.drift = sketch
                for _ in range(BLOCK):
                    start = time.perf_counter()
                    stack.stub.ModelInfer(req, timeout=60)
                    out.append(time.perf_counter() - start)
        assert live.score() is not None
        stack.close()
    on, off = statistics.median(t_on), statistics.median(t_off)
    cost = statistics.median(in_path)
    share = cost / off
    print(
        f"in the request path (sequential gRPC, {rounds} rounds of {n} requests each way): request "
        f"{off * 1e6:.0f} us without the watch; the watch's observe {cost * 1e6:.1f} us median = "
        f"{share:.1%} of it (goal <= {GOAL:.0%}: {'met' if share <= GOAL else 'MISSED'}); end-to-end "
        f"per-request median with it {on * 1e6:.0f} us ({on / off - 1:+.1%}; on a busy host this swings by several % run to run)"
    )


if __name__ == "__main__":
    main()
