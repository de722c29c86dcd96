"""The device agent: the program that runs on every gateway."""

from edgespeed.agent.config import AgentConfig
from edgespeed.agent.device import Device
from edgespeed.agent.supervisor import PartFailedError

__all__ = ["AgentConfig", "Device", "PartFailedError"]
