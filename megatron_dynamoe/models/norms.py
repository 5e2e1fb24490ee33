"""Torch LayerNorm / RMSNorm usable with Megatron sequence parallelism.

Megatron-Core's fallback norm (`WrappedTorchNorm`, used when neither Transformer Engine nor
Apex is installed) refuses `sequence_parallel=True`. Sequence parallelism needs nothing
special from a norm except that its parameters are tagged `sequence_parallel`, so that
Megatron's `finalize_model_grads` all-reduces their gradients over the TP group (each TP
rank saw only its slice of the sequence). That is what this module provides; it is chosen
by our layer specs when neither TE nor Apex is available, on CPU and GPU alike.
"""

from __future__ import annotations

import torch

from megatron.core.transformer.transformer_config import TransformerConfig


class SequenceParallelTorchNorm:
    """Factory with the signature Megatron's layer specs expect for a norm module.

    Returns a `torch.nn.LayerNorm` or `torch.nn.RMSNorm` (per `config.normalization`) whose
    parameters carry `sequence_parallel = config.sequence_parallel`.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma needs Transformer Engine or Apex")
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"unsupported normalization {config.normalization!r}: "
                             f"use 'LayerNorm' or 'RMSNorm'")
        norm.to(dtype=config.params_dtype)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)
        return norm
