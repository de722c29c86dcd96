"""Model tooling: splitting models into shards, and planning where each shard runs."""

from edgespeed.optimize.planner import Link, Plan, StagePlan, plan
from edgespeed.optimize.split import (
    Boundary,
    Segment,
    boundaries,
    onnx_outputs,
    profile_onnx,
    sample_inputs,
    split_onnx,
    split_torch,
)

__all__ = [
    "Boundary",
    "Link",
    "Plan",
    "Segment",
    "StagePlan",
    "boundaries",
    "onnx_outputs",
    "plan",
    "profile_onnx",
    "sample_inputs",
    "split_onnx",
    "split_torch",
]
