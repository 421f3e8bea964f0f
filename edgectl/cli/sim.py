"""`edgectl sim run`: a simulated fleet of real agents against a running control plane.

A thin command over ``edgectl.sim``: enrolls N devices (one-time tokens from the control plane,
exchanged by each device for its own credentials), starts their agents in worker processes, and
runs until interrupted. Heavy imports happen inside the command.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import typer

from edgectl.errors import UsageError
from edgectl.labels import parse_labels

app = typer.Typer(help="Simulate a fleet of real agents for rollout tests and benchmarks.")


@app.callback()
def _sim() -> None:
    """Keeps `run` a named subcommand (typer would collapse a one-command app)."""


@app.command("run")
def run(
    devices: int = typer.Option(100, "--devices", "-n", help="how many simulated devices"),
    server: str | None = typer.Option(
        None,
        "--server",
        "--control-plane",
        help="control plane gRPC H:P [default: EDGECTL_SERVER, `edgectl up`]",
    ),
    mqtt: str | None = typer.Option(None, help="broker URL [default: the one enrollment hands out]"),
    labels: str = typer.Option("fleet=sim", help="k=v[,k=v] labels of every simulated device"),
    prefix: str = typer.Option("sim", help="device ids are PREFIX-00000, PREFIX-00001, …"),
    per_process: int = typer.Option(100, help="agents per worker process"),
    root: Path = typer.Option(Path("sim-fleet"), help="data dirs (one per device) and worker logs"),
    trust: list[Path] = typer.Option(
        [], help="extra trusted key file or folder (enrollment hands the fleet's)"
    ),
    profile: str = typer.Option("x86-cpu-avx2", help="device profile every simulated device claims"),
    heartbeat: float = typer.Option(
        30.0, help="seconds between looks at each device's state (a change is reported at once)"
    ),
    idle_report: float = typer.Option(
        300.0,
        help="seconds between reports that change nothing (liveness is the broker's keepalive and Will)",
    ),
    token: str | None = typer.Option(
        None, envvar="EDGECTL_TOKEN", help="operator token (secured control plane) to issue enrollment tokens"
    ),
    ca: Path | None = typer.Option(
        None, envvar="EDGECTL_CA", help="fleet CA: secured fleet; each device enrolls itself over TLS"
    ),
    device_server: str | None = typer.Option(
        None,
        help="the control plane's mTLS listener for agents (secured fleet) [default: `edgectl up`'s, else --server]",
    ),
    serve: bool = typer.Option(False, "--serve/--no-serve", help="also serve KServe V2 on a free port each"),
    json_out: bool = typer.Option(False, "--json", help="print the started fleet as JSON"),
) -> None:
    """Start DEVICES real agents that enroll with the control plane and follow its rollouts.

    Example: edgectl sim run --devices 200 --labels site=lab --per-process 100 --root /tmp/sim

    On a secured fleet (--ca, an operator --token, --device-server H:P) every simulated device
    enrolls itself as an agent does: its own key and CSR, its own broker identity, mTLS.
    """
    from edgectl.agent.config import CREDENTIALS_FILE
    from edgectl.client import resolve_credentials, resolve_server
    from edgectl.endpoints import Endpoints
    from edgectl.sim import FleetSimulator, SimError, SimSettings, issue_tokens, make_devices

    if devices < 1:
        raise UsageError("--devices must be at least 1")
    device_labels = parse_labels(labels)
    address = resolve_server(server)
    credentials = resolve_credentials(token, ca)
    if device_server is None and server is None:  # `edgectl up`'s endpoints.json names its mTLS listener
        device_server = local.device_grpc if (local := Endpoints.find()) else None
    ca_file = ca.resolve() if ca else None
    if credentials.ca_pem and ca_file is None:  # the CA came from env, config or endpoints.json
        ca_file = root.resolve() / "fleet-ca.crt"
        ca_file.parent.mkdir(parents=True, exist_ok=True)
        ca_file.write_bytes(credentials.ca_pem)
    settings = SimSettings(
        root=root.resolve(), control_plane=device_server or address, mqtt=mqtt,
        trust=tuple(p.resolve() for p in trust), profile=profile, heartbeat_s=heartbeat, idle_report_s=idle_report,
        serve=serve,
        ca_file=ca_file, enroll_server=address if ca_file else None,
    )  # fmt: skip
    fleet = make_devices(devices, prefix, device_labels)
    new = [d for d in fleet if not (settings.data_dir(d.device_id) / CREDENTIALS_FILE).exists()]
    tokens = {d.device_id: d for d in issue_tokens(address, new, credentials)} if new else {}
    fleet = [tokens.get(d.device_id, d) for d in fleet]
    sim = FleetSimulator(settings, fleet, per_process)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        sim.start()
        if json_out:
            info = {
                "devices": [d.device_id for d in fleet],
                "workers": sim.pids(),
                "root": str(settings.root),
            }
            print(json.dumps(info, indent=2))
        else:
            print(f"{devices} simulated devices ({len(new)} newly enrolled) in {len(sim.workers)} worker "
                  f"process(es) against {address}; logs in {settings.root / 'logs'}; Ctrl-C stops them")  # fmt: skip
        while not done.wait(1.0):
            dead = [w.index for w in sim.workers if not w.alive()]
            if dead:
                raise SimError(f"worker(s) {dead} exited", hint=f"see {settings.root / 'logs'}")
    finally:
        sim.stop()
