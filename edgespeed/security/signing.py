"""Signed model manifests, and refusal of rollbacks.

The coordinator signs the manifest's canonical body encoding (with an empty
signature field) with its Ed25519 key; a device verifies it with the key the
fleet CA put in the signer's certificate, requires the signer to hold the
coordinator role, and refuses any version not newer than what it has.
"""

from __future__ import annotations

import dataclasses

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from edgespeed.errors import RollbackError, SignatureError, UnknownPeerError
from edgespeed.protocol._body import encode_body
from edgespeed.protocol.messages import ModelManifest
from edgespeed.security.keys import KeyDirectory

__all__ = ["sign_manifest", "verify_manifest"]

_CONTEXT = b"edgespeed/manifest/v1|"


def _signed_bytes(manifest: ModelManifest) -> bytes:
    return _CONTEXT + encode_body(dataclasses.replace(manifest, signature=b""))


def sign_manifest(manifest: ModelManifest, *, signer: str, key: ed25519.Ed25519PrivateKey) -> ModelManifest:
    """The manifest signed by ``signer``."""
    unsigned = dataclasses.replace(manifest, signer=signer, signature=b"")
    return dataclasses.replace(unsigned, signature=key.sign(_signed_bytes(unsigned)))


def verify_manifest(manifest: ModelManifest, directory: KeyDirectory, *, installed_version: int | None = None) -> None:
    """Check a manifest's signature, its signer's role, and that it is newer than ``installed_version``.

    Raises:
        SignatureError: unsigned, unknown signer, signer not a coordinator, or bad signature.
        RollbackError: not newer than the installed version.
    """
    if not manifest.signature or not manifest.signer:
        raise SignatureError(f"manifest of {manifest.model_id!r} is not signed", reason="unsigned")
    try:
        peer = directory.get(manifest.signer)
    except UnknownPeerError as exc:
        raise SignatureError(f"unknown signer {manifest.signer!r}: {exc}", reason="unknown_signer") from exc
    if peer.role != "coordinator":
        raise SignatureError(f"{manifest.signer!r} may not sign models (role {peer.role!r})", reason="not_allowed")
    try:
        peer.sign_public.verify(manifest.signature, _signed_bytes(manifest))
    except InvalidSignature:
        raise SignatureError(
            f"bad signature on {manifest.model_id!r} v{manifest.version}", reason="bad_signature"
        ) from None
    if installed_version is not None and manifest.version <= installed_version:
        raise RollbackError(
            f"{manifest.model_id!r} v{manifest.version} is not newer than installed v{installed_version}",
            reason="rollback",
        )
