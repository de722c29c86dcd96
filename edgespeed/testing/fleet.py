"""A whole fleet for tests, benchmarks and the demo: broker, PKI, configurations and agents.

``async with fleet(devices=2) as f`` creates a PKI, starts a broker on free
ports and two agents (in this process, or as processes with
``in_process=False``), and on the way out stops every agent and process it
started (processes are always reaped), then the broker, then removes its
folder, even when the body raises. `Fleet` also wraps a broker and PKI made
elsewhere (a test fixture's) and then stops only what it started itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from edgespeed._compat import Self
from edgespeed.errors import ConfigError, EdgeSpeedError
from edgespeed.testing.broker import BrokerBackend, broker_url, start_broker
from edgespeed.testing.configs import agent_config, coordinator_config, write_agent_toml, write_coordinator_toml
from edgespeed.testing.pki import FleetPki, make_pki
from edgespeed.testing.processes import FleetProcess, agent_process, start_process
from edgespeed.transport import EmbeddedBroker

if TYPE_CHECKING:
    from edgespeed.agent import AgentConfig, Device
    from edgespeed.coordinator import Coordinator, CoordinatorConfig

__all__ = ["Fleet", "fleet"]

log = logging.getLogger(__name__)


class Fleet:
    """A broker, a fleet PKI, a working folder, and the agents and processes started in it.

    Args:
        base: the working folder: agents' state in ``base/<device>``, the coordinator's in
            ``base/coord``, TOML files in ``base``, process logs in ``base/logs``.
        pki: the fleet's identities.
        broker: a running broker.
        backends: the agents' backends unless a start says otherwise.
        in_process: the default of `start_agents`: `Device` objects in this process, or processes.
        cli: agents as processes run ``edgespeed device run`` rather than ``python -m edgespeed.agent``.
        test_timings: configurations start from the fast test timings (see `agent_config`).
        agent_settings, coordinator_settings: further settings of every configuration made here.
    """

    def __init__(
        self,
        base: Path,
        pki: FleetPki,
        broker: EmbeddedBroker,
        *,
        backends: Sequence[str] = ("onnx",),
        in_process: bool = True,
        cli: bool = False,
        test_timings: bool = True,
        agent_settings: Mapping[str, Any] | None = None,
        coordinator_settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.base = Path(base)
        self.pki = pki
        self.broker = broker
        self.backends = tuple(backends)
        self.in_process = in_process
        self.cli = cli
        self.test_timings = test_timings
        self.agent_settings = dict(agent_settings or {})
        self.coordinator_settings = dict(coordinator_settings or {})
        self.devices: dict[str, Device] = {}
        """In-process agents running now, by device id."""
        self.processes: dict[str, FleetProcess] = {}
        """Processes running now (agents and others), by name."""

    @property
    def url(self) -> str:
        """The broker URL members use: its TLS listener when it has one."""
        return broker_url(self.broker)

    @property
    def device_ids(self) -> tuple[str, ...]:
        return self.pki.device_ids

    @property
    def logs(self) -> Path:
        return self.base / "logs"

    def agent_config(self, device: str, **settings: Any) -> AgentConfig:
        """Agent ``device``'s configuration: state in ``base/<device>``, the fleet's settings, then ``settings``."""
        values = {"backends": self.backends, **self.agent_settings, **settings}
        return agent_config(self.broker, self.pki, device, self.base / device, test_timings=self.test_timings, **values)

    def coordinator_config(self, **settings: Any) -> CoordinatorConfig:
        """The coordinator's configuration: state in ``base/coord``."""
        values = {**self.coordinator_settings, **settings}
        return coordinator_config(self.broker, self.pki, self.base / "coord", test_timings=self.test_timings, **values)

    def agent_toml(self, device: str, **settings: Any) -> Path:
        """Write agent ``device``'s configuration to ``base/<device>.toml``."""
        return write_agent_toml(self.agent_config(device, **settings), self.base / f"{device}.toml")

    def coordinator_toml(self, **settings: Any) -> Path:
        """Write the coordinator's configuration to ``base/coordinator.toml``."""
        return write_coordinator_toml(self.coordinator_config(**settings), self.base / "coordinator.toml")

    def coordinator(self, *, client_id: str | None = None, **settings: Any) -> Coordinator:
        """A `Coordinator` for this fleet, not started: ``async with f.coordinator() as c``."""
        from edgespeed.coordinator import Coordinator

        config = self.coordinator_config(**settings)
        return Coordinator(config) if client_id is None else Coordinator(config, client_id=client_id)

    async def start_agents(
        self,
        devices: Sequence[str] | None = None,
        *,
        in_process: bool | None = None,
        cli: bool | None = None,
        cpus: Mapping[str, int] | None = None,
        **settings: Any,
    ) -> list[Any]:
        """Start agents for ``devices`` (all the PKI's devices by default); returns them in order,
        each a `Device` (in process) or a `FleetProcess`. Nothing waits for them to join.

        Args:
            in_process, cli: as the fleet's defaults, unless given.
            cpus: pin agent processes to CPUs, by device id.
            settings: configuration settings of these agents.

        Raises:
            ConfigError: one of them runs already.
        """
        names = list(self.device_ids if devices is None else devices)
        running = sorted(set(names) & (self.devices.keys() | self.processes.keys()))
        if running:
            raise ConfigError(f"agents already running: {', '.join(running)}")
        in_process = self.in_process if in_process is None else in_process
        started: list[Any] = []
        try:
            for name in names:
                started.append(
                    await self._start_agent(name, in_process, self.cli if cli is None else cli, cpus, settings)
                )
        except BaseException:
            with contextlib.suppress(EdgeSpeedError):  # those started here go again; the first error tells
                await self.stop(names[: len(started)])
            raise
        return started

    async def _start_agent(
        self, name: str, in_process: bool, cli: bool, cpus: Mapping[str, int] | None, settings: dict[str, Any]
    ) -> Any:
        config = self.agent_config(name, **settings)
        if in_process:
            from edgespeed.agent import Device

            device = Device(config)
            await device.__aenter__()
            self.devices[name] = device
            return device
        proc = agent_process(
            write_agent_toml(config, self.base / f"{name}.toml"),
            log_file=self.logs / f"{name}.log",
            cli=cli,
            cpu=(cpus or {}).get(name),
        )
        self.processes[name] = proc
        return proc

    @contextlib.asynccontextmanager
    async def agents(self, devices: Sequence[str] | None = None, **kw: Any) -> AsyncIterator[list[Any]]:
        """`start_agents` for the body of an ``async with``; they are stopped on the way out."""
        names = list(self.device_ids if devices is None else devices)
        started = await self.start_agents(names, **kw)
        try:
            yield started
        finally:
            await self.stop(names)

    def spawn(self, name: str, argv: Sequence[str], **kw: Any) -> FleetProcess:
        """Start any process as part of the fleet (logs in ``base/logs/<name>.log``); stopped with the fleet.

        ``kw``: `start_process`'s (``env``, ``cpu``, ``grace``).
        """
        if name in self.processes or name in self.devices:
            raise ConfigError(f"{name} runs already")
        proc = start_process(name, argv, self.logs / f"{name}.log", **kw)
        self.processes[name] = proc
        return proc

    def start_coordinator_process(self, **settings: Any) -> FleetProcess:
        """``edgespeed coordinator run`` with `coordinator_toml` (``settings`` added), as the process
        ``coordinator`` of the fleet (log in ``base/logs/coordinator.log``)."""
        path = self.coordinator_toml(**settings)
        return self.spawn(
            "coordinator", [sys.executable, "-m", "edgespeed", "coordinator", "run", "--config", str(path)]
        )

    def check(self) -> None:
        """Raise if a process of the fleet has exited (quoting the end of its log).

        Raises:
            EdgeSpeedError: a process exited.
        """
        for proc in self.processes.values():
            proc.check()

    async def wait_devices(
        self, coordinator: Coordinator, n: int | None = None, *, model: str | None = None, timeout: float = 60.0
    ) -> list[str]:
        """Wait until ``n`` devices (all the PKI's by default) are online (and run ``model``),
        checking every second that the fleet's processes still run.

        Raises:
            EdgeSpeedError: a process exited meanwhile (its log is quoted).
            TimeoutError: not within ``timeout`` seconds.
        """
        n = len(self.device_ids) if n is None else n
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self.check()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{n} devices did not become ready within {timeout} s")
            with contextlib.suppress(TimeoutError):
                return await coordinator.wait_for_devices(n, model=model, timeout=min(1.0, remaining))

    async def stop(self, names: Sequence[str] | None = None) -> None:
        """Stop agents and processes (``names``, or everything the fleet started), all at once:
        in-process agents close (draining), processes get SIGTERM and are reaped, SIGKILLed if they linger.

        Raises:
            EdgeSpeedError: an agent failed to close (after every other one was stopped).
        """
        names = list(self.devices.keys() | self.processes.keys()) if names is None else list(names)
        devices = [self.devices.pop(n) for n in names if n in self.devices]
        procs = [self.processes.pop(n) for n in names if n in self.processes]
        results = await asyncio.gather(
            *(d.__aexit__(None, None, None) for d in devices), *(p.astop() for p in procs), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise EdgeSpeedError(f"{len(errors)} fleet member(s) did not stop cleanly: {errors[0]!r}") from errors[0]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.stop()
        except EdgeSpeedError:
            if exc is None:
                raise
            log.warning("while stopping the fleet after %r", exc, exc_info=True)


@contextlib.asynccontextmanager
async def fleet(
    devices: int | Sequence[str] = 2,
    *,
    in_process: bool = True,
    backends: Sequence[str] = ("onnx",),
    production: bool = True,
    fleet_id: str = "test",
    folder: Path | None = None,
    coordinators: Sequence[str] = ("coord",),
    auditors: Sequence[str] = (),
    clients: Sequence[str] = (),
    start: bool = True,
    cli: bool = False,
    broker_backend: BrokerBackend = "auto",
    plain: bool = True,
    persistence: bool = True,
    max_packet_size: int | None = None,
    test_timings: bool = True,
    agent_settings: Mapping[str, Any] | None = None,
    coordinator_settings: Mapping[str, Any] | None = None,
) -> AsyncIterator[Fleet]:
    """A fleet on this machine for the body of an ``async with``.

    Args:
        devices: how many devices (``dev-1``, ``dev-2``, ...) or their ids.
        in_process: agents as `Device` objects in this event loop, or (false) each its own process.
        backends: the agents' backends.
        production: the broker runs the production configuration (Mosquitto, mutual TLS only and the
            fleet ACL); false: a development broker (see `start_broker`).
        fleet_id: the fleet id.
        folder: the working folder (kept); by default a temporary one, removed on the way out.
        coordinators, auditors: identities to issue (the first coordinator is the one configurations name).
        clients: device certificates for clients that are not agents (raw MQTT peers, rogues).
        start: start every device's agent on entry; false: call `Fleet.start_agents` or `Fleet.agents`.
        cli: agent processes run ``edgespeed device run`` instead of ``python -m edgespeed.agent``.
        broker_backend, plain, persistence, max_packet_size: the broker's (see `start_broker`).
        test_timings, agent_settings, coordinator_settings: the configurations' (see `Fleet`).

    Raises:
        BrokerError: production without Mosquitto, or the broker did not start.
    """
    ids = tuple(f"dev-{i + 1}" for i in range(devices)) if isinstance(devices, int) else tuple(devices)
    async with contextlib.AsyncExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgespeed-fleet-")))
        base = Path(folder)  # make_pki creates it
        pki = make_pki(
            base / "pki",
            fleet_id,
            devices=ids,
            coordinators=coordinators,
            auditors=auditors,
            clients=clients,
        )
        broker = await stack.enter_async_context(
            start_broker(
                pki,
                base,
                production=production,
                backend=broker_backend,
                plain=plain,
                persistence=persistence,
                max_packet_size=max_packet_size,
            )
        )
        f = await stack.enter_async_context(
            Fleet(
                base,
                pki,
                broker,
                backends=backends,
                in_process=in_process,
                cli=cli,
                test_timings=test_timings,
                agent_settings=agent_settings,
                coordinator_settings=coordinator_settings,
            )
        )
        if start:
            await f.start_agents()
        yield f
