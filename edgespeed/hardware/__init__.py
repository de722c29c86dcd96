"""Device abstraction: what a device is, and the card it announces."""

from edgespeed.hardware.detect import (
    Accelerator,
    cpu_info,
    detect_cuda,
    detect_npu,
    device_card,
    litert_available,
    onnx_providers,
    onnx_runtime_build,
)

__all__ = [
    "Accelerator",
    "cpu_info",
    "detect_cuda",
    "detect_npu",
    "device_card",
    "litert_available",
    "onnx_providers",
    "onnx_runtime_build",
]
