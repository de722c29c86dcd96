"""Chunked blob transfer, sans I/O: the sender's `BlobSource` and the receiver's `BlobAssembler`.

The receiver drives: it asks for chunks by offset, keeps a window of requests
in flight, verifies each chunk's SHA-256, writes chunks in order to
``<dest>.part`` while hashing the whole, and at the end checks the whole
blob's SHA-256 before renaming the file into place. A transfer broken by a
disconnect resumes by re-asking for what is outstanding; one broken by a
restart resumes from the partial file. Nothing here touches the network:
`edgespeed.transfer` drives these over a `Transport`.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from edgespeed.errors import BlobError, ConfigError
from edgespeed.protocol.messages import BlobInfo, Chunk, ChunkRequest, validate_blob_id

__all__ = ["BlobAssembler", "BlobSource", "DEFAULT_CHUNK_SIZE", "MAX_CHUNK_SIZE"]

# 512 KiB keeps a chunk with its envelope under brokers' common 1 MB limit.
DEFAULT_CHUNK_SIZE = 512 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024
_HASH_BLOCK = 4 * 1024 * 1024


def _check_chunk_size(chunk_size: int) -> None:
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ConfigError(f"chunk_size must be 1..{MAX_CHUNK_SIZE}, got {chunk_size}")


class BlobSource:
    """Serves chunks of one blob held in memory or in a file.

    Args:
        blob_id: the blob's name (a safe file name).
        data: the bytes, or the path of a file that must not change while served.
        chunk_size: the chunk size receivers should use.
        sha256: the file's digest when already known (a stored model); else it is computed.
    """

    def __init__(
        self, blob_id: str, data: bytes | Path, *, chunk_size: int = DEFAULT_CHUNK_SIZE, sha256: bytes | None = None
    ) -> None:
        validate_blob_id(blob_id)
        _check_chunk_size(chunk_size)
        self.blob_id = blob_id
        self.chunk_size = chunk_size
        self._bytes: bytes | None = None
        self._fd: int | None = None
        self._digests: dict[tuple[int, int], bytes] = {}
        if isinstance(data, bytes | bytearray | memoryview):
            self._bytes = bytes(data)
            self.size = len(self._bytes)
            digest = hashlib.sha256(self._bytes).digest()
        else:
            self._fd = os.open(data, os.O_RDONLY)
            self.size = os.fstat(self._fd).st_size
            # A digest already known (from a signed manifest) is not computed again: receivers check
            # every chunk and the whole against the manifest anyway.
            digest = sha256 if sha256 is not None else _hash_fd(self._fd, self.size)
        self.info = BlobInfo(name=blob_id, size=self.size, sha256=digest, chunk_size=chunk_size)

    def chunk(self, request: ChunkRequest) -> Chunk:
        """The chunk a request asks for.

        Raises:
            BlobError: another blob, an offset past the end, or a length over the chunk size.
        """
        if request.blob_id != self.blob_id:
            raise BlobError(f"request for {request.blob_id!r} sent to {self.blob_id!r}", reason="unknown_blob")
        if request.offset >= self.size and not (request.offset == 0 and self.size == 0):
            raise BlobError(f"offset {request.offset} past the end ({self.size})", reason="bad_offset")
        if request.length > self.chunk_size:
            raise BlobError(f"length {request.length} over chunk size {self.chunk_size}", reason="bad_length")
        end = min(request.offset + request.length, self.size)
        if self._bytes is not None:
            data = self._bytes[request.offset : end]
        else:
            assert self._fd is not None
            data = os.pread(self._fd, end - request.offset, request.offset)
        # Every receiver asks for the same chunks: each one's digest is computed once (32 bytes a chunk).
        key = (request.offset, len(data))
        digest = self._digests.get(key)
        if digest is None:
            digest = self._digests[key] = hashlib.sha256(data).digest()
        return Chunk(blob_id=self.blob_id, offset=request.offset, data=data, sha256=digest)

    def close(self) -> None:
        """Release the file, if any."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _hash_fd(fd: int, size: int) -> bytes:
    h = hashlib.sha256()
    offset = 0
    while offset < size:
        block = os.pread(fd, min(_HASH_BLOCK, size - offset), offset)
        if not block:
            break
        h.update(block)
        offset += len(block)
    return h.digest()


class BlobAssembler:
    """Receives one blob into ``dest``, resuming from ``dest.part`` if present.

    Args:
        info: what the blob must be (from a manifest the receiver trusts).
        dest: the final path; the partial file is ``dest`` + ``.part``.
        window: chunks requested ahead; bounds the memory held for
            out-of-order chunks to ``window * chunk_size``.
        max_bad_chunks: failed chunk verifications tolerated before giving up.
    """

    def __init__(self, info: BlobInfo, dest: Path, *, window: int = 8, max_bad_chunks: int = 16) -> None:
        if window < 1:
            raise ConfigError("window must be at least 1")
        _check_chunk_size(info.chunk_size)
        self.info = info
        self.dest = Path(dest)
        self.part = self.dest.with_name(self.dest.name + ".part")
        self.window = window
        self._max_bad = max_bad_chunks
        self.bad_chunks = 0
        self._hash = hashlib.sha256()
        self._pending: dict[int, bytes] = {}
        self._outstanding: dict[int, float] = {}
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.committed = self._resume()
        self.resumed_from = self.committed
        self._file = open(self.part, "ab")  # noqa: SIM115 - kept open for the transfer's life

    def _resume(self) -> int:
        """Hash what a previous attempt left, trimmed to whole chunks."""
        if not self.part.exists():
            self.part.touch()
            return 0
        size = self.part.stat().st_size
        keep = min(size - size % self.info.chunk_size, self.info.size)
        if size != keep:
            os.truncate(self.part, keep)
        with open(self.part, "rb") as f:
            remaining = keep
            while remaining:
                block = f.read(min(_HASH_BLOCK, remaining))
                if not block:
                    break
                self._hash.update(block)
                remaining -= len(block)
        return keep

    @property
    def done(self) -> bool:
        """Whether every byte has been received and written."""
        return self.committed >= self.info.size

    def _length_at(self, offset: int) -> int:
        return min(self.info.chunk_size, self.info.size - offset)

    def requests(self, *, now: float | None = None, timeout: float = 5.0) -> list[ChunkRequest]:
        """Chunk requests to send now: new ones within the window, and expired ones again."""
        now = time.monotonic() if now is None else now
        out = []
        for offset, sent in list(self._outstanding.items()):
            if now - sent >= timeout:
                self._outstanding[offset] = now
                out.append(ChunkRequest(self.info.name, offset, self._length_at(offset)))
        offset = self.committed
        while len(self._outstanding) + len(self._pending) < self.window and offset < self.info.size:
            if offset not in self._outstanding and offset not in self._pending:
                self._outstanding[offset] = now
                out.append(ChunkRequest(self.info.name, offset, self._length_at(offset)))
            offset += self.info.chunk_size
        return out

    def next_deadline(self, timeout: float) -> float | None:
        """When the oldest outstanding request expires (monotonic time), if any."""
        return min(self._outstanding.values()) + timeout if self._outstanding else None

    def accept(self, chunk: Chunk) -> bool:
        """Take a chunk; returns False for a duplicate or an unasked-for one.

        Raises:
            BlobError: another blob, a bad offset or length, or too many chunks
                that failed their hash (a failed chunk is asked for again).
        """
        if chunk.blob_id != self.info.name:
            raise BlobError(f"chunk of {chunk.blob_id!r}, expected {self.info.name!r}", reason="unknown_blob")
        offset = chunk.offset
        if offset % self.info.chunk_size or offset >= self.info.size:
            raise BlobError(f"chunk offset {offset} is not a chunk boundary of the blob", reason="bad_offset")
        if offset < self.committed or offset in self._pending:
            return False
        if len(chunk.data) != self._length_at(offset) or hashlib.sha256(chunk.data).digest() != chunk.sha256:
            self.bad_chunks += 1
            self._outstanding.pop(offset, None)  # asked for again by the next requests()
            if self.bad_chunks > self._max_bad:
                raise BlobError(
                    f"{self.bad_chunks} chunks of {self.info.name!r} failed verification", reason="chunk_hash"
                )
            return False
        if offset not in self._outstanding:
            return False
        del self._outstanding[offset]
        self._pending[offset] = chunk.data
        while self.committed in self._pending:
            data = self._pending.pop(self.committed)
            self._file.write(data)
            self._hash.update(data)
            self.committed += len(data)
        return True

    def finish(self) -> Path:
        """Verify the whole blob and move it into place.

        Raises:
            BlobError: not complete, or the whole-blob SHA-256 differs (the
                partial file is removed, so a retry starts clean).
        """
        if not self.done:
            raise BlobError(f"{self.info.name!r} incomplete: {self.committed}/{self.info.size}", reason="incomplete")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if self._hash.digest() != self.info.sha256:
            self.part.unlink(missing_ok=True)
            raise BlobError(f"SHA-256 of {self.info.name!r} does not match its manifest", reason="blob_hash")
        os.replace(self.part, self.dest)
        return self.dest

    def close(self) -> None:
        """Stop; the partial file stays for a later resume."""
        if not self._file.closed:
            self._file.flush()
            self._file.close()
