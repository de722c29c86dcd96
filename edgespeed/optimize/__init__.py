"""Model tooling: splitting models into shards and planning where each shard runs; quantising (int8,
fp16), pruning and fusing them, each measured (`OptimizeReport`); and the variants a fleet chooses from."""

from edgespeed.optimize.data import Samples, read_samples
from edgespeed.optimize.fusion import fuse
from edgespeed.optimize.planner import Link, Plan, StagePlan, plan
from edgespeed.optimize.pruning import prune, prune_channels
from edgespeed.optimize.quantization import quantize, quantize_shards
from edgespeed.optimize.report import Facts, OptimizeReport, count_flops
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
from edgespeed.optimize.variants import PRECISIONS, make_variants, precision_of

__all__ = [
    "Boundary",
    "Facts",
    "Link",
    "OptimizeReport",
    "PRECISIONS",
    "Plan",
    "Samples",
    "Segment",
    "StagePlan",
    "boundaries",
    "count_flops",
    "fuse",
    "make_variants",
    "onnx_outputs",
    "plan",
    "precision_of",
    "profile_onnx",
    "prune",
    "prune_channels",
    "quantize",
    "quantize_shards",
    "read_samples",
    "sample_inputs",
    "split_onnx",
    "split_torch",
]
