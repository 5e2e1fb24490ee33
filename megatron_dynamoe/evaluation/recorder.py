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

At any TP / PP layout: hooks sit on this pipeline stage's layers (their router inputs are the
full hidden states at every TP rank), and `commit` all-gathers the stages' per-token results
over the pipeline group, so every rank sees every layer of the model, in layer order
(`layer_info` describes them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_dynamoe.dynamoe import routing
from megatron_dynamoe.dynamoe.layer import DynaMoELayer
from megatron_dynamoe.runtime.forward_only import pipeline_group


def decoder_layers(model) -> list:
    """The decoder layers of this rank's pipeline stage of a GPTModel."""
    return list(model.decoder.layers)


@dataclass(frozen=True)
class LayerInfo:
    """What the recorder knows of one decoder layer of the whole model: `kind` 'dynamoe',
    'moe' (another router over the same shells) or 'dense'; a DynaMoE layer's FFN fraction
    per level; the router's outputs (K levels, S shells, 0)."""

    kind: str
    level_fractions: Optional[Tuple[float, ...]] = None
    router_outputs: int = 0


def _layer_info(layer) -> LayerInfo:
    mlp = layer.mlp
    if isinstance(mlp, DynaMoELayer):
        cfg = mlp.dynamoe_config
        # The layer's level_compute_fraction, recomputed on the host from its config (the
        # same float32 values; the buffer may live on a device, or on `meta` in tests).
        shells = torch.tensor(cfg.level_shells, dtype=torch.float32, device="cpu")
        return LayerInfo("dynamoe", tuple((shells / cfg.num_shells).tolist()), cfg.num_levels)
    if isinstance(mlp, MoELayer):
        return LayerInfo("moe", None, mlp.router.weight.shape[0])
    return LayerInfo("dense")


def model_layer_info(model) -> List[LayerInfo]:
    """LayerInfo of every decoder layer of the whole model, in layer order, on every rank
    (the pipeline stages' lists are exchanged once: a small Python object exchange)."""
    local = [_layer_info(layer) for layer in decoder_layers(model)]
    group = pipeline_group()
    if group is None:
        return local
    stages: List[Optional[List[LayerInfo]]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(stages, local, group=group)
    return [info for stage in stages for info in stage]


class FFNComputeRecorder:
    """Context manager recording, per decoder layer, the FFN fraction of every token.

    After a forward of a [b, s] batch, `commit(valid)` adds the valid tokens to the running
    per-layer sums and returns the batch's per-token fractions [L, b, s] (and keeps the
    DynaMoE levels [L, b, s], 0 for non-DynaMoE layers, in `last_levels`). With
    `keep_router_probs`, `last_q[i]` holds layer i's cumulative level probabilities [b, s, K]
    (DynaMoE layers only; the budget solver needs them).
    """

    def __init__(self, model, keep_router_probs: bool = False):
        self.layers = decoder_layers(model)  # this stage's: the hooks' targets
        self.layer_info = model_layer_info(model)  # the whole model's: what results cover
        self.keep_router_probs = keep_router_probs
        self._group = pipeline_group()
        # K of the DynaMoE layers (0 without any): the width of the gathered q.
        self._num_levels = max((info.router_outputs for info in self.layer_info
                                if info.kind == "dynamoe"), default=0)
        local, count = len(self.layers), len(self.layer_info)
        self.fraction_sums = torch.zeros(count, dtype=torch.float64)
        self.tokens = 0
        self._fractions: List[Optional[torch.Tensor]] = [None] * local  # [s, b] each
        self._levels: List[Optional[torch.Tensor]] = [None] * local
        self._q: List[Optional[torch.Tensor]] = [None] * local
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
        fractions [L, b, s] (1 for dense layers) of every layer of the model and clears the
        per-forward state (every rank of the pipeline group calls it after each forward)."""
        batch, seq = valid.shape
        device = valid.device
        # Row 0: fractions (1 for dense layers), row 1: DynaMoE levels (0 elsewhere); built
        # where the hooks left them, gathered over the stages, copied to the host once.
        local = torch.zeros(2, len(self.layers), batch, seq, dtype=torch.float64,
                            device=device)
        local[0] = 1.0
        q_local = None
        if self.keep_router_probs and self._num_levels:
            q_local = torch.zeros(len(self.layers), batch, seq, self._num_levels,
                                  dtype=torch.float32, device=device)
        for i, fraction in enumerate(self._fractions):
            if fraction is not None:
                if fraction.shape != (seq, batch):
                    raise RuntimeError(f"layer {i}: routed {tuple(fraction.shape)} tokens, "
                                       f"the batch is {(seq, batch)}")
                local[0, i] = fraction.t()
            if self._levels[i] is not None:
                local[1, i] = self._levels[i].t().double()  # exact: levels are small ints
            if q_local is not None and self._q[i] is not None:
                q_local[i] = self._q[i].transpose(0, 1).float()
        if self._group is not None:
            local = self._gather_stages(local, dim=1)
            if q_local is not None:
                q_local = self._gather_stages(q_local, dim=0)
        self.last_q = [q_local[i] if q_local is not None and info.kind == "dynamoe" else None
                       for i, info in enumerate(self.layer_info)]
        host = local.cpu()
        per_token, levels = host[0], host[1].long()
        valid = valid.cpu()
        self.fraction_sums += (per_token * valid.unsqueeze(0)).sum(dim=(1, 2))
        self.tokens += int(valid.sum())
        self.last_levels = levels
        self._fractions = [None] * len(self.layers)
        self._levels = [None] * len(self.layers)
        self._q = [None] * len(self.layers)
        return per_token

    def _gather_stages(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """`tensor` of every pipeline stage (equal shapes: PP divides the layers), joined
        along `dim` in stage order."""
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(self._group))]
        dist.all_gather(parts, tensor.contiguous(), group=self._group)
        return torch.cat(parts, dim=dim)

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
