"""The coordinator: registry, placement, dispatch and aggregation on a durable ledger."""

from edgespeed.coordinator.config import CoordinatorConfig
from edgespeed.coordinator.ledger import Ledger, PostgresLedger, SqliteLedger, TaskRecord, TaskState
from edgespeed.coordinator.registry import DeviceInfo, DeviceStatus, Registry
from edgespeed.coordinator.service import Coordinator, RolloutReport, TaskHandle, open_ledger
from edgespeed.coordinator.sync import SyncCoordinator

__all__ = [
    "Coordinator",
    "CoordinatorConfig",
    "DeviceInfo",
    "DeviceStatus",
    "Ledger",
    "PostgresLedger",
    "Registry",
    "RolloutReport",
    "SqliteLedger",
    "SyncCoordinator",
    "TaskHandle",
    "TaskRecord",
    "TaskState",
    "open_ledger",
]
