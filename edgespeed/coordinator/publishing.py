"""What publishing a model version does before anything is signed or sent: files checked, each variant
encrypted once under one content key into the model store, and the manifest described (variants,
declared outputs). Blocking: the coordinator calls it in a thread."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgespeed.coordinator.store import ModelStore
from edgespeed.errors import ConfigError, MissingDependencyError, ProtocolError
from edgespeed.optimize.split import onnx_outputs
from edgespeed.optimize.variants import PRECISIONS, precision_of
from edgespeed.protocol.blob import DEFAULT_CHUNK_SIZE, BlobSource
from edgespeed.protocol.envelope import open_message, pack_message
from edgespeed.protocol.formats import SUFFIX_FORMATS, format_of
from edgespeed.protocol.messages import ModelManifest
from edgespeed.security import encrypt_blob
from edgespeed.security.blobcrypt import TAG_SIZE

__all__ = ["check_decodes", "check_files", "encrypt_and_describe"]

log = logging.getLogger(__name__)


def check_files(paths: Sequence[Path | str], *, architecture: str, split: str) -> list[Path]:
    """The model files of one version, checked: known types, present, an architecture for weights.

    Raises:
        ConfigError: no file, an unknown type, a missing file or architecture, a split of anything but one ONNX.
    """
    if not paths:
        raise ConfigError("give at least one model file")
    files = [Path(p) for p in paths]
    for path in files:
        if format_of(path.suffix) is None:
            raise ConfigError(f"{path}: unknown model type; use {', '.join(SUFFIX_FORMATS)}")
        if not path.is_file():
            raise ConfigError(f"{path}: no such file")
        if path.suffix == ".safetensors" and not architecture:
            raise ConfigError(f"{path}: safetensors weights need --architecture (e.g. digits-cnn)")
    if split and (len(files) != 1 or files[0].suffix != ".onnx"):
        raise ConfigError("a split model is published from one .onnx file")
    return files


def encrypt_and_describe(
    store: ModelStore,
    model_id: str,
    files: Sequence[Path],
    version: int,
    architecture: str,
    pipeline: Sequence[dict[str, Any]],
    stage: int,
) -> tuple[ModelManifest, bytes]:
    """Encrypt each file (one variant each) into the store; returns the unsigned manifest and the content key.

    ``stage`` is the version's place in a split model (0 for a whole model); it is signed into each
    variant, so devices take this shard's tasks only from the stage before.
    """
    key: bytes | None = None
    sources = []
    for i, path in enumerate(files):
        shard = f"{model_id}-v{version}-{i}{path.suffix}"
        ciphertext, key = encrypt_blob(path.read_bytes(), blob_id=shard, chunk_size=DEFAULT_CHUNK_SIZE, key=key)
        stored = store.shard_path(model_id, version, shard)
        stored.write_bytes(ciphertext)
        sources.append(BlobSource(shard, stored, chunk_size=DEFAULT_CHUNK_SIZE + TAG_SIZE))
    assert key is not None
    variants = []
    for path, source in zip(files, sources, strict=True):
        variant: dict[str, Any] = {"shard": source.blob_id, "format": SUFFIX_FORMATS[path.suffix]}
        if path.suffix == ".safetensors":
            variant["architecture"] = architecture
        precision = precision_of(path)  # fp32, fp16, int8: devices run the one they prefer
        if precision in PRECISIONS:
            variant["precision"] = precision
        if stage:
            variant["stage"] = stage
        variants.append(variant)
    manifest = ModelManifest(
        model_id,
        version,
        "mixed" if len({v["format"] for v in variants}) > 1 else variants[0]["format"],
        tuple(s.info for s in sources),
        pipeline=tuple(pipeline),
        variants=tuple(variants),
        outputs=declared_outputs(files),
    )
    return manifest, key


def declared_outputs(files: Sequence[Path]) -> tuple[dict[str, Any], ...]:
    """The outputs an ONNX variant declares (results are checked against them); empty without one."""
    for path in files:
        if path.suffix == ".onnx":
            try:
                return onnx_outputs(path)
            except MissingDependencyError:
                log.info("%s: outputs not declared (the onnx package is not installed here)", path)
    return ()


def check_decodes(manifest: ModelManifest) -> None:
    """What is stored and announced must be what every receiver decodes: checked before either.

    Raises:
        ConfigError: the manifest does not encode, or does not decode again.
    """
    try:
        open_message(pack_message(manifest, sender=manifest.signer))
    except (ProtocolError, TypeError, ValueError) as exc:
        raise ConfigError(f"{manifest.model_id} v{manifest.version}: the manifest does not validate: {exc}") from exc
