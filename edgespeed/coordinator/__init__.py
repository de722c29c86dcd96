"""The coordinator. So far: its durable ledger, the device registry and placement policies."""

from edgespeed.coordinator.ledger import Ledger, PostgresLedger, SqliteLedger, TaskRecord, TaskState
from edgespeed.coordinator.registry import DeviceInfo, DeviceStatus, Registry

__all__ = [
    "DeviceInfo",
    "DeviceStatus",
    "Ledger",
    "PostgresLedger",
    "Registry",
    "SqliteLedger",
    "TaskRecord",
    "TaskState",
]
