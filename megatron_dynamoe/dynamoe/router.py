"""DifficultyRouter: Megatron-Core router that assigns each token a nested level.

Plugged into `MoELayer` through `MoESubmodules.router`. A small fp32 linear map reads the
FFN input and predicts a distribution over levels 1..K; its cumulative form is monotone by
construction, and the sensitivity theta picks each token's level (see routing.py). The
routing map sends a token to every shell of its level with weight 1, so the experts'
FLOPs are proportional to the level.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from megatron.core.transformer.moe.router import Router
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dynamoe.dynamoe import routing
from megatron_dynamoe.dynamoe.config import DynaMoEConfig, check_sensitivity
from megatron_dynamoe.dynamoe.shells import shell_placement


class LevelDecision(NamedTuple):
    """What the router decided for T local tokens."""

    logits: torch.Tensor       # [T, K] fp32 level logits (differentiable)
    levels: torch.Tensor       # [T] int64 in 1..K
    probs: torch.Tensor        # [T, S] expert weights: 1 on the token's shells, 0 elsewhere
    routing_map: torch.Tensor  # [T, S] bool over physical experts


class DifficultyRouter(Router):
    """Per-layer difficulty router over K nested levels (Megatron `Router` subclass).

    Parameters are a [K, H] weight and a [K] bias stored in the model's `params_dtype` and
    always applied in fp32 (as Megatron's router with `moe_router_dtype='fp32'`). Under --bf16
    they are bf16 like every other weight: Megatron's optimizers keep fp32 main copies, and
    neither its mixed-precision nor its distributed optimizer can checkpoint a model that mixes
    parameter dtypes. They are initialised to zero: the initial level distribution is uniform,
    so theta maps linearly to compute until the router is trained. Under sequence parallelism the parameters are tagged
    `sequence_parallel` so their gradients are all-reduced over TP like Megatron's router.
    """

    def __init__(self, config: TransformerConfig, pg_collection=None,
                 dynamoe_config: Optional[DynaMoEConfig] = None):
        if dynamoe_config is None:
            raise ValueError("DifficultyRouter needs a DynaMoEConfig (build it through "
                             "megatron_dynamoe.models.spec, which binds it)")
        self.dynamoe_config = dynamoe_config
        super().__init__(config=config, pg_collection=pg_collection)
        if config.num_moe_experts != dynamoe_config.num_shells:
            raise ValueError(f"num_moe_experts={config.num_moe_experts} must equal "
                             f"--dynamoe-num-shells={dynamoe_config.num_shells}")
        num_levels = dynamoe_config.num_levels
        # Replace the base class's [num_experts, H] gate with the [K, H] level predictor.
        self.weight = torch.nn.Parameter(
            torch.zeros(num_levels, config.hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(num_levels, dtype=config.params_dtype))
        for param in (self.weight, self.bias):
            setattr(param, "sequence_parallel", config.sequence_parallel)
        self._level_parameters = True
        self.sensitivity = dynamoe_config.sensitivity
        # When set, every token goes to this level whatever the router says: the static
        # nested sub-network at that width (exports and the Flextron-style baseline).
        self.static_level: Optional[int] = None
        # Physical expert slot -> logical shell; must match the experts' placement.
        placement = shell_placement(dynamoe_config.num_shells, pg_collection.ep.size(),
                                    dynamoe_config.shell_placement)
        self.placement = placement
        level_masks = routing.to_physical(
            routing.logical_level_masks(dynamoe_config.level_shells), placement)
        group_masks = routing.to_physical(
            routing.logical_group_masks(dynamoe_config.level_shells), placement)
        self.register_buffer("level_masks", level_masks, persistent=False)
        self.register_buffer("group_masks", group_masks, persistent=False)

    def reset_parameters(self):
        """Zero init (uniform level distribution); called by the base constructor too."""
        if getattr(self, "_level_parameters", False):
            with torch.no_grad():
                self.weight.zero_()
                self.bias.zero_()

    def set_sensitivity(self, theta: float) -> None:
        """Set theta in [0, 1] for subsequent forwards."""
        self.sensitivity = check_sensitivity(theta)

    def set_static_level(self, level: Optional[int]) -> None:
        """Route every token to `level` (1..K), or back to the router with None."""
        if level is not None and not 1 <= level <= self.dynamoe_config.num_levels:
            raise ValueError(f"level {level} outside 1..{self.dynamoe_config.num_levels}")
        self.static_level = level

    def _levels(self, logits: torch.Tensor) -> torch.Tensor:
        if self.static_level is not None:
            return torch.full((logits.shape[0],), self.static_level, dtype=torch.long,
                              device=logits.device)
        q = routing.cumulative_level_probs(logits)
        return routing.levels_at_sensitivity(q, self.sensitivity)

    def level_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [T, K] fp32 logits (computed in fp32 whatever the input dtype).

        The input is detached: the router learns to predict difficulty from the
        representation without its loss pulling on the trunk, so at theta = 1 every shared
        parameter gets exactly the dense model's gradient, on label steps too.
        """
        x = hidden_states.detach().reshape(-1, hidden_states.shape[-1]).float()
        return torch.nn.functional.linear(x, self.weight.float(), self.bias.float())

    def decide(self, hidden_states: torch.Tensor) -> LevelDecision:
        """Levels, routing map and unit probs for the current sensitivity."""
        logits = self.level_logits(hidden_states)
        with torch.no_grad():
            levels = self._levels(logits)
            routing_map = routing.level_routing_map(levels, self.level_masks)
        # Unit weights: the shells' outputs are summed, not mixed; no gradient flows to the
        # router through them (it learns from the label loss).
        probs = routing_map.to(torch.float32)
        return LevelDecision(logits, levels, probs, routing_map)

    def routing(self, logits: torch.Tensor):
        """Megatron Router API: level logits [T, K] -> (probs [T, S], routing_map [T, S])."""
        routing_map = routing.level_routing_map(self._levels(logits), self.level_masks)
        return routing_map.to(torch.float32), routing_map

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Megatron Router API: hidden states [s, b, H] -> (probs, routing_map), [s*b, S]."""
        decision = self.decide(input)
        return decision.probs, decision.routing_map
