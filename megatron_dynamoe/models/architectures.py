"""Model architectures (LLaMA family, GPT-2 family) and their Megatron TransformerConfig.

`ModelArchitecture` is the checkpoint-independent shape of a dense decoder; presets name
the models our tools and SLURM scripts use. `transformer_config()` turns an architecture,
a parallel layout and (optionally) a DynaMoEConfig into Megatron-Core's TransformerConfig.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.runtime import device as runtime_device
from megatron_dynamoe.runtime import transformer_impl as runtime_impl
from megatron_dynamoe.runtime.parallel import ParallelLayout

FAMILIES = ("llama", "gpt2")
# FFN activation per family: LLaMA's SwiGLU gate uses silu; GPT-2 uses GELU, the tanh
# approximation in the released checkpoints (HF "gelu_new") or the exact erf form.
ACTIVATIONS = {"llama": ("silu",), "gpt2": ("gelu_tanh", "gelu")}


@dataclass(frozen=True)
class ModelArchitecture:
    """Shape of a dense decoder-only LM.

    family 'llama': RMSNorm, SwiGLU FFN, RoPE (base `rotary_base`), GQA, no biases.
    `rope_scaling_factor`: Llama-3.1's RoPE frequency scaling with that factor (and
    Megatron-Core's fixed low / high frequency factors 1 / 4 over 8192 original positions);
    None: unscaled RoPE.
    family 'gpt2': LayerNorm, GELU FFN, learned absolute positions, biases everywhere.
    `activation` defaults to the family's first entry in ACTIVATIONS.
    """

    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int
    num_query_groups: Optional[int] = None  # None: multi-head attention (= heads)
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = False
    activation: Optional[str] = None
    rope_scaling_factor: Optional[float] = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}: use one of {FAMILIES}")
        if self.activation is None:
            object.__setattr__(self, "activation", ACTIVATIONS[self.family][0])
        if self.activation not in ACTIVATIONS[self.family]:
            raise ValueError(f"activation {self.activation!r} is not available for the "
                             f"{self.family} family: use one of {ACTIVATIONS[self.family]}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by "
                             f"{self.num_attention_heads} attention heads")
        if self.rope_scaling_factor is not None and self.family != "llama":
            raise ValueError("RoPE scaling applies to the llama family only")
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ValueError(f"{self.num_attention_heads} attention heads are not divisible "
                             f"into {groups} query groups")

    @property
    def gated(self) -> bool:
        """Whether the FFN is a gated linear unit (SwiGLU)."""
        return self.family == "llama"

    @property
    def activation_func(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The elementwise FFN activation (for SwiGLU: the gate's)."""
        if self.activation == "silu":
            return F.silu
        if self.activation == "gelu_tanh":
            return functools.partial(F.gelu, approximate="tanh")
        return F.gelu

    @property
    def query_groups(self) -> int:
        """Number of key/value heads."""
        return self.num_query_groups or self.num_attention_heads

    def num_parameters(self) -> int:
        """Exact parameter count of the dense model built by `build_gpt_model`."""
        h, f, v, layers = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.num_layers
        head_dim = h // self.num_attention_heads
        kv = self.query_groups * head_dim
        if self.family == "llama":
            attn = h * (h + 2 * kv) + h * h
            ffn = 3 * h * f
            norms = 2 * h
            extra = 0
            final_norm = h
        else:
            attn = h * (h + 2 * kv) + (h + 2 * kv) + h * h + h
            ffn = 2 * h * f + f + h
            norms = 4 * h
            extra = self.max_position_embeddings * h
            final_norm = 2 * h
        embed = v * h * (1 if self.tie_embeddings else 2)
        return layers * (attn + ffn + norms) + embed + extra + final_norm

    def to_dict(self) -> dict:
        """Plain dict for checkpoint metadata."""
        return dataclasses.asdict(self)


PRESETS: Dict[str, ModelArchitecture] = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct): the embedded real model.
    "smollm2-135m": ModelArchitecture(
        family="llama", num_layers=30, hidden_size=576, ffn_hidden_size=1536,
        num_attention_heads=9, num_query_groups=3, vocab_size=49152,
        max_position_embeddings=8192, rotary_base=100000.0, norm_epsilon=1e-5,
        tie_embeddings=True),
    "llama2-70b": ModelArchitecture(
        family="llama", num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
        num_attention_heads=64, num_query_groups=8, vocab_size=32000,
        max_position_embeddings=4096, rotary_base=10000.0, norm_epsilon=1e-5),
    "llama3-70b": ModelArchitecture(
        family="llama", num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
        num_attention_heads=64, num_query_groups=8, vocab_size=128256,
        max_position_embeddings=8192, rotary_base=500000.0, norm_epsilon=1e-5),
    # Published parameter counts in tests/test_config.py.
    "llama2-7b": ModelArchitecture(
        family="llama", num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
        num_attention_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama2-13b": ModelArchitecture(
        family="llama", num_layers=40, hidden_size=5120, ffn_hidden_size=13824,
        num_attention_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "llama3.1-8b": ModelArchitecture(
        family="llama", num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
        num_attention_heads=32, num_query_groups=8, vocab_size=128256,
        max_position_embeddings=131072, rotary_base=500000.0, rope_scaling_factor=8.0),
    # Mistral-7B-v0.3: no sliding-window attention (v0.1's 4096-token window is not modelled).
    "mistral-7b-v0.3": ModelArchitecture(
        family="llama", num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
        num_attention_heads=32, num_query_groups=8, vocab_size=32768,
        max_position_embeddings=32768, rotary_base=1000000.0),
    "gpt2": ModelArchitecture(
        family="gpt2", num_layers=12, hidden_size=768, ffn_hidden_size=3072,
        num_attention_heads=12, vocab_size=50257, max_position_embeddings=1024,
        norm_epsilon=1e-5, tie_embeddings=True),
    # Small shapes for tests and the CPU SLURM template.
    "tiny-llama": ModelArchitecture(
        family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128,
        num_attention_heads=4, num_query_groups=2, vocab_size=256,
        max_position_embeddings=128, rotary_base=10000.0),
    # A tiny LLaMA with SmolLM2's vocabulary: trains on data tokenised by the shipped
    # tokenizer in seconds (tests, the CPU SLURM template).
    "tiny-smollm2": ModelArchitecture(
        family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128,
        num_attention_heads=4, num_query_groups=2, vocab_size=49152,
        max_position_embeddings=512, rotary_base=100000.0, tie_embeddings=True),
    "tiny-gpt2": ModelArchitecture(
        family="gpt2", num_layers=2, hidden_size=64, ffn_hidden_size=256,
        num_attention_heads=4, vocab_size=256, max_position_embeddings=128,
        tie_embeddings=True),
}


def get_architecture(name: str) -> ModelArchitecture:
    """Preset by name, or a clear error listing the presets."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: choose one of {sorted(PRESETS)}") from None


def _keep_uninitialised(tensor: torch.Tensor) -> torch.Tensor:
    """Megatron init method that leaves the (empty) weight as allocated."""
    return tensor


def skip_random_init(config: TransformerConfig) -> TransformerConfig:
    """Make `config` build models without random-initialisation work (their weights are about
    to be loaded), in place; returns it.

    Not `perform_initialization=False`: in megatron-core 0.16.1 that also skips
    `set_tensor_model_parallel_attributes` on every TP-split weight (it lives inside the init
    helpers), so at TP > 1 the gradient norm counts each shard as a duplicate and clipping
    differs from TP = 1. No-op init methods keep the attributes and draw no random numbers.
    """
    config.init_method = _keep_uninitialised
    config.output_layer_init_method = _keep_uninitialised
    config.embedding_init_method = _keep_uninitialised
    return config


def transformer_config(arch: ModelArchitecture, layout: ParallelLayout = ParallelLayout(),
                       dynamoe: Optional[DynaMoEConfig] = None, *,
                       sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                       moe_token_dispatcher_type: str = "alltoall",
                       **overrides) -> TransformerConfig:
    """Megatron TransformerConfig for `arch` at `layout`, with MoE fields for DynaMoE.

    Dropout is off (fine-tuning a pre-trained model) and fusions that need Apex/TE/CUDA are
    off unless `overrides` turn them on. Parameters are created where the device policy puts
    the model (`runtime.device`): on the GPU the Megatron-LM way, on the CPU through
    Megatron's CPU initialisation (the master weight is initialised, then split, so a random
    model does not depend on the TP layout). Pass `perform_initialization=False` when a
    checkpoint will be loaded: no random-init work is done for weights about to be replaced
    (`skip_random_init`; Megatron's own flag stays on, see there).
    The layer implementation is the process's `--transformer-impl` (`runtime.transformer_impl`)
    unless `overrides` name one. Raises when the layout does not divide the model.
    """
    tp = layout.tensor_model_parallel_size
    if arch.num_attention_heads % tp or arch.query_groups % tp:
        raise ValueError(f"TP={tp} must divide the attention heads ({arch.num_attention_heads}) "
                         f"and query groups ({arch.query_groups})")
    if arch.ffn_hidden_size % tp:
        raise ValueError(f"TP={tp} must divide the FFN hidden size {arch.ffn_hidden_size}")
    if arch.num_layers % layout.pipeline_model_parallel_size:
        raise ValueError(f"PP={layout.pipeline_model_parallel_size} must divide the "
                         f"{arch.num_layers} layers")
    vpp = layout.virtual_pipeline_model_parallel_size
    if vpp is not None and arch.num_layers % (layout.pipeline_model_parallel_size * vpp):
        raise ValueError(f"PP x VPP = {layout.pipeline_model_parallel_size} x {vpp} must divide "
                         f"the {arch.num_layers} layers: choose a VPP size that divides "
                         f"{arch.num_layers // layout.pipeline_model_parallel_size}")
    bf16 = params_dtype == torch.bfloat16
    fields = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.query_groups,
        layernorm_epsilon=arch.norm_epsilon,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        # Megatron-LM's defaults for the interleaved schedule: overlapped, unbatched p2p.
        # Unbatched p2p also keeps the two directions apart when PP = 2 (both neighbours
        # are the same rank, and a batched send/recv pair would be matched out of order).
        overlap_p2p_comm=vpp is not None,
        batch_p2p_comm=vpp is None,
        expert_model_parallel_size=layout.expert_model_parallel_size,
        expert_tensor_parallel_size=layout.expert_tensor_parallel_size,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        bf16=bf16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=not runtime_device.current().is_cuda,
        # Megatron-LM's default: free each pipeline stage's output once sent, so in-flight
        # micro-batches do not keep their activations alive (memory at PP > 1).
        deallocate_pipeline_outputs=True,
        transformer_impl=runtime_impl.current(),
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )
    if arch.family == "llama":
        fields.update(normalization="RMSNorm", gated_linear_unit=True,
                      activation_func=arch.activation_func, add_bias_linear=False,
                      add_qkv_bias=False)
    else:
        fields.update(normalization="LayerNorm", gated_linear_unit=False,
                      activation_func=arch.activation_func, add_bias_linear=True,
                      add_qkv_bias=True)
    if dynamoe is not None:
        dynamoe.validate_for_model(
            arch.ffn_hidden_size, arch.num_layers,
            expert_model_parallel_size=layout.expert_model_parallel_size,
            expert_tensor_parallel_size=layout.expert_tensor_parallel)
        if arch.family != "llama":
            raise ValueError("DynaMoE needs bias-free FFNs: MoEfy a LLaMA-family model "
                             "(GPT-2-family models are supported dense)")
        fields.update(
            num_moe_experts=dynamoe.num_shells,
            moe_ffn_hidden_size=arch.ffn_hidden_size // dynamoe.num_shells,
            moe_router_topk=dynamoe.num_shells,  # an upper bound: a token uses 1..S shells
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_token_dispatcher_type=moe_token_dispatcher_type,
            moe_grouped_gemm=False,
            moe_router_dtype="fp32",
        )
    skip_init = overrides.pop("perform_initialization", True) is False
    fields.update(overrides)
    if fields.get("num_moe_experts"):
        # Every MoE family (DynaMoE, or MoE fields given as overrides) uses the dispatcher.
        fields.setdefault("moe_token_dispatcher_type", moe_token_dispatcher_type)
    config = TransformerConfig(**fields)
    return skip_random_init(config) if skip_init else config
