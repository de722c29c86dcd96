"""Declarative pre- and post-processing carried in model manifests."""

from edgespeed.pipeline.steps import Argmax, Cast, Normalize, Pipeline, Reshape, Scale, Softmax, Step, TopK, Transpose

__all__ = ["Argmax", "Cast", "Normalize", "Pipeline", "Reshape", "Scale", "Softmax", "Step", "TopK", "Transpose"]
