"""The coordinator's model store: what it published, kept so it can serve it again.

One folder per model version under ``<state_dir>/models/<model>/<version>/``:
the signed manifest (as sent), the shards as ciphertext (exactly the bytes
devices fetch), the content key sealed under the coordinator's data key
(``content.key.sealed``, bound to the model and version; see
`edgespeed.security.atrest`), and the target selector. Folders are mode 0700,
files 0600. A restarted coordinator, or one started beside the CLI that
published, serves the chunks and wraps the key for devices that join later.

A clear ``content.key`` left by an older version is sealed, then removed, the
first time its version is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from edgespeed.errors import ConfigError, EdgeSpeedError, SecurityError
from edgespeed.protocol.envelope import open_message, pack_message
from edgespeed.protocol.messages import ModelManifest, validate_blob_id
from edgespeed.protocol.topics import validate_id
from edgespeed.security.atrest import DataKey, private_dir

__all__ = ["ModelStore", "StoredModel"]

log = logging.getLogger(__name__)

_VERSION = re.compile(r"[0-9]{1,19}")
_SEALED_KEY = "content.key.sealed"
_CLEAR_KEY = "content.key"  # what versions before encryption at rest wrote


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # a file an older version made


@dataclass(frozen=True, slots=True)
class StoredModel:
    """A published model version and what serving it needs."""

    manifest: ModelManifest
    key: bytes
    shards: dict[str, Path]
    targets: str

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    @property
    def version(self) -> int:
        return self.manifest.version


class ModelStore:
    """Published models on disk.

    Args:
        root: the store's folder (created, mode 0700).
        key: the data key that seals the content keys.
    """

    def __init__(self, root: Path, *, key: DataKey) -> None:
        self.root = private_dir(Path(root))
        self._key = key

    def _dir(self, model_id: str, version: int) -> Path:
        return self.root / validate_id(model_id, "model id") / str(int(version))

    def versions(self, model_id: str) -> list[int]:
        """The stored versions of a model, oldest first."""
        folder = self.root / validate_id(model_id, "model id")
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if _VERSION.fullmatch(p.name) and p.is_dir())

    def next_version(self, model_id: str) -> int:
        """One more than the newest stored version (1 for a new model)."""
        versions = self.versions(model_id)
        return versions[-1] + 1 if versions else 1

    def shard_path(self, model_id: str, version: int, shard: str) -> Path:
        """Where a shard's ciphertext goes (the folder is created)."""
        folder = private_dir(self._dir(model_id, version))
        return folder / validate_blob_id(shard)

    def save(self, manifest: ModelManifest, key: bytes, targets: str) -> None:
        """Record the signed manifest, its content key (sealed) and its targets (the shards are written already).

        Raises:
            ConfigError: a shard the manifest names is missing.
        """
        folder = self._dir(manifest.model_id, manifest.version)
        for shard in manifest.shards:
            if not (folder / shard.name).is_file():
                raise ConfigError(f"shard {shard.name} of {manifest.model_id} v{manifest.version} is not stored")
            os.chmod(folder / shard.name, 0o600)
        _write_private(folder / _SEALED_KEY, self._seal(manifest.model_id, manifest.version, key))
        _write_private(folder / "manifest.msg", bytes(pack_message(manifest, sender=manifest.signer)))
        _write_private(folder / "meta.json", json.dumps({"targets": targets}).encode())

    def _seal(self, model_id: str, version: int, key: bytes) -> bytes:
        return self._key.seal(key, "model store", model_id, str(int(version)), "content key")

    def update_manifest(self, manifest: ModelManifest) -> None:
        """Replace a stored version's manifest (keys wrapped for more devices)."""
        folder = self._dir(manifest.model_id, manifest.version)
        _write_private(folder / "manifest.msg", bytes(pack_message(manifest, sender=manifest.signer)))

    def load(self, model_id: str, version: int) -> StoredModel | None:
        """A stored version, or None if it is not here (or incomplete).

        Raises:
            AtRestError: the content key does not open under the data key (another key, or altered).
            SecurityError: a clear content key file of an older version is readable by others.
        """
        folder = self._dir(model_id, version)
        manifest_file = folder / "manifest.msg"
        if not manifest_file.is_file() or not (key := self._content_key(folder, model_id, version)):
            return None
        _, manifest = open_message(manifest_file.read_bytes())
        if not isinstance(manifest, ModelManifest):
            return None
        meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").exists() else {}
        shards = {s.name: folder / s.name for s in manifest.shards}
        if not all(p.is_file() for p in shards.values()):
            return None
        return StoredModel(manifest, key, shards, str(meta.get("targets", "all")))

    def _content_key(self, folder: Path, model_id: str, version: int) -> bytes | None:
        sealed, clear = folder / _SEALED_KEY, folder / _CLEAR_KEY
        if sealed.is_file():
            return self._key.open(sealed.read_bytes(), "model store", model_id, str(int(version)), "content key")
        if not clear.is_file():
            return None
        if clear.stat().st_mode & 0o077:
            raise SecurityError(f"{clear} is readable by others; chmod 600 it", reason="unsafe_key_file")
        key = clear.read_bytes()
        _write_private(sealed, self._seal(model_id, version, key))
        clear.unlink()  # sealed from now on
        log.info("%s v%d: content key sealed under the data key", model_id, version)
        return key

    def latest(self) -> list[StoredModel]:
        """The newest complete version of every stored model.

        An entry that cannot be read (damaged, written by a buggy version, a stray folder) is skipped
        with an error in the log, never fatal: the coordinator still starts and serves the rest.
        """
        out = []
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir():
                continue
            try:
                versions = self.versions(folder.name)
            except EdgeSpeedError:
                log.error("%s: not a model folder (its name is not a model id); skipped", folder)
                continue
            for version in reversed(versions):
                try:
                    stored = self.load(folder.name, version)
                except (EdgeSpeedError, OSError, ValueError) as exc:
                    log.error("%s v%d in the model store cannot be served, skipped: %s", folder.name, version, exc)
                    continue
                if stored is not None:
                    out.append(stored)
                    break
        return out
