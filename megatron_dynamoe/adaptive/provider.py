"""AdaptiveMoEProvider: builds adaptive-gating MoE GPTModels for the trainer, the tools and
the benchmarks, and reports their routing statistics as TensorBoard scalars.

The model is Megatron's GPTModel with Megatron's MoE layer (router swapped, see spec.py), so
it trains through the same schedules, DDP, distributed optimizer and checkpoints as the
DynaMoE model. Checkpoints record the gating config in `model.json`'s `extra["adaptive"]`
(`checkpoint_info` / `from_checkpoint_info`).

Scalars (per logged iteration, from the logging rank's stage, summed over the iteration's
micro-batches on the device and copied to the host once):
- `moe/layerNNN/two-expert-share`: share of tokens that chose two or more experts;
- `moe/layerNNN/experts-per-token`: mean experts per token (FFN compute in expert units);
- `moe/layerNNN/expertE-tokens`: tokens computed by expert E (after capacity dropping);
- `moe/layerNNN/expert-load-imbalance`: max / mean of those token counts (1 = balanced),
  and with EP > 1 `moe/layerNNN/ep-load-imbalance`, the same over EP ranks;
- `moe/dropped-tokens`: token-expert assignments dropped by capacity, summed over layers
  (`moe/fully-dropped-tokens`: tokens that lost every expert and only keep the residual).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dynamoe.adaptive.config import AdaptiveGatingConfig
from megatron_dynamoe.adaptive.router import AdaptiveRouter, window_scalars
from megatron_dynamoe.adaptive.spec import decoder_block_spec
from megatron_dynamoe.models.architectures import ModelArchitecture, transformer_config
from megatron_dynamoe.models.builder import ModelProvider, build_gpt_model

CHECKPOINT_KEY = "adaptive"


def adaptive_layers(model) -> List[MoELayer]:
    """Every MoE layer with an AdaptiveRouter in `model` (or a list of chunks), in order."""
    chunks = model if isinstance(model, (list, tuple, torch.nn.ModuleList)) else [model]
    return [m for chunk in chunks for m in chunk.modules()
            if isinstance(m, MoELayer) and isinstance(m.router, AdaptiveRouter)]


def set_threshold(model, threshold: float) -> None:
    """Set the adaptive threshold T of every adaptive router in `model`."""
    for layer in adaptive_layers(model):
        layer.router.set_threshold(threshold)


def routing_scalars(model) -> Dict[str, float]:
    """TensorBoard scalars of every adaptive layer over the statistics window (one training
    iteration's micro-batches under the monitor), read with one device-to-host copy."""
    return window_scalars(adaptive_layers(model))


class AdaptiveMoEProvider(ModelProvider):
    """Model provider of adaptive / top-k / top-p MoE GPT models (a `ModelProvider`).

    Every FFN named by `gating.moe_layers` (all by default) is a Megatron MoE layer of
    `gating.num_experts` experts; the rest of the model is the dense architecture's.
    """

    name = "adaptive"

    @property
    def family(self) -> str:
        return "adaptive"

    def __init__(self, architecture: ModelArchitecture, gating: AdaptiveGatingConfig):
        if architecture.family != "llama":
            raise ValueError("adaptive MoE layers need bias-free FFNs (a LLaMA-family model): "
                             "a per-expert fc2 bias would be added once per selected expert")
        gating.validate_for_model(architecture.ffn_hidden_size, architecture.num_layers)
        super().__init__(architecture, None)
        self.gating = gating

    def transformer_config(self, layout, *, sequence_parallel: bool = False,
                           moe_token_dispatcher_type: str = "alltoall",
                           params_dtype: torch.dtype = torch.float32,
                           **overrides) -> TransformerConfig:
        """Megatron TransformerConfig at `layout`: the architecture's, plus the MoE fields of
        the gating config (raises when the layout does not divide the model or the experts)."""
        arch = self.architecture
        self.gating.validate_for_model(
            arch.ffn_hidden_size, arch.num_layers,
            expert_model_parallel_size=layout.expert_model_parallel_size,
            expert_tensor_parallel_size=layout.expert_tensor_parallel)
        fields = self.gating.transformer_overrides(arch.ffn_hidden_size)
        fields.update(overrides)
        if moe_token_dispatcher_type not in ("alltoall", "allgather"):
            raise ValueError(f"moe_token_dispatcher_type {moe_token_dispatcher_type!r}: use "
                             f"'alltoall' or 'allgather'")
        return transformer_config(arch, layout, None, sequence_parallel=sequence_parallel,
                                  params_dtype=params_dtype,
                                  moe_token_dispatcher_type=moe_token_dispatcher_type, **fields)

    def build(self, config: TransformerConfig, *, vp_stage: Optional[int] = None,
              parallel_output: bool = True, use_te: Optional[bool] = None) -> GPTModel:
        """This rank's GPTModel for pipeline stage / virtual chunk `vp_stage`: the dense
        model's GPTModel (`model_builder.build_gpt_model`) with the adaptive decoder block."""
        return build_gpt_model(
            self.architecture, config, None, vp_stage=vp_stage, parallel_output=parallel_output,
            block_spec=decoder_block_spec(config, self.gating, use_te=use_te,
                                          vp_stage=vp_stage))

    def scalars(self, model) -> Dict[str, float]:
        """Routing statistics of the last forward (see module docstring)."""
        return routing_scalars(model)

    # ---- checkpoint metadata ---------------------------------------------------------------
    def checkpoint_info(self, provenance: Optional[dict] = None):
        """CheckpointInfo recording the architecture, the gating config and `provenance`
        (free-form keys, as the other tools write them)."""
        from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo

        extra = {**(provenance or {}), CHECKPOINT_KEY: self.gating.to_dict(),
                 "model_provider": self.name}
        return CheckpointInfo(self.architecture, None, extra)

    @classmethod
    def from_checkpoint_info(cls, info) -> "AdaptiveMoEProvider":
        """The provider of a checkpoint written with `checkpoint_info` (CheckpointError when
        the checkpoint is not an adaptive-gating one)."""
        from megatron_dynamoe.checkpoint.torch_dist import CheckpointError

        raw = (info.extra or {}).get(CHECKPOINT_KEY) if info is not None else None
        if raw is None:
            raise CheckpointError("the checkpoint is not an adaptive-gating MoE checkpoint "
                                  f"(no extra.{CHECKPOINT_KEY} in model.json)")
        try:
            gating = AdaptiveGatingConfig.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"model.json extra.{CHECKPOINT_KEY} is invalid: {e}") from e
        return cls(info.architecture, gating)
