"""AdaptiveGatingConfig: the validated knobs of an MoE layer with ordinary experts whose
tokens use a variable number of experts.

Gating modes (p = softmax of the router logits over the E experts, p1 >= p2 >= ... per token):
- 'adaptive': top-2 gating where a token keeps only its top-1 expert when p1 - p2 > T
  (`threshold`). T = 0 is top-1 for every token without a tie; T >= 1 is top-2 for every
  token (a probability gap never exceeds 1).
- 'topk': Megatron's plain top-k (`topk` experts per token).
- 'topp': the smallest set of highest-probability experts whose probabilities sum to at
  least `top_p`, at most `max_experts`.

The config is the single source of truth: `transformer_overrides()` turns it into Megatron's
own TransformerConfig fields (experts, expert FFN size, the per-token expert bound
`moe_router_topk`, capacity, combine weights, load-balancing coefficient), which the router
reads and checks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple

GATING_MODES = ("adaptive", "topk", "topp")
# How selected experts are weighted (Megatron's `moe_router_pre_softmax`): 'renormalized' =
# softmax over the selected experts' logits (weights sum to 1; Megatron's default),
# 'softmax' = each selected expert's probability under the softmax over all E experts.
COMBINE_MODES = ("renormalized", "softmax")
DROP_POLICIES = ("probs", "position")


@dataclass
class AdaptiveGatingConfig:
    """Configuration of adaptive / top-k / top-p MoE layers; validated on construction.

    Attributes:
        num_experts: E, experts per MoE layer.
        gating: 'adaptive', 'topk' or 'topp' (see module docstring).
        threshold: T >= 0 of adaptive gating.
        topk: k of 'topk' gating.
        top_p: cumulative-probability target of 'topp' gating, in (0, 1].
        max_experts: cap on the experts of a 'topp' token (None = E).
        expert_ffn_hidden_size: hidden size of one expert; None = FFN / E (neuron split);
            the full FFN size for replicated (sparse-upcycled) experts.
        capacity_factor: None = dropless (default); otherwise each expert takes at most
            ceil(tokens x max_experts_per_token / E x factor) tokens, Megatron's formula, and
            the excess token-expert assignments are dropped (and counted).
        drop_policy: which assignments an over-full expert keeps: highest weight ('probs') or
            earliest position ('position'), as Megatron.
        pad_to_capacity: pad every expert's input to its capacity (Megatron's drop-and-pad).
        aux_loss_coeff: weight of the Switch load-balancing loss, computed over the top-1
            decisions for 'adaptive' / 'topp' and over the top-k ones for 'topk'.
        combine: 'softmax' (default) or 'renormalized' weights of the selected experts.
            'renormalized' gives a token that keeps one expert the weight 1 and hence no
            router gradient from the LM loss (why Megatron refuses it for top-1).
        scale: multiplies the combine weights (Megatron's moe_router_topk_scaling_factor).
        moe_layers: 0-based indices of the MoE layers; None = every layer.
    """

    num_experts: int = 4
    gating: str = "adaptive"
    threshold: float = 0.1
    topk: int = 2
    top_p: float = 0.5
    max_experts: Optional[int] = None
    expert_ffn_hidden_size: Optional[int] = None
    capacity_factor: Optional[float] = None
    drop_policy: str = "probs"
    pad_to_capacity: bool = False
    aux_loss_coeff: float = 1e-2
    combine: str = "softmax"
    scale: float = 1.0
    moe_layers: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        e = self.num_experts
        if e < 1:
            raise ValueError(f"num_experts must be >= 1, got {e}")
        if self.gating not in GATING_MODES:
            raise ValueError(f"gating {self.gating!r}: choose one of {GATING_MODES}")
        if self.gating == "adaptive" and e < 2:
            raise ValueError("adaptive top-2 gating needs at least 2 experts")
        if not self.threshold >= 0.0:  # also rejects NaN
            raise ValueError(f"adaptive threshold T must be >= 0 (0 = top-1, >= 1 = top-2), "
                             f"got {self.threshold}")
        if not 1 <= self.topk <= e:
            raise ValueError(f"topk must be in [1, num_experts={e}], got {self.topk}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_experts is not None and not 1 <= self.max_experts <= e:
            raise ValueError(f"max_experts must be in [1, num_experts={e}], got "
                             f"{self.max_experts}")
        if self.expert_ffn_hidden_size is not None and self.expert_ffn_hidden_size < 1:
            raise ValueError(f"expert_ffn_hidden_size must be >= 1, got "
                             f"{self.expert_ffn_hidden_size}")
        if self.capacity_factor is not None and not self.capacity_factor > 0.0:
            raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got "
                             f"{self.capacity_factor}")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy {self.drop_policy!r}: choose one of {DROP_POLICIES}")
        if self.pad_to_capacity and self.capacity_factor is None:
            raise ValueError("pad_to_capacity needs a capacity_factor")
        if not self.aux_loss_coeff >= 0.0:
            raise ValueError(f"aux_loss_coeff must be >= 0, got {self.aux_loss_coeff}")
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"combine {self.combine!r}: choose one of {COMBINE_MODES}")
        if self.gating == "topk" and self.topk == 1 and self.combine == "renormalized":
            raise ValueError("top-1 gating needs combine='softmax': renormalising one "
                             "expert's weight gives 1 and no router gradient (Megatron "
                             "refuses it too)")
        if not self.scale > 0.0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.moe_layers is not None:
            layers = tuple(sorted(set(int(i) for i in self.moe_layers)))
            if not layers or layers[0] < 0:
                raise ValueError(f"moe_layers {self.moe_layers}: give 0-based layer indices, "
                                 f"or None for every layer")
            self.moe_layers = layers

    @property
    def max_experts_per_token(self) -> int:
        """Upper bound of experts per token (Megatron's `moe_router_topk` for this layer)."""
        if self.gating == "adaptive":
            return 2
        if self.gating == "topk":
            return self.topk
        return self.max_experts or self.num_experts

    @property
    def balance_topk(self) -> int:
        """How many top experts per token the load-balancing loss counts: the top-1
        decision for adaptive / top-p gating (a token's first expert is the one it always
        uses), k for top-k (Megatron's loss)."""
        return self.topk if self.gating == "topk" else 1

    def expert_size(self, ffn_hidden_size: int) -> int:
        """Hidden size of one expert for a dense FFN of `ffn_hidden_size` neurons."""
        if self.expert_ffn_hidden_size is not None:
            return self.expert_ffn_hidden_size
        if ffn_hidden_size % self.num_experts:
            raise ValueError(f"FFN hidden size {ffn_hidden_size} is not divisible into "
                             f"{self.num_experts} experts: choose num_experts among its "
                             f"divisors or set expert_ffn_hidden_size")
        return ffn_hidden_size // self.num_experts

    def is_moe(self, layer_index: int) -> bool:
        """Whether decoder layer `layer_index` (0-based) is an MoE layer."""
        return self.moe_layers is None or layer_index in self.moe_layers

    def validate_for_model(self, ffn_hidden_size: int, num_layers: int,
                           expert_model_parallel_size: int = 1,
                           expert_tensor_parallel_size: int = 1) -> None:
        """Check that this config fits a model and a parallel layout; raise naming the fix."""
        size = self.expert_size(ffn_hidden_size)
        if size % expert_tensor_parallel_size:
            raise ValueError(f"expert FFN size {size} is not divisible by the expert "
                             f"tensor-parallel size {expert_tensor_parallel_size}")
        if self.num_experts % expert_model_parallel_size:
            raise ValueError(f"{self.num_experts} experts cannot be split over "
                             f"expert-parallel size {expert_model_parallel_size}: it must "
                             f"divide the number of experts")
        if self.moe_layers is not None and self.moe_layers[-1] >= num_layers:
            raise ValueError(f"moe_layers {self.moe_layers} names a layer >= "
                             f"num_layers={num_layers}")

    def transformer_overrides(self, ffn_hidden_size: int) -> dict:
        """Megatron TransformerConfig fields of this MoE layer (see module docstring)."""
        return dict(
            num_moe_experts=self.num_experts,
            moe_ffn_hidden_size=self.expert_size(ffn_hidden_size),
            moe_router_topk=self.max_experts_per_token,
            moe_router_load_balancing_type="aux_loss" if self.aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=self.aux_loss_coeff,
            moe_router_score_function="softmax",
            moe_router_pre_softmax=self.combine == "softmax",
            moe_router_topk_scaling_factor=None if self.scale == 1.0 else self.scale,
            moe_expert_capacity_factor=self.capacity_factor,
            moe_token_drop_policy=self.drop_policy,
            moe_pad_expert_input_to_capacity=self.pad_to_capacity,
            moe_router_dtype="fp32",
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
        )

    def to_dict(self) -> dict:
        """Plain dict (JSON-able) for checkpoint metadata; `from_dict` inverts it."""
        d = asdict(self)
        if self.moe_layers is not None:
            d["moe_layers"] = list(self.moe_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AdaptiveGatingConfig":
        """Rebuild a config written by `to_dict` (unknown keys are an error)."""
        d = dict(d)
        if d.get("moe_layers") is not None:
            d["moe_layers"] = tuple(d["moe_layers"])
        return cls(**d)
