"""The subsystems of an open coordinator, built and wired together in one place."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from dataclasses import dataclass, field

from edgespeed.coordinator.answers import Answers
from edgespeed.coordinator.config import CoordinatorConfig
from edgespeed.coordinator.ledger import Ledger, SqliteLedger, ledger_caller, open_ledger
from edgespeed.coordinator.linkprobe import LinkProbe
from edgespeed.coordinator.policies import Policy
from edgespeed.coordinator.registry import Registry
from edgespeed.coordinator.revocation import Revocation
from edgespeed.coordinator.rollout import Rollouts
from edgespeed.coordinator.router import Router
from edgespeed.coordinator.scheduler import Scheduler
from edgespeed.coordinator.store import ModelStore
from edgespeed.coordinator.tasks import TaskTable
from edgespeed.protocol import topics
from edgespeed.protocol.messages import Task
from edgespeed.security import KeyDirectory, ReplayGuard, Sealer, load_data_key, load_identity
from edgespeed.security.atrest import private_database, private_dir
from edgespeed.transfer import BlobServer
from edgespeed.transport.base import Transport, Will
from edgespeed.transport.mqtt import MqttTransport

__all__ = ["Parts", "open_parts"]


@dataclass
class Parts:
    """What an open coordinator holds: made together when it opens, gone when it closes."""

    ledger: Ledger
    own_ledger: bool
    store: ModelStore
    sealer: Sealer
    replay: ReplayGuard
    transport: Transport
    server: BlobServer
    rollouts: Rollouts
    scheduler: Scheduler
    router: Router
    probe: LinkProbe
    revocation: Revocation | None = None
    workers: list[asyncio.Task[None]] = field(default_factory=list)


async def open_parts(
    config: CoordinatorConfig,
    *,
    client_id: str,
    registry: Registry,
    tasks: TaskTable,
    policy: Policy,
    stats: Counter[str],
    changed: asyncio.Event,
    ledger: Ledger | None,
    transport: Transport | None,
    will: Will | None,
) -> Parts:
    """Identity, keys, store, ledger and transport, and the subsystems over them (nothing connects yet)."""
    cfg = config
    primary = client_id == cfg.coordinator_id
    private_dir(cfg.state_dir)  # mode 0700; its files 0600
    identity = load_identity(cfg.pki_dir, cfg.coordinator_id, ca_file=cfg.pki_dir / "ca.crt")
    directory = KeyDirectory.from_folder(cfg.pki_dir)  # with the folder's revocation list
    # The primary keeps its replay window across restarts; a short-lived client seals on a lane of its own.
    replay = ReplayGuard(private_database(cfg.state_dir / "replay.db")) if primary else ReplayGuard()
    lane = 0 if primary else secrets.randbelow(255) + 1
    sealer = Sealer(cfg.coordinator_id, identity.seal_key(), directory, replay=replay, lane=lane)
    store = ModelStore(cfg.state_dir / "models", key=load_data_key(cfg.state_dir, cfg.data_key_file))
    own_ledger = ledger is None
    the_ledger: Ledger = ledger if ledger is not None else await asyncio.to_thread(open_ledger, cfg)
    link: Transport = transport or MqttTransport(cfg.mqtt(client_id, will=will, persistent=primary))
    db = ledger_caller(the_ledger)
    server = BlobServer(link, fleet=cfg.fleet, server_id=cfg.coordinator_id, sealer=sealer)
    rollouts = Rollouts(
        cfg,
        registry=registry,
        ledger=the_ledger,
        db=db,
        store=store,
        sealer=sealer,
        sign_key=identity.sign_key(),
        directory=directory,
        transport=link,
        server=server,
    )

    async def send(device: str, task: Task) -> None:
        await link.publish(topics.device_inbox(cfg.fleet, device), sealer.seal(task, recipient=device))

    scheduler = Scheduler(
        cfg,
        registry=registry,
        tasks=tasks,
        rollouts=rollouts,
        ledger=the_ledger,
        db=db,
        policy=policy,
        send=send,
        connected=lambda: link.connected,
        stats=stats,
    )
    answers = Answers(
        cfg,
        registry=registry,
        tasks=tasks,
        rollouts=rollouts,
        ledger=the_ledger,
        db=db,
        stats=stats,
        wake=scheduler.wake,
        inline_db=isinstance(the_ledger, SqliteLedger),
    )
    probe = LinkProbe(link, fleet=cfg.fleet, lane=lane)
    revocation = Revocation(
        fleet=cfg.fleet,
        coordinator_id=cfg.coordinator_id,
        pki_dir=cfg.pki_dir,
        directory=directory,
        transport=link,
        registry=registry,
        scheduler=scheduler,
        stats=stats,
        publish=primary,
    )
    router = Router(
        link,
        registry=registry,
        sealer=sealer,
        server=server,
        scheduler=scheduler,
        answers=answers,
        rollouts=rollouts,
        probe=probe,
        stats=stats,
        changed=changed,
        revocation=revocation,
    )
    return Parts(
        the_ledger, own_ledger, store, sealer, replay, link, server, rollouts, scheduler, router, probe, revocation
    )
