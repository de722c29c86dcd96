"""Encryption at rest: the data key, where it comes from, and sealing values under it.

A process's *data key* (32 random bytes) encrypts what it keeps on disk: the coordinator's ledger
payloads and the content keys of its model store, a device's outbox. Where the key comes from, first
found first:

1. ``data_key_file``, a setting naming any file (a separate disk, a tmpfs filled at boot, a
   removable token): 32 raw bytes or 64 hex digits, readable by its owner only. A key file named but
   missing or malformed is an error, never a reason to make a new key.
2. the systemd credential ``edgespeed-data-key`` (``$CREDENTIALS_DIRECTORY/edgespeed-data-key``,
   from ``LoadCredential=`` or ``LoadCredentialEncrypted=``; ``systemd-creds encrypt --with-key=tpm2``
   seals it to the machine's TPM).
3. ``data.key`` in the state folder, made on first start (mode 0600). The weakest choice: the key
   lies beside the data it protects, so a copy of that disk reveals everything; it is logged as such.

Each value is sealed with AES-256-GCM (random 96-bit nonce) and associated data naming what it is
(table, column, row id, ...), so a value moved to another row, column or table does not open.
Sealed bytes are ``ES@1`` + nonce + ciphertext and tag (32 bytes more than the value); sealed text
is ``es@1:`` + the same in URL-safe base64.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgespeed.errors import AtRestError, ConfigError, SecurityError

__all__ = [
    "CREDENTIAL",
    "KEY_FILE",
    "DataKey",
    "configured_key",
    "is_sealed",
    "load_data_key",
    "private_database",
    "private_dir",
    "private_file",
    "stored_key",
]

log = logging.getLogger(__name__)

#: The systemd credential's name: ``LoadCredential=edgespeed-data-key:/path``.
CREDENTIAL = "edgespeed-data-key"
#: The key made in the state folder when none is configured.
KEY_FILE = "data.key"

MAGIC = b"ES@1"
TEXT_PREFIX = "es@1:"
_NONCE = 12
_OVERHEAD = len(MAGIC) + _NONCE + 16
_AD = b"edgespeed/at-rest/v1"
_warned: set[str] = set()


class DataKey:
    """A 256-bit data key that seals and opens values bound to what they are.

    Args:
        key: 32 bytes.
        source: where it came from, for log lines and errors (never the key itself).

    Raises:
        ConfigError: not 32 bytes.
    """

    __slots__ = ("_aead", "key_id", "source")

    def __init__(self, key: bytes, *, source: str = "given") -> None:
        if len(key) != 32:
            raise ConfigError(f"a data key is 32 bytes, not {len(key)} ({source})")
        self._aead = AESGCM(bytes(key))
        self.source = source
        #: A short public name of the key (a hash), to tell whether two processes hold the same one.
        self.key_id = hashlib.sha256(b"edgespeed/data-key-id|" + bytes(key)).hexdigest()[:12]

    @classmethod
    def generate(cls, *, source: str = "generated") -> DataKey:
        """A new random key."""
        return cls(secrets.token_bytes(32), source=source)

    def __repr__(self) -> str:
        return f"DataKey(id={self.key_id}, source={self.source!r})"

    def seal(self, value: bytes, *context: str) -> bytes:
        """``value`` encrypted and bound to ``context`` (e.g. table, column, row id)."""
        nonce = os.urandom(_NONCE)
        return MAGIC + nonce + self._aead.encrypt(nonce, value, _ad(context))

    def open(self, sealed: bytes | memoryview, *context: str) -> bytes:
        """The value `seal` sealed with the same ``context``.

        Raises:
            AtRestError: not sealed, sealed under another key or for another context, or altered.
        """
        view = memoryview(sealed)  # no copies of a large value
        if len(view) < _OVERHEAD or view[: len(MAGIC)] != MAGIC:
            raise AtRestError(f"{_name(context)} is not sealed at rest", reason="not_sealed")
        try:
            return self._aead.decrypt(view[4 : 4 + _NONCE], view[4 + _NONCE :], _ad(context))
        except InvalidTag:
            raise AtRestError(
                f"{_name(context)} does not open under data key {self.key_id} ({self.source}): sealed under "
                "another key, moved from another row, or altered",
                reason="wrong_key",
            ) from None

    def seal_text(self, value: str, *context: str) -> str:
        """Text sealed like `seal`, as text (for a text column)."""
        return TEXT_PREFIX + base64.urlsafe_b64encode(self.seal(value.encode(), *context)).decode()

    def open_text(self, sealed: str, *context: str) -> str:
        """The text `seal_text` sealed.

        Raises:
            AtRestError: as `open`.
        """
        if not sealed.startswith(TEXT_PREFIX):
            raise AtRestError(f"{_name(context)} is not sealed at rest", reason="not_sealed")
        try:
            raw = base64.urlsafe_b64decode(sealed[len(TEXT_PREFIX) :])
        except (binascii.Error, ValueError):
            raise AtRestError(f"{_name(context)} is damaged", reason="not_sealed") from None
        return self.open(raw, *context).decode()


def is_sealed(value: bytes | memoryview | str) -> bool:
    """Whether a stored value is sealed (rather than written in clear by an older version)."""
    if isinstance(value, str):
        return value.startswith(TEXT_PREFIX)
    return bytes(value[: len(MAGIC)]) == MAGIC


def _ad(context: Iterable[str]) -> bytes:
    # Each part length-prefixed: ("a|b", "c") and ("a", "b|c") are different contexts.
    out = bytearray(_AD)
    for part in context:
        raw = part.encode()
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def _name(context: Iterable[str]) -> str:
    return "/".join(context) or "a value"


# -- where the key comes from --------------------------------------------------


def configured_key(data_key_file: str | Path = "") -> DataKey | None:
    """The key an operator provided: ``data_key_file`` if set, else the systemd credential; None if neither.

    Raises:
        ConfigError: ``data_key_file`` is set but missing, unreadable or not a key; the credential is not a key.
        SecurityError: ``data_key_file`` is readable by others than its owner.
    """
    if str(data_key_file):
        path = Path(data_key_file)
        key = _read_key(path, f"data_key_file {path}", strict_mode=True)
        _announce(key)
        return key
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / CREDENTIAL).is_file():
        # systemd placed it, on a non-swappable file system only this service's user can read.
        key = _read_key(Path(credentials) / CREDENTIAL, f"systemd credential {CREDENTIAL}", strict_mode=False)
        _announce(key)
        return key
    return None


def load_data_key(state_dir: Path, data_key_file: str | Path = "") -> DataKey:
    """The process's data key: `configured_key`, else ``data.key`` in ``state_dir`` (made on first start).

    Raises:
        ConfigError: a configured key is missing or malformed, or ``data.key`` is damaged (never replaced:
            what it sealed would be lost).
        SecurityError: a key file is readable by others than its owner.
    """
    key = configured_key(data_key_file)
    if key is not None:
        return key
    path = Path(state_dir) / KEY_FILE
    if not path.exists():
        private_dir(path.parent)
        tmp = path.with_name(f".{KEY_FILE}.{secrets.token_hex(6)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # never over a key another process made meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = _read_key(path, f"{path}", strict_mode=True)
    if str(path) not in _warned:
        _warned.add(str(path))
        log.warning(
            "data key %s lies in %s, beside the data it protects: a copy of this disk reveals what it encrypts. "
            "Keep it elsewhere: move it and name it in data_key_file, or give the systemd credential %s",
            key.key_id,
            path,
            CREDENTIAL,
        )
    return key


def stored_key(raw: bytes, where: str) -> DataKey:
    """A data key kept inside the store it protects (a ledger database given no key): logged as the weakest choice."""
    key = DataKey(raw, source=where)
    if where not in _warned:
        _warned.add(where)
        log.warning(
            "data key %s is kept in %s, beside the data it protects: a copy of it reveals task inputs and results. "
            "Give every process sharing it the same data_key_file or systemd credential %s",
            key.key_id,
            where,
            CREDENTIAL,
        )
    return key


def _read_key(path: Path, source: str, *, strict_mode: bool) -> DataKey:
    try:
        if strict_mode and path.stat().st_mode & 0o077:
            raise SecurityError(f"{source} is readable by others; chmod 600 it", reason="unsafe_key_file")
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source} cannot be read: {exc}") from exc
    if len(raw) != 32:
        try:
            raw = bytes.fromhex(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{source} is not a data key: it must hold 32 raw bytes or 64 hex digits")
    return DataKey(raw, source=source)


def _announce(key: DataKey) -> None:
    if key.source not in _warned:
        _warned.add(key.source)
        log.info("data key %s from %s", key.key_id, key.source)


# -- private folders and files -------------------------------------------------


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) with mode 0700; an existing ``path`` is set to 0700."""
    path = Path(path)
    missing = []
    at = path
    while not at.exists():
        missing.append(at)
        at = at.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
    _chmod(path, 0o700)
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty with mode 0600 if missing; an existing one is set to 0600."""
    path = Path(path)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    _chmod(path, 0o600)
    return path


def private_database(path: Path) -> Path:
    """A SQLite file made 0600 before SQLite opens it (its -wal and -shm files take its mode)."""
    private_file(path)
    for suffix in ("-wal", "-shm", "-journal"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            _chmod(side, 0o600)
    return path


def _chmod(path: Path, mode: int) -> None:
    try:
        os.chmod(path, mode)
    except PermissionError:
        log.warning("cannot make %s mode %o (not its owner)", path, mode)
