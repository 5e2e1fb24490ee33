"""DynaMoELayer: a Megatron-Core MoELayer whose experts are nested shells of one FFN.

Two forwards, both through Megatron's own token dispatcher and experts:

- routed (inference, and training steps without labels): the DifficultyRouter gives each
  token a level; the token is dispatched to exactly that level's shells with weight 1 and
  the shell outputs are summed. Experts see only the tokens routed to them, so FLOPs are
  proportional to the level.
- labelled (a `label_fraction` of training steps): every token is dispatched K times, copy j
  to the shells that level j adds (disjoint groups, so the expert work equals one full-FFN
  pass). The K group outputs give every level's partial output as a prefix sum, hence the
  difficulty labels (relative to the residual stream, which `DynaMoETransformerLayer`
  hands the layer, or to the full FFN output); the layer output is each token's prefix at its routed level (same
  value and same gradient paths as the routed forward) and the router's cross-entropy on
  the labels is attached to it as a side loss with Megatron's MoEAuxLossAutoScaler.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Dict, Optional

import torch

from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    save_to_aux_losses_tracker,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dynamoe.dynamoe import routing
from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.dynamoe.router import DifficultyRouter, LevelDecision

ROUTER_LOSS_NAME = "dynamoe_router_loss"


def is_label_step(step: int, fraction: float) -> bool:
    """Whether training step `step` (0-based) computes labels, for a label `fraction`.

    Spreads label steps evenly and deterministically (step 0 always labels when
    fraction > 0): step s labels iff ceil((s+1) f) > ceil(s f). Every rank evaluates the same
    schedule, which matters: a labelled forward changes the dispatcher's communication.
    """
    if fraction <= 0.0:
        return False
    f = Fraction(fraction).limit_denominator(1_000_000)
    return math.ceil((step + 1) * f) > math.ceil(step * f)


def check_megatron_config(config: TransformerConfig, dynamoe_config: DynaMoEConfig) -> None:
    """Reject TransformerConfig settings the shell layer cannot honour, naming the fix."""
    problems = []
    if config.num_moe_experts != dynamoe_config.num_shells:
        problems.append(f"num_moe_experts={config.num_moe_experts} must equal the number of "
                        f"shells {dynamoe_config.num_shells}")
    if config.moe_ffn_hidden_size * dynamoe_config.num_shells != config.ffn_hidden_size:
        problems.append(f"moe_ffn_hidden_size={config.moe_ffn_hidden_size} x "
                        f"{dynamoe_config.num_shells} shells must equal ffn_hidden_size="
                        f"{config.ffn_hidden_size}")
    if config.add_bias_linear:
        problems.append("DynaMoE shells need bias-free FFNs (add_bias_linear=False): a shared "
                        "fc2 bias would be added once per shell")
    if config.moe_token_dispatcher_type not in ("alltoall", "allgather"):
        problems.append(f"moe_token_dispatcher_type={config.moe_token_dispatcher_type!r}: use "
                        f"'alltoall' or 'allgather'")
    if config.moe_expert_capacity_factor is not None:
        problems.append("moe_expert_capacity_factor must be None: dropping tokens would cut "
                        "shells out of a level")
    if config.moe_permute_fusion:
        problems.append("moe_permute_fusion must be False: the fused permute assumes the same "
                        "number of experts for every token")
    if config.moe_shared_expert_intermediate_size is not None:
        problems.append("shared experts are not part of a DynaMoE layer")
    if config.moe_latent_size:
        problems.append("moe_latent_size is not supported by DynaMoE layers")
    if config.recompute_granularity == "selective" and "moe" in (config.recompute_modules or []):
        problems.append("selective recompute of 'moe' is not supported; use full-layer "
                        "recompute")
    if problems:
        raise ValueError("DynaMoE layer configuration: " + "; ".join(problems))


class DynaMoELayer(MoELayer):
    """Nested-shell MoE layer (see module docstring). Returns (output, None) like MoELayer.

    `last_stats` holds detached per-forward statistics of the local tokens for logging:
    level counts, FFN compute fraction, tokens per physical expert, and on labelled steps
    the router loss, accuracy and label counts.
    """

    def __init__(self, config: TransformerConfig, submodules: Optional[MoESubmodules] = None,
                 layer_number: Optional[int] = None, pg_collection=None,
                 dynamoe_config: Optional[DynaMoEConfig] = None):
        if dynamoe_config is None:
            raise ValueError("DynaMoELayer needs a DynaMoEConfig (bound by the DynaMoE spec)")
        check_megatron_config(config, dynamoe_config)
        super().__init__(config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection)
        if not isinstance(self.router, DifficultyRouter):
            raise TypeError(f"DynaMoELayer needs a DifficultyRouter, got {type(self.router)}")
        dynamoe_config.validate_for_model(
            config.ffn_hidden_size, config.num_layers,
            expert_model_parallel_size=self.ep_group.size(),
            expert_tensor_parallel_size=self.experts.tp_group.size())
        self.dynamoe_config = dynamoe_config
        self.step = 0
        self.last_stats: Dict[str, torch.Tensor] = {}
        # Per-token norms of the residual stream entering the FFN block, set by the enclosing
        # DynaMoETransformerLayer just before this layer's forward (label reference).
        self._residual_norms: Optional[torch.Tensor] = None
        # Router fitting (router_fit.py): label every forward, whatever the mode, and keep
        # the router inputs and targets in last_stats.
        self.collect_router_data = False
        shells = torch.tensor(dynamoe_config.level_shells, dtype=torch.float32)
        self.register_buffer("level_compute_fraction", shells / dynamoe_config.num_shells,
                             persistent=False)

    # ---- run-time control ------------------------------------------------------------------
    def set_sensitivity(self, theta: float) -> None:
        """Set theta in [0, 1] for this layer's router."""
        self.router.set_sensitivity(theta)

    def set_step(self, step: int) -> None:
        """Tell the layer the training step, which decides whether it computes labels."""
        self.step = int(step)

    def computes_labels(self) -> bool:
        """Whether the next forward is a labelled one."""
        return self.collect_router_data or (
            self.training and torch.is_grad_enabled()
            and is_label_step(self.step, self.dynamoe_config.label_fraction))

    def observe_residual(self, residual: torch.Tensor) -> None:
        """Record the per-token norm of the residual stream [s, b, H] this FFN's output is
        added to (called by DynaMoETransformerLayer before the pre-MLP norm); kept only when
        the next forward computes residual-relative labels."""
        self._residual_norms = None
        if self.dynamoe_config.label_reference == "residual" and self.computes_labels():
            with torch.no_grad():
                self._residual_norms = residual.detach().reshape(
                    -1, residual.shape[-1]).float().norm(dim=-1)

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None,
                padding_mask: Optional[torch.Tensor] = None):
        """[s, b, H] -> ([s, b, H], None). `padding_mask` is accepted for API compatibility;
        padded tokens are routed like others (their loss is masked downstream)."""
        if intermediate_tensors is not None:
            raise NotImplementedError("DynaMoELayer does not support partial CUDA-graph capture")
        if self.training and self.attn_tp_group.size() > 1 and not self.config.sequence_parallel:
            raise ValueError("training a DynaMoE layer with tensor parallelism needs "
                             "--sequence-parallel (as for any Megatron MoE layer)")
        self.last_stats = {}
        decision = self.router.decide(hidden_states)
        if self.computes_labels():
            try:
                output = self._labelled_forward(hidden_states, decision)
            finally:
                self._residual_norms = None
        else:
            output = self._dispatch_to_shells(hidden_states, decision.probs, decision.routing_map)
        self._record_routing_stats(decision)
        return output, None

    def _dispatch_to_shells(self, hidden_states, probs, routing_map):
        """Megatron's dispatch -> experts -> combine for an explicit routing."""
        hidden, probs = self.preprocess(hidden_states, probs, routing_map)
        dispatched, probs = self.dispatch(hidden, probs)
        output, _ = self.routed_experts_compute(dispatched, probs)
        output = self.combine(output)
        return self.postprocess(output, None)

    def _labelled_forward(self, hidden_states: torch.Tensor, decision: LevelDecision):
        seq, batch, hidden = hidden_states.shape
        tokens, levels = seq * batch, self.dynamoe_config.num_levels
        # Copy j of token t goes to the shells level j+1 adds: [T*K, 1, H] and [T*K, S].
        copies = hidden_states.reshape(tokens, 1, hidden).expand(tokens, levels, hidden)
        copies = copies.reshape(tokens * levels, 1, hidden)
        group_map = self.router.group_masks.unsqueeze(0).expand(tokens, -1, -1)
        group_map = group_map.reshape(tokens * levels, -1)
        groups = self._dispatch_to_shells(copies, group_map.to(torch.float32), group_map)
        groups = groups.view(tokens, levels, hidden)

        targets = self._label_targets(groups)
        labels = routing.median_levels(targets)
        output = routing.select_level_output(groups, decision.levels).view(seq, batch, hidden)
        if torch.is_grad_enabled():
            output = self._attach_router_loss(output, decision.logits, targets)
        with torch.no_grad():
            predicted = routing.median_levels(torch.softmax(decision.logits.float(), dim=-1))
            self.last_stats["router_accuracy"] = (predicted == labels).float().mean()
            self.last_stats["label_counts"] = torch.bincount(labels - 1, minlength=levels)
            self.last_stats["labels"] = labels
            if self.collect_router_data:
                self.last_stats["router_inputs"] = hidden_states.detach().reshape(
                    tokens, hidden).float()
                self.last_stats["label_targets"] = targets
        return output

    def _label_targets(self, groups: torch.Tensor) -> torch.Tensor:
        """[T, K, H] group outputs -> [T, K] router targets (routing.label_targets)."""
        cfg = self.dynamoe_config
        errors = routing.level_errors(groups)
        if cfg.label_reference == "ffn":
            reference = groups.detach().double().sum(dim=1).norm(dim=-1)
        else:
            reference = self._residual_norms
            if reference is None or reference.shape[0] != groups.shape[0]:
                raise RuntimeError(
                    "residual-relative labels need the residual stream: build the layer "
                    "through megatron_dynamoe.dynamoe.spec (DynaMoETransformerLayer), or set "
                    "label_reference='ffn'")
        return routing.label_targets(errors, reference, cfg.label_tolerance,
                                     cfg.label_tolerance_max)

    def _attach_router_loss(self, output, logits, targets):
        coeff = self.dynamoe_config.router_loss_coeff
        tokens = logits.shape[0]
        ce_sum = routing.router_cross_entropy(logits, targets)
        # Mean over the sequence: with sequence parallelism each TP rank holds 1/TP of the
        # tokens and the router's gradients are summed over TP.
        tp_share = self.attn_tp_group.size() if self.config.sequence_parallel else 1
        mean_ce = ce_sum / (tokens * tp_share)
        self.last_stats["router_loss"] = (ce_sum / tokens).detach()
        if coeff == 0.0:
            return output
        side_loss = coeff * mean_ce
        if self.config.calculate_per_token_loss:
            # Megatron divides every gradient by the token count later; undo it here.
            side_loss = side_loss * tokens
        save_to_aux_losses_tracker(ROUTER_LOSS_NAME, mean_ce.detach(), self.layer_number,
                                   self.config.num_layers, reduce_group=self.attn_tp_group
                                   if self.config.sequence_parallel else None)
        return MoEAuxLossAutoScaler.apply(output, side_loss)

    def _record_routing_stats(self, decision: LevelDecision) -> None:
        with torch.no_grad():
            levels = decision.levels
            self.last_stats["tokens"] = torch.tensor(levels.numel())
            self.last_stats["level_counts"] = torch.bincount(
                levels - 1, minlength=self.dynamoe_config.num_levels)
            self.last_stats["ffn_fraction"] = (
                self.level_compute_fraction[levels - 1].mean() if levels.numel()
                else torch.tensor(0.0))
            self.last_stats["tokens_per_expert"] = decision.routing_map.sum(dim=0)
