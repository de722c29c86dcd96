"""Security: fleet identities, payload sealing, replay windows, signed manifests, safe loading, data at rest."""

from edgespeed.security.atrest import DataKey, configured_key, load_data_key
from edgespeed.security.blobcrypt import decrypt_blob, encrypt_blob, iter_decrypted
from edgespeed.security.keys import KeyDirectory, PeerKeys
from edgespeed.security.loaders import load_weights
from edgespeed.security.pki import (
    CrlInfo,
    FleetCA,
    Identity,
    create_ca,
    issue_certificate,
    load_ca,
    load_crl,
    load_identity,
    parse_crl,
    refresh_crl,
    revoke_certificate,
    revoked_serials,
)
from edgespeed.security.replay import ReplayGuard
from edgespeed.security.seal import Sealer
from edgespeed.security.signing import sign_manifest, verify_manifest

__all__ = [
    "CrlInfo",
    "DataKey",
    "FleetCA",
    "Identity",
    "KeyDirectory",
    "PeerKeys",
    "ReplayGuard",
    "Sealer",
    "configured_key",
    "create_ca",
    "decrypt_blob",
    "encrypt_blob",
    "issue_certificate",
    "iter_decrypted",
    "load_ca",
    "load_crl",
    "load_data_key",
    "load_identity",
    "load_weights",
    "parse_crl",
    "refresh_crl",
    "revoke_certificate",
    "revoked_serials",
    "sign_manifest",
    "verify_manifest",
]
