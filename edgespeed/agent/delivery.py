"""The way out: every answer the agent sends, sealed for its recipient, and the outbox.

`Delivery` owns sending. An answer (a result, an error, a model status, a
forwarded stage) is sealed for its recipient and published; one that cannot go
now because the broker is away waits in the outbox, on disk and encrypted, and
the flusher sends it when the broker is back. An answer the broker would never
take (too large) is replaced by a ``result_too_large`` error that fits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from edgespeed._compat import timeout as timeout_after
from edgespeed.agent.config import AgentConfig
from edgespeed.errors import NotConnectedError, PayloadTooLargeError, TransportError
from edgespeed.protocol import topics
from edgespeed.protocol.messages import Error, Message, Result, Task
from edgespeed.security import Sealer
from edgespeed.transport.base import Transport

if TYPE_CHECKING:
    from edgespeed.agent.outbox import Outbox  # sqlite3 only when an agent runs

__all__ = ["Delivery"]

log = logging.getLogger(__name__)


class Delivery:
    """Seals and publishes what the agent sends; keeps what cannot go now in the outbox.

    Args:
        config: the agent's configuration.
        transport: the agent's open transport.
        sealer: seals each message for its recipient (when sent, so a message that waited is not stale).
        outbox: where answers wait for the broker; the `Device` opens and closes it.
    """

    def __init__(self, config: AgentConfig, transport: Transport, sealer: Sealer, outbox: Outbox) -> None:
        self._config = config
        self._transport = transport
        self._sealer = sealer
        self._outbox = outbox
        self._wake = asyncio.Event()

    def topic(self, recipient: str) -> str:
        """The topic that reaches ``recipient``: the coordinator's inbox for us, or a peer's inbox."""
        cfg = self._config
        if recipient == cfg.coordinator:
            return topics.coordinator_inbox(cfg.fleet, cfg.device_id)
        return topics.device_inbox(cfg.fleet, recipient)

    async def send(self, recipient: str, message: Message) -> None:
        """Send a message now, or keep it in the outbox until the broker takes it."""
        await self._deliver(None, recipient, self.topic(recipient), message)

    async def answer(self, task: Task, sender: str, message: Result | Error) -> None:
        """Answer a task that ``sender`` gave us."""
        # Every stage of a split model answers (its errors, the last stage's result) to reply_to.
        await self.send(task.reply_to or sender, message)

    async def fail(self, task: Task, sender: str, code: str, message: str) -> None:
        """Answer a task with an error."""
        await self.answer(task, sender, Error(code, message, task_id=task.task_id, attempt=task.attempt))

    def refuse(self, task: Task, sender: str, code: str, message: str) -> None:
        """Answer a task the dispatcher cannot take, through the outbox.

        The dispatcher must never wait for a broker acknowledgement: while a burst fills the
        transport's incoming queue, socket reads pause, and the acknowledgement would never be read.
        """
        recipient = task.reply_to or sender
        refusal = Error(code, message, task_id=task.task_id, attempt=task.attempt)
        self._outbox.put(recipient, self.topic(recipient), refusal)
        self._wake.set()

    async def _deliver(self, row: int | None, recipient: str, topic: str, message: Message) -> bool:
        """Publish an answer; one that cannot go now waits in the outbox (``row``: already there)."""
        try:
            await self._transport.publish(topic, self._sealer.seal(message, recipient=recipient))
        except (NotConnectedError, TransportError) as exc:
            if row is None:
                # Kept on disk, encrypted, until the broker takes it. (An answer lost in a crash
                # before this point is not lost work: the coordinator gives the task out again.)
                self._outbox.put(recipient, topic, message)
                log.info("answer kept in the outbox (%s)", exc)
            self._wake.set()
            return False
        except PayloadTooLargeError as exc:
            # Retrying would never succeed: replace the answer by an error that fits.
            if row is not None:
                self._outbox.remove(row)
            log.error("answer to %s is too large to send: %s", recipient, exc)
            if isinstance(message, Result):
                await self.send(
                    recipient, Error("result_too_large", str(exc), task_id=message.task_id, attempt=message.attempt)
                )
            return True
        if row is not None:
            self._outbox.remove(row)
        return True

    async def run(self) -> None:
        """The flusher: sends what waits in the outbox when woken, or every second while the broker is there."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with timeout_after(1.0):
                    await self._wake.wait()
            self._wake.clear()
            if not self._transport.connected:
                continue
            try:
                for row, recipient, topic, message in self._outbox.pending():
                    if not await self._deliver(row, recipient, topic, message):
                        break
            except Exception:  # the flusher must outlive any one message; they stay in the outbox
                log.exception("sending the outbox failed; retrying")

    async def drained(self) -> None:
        """Return once the outbox is empty; the caller bounds the wait (it polls, only while closing)."""
        while len(self._outbox):
            self._wake.set()
            await asyncio.sleep(0.05)
