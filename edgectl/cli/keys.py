"""``edgectl keys``: make the Ed25519 keys that sign artifacts.

Example:
    edgectl keys generate                      # the default key, under $EDGECTL_CONFIG_DIR/keys/
    edgectl keys generate --out ci-signer.pem  # writes ci-signer.pem (0600) and ci-signer.pub.pem
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgectl.artifact.keystore import default_key_path
from edgectl.artifact.signing import SigningKey
from edgectl.cli.output import err_console as _err
from edgectl.cli.output import print_json
from edgectl.errors import EdgectlError

app = typer.Typer(help="Manage the Ed25519 keys that sign artifacts.", no_args_is_help=True)


@app.callback()
def _keys() -> None:
    """Manage the Ed25519 keys that sign artifacts."""


@app.command()
def generate(
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Private key file to write (default: edgectl's default key)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing key file.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Generate an Ed25519 signing key and print its key id.

    Example: edgectl keys generate --out signer.pem   (share signer.pub.pem with your fleet)
    """
    path = out if out is not None else default_key_path()
    try:
        key = SigningKey.generate()
        pub = key.save(path, overwrite=force)
    except EdgectlError as exc:
        _err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    if as_json:
        print_json({"key_id": key.key_id, "private_key": str(path), "public_key": str(pub)})
        return
    typer.echo(f"key id:      {key.key_id}")
    typer.echo(f"private key: {path}  (mode 0600: keep it secret)")
    typer.echo(f"public key:  {pub}  (give this to the fleet: --trust {pub})")
