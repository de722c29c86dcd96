"""End-to-end sealing of envelope bodies.

Keys: for sender S and recipient R, ``X25519(S, R)`` (static keys from the
fleet certificates) goes through HKDF-SHA256 with the direction and a
rotation epoch into a 256-bit AES-GCM key. The public-key work happens once
per peer and epoch; each message costs one AEAD. Only S and R can compute the
key, so a body that opens was sealed by the sender the header names
(authenticated key agreement).

Sealed body layout: ``epoch (u32) | nonce (12) | ciphertext and tag``; the
whole envelope header, flags and body length included, is the associated
data, so no routing field can change undetected.

A content key (one random key for a payload that many devices receive, such as
a model) is wrapped for each recipient with the same pairwise keys, so a
rollout costs one bulk encryption plus a 60-byte wrap per device.

What this does not give (yet): forward secrecy. A stolen static X25519 key
opens recorded traffic of its epochs; ephemeral key announcements would fix it.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Collection

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgespeed.errors import ReplayError, SealError
from edgespeed.protocol._body import decode_body, encode_body
from edgespeed.protocol.envelope import DEFAULT_MAX_PAYLOAD, FLAG_SEALED, Envelope, decode_header, new_message_id
from edgespeed.protocol.messages import Message, MessageKind, kind_of, message_class
from edgespeed.protocol.topics import validate_id
from edgespeed.security.keys import KeyDirectory
from edgespeed.security.replay import ReplayGuard

__all__ = ["Sealer"]

_EPOCH = struct.Struct(">I")
_NONCE = 12
_TAG = 16
_OVERHEAD = _EPOCH.size + _NONCE + _TAG
_WRAP_AAD = b"edgespeed/wrap/v1|"


_LANE_MASK = (1 << 56) - 1


class Sealer:
    """Seals messages for peers and opens messages from them.

    Args:
        identity: our id (a device's, the coordinator's).
        seal_key: our X25519 private key.
        directory: the peers' public keys.
        replay: the replay window store; None disables replay checks (not for production).
        max_age: seconds after which a message is refused as stale.
        max_skew: seconds a sender's clock may run ahead of ours.
        rotation: seconds per key epoch; keys rotate at epoch boundaries.
        clock: Unix time in seconds.
        lane: 0 to 255, the top 8 bits of every sequence. Processes that share
            an identity (coordinator replicas, a CLI beside a running
            coordinator) seal on different lanes; receivers keep a replay
            window per sender and lane.
    """

    def __init__(
        self,
        identity: str,
        seal_key: x25519.X25519PrivateKey,
        directory: KeyDirectory,
        *,
        replay: ReplayGuard | None,
        max_age: float = 300.0,
        max_skew: float = 30.0,
        rotation: float = 86400.0,
        clock: Callable[[], float] = time.time,
        lane: int = 0,
    ) -> None:
        if not 0 <= lane <= 255:
            raise ValueError("lane must be 0..255")
        self.lane = lane
        self.identity = validate_id(identity, "identity")
        self._key = seal_key
        self._directory = directory
        self._replay = replay
        self._max_age_ms = int(max_age * 1000)
        self._max_skew_ms = int(max_skew * 1000)
        self._rotation = rotation
        self._clock = clock
        self._keys: OrderedDict[tuple[str, str, int], AESGCM] = OrderedDict()
        self._last_sequence = 0

    # -- keys --------------------------------------------------------------

    def _epoch(self, now: float) -> int:
        return int(now // self._rotation) & 0xFFFFFFFF

    def _aead(self, sender: str, recipient: str, epoch: int) -> AESGCM:
        cache_key = (sender, recipient, epoch)
        peer_id = recipient if sender == self.identity else sender
        aead = self._keys.get(cache_key)
        if aead is not None and peer_id in self._directory:  # a peer revoked since is forgotten at once
            self._keys.move_to_end(cache_key)
            return aead
        self._keys.pop(cache_key, None)
        peer = self._directory.get(peer_id)
        shared = self._key.exchange(peer.seal_public)
        info = b"edgespeed/seal/v1|" + sender.encode() + b"|" + recipient.encode() + b"|" + _EPOCH.pack(epoch)
        aead = AESGCM(HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(shared))
        self._keys[cache_key] = aead
        if len(self._keys) > 4096:
            self._keys.popitem(last=False)
        return aead

    def _next_sequence(self) -> int:
        # Microseconds since the epoch: increasing across restarts without
        # keeping state, as long as the clock does not step back.
        self._last_sequence = max(self._last_sequence + 1, int(self._clock() * 1_000_000))
        return (self.lane << 56) | (self._last_sequence & _LANE_MASK)

    # -- sealing -----------------------------------------------------------

    def seal(
        self,
        message: Message,
        *,
        recipient: str,
        correlation_id: bytes = bytes(16),
        message_id: bytes | None = None,
    ) -> bytearray:
        """An envelope with ``message`` sealed for ``recipient``.

        Raises:
            UnknownPeerError: no valid certificate for ``recipient``.
        """
        validate_id(recipient, "recipient")
        now = self._clock()
        epoch = self._epoch(now)
        body = encode_body(message)
        envelope = Envelope(
            kind=kind_of(message),
            sender=self.identity,
            recipient=recipient,
            body=b"",
            sequence=self._next_sequence(),
            timestamp_ms=int(now * 1000),
            message_id=message_id or new_message_id(),
            correlation_id=correlation_id,
            flags=FLAG_SEALED,
        )
        header = envelope.header(body_length=len(body) + _OVERHEAD)
        nonce = os.urandom(_NONCE)
        # One buffer, encrypted in place: a 1 MiB body is not copied again.
        out = bytearray(len(header) + _OVERHEAD + len(body))
        at = len(header)
        out[:at] = header
        out[at : at + _EPOCH.size] = _EPOCH.pack(epoch)
        out[at + _EPOCH.size : at + _EPOCH.size + _NONCE] = nonce
        self._aead(self.identity, recipient, epoch).encrypt_into(
            nonce, body, header, memoryview(out)[at + _EPOCH.size + _NONCE :]
        )
        return out

    def open(
        self,
        payload: bytes | bytearray,
        *,
        topic_sender: str | None = None,
        allow_plain: Collection[MessageKind] = (),
        max_size: int = DEFAULT_MAX_PAYLOAD,
    ) -> tuple[Envelope, Message]:
        """Open a sealed envelope addressed to us.

        The returned envelope's body is left empty when it was sealed: the
        opened message beside it is what the body held.

        Args:
            payload: the MQTT payload.
            topic_sender: the sender named by the topic it came on; must match the header.
            allow_plain: kinds accepted unsealed (e.g. chunks whose data is
                already encrypted under a content key).
            max_size: refuse larger payloads before parsing.

        Raises:
            ProtocolError: the envelope or body does not decode.
            SealError: unsealed, for another recipient, sender not matching the
                topic, tampered, or sealed under a key we do not share.
            ReplayError: replayed, stale or from the future.
            UnknownPeerError: the sender has no valid certificate.
        """
        envelope, offset = decode_header(payload, max_size=max_size)
        if topic_sender is not None and envelope.sender != topic_sender:
            raise SealError(
                f"sender {envelope.sender!r} does not match the topic's {topic_sender!r}", reason="sender_mismatch"
            )
        if not envelope.sealed:
            if envelope.kind in allow_plain:
                body_bytes = bytes(memoryview(payload)[offset:])
                return (
                    dataclasses.replace(envelope, body=body_bytes),
                    decode_body(message_class(envelope.kind), body_bytes),
                )
            raise SealError(f"{envelope.kind.name} from {envelope.sender!r} is not sealed", reason="unsealed")
        if envelope.recipient != self.identity:
            raise SealError(f"sealed for {envelope.recipient!r}, not for us", reason="wrong_recipient")
        now_ms = int(self._clock() * 1000)
        if now_ms - envelope.timestamp_ms > self._max_age_ms:
            raise ReplayError(f"message from {envelope.sender!r} is older than the allowed age", reason="stale")
        if envelope.timestamp_ms - now_ms > self._max_skew_ms:
            raise ReplayError(f"message from {envelope.sender!r} is dated in the future", reason="future")
        view = memoryview(payload)
        body = view[offset:]
        if len(body) < _OVERHEAD:
            raise SealError("sealed body too short", reason="truncated")
        (epoch,) = _EPOCH.unpack_from(body, 0)
        current = self._epoch(now_ms / 1000)
        if epoch not in (current, (current - 1) & 0xFFFFFFFF, (current + 1) & 0xFFFFFFFF):
            raise SealError(f"key epoch {epoch} is not current", reason="stale_key")
        nonce = bytes(body[_EPOCH.size : _EPOCH.size + _NONCE])
        plaintext = bytearray(len(body) - _OVERHEAD)
        try:
            # The associated data is the header exactly as received.
            self._aead(envelope.sender, self.identity, epoch).decrypt_into(
                nonce, body[_EPOCH.size + _NONCE :], view[:offset], plaintext
            )
        except InvalidTag:
            raise SealError(
                f"sealed message from {envelope.sender!r} failed authentication", reason="tampered"
            ) from None
        if self._replay is not None:
            self._replay.check(envelope.sender, envelope.sequence)
        return envelope, decode_body(message_class(envelope.kind), plaintext)

    # -- content keys --------------------------------------------------------

    def wrap_key(self, content_key: bytes, recipients: Collection[str], *, context: str) -> dict[str, bytes]:
        """Wrap a content key for each recipient; ``context`` (e.g. model and version) is bound to it."""
        epoch = self._epoch(self._clock())
        aad = _WRAP_AAD + context.encode()
        wrapped = {}
        for recipient in recipients:
            nonce = os.urandom(_NONCE)
            sealed = self._aead(self.identity, recipient, epoch).encrypt(nonce, content_key, aad)
            wrapped[recipient] = _EPOCH.pack(epoch) + nonce + sealed
        return wrapped

    def unwrap_key(self, sender: str, wrapped: bytes, *, context: str) -> bytes:
        """Unwrap a content key that ``sender`` wrapped for us.

        Raises:
            SealError: not for us, tampered, or another context.
        """
        if len(wrapped) != _EPOCH.size + _NONCE + 32 + _TAG:
            raise SealError("wrapped key has the wrong length", reason="truncated")
        (epoch,) = _EPOCH.unpack_from(wrapped, 0)
        try:
            return self._aead(sender, self.identity, epoch).decrypt(
                wrapped[_EPOCH.size : _EPOCH.size + _NONCE],
                wrapped[_EPOCH.size + _NONCE :],
                _WRAP_AAD + context.encode(),
            )
        except InvalidTag:
            raise SealError(f"content key from {sender!r} failed authentication", reason="tampered") from None
