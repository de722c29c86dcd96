"""The key directory: ids to public keys, taken only from certificates the fleet CA signed."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.x509.oid import NameOID

from edgespeed.errors import TopicError, UnknownPeerError
from edgespeed.protocol.topics import validate_id
from edgespeed.security.pki import PAYLOAD_KEYS_OID, CrlInfo, load_crl

__all__ = ["KeyDirectory", "PeerKeys"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PeerKeys:
    """What the fleet CA vouches for about one identity."""

    id: str
    role: str
    seal_public: x25519.X25519PublicKey
    sign_public: ed25519.Ed25519PublicKey
    serial: int
    not_after: dt.datetime


class KeyDirectory:
    """Public keys of fleet members, each from a certificate verified against the fleet CA.

    Args:
        ca_file: the fleet CA certificate.
        revoked: serial numbers to refuse (see `edgespeed.security.pki.revoked_serials`).
        clock: current time (for tests of expiry).
    """

    def __init__(
        self,
        ca_file: Path,
        *,
        revoked: set[int] | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc),
    ) -> None:
        self._ca = x509.load_pem_x509_certificate(Path(ca_file).read_bytes())
        self._revoked = set(revoked or ())
        self._clock = clock
        self._peers: dict[str, PeerKeys] = {}
        self.crl: CrlInfo | None = None
        """The last revocation list applied (`apply_crl`), if any."""

    @classmethod
    def from_folder(
        cls,
        pki_dir: Path,
        *,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc),
    ) -> KeyDirectory:
        """The directory of a fleet member: ``ca.crt``, the revocation list ``crl.pem`` (when there)
        and every identity certificate in ``pki_dir``; revoked ones are left out with a warning.

        A revocation list past its ``nextUpdate`` still revokes what it lists (and is warned about).

        Raises:
            ConfigError: no ``ca.crt``, or a ``crl.pem`` that cannot be read.
            SecurityError: a ``crl.pem`` not signed by the fleet CA.
            UnknownPeerError: a certificate there is not the fleet's (foreign, malformed).
        """
        pki_dir = Path(pki_dir)
        directory = cls(pki_dir / "ca.crt", clock=clock)
        crl_file = pki_dir / "crl.pem"
        if crl_file.is_file():
            directory.apply_crl(load_crl(crl_file, directory._ca))
            if directory.crl is not None and directory.crl.health(clock()) != "ok":
                log.warning("%s: %s", crl_file, directory.crl.describe(clock()))
        directory.add_directory(pki_dir)
        return directory

    def add_certificate(self, pem: bytes) -> PeerKeys:
        """Verify a certificate and remember its keys.

        Raises:
            UnknownPeerError: not signed by the fleet CA, expired or not yet
                valid, revoked, without payload keys, or with a bad id.
        """
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError as exc:
            raise UnknownPeerError(f"not a certificate: {exc}", reason="bad_certificate") from exc
        try:
            cert.verify_directly_issued_by(self._ca)
        except Exception as exc:  # ValueError, TypeError or InvalidSignature, by cause
            raise UnknownPeerError("certificate not issued by the fleet CA", reason="foreign_ca") from exc
        now = self._clock()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise UnknownPeerError("certificate expired or not yet valid", reason="expired")
        if cert.serial_number in self._revoked:
            raise UnknownPeerError("certificate revoked", reason="revoked")
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        roles = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        try:
            peer_id = validate_id(str(names[0].value) if names else "", "certificate common name")
        except TopicError as exc:
            raise UnknownPeerError(str(exc), reason="bad_certificate") from exc
        try:
            raw = cert.extensions.get_extension_for_oid(PAYLOAD_KEYS_OID).value
        except x509.ExtensionNotFound:
            raise UnknownPeerError(f"certificate of {peer_id!r} carries no payload keys", reason="no_keys") from None
        data = raw.value if isinstance(raw, x509.UnrecognizedExtension) else b""
        if len(data) != 64:
            raise UnknownPeerError(f"bad payload keys in the certificate of {peer_id!r}", reason="no_keys")
        peer = PeerKeys(
            id=peer_id,
            role=str(roles[0].value) if roles else "",
            seal_public=x25519.X25519PublicKey.from_public_bytes(data[:32]),
            sign_public=ed25519.Ed25519PublicKey.from_public_bytes(data[32:]),
            serial=cert.serial_number,
            not_after=cert.not_valid_after_utc,
        )
        self._peers[peer_id] = peer
        return peer

    def add_directory(self, directory: Path) -> list[PeerKeys]:
        """Add every identity certificate (``*.crt`` but the CA's) found in ``directory``.

        A revoked certificate is skipped with a warning (a fleet member whose folder still
        holds it keeps starting); any other bad certificate raises.

        Raises:
            UnknownPeerError: a certificate that is not the fleet's, expired, or malformed.
        """
        added = []
        for path in sorted(Path(directory).glob("*.crt")):
            if path.name == "ca.crt":
                continue
            try:
                added.append(self.add_certificate(path.read_bytes()))
            except UnknownPeerError as exc:
                if exc.reason != "revoked":
                    raise
                log.warning("skipped %s: its certificate is revoked", path)
        return added

    def revoke(self, serial: int) -> list[str]:
        """Refuse a certificate from now on, and forget the peer that used it; returns the ids forgotten."""
        self._revoked.add(serial)
        forgotten = [peer_id for peer_id, peer in self._peers.items() if peer.serial == serial]
        for peer_id in forgotten:
            del self._peers[peer_id]
        return forgotten

    def revoke_all(self, serials: Iterable[int]) -> list[str]:
        """`revoke` each serial; returns the ids forgotten."""
        return [peer_id for serial in serials for peer_id in self.revoke(serial)]

    def apply_crl(self, crl: CrlInfo) -> list[str]:
        """Revoke what a verified revocation list lists (see `edgespeed.security.pki.load_crl`);
        returns the ids forgotten. Lists only add: a serial once revoked stays revoked."""
        if self.crl is None or crl.last_update >= self.crl.last_update:
            self.crl = crl
        return self.revoke_all(crl.revoked)

    @property
    def revoked(self) -> frozenset[int]:
        """Serial numbers refused."""
        return frozenset(self._revoked)

    @property
    def ca_certificate(self) -> x509.Certificate:
        """The fleet CA certificate every certificate here is checked against."""
        return self._ca

    def get(self, peer_id: str) -> PeerKeys:
        """The keys of ``peer_id``.

        Raises:
            UnknownPeerError: unknown, or its certificate has since expired.
        """
        peer = self._peers.get(peer_id)
        if peer is None:
            raise UnknownPeerError(f"no fleet certificate known for {peer_id!r}", reason="unknown_peer")
        if self._clock() > peer.not_after:
            raise UnknownPeerError(f"the certificate of {peer_id!r} has expired", reason="expired")
        return peer

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._peers

    def ids(self) -> list[str]:
        """The ids known (valid, not revoked), sorted."""
        return sorted(self._peers)
