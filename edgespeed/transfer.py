"""Chunked blob transfer over a `Transport`: `BlobServer` and `fetch_blob`.

A receiver publishes `ChunkRequest` messages to the coordinator inbox under
its own id (``es/1/<fleet>/coord/in/<receiver>``); the server answers each with
a `Chunk` in the receiver's inbox. The topic a request came from names the
requester, and must agree with the envelope's sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from edgespeed._compat import timeout as timeout_after
from edgespeed.errors import BlobError, ProtocolError, TransportError, TransportTimeoutError
from edgespeed.protocol import topics
from edgespeed.protocol.blob import BlobAssembler, BlobSource
from edgespeed.protocol.envelope import decode_header, open_message, pack_message
from edgespeed.protocol.messages import BlobInfo, Chunk, ChunkRequest, Error, MessageKind
from edgespeed.security.blobcrypt import check_block
from edgespeed.security.ratelimit import PeerLimiter
from edgespeed.transport.base import Message, Transport

if TYPE_CHECKING:
    from edgespeed.security.seal import Sealer

__all__ = ["BlobServer", "chunk_verifier", "fetch_blob", "fetch_from"]

log = logging.getLogger(__name__)


class BlobServer:
    """Answers chunk requests for the blobs it holds.

    Args:
        transport: an open transport; the server consumes its messages.
        fleet: the fleet id.
        server_id: the id the server sends as (the coordinator's).
        concurrency: chunks being published at once.
        sealer: seals the server's error replies (chunks travel in clear, checked by their hashes).
        per_peer: each requester's allowance of chunk requests (a second, and in one burst); a request
            over it is dropped, and the requester asks again after its timeout. The default (400 a
            second, 128 at once) lets a device fetch at about 200 MB/s with 512 KiB chunks, and keeps one
            member from having the server spend its bandwidth on it alone.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        fleet: str,
        server_id: str,
        concurrency: int = 8,
        sealer: Sealer | None = None,
        per_peer: tuple[float, float] = (400.0, 128.0),
    ) -> None:
        self._transport = transport
        self._sealer = sealer
        self._fleet = topics.validate_id(fleet, "fleet")
        self._id = topics.validate_id(server_id, "server id")
        self._sources: dict[str, BlobSource] = {}
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._limits = PeerLimiter(*per_peer)
        self.served = 0
        self.rejected = 0

    def add(self, source: BlobSource) -> BlobInfo:
        """Serve a blob; returns what receivers need to fetch it."""
        self._sources[source.blob_id] = source
        return source.info

    async def run(self) -> None:
        """Subscribe to the coordinator inbox and serve until cancelled or the transport closes."""
        inbox = topics.coordinator_inbox_filter(self._fleet)
        await self._transport.subscribe(inbox)
        try:
            async for message in self._transport.messages():
                await self.handle(message)
        finally:
            self.stop()
            # Left behind, the filter would deliver later coordinator traffic twice.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._transport.unsubscribe(inbox))

    async def handle(self, message: Message) -> bool:
        """Answer ``message`` if it is a chunk request; False for anything else (left to the caller).

        Waits while ``concurrency`` chunks are being published already.
        """
        try:
            name = topics.parse_topic(message.topic)
            header, _ = decode_header(message.payload)
            if header.kind != MessageKind.CHUNK_REQUEST:
                return False  # results and reports for whoever else reads the coordinator inbox
            envelope, request = open_message(message.payload)
        except ProtocolError as exc:
            self.rejected += 1
            log.warning("dropped a bad message on %s: %s", message.topic, exc)
            return True
        if name.id != envelope.sender or not isinstance(request, ChunkRequest):
            self.rejected += 1
            log.warning("dropped %s from %r on %s", envelope.kind.name, envelope.sender, message.topic)
            return True
        if not self._limits.allow(envelope.sender):
            self.rejected += 1
            if self._limits.refused % 100 == 1:
                log.warning("%s asks for chunks faster than its allowance; requests dropped", envelope.sender)
            return True
        await self._slots.acquire()
        task = asyncio.create_task(self._answer(envelope.sender, request, envelope.message_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def stop(self) -> None:
        """Cancel the chunks being published."""
        for task in list(self._tasks):
            task.cancel()

    async def _answer(self, requester: str, request: ChunkRequest, request_id: bytes) -> None:
        try:
            source = self._sources.get(request.blob_id)
            reply: Chunk | Error
            if source is None:
                reply = Error(code="unknown_blob", message=f"no blob {request.blob_id!r} here")
            else:
                try:
                    reply = source.chunk(request)
                except BlobError as exc:
                    reply = Error(code=exc.reason, message=str(exc))
            if isinstance(reply, Error) and self._sealer is not None:
                # Chunks need no seal (each is checked against the signed manifest); an error ends a
                # download, so it must provably come from the server.
                payload: bytes | bytearray = self._sealer.seal(reply, recipient=requester, correlation_id=request_id)
            else:
                payload = pack_message(reply, sender=self._id, recipient=requester, correlation_id=request_id)
            await self._transport.publish(topics.device_inbox(self._fleet, requester), payload)
            self.served += isinstance(reply, Chunk)
        except TransportError as exc:
            # The requester asks again when its request times out.
            log.info("could not answer %s@%d for %s: %s", request.blob_id, request.offset, requester, exc)
        finally:
            self._slots.release()


async def fetch_blob(
    transport: Transport,
    info: BlobInfo,
    dest: Path,
    *,
    fleet: str,
    device_id: str,
    window: int = 24,
    request_timeout: float = 5.0,
    timeout: float = 600.0,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Fetch a blob into ``dest``, resuming a partial file, and verify it.

    The transport must be dedicated to this fetch while it runs: its messages
    are consumed here. A program that reads its inbox for other things too
    (the device agent) feeds `fetch_from` instead.

    Raises:
        BlobError: verification failed, or the server answered with an error.
        TransportTimeoutError: not finished within ``timeout`` seconds.
    """
    inbox = topics.device_inbox(fleet, device_id)
    # Waiting on an async generator with a timeout would close it when the
    # timeout fires, so a pump hands messages over through a bounded queue.
    incoming: asyncio.Queue[Chunk | Error | None] = asyncio.Queue(maxsize=2 * window)

    async def pump() -> None:
        async for message in transport.messages():
            if message.topic != inbox:
                continue
            try:
                _, body = open_message(message.payload)
            except ProtocolError as exc:
                log.warning("dropped a bad message in %s: %s", inbox, exc)
                continue
            if isinstance(body, Chunk | Error):
                await incoming.put(body)
        await incoming.put(None)

    await transport.subscribe(inbox)
    pump_task = asyncio.create_task(pump(), name=f"fetch[{info.name}].pump")
    try:
        return await fetch_from(
            transport,
            info,
            dest,
            incoming,
            fleet=fleet,
            device_id=device_id,
            window=window,
            request_timeout=request_timeout,
            timeout=timeout,
            on_progress=on_progress,
        )
    finally:
        pump_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump_task


async def fetch_from(
    transport: Transport,
    info: BlobInfo,
    dest: Path,
    incoming: asyncio.Queue[Chunk | Error | None],
    *,
    fleet: str,
    device_id: str,
    window: int = 24,
    request_timeout: float = 5.0,
    timeout: float = 600.0,
    on_progress: Callable[[int, int], None] | None = None,
    verify: Callable[[Chunk], bool] | None = None,
) -> Path:
    """Fetch a blob, sending requests on ``transport`` and taking answers from ``incoming``.

    ``incoming`` carries the chunks (and errors) addressed to this fetch; None
    means the source closed. ``verify``, if given, authenticates each chunk as
    it arrives (see `chunk_verifier`): one that fails is dropped and asked for
    again, so forged chunks can neither corrupt nor abort the fetch.

    Raises:
        BlobError: verification failed, or the server answered with an error.
        TransportTimeoutError: not finished within ``timeout`` seconds.
        TransportError: ``incoming`` closed.
    """
    assembler = BlobAssembler(info, dest, window=window)
    outbox = topics.coordinator_inbox(fleet, device_id)
    forged = 0
    deadline = time.monotonic() + timeout
    try:
        if on_progress:
            on_progress(assembler.committed, info.size)
        while not assembler.done:
            for request in assembler.requests(timeout=request_timeout):
                try:
                    await transport.publish(outbox, pack_message(request, sender=device_id))
                except TransportError as exc:
                    log.info("chunk request for offset %d not sent (%s); will retry", request.offset, exc)
            now = time.monotonic()
            if now >= deadline:
                raise TransportTimeoutError(
                    f"fetching {info.name!r} took over {timeout}s ({assembler.committed}/{info.size} bytes)"
                )
            wake = min(assembler.next_deadline(request_timeout) or now + request_timeout, deadline)
            try:
                async with timeout_after(max(wake - now, 0.001)):
                    body = await incoming.get()
            except TimeoutError:
                continue
            if body is None:
                raise TransportError("the message source closed during the fetch")
            if isinstance(body, Error):
                raise BlobError(f"server refused {info.name!r}: {body.code}: {body.message}", reason=body.code)
            if body.blob_id != info.name:
                continue
            if verify is not None and not verify(body):
                forged += 1
                if forged in (1, 10) or forged % 1000 == 0:
                    log.warning("%d chunks of %s failed authentication and were dropped", forged, info.name)
                continue
            if assembler.accept(body) and on_progress:
                on_progress(assembler.committed, info.size)
        return assembler.finish()
    finally:
        assembler.close()


def chunk_verifier(info: BlobInfo, key: bytes) -> Callable[[Chunk], bool]:
    """Authenticates the chunks of a blob encrypted with `edgespeed.security.encrypt_blob` under ``key``.

    A transfer chunk is exactly one AEAD block of the encrypted blob (``info.chunk_size`` is the plaintext
    chunk size plus the tag), so each verifies on its own against the content key that the signed manifest
    wraps for this device: only the coordinator that encrypted the blob can have made it.
    """
    stride = info.chunk_size

    def verify(chunk: Chunk) -> bool:
        if chunk.offset % stride:
            return False
        return check_block(
            bytes(chunk.data), key, blob_id=info.name, index=chunk.offset // stride, count=-(-info.size // stride)
        )

    return verify
