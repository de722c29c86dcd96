"""EdgeSpeed: a secure compute fabric for ML on heterogeneous edge devices, over MQTT."""

from edgespeed.errors import EdgeSpeedError

__version__ = "0.1.0"

__all__ = ["EdgeSpeedError", "__version__"]
