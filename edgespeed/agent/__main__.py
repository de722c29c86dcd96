"""``edgespeed-agent --config FILE``: the device agent as a lean daemon.

The same agent as ``edgespeed device run``, without the interactive CLI's
libraries (typer, rich and what they pull in: about 10 MB of memory on a small
gateway). The systemd unit in ``devices/`` runs this.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from edgespeed import __version__
from edgespeed.agent.config import AgentConfig
from edgespeed.agent.device import Device
from edgespeed.errors import EdgeSpeedError


async def serve(config: AgentConfig) -> None:
    """Run the agent until SIGINT or SIGTERM, then drain and leave.

    Raises:
        PartFailedError: a part of the agent failed and the agent closed itself (logged at CRITICAL).
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Device(config) as device:
        backends = ", ".join(device.card.backends) or "none"
        logging.getLogger("edgespeed").warning(
            "%s joined fleet %s at %s (backends: %s)", config.device_id, config.fleet, config.broker, backends
        )
        await device.run_until_closed(stop)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run; exit status 1 with a one-line error on bad configuration, or when
    the agent stopped because one of its parts failed (the traceback is in the log, at CRITICAL)."""
    parser = argparse.ArgumentParser(prog="edgespeed-agent", description="Run the EdgeSpeed device agent.")
    parser.add_argument("--config", "-c", type=Path, required=True, help="the agent's TOML configuration")
    parser.add_argument("--verbose", "-v", action="store_true", help="log debug detail")
    parser.add_argument("--version", action="version", version=f"edgespeed-agent {__version__}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        asyncio.run(serve(AgentConfig.from_toml(args.config)))
    except EdgeSpeedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
