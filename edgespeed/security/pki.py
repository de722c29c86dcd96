"""The fleet's certificate authority and the certificates it issues.

A certificate's common name is the identity's id (a device id, the
coordinator's, or a broker's name), so brokers can map it to a username with
``use_identity_as_username``. Keys are ECDSA P-256 and written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgespeed.errors import ConfigError
from edgespeed.protocol.topics import validate_id

__all__ = ["FleetCA", "Identity", "Role", "create_ca", "issue_certificate", "load_ca"]

Role = Literal["device", "coordinator", "bridge", "broker"]
_ROLES = ("device", "coordinator", "bridge", "broker")


@dataclass(frozen=True, slots=True)
class FleetCA:
    """Where a fleet CA's certificate and key live."""

    directory: Path

    @property
    def cert_file(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def key_file(self) -> Path:
        return self.directory / "ca.key"


@dataclass(frozen=True, slots=True)
class Identity:
    """An issued identity: its id, certificate, private key and the fleet CA certificate."""

    name: str
    role: Role
    cert_file: Path
    key_file: Path
    ca_file: Path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def create_ca(directory: Path, *, fleet: str = "edgespeed", days: int = 3650) -> FleetCA:
    """Create a fleet CA in ``directory`` (``ca.crt``, ``ca.key``).

    Raises:
        ConfigError: a CA already exists there.
    """
    validate_id(fleet, "fleet")
    ca = FleetCA(Path(directory))
    ca.directory.mkdir(parents=True, exist_ok=True)
    if ca.key_file.exists():
        raise ConfigError(f"a fleet CA already exists in {ca.directory}")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"{fleet} fleet CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, fleet),
        ]
    )
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(ca.key_file, _key_pem(key))
    ca.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ca


def load_ca(directory: Path) -> FleetCA:
    """The CA in ``directory``.

    Raises:
        ConfigError: no CA there.
    """
    ca = FleetCA(Path(directory))
    if not ca.cert_file.is_file() or not ca.key_file.is_file():
        raise ConfigError(f"no fleet CA in {directory} (create one with 'edgespeed certs init')")
    return ca


def issue_certificate(
    ca: FleetCA,
    name: str,
    *,
    role: Role = "device",
    out_dir: Path | None = None,
    days: float = 30,
    hosts: Sequence[str] = (),
    not_before: dt.datetime | None = None,
) -> Identity:
    """Issue a key and certificate for ``name`` signed by the fleet CA.

    Args:
        ca: the fleet CA.
        name: the identity's id; becomes the common name.
        role: device, coordinator and bridge get client certificates; a broker
            gets a server certificate for ``hosts`` (DNS names or IP addresses).
        out_dir: where to write ``<name>.crt`` and ``<name>.key``; the CA's folder by default.
        days: validity; short by default, renew rather than extend.
        not_before: start of validity (now by default).

    Raises:
        TopicError: ``name`` is not a valid id.
        ConfigError: unknown role.
    """
    validate_id(name, "identity name")
    if role not in _ROLES:
        raise ConfigError(f"role must be one of {', '.join(_ROLES)}")
    ca_key = serialization.load_pem_private_key(ca.key_file.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_file.read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the fleet CA key must be an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if role == "broker":
        sans: list[x509.GeneralName] = []
        for host in hosts or ("localhost", "127.0.0.1"):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        usage = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH
    builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out = Path(out_dir) if out_dir is not None else ca.directory
    out.mkdir(parents=True, exist_ok=True)
    identity = Identity(name, role, out / f"{name}.crt", out / f"{name}.key", ca.cert_file)
    _write_private(identity.key_file, _key_pem(key))
    identity.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return identity
