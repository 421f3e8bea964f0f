"""Drift against the calibration set: the summary's bounds and signed round trip, and the live
sketch's two targets (a 1-sd shift of one feature flagged within 2,000 requests; a simulated day of
in-distribution traffic raises no alarm)."""

from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edgectl.artifact import (
    MANIFEST_NAME,
    Artifact,
    DigestMismatchError,
    DriftSummary,
    LiveSketch,
    ManifestError,
    TrustStore,
    canonical_bytes,
    load_artifact,
    summarize_inputs,
)
from edgectl.artifact.drift import MAX_BINS, SUMMARY_FILE
from edgectl.artifact.live_sketch import DEFAULT_THRESHOLD, psi

BuildFn = Callable[..., Artifact]


def _tokens(rng: np.random.Generator, n: int, mean_len: float) -> np.ndarray:
    lengths = np.clip(rng.normal(mean_len, 4, n).astype(int), 1, 64)
    ids = rng.integers(1, 30000, (n, 64))
    ids[np.arange(64)[None, :] >= lengths[:, None]] = 0  # padding
    return ids.astype(np.int64)


def _calib(rng: np.random.Generator, n: int = 2000) -> dict[str, np.ndarray]:
    return {
        "x": rng.standard_normal((n, 4)).astype(np.float32),
        "image": rng.random((n, 3, 8, 8)).astype(np.float32),
        "input_ids": _tokens(rng, n, 24),
    }


def test_summary_shape_and_bounds() -> None:
    s = summarize_inputs(_calib(np.random.default_rng(0)))
    by = {i.name: i for i in s.inputs}
    assert by["x"].kind == "values" and len(by["x"].features) == 4  # one histogram per column
    assert by["image"].kind == "values" and len(by["image"].features) == 1  # pooled
    assert by["input_ids"].kind == "lengths"
    for i in s.inputs:
        for f in i.features:
            assert len(f.probs) <= MAX_BINS and abs(sum(f.probs) - 1) < 1e-6
            # Quantile edges: every bin holds about the same share of the calibration data.
            if i.kind == "values":
                assert max(f.probs) < 2.0 / len(f.probs)
    assert len(canonical_bytes(s.to_dict())) < 4096
    assert DriftSummary.from_dict(json.loads(canonical_bytes(s.to_dict()))) == s
    with pytest.raises(ManifestError, match="bins"):
        summarize_inputs({"x": np.zeros((4, 2))}, bins=MAX_BINS + 1)


def test_summary_is_a_signed_bundle_file_and_bundles_without_one_stay_valid(
    tmp_path: Path, build: BuildFn, trust: TrustStore
) -> None:
    summary = summarize_inputs({"input": np.random.default_rng(1).random((64, 3, 4, 4)).astype(np.float32)})
    with_summary = build(tmp_path / "a", input_summary=summary)
    loaded = load_artifact(with_summary.root, trust)
    assert loaded.input_summary() == summary
    assert SUMMARY_FILE in {f.path for f in loaded.manifest.files}  # its digest is in the signed manifest
    assert b"input_summary" not in (with_summary.root / MANIFEST_NAME).read_bytes().replace(
        SUMMARY_FILE.encode(), b""
    ), "the manifest names the file only; no field of its own"
    without = build(tmp_path / "b")
    assert load_artifact(without.root, trust).input_summary() is None
    # The signature covers the file: one changed byte and the bundle is refused.
    path = with_summary.root / SUMMARY_FILE
    path.write_bytes(path.read_bytes().replace(b'"count":64', b'"count":65'))
    with pytest.raises(DigestMismatchError):
        load_artifact(with_summary.root, trust)
    # A summary that breaks its bounds is refused like any other schema error; a newer format is skipped.
    bad = summary.to_dict()
    bad["inputs"][0]["features"][0]["probs"][0] += 0.5
    with pytest.raises(ManifestError, match="sum to 1"):
        DriftSummary.from_bytes(canonical_bytes(bad))
    assert DriftSummary.from_bytes(canonical_bytes({"format": "edgectl.input-summary/v9"})) is None


def test_psi_is_zero_for_the_same_shares_and_grows_with_a_shift() -> None:
    e = np.full(10, 0.1)
    assert psi(e, np.full(10, 1000)) < 1e-6
    assert psi(e, np.array([0, 0, 0, 0, 0, 1000, 1000, 1000, 1000, 1000])) > 1.0


def _live(rng: np.random.Generator, shift: float = 0.0, long: bool = False) -> dict[str, np.ndarray]:
    x = rng.standard_normal((1, 4)).astype(np.float32)
    x[:, 2] += shift
    return {
        "x": x,
        "image": rng.random((1, 3, 8, 8)).astype(np.float32),
        "input_ids": _tokens(rng, 1, 40 if long else 24),
    }


def _requests_until_alarm(sketch: LiveSketch, rng: np.random.Generator, limit: int, **kw: float) -> int:
    for n in range(1, limit + 1):
        sketch.observe(_live(rng, **kw))  # type: ignore[arg-type]
        if n % 50 == 0 and sketch.alarm() is not None:
            return n
    return limit + 1


def test_one_sd_shift_of_one_feature_is_flagged_within_2000_requests() -> None:
    rng = np.random.default_rng(2)
    sketch = LiveSketch(summarize_inputs(_calib(rng)))
    # Warm: a full window of in-distribution traffic first, so the shift has to displace it.
    assert _requests_until_alarm(sketch, rng, 3000) > 3000
    took = _requests_until_alarm(sketch, rng, 2000, shift=1.0)
    assert took <= 2000
    score = sketch.score()
    assert score is not None and score.score >= DEFAULT_THRESHOLD and score.feature == "x[2]"
    assert sketch.alarm() is None  # raised once, not on every check


def test_longer_token_sequences_are_flagged() -> None:
    rng = np.random.default_rng(3)
    sketch = LiveSketch(summarize_inputs(_calib(rng)))
    assert _requests_until_alarm(sketch, rng, 2000, long=True) <= 2000
    score = sketch.score()
    assert score is not None and score.feature == "input_ids length"


def test_inputs_that_do_not_fit_the_summary_are_skipped_not_failed() -> None:
    sketch = LiveSketch(summarize_inputs(_calib(np.random.default_rng(5))))
    for _ in range(300):
        sketch.observe(
            {"x": np.zeros((1, 3), np.float32), "image": np.array(["a"]), "input_ids": np.zeros(4)}
        )
    score = sketch.score()
    assert score is not None and score.feature == ""  # requests counted, nothing binned


def test_a_day_of_in_distribution_traffic_raises_no_alarm() -> None:
    rng = np.random.default_rng(4)
    now = [0.0]
    sketch = LiveSketch(summarize_inputs(_calib(rng)), clock=lambda: now[0])
    worst = 0.0
    # 24 h at one request every 2 s (43,200 requests), checked once a simulated minute.
    for n in range(43_200):
        now[0] = n * 2.0
        sketch.observe(_live(rng))
        if n % 30 == 0:
            assert sketch.alarm() is None, f"false alarm after {now[0] / 3600:.1f} h: {sketch.score()}"
            s = sketch.score()
            worst = max(worst, s.score if s else 0.0)
    assert 0.0 < worst < DEFAULT_THRESHOLD
    # Stale buckets leave the window: an hour of silence empties it.
    now[0] += 2 * 3600
    s = sketch.score()
    assert s is None or s.requests < sketch.bucket_requests * 2


def test_a_small_tensor_viewing_a_large_buffer_does_not_keep_the_buffer_alive() -> None:
    """Inputs wait for the batch flush by reference only when their whole buffer is small: a tensor
    decoded from an HTTP body is a view of the body, every other input included."""
    rng = np.random.default_rng(6)
    sketch = LiveSketch(summarize_inputs(_calib(rng)))
    body = np.zeros(1 << 20, np.float32)  # stands in for a request body holding a large input
    seen = weakref.ref(body)
    sketch.observe({"x": body[:4].reshape(1, 4)})
    small = rng.standard_normal((1, 4)).astype(np.float32)
    sketch.observe({"x": small})
    del body
    gc.collect()
    assert seen() is None, "the sketch holds the whole body until its next flush"
    for _ in range(300):
        sketch.observe(_live(rng))  # type: ignore[arg-type]
    assert sketch.score() is not None
