"""The benchmark suite's plumbing: goals, the JSON shape, the command. (Speed itself is never asserted.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgespeed.bench._fleet import entry, meets
from edgespeed.bench.suite import ENTRIES, plot

FIELDS = {"name", "ours", "baseline", "unit", "ratio", "ratio_kind", "goal", "meets"}


def test_goals_are_parsed_and_applied_to_the_ratio_or_the_absolute_value() -> None:
    assert meets("<= 1.5", 1.5) and not meets("<= 1.5", 1.51)
    assert meets(">= 0.7, and resumes after a cut", 0.71) and not meets(">= 0.7", 0.5)
    with pytest.raises(ValueError):
        meets("fast", 1.0)
    rtt = entry("rtt", 0.6, 0.4, "ms", "<= 1.5", higher_is_better=False)
    assert rtt["ratio"] == 1.5 and rtt["meets"] and "lower is better" in rtt["ratio_kind"]
    rss = entry("agent-rss", 68.0, None, "MB", "<= 60", higher_is_better=False, absolute=True)
    assert rss["ratio"] is None and not rss["meets"] and rss["ratio_kind"].startswith("absolute")


def test_every_benchmark_of_the_spec_has_an_entry() -> None:
    for name in ("rtt", "throughput", "tensor", "rollout", "seal", "backend", "split", "agent-rss"):
        assert name in ENTRIES


@pytest.mark.mosquitto
def test_the_command_runs_an_entry_and_writes_json_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "results" / "out.json"
    result = subprocess.run(
        [sys.executable, "-m", "edgespeed", "bench", "--quick", "--only", "seal", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    assert data["machine"]["cpu_count"] >= 1
    names = [r["name"] for r in data["results"]]
    assert names == ["seal"]  # --only keeps the entries asked for
    [seal] = data["results"]
    assert seal.keys() >= FIELDS and seal["ours"] > 0 and seal["baseline"] > 0
    assert seal["meets"] == (seal["ratio"] >= 0.9)

    unknown = subprocess.run(
        [sys.executable, "-m", "edgespeed", "bench", "--only", "warp"], capture_output=True, text=True, timeout=60
    )
    assert unknown.returncode == 1 and "unknown benchmark warp" in unknown.stdout


def test_plots_are_written_from_results(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    results = [
        {"name": "rtt", "samples_ms": {"ours": [1.0, 1.2, 0.9], "baseline": [0.4, 0.5, 0.3]}},
        {"name": "tensor", "goodput_by_size": {"bytes": [1024, 65536], "ours": [1.0, 40.0], "baseline": [3.0, 150.0]}},
    ]
    written = plot(results, tmp_path)
    assert [p.name for p in written] == ["rtt-latency.png", "goodput-by-size.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)
