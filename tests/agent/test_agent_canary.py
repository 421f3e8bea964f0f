"""On-device canary and shadow over real gRPC and real onnxruntime sessions: the counter split
answers exactly P % from the candidate, agreement tells an agreeing candidate from one with
negated logits, and shadow runs are skipped (and counted) under load, never delaying answers."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from edgectl.agent.batching import BatchSettings
from edgectl.agent.canary import TrialPlan, Trials, TrialSettings
from edgectl.agent.codecs import encode_request
from edgectl.agent.runtime import SessionSettings, load_model
from edgectl.agent.shadow import KIND_COSINE, KIND_TOP1, ShadowJob, ShadowWorker, compare
from tests.agent.conftest import wait_for
from tests.agent.onnx_models import mlp_model
from tests.agent.v2_harness import InProcessV2

RNG = np.random.default_rng(7)


def _stack(
    tmp_path: Path, *, negate: bool, settings: TrialSettings | None = None
) -> tuple[InProcessV2, Trials]:
    """v1 current, v2 candidate (same weights, or negated outputs), keep_versions=1 with v1 pinned."""
    v1 = mlp_model(tmp_path / "v1.onnx", (4, 8, 5), seeds=[1, 2])
    v2 = mlp_model(tmp_path / "v2.onnx", (4, 8, 5), seeds=[1, 2], negate=negate)
    served = InProcessV2(v1, version=1, batch=BatchSettings())
    served.registry.pin("m", 1)
    served.registry.install(
        load_model(
            v2, name="m", version=2, digest="sha256:" + "2" * 64, settings=SessionSettings(intra_op_threads=1)
        )
    )
    trials = Trials(served.registry, settings)
    served.router.trials = trials
    return served, trials


def _ask(served: InProcessV2, n: int) -> list[str]:
    versions = []
    for _ in range(n):
        x = RNG.standard_normal((1, 4)).astype(np.float32)
        versions.append(served.stub.ModelInfer(encode_request("m", {"x": x}), timeout=10).model_version)
    return versions


def test_pinned_version_stays_live_until_unpinned(tmp_path: Path) -> None:
    served, trials = _stack(tmp_path, negate=False)
    try:
        assert [m.version for m in served.registry.versions("m")] == ["1", "2"]
        served.registry.pin("m", None)
        assert [m.version for m in served.registry.versions("m")] == ["2"]
    finally:
        trials.close()
        served.close()


def test_canary_ten_percent_answers_exactly_one_in_ten_and_agrees(tmp_path: Path) -> None:
    served, trials = _stack(tmp_path, negate=False)
    try:
        trials.set("m", TrialPlan(candidate="2", current="1", percent=10.0))
        versions = _ask(served, 500)
        share = versions.count("2") / len(versions)
        assert 0.08 <= share <= 0.12, share
        wait_for(trials.idle, what="background runs to finish")
        report = trials.report("m")
        assert report is not None and report.mode == "canary"
        assert report.agreement_kind == KIND_TOP1 and report.agreement == 1.0
        assert report.compared + report.background_skipped >= 1
        by_version = {v.version: v for v in report.versions}
        assert by_version["1"].requests + by_version["2"].requests == 500
        assert by_version["2"].requests == versions.count("2")
        assert by_version["1"].p99_ms > 0 and by_version["2"].p99_ms > 0
        # Explicit versions bypass the split.
        x = RNG.standard_normal((1, 4)).astype(np.float32)
        req = encode_request("m", {"x": x})
        req.model_version = "1"
        assert served.stub.ModelInfer(req, timeout=10).model_version == "1"
    finally:
        trials.close()
        served.close()


def test_shadow_answers_from_current_and_flags_a_disagreeing_candidate(tmp_path: Path) -> None:
    served, trials = _stack(tmp_path, negate=True, settings=TrialSettings(cpu_share=1.0))
    try:
        trials.set("m", TrialPlan(candidate="2", current="1", shadow=True))
        versions = _ask(served, 200)
        assert set(versions) == {"1"}  # the current version answers everything
        wait_for(trials.idle, what="background runs to finish")
        report = trials.report("m")
        assert report is not None and report.mode == "shadow"
        assert report.background_runs > 0 and report.compared == report.background_runs
        assert report.agreement is not None and report.agreement < 0.5
        by_version = {v.version: v for v in report.versions}
        assert by_version["2"].requests == report.background_runs
    finally:
        trials.close()
        served.close()


def test_shadow_under_load_skips_and_counts_never_failing_a_request(tmp_path: Path) -> None:
    settings = TrialSettings(queue_size=1, cpu_share=0.01)
    served, trials = _stack(tmp_path, negate=False, settings=settings)
    try:
        trials.set("m", TrialPlan(candidate="2", current="1", shadow=True))
        answered: list[str] = []
        errors: list[BaseException] = []

        def client() -> None:
            try:
                answered.extend(_ask(served, 100))
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(answered) == 400 and set(answered) == {"1"}
        wait_for(trials.idle, what="background runs to finish")
        report = trials.report("m")
        assert report is not None
        assert report.background_skipped > 0
        assert report.background_runs + report.background_skipped == 400
    finally:
        trials.close()
        served.close()


def test_compare_top1_for_classifiers_and_cosine_otherwise() -> None:
    logits = np.array([[1.0, 2.0, 0.5], [3.0, 0.0, 1.0]], np.float32)
    assert compare({"y": logits}, {"y": logits}) == (KIND_TOP1, 2, 2.0)
    assert compare({"y": logits}, {"y": -logits})[2] == 0.0
    vec = np.array([[1.0], [2.0]], np.float32)
    kind, rows, total = compare({"y": vec}, {"y": vec * 3})
    assert (kind, rows) == (KIND_COSINE, 2) and abs(total - 2.0) < 1e-9
    kind, rows, total = compare({"y": vec}, {"y": -vec})
    assert abs(total + 2.0) < 1e-9


def test_a_run_that_cannot_go_ahead_is_skipped_when_offered_without_waking_the_worker(tmp_path: Path) -> None:
    served, trials = _stack(tmp_path, negate=False)
    worker = ShadowWorker(served.registry, queue_size=4, cpu_share=1.0, timeout_s=5.0)
    skipped: list[str] = []
    ran: list[float] = []
    try:
        x = {"x": RNG.standard_normal((1, 4)).astype(np.float32)}

        def job(watch: tuple[str, ...]) -> ShadowJob:
            return ShadowJob(
                "m", "2", watch, x, lambda out, s: ran.append(s), lambda: skipped.append("x"), lambda: True
            )

        worker.offer(job(("1", "9")))  # version 9 is not served: never run beside it
        assert skipped == ["x"] and worker.idle()  # counted at once; nothing queued
        worker.start()
        spent = ShadowWorker(served.registry, queue_size=4, cpu_share=0.0, timeout_s=5.0)  # no CPU budget
        spent.offer(job(("1", "2")))
        assert skipped == ["x", "x"] and spent.idle()
        worker.offer(job(("1", "2")))  # both idle, budget left: queued and run
        wait_for(lambda: len(ran) == 1 and worker.idle(), what="the run")
        assert len(skipped) == 2
    finally:
        worker.close()
        trials.close()
        served.close()
