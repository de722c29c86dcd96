"""Encrypting a blob once under a content key, chunk by chunk.

A model rolled out to many devices is encrypted once: chunk ``i`` of the
plaintext becomes ``AES-256-GCM(key, nonce=i, aad=header|i|count)`` followed by
its tag, so each transfer chunk of ``chunk_size + 16`` bytes verifies and
decrypts on its own, and chunks cannot be reordered, dropped or mixed between
blobs. The content key travels wrapped per device in the signed manifest
(`Sealer.wrap_key`). Devices keep the ciphertext as it arrived: it is their
encrypted-at-rest copy.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgespeed.errors import ConfigError, SealError

__all__ = ["TAG_SIZE", "check_block", "decrypt_blob", "encrypt_blob", "iter_decrypted"]

TAG_SIZE = 16
_AAD = b"edgespeed/blob/v1|"


def _aad(blob_id: str, index: int, count: int) -> bytes:
    return _AAD + blob_id.encode() + b"|" + index.to_bytes(8, "big") + count.to_bytes(8, "big")


def encrypt_blob(data: bytes, *, blob_id: str, chunk_size: int, key: bytes | None = None) -> tuple[bytes, bytes]:
    """Encrypt ``data``; returns (ciphertext, content key). Serve it with chunk size ``chunk_size + 16``."""
    if chunk_size < 1:
        raise ConfigError("chunk_size must be positive")
    key = key or AESGCM.generate_key(bit_length=256)
    aead = AESGCM(key)
    count = max(1, -(-len(data) // chunk_size))
    view = memoryview(data)
    parts = [
        aead.encrypt(i.to_bytes(12, "big"), view[i * chunk_size : (i + 1) * chunk_size], _aad(blob_id, i, count))
        for i in range(count)
    ]
    return b"".join(parts), key


def check_block(block: bytes, key: bytes, *, blob_id: str, index: int, count: int) -> bool:
    """Whether ``block`` is block ``index`` of ``count`` of blob ``blob_id`` encrypted under ``key``."""
    try:
        AESGCM(key).decrypt(index.to_bytes(12, "big"), block, _aad(blob_id, index, count))
    except InvalidTag:
        return False
    return True


def iter_decrypted(path: Path, key: bytes, *, blob_id: str, chunk_size: int) -> Iterator[bytes]:
    """Decrypt an encrypted blob file chunk by chunk (``chunk_size`` is the plaintext chunk size).

    Raises:
        SealError: a chunk failed authentication, or the file was cut.
    """
    size = os.path.getsize(path)
    stride = chunk_size + TAG_SIZE
    count = max(1, -(-size // stride))
    aead = AESGCM(key)
    with open(path, "rb") as f:
        for i in range(count):
            block = f.read(stride)
            try:
                yield aead.decrypt(i.to_bytes(12, "big"), block, _aad(blob_id, i, count))
            except InvalidTag:
                raise SealError(f"chunk {i} of {blob_id!r} failed authentication", reason="tampered") from None


def decrypt_blob(path: Path, key: bytes, *, blob_id: str, chunk_size: int) -> bytes:
    """Decrypt a whole encrypted blob file into memory."""
    return b"".join(iter_decrypted(path, key, blob_id=blob_id, chunk_size=chunk_size))
