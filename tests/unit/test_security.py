"""The security layer on its own: keys, sealing, replay, manifests, blob encryption, safe loading."""

import dataclasses
import datetime as dt
import hashlib
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgespeed.errors import (
    EdgeSpeedError,
    MissingDependencyError,
    ProtocolError,
    ReplayError,
    RollbackError,
    SealError,
    SecurityError,
    SignatureError,
    UnknownPeerError,
    UnsafeFileError,
)
from edgespeed.protocol.envelope import pack_message
from edgespeed.protocol.messages import BlobInfo, Chunk, MessageKind, ModelManifest, Result, Task
from edgespeed.security import (
    KeyDirectory,
    ReplayGuard,
    Sealer,
    create_ca,
    decrypt_blob,
    encrypt_blob,
    issue_certificate,
    load_weights,
    revoke_certificate,
    revoked_serials,
    sign_manifest,
    verify_manifest,
)
from tests.conftest import Pki

NOW = 1_800_000_000.0
TASK = Task("t-1", 0, "digits", 0, (b"SECRET-INPUT" * 4,))


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def directory(pki: Pki) -> KeyDirectory:
    keys = KeyDirectory(pki.ca.cert_file)
    keys.add_directory(pki.ca.directory)
    return keys


@pytest.fixture
def clock() -> Clock:
    return Clock()


def sealer(pki: Pki, directory: KeyDirectory, name: str, clock: Clock, replay: ReplayGuard | None = None) -> Sealer:
    return Sealer(name, pki.devices[name].seal_key(), directory, replay=replay or ReplayGuard(), clock=clock)


def test_private_keys_are_0600_and_certificates_carry_payload_keys(pki: Pki, directory: KeyDirectory) -> None:
    ident = pki.devices["dev-a"]
    for path in (ident.key_file, ident.seal_key_file, ident.sign_key_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert directory.get("dev-a").role == "device"
    cert = ident.certificate()
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=30, minutes=5)  # short-lived
    assert directory.get("coord").role == "coordinator"


def test_directory_refuses_foreign_expired_and_revoked_certificates(pki: Pki, tmp_path: Path) -> None:
    keys = KeyDirectory(pki.ca.cert_file)
    with pytest.raises(UnknownPeerError) as info:
        keys.add_certificate(pki.foreign_device.cert_file.read_bytes())
    assert info.value.reason == "foreign_ca"
    old = issue_certificate(
        pki.ca, "dev-old", out_dir=tmp_path, days=1, not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)
    )
    with pytest.raises(UnknownPeerError, match="expired"):
        keys.add_certificate(old.cert_file.read_bytes())
    ca = create_ca(tmp_path / "ca2")
    doomed = issue_certificate(ca, "dev-z")
    keys2 = KeyDirectory(ca.cert_file)
    keys2.add_certificate(doomed.cert_file.read_bytes())
    serial = revoke_certificate(ca, doomed.cert_file)
    assert serial in revoked_serials(ca)
    keys2.revoke(serial)
    with pytest.raises(UnknownPeerError):
        keys2.get("dev-z")
    with pytest.raises(UnknownPeerError, match="revoked"):
        KeyDirectory(ca.cert_file, revoked=revoked_serials(ca)).add_certificate(doomed.cert_file.read_bytes())


def test_renewal_keeps_the_keys(pki: Pki, tmp_path: Path) -> None:
    first = issue_certificate(pki.ca, "dev-r", out_dir=tmp_path)
    key_before = first.seal_key_file.read_bytes()
    cert_before = first.certificate()
    renewed = issue_certificate(pki.ca, "dev-r", out_dir=tmp_path, keep_keys=True, days=60)
    assert renewed.seal_key_file.read_bytes() == key_before
    cert_after = renewed.certificate()
    assert cert_after.serial_number != cert_before.serial_number
    assert cert_after.not_valid_after_utc > cert_before.not_valid_after_utc


def test_seal_and_open(pki: Pki, directory: KeyDirectory, clock: Clock) -> None:
    coord, dev = sealer(pki, directory, "coord", clock), sealer(pki, directory, "dev-a", clock)
    payload = coord.seal(TASK, recipient="dev-a")
    assert b"SECRET-INPUT" not in payload
    envelope, message = dev.open(payload, topic_sender="coord")
    assert message == TASK and envelope.sealed and envelope.sender == "coord"
    reply = dev.seal(Result("t-1", 0, (b"SECRET-OUTPUT",)), recipient="coord", correlation_id=envelope.message_id)
    assert coord.open(reply)[1] == Result("t-1", 0, (b"SECRET-OUTPUT",))


def test_every_flipped_bit_is_refused(pki: Pki, directory: KeyDirectory, clock: Clock) -> None:
    coord = sealer(pki, directory, "coord", clock)
    payload = coord.seal(TASK, recipient="dev-a")
    for bit in range(len(payload) * 8):
        dev = sealer(pki, directory, "dev-a", clock)
        forged = bytearray(payload)
        forged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises((SecurityError, ProtocolError)):
            dev.open(bytes(forged))


def test_replay_is_refused_before_and_after_a_restart(
    pki: Pki, directory: KeyDirectory, clock: Clock, tmp_path: Path
) -> None:
    coord = sealer(pki, directory, "coord", clock)
    first, second = coord.seal(TASK, recipient="dev-a"), coord.seal(TASK, recipient="dev-a")
    dev = sealer(pki, directory, "dev-a", clock, ReplayGuard(tmp_path / "replay.db"))
    dev.open(first)
    with pytest.raises(ReplayError):
        dev.open(first)
    restarted = sealer(pki, directory, "dev-a", clock, ReplayGuard(tmp_path / "replay.db"))
    with pytest.raises(ReplayError):
        restarted.open(first)
    restarted.open(second)  # never seen: accepted


def test_out_of_order_within_the_window(pki: Pki, directory: KeyDirectory, clock: Clock) -> None:
    coord, dev = sealer(pki, directory, "coord", clock), sealer(pki, directory, "dev-a", clock)
    payloads = [coord.seal(TASK, recipient="dev-a") for _ in range(10)]
    for p in reversed(payloads):
        dev.open(p)
    with pytest.raises(ReplayError):
        dev.open(payloads[3])


def test_processes_sharing_an_identity_seal_on_their_own_lanes(pki: Pki, directory: KeyDirectory, clock: Clock) -> None:
    # A coordinator and a CLI beside it both seal as "coord"; their sequences interleave.
    main = sealer(pki, directory, "coord", clock)
    cli = Sealer("coord", pki.devices["coord"].seal_key(), directory, replay=None, clock=clock, lane=7)
    dev = sealer(pki, directory, "dev-a", clock)
    late = cli.seal(TASK, recipient="dev-a")
    clock.now += 1  # one second of the main process's traffic: far beyond one lane's window
    for _ in range(100):
        dev.open(main.seal(TASK, recipient="dev-a"))
    dev.open(late)  # its own lane: accepted
    with pytest.raises(ReplayError):
        dev.open(late)
    same_lane = sealer(pki, directory, "coord", clock)
    old = same_lane.seal(TASK, recipient="dev-a")
    clock.now += 1
    dev.open(main.seal(TASK, recipient="dev-a"))
    with pytest.raises(ReplayError, match="below the window"):
        dev.open(old)  # without lanes, the same interleaving is refused


def test_stale_and_future_messages(pki: Pki, directory: KeyDirectory, clock: Clock) -> None:
    coord, dev = sealer(pki, directory, "coord", clock), sealer(pki, directory, "dev-a", clock)
    old = coord.seal(TASK, recipient="dev-a")
    clock.now += 301
    with pytest.raises(ReplayError, match="older"):
        dev.open(old)
    future = coord.seal(TASK, recipient="dev-a")
    clock.now -= 100  # the receiver's clock is 100 s behind the sender's
    with pytest.raises(ReplayError, match="future"):
        dev.open(future)


def test_wrong_recipient_topic_mismatch_unsealed_and_unknown_sender(
    pki: Pki, directory: KeyDirectory, clock: Clock
) -> None:
    coord, dev_b = sealer(pki, directory, "coord", clock), sealer(pki, directory, "dev-b", clock)
    dev_a = sealer(pki, directory, "dev-a", clock)
    with pytest.raises(SealError, match="not for us"):
        dev_b.open(coord.seal(TASK, recipient="dev-a"))
    with pytest.raises(SealError, match="does not match"):
        dev_a.open(coord.seal(TASK, recipient="dev-a"), topic_sender="dev-b")
    plain = pack_message(TASK, sender="coord", recipient="dev-a")
    with pytest.raises(SealError, match="not sealed"):
        dev_a.open(plain)
    chunk = pack_message(Chunk("b", 0, b"x", hashlib.sha256(b"x").digest()), sender="coord")
    assert isinstance(dev_a.open(chunk, allow_plain={MessageKind.CHUNK})[1], Chunk)
    stranger = Sealer("dev-x", pki.devices["dev-a"].seal_key(), directory, replay=None, clock=clock)
    with pytest.raises(UnknownPeerError):
        dev_a.open(stranger.seal(TASK, recipient="dev-a"))


def test_a_sender_cannot_be_impersonated(pki: Pki, directory: KeyDirectory, clock: Clock) -> None:
    """dev-b seals with its own key but names coord as the sender: the key does not match."""
    impostor = Sealer("coord", pki.devices["dev-b"].seal_key(), directory, replay=None, clock=clock)
    with pytest.raises(SealError, match="failed authentication"):
        sealer(pki, directory, "dev-a", clock).open(impostor.seal(TASK, recipient="dev-a"))


def test_keys_rotate_across_epochs(pki: Pki, directory: KeyDirectory, clock: Clock) -> None:
    coord = Sealer("coord", pki.devices["coord"].seal_key(), directory, replay=None, clock=clock, rotation=60)
    dev = Sealer(
        "dev-a", pki.devices["dev-a"].seal_key(), directory, replay=None, clock=clock, rotation=60, max_age=1000
    )
    early = coord.seal(TASK, recipient="dev-a")
    clock.now += 60
    dev.open(early)  # the previous epoch is still accepted
    clock.now += 120
    with pytest.raises(SealError, match="epoch"):
        dev.open(early)


@pytest.mark.fuzz
@given(st.binary(max_size=300))
def test_sealed_open_survives_garbage(data: bytes) -> None:
    from cryptography.hazmat.primitives.asymmetric import x25519

    keys = KeyDirectory.__new__(KeyDirectory)
    keys._peers = {}  # no peers: nothing can authenticate
    keys._clock = lambda: dt.datetime.now(dt.timezone.utc)
    opener = Sealer("dev-a", x25519.X25519PrivateKey.generate(), keys, replay=None)
    try:
        opener.open(data)
    except EdgeSpeedError:
        pass


def test_content_key_wrapping(pki: Pki, directory: KeyDirectory, clock: Clock) -> None:
    coord = sealer(pki, directory, "coord", clock)
    key = os.urandom(32)
    wrapped = coord.wrap_key(key, ["dev-a", "dev-b"], context="digits/3")
    assert sealer(pki, directory, "dev-a", clock).unwrap_key("coord", wrapped["dev-a"], context="digits/3") == key
    with pytest.raises(SealError):
        sealer(pki, directory, "dev-a", clock).unwrap_key("coord", wrapped["dev-b"], context="digits/3")
    with pytest.raises(SealError):
        sealer(pki, directory, "dev-a", clock).unwrap_key("coord", wrapped["dev-a"], context="digits/2")


def test_blob_encryption_round_trip_and_tamper(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    ciphertext, key = encrypt_blob(data, blob_id="w", chunk_size=1000)
    assert len(ciphertext) == 10_000 + 10 * 16
    path = tmp_path / "w.enc"
    path.write_bytes(ciphertext)
    assert decrypt_blob(path, key, blob_id="w", chunk_size=1000) == data
    for mutate in (
        lambda b: b[:1016] + b[2032:3048] + b[1016:2032] + b[3048:],  # reordered chunks
        lambda b: b[:-1016],  # dropped last chunk
        lambda b: b[:500] + bytes([b[500] ^ 1]) + b[501:],
    ):  # flipped bit
        path.write_bytes(mutate(ciphertext))
        with pytest.raises(SealError):
            decrypt_blob(path, key, blob_id="w", chunk_size=1000)


def _manifest() -> ModelManifest:
    return ModelManifest(
        "digits", 3, "onnx", (BlobInfo("digits.onnx", 10, bytes(32), 1024),), keys={"dev-a": b"k" * 64}
    )


def test_manifest_signatures(pki: Pki, directory: KeyDirectory) -> None:
    signed = sign_manifest(_manifest(), signer="coord", key=pki.devices["coord"].sign_key())
    verify_manifest(signed, directory, installed_version=2)
    with pytest.raises(SignatureError, match="not signed"):
        verify_manifest(_manifest(), directory)
    with pytest.raises(SignatureError, match="bad signature"):
        verify_manifest(dataclasses.replace(signed, version=4), directory)
    tampered_shard = dataclasses.replace(signed.shards[0], size=11)
    with pytest.raises(SignatureError):
        verify_manifest(dataclasses.replace(signed, shards=(tampered_shard,)), directory)
    by_device = sign_manifest(_manifest(), signer="dev-a", key=pki.devices["dev-a"].sign_key())
    with pytest.raises(SignatureError, match="may not sign"):
        verify_manifest(by_device, directory)
    with pytest.raises(RollbackError):
        verify_manifest(signed, directory, installed_version=3)


class Canary:
    path = ""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.path}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_pickle_checkpoints_never_run(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    Canary.path = str(canary)
    evil = np.array([Canary()], dtype=object)
    np.save(tmp_path / "evil.npy", evil, allow_pickle=True)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"w": Canary()}))
    np.savez(tmp_path / "evil.npz", w=evil)
    for name in ("evil.npy", "evil.npz"):
        with pytest.raises(UnsafeFileError):
            load_weights(tmp_path / name)
    import importlib.util

    expected = UnsafeFileError if importlib.util.find_spec("torch") else MissingDependencyError
    with pytest.raises(expected):
        load_weights(tmp_path / "evil.pt")  # torch.load(weights_only=True) refuses the reduce call
    assert not canary.exists()
    np.savez(tmp_path / "good.npz", w=np.ones(3))
    assert load_weights(tmp_path / "good.npz")["w"].tolist() == [1, 1, 1]
    with pytest.raises(UnsafeFileError, match="limit"):
        load_weights(tmp_path / "good.npz", max_bytes=10)


def test_safetensors_weights_load(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(tmp_path / "m.safetensors"))
    loaded = load_weights(tmp_path / "m.safetensors")
    assert loaded["w"].shape == (2, 3) and loaded["w"][1, 2] == 5
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(UnsafeFileError):
        load_weights(tmp_path / "bad.safetensors")


def test_per_peer_rate_limits_hold_each_peer_to_its_allowance_and_forget_the_oldest() -> None:
    from edgespeed.security.ratelimit import PeerLimiter

    now = [0.0]
    limits = PeerLimiter(rate=10, burst=5, max_peers=2, clock=lambda: now[0])
    assert [limits.allow("dev-a") for _ in range(7)] == [True] * 5 + [False] * 2  # the burst, then nothing
    assert limits.allow("dev-b")  # another peer has its own allowance
    now[0] += 0.2  # two more tokens for dev-a, at 10 a second
    assert [limits.allow("dev-a") for _ in range(3)] == [True, True, False]
    assert limits.refused == 3
    limits.allow("dev-c")  # a third peer: the least recently seen (dev-b) is forgotten
    assert set(limits._buckets) == {"dev-a", "dev-c"}


def test_a_revoked_peer_is_refused_at_once_even_with_its_key_cached(pki) -> None:  # type: ignore[no-untyped-def]
    """Pairwise keys are cached; before, a peer revoked after its key was cached could still seal and open."""
    from edgespeed.errors import UnknownPeerError
    from edgespeed.protocol.messages import Heartbeat
    from edgespeed.security import KeyDirectory, Sealer

    def sealer(name: str) -> tuple[Sealer, KeyDirectory]:
        keys = KeyDirectory(pki.ca.cert_file)
        keys.add_directory(pki.ca.directory)
        return Sealer(name, pki.devices[name].seal_key(), keys, replay=None), keys

    coord, coord_keys = sealer("coord")
    rogue, _ = sealer("dev-c")
    beat = Heartbeat(1, 0.0, 0)
    coord.open(rogue.seal(beat, recipient="coord"))  # both pairwise keys are cached now
    coord.seal(beat, recipient="dev-c")
    coord_keys.revoke(pki.devices["dev-c"].certificate().serial_number)
    with pytest.raises(UnknownPeerError):
        coord.open(rogue.seal(beat, recipient="coord"))
    with pytest.raises(UnknownPeerError):
        coord.seal(beat, recipient="dev-c")
