"""The examples in examples/ run as documented."""

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_pubsub_example() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "pubsub.py")], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "dev-1 -> coord: task-1" in out


def test_blob_transfer_example(tmp_path: Path) -> None:
    src = tmp_path / "payload"
    src.write_bytes(bytes(range(256)) * 5000)
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "blob_transfer.py"), str(src)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    copy = Path(out.rsplit("verified copy at ", 1)[1].strip())
    assert copy.read_bytes() == src.read_bytes()
