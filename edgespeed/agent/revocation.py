"""Revocation on a device: the fleet's CRL, as the coordinator broadcasts it, applied to the key directory.

The coordinator publishes the fleet CA's revocation list retained on ``bcast/crl``. It is signed by
the CA, so the device trusts it only once it verifies against its own ``ca.crt``; then every serial
it lists is revoked in the key directory: the device opens nothing sealed by that identity (a stage
task, a chunk error), seals nothing for it, and takes no signature from it. Lists only add. The last
list applied is kept in the state folder (``crl.der``) and applied again at the next start, before the
broker delivers the retained one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from edgespeed.errors import ProtocolError, SecurityError
from edgespeed.protocol.envelope import open_message
from edgespeed.protocol.messages import RevocationList
from edgespeed.security import KeyDirectory
from edgespeed.security.pki import CrlInfo, parse_crl

__all__ = ["DeviceRevocation"]

log = logging.getLogger(__name__)


class DeviceRevocation:
    """Applies the fleet's revocation lists to a device's key directory.

    Args:
        keys: the device's key directory (built with `KeyDirectory.from_folder`).
        state_dir: where the last list applied is kept.
    """

    def __init__(self, keys: KeyDirectory, state_dir: Path) -> None:
        self._keys = keys
        self._saved = Path(state_dir) / "crl.der"
        self.revoked: set[str] = set()
        """Ids whose certificates were revoked while the agent ran (they were known, and are forgotten)."""

    @property
    def crl(self) -> CrlInfo | None:
        """The newest revocation list applied."""
        return self._keys.crl

    def load_saved(self) -> None:
        """Apply the list kept from a previous run, if any (one that no longer verifies is ignored)."""
        try:
            data = self._saved.read_bytes()
        except OSError:
            return
        try:
            self._apply(parse_crl(data, self._keys.ca_certificate))
        except SecurityError as exc:
            log.warning("ignored %s: %s", self._saved, exc)

    def on_message(self, payload: bytes) -> list[str]:
        """A message on ``bcast/crl``: verify the list against the fleet CA and apply it; returns the ids revoked.

        Raises:
            ProtocolError: not a revocation list.
            SecurityError: a list the fleet CA did not sign.
        """
        if not payload:
            return []  # a retained list withdrawn: what was revoked stays revoked
        _, message = open_message(payload)
        if not isinstance(message, RevocationList):
            raise ProtocolError(f"{type(message).__name__} on the revocation list topic", reason="unexpected_kind")
        crl = parse_crl(message.crl, self._keys.ca_certificate)
        newer = self.crl is None or crl.last_update >= self.crl.last_update
        forgotten = self._apply(crl)
        if newer:
            self._save(crl.der)
        return forgotten

    def _apply(self, crl: CrlInfo) -> list[str]:
        forgotten = self._keys.apply_crl(crl)
        for peer in forgotten:
            log.warning("%s: certificate revoked; nothing it seals is opened any more", peer)
        self.revoked.update(forgotten)
        return forgotten

    def _save(self, der: bytes) -> None:
        tmp = self._saved.with_name(f".{self._saved.name}.tmp")
        try:
            tmp.write_bytes(der)
            os.replace(tmp, self._saved)
        except OSError as exc:
            log.warning("could not keep the revocation list in %s: %s", self._saved, exc)
