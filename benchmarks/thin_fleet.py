"""Thin simulated devices spread over child processes, for fleets past one process's open files.

Each child (``python benchmarks/thin_fleet.py SPEC.json``) runs one ``SimFleet`` from
tests/control_plane/sim_device.py (the thin device the contract tests hold to the real agent) with
its slice of the devices, one real MQTT connection each. A process here may hold 20,000 open
files, so 10,000 devices (one socket each, plus the selector's) cannot live in one; a child per
~2,500 also gives the devices' Python work more than one core. The parent speaks to its children
in JSON lines over their stdin/stdout; the spec (it may hold broker passwords) is a 0600 file.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PER_PROCESS = 2500


class ThinFleet:
    """N thin devices over child processes of ``per_process`` devices each."""

    def __init__(
        self,
        work: Path,
        host: str,
        port: int,
        device_ids: list[str],
        labels: dict[str, str],
        active: dict[str, Any],
        passwords: dict[str, str] | None = None,
        tls_ca: str | None = None,
        per_process: int = DEFAULT_PER_PROCESS,
    ) -> None:
        self.n = len(device_ids)
        self.children: list[subprocess.Popen[str]] = []
        self.logs: list[Path] = []
        self.replies: list[queue.Queue[str]] = []
        (work / "thin").mkdir(parents=True, exist_ok=True)
        for index, start in enumerate(range(0, self.n, per_process)):
            ids = device_ids[start : start + per_process]
            spec = work / "thin" / f"child-{index}.json"
            fd = os.open(spec, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # passwords inside
            with os.fdopen(fd, "w") as out:
                json.dump({
                    "host": host, "port": port, "tls_ca": tls_ca, "labels": labels, "active": active,
                    "devices": [[i, (passwords or {}).get(i)] for i in ids],
                }, out)  # fmt: skip
            log = work / "thin" / f"child-{index}.log"
            self.logs.append(log)
            with log.open("wb") as err:
                self.children.append(
                    subprocess.Popen(
                        [sys.executable, str(Path(__file__).resolve()), str(spec)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=err,
                        text=True,
                        bufsize=1,
                    )
                )
            replies: queue.Queue[str] = queue.Queue()
            self.replies.append(replies)
            threading.Thread(target=_pump, args=(self.children[-1], replies), daemon=True).start()

    def pids(self) -> list[int]:
        """The children's process ids (for their CPU or memory)."""
        return [c.pid for c in self.children]

    def connect(self, timeout: float) -> None:
        """Wait until every child reports all of its devices online."""
        for index, log in enumerate(self.logs):
            reply = self._read(index, timeout)
            if "ready" not in reply:
                raise SystemExit(f"a device process failed to connect: {reply}; see {log}")

    def _ask(self, request: dict[str, Any], timeout: float = 120.0) -> list[dict[str, Any]]:
        line = json.dumps(request) + "\n"
        for child in self.children:
            assert child.stdin is not None
            child.stdin.write(line)
            child.stdin.flush()
        return [self._read(i, timeout) for i in range(len(self.children))]

    def _read(self, index: int, timeout: float) -> dict[str, Any]:
        child, log = self.children[index], self.logs[index]
        try:
            line = self.replies[index].get(timeout=timeout)  # "" when the child died (EOF)
        except queue.Empty:
            line = ""
        if not line:
            raise SystemExit(f"device process {child.pid} stopped or hung; its log ends:\n{_tail(log)}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise SystemExit(f"a device process failed: {reply['error']}; see {log}")
        return reply

    def count_digest(self, name: str, digest: str) -> int:
        """How many devices report ``digest`` active for model ``name``."""
        return sum(r["n"] for r in self._ask({"op": "count", "name": name, "digest": digest}))

    def messages(self) -> int:
        """Desired states received plus messages published, over every device."""
        return sum(r["n"] for r in self._ask({"op": "messages"}))

    def heartbeat(self) -> int:
        """Every device publishes its reported state again, as an agent's heartbeat does."""
        return sum(r["n"] for r in self._ask({"op": "report"}))

    def close(self) -> None:
        """Every device disconnects cleanly (says offline), then the children exit."""
        for child in self.children:
            if child.poll() is None and child.stdin is not None:
                try:
                    child.stdin.write(json.dumps({"op": "close"}) + "\n")
                    child.stdin.close()
                except OSError:
                    pass
        for child in self.children:
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _pump(child: subprocess.Popen[str], out: queue.Queue[str]) -> None:
    """Hand a child's reply lines to the parent; "" marks its end."""
    assert child.stdout is not None
    for line in child.stdout:
        out.put(line)
    out.put("")


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _report_all(devices: dict[str, Any]) -> int:
    for device in devices.values():
        device.report()
    return len(devices)


def run_child(spec_path: Path) -> None:
    """One child: connect its slice, then answer the parent's requests until told to close."""
    sys.path.insert(0, str(REPO))  # for tests.control_plane.sim_device
    from edgectl.protos.v1 import mqtt_pb2
    from tests.control_plane.sim_device import SimFleet

    spec = json.loads(spec_path.read_text())
    spec_path.unlink()  # the passwords need not outlive the start
    sim = SimFleet(spec["host"], spec["port"], tls_ca=spec["tls_ca"])

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    try:
        ids = []
        for device_id, password in spec["devices"]:
            device = sim.add(device_id, spec["labels"], password=password)
            for name, model in spec["active"].items():
                device.active[name] = mqtt_pb2.ActiveModel(name=name, smoke_test_passed=True, **model)
            ids.append(device_id)
        try:
            sim.connect(ids, timeout=300)
        except TimeoutError as exc:
            reply({"error": str(exc)})
            return
        reply({"ready": len(ids)})
        for line in sys.stdin:
            request = json.loads(line)
            op = request["op"]
            if op == "count":
                name, digest = request["name"], request["digest"]
                n = sim.snapshot(lambda d, m=name, g=digest: sum(1 for x in d.values() if x.digest(m) == g))
            elif op == "messages":
                n = sim.snapshot(lambda d: sum(x.desired_received + x.published for x in d.values()))
            elif op == "report":
                n = sim.snapshot(_report_all)
            elif op == "close":
                break
            else:
                reply({"error": f"unknown op {op!r}"})
                continue
            reply({"n": n})
    finally:
        sim.close()


if __name__ == "__main__":
    run_child(Path(sys.argv[1]))
