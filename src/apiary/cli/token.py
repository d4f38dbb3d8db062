"""`apiary token`: the run authority of a private run and the access tokens it issues."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from apiary.cli.options import option
from apiary.files import write_atomically
from apiary.wire import Identity
from apiary.wire.auth import AccessToken, read_token
from apiary.wire.identity import public_key_from_peer_id

console = Console(soft_wrap=True, highlight=False)

token_app = typer.Typer(help="Private runs: the run authority's key and the access tokens it issues.",
                        no_args_is_help=True)


@token_app.command("authority")
def authority_command(
    authority_key: Annotated[Path, option("--authority-key", "the run authority's key file (keep it private)")],
    create: Annotated[bool, option("--create", "create a new authority key at --authority-key")] = False,
) -> None:
    """Create (--create) or show a run authority; its peer id is every peer's --run-authority."""
    if create:
        if authority_key.exists():
            raise typer.BadParameter(f"{authority_key} already exists; it holds the authority "
                                     f"{Identity.load(authority_key).peer_id}", param_hint="'--authority-key'")
        authority = Identity.generate()
        authority.save(authority_key)
    else:
        authority = Identity.load(authority_key)
    console.print(f"run authority: [bold]{authority.peer_id}[/bold]")
    console.print(f"every peer of the run: --run-authority {authority.peer_id} --access-token <its token>")


@token_app.command("issue")
def issue_command(
    authority_key: Annotated[Path, option("--authority-key", "the run authority's key file")],
    peer_id: Annotated[str, option("--peer-id", "the peer the token admits (`apiary keygen` prints it)")],
    expires_in: Annotated[float, option("--expires-in", "seconds the token stays valid", min=1)],
    output: Annotated[Optional[Path], option("--output", "write the token to this file (mode 0600), not to stdout")] = None,
) -> None:
    """Issue an access token that admits one peer (its key) to the run until it expires."""
    public_key_from_peer_id(peer_id)  # IdentityError names what is wrong with it
    token = AccessToken.issue(Identity.load(authority_key), peer_id, expires_in)
    if output is None:
        print(token.encode())
        return
    write_atomically(output, lambda f: f.write((token.encode() + "\n").encode()))
    console.print(f"token for {peer_id} written to {output}; valid until {time.ctime(token.expires_at)}")


@token_app.command("show")
def show_command(
    token: Annotated[str, typer.Argument(help="a token, or the file holding it")],
) -> None:
    """Show whom a token admits, who issued it and until when (its authority's signature checked)."""
    parsed = read_token(token)
    console.print(f"peer id:   {parsed.peer_id}")
    console.print(f"authority: {parsed.authority} ({'valid' if parsed.signed_by_authority() else 'INVALID'} signature)")
    console.print(f"issued:    {time.ctime(parsed.issued_at)}")
    state = "expired" if parsed.expires_at <= time.time() else "valid"
    console.print(f"expires:   {time.ctime(parsed.expires_at)} ({state})")
