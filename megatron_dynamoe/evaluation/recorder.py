"""Per-token FFN compute of every decoder layer, measured during ordinary forwards.

The FFN compute of a token at a layer is the fraction of that layer's FFN neurons it used:
`level_fraction[level]` for a DynaMoE layer (its nested level), `shells / S` for a MoE layer
over the same shells with another router (the top-k baseline), 1 for a dense layer. Shells
are equal-size, so this is also the fraction of the layer's FFN FLOPs.

The recorder hooks the model without changing it: a forward pre-hook on each DynaMoE layer
re-derives the levels with the layer's own router (`DifficultyRouter.decide`, deterministic
and cheap: one [T, H] x [H, K] product), and a forward hook on any other MoE layer's router
reads its routing map. Callers `commit(valid)` after each forward so that padding tokens are
not counted.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_dynamoe.dynamoe import routing
from megatron_dynamoe.dynamoe.layer import DynaMoELayer


def decoder_layers(model) -> list:
    """The decoder layers of a single-stage GPTModel (TP = PP = 1 evaluation)."""
    return list(model.decoder.layers)


class FFNComputeRecorder:
    """Context manager recording, per decoder layer, the FFN fraction of every token.

    After a forward of a [b, s] batch, `commit(valid)` adds the valid tokens to the running
    per-layer sums and returns the batch's per-token fractions [L, b, s] (and keeps the
    DynaMoE levels [L, b, s], 0 for non-DynaMoE layers, in `last_levels`). With
    `keep_router_probs`, `last_q[i]` holds layer i's cumulative level probabilities [b, s, K]
    (DynaMoE layers only; the budget solver needs them).
    """

    def __init__(self, model, keep_router_probs: bool = False):
        self.layers = decoder_layers(model)
        self.keep_router_probs = keep_router_probs
        count = len(self.layers)
        self.fraction_sums = torch.zeros(count, dtype=torch.float64)
        self.tokens = 0
        self._fractions: List[Optional[torch.Tensor]] = [None] * count  # [s, b] each
        self._levels: List[Optional[torch.Tensor]] = [None] * count
        self._q: List[Optional[torch.Tensor]] = [None] * count
        self.last_levels: Optional[torch.Tensor] = None
        self.last_q: List[Optional[torch.Tensor]] = [None] * count
        self._handles = []

    # ---- hooks -----------------------------------------------------------------------------
    def __enter__(self) -> "FFNComputeRecorder":
        for i, layer in enumerate(self.layers):
            mlp = layer.mlp
            if isinstance(mlp, DynaMoELayer):
                self._handles.append(mlp.register_forward_pre_hook(self._dynamoe_hook(i),
                                                                   with_kwargs=True))
            elif isinstance(mlp, MoELayer):
                self._handles.append(mlp.router.register_forward_hook(self._router_hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _dynamoe_hook(self, index: int):
        def hook(layer: DynaMoELayer, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]  # [s, b, H]
            with torch.no_grad():
                decision = layer.router.decide(hidden)
                seq, batch = hidden.shape[:2]
                levels = decision.levels.view(seq, batch)
                self._levels[index] = levels
                self._fractions[index] = layer.level_compute_fraction[levels - 1].double()
                if self.keep_router_probs:
                    q = routing.cumulative_level_probs(decision.logits)
                    self._q[index] = q.view(seq, batch, -1)
        return hook

    def _router_hook(self, index: int):
        def hook(router, args, output):
            hidden = args[0]
            routing_map = output[1]  # [s * b, S] bool
            seq, batch = hidden.shape[:2]
            shells = routing_map.sum(dim=-1).double() / routing_map.shape[-1]
            self._fractions[index] = shells.view(seq, batch)
        return hook

    # ---- results ---------------------------------------------------------------------------
    def commit(self, valid: torch.Tensor) -> torch.Tensor:
        """Account the last forward's valid tokens ([b, s] bool); returns its per-token
        fractions [L, b, s] (1 for dense layers) and clears the per-forward state."""
        batch, seq = valid.shape
        per_token = torch.ones(len(self.layers), batch, seq, dtype=torch.float64)
        levels = torch.zeros(len(self.layers), batch, seq, dtype=torch.long)
        # Every layer's fractions and levels reach the host in one copy (not one per layer).
        pieces, slots = [], []
        for i, fraction in enumerate(self._fractions):
            if fraction is not None:
                if fraction.shape != (seq, batch):
                    raise RuntimeError(f"layer {i}: routed {tuple(fraction.shape)} tokens, "
                                       f"the batch is {(seq, batch)}")
                pieces.append(fraction.t().double())
                slots.append((per_token, i))
            if self._levels[i] is not None:
                pieces.append(self._levels[i].t().double())   # exact: levels are small ints
                slots.append((levels, i))
            self.last_q[i] = None if self._q[i] is None else self._q[i].transpose(0, 1)
        if pieces:
            host = torch.stack(pieces).cpu()
            for (target, i), values in zip(slots, host):
                target[i] = values
        valid = valid.cpu()
        self.fraction_sums += (per_token * valid.unsqueeze(0)).sum(dim=(1, 2))
        self.tokens += int(valid.sum())
        self.last_levels = levels
        self._fractions = [None] * len(self.layers)
        self._levels = [None] * len(self.layers)
        self._q = [None] * len(self.layers)
        return per_token

    def reset(self) -> None:
        """Forget the accumulated sums (hooks stay installed)."""
        self.fraction_sums.zero_()
        self.tokens = 0

    def layer_fractions(self) -> List[float]:
        """Mean FFN fraction of each decoder layer over the committed tokens."""
        if not self.tokens:
            raise RuntimeError("no tokens committed yet")
        return (self.fraction_sums / self.tokens).tolist()

    def mean_fraction(self) -> float:
        """Mean FFN fraction of the model: the mean over layers (every layer's FFN has the
        same size), i.e. FFN FLOPs spent / dense FFN FLOPs."""
        fractions = self.layer_fractions()
        return sum(fractions) / len(fractions)
