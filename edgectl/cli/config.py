"""`edgectl config`: named control planes (contexts) in config.toml, kubeconfig-style.

Example:
    edgectl config set-context prod --server cp.example.com:7443 --ca prod-ca.crt --token-file ~/.prod-token
    edgectl config use-context prod      # every command now talks to prod
    edgectl --context staging devices ls  # one command elsewhere (or EDGECTL_CONTEXT=staging)
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from edgectl.addresses import parse_host_port
from edgectl.cli.output import Output, OutputOpt, console, output_format, show
from edgectl.contexts import CliConfig, Context, check_context_name
from edgectl.errors import UsageError

app = typer.Typer(
    help="Named control planes (contexts): set-context, use-context, get-contexts.", no_args_is_help=True
)


@app.command("set-context")
def set_context(
    name: str = typer.Argument(..., help="a name for this control plane, e.g. prod"),
    server: str | None = typer.Option(None, help="its HOST:PORT"),
    ca: Path | None = typer.Option(None, help="its fleet CA certificate"),
    token_file: Path | None = typer.Option(None, help="a file holding your bearer token (kept as a path)"),
) -> None:
    """Create or change a context; only the options given change.

    Example: edgectl config set-context prod --server cp.example.com:7443 --ca ca.crt --token-file ~/.prod-token
    """
    config = CliConfig.load()
    old = config.contexts.get(check_context_name(name), Context())
    if server:
        server = str(parse_host_port(server, what="--server"))
    for path in (ca, token_file):
        if path is not None and not path.expanduser().is_file():
            raise UsageError(f"{path} does not exist", hint="pass the path of an existing file")
    new = Context(
        server=server or old.server,
        ca=str(ca.expanduser().resolve()) if ca else old.ca,
        token_file=str(token_file.expanduser().resolve()) if token_file else old.token_file,
        token=old.token,
    )
    config.with_context(name, new).save()
    console.print(f"context {name}: {new.to_dict()} ({CliConfig.path()})")


@app.command("use-context")
def use_context(name: str = typer.Argument(..., help="a context set with set-context")) -> None:
    """Make every later command talk to this context's control plane.

    Example: edgectl config use-context prod
    """
    config = CliConfig.load()
    if name not in config.contexts:
        known = ", ".join(sorted(config.contexts)) or "none yet"
        raise UsageError(
            f"no context {name!r} (known: {known})",
            hint=f"edgectl config set-context {name} --server HOST:PORT",
        )
    CliConfig(config.defaults, config.contexts, name).save()
    console.print(f"now using context {name} ({config.contexts[name].server or 'no server set'})")


@app.command("current-context")
def current_context() -> None:
    """Print the context in force (EDGECTL_CONTEXT, else the one use-context chose).

    Example: edgectl config current-context
    """
    name, _ = CliConfig.load().active()
    if not name:
        raise UsageError("no context is in use", hint="edgectl config use-context NAME")
    print(name)


@app.command("get-contexts")
def get_contexts(output: Output | None = OutputOpt) -> None:
    """List the contexts; the one in force is marked with *.

    Example: edgectl config get-contexts -o yaml
    """
    config = CliConfig.load()
    active, _ = (
        config.active()
        if config.current_context in config.contexts or not config.current_context
        else ("", None)
    )
    data = [
        {"name": n, "current": n == active, **config.contexts[n].to_dict()} for n in sorted(config.contexts)
    ]

    def table(wide: bool) -> Table:
        out = Table("", "name", "server", "ca", "token file")
        for row in data:
            out.add_row("*" if row["current"] else "", str(row["name"]), str(row.get("server", "-")),
                        str(row.get("ca", "-")), str(row.get("token_file", "-")))  # fmt: skip
        return out

    show(output_format(output, False), data, table)


@app.command("delete-context")
def delete_context(name: str = typer.Argument(...)) -> None:
    """Forget a context (the current one too: then no context is in use).

    Example: edgectl config delete-context staging
    """
    config = CliConfig.load()
    if name not in config.contexts:
        raise UsageError(f"no context {name!r}", hint="edgectl config get-contexts lists them")
    rest = {k: v for k, v in config.contexts.items() if k != name}
    CliConfig(config.defaults, rest, "" if config.current_context == name else config.current_context).save()
    console.print(f"context {name} deleted")
