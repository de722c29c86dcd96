"""``edgespeed certs``: the fleet CA and its identities."""

from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path
from typing import cast

import typer
from rich.table import Table

from edgespeed.cli._common import console, fail
from edgespeed.errors import ConfigError, EdgeSpeedError
from edgespeed.security.pki import (
    CRL_DAYS,
    CrlInfo,
    FleetCA,
    Role,
    create_ca,
    issue_certificate,
    load_ca,
    load_crl,
    load_identity,
    refresh_crl,
    revoke_certificate,
    revoked_serials,
)

app = typer.Typer(help="Create the fleet CA; issue, renew, revoke and list identities.", no_args_is_help=True)
crl_app = typer.Typer(help="The fleet's certificate revocation list (crl.pem).", no_args_is_help=True)
app.add_typer(crl_app, name="crl")
DIR = typer.Option(..., "--dir", help="The fleet's PKI folder (holds ca.crt and ca.key).")
ROLES = "device, coordinator, bridge or broker"
CRL_STYLE = {"ok": "green", "expiring": "yellow", "expired": "red"}


def print_crl_health(crl: CrlInfo, *, where: str = "") -> None:
    """One line on the revocation list, green, yellow (under 7 days left) or red (past its nextUpdate)."""
    health = crl.health()
    console.print(f"[{CRL_STYLE[health]}]{where}{crl.describe()}[/]")
    if health != "ok":
        console.print(
            f"[{CRL_STYLE[health]}]renew it now: edgespeed certs crl refresh --dir <pki>, then copy crl.pem "
            "to the brokers and reload them (SIGHUP)[/]"
        )


@app.command("init")
def init(
    directory: Path = DIR,
    fleet: str = typer.Option("edgespeed", help="The fleet's id."),
    days: int = typer.Option(3650, min=1, help="Validity of the CA."),
) -> None:
    """Create a fleet CA in DIR (ca.crt, and ca.key with mode 0600)."""
    try:
        ca = create_ca(directory, fleet=fleet, days=days)
    except EdgeSpeedError as exc:
        raise fail(exc) from None
    console.print(f"[green]fleet CA created:[/] {ca.cert_file}")
    console.print("Keep ca.key offline once identities are issued.", style="dim")


@app.command("issue")
def issue(
    name: str = typer.Argument(..., help="The identity's id, e.g. a device id; becomes the certificate's CN."),
    role: str = typer.Option("device", help=f"One of {ROLES}."),
    directory: Path = DIR,
    out: Path | None = typer.Option(None, help="Where to write the files (default: the PKI folder)."),
    days: float = typer.Option(30, min=0.01, help="Validity; short by default, renew before it ends."),
    host: list[str] = typer.Option([], help="For a broker: DNS names or IPs it is reached at (repeatable)."),
) -> None:
    """Issue a certificate, a TLS key, and the sealing and signing keys of NAME."""
    try:
        ident = issue_certificate(
            load_ca(directory),
            name,
            role=cast(Role, role),  # checked by issue_certificate
            out_dir=out,
            days=days,
            hosts=host,
        )
    except EdgeSpeedError as exc:
        raise fail(exc) from None
    console.print(f"[green]issued {role} {name}:[/] {ident.cert_file}")
    console.print(f"  keys (0600): {ident.key_file.name}, {ident.seal_key_file.name}, {ident.sign_key_file.name}")


@app.command("renew")
def renew(
    name: str = typer.Argument(..., help="The identity to renew."),
    directory: Path = DIR,
    days: float = typer.Option(30, min=0.01, help="New validity from now."),
) -> None:
    """Issue a fresh certificate for NAME with the same keys."""
    try:
        current = load_identity(directory, name)
        ident = issue_certificate(
            load_ca(directory), name, role=current.role, days=days, keep_keys=True, out_dir=directory
        )
    except EdgeSpeedError as exc:
        raise fail(exc) from None
    expires = ident.certificate().not_valid_after_utc
    console.print(f"[green]renewed {name}[/] until {expires:%Y-%m-%d %H:%M} UTC")


@app.command("revoke")
def revoke(name: str = typer.Argument(..., help="The identity to revoke."), directory: Path = DIR) -> None:
    """Put NAME's certificate on the fleet's revocation list (crl.pem); reload brokers after."""
    try:
        ca = load_ca(directory)
        serial = revoke_certificate(ca, load_identity(directory, name).cert_file)
    except EdgeSpeedError as exc:
        raise fail(exc) from None
    console.print(f"[yellow]revoked {name}[/] (serial {serial:x}) in {ca.crl_file}. Next:")
    console.print(
        "  1. brokers: copy crl.pem to each broker's PKI folder and reload it (kill -HUP <mosquitto pid>, or\n"
        "     systemctl reload mosquitto) or restart it; until then it admits the certificate on a new connection,\n"
        f"     and a connection already open stays open until {name} disconnects (restart the broker to cut it)\n"
        "  2. the coordinator re-reads crl.pem from its PKI folder within seconds (copy it there if that is\n"
        f"     another folder): it stops placing work on {name}, wraps no model key for it, refuses its messages,\n"
        "     and broadcasts the list (retained) on bcast/crl\n"
        "  3. devices apply the broadcast list as soon as it reaches them"
    )


@app.command("list")
def list_(directory: Path = DIR) -> None:
    """List the identities in DIR with role, expiry and revocation."""
    try:
        ca = load_ca(directory)
    except EdgeSpeedError as exc:
        raise fail(exc) from None
    revoked = revoked_serials(ca)
    now = dt.datetime.now(dt.timezone.utc)
    table = Table("id", "role", "expires (UTC)", "state")
    for path in sorted(directory.glob("*.crt")):
        if path.name == "ca.crt":
            continue
        ident = load_identity(directory, path.stem)
        cert = ident.certificate()
        end = cert.not_valid_after_utc
        state = "revoked" if cert.serial_number in revoked else "expired" if end < now else "valid"
        style = {"valid": "green", "expired": "red", "revoked": "yellow"}[state]
        table.add_row(ident.name, ident.role, f"{end:%Y-%m-%d %H:%M}", f"[{style}]{state}[/]")
    console.print(table)


@crl_app.command("show")
def crl_show(directory: Path = DIR) -> None:
    """Show the revocation list: its nextUpdate and the revoked identities (warns when it is near or past)."""
    ca = FleetCA(directory)  # ca.crt is enough: a broker's folder has no ca.key
    try:
        if not ca.cert_file.is_file():
            raise ConfigError(f"no {ca.cert_file}")
        crl = load_crl(ca.crl_file, ca.cert_file)
    except EdgeSpeedError as exc:
        raise fail(exc) from None
    names = {}
    for path in sorted(directory.glob("*.crt")):
        if path.name != "ca.crt":
            with contextlib.suppress(EdgeSpeedError, ValueError):
                names[load_identity(directory, path.stem).certificate().serial_number] = path.stem
    console.print(f"{ca.crl_file}: valid from {crl.last_update:%Y-%m-%d %H:%M} UTC")
    print_crl_health(crl)
    if crl.revoked:
        table = Table("id", "serial", "revoked (UTC)", title="revoked")
        for serial, when in sorted(crl.revoked.items(), key=lambda item: item[1]):
            table.add_row(names.get(serial, "?"), f"{serial:x}", f"{when:%Y-%m-%d %H:%M}")
        console.print(table)


@crl_app.command("refresh")
def crl_refresh(
    directory: Path = DIR,
    days: float = typer.Option(CRL_DAYS, min=0.01, help="Validity of the re-signed list."),
) -> None:
    """Re-sign the revocation list (same entries) with a fresh nextUpdate; run it from a timer."""
    try:
        crl = refresh_crl(load_ca(directory), days=days)
    except EdgeSpeedError as exc:
        raise fail(exc) from None
    print_crl_health(crl, where="refreshed: ")
    console.print(
        "copy crl.pem to the brokers and reload them (SIGHUP); a running coordinator picks it up by itself",
        style="dim",
    )
