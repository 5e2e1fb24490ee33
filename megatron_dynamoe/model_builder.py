"""Build Megatron-Core GPTModels (dense or DynaMoE) and control their DynaMoE layers."""

from __future__ import annotations

from typing import List, Optional

import torch

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dynamoe.architectures import ModelArchitecture
from megatron_dynamoe.dynamoe.config import DynaMoEConfig, check_sensitivity
from megatron_dynamoe.dynamoe.layer import DynaMoELayer
from megatron_dynamoe.dynamoe.spec import decoder_block_spec


def build_gpt_model(arch: ModelArchitecture, config: TransformerConfig,
                    dynamoe: Optional[DynaMoEConfig] = None, *,
                    pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                    vp_stage: Optional[int] = None, parallel_output: bool = True,
                    use_te: Optional[bool] = None) -> GPTModel:
    """A GPTModel for this pipeline stage; DynaMoE layers where `dynamoe` says so.

    `pre_process` / `post_process` default to whether this rank holds the first / last
    pipeline stage. Parallel groups must be initialised (`parallel.initialize_parallel`).
    """
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                              vp_stage=vp_stage)
    block_spec = decoder_block_spec(config, dynamoe, use_te=use_te, vp_stage=vp_stage)
    llama = arch.family == "llama"
    return GPTModel(
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
        vp_stage=vp_stage,
    )


def dynamoe_layers(model: torch.nn.Module) -> List[DynaMoELayer]:
    """Every DynaMoE layer in `model` (or a list of model chunks), in module order."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, DynaMoELayer)]


def set_sensitivity(model, theta: float) -> None:
    """Set the sensitivity theta in [0, 1] of every DynaMoE layer (1 = dense compute)."""
    theta = check_sensitivity(theta)
    for layer in dynamoe_layers(model):
        layer.set_sensitivity(theta)


def set_static_level(model, level: Optional[int]) -> None:
    """Put every token of every DynaMoE layer at `level` (1..K): the static nested
    sub-network of that width. None returns to per-token routing at the sensitivity."""
    for layer in dynamoe_layers(model):
        layer.router.set_static_level(level)


def set_training_step(model, step: int) -> None:
    """Tell every DynaMoE layer the training step (drives the label schedule)."""
    for layer in dynamoe_layers(model):
        layer.set_step(step)


def causal_attention_mask(seq_len: int, device=None) -> torch.Tensor:
    """Megatron's boolean causal mask [1, 1, s, s] (True = masked out)."""
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    return torch.triu(mask, diagonal=1).view(1, 1, seq_len, seq_len)
