"""Layer specs: dense GPT/LLaMA decoder specs and their DynaMoE counterparts.

The DynaMoE layer spec is Megatron's own MoE layer spec (same attention, norms and
checkpoint key map) with the MLP submodule swapped for DynaMoELayer + ShellExperts +
DifficultyRouter, so everything outside the FFN is byte-for-byte the dense model's.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Callable, List, Optional

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)

from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.dynamoe.experts import ShellExperts
from megatron_dynamoe.dynamoe.layer import DynaMoELayer
from megatron_dynamoe.dynamoe.router import DifficultyRouter
from megatron_dynamoe.models.norms import SequenceParallelTorchNorm
from megatron_dynamoe.models.sdpa_attention import SDPAttention
from megatron_dynamoe.runtime import transformer_impl as runtime_impl


class _KnownMLPFilter(logging.Filter):
    """TransformerLayer passes `pg_collection` only to the exact MoELayer class and logs
    "Unknown MLP type" for any other MLP spec, once per layer. DynaMoELayer is a MoELayer
    that takes Megatron's default process groups in that case (the same groups the layer
    would have passed), so the message is noise for it; drop exactly that message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unknown MLP type")


def _quiet_unknown_mlp_warning() -> None:
    log = logging.getLogger("megatron.core.transformer.transformer_layer")
    if not any(isinstance(f, _KnownMLPFilter) for f in log.filters):
        log.addFilter(_KnownMLPFilter())


def uses_transformer_engine(config: TransformerConfig) -> bool:
    """Whether `config` asks for Transformer Engine layers (`--transformer-impl`): the choice
    is explicit, never inferred from TE being importable."""
    return config.transformer_impl == "transformer_engine"


def _norm_class(use_te: bool):
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    # Always our torch norm for the local implementation: Megatron's fallback
    # (WrappedTorchNorm) refuses sequence parallelism, and Apex's FusedLayerNorm, which
    # Megatron picks whenever Apex imports, asserts LayerNorm-only (every RMSNorm model
    # would crash) and would make Apex's presence change the model silently.
    return SequenceParallelTorchNorm


def _is_replaceable_norm(module) -> bool:
    from megatron.core.models.gpt import gpt_layer_specs

    return module is WrappedTorchNorm or module is gpt_layer_specs.LNImpl


def _core_attention():
    """The local implementation's core attention (`--attention-backend`)."""
    if runtime_impl.attention_backend() == "sdpa":
        return SDPAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return DotProductAttention


def _local_modules(spec: ModuleSpec, norm) -> ModuleSpec:
    """Our modules in a local layer spec: the norm replacing Megatron's local-spec norm
    (WrappedTorchNorm, or Apex's FusedLayerNorm where Apex imports: input, pre-MLP, q/k
    norms) and the selected core attention."""
    spec.submodules.self_attention.submodules.core_attention = _core_attention()
    sub = spec.submodules
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if _is_replaceable_norm(getattr(sub, name)):
            setattr(sub, name, norm)
    attn = sub.self_attention.submodules
    for name in ("q_layernorm", "k_layernorm"):
        current = getattr(attn, name, None)
        if current is not None and _is_replaceable_norm(current):
            setattr(attn, name, norm)
    return spec


def dense_layer_spec(normalization: str, use_te: bool, qk_layernorm: bool = False) -> ModuleSpec:
    """Megatron's dense GPT layer spec (TE or local), with an SP-capable torch norm."""
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
    return _local_modules(spec, _norm_class(False))


class DynaMoETransformerLayer(TransformerLayer):
    """Megatron's TransformerLayer that shows its DynaMoE FFN the residual stream.

    Residual-relative difficulty labels compare a level's error with the norm of the hidden
    state the FFN output is added to; the FFN itself only sees the pre-MLP-normalised input,
    so the layer passes the residual over just before normalising it (recomputation included,
    since it re-runs this method). Everything else, checkpoint keys included, is Megatron's.
    """

    def _forward_pre_mlp_layernorm(self, hidden_states):
        if isinstance(self.mlp, DynaMoELayer):
            self.mlp.observe_residual(hidden_states)
        return super()._forward_pre_mlp_layernorm(hidden_states)


def dynamoe_mlp_spec(dynamoe_config: DynaMoEConfig, moe_mlp_spec: ModuleSpec) -> ModuleSpec:
    """Turn Megatron's MoE MLP spec into the DynaMoE one (layer, experts, router)."""
    experts = copy.copy(moe_mlp_spec.submodules.experts)
    experts.module = ShellExperts
    experts.params = {**experts.params, "dynamoe_config": dynamoe_config}
    return ModuleSpec(
        module=DynaMoELayer,
        params={"dynamoe_config": dynamoe_config},
        submodules=MoESubmodules(
            experts=experts,
            shared_experts=None,
            router=functools.partial(DifficultyRouter, dynamoe_config=dynamoe_config),
        ),
        metainfo=dict(moe_mlp_spec.metainfo),
    )


def moe_layer_spec(num_experts: int, mlp_spec: Callable[[ModuleSpec], ModuleSpec],
                   normalization: str, use_te: bool, qk_layernorm: bool = False) -> ModuleSpec:
    """Megatron's MoE transformer layer spec for `num_experts` (TE or local, with the
    SP-capable torch norm), its MLP replaced by `mlp_spec(megatron_moe_mlp_spec)`. Every MoE
    family (DynaMoE, adaptive gating, top-k baselines) builds its layer through this."""
    builder = get_gpt_layer_with_transformer_engine_spec if use_te else get_gpt_layer_local_spec
    kwargs = {} if use_te else {"normalization": normalization}
    spec = builder(num_experts=num_experts, moe_grouped_gemm=False,
                   qk_layernorm=qk_layernorm, **kwargs)
    if use_te:
        # Megatron's local spec files an MoE layer's pre-MLP norm under
        # `mlp.linear_fc1.layer_norm_*` (the dense layers' fused-norm name); its TE MoE spec
        # keeps a separate `pre_mlp_layernorm.*`. Use the local name for both, so a checkpoint
        # written by either implementation loads into the other.
        keys = dict(spec.submodules.sharded_state_dict_keys_map or {})
        keys.setdefault("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_")
        spec.submodules.sharded_state_dict_keys_map = keys
    else:
        spec = _local_modules(spec, _norm_class(False))
    spec.submodules.mlp = mlp_spec(spec.submodules.mlp)
    return spec


def dynamoe_layer_spec(dynamoe_config: DynaMoEConfig, normalization: str, use_te: bool,
                       qk_layernorm: bool = False) -> ModuleSpec:
    """Transformer layer spec with a DynaMoE FFN (Megatron's MoE layer spec, MLP swapped)."""
    spec = moe_layer_spec(dynamoe_config.num_shells,
                          functools.partial(dynamoe_mlp_spec, dynamoe_config),
                          normalization, use_te, qk_layernorm)
    spec.module = DynaMoETransformerLayer
    _quiet_unknown_mlp_warning()
    return spec


def stage_block_spec(config: TransformerConfig, is_moe: Callable[[int], bool],
                     moe_spec: Optional[ModuleSpec], use_te: bool,
                     vp_stage: Optional[int] = None,
                     pp_rank: Optional[int] = None) -> TransformerBlockSubmodules:
    """Decoder block spec of this pipeline stage / virtual chunk: `moe_spec` for the global
    layer indices where `is_moe(i)`, Megatron's dense layer spec elsewhere."""
    dense = dense_layer_spec(config.normalization, use_te, config.qk_layernorm)
    layer_specs: List[ModuleSpec] = [
        moe_spec if (moe_spec is not None and is_moe(i)) else dense
        for i in range(config.num_layers)
    ]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=layer_specs[offset:offset + count],
                                      layer_norm=_norm_class(use_te))


def decoder_block_spec(config: TransformerConfig, dynamoe_config: Optional[DynaMoEConfig],
                       use_te: Optional[bool] = None, vp_stage: Optional[int] = None,
                       pp_rank: Optional[int] = None) -> TransformerBlockSubmodules:
    """Decoder block spec for this pipeline stage: DynaMoE layers where
    `dynamoe_config.is_moefied(i)`, dense layers elsewhere (all dense when it is None).
    `use_te` defaults to `config.transformer_impl`."""
    if use_te is None:
        use_te = uses_transformer_engine(config)
    if dynamoe_config is None:
        return stage_block_spec(config, lambda i: False, None, use_te, vp_stage, pp_rank)
    moe = dynamoe_layer_spec(dynamoe_config, config.normalization, use_te, config.qk_layernorm)
    return stage_block_spec(config, dynamoe_config.is_moefied, moe, use_te, vp_stage, pp_rank)
