"""Security: fleet identities, payload sealing, replay windows, signed manifests, safe loading."""

from edgespeed.security.blobcrypt import decrypt_blob, encrypt_blob, iter_decrypted
from edgespeed.security.keys import KeyDirectory, PeerKeys
from edgespeed.security.loaders import load_weights
from edgespeed.security.pki import (
    FleetCA,
    Identity,
    create_ca,
    issue_certificate,
    load_ca,
    load_identity,
    revoke_certificate,
    revoked_serials,
)
from edgespeed.security.replay import ReplayGuard
from edgespeed.security.seal import Sealer
from edgespeed.security.signing import sign_manifest, verify_manifest

__all__ = [
    "FleetCA",
    "Identity",
    "KeyDirectory",
    "PeerKeys",
    "ReplayGuard",
    "Sealer",
    "create_ca",
    "decrypt_blob",
    "encrypt_blob",
    "issue_certificate",
    "iter_decrypted",
    "load_ca",
    "load_identity",
    "load_weights",
    "revoke_certificate",
    "revoked_serials",
    "sign_manifest",
    "verify_manifest",
]
