"""Revocation in the coordinator: the fleet's CRL applied here, and broadcast to the devices.

The key directory is built from the PKI folder with its ``crl.pem`` (`KeyDirectory.from_folder`), so a
certificate revoked before the coordinator starts is never known. While it runs, `Revocation` looks at
the folder every `POLL_S` seconds (file times and sizes, no new dependency): a changed ``crl.pem`` is
verified against the fleet CA and applied, and each identity it revokes gets nothing more:

- the directory forgets it, so no key is wrapped and nothing is sealed for it (rollouts choose their
  targets among the identities the directory knows);
- the router refuses whatever it sends (`admits`): sealed answers, chunk requests, births, heartbeats;
- the registry quarantines it and the scheduler gives its tasks to others (`Scheduler.device_lost`).

The verified list is published, retained, on ``bcast/crl`` (kind ``REVOCATION_LIST``; the CA's signature
makes it self-authenticating), at start, when it changes, and after a reconnection, so every device
applies it as soon as it reaches them. Certificates added to the folder (a device enrolled or renewed)
are learnt the same way. A list near or past its ``nextUpdate`` is logged at start and daily: a WARNING
under `CRL_WARN_DAYS` days, an ERROR once past (Mosquitto then refuses every client).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path

from edgespeed.coordinator.registry import Registry
from edgespeed.coordinator.scheduler import Scheduler
from edgespeed.errors import EdgeSpeedError, UnknownPeerError
from edgespeed.protocol import topics
from edgespeed.protocol.envelope import pack_message
from edgespeed.protocol.messages import RevocationList
from edgespeed.security import KeyDirectory
from edgespeed.security.pki import CrlInfo, load_crl
from edgespeed.transport.base import Transport

__all__ = ["POLL_S", "Revocation"]

log = logging.getLogger(__name__)

POLL_S = 2.0  # how often the PKI folder is looked at
WARN_EVERY_S = 86400.0  # how often a CRL near or past its nextUpdate is logged again

_MEMBER_KINDS = frozenset(
    {
        topics.TopicKind.COORDINATOR_INBOX,
        topics.TopicKind.BIRTH,
        topics.TopicKind.DEATH,
        topics.TopicKind.HEARTBEAT,
    }
)
_Signature = tuple[tuple[str, int, int], ...]


class Revocation:
    """Keeps the coordinator's key directory in step with its PKI folder, and the fleet told.

    Args:
        fleet: the fleet id.
        coordinator_id: the id the list is published as.
        pki_dir: the folder with ``ca.crt``, ``crl.pem`` and the members' certificates.
        directory: the key directory built from it (`KeyDirectory.from_folder`).
        publish: publish the list (the coordinator's own session; short-lived clients do not).
        stats: ``refused_revoked`` counts what was refused from identities not in the directory, and
            ``refused_revoked_<kind>`` by topic kind (``coordinator_inbox``, ``birth``, ``heartbeat``, ``death``).
    """

    def __init__(
        self,
        *,
        fleet: str,
        coordinator_id: str,
        pki_dir: Path,
        directory: KeyDirectory,
        transport: Transport,
        registry: Registry,
        scheduler: Scheduler,
        stats: Counter[str],
        publish: bool,
        poll_s: float = POLL_S,
    ) -> None:
        self._fleet = fleet
        self._id = coordinator_id
        self._pki = Path(pki_dir)
        self._directory = directory
        self._transport = transport
        self._registry = registry
        self._scheduler = scheduler
        self._stats = stats
        self._publish = publish
        self._poll_s = poll_s
        self._seen: _Signature | None = None  # the first look applies the folder as it is then
        self._failed: _Signature | None = None
        self._published: bytes | None = None
        self._was_connected = False
        self._warned_at = float("-inf")
        self._refused: set[str] = set()

    @property
    def crl(self) -> CrlInfo | None:
        """The revocation list in force."""
        return self._directory.crl

    # -- what the router asks ---------------------------------------------------

    def admits(self, name: topics.TopicName) -> bool:
        """Whether a message on this topic may be handled: a member's topics only from an identity the
        directory knows (revoked ones are forgotten, unknown ones never were)."""
        if name.kind not in _MEMBER_KINDS or name.id is None or name.id in self._directory:
            return True
        self._stats["refused_revoked"] += 1
        self._stats[f"refused_revoked_{name.kind.name.lower()}"] += 1  # e.g. refused_revoked_heartbeat
        if name.kind is topics.TopicKind.BIRTH or name.id not in self._refused:
            self._refused.add(name.id)
            log.warning(
                "ignored %s from %s: no valid certificate (revoked, or not in %s)", name.kind.value, name.id, self._pki
            )
        return False

    # -- the loop -----------------------------------------------------------------

    async def run(self) -> None:
        """Publish the list, then look at the folder every few seconds until cancelled."""
        while True:
            try:
                await self.check()
            except Exception:  # the loop must outlive any one failure; the next poll tries again
                log.exception("checking the revocation list failed")
            await asyncio.sleep(self._poll_s)

    async def check(self) -> None:
        """One look: apply what changed in the folder, warn about expiry, (re)publish when due."""
        signature = self._signature()
        if signature != self._seen and signature != self._failed:
            await self._reload(signature)
        crl = self.crl
        if crl is not None and time.monotonic() - self._warned_at >= WARN_EVERY_S:
            self._warned_at = time.monotonic()
            health = crl.health()
            if health != "ok":
                level = logging.ERROR if health == "expired" else logging.WARNING
                log.log(level, "%s: %s; renew it: edgespeed certs crl refresh", self._pki / "crl.pem", crl.describe())
        connected = self._transport.connected
        if crl is not None and self._publish and connected and (crl.der != self._published or not self._was_connected):
            await self._announce(crl)
        self._was_connected = connected

    async def _reload(self, signature: _Signature) -> None:
        crl_file = self._pki / "crl.pem"
        try:
            crl = load_crl(crl_file, self._directory.ca_certificate) if crl_file.is_file() else None
        except EdgeSpeedError as exc:
            self._failed = signature  # logged once; a new version of the file is tried again
            log.error("%s not applied: %s", crl_file, exc)
            return
        self._seen, self._failed = signature, None
        if crl is not None:
            for device in self._directory.apply_crl(crl):
                await self._revoked(device)
        self._learn_certificates()

    async def _revoked(self, device: str) -> None:
        log.warning("%s: certificate revoked; it gets no work, no keys, and nothing it sends is read", device)
        self._registry.quarantine(device, "certificate revoked")
        await self._scheduler.device_lost(device)

    def _learn_certificates(self) -> None:
        """Certificates added or renewed in the folder since the start (revoked ones stay out)."""
        for path in sorted(self._pki.glob("*.crt")):
            if path.name == "ca.crt":
                continue
            try:
                peer = self._directory.add_certificate(path.read_bytes())
            except (OSError, UnknownPeerError) as exc:
                if getattr(exc, "reason", "") != "revoked":
                    log.warning("%s not learnt: %s", path, exc)
                continue
            if self._registry.quarantined().get(peer.id) == "certificate revoked":
                log.warning("%s has a new certificate; it stays quarantined until the coordinator restarts", peer.id)

    async def _announce(self, crl: CrlInfo) -> None:
        payload = pack_message(RevocationList(crl.der), sender=self._id)
        try:
            await self._transport.publish(topics.crl(self._fleet), payload, retain=True)
        except EdgeSpeedError as exc:
            log.info("revocation list not published yet (%s); trying again", exc)
            return
        self._published = crl.der
        log.info("published the %s", crl.describe())

    def _signature(self) -> _Signature:
        """Names, modification times and sizes of ``crl.pem`` and the certificates: what a change changes."""
        found = []
        for path in [self._pki / "crl.pem", *self._pki.glob("*.crt")]:
            try:
                st = path.stat()
            except OSError:
                continue
            found.append((path.name, st.st_mtime_ns, st.st_size))
        return tuple(sorted(found))
