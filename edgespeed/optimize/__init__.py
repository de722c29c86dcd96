"""Model tooling: splitting models into shards, and planning where each shard runs."""

from edgespeed.optimize.planner import Link, Plan, StagePlan, plan
from edgespeed.optimize.split import Boundary, Segment, boundaries, profile_onnx, sample_inputs, split_onnx, split_torch

__all__ = [
    "Boundary",
    "Link",
    "Plan",
    "Segment",
    "StagePlan",
    "boundaries",
    "plan",
    "profile_onnx",
    "sample_inputs",
    "split_onnx",
    "split_torch",
]
