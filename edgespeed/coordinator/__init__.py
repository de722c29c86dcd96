"""The coordinator. So far: its durable ledger (placement, dispatch and the API come next)."""

from edgespeed.coordinator.ledger import Ledger, PostgresLedger, SqliteLedger, TaskRecord, TaskState

__all__ = ["Ledger", "PostgresLedger", "SqliteLedger", "TaskRecord", "TaskState"]
