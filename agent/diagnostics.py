"""The agent's half of `edgectl devices bundle`: its config without secrets, versions and doctor report.

Built on request (never kept), as one JSON object that rides in the logs channel's answer, so the
broker's ACLs and the site bridges need nothing new. Bounded: what does not fit is left out, saying so.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from typing import Any

import edgectl
from edgectl.agent.config import AgentConfig
from edgectl.agent.serving import ModelRegistry
from edgectl.doctor import BrokerCheck, run_doctor
from edgectl.redact import redact_settings

BUNDLE_MAX_BYTES = 64 * 1024  # with the log lines' 128 KiB, well under the broker's message limit


def _onnxruntime_version() -> str | None:
    try:
        import onnxruntime

        return str(onnxruntime.__version__)
    except ImportError:
        return None


def bundle_json(config: AgentConfig, registry: ModelRegistry, broker_connected: bool) -> str:
    """The bundle as JSON text of at most :data:`BUNDLE_MAX_BYTES`; secrets dropped or redacted."""
    models = [
        {"name": m.model.name, "version": m.model.version, "digest": m.model.digest,
         "provider": m.model.provider, "active": registry.get(m.model.name) is m}
        for m in registry.all_versions()
    ]  # fmt: skip
    # The agent's own link says whether the broker answers: a fresh connect would need its credentials.
    broker = BrokerCheck("(the agent's link)", broker_connected,
                         "connected" if broker_connected else "not connected; the agent is reconnecting")  # fmt: skip
    doctor: dict[str, Any] = run_doctor(None, broker=broker).to_dict()
    bundle: dict[str, Any] = {
        "device_id": config.device_id,
        "config": redact_settings(dataclasses.asdict(config)),
        "versions": {
            "agent": edgectl.__version__,
            "python": platform.python_version(),
            "onnxruntime": _onnxruntime_version(),
            "os": f"{platform.system()} {platform.release()} {platform.machine()}",
            "models": models,
        },
        "doctor": redact_settings(doctor),
    }
    text = json.dumps(bundle, sort_keys=True)
    if len(text.encode()) > BUNDLE_MAX_BYTES:  # hundreds of model versions, or a very chatty host
        bundle["doctor"] = {"left_out": "over the bundle's size bound"}
        bundle["versions"]["models"] = models[:100]
        bundle["truncated"] = True
        text = json.dumps(bundle, sort_keys=True)[:BUNDLE_MAX_BYTES]
    return text
