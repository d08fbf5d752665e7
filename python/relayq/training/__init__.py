"""Quantization-aware fine-tuning: a trainable torch twin of the annotated graph and its training loop.

torch is optional: everything here imports it on use and raises
:class:`~relayq.errors.MissingDependencyError` without it. The public entry point is
:func:`relayq.finetune`.
"""
from .finetune import DISTILL_LOSSES, FinetuneResult, finetune_graph
from .graph import OPS, build_torch_graph, require_torch

__all__ = ["finetune_graph", "FinetuneResult", "DISTILL_LOSSES", "build_torch_graph", "OPS", "require_torch"]
