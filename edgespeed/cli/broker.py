"""``edgespeed broker``: the zero-setup MQTT broker."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from pathlib import Path

import typer

from edgespeed.cli._common import console, fail, stop_signal
from edgespeed.cli.certs import print_crl_health
from edgespeed.errors import EdgeSpeedError
from edgespeed.security.pki import load_ca, load_crl, refresh_crl
from edgespeed.transport import BrokerSettings, BrokerTls, EmbeddedBroker
from edgespeed.transport.broker import production_settings, render_mosquitto_config

app = typer.Typer(help="Run the zero-setup MQTT broker (Mosquitto when installed, else amqtt).", no_args_is_help=True)


@app.command("config")
def config(
    pki: Path = typer.Option(..., help="The fleet's PKI folder: ca.crt, crl.pem, broker.crt, broker.key."),
    out: Path = typer.Option(..., help="Where to write mosquitto.conf and acl."),
    fleet: str = typer.Option(..., help="The fleet's id."),
    coordinator: list[str] = typer.Option(["coord"], help="Coordinator ids (full rights on the fleet)."),
    host: str = typer.Option("0.0.0.0", help="Address to listen on."),  # noqa: S104
    tls_port: int = typer.Option(8883, help="TLS port."),
    data_dir: Path | None = typer.Option(None, help="Persistence folder, created 0700 (default: OUT/data)."),
) -> None:
    """Render the production Mosquitto config: mutual TLS only, per-device ACLs, revocations, persistence."""
    try:
        _ensure_crl(pki)
        settings = production_settings(
            pki, fleet=fleet, coordinators=coordinator, out_dir=out, host=host, tls_port=tls_port, data_dir=data_dir
        )
        assert settings.tls is not None and settings.tls.crl_file is not None
        crl = load_crl(settings.tls.crl_file, settings.tls.ca_file)
    except EdgeSpeedError as exc:
        raise fail(exc) from None
    conf = out / "mosquitto.conf"
    conf.write_text(render_mosquitto_config(settings))
    console.print(f"[green]wrote[/] {conf} and {settings.acl_file}; persistence in {settings.data_dir}")
    if settings.user is not None:
        console.print(settings.user_note, style="dim")
    print_crl_health(crl, where="crlfile: ")
    console.print(f"run it with: mosquitto -c {conf}; after 'edgespeed certs revoke', reload it (SIGHUP)", style="dim")


@app.command("run")
def run(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(1883, help="Plain MQTT port (0: a free one)."),
    backend: str = typer.Option("auto", help="auto, mosquitto or amqtt."),
    data_dir: Path | None = typer.Option(None, help="Persist sessions and queued messages here."),
    tls_port: int = typer.Option(8883, help="TLS port, used with --ca/--cert/--key."),
    ca: Path | None = typer.Option(None, help="Fleet CA certificate: clients must present a certificate from it."),
    cert: Path | None = typer.Option(None, help="The broker's certificate."),
    key: Path | None = typer.Option(None, help="The broker's private key."),
    no_plain: bool = typer.Option(False, "--no-plain", help="Serve TLS only."),
    pki: Path | None = typer.Option(None, help="Run the fleet's production config from this PKI folder."),
    fleet: str | None = typer.Option(None, help="With --pki: the fleet's id."),
    coordinator: list[str] = typer.Option(["coord"], help="With --pki: coordinator ids."),
) -> None:
    """Start a broker in the foreground until Ctrl-C."""
    if pki is not None:
        if fleet is None:
            raise typer.BadParameter("--pki needs --fleet")
        try:
            _ensure_crl(pki)
            settings = production_settings(
                pki,
                fleet=fleet,
                coordinators=coordinator,
                host=host,
                tls_port=tls_port,
                out_dir=data_dir or Path(".edgespeed") / "broker",
            )
            asyncio.run(_serve(settings))
        except EdgeSpeedError as exc:
            raise fail(exc) from None
        return
    tls = None
    if any((ca, cert, key)):
        if not all((ca, cert, key)):
            raise typer.BadParameter("--ca, --cert and --key go together")
        assert ca and cert and key
        tls = BrokerTls(ca, cert, key)
    try:
        settings = BrokerSettings(
            host=host,
            port=None if no_plain else port,
            tls=tls,
            tls_port=tls_port,
            data_dir=data_dir,
            backend=backend,  # type: ignore[arg-type]
        )
        asyncio.run(_serve(settings))
    except EdgeSpeedError as exc:
        raise fail(exc) from None


async def _serve(settings: BrokerSettings) -> None:
    stop = stop_signal()
    async with EmbeddedBroker(settings) as broker:
        if broker.backend == "mosquitto":  # SIGHUP: Mosquitto re-reads the CRL, certificates and ACL
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _reloader(broker))
        console.print(f"[green]broker running[/] ({broker.backend})")
        with contextlib.suppress(EdgeSpeedError):
            console.print(f"  plain: {broker.url}")
        with contextlib.suppress(EdgeSpeedError):
            console.print(f"  TLS:   {broker.tls_url}")
        console.print("Ctrl-C to stop.", style="dim")
        await stop.wait()
        console.print("stopping")


def _reloader(broker: EmbeddedBroker) -> Callable[[], None]:
    def reload() -> None:
        with contextlib.suppress(EdgeSpeedError):
            broker.reload()
            console.print("reloaded: the revocation list, certificates and ACL were read again")

    return reload


def _ensure_crl(pki: Path) -> None:
    """A PKI from before every CA had a revocation list gets an empty one, where the CA key is."""
    if not (pki / "crl.pem").exists() and (pki / "ca.key").exists():
        refresh_crl(load_ca(pki))
        console.print(f"[yellow]{pki / 'crl.pem'} did not exist: signed an empty revocation list[/]")
