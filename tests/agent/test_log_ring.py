"""The agent's log ring: bounded by lines and bytes, secrets redacted as lines are captured."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from edgectl.agent.log_ring import LogRing, process_ring
from edgectl.protos.v1 import mqtt_pb2
from edgectl.redact import redact


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.getLogger("edgectl.test.ring")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log
    log.handlers.clear()


@pytest.mark.parametrize(
    ("text", "leak"),
    [
        ("token edgectl.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz in use", "eyJzdWIiOiJhbGljZSJ9"),
        ("Authorization: Bearer abc.def-ghi", "abc.def-ghi"),
        ('{"mqtt_password": "s3cr3t-pw", "device": "cam"}', "s3cr3t-pw"),
        ("enroll_token=tok-123456 device=cam", "tok-123456"),
        ("-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n-----END PRIVATE KEY-----", "MIGHAgEAMBMG"),
    ],
)
def test_secrets_never_enter_the_ring(logger: logging.Logger, text: str, leak: str) -> None:
    ring = LogRing()
    logger.addHandler(ring)
    logger.info("seen: %s", text)
    [line] = ring.lines()
    assert leak not in line.text and "[redacted]" in line.text
    assert redact("device=cam-07 online") == "device=cam-07 online"  # ordinary text is untouched


def test_ring_is_bounded_by_lines_and_bytes(logger: logging.Logger) -> None:
    by_lines = LogRing(max_lines=10)
    by_bytes = LogRing(max_lines=10_000, max_bytes=10_000)
    logger.addHandler(by_lines)
    logger.addHandler(by_bytes)
    for i in range(500):
        logger.warning("line %d %s", i, "x" * 100)
    assert [ln.text.split()[1] for ln in by_lines.lines()] == [str(i) for i in range(490, 500)]
    kept = by_bytes.lines()
    assert sum(ln.size for ln in kept) <= 10_000 and kept[-1].text.startswith("line 499 ")
    assert len(kept) < 100


def test_answer_keeps_the_newest_lines_since_a_time_within_its_bounds(logger: logging.Logger) -> None:
    ring = LogRing()
    logger.addHandler(ring)
    for i in range(30):
        logger.info("old %d", i)
    cut = time.time()
    time.sleep(0.01)
    for i in range(30):
        logger.info("new %d", i)
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    answer = ring.answer(mqtt_pb2.LogRequest(request_id="r1", since_unix=cut, max_lines=5), "cam-07")
    assert answer.request_id == "r1" and answer.device_id == "cam-07" and answer.truncated
    assert [ln.text.split("\n")[0] for ln in answer.lines] == [
        "new 26",
        "new 27",
        "new 28",
        "new 29",
        "failed",
    ]
    assert "ValueError: boom" in answer.lines[-1].text and answer.lines[-1].level == "error"
    whole = ring.answer(mqtt_pb2.LogRequest(request_id="r2", since_unix=cut), "cam-07")
    assert len(whole.lines) == 31 and not whole.truncated
    tiny = ring.answer(mqtt_pb2.LogRequest(request_id="r3", max_bytes=1000), "cam-07")
    assert 0 < len(tiny.lines) < 31 and tiny.truncated and tiny.lines[-1].text.startswith("failed")
    assert sum(len(ln.text) for ln in tiny.lines) <= 1000


def test_one_ring_per_process_however_many_agents_ask() -> None:
    """A simulator's hundred agents share one ring: each line is copied once, not once per agent."""
    first = process_ring()
    assert process_ring() is first
    assert sum(1 for h in logging.getLogger().handlers if isinstance(h, LogRing)) == 1
    logging.getLogger("edgectl.test.shared").warning("shared %d", 7)
    assert first.lines()[-1].text == "shared 7"
