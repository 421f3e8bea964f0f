"""The ``edgectl doctor`` command: a thin printer over :func:`edgectl.doctor.run_doctor`."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from edgectl.cli.output import console, print_json
from edgectl.doctor import DoctorReport, run_doctor


def _yes_no(value: bool) -> str:
    return "[green]yes[/green]" if value else "[dim]no[/dim]"


def _absent(reason: str | None, style: str = "yellow") -> str:
    return f"[{style}]absent[/{style}]: {escape(reason or 'unknown reason')}"


def render_table(report: DoctorReport) -> Table:
    """The report as one two-column rich table, in the order a user checks things."""
    f = report.facts
    table = Table(title="edgectl doctor", show_header=True, header_style="bold")
    table.add_column("check")
    table.add_column("result", overflow="fold")
    table.add_row("python", report.python_version)
    table.add_row("edgectl", report.edgectl_version)
    table.add_row("platform", escape(report.platform))
    table.add_row("cpu", escape(f"{f.machine}, {f.cpu_model}"))
    features = ", ".join(f"{name} {_yes_no(has)}" for name, has in report.cpu_int8_features.items())
    table.add_row("cpu int8 features", features)
    table.add_row("memory", f"{f.memory_total_mib} MiB")
    jetson = f"{f.device_model} ({f.l4t_release or 'no L4T release file'})" if f.is_jetson else "no"
    table.add_row("jetson", escape(jetson))
    if f.onnxruntime_version:
        table.add_row("onnxruntime", escape(f"{f.onnxruntime_version}: {', '.join(f.onnxruntime_providers)}"))
    else:
        table.add_row("onnxruntime", _absent(f.onnxruntime_absent_reason))
    if f.cuda_devices:
        gpus = "; ".join(
            f"{d.index}: {d.name}, sm_{d.compute_capability.replace('.', '')}, {d.total_memory_mib} MiB"
            for d in f.cuda_devices
        )
        table.add_row("cuda", escape(f"driver {f.cuda_driver_version}; {gpus}"))
    else:
        table.add_row("cuda", _absent(f.cuda_absent_reason))
    trt = escape(f.tensorrt_version) if f.tensorrt_version else _absent(f.tensorrt_absent_reason)
    table.add_row("tensorrt", trt)
    torch = report.torch
    table.add_row("torch", escape(torch.version) if torch.version else _absent(torch.absent_reason, "dim"))
    if report.profile:
        table.add_row(
            "device profile", f"[bold]{escape(report.profile)}[/bold] ({escape(report.profile_reason)})"
        )
    else:
        table.add_row("device profile", f"[red]none[/red]: {escape(report.profile_reason)}")
    m = report.mqtt
    status = "[green]reachable[/green]" if m.reachable else "[red]unreachable[/red]"
    latency = f" in {m.latency_ms:.0f} ms" if m.latency_ms is not None and m.reachable else ""
    table.add_row("mqtt broker", f"{status} {escape(m.url)}{latency}: {escape(m.detail)}")
    return table


def doctor(
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    mqtt: str | None = typer.Option(
        None,
        "--mqtt",
        envvar="EDGECTL_MQTT",
        help="Broker to test with an MQTT CONNECT (default mqtt://127.0.0.1:1883).",
    ),
) -> None:
    """Check what this machine can run: CPU int8 features, CUDA, TensorRT, onnxruntime, profile, broker.

    Exits 0 whatever it finds: a machine without a GPU is a supported target.

    Example: edgectl doctor --mqtt mqtt://broker.local:1883 --json
    """
    report = run_doctor(mqtt)
    if json_out:
        print_json(report.to_dict())
    else:
        console.print(render_table(report))
