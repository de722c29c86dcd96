"""Rollouts: publishing models, signing manifests, wrapping keys, and where each model is ready.

Every model version the coordinator publishes is encrypted once, stored (ciphertext, content key and
signed manifest in the `ModelStore`), announced as a retained manifest, and served in chunks. The key
is wrapped for each target device; a device that joins later gets it wrapped when it joins
(`welcome`). Devices report each install (`ModelStatus`); readiness is kept here and nowhere else,
and `runs` is the one question placement asks of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgespeed._compat import timeout as timeout_after
from edgespeed.coordinator.config import CoordinatorConfig
from edgespeed.coordinator.ledger import Ledger
from edgespeed.coordinator.publishing import check_decodes, check_files, encrypt_and_describe
from edgespeed.coordinator.registry import DeviceInfo, DeviceStatus, Registry
from edgespeed.coordinator.selector import matches
from edgespeed.coordinator.splits import SplitModel, prepare_split
from edgespeed.coordinator.store import ModelStore, StoredModel
from edgespeed.errors import ConfigError
from edgespeed.optimize.planner import Link
from edgespeed.pipeline import Pipeline
from edgespeed.protocol import topics
from edgespeed.protocol.blob import BlobSource
from edgespeed.protocol.envelope import pack_message
from edgespeed.protocol.messages import ModelManifest, ModelStatus
from edgespeed.security import KeyDirectory, Sealer, sign_manifest
from edgespeed.security.signing import verify_manifest
from edgespeed.transfer import BlobServer
from edgespeed.transport.base import Transport

__all__ = ["ModelEntry", "RolloutReport", "Rollouts"]

log = logging.getLogger(__name__)

Db = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class RolloutReport:
    """How a model version reached its target devices."""

    model_id: str
    version: int
    targets: tuple[str, ...]
    ready: dict[str, str] = field(default_factory=dict)  # device -> backend
    failed: dict[str, str] = field(default_factory=dict)  # device -> reason

    @property
    def missing(self) -> tuple[str, ...]:
        """Targets that did not report in time."""
        return tuple(d for d in self.targets if d not in self.ready and d not in self.failed)

    @property
    def ok(self) -> bool:
        """Every target is ready."""
        return all(d in self.ready for d in self.targets)


@dataclass
class ModelEntry:
    """What the coordinator knows of a model: its newest manifest, and how each device reported on it."""

    manifest: ModelManifest
    stored: StoredModel | None = None
    status: dict[str, tuple[str, str]] = field(default_factory=dict)  # device -> (state@version, backend or reason)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    run_ms: dict[str, float] = field(default_factory=dict)  # device -> a warm run, as the device measured it
    ready: set[str] = field(default_factory=set)  # devices that reported it ready in their current session

    @property
    def formats(self) -> tuple[str, ...]:
        variants = self.manifest.variants or ({"format": self.manifest.format},)
        return tuple(sorted({str(v["format"]) for v in variants}))

    def report(self, targets: Sequence[str]) -> RolloutReport:
        version = self.manifest.version
        ready: dict[str, str] = {}
        failed: dict[str, str] = {}
        for device, (state, detail) in self.status.items():
            if device in targets and state.endswith(f"@{version}"):
                (ready if state.startswith("ready") else failed)[device] = detail
        return RolloutReport(self.manifest.model_id, version, tuple(targets), ready, failed)


class Rollouts:
    """The models of the fleet: publishing, keys, readiness, split models.

    Args:
        db: runs a ledger call (inline for SQLite, in a thread for a server).
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        registry: Registry,
        ledger: Ledger,
        db: Db,
        store: ModelStore,
        sealer: Sealer,
        sign_key: Any,
        directory: KeyDirectory,
        transport: Transport,
        server: BlobServer,
    ) -> None:
        self.config = config
        self.registry = registry
        self.store = store
        self.server = server
        self.splits: dict[str, SplitModel] = {}
        self._ledger = ledger
        self._db = db
        self._sealer = sealer
        self._sign_key = sign_key
        self._directory = directory
        self._transport = transport
        self._models: dict[str, ModelEntry] = {}
        self._started = time.monotonic()

    async def load(self) -> None:
        """Serve what the store holds, and learn the split models and device reports the ledger records."""
        for stored in await asyncio.to_thread(self.store.latest):
            await self._recall(self._hold(stored))
        await self.refresh_splits()

    async def _recall(self, entry: ModelEntry) -> None:
        """What devices reported on this version, as the ledger recorded it (before a restart, or to a peer)."""
        version = entry.manifest.version
        rows = await self._db(self._ledger.rollouts, entry.manifest.model_id, version)
        for device, (state, detail) in rows.items():
            entry.status.setdefault(device, (f"{state}@{version}", detail))

    async def refresh_splits(self) -> bool:
        """Read the split models from the ledger (another process may have published one); True if any is new."""
        found = False
        for name, (version, spec) in (await self._db(self._ledger.splits)).items():
            known = self.splits.get(name)
            if known is None or known.version < version:
                self.splits[name] = SplitModel.from_json(spec)
                found = True
        return found

    # -- what placement asks -------------------------------------------------

    def entry(self, model_id: str) -> ModelEntry | None:
        return self._models.get(model_id)

    def manifests(self) -> dict[str, ModelManifest]:
        return {model_id: entry.manifest for model_id, entry in sorted(self._models.items())}

    def runs(self, device: DeviceInfo, model_id: str) -> bool:
        """Whether ``device`` may be given ``model_id``'s inputs now.

        Only a signed target of the model (its key is wrapped for the device in the signed manifest) that
        reported it ready under its own seal: in this session, or, for a coordinator that started since,
        as the ledger recorded, while its heartbeats still list the model. A heartbeat's claim alone
        (unsigned) never suffices.
        """
        entry = self._models.get(model_id)
        if entry is None or device.device_id not in entry.manifest.keys:
            return False
        if device.device_id in entry.ready:
            return True
        state = entry.status.get(device.device_id, ("", ""))[0]
        return model_id in device.models and state == f"ready@{entry.manifest.version}"

    def outputs(self, model_id: str) -> tuple[dict[str, Any], ...]:
        """What a model (the last stage of a split model) declares it outputs; empty if unknown."""
        split = self.splits.get(model_id)
        entry = self._models.get(split.shards[-1] if split is not None else model_id)
        return entry.manifest.outputs if entry is not None else ()

    def placeable(self, model_id: str) -> list[DeviceInfo]:
        """Online devices that run ``model_id`` now, by id.

        Found from the devices that reported the model (a handful), not by scanning the fleet: placing a
        task costs the same with ten devices or ten thousand.
        """
        entry = self._models.get(model_id)
        if entry is None:
            return []
        found = []
        for device_id in sorted(entry.ready | entry.status.keys()):
            info = self.registry.get(device_id)
            if info is not None and self.registry.placeable(info) and self.runs(info, model_id):
                found.append(info)
        return found

    def devices_for(self, model_id: str) -> list[str]:
        """Online devices that run ``model_id`` now."""
        return [d.device_id for d in self.placeable(model_id)]

    def newest(self, model_id: str) -> int:
        known = self._models.get(model_id)
        newest = max(self.store.versions(model_id) or [0], default=0)
        split = self.splits.get(model_id)
        return max(newest, known.manifest.version if known else 0, split.version if split else 0)

    # -- publishing ----------------------------------------------------------

    async def publish(
        self,
        paths: Sequence[Path | str],
        *,
        name: str,
        version: int | None,
        targets: str,
        architecture: str,
        pipeline: Sequence[dict[str, Any]],
        wait: bool,
        timeout: float,
        settle: float,
        on_progress: Callable[[RolloutReport, int], None] | None,
        split: str,
        codec: str,
        sample: Sequence[Any] | None,
        link: Callable[[], Any] | Link | None,
    ) -> RolloutReport:
        """`Coordinator.publish_model` (documented there); ``link`` may be a coroutine function measuring it."""
        model_id = topics.validate_id(name, "model name")
        files = check_files(paths, architecture=architecture, split=split)
        Pipeline.from_spec(pipeline)  # a step that does not validate is refused here, never stored
        await asyncio.sleep(max(0.0, settle - (time.monotonic() - self._started)))
        newest = self.newest(model_id)
        version = newest + 1 if version is None else version
        if version <= newest:
            raise ConfigError(f"{model_id} v{newest} exists: the new version must be greater")
        chosen = [d.device_id for d in self.registry.devices(DeviceStatus.ONLINE, DeviceStatus.SUSPECT)]
        chosen = [d for d in chosen if matches(targets, self.registry.get(d))]  # type: ignore[arg-type]
        chosen = self._entitled(chosen)
        if split:
            measured = link if isinstance(link, Link) else await link() if link is not None else Link()
            entries = await self._publish_split(
                files[0], model_id, version, split, codec, targets, chosen, sample, measured
            )
        else:
            entries = [await self._publish_files(model_id, files, version, targets, chosen, architecture, pipeline)]
        report = self._combined(model_id, version, entries, chosen)
        if wait and chosen:
            report = await self._wait_reports(model_id, version, entries, chosen, timeout, on_progress)
        if on_progress is not None:
            on_progress(report, self.server.served)
        if split and report.ready:
            model = self.splits[model_id]
            replanned = model.fit_speeds([e.run_ms for e in entries], list(report.ready))
            if replanned is not None:
                log.info("%s planned with measured device speeds %s: %s", name, model.speeds, replanned.describe())
                await self._db(self._ledger.put_split, model.name, model.version, model.to_json())
        return report

    async def _wait_reports(
        self,
        model_id: str,
        version: int,
        entries: Sequence[ModelEntry],
        chosen: Sequence[str],
        timeout: float,
        on_progress: Callable[[RolloutReport, int], None] | None,
    ) -> RolloutReport:
        report = self._combined(model_id, version, entries, chosen)
        with contextlib.suppress(TimeoutError):
            async with timeout_after(timeout):
                while report.missing:
                    if on_progress is not None:
                        on_progress(report, self.server.served)
                    for entry in entries:
                        entry.changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with timeout_after(0.5):
                            waits = [asyncio.ensure_future(e.changed.wait()) for e in entries]
                            try:
                                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                            finally:
                                for w in waits:
                                    w.cancel()
                    if self.config.shared_group:  # a peer may have heard some reports: they are in the ledger
                        for entry in entries:
                            shard, shard_version = entry.manifest.model_id, entry.manifest.version
                            rows = await self._db(self._ledger.rollouts, shard, shard_version)
                            for device, (state, detail) in rows.items():
                                entry.status[device] = (f"{state}@{shard_version}", detail)
                    report = self._combined(model_id, version, entries, chosen)
        return report

    async def _publish_split(
        self,
        source: Path,
        name: str,
        version: int,
        spec: str,
        codec: str,
        targets: str,
        chosen: Sequence[str],
        sample: Sequence[Any] | None,
        link: Link,
    ) -> list[ModelEntry]:
        """Profile, plan, cut, and publish each shard (to every target, so any of them can take a stage over)."""
        split, paths = await asyncio.to_thread(
            prepare_split,
            source,
            name=name,
            version=version,
            spec=spec,
            codec=codec,
            devices=chosen,
            link=link,
            objective=self.config.split_objective,
            sample=sample,
            folder=self.store.root / name / str(version),
        )
        log.info("%s: %d stages cut at %s, planned on %s", name, len(paths), split.cuts, split.preferred)
        entries = []
        for k, (shard_id, path) in enumerate(zip(split.shards, paths, strict=True), start=1):
            shard_version = max(self.newest(shard_id) + 1, version)
            entries.append(await self._publish_files(shard_id, [path], shard_version, targets, chosen, stage=k))
        await self._db(self._ledger.put_split, name, version, split.to_json())
        self.splits[name] = split
        return entries

    def _combined(
        self, model_id: str, version: int, entries: Sequence[ModelEntry], targets: Sequence[str]
    ) -> RolloutReport:
        """One report for a model: a device is ready when every shard is ready on it."""
        reports = [e.report(targets) for e in entries]
        ready = {d: reports[0].ready[d] for d in targets if all(d in r.ready for r in reports)}
        failed: dict[str, str] = {}
        for r in reports:
            for device, reason in r.failed.items():
                failed.setdefault(device, reason)
        return RolloutReport(model_id, version, tuple(targets), ready, failed)

    async def _publish_files(
        self,
        model_id: str,
        files: Sequence[Path],
        version: int,
        targets: str,
        chosen: Sequence[str],
        architecture: str = "",
        pipeline: Sequence[dict[str, Any]] = (),
        stage: int = 0,
    ) -> ModelEntry:
        """Encrypt, store, sign and announce one model id's variants (``stage``: its place in a split model)."""

        manifest, key = await asyncio.to_thread(
            encrypt_and_describe, self.store, model_id, files, version, architecture, pipeline, stage
        )
        manifest = self._sign(manifest, key, chosen)
        check_decodes(manifest)
        await asyncio.to_thread(self.store.save, manifest, key, targets)
        stored = StoredModel(
            manifest, key, {s.name: self.store.shard_path(model_id, version, s.name) for s in manifest.shards}, targets
        )
        entry = self._hold(stored)
        await self._announce(manifest)
        log.info("published %s v%d to %s", model_id, version, ", ".join(chosen) or "no device yet")
        return entry

    def _entitled(self, devices: Sequence[str]) -> list[str]:
        """Those of ``devices`` with a valid certificate (a revoked one is forgotten): only they get keys."""
        entitled = [d for d in devices if d in self._directory]
        if len(entitled) < len(devices):
            log.warning("no key wrapped for %s: no valid certificate", ", ".join(sorted(set(devices) - set(entitled))))
        return entitled

    def _sign(self, manifest: ModelManifest, key: bytes, devices: Sequence[str]) -> ModelManifest:
        context = f"{manifest.model_id}/{manifest.version}"
        unsigned = dataclasses.replace(
            manifest, keys=self._sealer.wrap_key(key, sorted(devices), context=context), signer="", signature=b""
        )
        return sign_manifest(unsigned, signer=self.config.coordinator_id, key=self._sign_key)

    def _hold(self, stored: StoredModel) -> ModelEntry:
        """Serve a stored version's chunks and remember it."""
        for name, path in stored.shards.items():
            info = next(s for s in stored.manifest.shards if s.name == name)
            self.server.add(BlobSource(name, path, chunk_size=info.chunk_size, sha256=info.sha256))
        entry = self._models.get(stored.model_id)
        if entry is None or entry.manifest.version <= stored.version:
            old = entry
            entry = ModelEntry(stored.manifest, stored, dict(old.status) if old else {})
            if old is not None:
                entry.ready, entry.run_ms = old.ready, old.run_ms
            self._models[stored.model_id] = entry
        return entry

    async def _announce(self, manifest: ModelManifest) -> None:
        await self._transport.publish(
            topics.model_manifest(self.config.fleet, manifest.model_id),
            pack_message(manifest, sender=self.config.coordinator_id),
            retain=True,
        )

    # -- what devices and peers say -----------------------------------------

    async def welcome(self, info: DeviceInfo) -> None:
        """A device joined (a new session): it reports its models again; wrap the keys it lacks."""
        for entry in self._models.values():
            entry.ready.discard(info.device_id)
        for entry in list(self._models.values()):
            stored = entry.stored
            if stored is None or stored.version != entry.manifest.version:
                continue
            if info.device_id in entry.manifest.keys or not matches(stored.targets, info):
                continue
            devices = self._entitled([*entry.manifest.keys, info.device_id])
            if info.device_id not in devices:
                continue
            manifest = self._sign(entry.manifest, stored.key, devices)
            entry.manifest = manifest
            entry.stored = dataclasses.replace(stored, manifest=manifest)
            await asyncio.to_thread(self.store.update_manifest, manifest)
            await self._announce(manifest)
            log.info("%s v%d: key wrapped for %s, who joined", manifest.model_id, manifest.version, info.device_id)

    def device_lost(self, device: str) -> None:
        for entry in self._models.values():
            entry.ready.discard(device)

    async def on_manifest(self, manifest: ModelManifest) -> bool:
        """A retained manifest (ours, or a peer's or the CLI's); True if it is a model or version new to us."""
        verify_manifest(manifest, self._directory)
        entry = self._models.get(manifest.model_id)
        if entry is not None and entry.manifest.version > manifest.version:
            return False
        if entry is not None and entry.manifest.version == manifest.version:
            # The same version with keys wrapped for more devices (a peer welcomed them). Our own announces
            # come back too, and an older one arriving after a newer would drop keys: only a manifest
            # that wraps the key for every device the one we hold does replaces it.
            if entry.manifest.keys.keys() <= manifest.keys.keys():
                entry.manifest = manifest
                if entry.stored is not None:
                    entry.stored = dataclasses.replace(entry.stored, manifest=manifest)
            return False
        stored = await asyncio.to_thread(self.store.load, manifest.model_id, manifest.version)
        if stored is not None:  # published by a CLI beside us: serve it from now on
            entry = self._hold(stored)
        else:
            entry = self._models[manifest.model_id] = ModelEntry(manifest, None, entry.status if entry else {})
        await self._recall(entry)
        return True

    async def on_status(self, device: str, status: ModelStatus) -> None:
        detail = status.backend if status.state == "ready" else status.reason
        await self._db(self._ledger.set_rollout, status.model_id, status.version, device, status.state, detail)
        entry = self._models.get(status.model_id)
        if entry is not None:
            entry.status[device] = (f"{status.state}@{status.version}", detail)
            if status.run_ms:
                entry.run_ms[device] = status.run_ms
            if status.state == "ready":
                entry.ready.add(device)
            entry.changed.set()
        log.info("%s: %s v%d %s (%s)", device, status.model_id, status.version, status.state, detail)
