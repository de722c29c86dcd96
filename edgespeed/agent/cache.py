"""The device's model cache: shards as they arrived (encrypted), within a disk budget.

``index.json`` remembers each model's installed version and its signed
manifest, so a restarted agent reloads its models without fetching them again
and still refuses older versions. The least recently used models are evicted
when the cache outgrows its budget.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from edgespeed.protocol._body import decode_body, encode_body
from edgespeed.protocol.messages import BlobInfo, ModelManifest

__all__ = ["ModelCache"]


class ModelCache:
    """Model files under ``directory/<model>/<version>/``."""

    def __init__(self, directory: Path, budget: int) -> None:
        self.root = Path(directory)
        self.root.mkdir(parents=True, exist_ok=True)
        self.budget = budget
        self._index_path = self.root / "index.json"
        self._index: dict[str, dict[str, Any]] = {}
        if self._index_path.exists():
            self._index = json.loads(self._index_path.read_text())

    def _save(self) -> None:
        tmp = self._index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._index, indent=1))
        os.replace(tmp, self._index_path)

    def installed_version(self, model_id: str) -> int | None:
        """The version installed, if any."""
        entry = self._index.get(model_id)
        return int(entry["version"]) if entry else None

    def path(self, manifest: ModelManifest, shard: BlobInfo) -> Path:
        """Where a shard of a manifest lives."""
        return self.root / manifest.model_id / str(manifest.version) / shard.name

    def record(self, manifest: ModelManifest, shard: BlobInfo) -> None:
        """Remember an installed model (and drop its older versions' files)."""
        for old in (self.root / manifest.model_id).glob("*"):
            if old.is_dir() and old.name != str(manifest.version):
                shutil.rmtree(old, ignore_errors=True)
        self._index[manifest.model_id] = {
            "version": manifest.version,
            "manifest": encode_body(manifest).hex(),
            "bytes": shard.size,
            "last_used": time.time(),
        }
        self._save()

    def manifests(self) -> list[ModelManifest]:
        """Manifests of every installed model (to reload them after a restart)."""
        return [decode_body(ModelManifest, bytes.fromhex(e["manifest"])) for e in self._index.values()]

    def touch(self, model_id: str) -> None:
        """Mark a model as used now (in memory; saved with the next change)."""
        if model_id in self._index:
            self._index[model_id]["last_used"] = time.time()

    def evict(self, *, keep: str) -> list[str]:
        """Remove least recently used models (never ``keep``) until within budget; returns their ids."""
        evicted = []
        total = sum(int(e["bytes"]) for e in self._index.values())
        for model_id, entry in sorted(self._index.items(), key=lambda kv: kv[1]["last_used"]):
            if total <= self.budget:
                break
            if model_id == keep:
                continue
            shutil.rmtree(self.root / model_id, ignore_errors=True)
            total -= int(entry["bytes"])
            evicted.append(model_id)
        for model_id in evicted:
            del self._index[model_id]
        if evicted:
            self._save()
        return evicted
