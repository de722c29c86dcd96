"""Fleet members as processes: logs to a file, stopped and always reaped on the way out."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from edgespeed._compat import Self
from edgespeed.errors import EdgeSpeedError
from edgespeed.testing.configs import write_agent_toml, write_coordinator_toml

if TYPE_CHECKING:
    from edgespeed.agent import AgentConfig
    from edgespeed.coordinator import CoordinatorConfig

__all__ = ["FleetProcess", "agent_process", "coordinator_process", "start_process"]

log = logging.getLogger(__name__)

#: Seconds a process has to leave after SIGTERM before it is killed.
GRACE_S = 10.0


class FleetProcess:
    """A process of the fleet, its stdout and stderr in ``log``.

    Use as ``with`` or ``async with`` (the asynchronous form waits off the event
    loop, so an in-process broker keeps serving the process while it says
    goodbye), or call `stop`/`astop`: SIGTERM, then SIGKILL after ``grace``
    seconds, and the process is reaped either way.
    """

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log_file: Path, *, grace: float = GRACE_S) -> None:
        self.name = name
        self.popen = popen
        self.log = log_file
        self.grace = grace

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once it exited (negative: killed by that signal), else None."""
        return self.popen.poll()

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` (SIGKILL, for a fault test) if it still runs; it is reaped on `stop`."""
        if self.alive:
            self.popen.send_signal(sig)

    def log_tail(self, chars: int = 2000) -> str:
        """The end of its log."""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def check(self) -> None:
        """Raise if it has exited.

        Raises:
            EdgeSpeedError: it exited; the end of its log is quoted.
        """
        if self.popen.poll() is not None:
            raise EdgeSpeedError(
                f"{self.name} exited with status {self.popen.returncode}; its log ends:\n{self.log_tail()}"
            )

    async def wait_for_output(self, text: str, timeout: float = 30.0) -> None:
        """Wait until ``text`` appears in its log (a line it prints once ready).

        Raises:
            EdgeSpeedError: it exited first.
            TimeoutError: not within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while text not in self.log_tail(1 << 20):
            self.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not print {text!r} within {timeout} s")
            await asyncio.sleep(0.02)

    def stop(self, grace: float | None = None) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds (0: SIGKILL at once); returns the exit status."""
        grace = self.grace if grace is None else grace
        if self.popen.poll() is None:
            if grace > 0:
                self.popen.terminate()
                try:
                    return self.popen.wait(grace)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not leave within %.0f s of SIGTERM; killing it", self.name, grace)
            self.popen.kill()
        try:
            return self.popen.wait(30)
        except subprocess.TimeoutExpired:  # pragma: no cover - stuck in the kernel
            log.error("%s (pid %d) did not die within 30 s of SIGKILL", self.name, self.pid)
            return -signal.SIGKILL

    async def astop(self, grace: float | None = None) -> int:
        """`stop`, waiting off the event loop."""
        return await asyncio.to_thread(self.stop, grace)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.astop()

    def __repr__(self) -> str:
        state = "running" if self.alive else f"exited {self.popen.returncode}"
        return f"<FleetProcess {self.name} pid {self.pid} {state}>"


def start_process(
    name: str,
    argv: Sequence[str],
    log_file: Path,
    *,
    env: Mapping[str, str] | None = None,
    cpu: int | None = None,
    grace: float = GRACE_S,
) -> FleetProcess:
    """Start ``argv`` with stdout and stderr appended to ``log_file`` (unbuffered Python output).

    Args:
        env: variables added to this process's environment.
        cpu: pin the process to this CPU (where the OS allows).
        grace: seconds between SIGTERM and SIGKILL when it is stopped.
    """
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    pin = None
    if cpu is not None and hasattr(os, "sched_setaffinity"):

        def pin() -> None:
            os.sched_setaffinity(0, {cpu})

    with log_file.open("ab") as out:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            preexec_fn=pin,  # only sched_setaffinity, before exec
        )
    return FleetProcess(name, popen, log_file, grace=grace)


def agent_process(
    config: AgentConfig | Path,
    *,
    log_file: Path | None = None,
    cli: bool = False,
    cpu: int | None = None,
    env: Mapping[str, str] | None = None,
    grace: float = GRACE_S,
) -> FleetProcess:
    """A device agent in its own process: ``python -m edgespeed.agent`` (the lean daemon that
    ``edgespeed-agent`` and the systemd unit run), or with ``cli`` ``python -m edgespeed device run``.

    Args:
        config: the agent's configuration (written to ``agent.toml`` in its state folder) or a TOML file.
        log_file: where its output goes; by default beside the TOML file, ``<device>.log``.
        cpu: pin it to this CPU.
    """
    if isinstance(config, Path):
        path, name = config, config.stem
    else:
        path, name = write_agent_toml(config), config.device_id
    command = ["edgespeed", "device", "run"] if cli else ["edgespeed.agent"]
    return start_process(
        name,
        [sys.executable, "-m", *command, "--config", str(path)],
        log_file or path.with_name(f"{name}.log"),
        env=env,
        cpu=cpu,
        grace=grace,
    )


def coordinator_process(
    config: CoordinatorConfig | Path,
    *,
    log_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    grace: float = GRACE_S,
) -> FleetProcess:
    """``edgespeed coordinator run`` in its own process (config written to its state folder if not a file)."""
    path = config if isinstance(config, Path) else write_coordinator_toml(config)
    return start_process(
        "coordinator",
        [sys.executable, "-m", "edgespeed", "coordinator", "run", "--config", str(path)],
        log_file or path.with_name("coordinator.log"),
        env=env,
        grace=grace,
    )
