import hashlib
import os
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgespeed.errors import BlobError, ConfigError
from edgespeed.protocol.blob import BlobAssembler, BlobSource
from edgespeed.protocol.messages import BlobInfo, Chunk, ChunkRequest

DATA = os.urandom(10_000)


def serve(source: BlobSource, asm: BlobAssembler, *, shuffle: bool = False, limit: int | None = None) -> int:
    sent = 0
    clock = 0.0
    while not asm.done and (limit is None or sent < limit):
        clock += 10.0  # every round is past the request timeout, as after a lost connection
        reqs = asm.requests(now=clock, timeout=5.0)
        if shuffle:
            random.Random(sent).shuffle(reqs)
        for r in reqs:
            asm.accept(source.chunk(r))
            sent += 1
    return sent


def test_in_order_and_out_of_order_transfers(tmp_path: Path) -> None:
    source = BlobSource("b", DATA, chunk_size=1000)
    for i, shuffle in enumerate((False, True)):
        asm = BlobAssembler(source.info, tmp_path / f"out{i}", window=4)
        assert serve(source, asm, shuffle=shuffle) == 10
        assert asm.finish().read_bytes() == DATA
        assert not asm.part.exists()


def test_file_source_and_empty_blob(tmp_path: Path) -> None:
    path = tmp_path / "src"
    path.write_bytes(DATA)
    source = BlobSource("file", path, chunk_size=3000)
    assert source.info.sha256 == hashlib.sha256(DATA).digest()
    asm = BlobAssembler(source.info, tmp_path / "copy")
    serve(source, asm)
    assert asm.finish().read_bytes() == DATA
    source.close()
    empty = BlobSource("empty", b"")
    asm = BlobAssembler(empty.info, tmp_path / "empty")
    assert asm.done and asm.requests() == []
    assert asm.finish().read_bytes() == b""


def test_resume_from_a_partial_file(tmp_path: Path) -> None:
    source = BlobSource("b", DATA, chunk_size=1000)
    first = BlobAssembler(source.info, tmp_path / "out", window=2)
    serve(source, first, limit=4)
    first.close()
    with open(first.part, "ab") as f:
        f.write(b"half a chunk")  # a crash mid-write leaves a torn tail
    second = BlobAssembler(source.info, tmp_path / "out", window=2)
    assert second.resumed_from == 4000
    assert min(r.offset for r in second.requests(now=0.0)) == 4000
    serve(source, second)
    assert second.finish().read_bytes() == DATA


def test_duplicates_and_unrequested_chunks_are_ignored(tmp_path: Path) -> None:
    source = BlobSource("b", DATA, chunk_size=1000)
    asm = BlobAssembler(source.info, tmp_path / "out", window=2)
    (r0, r1) = asm.requests(now=0.0)
    assert asm.accept(source.chunk(r0))
    assert not asm.accept(source.chunk(r0))
    assert not asm.accept(source.chunk(ChunkRequest("b", 5000, 1000)))
    assert asm.accept(source.chunk(r1))


def test_expired_requests_are_sent_again(tmp_path: Path) -> None:
    source = BlobSource("b", DATA, chunk_size=1000)
    asm = BlobAssembler(source.info, tmp_path / "out", window=3)
    first = asm.requests(now=0.0, timeout=5)
    assert asm.requests(now=1.0, timeout=5) == []
    assert asm.requests(now=6.0, timeout=5) == first
    assert asm.next_deadline(5) == 11.0


def test_bad_chunk_is_asked_for_again_then_gives_up(tmp_path: Path) -> None:
    source = BlobSource("b", DATA, chunk_size=1000)
    asm = BlobAssembler(source.info, tmp_path / "out", window=1, max_bad_chunks=2)
    (req,) = asm.requests(now=0.0)
    good = source.chunk(req)
    forged = Chunk("b", 0, b"x" * 1000, good.sha256)
    assert not asm.accept(forged)
    assert asm.requests(now=0.0) == [req]
    assert not asm.accept(forged)
    with pytest.raises(BlobError) as info:
        asm.accept(forged)
    assert info.value.reason == "chunk_hash"


def test_whole_blob_hash_mismatch_removes_the_partial_file(tmp_path: Path) -> None:
    source = BlobSource("b", DATA, chunk_size=1000)
    lying = BlobInfo("b", len(DATA), hashlib.sha256(b"other").digest(), 1000)
    asm = BlobAssembler(lying, tmp_path / "out")
    serve(source, asm)
    with pytest.raises(BlobError) as info:
        asm.finish()
    assert info.value.reason == "blob_hash"
    assert not asm.part.exists() and not (tmp_path / "out").exists()


def test_bad_offsets_and_foreign_blobs(tmp_path: Path) -> None:
    source = BlobSource("b", DATA, chunk_size=1000)
    asm = BlobAssembler(source.info, tmp_path / "out")
    for chunk in (
        Chunk("b", 1, b"x", hashlib.sha256(b"x").digest()),
        Chunk("b", 10_000, b"x", hashlib.sha256(b"x").digest()),
        Chunk("c", 0, b"x", hashlib.sha256(b"x").digest()),
    ):
        with pytest.raises(BlobError):
            asm.accept(chunk)
    for request in (ChunkRequest("b", 10_000, 10), ChunkRequest("b", 0, 1001), ChunkRequest("c", 0, 10)):
        with pytest.raises(BlobError):
            source.chunk(request)
    with pytest.raises(BlobError):
        asm.finish()


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "a..b", "x" * 200])
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(BlobError):
        BlobSource(name, b"x")


def test_bad_settings() -> None:
    with pytest.raises(ConfigError):
        BlobSource("b", b"x", chunk_size=0)


@pytest.mark.fuzz
@given(
    offset=st.integers(0, 2**64 - 1),
    data=st.binary(max_size=1500),
    digest=st.binary(min_size=32, max_size=32),
    blob_id=st.sampled_from(["b", "c"]),
)
def test_assembler_survives_arbitrary_chunks(
    tmp_path_factory,
    offset: int,
    data: bytes,
    digest: bytes,  # type: ignore[no-untyped-def]
    blob_id: str,
) -> None:
    source = BlobSource("b", DATA, chunk_size=1000)
    asm = BlobAssembler(source.info, tmp_path_factory.mktemp("fuzz") / "out", window=4)
    asm.requests(now=0.0)
    try:
        asm.accept(Chunk(blob_id, offset, data, digest))
    except BlobError:
        pass
    finally:
        asm.close()
    assert asm.committed in (0, 1000)
