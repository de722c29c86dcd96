"""The fleet's certificate authority and the certificates it issues.

A certificate's common name is the identity's id (a device id, the
coordinator's, or a broker's name), so brokers can map it to a username with
``use_identity_as_username``; its organizational unit is the role. TLS keys
are ECDSA P-256. Besides its TLS key, every identity has an X25519 key for
sealing payloads and an Ed25519 key for signatures; their public halves travel
inside the certificate in the `PAYLOAD_KEYS_OID` extension, so the fleet CA
vouches for them and nothing else can introduce a key. Private keys are
written with mode 0600 and never logged.

Files for an identity ``NAME``: ``NAME.crt``, ``NAME.key`` (TLS),
``NAME.x25519.key`` and ``NAME.ed25519.key``.

The CA always has a revocation list, ``crl.pem`` in its folder: `create_ca` writes
an empty one, `revoke_certificate` adds to it and `refresh_crl` re-signs it with
a fresh ``nextUpdate`` (a CRL past it makes Mosquitto refuse every client: renew
it well before, see ``edgespeed certs crl refresh``). `load_crl` verifies a CRL
against the CA before anyone trusts what it says.
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
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from edgespeed.errors import ConfigError, SecurityError
from edgespeed.protocol.messages import MAX_CRL_BYTES  # the largest revocation list accepted, file or wire
from edgespeed.protocol.topics import validate_id

__all__ = [
    "CRL_DAYS",
    "CRL_WARN_DAYS",
    "CrlInfo",
    "FleetCA",
    "Identity",
    "MAX_CRL_BYTES",
    "PAYLOAD_KEYS_OID",
    "Role",
    "create_ca",
    "issue_certificate",
    "load_ca",
    "load_crl",
    "load_identity",
    "parse_crl",
    "refresh_crl",
    "revoke_certificate",
    "revoked_serials",
]

Role = Literal["device", "coordinator", "bridge", "broker"]
_ROLES = ("device", "coordinator", "bridge", "broker")
# A UUID-based OID (ITU-T X.667, arc 2.25), so no registration is needed.
# Value: 32 bytes of X25519 public key, then 32 bytes of Ed25519 public key.
PAYLOAD_KEYS_OID = ObjectIdentifier("2.25.203617407937514530063658372906402915155")
#: Days a freshly signed revocation list is valid (its ``nextUpdate``).
CRL_DAYS = 30
#: Fewer days than this before ``nextUpdate``: warn (a CRL past it locks every client out of Mosquitto).
CRL_WARN_DAYS = 7


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

    @property
    def crl_file(self) -> Path:
        return self.directory / "crl.pem"


@dataclass(frozen=True, slots=True)
class Identity:
    """An issued identity: its id, certificate, private key and the fleet CA certificate."""

    name: str
    role: Role
    cert_file: Path
    key_file: Path
    ca_file: Path

    @property
    def seal_key_file(self) -> Path:
        """The X25519 private key that opens payloads sealed for this identity."""
        return self.key_file.with_name(f"{self.name}.x25519.key")

    @property
    def sign_key_file(self) -> Path:
        """The Ed25519 private key this identity signs with."""
        return self.key_file.with_name(f"{self.name}.ed25519.key")

    def seal_key(self) -> x25519.X25519PrivateKey:
        """Load the X25519 private key."""
        key = serialization.load_pem_private_key(self.seal_key_file.read_bytes(), password=None)
        if not isinstance(key, x25519.X25519PrivateKey):
            raise ConfigError(f"{self.seal_key_file} is not an X25519 key")
        return key

    def sign_key(self) -> ed25519.Ed25519PrivateKey:
        """Load the Ed25519 private key."""
        key = serialization.load_pem_private_key(self.sign_key_file.read_bytes(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ConfigError(f"{self.sign_key_file} is not an Ed25519 key")
        return key

    def certificate(self) -> x509.Certificate:
        """The identity's certificate."""
        return x509.load_pem_x509_certificate(self.cert_file.read_bytes())


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
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
    _sign_crl(ca, {}, days=CRL_DAYS)
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
    keep_keys: bool = False,
) -> Identity:
    """Issue a certificate (and, unless ``keep_keys``, fresh keys) for ``name``.

    Args:
        ca: the fleet CA.
        name: the identity's id; becomes the common name.
        role: device, coordinator and bridge get client certificates; a broker
            gets a server certificate for ``hosts`` (DNS names or IP addresses).
        out_dir: where to write the files; the CA's folder by default.
        days: validity; short by default: renew rather than extend.
        not_before: start of validity (now by default).
        keep_keys: reuse the keys already in ``out_dir`` (renewal).

    Raises:
        TopicError: ``name`` is not a valid id.
        ConfigError: unknown role, or ``keep_keys`` without keys to keep.
    """
    validate_id(name, "identity name")
    if role not in _ROLES:
        raise ConfigError(f"role must be one of {', '.join(_ROLES)}")
    ca_key = serialization.load_pem_private_key(ca.key_file.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_file.read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the fleet CA key must be an EC key")
    out = Path(out_dir) if out_dir is not None else ca.directory
    out.mkdir(parents=True, exist_ok=True)
    identity = Identity(name, role, out / f"{name}.crt", out / f"{name}.key", ca.cert_file)
    if keep_keys:
        if not identity.key_file.exists():
            raise ConfigError(f"no keys of {name!r} in {out} to renew")
        tls_key = serialization.load_pem_private_key(identity.key_file.read_bytes(), password=None)
        if not isinstance(tls_key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{identity.key_file} is not an EC key")
        seal_key, sign_key = identity.seal_key(), identity.sign_key()
    else:
        tls_key = ec.generate_private_key(ec.SECP256R1())
        seal_key, sign_key = x25519.X25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    start = not_before or dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    payload_keys = seal_key.public_key().public_bytes(*raw) + sign_key.public_key().public_bytes(*raw)
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
        .public_key(tls_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.UnrecognizedExtension(PAYLOAD_KEYS_OID, payload_keys), critical=False)
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
    if not keep_keys:
        _write_private(identity.key_file, _key_pem(tls_key))
        _write_private(identity.seal_key_file, _key_pem(seal_key))
        _write_private(identity.sign_key_file, _key_pem(sign_key))
    identity.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return identity


def load_identity(directory: Path, name: str, *, ca_file: Path | None = None) -> Identity:
    """The identity ``name`` whose files are in ``directory``.

    Raises:
        ConfigError: files missing, or the certificate names another identity.
    """
    directory = Path(directory)
    cert_file = directory / f"{name}.crt"
    if not cert_file.is_file():
        raise ConfigError(f"no certificate for {name!r} in {directory}")
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    role = _attribute(cert, NameOID.ORGANIZATIONAL_UNIT_NAME)
    if _attribute(cert, NameOID.COMMON_NAME) != name or role not in _ROLES:
        raise ConfigError(f"{cert_file} is not a certificate of {name!r}")
    return Identity(name, role, cert_file, directory / f"{name}.key", ca_file or directory / "ca.crt")  # type: ignore[arg-type]


def _attribute(cert: x509.Certificate, oid: ObjectIdentifier) -> str:
    values = cert.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if values else ""


def revoke_certificate(ca: FleetCA, cert_file: Path, *, days: float = CRL_DAYS) -> int:
    """Add a certificate to the fleet's revocation list and re-sign it; returns its serial number.

    Brokers read ``crl.pem`` (Mosquitto's ``crlfile``) at start and on SIGHUP; a running
    coordinator re-reads it within seconds and broadcasts it to the devices.
    """
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    entries = _current_entries(ca)
    entries.setdefault(cert.serial_number, dt.datetime.now(dt.timezone.utc))
    _sign_crl(ca, entries, days=days)
    return cert.serial_number


def refresh_crl(ca: FleetCA, *, days: float = CRL_DAYS) -> CrlInfo:
    """Re-sign the revocation list with the same entries and a ``nextUpdate`` ``days`` from now.

    Run it regularly (a timer), well within `CRL_DAYS`: a CRL past its ``nextUpdate`` makes
    Mosquitto refuse every client. Creates an empty list where none exists yet.
    """
    if days <= 0:
        raise ConfigError("a revocation list must be valid for some time: days > 0")
    return _sign_crl(ca, _current_entries(ca), days=days)


def revoked_serials(ca: FleetCA) -> set[int]:
    """Serial numbers on the fleet's revocation list (verified against the CA; none without a list)."""
    if not ca.crl_file.exists():
        return set()
    return set(load_crl(ca.crl_file, ca.cert_file).revoked)


@dataclass(frozen=True, slots=True)
class CrlInfo:
    """A revocation list verified against the fleet CA.

    Attributes:
        revoked: the revoked serial numbers, each with its revocation time.
        last_update, next_update: when it was signed, and when it stops being valid (UTC).
        der: the signed list as DER (what travels on the wire).
    """

    revoked: dict[int, dt.datetime]
    last_update: dt.datetime
    next_update: dt.datetime
    der: bytes

    def remaining(self, now: dt.datetime | None = None) -> dt.timedelta:
        """Time left before ``nextUpdate`` (negative once past it)."""
        return self.next_update - (now or dt.datetime.now(dt.timezone.utc))

    def health(self, now: dt.datetime | None = None) -> Literal["ok", "expiring", "expired"]:
        """``expired`` past ``nextUpdate``, ``expiring`` within `CRL_WARN_DAYS` of it, else ``ok``."""
        left = self.remaining(now)
        if left <= dt.timedelta(0):
            return "expired"
        return "expiring" if left < dt.timedelta(days=CRL_WARN_DAYS) else "ok"

    def describe(self, now: dt.datetime | None = None) -> str:
        """One line for logs and the CLI: entries and how long it stays valid."""
        left = self.remaining(now)
        when = f"{self.next_update:%Y-%m-%d %H:%M} UTC"
        if left <= dt.timedelta(0):
            state = f"EXPIRED since {when} ({_span(-left)} ago): Mosquitto refuses every client until it is refreshed"
        else:
            state = f"valid until {when} (in {_span(left)})"
        return f"revocation list with {len(self.revoked)} revoked certificate(s), {state}"


def _span(delta: dt.timedelta) -> str:
    days = delta.total_seconds() / 86400
    return f"{days:.1f} days" if days >= 1 else f"{delta.total_seconds() / 3600:.1f} hours"


def parse_crl(data: bytes, ca_cert: x509.Certificate) -> CrlInfo:
    """Verify a revocation list (PEM or DER) against the fleet CA certificate.

    Raises:
        SecurityError: too large, not a CRL, another issuer, a bad signature, or no ``nextUpdate``.
    """
    if len(data) > MAX_CRL_BYTES:
        raise SecurityError(f"revocation list of {len(data)} bytes is over {MAX_CRL_BYTES}")
    try:
        crl = x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----BEGIN") else x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise SecurityError(f"not a revocation list: {exc}") from exc
    if crl.issuer != ca_cert.subject:
        raise SecurityError("revocation list not issued by the fleet CA")
    public = ca_cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(public):
        raise SecurityError("revocation list signature does not verify against the fleet CA")
    if crl.next_update_utc is None:
        raise SecurityError("revocation list without nextUpdate")
    return CrlInfo(
        revoked={entry.serial_number: entry.revocation_date_utc for entry in crl},
        last_update=crl.last_update_utc,
        next_update=crl.next_update_utc,
        der=crl.public_bytes(serialization.Encoding.DER),
    )


def load_crl(path: Path, ca: Path | x509.Certificate) -> CrlInfo:
    """Read and verify a revocation list file against the fleet CA (its certificate, or ``ca.crt``'s path).

    Raises:
        ConfigError: the file cannot be read.
        SecurityError: see `parse_crl`.
    """
    ca_cert = ca if isinstance(ca, x509.Certificate) else x509.load_pem_x509_certificate(Path(ca).read_bytes())
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the revocation list {path}: {exc}") from exc
    return parse_crl(data, ca_cert)


def _current_entries(ca: FleetCA) -> dict[int, dt.datetime]:
    if not ca.crl_file.exists():
        return {}
    return dict(load_crl(ca.crl_file, ca.cert_file).revoked)


def _sign_crl(ca: FleetCA, entries: dict[int, dt.datetime], *, days: float) -> CrlInfo:
    """Sign a CRL of ``entries`` valid ``days`` from now and write it atomically (readers never see half)."""
    ca_key = serialization.load_pem_private_key(ca.key_file.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_file.read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the fleet CA key must be an EC key")
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    for serial, when in sorted(entries.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    tmp = ca.crl_file.with_name(f".{ca.crl_file.name}.{os.getpid()}.tmp")
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    os.chmod(tmp, 0o644)  # public, and Mosquitto (perhaps as the mosquitto user) reads it
    os.replace(tmp, ca.crl_file)
    return parse_crl(crl.public_bytes(serialization.Encoding.DER), ca_cert)
