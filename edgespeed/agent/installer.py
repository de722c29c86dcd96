"""Installing models, and the table of models loaded on this device.

`Installer` owns the models table: nothing else adds, replaces or closes a
loaded model. A signed manifest becomes a loaded model in steps: verify the
signature and the version, choose a variant this device can run, fetch its
shard in chunks (unless the cache has it), decrypt it with the content key
wrapped for us, load it on a backend, time a warm run, and report a
`ModelStatus` to the coordinator, ``ready`` or ``failed``.

Manifests wait in `PendingManifests`: at most one per model, the newest, so
the wait is bounded by the number of models and a burst of manifests is never
dropped for lack of room. The models in the cache are reloaded first, when the
installer starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgespeed.agent.cache import ModelCache
from edgespeed.agent.config import AgentConfig
from edgespeed.agent.delivery import Delivery
from edgespeed.engine.base import Backend, ModelSpec
from edgespeed.engine.registry import available_backends, backend_class
from edgespeed.errors import BackendError, BlobError, EdgeSpeedError, TransportError
from edgespeed.pipeline import Pipeline
from edgespeed.protocol.formats import BACKEND_ORDER, backends_for
from edgespeed.protocol.messages import Chunk, Error, ModelManifest, ModelStatus
from edgespeed.security import KeyDirectory, Sealer, iter_decrypted, verify_manifest
from edgespeed.security.blobcrypt import TAG_SIZE
from edgespeed.transfer import chunk_verifier, fetch_from
from edgespeed.transport.base import Transport

__all__ = ["Installer", "LoadedModel", "PendingManifests"]

log = logging.getLogger(__name__)

# A failed download is tried again after 2, 4, 8, ... seconds (at most 5 minutes apart), 8 times.
RETRY_BASE_S = 2.0
RETRY_CAP_S = 300.0
RETRIES = 8

# A model whose runs take less than this (moving average) runs on the event loop:
# the hop to a worker thread would cost more than the run.
_INLINE_S = 0.0005


@dataclass
class LoadedModel:
    """A model loaded on a backend, ready to run."""

    version: int
    backend: Backend
    pre: Pipeline
    post: Pipeline
    seconds: float = 1.0  # moving average of a run; starts slow, so first runs go to a thread
    stage: int = 0  # its place in a split model (signed in the manifest); 0 for a whole model

    async def run(self, inputs: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        """Run a batch, on the event loop if the model is fast enough, else on a thread."""
        start = time.perf_counter()
        if self.seconds < _INLINE_S:
            outputs = self.backend.run(inputs)
        else:
            outputs = await self.backend.run_async(inputs)
        elapsed = time.perf_counter() - start
        self.seconds = elapsed if self.seconds == 1.0 else 0.8 * self.seconds + 0.2 * elapsed
        return outputs


class PendingManifests:
    """Manifests waiting to be installed: the newest one per model, in order of arrival.

    A manifest replaces the one waiting for the same model unless its version is older (the
    same version replaces it too: a coordinator republishes a manifest with a key wrapped for a
    device that joined). Bounded by the number of distinct models; nothing is refused for room.
    """

    def __init__(self) -> None:
        self._pending: dict[str, ModelManifest] = {}
        self._ready = asyncio.Event()

    def offer(self, manifest: ModelManifest) -> None:
        """Queue a manifest to install, replacing an older one of the same model."""
        waiting = self._pending.get(manifest.model_id)
        if waiting is not None and manifest.version < waiting.version:
            log.info(
                "manifest of %s v%d superseded by v%d, waiting to install",
                manifest.model_id,
                manifest.version,
                waiting.version,
            )
            return
        self._pending[manifest.model_id] = manifest
        self._ready.set()

    async def take(self) -> ModelManifest:
        """The oldest waiting manifest; waits for one (an idle wait: closing the agent cancels it)."""
        while not self._pending:
            self._ready.clear()
            await self._ready.wait()
        return self._pending.pop(next(iter(self._pending)))

    def __len__(self) -> int:
        return len(self._pending)


class Installer:
    """Turns signed manifests into loaded models, and keeps the table of them.

    Args:
        config: the agent's configuration.
        cache: the model cache on disk.
        sealer: unwraps the content keys wrapped for this device.
        keys: the fleet's certificates, to verify manifests' signatures.
        transport: the agent's open transport, to request chunks on.
        delivery: reports each install to the coordinator.
    """

    def __init__(
        self,
        config: AgentConfig,
        cache: ModelCache,
        sealer: Sealer,
        keys: KeyDirectory,
        transport: Transport,
        delivery: Delivery,
    ) -> None:
        self.models: dict[str, LoadedModel] = {}
        self.pending = PendingManifests()
        self._config = config
        self._cache = cache
        self._sealer = sealer
        self._keys = keys
        self._transport = transport
        self._delivery = delivery
        self._fetches: dict[str, asyncio.Queue[Chunk | Error | None]] = {}
        self._attempts: dict[tuple[str, int], int] = {}  # failed downloads of a version, for the backoff
        self._hardware_precisions: tuple[str, ...] | None = None  # found when a manifest first offers a choice

    def offer(self, manifest: ModelManifest) -> None:
        """Install a manifest when the installer gets to it (never refused: see `PendingManifests`)."""
        self.pending.offer(manifest)

    def feed(self, body: Chunk | Error) -> None:
        """Hand a chunk to the download that asked for it; a blob error ends every download."""
        for blob_id, queue in self._fetches.items():
            if isinstance(body, Error) or body.blob_id == blob_id:
                with contextlib.suppress(asyncio.QueueFull):  # asked for again on timeout
                    queue.put_nowait(body)

    async def run(self) -> None:
        """Reload the cached models (installed before a restart), then install manifests as they come."""
        for manifest in self._cache.manifests():
            await self._install_and_report(manifest)
        while True:
            await self._install_and_report(await self.pending.take())

    def close(self) -> None:
        """Close every loaded model's backend."""
        for model in self.models.values():
            model.backend.close()

    async def _install_and_report(self, manifest: ModelManifest) -> None:
        try:
            status = await self.install(manifest)
        except EdgeSpeedError as exc:
            # Expected failures are reported; anything else ends the part (see supervisor.py).
            reason = getattr(exc, "reason", type(exc).__name__)
            log.warning("model %s v%d not installed: %s", manifest.model_id, manifest.version, exc)
            status = ModelStatus(manifest.model_id, manifest.version, "failed", reason=str(reason))
            if isinstance(exc, TransportError | BlobError):
                self._retry_later(manifest)
        else:
            self._attempts.pop((manifest.model_id, manifest.version), None)
        if status is not None:
            await self._delivery.send(self._config.coordinator, status)

    def _retry_later(self, manifest: ModelManifest) -> None:
        """A download that failed (a broker away, a server gone quiet) is tried again, with backoff.

        The failure is reported meanwhile, so the rollout shows it; a later success reports ready.
        """
        attempt = self._attempts.get((manifest.model_id, manifest.version), 0) + 1
        if attempt > RETRIES:
            log.error("model %s v%d: giving up after %d attempts", manifest.model_id, manifest.version, RETRIES)
            return
        self._attempts[(manifest.model_id, manifest.version)] = attempt
        delay = min(RETRY_CAP_S, RETRY_BASE_S * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
        log.info("model %s v%d: download tried again in %.0f s", manifest.model_id, manifest.version, delay)
        asyncio.get_running_loop().call_later(delay, self.pending.offer, manifest)

    async def install(self, manifest: ModelManifest) -> ModelStatus | None:
        """Install one manifest; None when there is nothing to do or to report.

        Raises:
            EdgeSpeedError: verification, download, decryption or loading failed.
        """
        cfg = self._config
        installed = self._cache.installed_version(manifest.model_id)
        loaded = self.models.get(manifest.model_id)
        if loaded is not None and loaded.version == manifest.version:
            return None  # a retained manifest seen again
        verify_manifest(manifest, self._keys, installed_version=installed if installed != manifest.version else None)
        if manifest.keys and cfg.device_id not in manifest.keys:
            return None  # not a target of this model (a coordinator wraps the key for us if we become one)
        if not cfg.precisions and self._hardware_precisions is None and len(manifest.variants) > 1:
            self._hardware_precisions = await asyncio.to_thread(_hardware_preference, cfg)
        variant, backend_name = self._choose(manifest)
        shard = next(s for s in manifest.shards if s.name == variant["shard"])
        path = self._cache.path(manifest, shard)
        key = None
        if manifest.keys:
            wrapped = manifest.keys[cfg.device_id]
            key = self._sealer.unwrap_key(manifest.signer, wrapped, context=f"{manifest.model_id}/{manifest.version}")
        if not path.exists():
            queue: asyncio.Queue[Chunk | Error | None] = asyncio.Queue(64)
            self._fetches[shard.name] = queue
            try:
                await fetch_from(
                    self._transport,
                    shard,
                    path,
                    queue,
                    fleet=cfg.fleet,
                    device_id=cfg.device_id,
                    timeout=cfg.fetch_timeout,
                    # Each chunk is checked against the content key as it arrives: a forged one is
                    # dropped and asked for again, never written, never able to fail the install.
                    verify=chunk_verifier(shard, key) if key is not None else None,
                )
            finally:
                del self._fetches[shard.name]
        if key is not None:
            source: Any = b"".join(
                iter_decrypted(path, key, blob_id=shard.name, chunk_size=shard.chunk_size - TAG_SIZE)
            )
        else:
            source = path
        backend = backend_class(backend_name)(threads=cfg.threads)  # type: ignore[call-arg]
        spec = ModelSpec(architecture=str(variant.get("architecture", "")), options=dict(variant.get("options", {})))
        await asyncio.to_thread(backend.load, source, spec)
        run_ms = await asyncio.to_thread(_warm_run_ms, backend)
        self._put(
            manifest.model_id,
            LoadedModel(
                manifest.version,
                backend,
                Pipeline.from_spec([*manifest.pipeline, *variant.get("pre", ())]),
                Pipeline.from_spec(variant.get("post", ())),
                seconds=run_ms / 1000 if run_ms else 1.0,
                stage=int(variant.get("stage", 0)),
            ),
        )
        self._cache.record(manifest, shard)
        for evicted in self._cache.evict(keep=manifest.model_id):
            gone = self.models.pop(evicted, None)
            if gone is not None:
                gone.backend.close()
        log.info("model %s v%d ready on %s", manifest.model_id, manifest.version, backend_name)
        runs = _runs_label(backend_name, variant, manifest)
        return ModelStatus(manifest.model_id, manifest.version, "ready", backend=runs, run_ms=run_ms)

    def _put(self, model_id: str, model: LoadedModel) -> None:
        old = self.models.get(model_id)
        self.models[model_id] = model
        if old is not None:
            old.backend.close()

    def _choose(self, manifest: ModelManifest) -> tuple[dict[str, Any], str]:
        """The variant this device prefers among those a backend here runs, and that backend.

        Variants rank by precision, as this device prefers them (`AgentConfig.precisions`, else its
        hardware's preference; a variant without one counts as fp32), then in the manifest's order.
        """
        variants = manifest.variants or tuple({"shard": s.name, "format": manifest.format} for s in manifest.shards[:1])
        here = set(available_backends())
        order = self._config.backends or BACKEND_ORDER
        preference = self._config.precisions or self._hardware_precisions or ()

        def rank(variant: dict[str, Any]) -> int:
            precision = str(variant.get("precision", "fp32"))
            return preference.index(precision) if precision in preference else len(preference)

        for variant in sorted(variants, key=rank):
            for name in order:
                if name in backends_for(variant["format"]) and name in here:
                    return variant, name
        formats = sorted({str(v["format"]) for v in variants})
        raise BackendError(f"no backend here runs {formats}", reason="no_backend")


def _runs_label(backend: str, variant: dict[str, Any], manifest: ModelManifest) -> str:
    """What a ready report names: the backend, and ``:precision`` where the manifest offered a choice."""
    offered = {str(v.get("precision", "")) for v in manifest.variants}
    precision = str(variant.get("precision", ""))
    return f"{backend}:{precision}" if precision and len(offered) > 1 else backend


def _hardware_preference(config: AgentConfig) -> tuple[str, ...]:
    """The hardware's precision preference (what the device card announces): accelerators are counted
    only where the agent counts them for its card (a torch or npu backend may run: torch is loaded then)."""
    from edgespeed.hardware.detect import detect_cuda, detect_npu, int8_dot_product, preferred_precisions

    accelerators = ["cpu"]
    if not config.backends or any(b in ("torch", "npu") for b in config.backends):
        accelerators += [a.label() for a in (*detect_cuda(), *detect_npu())]
    return preferred_precisions(accelerators, int8_dot_product())


def _warm_run_ms(backend: Backend) -> float:
    """The median of three runs on zeros shaped like the model's inputs: the model warmed up, and its
    speed on this device measured (0 when the backend cannot say what its inputs look like)."""
    sample = backend.sample_inputs()
    if sample is None:
        return 0.0
    times = []
    try:
        for _ in range(4):
            start = time.perf_counter()
            backend.run(sample)
            times.append(time.perf_counter() - start)
    except BackendError:
        return 0.0
    return round(sorted(times[1:])[1] * 1000, 4)
