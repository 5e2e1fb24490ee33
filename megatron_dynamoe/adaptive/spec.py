"""Layer specs of adaptive-gating MoE models.

The MoE layer is Megatron's own MoE layer spec (`MoELayer` + `SequentialMLP` experts, same
attention, norms and checkpoint key map as the dense spec) with only the router swapped for
`AdaptiveRouter`, so the dispatch path is exactly Megatron's (and the DynaMoE layer's).
Layers and blocks are built by the DynaMoE spec module's `moe_layer_spec` / `stage_block_spec`.
"""

from __future__ import annotations

import copy
import functools
from typing import Optional

from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dynamoe.adaptive.config import AdaptiveGatingConfig
from megatron_dynamoe.adaptive.router import AdaptiveRouter
from megatron_dynamoe.models.spec import (
    moe_layer_spec,
    stage_block_spec,
    uses_transformer_engine,
)


def adaptive_mlp_spec(gating: AdaptiveGatingConfig, moe_mlp_spec: ModuleSpec) -> ModuleSpec:
    """Megatron's MoE MLP spec with the AdaptiveRouter bound to `gating` (no shared experts)."""
    submodules = copy.copy(moe_mlp_spec.submodules)
    return ModuleSpec(
        module=moe_mlp_spec.module,  # Megatron's MoELayer, unchanged
        params=dict(moe_mlp_spec.params),
        submodules=MoESubmodules(
            experts=submodules.experts,
            shared_experts=None,
            router=functools.partial(AdaptiveRouter, gating=gating),
        ),
        metainfo=dict(moe_mlp_spec.metainfo),
    )


def adaptive_layer_spec(gating: AdaptiveGatingConfig, normalization: str, use_te: bool,
                        qk_layernorm: bool = False) -> ModuleSpec:
    """Transformer layer spec with an adaptive-gating MoE FFN."""
    return moe_layer_spec(gating.num_experts, functools.partial(adaptive_mlp_spec, gating),
                          normalization, use_te, qk_layernorm)


def decoder_block_spec(config: TransformerConfig, gating: AdaptiveGatingConfig,
                       use_te: Optional[bool] = None, vp_stage: Optional[int] = None,
                       pp_rank: Optional[int] = None) -> TransformerBlockSubmodules:
    """Decoder block spec for this pipeline stage (or virtual chunk): MoE layers where
    `gating.is_moe(i)`, dense layers elsewhere. `use_te` defaults to
    `config.transformer_impl`."""
    if use_te is None:
        use_te = uses_transformer_engine(config)
    moe = adaptive_layer_spec(gating, config.normalization, use_te, config.qk_layernorm)
    return stage_block_spec(config, gating.is_moe, moe, use_te, vp_stage, pp_rank)
