"""Layer specs of adaptive-gating MoE models.

The MoE layer is Megatron's own MoE layer spec (`MoELayer` + `SequentialMLP` experts, same
attention, norms and checkpoint key map as the dense spec) with only the router swapped for
`AdaptiveRouter`, so the dispatch path is exactly Megatron's (and the DynaMoE layer's).
The norm / Transformer Engine helpers are the DynaMoE spec's, shared by import.
"""

from __future__ import annotations

import copy
import functools
from typing import List, Optional

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_dynamoe.adaptive.config import AdaptiveGatingConfig
from megatron_dynamoe.adaptive.router import AdaptiveRouter
from megatron_dynamoe.dynamoe.spec import (
    _norm_class,
    _swap_torch_norms,
    dense_layer_spec,
    transformer_engine_available,
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
    builder = get_gpt_layer_with_transformer_engine_spec if use_te else get_gpt_layer_local_spec
    kwargs = {} if use_te else {"normalization": normalization}
    spec = builder(num_experts=gating.num_experts, moe_grouped_gemm=False,
                   qk_layernorm=qk_layernorm, **kwargs)
    if not use_te:
        spec = _swap_torch_norms(spec, _norm_class(False))
    spec.submodules.mlp = adaptive_mlp_spec(gating, spec.submodules.mlp)
    return spec


def decoder_block_spec(config: TransformerConfig, gating: AdaptiveGatingConfig,
                       use_te: Optional[bool] = None, vp_stage: Optional[int] = None,
                       pp_rank: Optional[int] = None) -> TransformerBlockSubmodules:
    """Decoder block spec for this pipeline stage (or virtual chunk): MoE layers where
    `gating.is_moe(i)`, dense layers elsewhere."""
    if use_te is None:
        use_te = transformer_engine_available()
    dense = dense_layer_spec(config.normalization, use_te, config.qk_layernorm)
    moe = adaptive_layer_spec(gating, config.normalization, use_te, config.qk_layernorm)
    layer_specs: List[ModuleSpec] = [moe if gating.is_moe(i) else dense
                                     for i in range(config.num_layers)]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=layer_specs[offset:offset + count],
                                      layer_norm=_norm_class(use_te))
