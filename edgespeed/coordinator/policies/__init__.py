"""Placement policies, one per file; anything with a `Policy.choose` method works."""

from edgespeed.coordinator.policies.base import Policy
from edgespeed.coordinator.policies.capability import Requirements, capable
from edgespeed.coordinator.policies.least_loaded import LeastLoaded
from edgespeed.coordinator.policies.pinned import Pinned
from edgespeed.coordinator.policies.round_robin import RoundRobin

__all__ = ["LeastLoaded", "Pinned", "Policy", "Requirements", "RoundRobin", "capable"]
