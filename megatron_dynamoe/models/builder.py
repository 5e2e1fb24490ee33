"""Build Megatron-Core GPTModels (dense or DynaMoE) as model chunks; `dynamoe.control` sets
what their DynaMoE layers read at run time."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dynamoe.models.architectures import ModelArchitecture, transformer_config
from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.models.spec import decoder_block_spec
from megatron_dynamoe.runtime.device import place_model


def build_gpt_model(arch: ModelArchitecture, config: TransformerConfig,
                    dynamoe: Optional[DynaMoEConfig] = None, *,
                    pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                    vp_stage: Optional[int] = None, parallel_output: bool = True,
                    use_te: Optional[bool] = None, block_spec=None) -> GPTModel:
    """A GPTModel for this pipeline stage; DynaMoE layers where `dynamoe` says so.

    `pre_process` / `post_process` default to whether this rank holds the first / last
    pipeline stage. `block_spec` (a TransformerBlockSubmodules for this stage) replaces the
    dense / DynaMoE decoder block, so other MoE families share every other GPTModel argument.
    The model comes back on the device policy's device (`runtime.device.place_model`: what
    Megatron or our modules created on the host, norms, routers, buffers, rotary
    frequencies, is moved), before any DDP wrapper sees it, as Megatron-LM's `get_model`.
    Parallel groups must be initialised (`parallel.initialize_parallel`).
    """
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                              vp_stage=vp_stage)
    if block_spec is None:
        block_spec = decoder_block_spec(config, dynamoe, use_te=use_te, vp_stage=vp_stage)
    llama = arch.family == "llama"
    return place_model(GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope" if llama else "learned_absolute",
        rotary_base=int(arch.rotary_base) if llama else 10000,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        vp_stage=vp_stage,
    ))


class ModelProvider:
    """How to build one model family at any layout: its TransformerConfig and the GPTModel
    of a pipeline stage (or of one virtual-pipeline chunk).

    The trainer, the tools and the benchmarks take a provider instead of hard-coding the
    model, so another MoE family (a different router or expert layout) trains through the
    same Megatron machinery by subclassing this. The base class builds the dense model or,
    with a `DynaMoEConfig`, the DynaMoE model.
    """

    name = "dynamoe"

    def __init__(self, architecture: ModelArchitecture,
                 dynamoe: Optional[DynaMoEConfig] = None):
        self.architecture = architecture
        self.dynamoe = dynamoe

    @property
    def family(self) -> str:
        """The model family this provider builds (`models.registry`), recorded in checkpoints."""
        return "dynamoe" if self.dynamoe is not None else "dense"

    def transformer_config(self, layout, *, sequence_parallel: bool = False,
                           moe_token_dispatcher_type: str = "alltoall",
                           params_dtype: torch.dtype = torch.float32,
                           **overrides) -> TransformerConfig:
        """The Megatron TransformerConfig of this model at `layout` (raises when the layout
        does not divide the model)."""
        return transformer_config(self.architecture, layout, self.dynamoe,
                                  sequence_parallel=sequence_parallel,
                                  moe_token_dispatcher_type=moe_token_dispatcher_type,
                                  params_dtype=params_dtype, **overrides)

    def build(self, config: TransformerConfig, *, vp_stage: Optional[int] = None) -> GPTModel:
        """This rank's GPTModel for pipeline stage / virtual chunk `vp_stage`."""
        return build_gpt_model(self.architecture, config, self.dynamoe, vp_stage=vp_stage)

    def scalars(self, model) -> Dict[str, float]:
        """Extra per-iteration TensorBoard scalars (tag -> value) of this family; the
        DynaMoE statistics are logged by the monitor itself."""
        return {}


class ModelChunks(torch.nn.ModuleList):
    """The model chunks of this rank: one per virtual pipeline stage (one without VPP).

    Behaves like one model for checkpointing: without VPP its sharded state dict is the
    chunk's own (so checkpoints are the plain layout-free model checkpoints); with VPP the
    chunks' dicts are nested under `model0`, `model1`, ... the way Megatron nests them.
    The sharded keys themselves carry global layer numbers, so either form loads at any
    layout.
    """

    def sharded_state_dict(self, *args, **kwargs) -> dict:
        if len(self) == 1:
            return self[0].sharded_state_dict(*args, **kwargs)
        return {f"model{i}": chunk.sharded_state_dict(*args, **kwargs)
                for i, chunk in enumerate(self)}

    def load_state_dict(self, state_dict, strict: bool = True):
        """Load what `sharded_state_dict()` describes; returns torch's (missing, unexpected)
        key lists, chunk keys prefixed with `model{i}.` under VPP."""
        if len(self) == 1:
            return self[0].load_state_dict(state_dict, strict=strict)
        missing, unexpected = [], []
        for i, chunk in enumerate(self):
            result = chunk.load_state_dict(state_dict[f"model{i}"], strict=strict)
            missing += [f"model{i}.{k}" for k in result.missing_keys]
            unexpected += [f"model{i}.{k}" for k in result.unexpected_keys]
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)


def build_model_chunks(provider: ModelProvider, config: TransformerConfig) -> ModelChunks:
    """One GPTModel per virtual pipeline stage of this rank (`config`'s VPP size, or one)."""
    vpp = config.virtual_pipeline_model_parallel_size
    if vpp is None:
        return ModelChunks([provider.build(config)])
    return ModelChunks([provider.build(config, vp_stage=i) for i in range(vpp)])


def causal_attention_mask(seq_len: int, device=None) -> torch.Tensor:
    """Megatron's boolean causal mask [1, 1, s, s] (True = masked out)."""
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    return torch.triu(mask, diagonal=1).view(1, 1, seq_len, seq_len)
