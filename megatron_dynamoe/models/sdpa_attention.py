"""Core attention on `torch.nn.functional.scaled_dot_product_attention` (`--attention-backend
sdpa`).

Megatron-Core's local `DotProductAttention` materialises the [b, heads, s, s] scores and their
softmax: at 4096 tokens that is the largest activation of the layer and the slowest kernel,
and without Transformer Engine Megatron has no flash attention. PyTorch's SDPA dispatches to
flash / memory-efficient kernels on GPUs (and to a fused kernel on CPU), keeping O(s) memory.
This module is a drop-in `core_attention` for Megatron's `SelfAttention` (same constructor,
same forward contract, same output layout [sq, b, heads_per_partition * head_dim]); it has
no parameters, so checkpoints do not change.

Masks follow Megatron's semantics: a given `attention_mask` (bool, True = masked out) is
honoured exactly; without one a causal layer is causal (`is_causal`, the flash path) and a
no-mask layer attends everywhere. Grouped-query attention shares each key/value head among
its query heads without copying them on the causal path (`enable_gqa`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

FIX = "pass --attention-backend local"


def sdpa_unsupported(config: TransformerConfig, layer_number: int) -> Optional[str]:
    """Why SDPA cannot stand in for DotProductAttention under `config` (None when it can):
    a softmax offset, sliding-window layers and context parallelism are Megatron features
    this module does not reproduce."""
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        return f"softmax_type {config.softmax_type!r} (only 'vanilla')"
    if is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                 layer_number):
        return "sliding-window attention"
    if config.context_parallel_size != 1:
        return "context parallelism"
    return None


class SDPAttention(MegatronModule):
    """Megatron's core attention (`DotProductAttention`'s contract) computed by
    `scaled_dot_product_attention`. query [sq, b, np, hn], key / value [sk, b, ng, hn] (np
    heads and ng query groups of this TP rank) -> context [sq, b, np * hn]."""

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        reason = sdpa_unsupported(config, layer_number)
        if reason is not None:
            raise ValueError(f"the sdpa attention backend does not support {reason}: {FIX}")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        projection = config.kv_channels * config.num_attention_heads
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups, tp)
        self.hidden_per_partition = divide(projection, tp)
        head_dim = divide(projection, config.num_attention_heads)
        # Megatron's query-key layer scaling divides the scale by the layer number and
        # multiplies the scores back before the softmax (an fp16 range trick): the product is
        # the plain scale, which SDPA applies in its own precision.
        self.softmax_scale = (1.0 / math.sqrt(head_dim) if softmax_scale is None
                              else softmax_scale)
        self.dropout_p = (config.attention_dropout if attention_dropout is None
                          else attention_dropout)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor],
                attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None,
                packed_seq_params=None) -> torch.Tensor:
        """Context [sq, b, np * hn] of query [sq, b, np, hn] over key / value [sk, b, ng, hn];
        `attention_mask` bool [b or 1, 1, sq, sk], True = masked out (Megatron's)."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError(f"packed sequences and attention bias need Transformer Engine "
                             f"attention: {FIX} or --transformer-impl transformer_engine")
        sq, b = query.shape[0], query.shape[1]
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        repeat = self.heads_per_partition // self.groups_per_partition
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        kwargs = {}
        if attention_mask is not None:
            # The memory-efficient kernel takes a mask but not shared key / value heads.
            if repeat > 1:
                k = k.repeat_interleave(repeat, dim=1)
                v = v.repeat_interleave(repeat, dim=1)
            kwargs["attn_mask"] = ~attention_mask
        else:
            if mask_type == AttnMaskType.causal and sq > 1:
                if sq != k.shape[2]:
                    raise ValueError(f"causal attention of {sq} queries over {k.shape[2]} keys "
                                     f"needs an explicit attention_mask")
                kwargs["is_causal"] = True
            if repeat > 1:
                kwargs["enable_gqa"] = True
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # As Megatron: attention dropout differs across TP ranks (their heads differ).
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p,
                                                         scale=self.softmax_scale, **kwargs)
        else:
            context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p,
                                                     scale=self.softmax_scale, **kwargs)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_per_partition)
