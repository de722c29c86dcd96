"""Signed messages (model manifests, remote configuration), and refusal of rollbacks.

The coordinator signs a message's canonical body encoding (with an empty
signature field), prefixed by a context per message type, with its Ed25519
key; a device verifies it with the key the fleet CA put in the signer's
certificate, requires the signer to hold the coordinator role, and refuses any
version not newer than what it has.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from edgespeed.errors import RollbackError, SignatureError, UnknownPeerError
from edgespeed.protocol._body import encode_body
from edgespeed.protocol.messages import DeviceConfig, ModelManifest
from edgespeed.security.keys import KeyDirectory

__all__ = ["sign_manifest", "sign_message", "verify_manifest", "verify_signed"]

Signed = TypeVar("Signed", ModelManifest, DeviceConfig)
_CONTEXTS: dict[type[Any], bytes] = {ModelManifest: b"edgespeed/manifest/v1|", DeviceConfig: b"edgespeed/config/v1|"}


def _signed_bytes(message: ModelManifest | DeviceConfig) -> bytes:
    return _CONTEXTS[type(message)] + encode_body(dataclasses.replace(message, signature=b""))


def sign_message(message: Signed, *, signer: str, key: ed25519.Ed25519PrivateKey) -> Signed:
    """The message signed by ``signer``."""
    unsigned = dataclasses.replace(message, signer=signer, signature=b"")
    return dataclasses.replace(unsigned, signature=key.sign(_signed_bytes(unsigned)))


def verify_signed(
    message: ModelManifest | DeviceConfig, directory: KeyDirectory, *, installed_version: int | None = None
) -> None:
    """Check a signature, the signer's coordinator role, and that the version is newer than ``installed_version``.

    Raises:
        SignatureError: unsigned, unknown signer, signer not a coordinator, or bad signature.
        RollbackError: not newer than the installed version.
    """
    what = f"{getattr(message, 'model_id', 'config')} v{message.version}"
    if not message.signature or not message.signer:
        raise SignatureError(f"{what} is not signed", reason="unsigned")
    try:
        peer = directory.get(message.signer)
    except UnknownPeerError as exc:
        raise SignatureError(f"unknown signer {message.signer!r}: {exc}", reason="unknown_signer") from exc
    if peer.role != "coordinator":
        raise SignatureError(f"{message.signer!r} may not sign {what} (role {peer.role!r})", reason="not_allowed")
    try:
        peer.sign_public.verify(message.signature, _signed_bytes(message))
    except InvalidSignature:
        raise SignatureError(f"bad signature on {what}", reason="bad_signature") from None
    if installed_version is not None and message.version <= installed_version:
        raise RollbackError(f"{what} is not newer than v{installed_version}", reason="rollback")


def sign_manifest(manifest: ModelManifest, *, signer: str, key: ed25519.Ed25519PrivateKey) -> ModelManifest:
    """The manifest signed by ``signer``."""
    return sign_message(manifest, signer=signer, key=key)


def verify_manifest(manifest: ModelManifest, directory: KeyDirectory, *, installed_version: int | None = None) -> None:
    """`verify_signed` for a model manifest."""
    verify_signed(manifest, directory, installed_version=installed_version)
