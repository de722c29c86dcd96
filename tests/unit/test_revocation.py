"""Revocation without a broker: the CA's list (always there, verified, refreshed), the key directory built
from a PKI folder, the wire message that carries the list, and the rendered broker configuration."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import pwd
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from edgespeed.agent.revocation import DeviceRevocation
from edgespeed.errors import DecodeError, SecurityError, UnknownPeerError
from edgespeed.protocol import topics
from edgespeed.protocol.envelope import open_message, pack_message
from edgespeed.protocol.messages import MessageKind, RevocationList
from edgespeed.security import (
    KeyDirectory,
    create_ca,
    issue_certificate,
    load_crl,
    parse_crl,
    refresh_crl,
    revoke_certificate,
    revoked_serials,
)
from edgespeed.security.pki import CRL_DAYS, FleetCA
from edgespeed.testing import make_pki
from edgespeed.transport.broker import production_settings, render_acl, render_mosquitto_config
from tests.conftest import ROOT

NOW = dt.datetime.now(dt.timezone.utc)


def sign_crl(ca: FleetCA, serials: list[int], *, last: dt.datetime, next_: dt.datetime) -> bytes:
    """A CRL of ``ca`` with any dates (a past nextUpdate included), as PEM."""
    key = serialization.load_pem_private_key(ca.key_file.read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate(ca.cert_file.read_bytes())
    builder = x509.CertificateRevocationListBuilder().issuer_name(cert.subject).last_update(last).next_update(next_)
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last).build()
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def test_a_new_ca_has_an_empty_signed_list_valid_30_days(tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "ca")
    assert ca.crl_file.is_file()
    crl = load_crl(ca.crl_file, ca.cert_file)
    assert crl.revoked == {}
    assert dt.timedelta(days=CRL_DAYS - 1) < crl.remaining() <= dt.timedelta(days=CRL_DAYS)
    assert crl.health() == "ok"
    assert CRL_DAYS == 30


def test_revoke_and_refresh_keep_the_entries_and_renew_next_update(tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "ca")
    a, b = issue_certificate(ca, "dev-a"), issue_certificate(ca, "dev-b")
    serial_a = revoke_certificate(ca, a.cert_file, days=2)
    first = load_crl(ca.crl_file, ca.cert_file)
    assert set(first.revoked) == {serial_a} and first.health() == "expiring"
    revoke_certificate(ca, b.cert_file)
    revoke_certificate(ca, a.cert_file)  # twice: once on the list, with its first date
    second = load_crl(ca.crl_file, ca.cert_file)
    assert second.revoked[serial_a] == first.revoked[serial_a] and len(second.revoked) == 2
    refreshed = refresh_crl(ca, days=45)
    assert refreshed.revoked == second.revoked
    assert refreshed.next_update > second.next_update + dt.timedelta(days=14)
    assert load_crl(ca.crl_file, ca.cert_file).der == refreshed.der
    assert revoked_serials(ca) == set(second.revoked)
    assert not list(ca.directory.glob(".*tmp"))  # written atomically, nothing left behind


def test_a_list_signed_by_another_ca_or_altered_is_refused(tmp_path: Path) -> None:
    ours, theirs = create_ca(tmp_path / "ours"), create_ca(tmp_path / "theirs", fleet="evil")
    victim = issue_certificate(ours, "dev-a")
    # The foreign CA lists a serial of ours: nobody may revoke (or unrevoke) our members but our CA.
    forged = sign_crl(theirs, [victim.certificate().serial_number], last=NOW, next_=NOW + dt.timedelta(days=1))
    (tmp_path / "forged.pem").write_bytes(forged)
    with pytest.raises(SecurityError, match="not issued by the fleet CA"):
        load_crl(tmp_path / "forged.pem", ours.cert_file)
    # Same issuer name, another key: the signature decides.
    twin = create_ca(tmp_path / "twin", fleet="edgespeed")
    same_name = sign_crl(twin, [], last=NOW, next_=NOW + dt.timedelta(days=1))
    with pytest.raises(SecurityError, match="signature"):
        parse_crl(same_name, x509.load_pem_x509_certificate(ours.cert_file.read_bytes()))
    der = bytearray(load_crl(ours.crl_file, ours.cert_file).der)
    der[-5] ^= 1
    with pytest.raises(SecurityError):
        parse_crl(bytes(der), x509.load_pem_x509_certificate(ours.cert_file.read_bytes()))
    with pytest.raises(SecurityError, match="not a revocation list"):
        parse_crl(b"garbage", x509.load_pem_x509_certificate(ours.cert_file.read_bytes()))


def test_health_and_description_of_an_expired_list(tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "ca")
    ca.crl_file.write_bytes(sign_crl(ca, [], last=NOW - dt.timedelta(days=9), next_=NOW - dt.timedelta(days=2)))
    crl = load_crl(ca.crl_file, ca.cert_file)
    assert crl.health() == "expired" and "EXPIRED" in crl.describe()
    assert crl.health(NOW - dt.timedelta(days=4)) == "expiring"
    assert crl.health(NOW - dt.timedelta(days=30)) == "ok"


def test_a_directory_from_a_pki_folder_leaves_revoked_certificates_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = make_pki(tmp_path / "pki", "f", devices=["dev-a", "dev-b"])
    serial = revoke_certificate(fleet.ca, fleet.identity("dev-b").cert_file)
    with caplog.at_level(logging.WARNING):
        directory = KeyDirectory.from_folder(fleet.directory)  # never fatal: dev-b.crt is still in the folder
    assert "dev-a" in directory and "coord" in directory and "dev-b" not in directory
    assert any("dev-b.crt" in r.getMessage() and "revoked" in r.getMessage() for r in caplog.records)
    assert serial in directory.revoked and directory.crl is not None
    with pytest.raises(UnknownPeerError) as refused:
        directory.add_certificate(fleet.identity("dev-b").cert_file.read_bytes())
    assert refused.value.reason == "revoked"
    # A plain directory without the list still knows dev-b; applying the list forgets it.
    plain = KeyDirectory(fleet.ca.cert_file)
    plain.add_directory(fleet.directory)
    assert "dev-b" in plain
    assert plain.apply_crl(load_crl(fleet.ca.crl_file, fleet.ca.cert_file)) == ["dev-b"]
    assert "dev-b" not in plain and plain.revoke(serial) == []


def test_a_folder_whose_list_is_not_the_fleet_cas_does_not_load(tmp_path: Path) -> None:
    fleet = make_pki(tmp_path / "pki", "f", devices=["dev-a"])
    other = create_ca(tmp_path / "other", fleet="f")
    fleet.ca.crl_file.write_bytes(other.crl_file.read_bytes())
    with pytest.raises(SecurityError):
        KeyDirectory.from_folder(fleet.directory)


def test_the_revocation_list_message_round_trips_and_is_bounded(tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "ca")
    der = load_crl(ca.crl_file, ca.cert_file).der
    envelope, message = open_message(pack_message(RevocationList(der), sender="coord"))
    assert envelope.kind is MessageKind.REVOCATION_LIST == 13 and message == RevocationList(der)
    with pytest.raises(DecodeError):
        RevocationList(b"")
    with pytest.raises(DecodeError):
        RevocationList(bytes((1 << 20) + 1))
    assert topics.crl("plant") == "es/1/plant/bcast/crl"
    name = topics.parse_topic(topics.crl("plant"))
    assert (name.kind, name.id) == (topics.TopicKind.BROADCAST, "crl")


def test_the_revocation_list_vector_decodes() -> None:
    vectors = json.loads((ROOT / "firmware_bridge" / "vectors" / "revocation.json").read_text())
    (case,) = vectors["cases"]
    envelope, message = open_message(bytes.fromhex(case["hex"]))
    assert int(envelope.kind) == case["envelope"]["kind"] == 13
    assert isinstance(message, RevocationList) and message.crl.hex() == case["message"]["crl"]["hex"]


def test_a_device_applies_only_lists_its_ca_signed_and_keeps_the_last(tmp_path: Path) -> None:
    fleet = make_pki(tmp_path / "pki", "f", devices=["dev-a", "dev-b"])
    state = tmp_path / "state"
    state.mkdir()
    keys = KeyDirectory.from_folder(fleet.directory)
    device = DeviceRevocation(keys, state)
    foreign = create_ca(tmp_path / "foreign")
    forged = load_crl(foreign.crl_file, foreign.cert_file).der
    with pytest.raises(SecurityError):
        device.on_message(pack_message(RevocationList(forged), sender="coord"))
    revoke_certificate(fleet.ca, fleet.identity("dev-b").cert_file)
    der = load_crl(fleet.ca.crl_file, fleet.ca.cert_file).der
    assert device.on_message(pack_message(RevocationList(der), sender="coord")) == ["dev-b"]
    assert "dev-b" not in keys and device.revoked == {"dev-b"}
    assert device.on_message(b"") == []  # a retained list withdrawn revokes nothing back
    # The next start applies the kept list before the broker delivers anything.
    again = KeyDirectory(fleet.ca.cert_file)
    again.add_directory(fleet.directory)
    DeviceRevocation(again, state).load_saved()
    assert "dev-b" not in again and "dev-a" in again


def test_the_rendered_broker_config_always_names_the_list_and_creates_the_data_folder(tmp_path: Path) -> None:
    fleet = make_pki(tmp_path / "pki", "f", devices=["dev-a"])
    settings = production_settings(
        fleet.directory, fleet="f", coordinators=["coord"], out_dir=tmp_path / "out", host="127.0.0.1", tls_port=1
    )
    conf = render_mosquitto_config(settings)
    assert f"crlfile {fleet.ca.crl_file}" in conf  # nothing was revoked: the list is there all the same
    data = tmp_path / "out" / "data"
    assert data.is_dir() and data.stat().st_mode & 0o777 == 0o700
    assert f"persistence_location {data}/" in conf
    if os.geteuid() == 0:
        # pytest's folders are root's alone (0700): the mosquitto user could not load the keys; the file says so.
        assert "\nuser root\n" in conf and "# Run as root: " in conf
    assert "bcast/crl" in render_acl("f", coordinators=["coord"])
    fleet.ca.crl_file.unlink()
    with pytest.raises(Exception, match="crl refresh"):
        production_settings(fleet.directory, fleet="f", coordinators=["coord"], out_dir=tmp_path / "out2")


@pytest.mark.skipif(os.geteuid() != 0, reason="choosing the broker's user happens when rendering as root")
def test_the_broker_runs_as_mosquitto_when_that_user_can_read_the_pki(tmp_path: Path) -> None:
    try:
        account = pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("no mosquitto user on this machine")
    base = Path(os.path.realpath("/tmp")) / f"es-user-{os.getpid()}"  # reachable: not under pytest's 0700 folder
    base.mkdir(mode=0o755)
    try:
        fleet = make_pki(base / "pki", "f", devices=["dev-a"])
        os.chmod(base / "pki", 0o755)
        os.chown(fleet.broker.key_file, 0, account.pw_gid)
        os.chmod(fleet.broker.key_file, 0o640)
        os.chmod(fleet.broker.key_file, 0o600)  # as 'edgespeed certs' writes it: root's alone
        settings = production_settings(fleet.directory, fleet="f", coordinators=["coord"], out_dir=base / "out")
        conf = render_mosquitto_config(settings)
        assert "\nuser root\n" in conf and f"{fleet.broker.key_file} (mode 0600) is not readable" in conf
        os.chmod(fleet.broker.key_file, 0o640)  # group mosquitto may read it
        settings = production_settings(fleet.directory, fleet="f", coordinators=["coord"], out_dir=base / "out")
        assert settings.user == "mosquitto"
        assert settings.data_dir is not None and settings.data_dir.stat().st_uid == account.pw_uid
        assert "\nuser mosquitto\n" in render_mosquitto_config(settings)
    finally:
        import shutil

        shutil.rmtree(base)
