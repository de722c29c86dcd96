"""The layers hold: each part of the package imports only the parts below it (the README draws them)."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "edgespeed"

_BASE = {"errors", "_compat", "_config"}
# What each part may import, besides itself. The two roles (agent, coordinator) meet only on the wire.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "_compat": set(),
    "_config": {"errors"},
    "protocol": {"errors"},
    "security": _BASE | {"protocol"},
    "transport": _BASE | {"protocol"},
    "transfer": _BASE | {"protocol", "security", "transport"},
    "engine": _BASE,
    "optimize": _BASE,
    "pipeline": _BASE | {"protocol"},
    "hardware": _BASE | {"engine", "protocol"},
    "agent": _BASE | {"protocol", "security", "transport", "transfer", "engine", "pipeline", "hardware"},
    "coordinator": _BASE | {"protocol", "security", "transport", "transfer", "optimize", "pipeline"},
}


def imports_of(part: str) -> set[str]:
    found: set[str] = set()
    path = PACKAGE / part
    for file in [path.with_suffix(".py")] if not path.is_dir() else path.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                pieces = name.split(".")
                if pieces[0] == "edgespeed" and len(pieces) > 1 and pieces[1] != part:
                    found.add(pieces[1])
    return found


def test_each_part_imports_only_the_layers_below_it() -> None:
    wrong = {part: sorted(imports_of(part) - allowed) for part, allowed in ALLOWED.items()}
    assert not {part: names for part, names in wrong.items() if names}


def test_every_part_of_the_package_has_a_place_in_the_layers() -> None:
    parts = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    # Above the layers: what runs the roles (the CLI, the demo, the benchmarks, the test harness).
    assert parts - set(ALLOWED) - {"__init__", "__main__", "cli", "demo", "bench", "testing"} == set()


def test_importing_the_wire_format_loads_no_transport() -> None:
    code = (
        "import edgespeed.protocol, sys; "
        "print(sorted(m for m in sys.modules if m.startswith(('paho', 'edgespeed.transport'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
