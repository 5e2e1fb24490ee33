"""Forward FLOPs per token of a decoder, from the measured FFN fraction of each layer.

Counted as 2 FLOPs per multiply-add of every matrix product a token takes part in (H hidden
size, F FFN size, V vocabulary, G = query groups x head dim, the key/value width, c = the
number of positions the token attends to, f_l = the FFN fraction of layer l, R = router
outputs per layer):

    attention projections  2 H (H + 2 G) + 2 H H       per layer (QKV, output)
    attention core         4 H c                       per layer (Q K^T and A V over c keys)
    FFN                    2 k H F f_l                 per layer, k = 3 gated (SwiGLU), 2 not
    router                 2 H R                       per MoE layer (0 for dense)
    LM head                2 H V                       once

Embedding lookups, norms, softmax, activations and residual adds are O(H) per token and are
left out, as in the usual 2 N FLOPs-per-token estimates. For a causal window of s tokens
the mean context is c = (s + 1) / 2. The dense reference has f_l = 1 and no router.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_dynamoe.models.architectures import ModelArchitecture


@dataclass(frozen=True)
class FlopsBreakdown:
    """Forward FLOPs of one token, by part."""

    attention: float
    ffn: float
    router: float
    lm_head: float

    @property
    def total(self) -> float:
        """All counted FLOPs of the token."""
        return self.attention + self.ffn + self.router + self.lm_head


def causal_mean_context(seq_length: int) -> float:
    """Mean number of attended positions per token of a full causal window: (s + 1) / 2."""
    return (seq_length + 1) / 2


def forward_flops_per_token(arch: ModelArchitecture, ffn_fractions: Optional[Sequence[float]],
                            context: float, router_outputs: int = 0,
                            routed_layers: Optional[int] = None) -> FlopsBreakdown:
    """FLOPs of one token's forward (see the module docstring for the formula).

    Args:
        arch: the dense architecture (H, F, V, heads, query groups, layers).
        ffn_fractions: FFN fraction of each decoder layer (None = all 1, the dense model).
        context: positions attended to (e.g. `causal_mean_context(s)`).
        router_outputs: R, outputs of each MoE layer's router (K levels for DynaMoE, S shells
            for top-k; 0 for a dense model).
        routed_layers: how many layers have a router (default: all of them).
    """
    layers = arch.num_layers
    fractions = [1.0] * layers if ffn_fractions is None else list(ffn_fractions)
    if len(fractions) != layers:
        raise ValueError(f"{len(fractions)} FFN fractions for {layers} layers")
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        raise ValueError(f"FFN fractions must be in [0, 1], got {fractions}")
    h, ffn, vocab = arch.hidden_size, arch.ffn_hidden_size, arch.vocab_size
    kv = arch.query_groups * (h // arch.num_attention_heads)
    matrices = 3 if arch.gated else 2
    attention = layers * (2 * h * (h + 2 * kv) + 2 * h * h + 4 * h * context)
    ffn_flops = sum(2 * matrices * h * ffn * f for f in fractions)
    router = (layers if routed_layers is None else routed_layers) * 2 * h * router_outputs
    return FlopsBreakdown(float(attention), float(ffn_flops), float(router),
                          float(2 * h * vocab))


def relative_forward_flops(arch: ModelArchitecture, ffn_fractions: Sequence[float],
                           context: float, router_outputs: int = 0,
                           routed_layers: Optional[int] = None) -> float:
    """Total forward FLOPs per token relative to the dense model at the same context."""
    model = forward_flops_per_token(arch, ffn_fractions, context, router_outputs, routed_layers)
    dense = forward_flops_per_token(arch, None, context)
    return model.total / dense.total
