"""AdaptiveRouter: Megatron-Core top-k router whose tokens use a variable number of experts.

Plugged into Megatron's own `MoELayer` through `MoESubmodules.router`; it returns the
router contract of `TopKRouter` (probs [T, E] float, routing_map [T, E] bool), so Megatron's
token dispatchers (alltoall, allgather), experts, expert parallelism and checkpoints carry
the tokens unchanged, and experts only compute the tokens routed to them.

The routing decisions are pure tensor functions below (shapes in their docstrings); the
router adds Megatron's machinery around them: fp32 gating (`Router.gating`), input jitter
and z-loss, capacity dropping (Megatron's capacity and policies), and the Switch
load-balancing loss attached to the probs with `MoEAuxLossAutoScaler`
(`attach_and_log_load_balancing_loss`), counted over top-1 decisions for adaptive / top-p
gating.

Statistics of the local tokens are computed on the device without host synchronisation:
after every forward `last_stats` holds that forward's detached tensors, and `stat_sums`
(a `StatSums`) sums them over a window of forwards (reset by the training monitor every
iteration), read on the host with one copy for all layers (`window_scalars`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from megatron.core.transformer.moe.moe_utils import (
    compute_routing_scores_for_aux_loss,
    get_capacity,
    get_tokens_per_expert_and_token_count,
    switch_load_balancing_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dynamoe.adaptive.config import AdaptiveGatingConfig
from megatron_dynamoe.dynamoe.layer import StatSums, counts_statistics, read_stat_sums

LOAD_BALANCING_LOSS_NAME = "load_balancing_loss"  # Megatron's own tracker name


# ---- routing decisions (pure functions) ---------------------------------------------------
def adaptive_top2_map(scores: torch.Tensor, ranking: torch.Tensor,
                      threshold: float) -> torch.Tensor:
    """Adaptive top-2 routing map: top-1 always, the second expert unless p1 - p2 > T.

    Args:
        scores: [T, E] softmax probabilities over all experts (the gap is measured on them).
        ranking: [T, E] values whose top-2 are the candidates (the logits, or `scores`):
            the same tensor Megatron's top-k selects on, so ties break identically.
        threshold: T >= 0. T = 0 keeps two experts only on exact ties; T >= 1 always.
    Returns:
        [T, E] bool map with one or two True per token.
    """
    top = torch.topk(ranking, k=2, dim=1).indices                  # [T, 2]
    p = scores.gather(1, top)                                       # [T, 2]
    keep_second = (p[:, 0] - p[:, 1]) <= threshold                  # [T]
    routing_map = torch.zeros_like(scores, dtype=torch.bool)
    rows = torch.arange(scores.shape[0], device=scores.device)
    routing_map[rows, top[:, 0]] = True
    routing_map[rows, top[:, 1]] = keep_second
    return routing_map


def topk_map(ranking: torch.Tensor, k: int) -> torch.Tensor:
    """[T, E] -> [T, E] bool map of each token's k largest entries (torch.topk, as Megatron)."""
    top = torch.topk(ranking, k=k, dim=1).indices
    return torch.zeros_like(ranking, dtype=torch.bool).scatter(1, top, True)


def topp_map(scores: torch.Tensor, top_p: float, max_experts: int) -> torch.Tensor:
    """Top-p routing map: each token's highest-probability experts, in decreasing order,
    until their probabilities sum to at least `top_p` (at least one, at most `max_experts`).

    Args:
        scores: [T, E] softmax probabilities.
    Returns:
        [T, E] bool map.
    """
    values, indices = torch.topk(scores, k=max_experts, dim=1)      # sorted, decreasing
    # Expert j is needed while the probability mass before it is still short of top_p.
    mass_before = torch.cumsum(values, dim=1) - values
    keep = mass_before < top_p
    keep[:, 0] = True
    return torch.zeros_like(scores, dtype=torch.bool).scatter(1, indices, keep)


def gating_map(gating: AdaptiveGatingConfig, logits: torch.Tensor,
               threshold: Optional[float] = None) -> torch.Tensor:
    """The gating decision of `gating` for [T, E] logits: a [T, E] bool routing map
    (`threshold` overrides the adaptive T of the config).

    Candidates are ranked on the softmax probabilities with combine='softmax' and on the
    logits otherwise, as Megatron's top-k does (`moe_router_pre_softmax`), so the order and
    the tie-breaking are Megatron's.
    """
    scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    ranking = scores if gating.combine == "softmax" else logits
    if gating.gating == "adaptive":
        return adaptive_top2_map(scores, ranking,
                                 gating.threshold if threshold is None else threshold)
    if gating.gating == "topk":
        return topk_map(ranking, gating.topk)
    return topp_map(scores, gating.top_p, gating.max_experts_per_token)


def combine_weights(logits: torch.Tensor, scores: torch.Tensor, routing_map: torch.Tensor,
                    combine: str, scale: Optional[float]) -> torch.Tensor:
    """Expert weights of the selected experts (0 elsewhere), Megatron's conventions.

    Args:
        logits: [T, E] router logits; scores: [T, E] softmax(logits).
        routing_map: [T, E] bool selection.
        combine: 'renormalized' (softmax over the selected logits, Megatron's default) or
            'softmax' (the full-softmax probabilities, Megatron's `moe_router_pre_softmax`).
        scale: optional multiplier (Megatron's `moe_router_topk_scaling_factor`).
    Returns:
        [T, E] float weights, differentiable with respect to `logits`.
    """
    if combine == "renormalized":
        probs = torch.softmax(logits.masked_fill(~routing_map, float("-inf")), dim=-1,
                              dtype=torch.float32).type_as(logits)
    else:
        probs = scores * routing_map
    return probs * scale if scale else probs


def drop_over_capacity(probs: torch.Tensor, routing_map: torch.Tensor, capacity: int,
                       policy: str, pad_to_capacity: bool = False):
    """Enforce an expert capacity: each expert keeps at most `capacity` of its tokens.

    Megatron's `apply_router_token_dropping` semantics, with one fix: its 'position' policy
    takes torch.topk of the 0/1 map, whose order among equal values is unspecified (on the
    CPU it does not keep the earliest tokens); here 'position' ranks routed tokens by
    position explicitly. 'probs' keeps the highest weights, exactly as Megatron.

    Args:
        probs: [T, E] weights (0 where not routed); routing_map: [T, E] bool.
        capacity: tokens per expert (`megatron...moe_utils.get_capacity`).
        policy: 'probs' or 'position'.
        pad_to_capacity: return a map with exactly min(capacity, T) entries per expert
            (Megatron's drop-and-pad: padded entries carry weight 0).
    Returns:
        (probs [T, E], routing_map [T, E] bool) after dropping.
    """
    tokens = routing_map.shape[0]
    if policy == "probs":
        key = probs.detach()
    elif policy == "position":
        # Earlier routed tokens rank higher; every unrouted token ranks below them (0).
        order = torch.arange(tokens, 0, -1, device=probs.device, dtype=probs.dtype)
        key = routing_map * order.unsqueeze(1)
    else:
        raise ValueError(f"unknown drop policy {policy!r}: use 'probs' or 'position'")
    keep = torch.topk(key, k=min(capacity, tokens), dim=0).indices
    capacity_mask = torch.zeros_like(routing_map).scatter(0, keep, True)
    final_map = capacity_mask if pad_to_capacity else routing_map & capacity_mask
    return probs * final_map, final_map


def check_megatron_config(config: TransformerConfig, gating: AdaptiveGatingConfig) -> None:
    """Reject TransformerConfig settings that disagree with `gating` or that this router does
    not implement, naming the fix (build configs with `gating.transformer_overrides`)."""
    expected = gating.transformer_overrides(config.ffn_hidden_size)
    problems = [f"{name}={getattr(config, name)!r} (the gating config needs {value!r})"
                for name, value in expected.items()
                if name not in ("moe_router_dtype", "moe_grouped_gemm")
                and getattr(config, name) != value]
    unsupported = dict(
        moe_router_enable_expert_bias="expert bias",
        moe_router_group_topk="group-limited routing",
        moe_router_force_load_balancing="forced load balancing",
        moe_enable_routing_replay="routing replay",
        moe_router_fusion="fused routing kernels (they assume a fixed k per token)")
    problems += [f"{name} ({what}) is not supported by the adaptive router"
                 for name, what in unsupported.items() if getattr(config, name, None)]
    if config.moe_token_dispatcher_type not in ("alltoall", "allgather"):
        problems.append(f"moe_token_dispatcher_type={config.moe_token_dispatcher_type!r}: use "
                        f"'alltoall' or 'allgather'")
    if problems:
        raise ValueError("adaptive MoE router configuration: " + "; ".join(problems))


class AdaptiveRouter(TopKRouter):
    """Adaptive top-2 / top-k / top-p router (a Megatron `TopKRouter`; see module docstring).

    The gate is Megatron's: an [E, H] fp32 weight read by `Router.gating`, initialised by
    `config.init_method` and tagged for sequence parallelism. `moe_router_topk` is the bound
    on experts per token (2 for adaptive gating); tokens may use fewer.

    Statistics (device tensors, no host syncs; padding excluded):
    - `last_stats`, the last forward: `tokens`, `experts_per_token` [s, b] (0 at padding),
      `two_expert_share`, `mean_experts_per_token`, `tokens_per_expert` [E] (after
      capacity), `dropped_assignments`, `dropped_tokens`;
    - `stat_sums`, summed over the forwards of the window (`counts_statistics`): `tokens`,
      `two_expert_tokens`, `assignments` (experts chosen, before capacity),
      `tokens_per_expert` [E], `dropped_assignments`, `dropped_tokens`, host counter
      `forwards`; `summarize_stats` gives the window's shares, `reset_stats` a new window.
    """

    def __init__(self, config: TransformerConfig, pg_collection=None,
                 gating: Optional[AdaptiveGatingConfig] = None):
        if gating is None:
            raise ValueError("AdaptiveRouter needs an AdaptiveGatingConfig (build it through "
                             "megatron_dynamoe.adaptive.spec, which binds it)")
        check_megatron_config(config, gating)
        super().__init__(config=config, pg_collection=pg_collection)
        self.gating_config = gating
        # The run-time T (the config, shared by every layer, keeps the built value).
        self.threshold = gating.threshold
        self.last_stats: Dict[str, torch.Tensor] = {}
        self.stat_sums = StatSums([("tokens", 1), ("two_expert_tokens", 1), ("assignments", 1),
                                   ("tokens_per_expert", self.num_experts),
                                   ("dropped_assignments", 1), ("dropped_tokens", 1)],
                                  counters=("forwards",))

    def reset_stats(self) -> None:
        """Start a new statistics window (`stat_sums`)."""
        self.stat_sums.reset()

    @staticmethod
    def summarize_stats(sums: Dict[str, Any]) -> Dict[str, Any]:
        """Host numbers of one window from its `read_stat_sums` entry (plain Python):
        `forwards`, `tokens`, `two_expert_share`, `mean_experts_per_token` (0 without
        tokens), `tokens_per_expert` [E], `dropped_assignments`, `dropped_tokens`."""
        tokens = sums["tokens"][0]
        per = max(tokens, 1.0)
        return dict(forwards=sums["forwards"], tokens=tokens,
                    two_expert_share=sums["two_expert_tokens"][0] / per,
                    mean_experts_per_token=sums["assignments"][0] / per,
                    tokens_per_expert=list(sums["tokens_per_expert"]),
                    dropped_assignments=sums["dropped_assignments"][0],
                    dropped_tokens=sums["dropped_tokens"][0])

    def set_threshold(self, threshold: float) -> None:
        """Change the adaptive threshold T for subsequent forwards (evaluation sweeps)."""
        if self.gating_config.gating != "adaptive":
            raise ValueError(f"set_threshold applies to adaptive gating, this router is "
                             f"{self.gating_config.gating!r}")
        if not threshold >= 0.0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.threshold = float(threshold)

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """[T, E] fp32 logits -> [T, E] bool gating decision (before capacity)."""
        return gating_map(self.gating_config, logits, self.threshold)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Megatron Router API: logits [s, b, E] -> (probs [s*b, E], routing_map [s*b, E]).

        `padding_mask` [s, b] (True = padding, Megatron's convention) removes padded tokens
        from the load-balancing loss and the statistics; they are still routed.
        """
        seq_length, batch = logits.shape[:2]
        logits = logits.reshape(-1, self.num_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        with torch.no_grad():
            decided = self.select(logits)
        probs = combine_weights(logits, scores, decided, self.gating_config.combine,
                                self.config.moe_router_topk_scaling_factor)
        routing_map = decided
        if self.config.moe_expert_capacity_factor is not None:
            # Megatron's capacity for its top-k at k = the per-token bound (2 for adaptive),
            # the same the alltoall dispatcher pads to.
            capacity = get_capacity(decided.shape[0] * self.topk, self.num_experts,
                                    self.config.moe_expert_capacity_factor)
            probs, routing_map = drop_over_capacity(
                probs, decided, capacity, self.config.moe_token_drop_policy,
                self.config.moe_pad_expert_input_to_capacity)
        if self.training and torch.is_grad_enabled():
            probs = self._attach_balance_loss(probs, logits, padding_mask)
        self._record_stats(decided, routing_map, padding_mask, seq_length, batch,
                           counts_statistics(self))
        return probs, routing_map

    def _attach_balance_loss(self, probs, logits, padding_mask):
        """Megatron's `_apply_aux_loss`, with the routing map of the top-`balance_topk`
        decisions (top-1 for adaptive / top-p gating) instead of the top-`moe_router_topk`."""
        coeff = self.get_aux_loss_coeff("aux_loss")
        if coeff == 0:
            return probs
        k = self.gating_config.balance_topk
        top_map, scores = compute_routing_scores_for_aux_loss(
            logits, k, self.score_function, padding_mask=padding_mask)
        tokens_per_expert, local_tokens, total_tokens = get_tokens_per_expert_and_token_count(
            routing_map=top_map, reduce_group=self.tp_cp_group, topk=k,
            with_padding_mask=padding_mask is not None)
        aux_loss = switch_load_balancing_loss_func(
            probs=scores, tokens_per_expert=tokens_per_expert, total_num_tokens=total_tokens,
            topk=k, num_experts=self.num_experts, moe_aux_loss_coeff=coeff)
        return self.attach_and_log_load_balancing_loss(
            probs, coeff, aux_loss, LOAD_BALANCING_LOSS_NAME, self.tp_cp_group,
            valid_token_count=local_tokens)

    @torch.no_grad()
    def _record_stats(self, decided, routing_map, padding_mask, seq_length, batch,
                      count: bool = True) -> None:
        # Masks and sums only: no boolean indexing or .item(), so no host synchronisation
        # in the forward path on a GPU.
        valid = (torch.ones(decided.shape[0], dtype=torch.bool, device=decided.device)
                 if padding_mask is None else ~padding_mask).unsqueeze(1)
        kept = decided & routing_map & valid          # real assignments after capacity
        lost = decided & ~routing_map & valid
        per_token = (decided & valid).sum(dim=1)
        tokens = valid.sum()
        two_expert = (per_token >= 2).sum()
        assignments = per_token.sum()
        tokens_per_expert = kept.sum(dim=0)
        dropped_assignments = lost.sum()
        dropped_tokens = (lost.any(dim=1) & ~kept.any(dim=1)).sum()
        self.last_stats = dict(
            tokens=tokens,
            # [s, b] experts chosen per token (0 at padding): per-sequence curriculum scores.
            experts_per_token=per_token.view(seq_length, batch),
            two_expert_share=two_expert / tokens.clamp_min(1),
            mean_experts_per_token=assignments / tokens.clamp_min(1),
            tokens_per_expert=tokens_per_expert,
            dropped_assignments=dropped_assignments,
            dropped_tokens=dropped_tokens,
        )
        if count:
            self.stat_sums.add(("forwards",), tokens=tokens, two_expert_tokens=two_expert,
                               assignments=assignments, tokens_per_expert=tokens_per_expert,
                               dropped_assignments=dropped_assignments,
                               dropped_tokens=dropped_tokens)

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Megatron Router API: hidden states [s, b, H] -> (probs, routing_map), [s*b, E]."""
        input = self.apply_input_jitter(input)
        logits = self.gating(input)
        return self.routing(logits, padding_mask=padding_mask)


# ---- TensorBoard scalars of a window -------------------------------------------------------
def window_scalars(layers: Sequence[Any]) -> Dict[str, float]:
    """TensorBoard scalars of the statistics window of every adaptive MoE layer in `layers`
    (MoELayers with an AdaptiveRouter), read with ONE device-to-host copy for all of them:
    the same tags as `adaptive.provider.routing_scalars`, over the window's forwards (one
    training iteration's micro-batches under the training monitor) instead of the last one.

    - `moe/layerNNN/two-expert-share`, `moe/layerNNN/experts-per-token`,
      `moe/layerNNN/expertE-tokens`, `moe/layerNNN/expert-load-imbalance` and with EP > 1
      `moe/layerNNN/ep-load-imbalance`;
    - `moe/dropped-tokens`, `moe/fully-dropped-tokens` summed over layers.
    Layers without a forward in the window are left out.
    """
    layers = list(layers)
    out: Dict[str, float] = {}
    dropped, fully_dropped = 0.0, 0.0
    for layer, sums in zip(layers, read_stat_sums([layer.router for layer in layers])):
        if not sums["forwards"]:
            continue
        stats = AdaptiveRouter.summarize_stats(sums)
        tag = f"moe/layer{layer.layer_number:03d}"
        out[f"{tag}/two-expert-share"] = stats["two_expert_share"]
        out[f"{tag}/experts-per-token"] = stats["mean_experts_per_token"]
        load: List[float] = stats["tokens_per_expert"]
        for expert, count in enumerate(load):
            out[f"{tag}/expert{expert}-tokens"] = count
        total = sum(load)
        if total > 0:
            out[f"{tag}/expert-load-imbalance"] = max(load) / (total / len(load))
            ep = layer.ep_group.size()
            if ep > 1:   # experts [r E/EP, (r+1) E/EP) live on EP rank r
                per = len(load) // ep
                per_rank = [sum(load[r * per:(r + 1) * per]) for r in range(ep)]
                out[f"{tag}/ep-load-imbalance"] = max(per_rank) / (total / ep)
        dropped += stats["dropped_assignments"]
        fully_dropped += stats["dropped_tokens"]
    if out:
        out["moe/dropped-tokens"] = dropped
        out["moe/fully-dropped-tokens"] = fully_dropped
    return out
