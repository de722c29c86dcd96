"""What this device is and has: CPU, memory, CUDA GPUs, Ascend NPUs, runtimes, int8 dot-product
instructions, and so the model precision it prefers.

Cheap facts (architecture, cores, memory, which runtimes are installed) need
no heavy import. Counting GPUs or NPUs imports torch or torch_npu, and listing
onnxruntime's providers imports it, so those happen only when asked
(``probe_accelerators=True``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass

from edgespeed import __version__
from edgespeed.engine.registry import available_backends
from edgespeed.protocol.messages import DeviceCard

__all__ = [
    "Accelerator",
    "cpu_info",
    "detect_cuda",
    "detect_npu",
    "device_card",
    "int8_dot_product",
    "litert_available",
    "onnx_providers",
    "onnx_runtime_build",
    "preferred_precisions",
]

# CPU flags (as /proc/cpuinfo lists them) of instructions that multiply-accumulate int8 in one step:
# x86 VNNI (AVX-512 and AVX) and AMX, ARM's dot product (asimddp) and int8 matrix multiply (i8mm).
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


@dataclass(frozen=True, slots=True)
class Accelerator:
    """One accelerator: ``kind`` (cuda, npu), index, name and memory."""

    kind: str
    index: int
    name: str
    memory_bytes: int

    def label(self) -> str:
        """Short form for the device card, e.g. ``cuda:0 NVIDIA H100 (80 GiB)``."""
        return f"{self.kind}:{self.index} {self.name} ({self.memory_bytes / 2**30:.0f} GiB)"


def _memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def cpu_info() -> dict[str, str | int]:
    """Architecture, OS, logical cores usable by this process, physical memory."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return {
        "arch": platform.machine() or "unknown",
        "os": platform.system().lower() or "unknown",
        "cores": cores,
        "memory_bytes": _memory_bytes(),
    }


def int8_dot_product(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The int8 dot-product instructions this CPU has (`INT8_DOT_FLAGS` found in /proc/cpuinfo's flags)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read(1 << 20)
        except OSError:
            return ()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return tuple(flag for flag in INT8_DOT_FLAGS if flag in flags)


def preferred_precisions(accelerators: Sequence[str] = ("cpu",), dot_product: Sequence[str] = ()) -> tuple[str, ...]:
    """Which model variant a device should run, best first, from its hardware.

    fp16 first where a GPU or NPU is present (``cuda:``/``npu:`` accelerators); int8 first on a CPU
    with int8 dot-product instructions (VNNI, ARM dot product); otherwise fp32 first: without them
    ONNX Runtime's x86 int8 kernels can saturate (its own documentation's warning) and gain little.
    A device's ``precisions`` setting overrides this.
    """
    if any(a.split(":", 1)[0] in ("cuda", "npu") for a in accelerators):
        return ("fp16", "fp32", "int8")
    if dot_product:
        return ("int8", "fp32", "fp16")
    return ("fp32", "int8", "fp16")


def detect_cuda() -> list[Accelerator]:
    """CUDA GPUs that torch can use (imports torch; empty without it)."""
    if importlib.util.find_spec("torch") is None:
        return []
    torch = importlib.import_module("torch")
    if not torch.cuda.is_available():
        return []
    found = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        found.append(Accelerator("cuda", i, props.name, int(props.total_memory)))
    return found


def detect_npu() -> list[Accelerator]:
    """Ascend NPUs that torch_npu can use (imports it; empty without it)."""
    if importlib.util.find_spec("torch_npu") is None:
        return []
    try:
        importlib.import_module("torch_npu")
        torch = importlib.import_module("torch")
        count = int(torch.npu.device_count()) if torch.npu.is_available() else 0
    except Exception:  # a broken CANN install must not stop the agent; it just has no NPU
        return []
    return [Accelerator("npu", i, str(torch.npu.get_device_name(i)), 0) for i in range(count)]


def onnx_providers() -> list[str]:
    """Execution providers of the installed onnxruntime (imports it; empty without it)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return []
    return list(importlib.import_module("onnxruntime").get_available_providers())


def onnx_runtime_build() -> str:
    """Which onnxruntime distribution is installed (``onnxruntime-gpu 1.20.0``...), without importing it.

    The build names its providers (GPU, OpenVINO, CANN, ...) and importing
    onnxruntime costs an idle agent about 20 MB.
    """
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        is_runtime = name == "onnxruntime" or name.startswith(("onnxruntime-", "onnxruntime_"))
        if is_runtime and name not in ("onnxruntime-extensions", "onnxruntime-tools"):
            return f"{name} {dist.version}"
    return ""


def litert_available() -> bool:
    """Whether a LiteRT/TFLite interpreter is installed."""
    return any(importlib.util.find_spec(m) is not None for m in ("ai_edge_litert", "tflite_runtime"))


def device_card(device_id: str, *, probe_accelerators: bool = False) -> DeviceCard:
    """The card a device announces in its birth."""
    cpu = cpu_info()
    accelerators = ["cpu"]
    if probe_accelerators:
        accelerators += [a.label() for a in (*detect_cuda(), *detect_npu())]
    extra = {"python": platform.python_version()}
    build = onnx_runtime_build()
    if build:
        extra["onnxruntime"] = build
    if probe_accelerators and build:
        extra["onnx_providers"] = ",".join(onnx_providers())
    if litert_available():
        extra["litert"] = "yes"
    dot = int8_dot_product()
    if dot:
        extra["int8_dot"] = ",".join(dot)
    extra["precisions"] = ",".join(preferred_precisions(accelerators, dot))
    return DeviceCard(
        device_id=device_id,
        arch=str(cpu["arch"]),
        os=str(cpu["os"]),
        software_version=__version__,
        cpu_cores=int(cpu["cores"]),
        memory_bytes=int(cpu["memory_bytes"]),
        backends=tuple(available_backends()),
        accelerators=tuple(accelerators),
        extra=extra,
    )
