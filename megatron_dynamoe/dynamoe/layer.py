"""DynaMoELayer: a Megatron-Core MoELayer whose experts are nested shells of one FFN.

Two forwards, both through Megatron's own expert MLPs:

- routed (inference, and training steps without labels): the DifficultyRouter gives each
  token a level; the token goes to exactly that level's shells with weight 1 and the shell
  outputs are summed. Experts see only the tokens routed to them, so FLOPs are proportional
  to the level. With expert parallelism the tokens travel through Megatron's token
  dispatcher; with every shell on the rank (EP = 1) they are sorted by level once and each
  shell reads a prefix (`_level_sorted_experts`, no copy per shell).
- labelled (a `label_fraction` of training steps, always through the dispatcher): every token is dispatched K times, copy j
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
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    save_to_aux_losses_tracker,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dynamoe.dynamoe import routing
from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.dynamoe.prefix_ops import prefix_sum, prefix_views
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


# ---- routing statistics kept on the device ---------------------------------------------------
class StatSums:
    """Running sums of a module's routing statistics, kept on the device (no host syncs).

    One flat float64 tensor laid out by `fields` ((name, length) pairs), allocated on the
    device of the first values added; `add` is a few in-place device kernels per call, so a
    forward never waits for the device. Counts known on the host (forwards) are plain ints in
    `counters`. The window runs from construction or the last `reset` (the training monitor
    resets every iteration); `read_stat_sums` brings any number of modules' sums to the host
    with one device-to-host copy. float64 keeps token counts exact up to 2**53.
    """

    def __init__(self, fields: Sequence[Tuple[str, int]], counters: Sequence[str] = ()):
        self.fields: Tuple[Tuple[str, int], ...] = tuple((name, int(n)) for name, n in fields)
        self.slices: Dict[str, slice] = {}
        offset = 0
        for name, length in self.fields:
            self.slices[name] = slice(offset, offset + length)
            offset += length
        self.size = offset
        self.counter_names: Tuple[str, ...] = tuple(counters)
        self.counters: Dict[str, int] = dict.fromkeys(self.counter_names, 0)
        self.sums: Optional[torch.Tensor] = None   # [size] float64, on the model's device

    def add(self, counters: Iterable[str] = (), **values: torch.Tensor) -> None:
        """Add each tensor (any shape with the field's length of elements) to its field and 1
        to each named host counter. Device kernels only."""
        for name in counters:
            self.counters[name] += 1
        for name, value in values.items():
            value = value.detach().reshape(-1)
            if self.sums is None or self.sums.device != value.device:
                self.sums = torch.zeros(self.size, dtype=torch.float64, device=value.device)
            self.sums[self.slices[name]].add_(value)

    def reset(self) -> None:
        """Start a new window (one device kernel)."""
        if self.sums is not None:
            self.sums.zero_()
        self.counters = dict.fromkeys(self.counter_names, 0)

    def split(self, flat: Optional[List[float]]) -> Dict[str, Any]:
        """Host values [size] (None: nothing added yet) -> {field: list of floats,
        counter: int}."""
        if flat is None:
            flat = [0.0] * self.size
        out: Dict[str, Any] = {name: flat[s] for name, s in self.slices.items()}
        out.update(self.counters)
        return out


def read_stat_sums(holders: Sequence[Any]) -> List[Dict[str, Any]]:
    """The running sums of every holder (a module with a `stat_sums` StatSums, e.g. a
    DynaMoELayer or an AdaptiveRouter) on the host, as `StatSums.split` dicts, with ONE
    device-to-host copy (the sums are concatenated on the device first; one copy per device,
    and a rank's modules share one). Nothing else reads device memory."""
    by_device: Dict[torch.device, List[int]] = {}
    for i, holder in enumerate(holders):
        sums = holder.stat_sums.sums
        if sums is not None:
            by_device.setdefault(sums.device, []).append(i)
    host: List[Optional[List[float]]] = [None] * len(holders)
    for indices in by_device.values():
        flat = torch.cat([holders[i].stat_sums.sums for i in indices]).cpu().tolist()
        offset = 0
        for i in indices:
            size = holders[i].stat_sums.size
            host[i] = flat[offset:offset + size]
            offset += size
    return [holder.stat_sums.split(values) for holder, values in zip(holders, host)]


def counts_statistics(module: torch.nn.Module) -> bool:
    """Whether a forward of `module` adds to its running sums: every forward except a
    training-mode one without autograd, which is the first pass of activation recompute
    (Megatron reruns it with autograd in the backward, and that pass counts), so each
    micro-batch counts once."""
    return not module.training or torch.is_grad_enabled()


class DynaMoELayer(MoELayer):
    """Nested-shell MoE layer (see module docstring). Returns (output, None) like MoELayer.

    Statistics of the local tokens, computed on the device without host synchronisation:

    - `stat_sums` (a StatSums, summed over the forwards of the window; see
      `counts_statistics`): `level_counts` [K] routed tokens per level; `label_counts` [K]
      labelled tokens per label, `router_correct` [1] labelled tokens whose predicted
      (median) level equals the label, `router_loss_sum` [1] the router cross-entropy summed
      over labelled tokens (label sums only from forwards that computed the router loss);
      host counters `forwards`, `labelled_forwards`. `summarize_stats` turns one
      `read_stat_sums` entry into the logged numbers (FFN fraction, tokens per expert, ...).
      `reset_stats` starts a new window; the training monitor does at every iteration.
    - `last_stats`: detached tensors of the last forward alone (tests, router fitting,
      curriculum profiling): `tokens`, `level_counts` [K], `ffn_fraction`,
      `tokens_per_expert` [S] (physical experts), and on labelled forwards `labels` [T],
      `label_counts` [K], `router_accuracy`, `router_loss` (when the loss is computed) and,
      when collecting router data, `router_inputs` [T, H] and `label_targets` [T, K].
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
        num_levels = dynamoe_config.num_levels
        self.stat_sums = StatSums([("level_counts", num_levels), ("label_counts", num_levels),
                                   ("router_correct", 1), ("router_loss_sum", 1)],
                                  counters=("forwards", "labelled_forwards"))
        # Host copies of the routing constants, to summarise the sums without device reads:
        # level e's FFN fraction, and whether physical expert slot p belongs to level e.
        self._host_level_fraction = [n / dynamoe_config.num_shells
                                     for n in dynamoe_config.level_shells]
        self._host_level_slots = [[shell < n for shell in self.router.placement]
                                  for n in dynamoe_config.level_shells]
        # Routed forwards at EP = 1 run the shells on level-sorted tokens
        # (`_level_sorted_experts`); False: always Megatron's dispatcher (the reference).
        self.level_sorted_experts = True
        first_level = routing.shell_levels(dynamoe_config.level_shells)
        self._local_shell_levels = [first_level[shell] for shell in
                                    getattr(self.experts, "shell_ids", ())] or None

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

    def reset_stats(self) -> None:
        """Start a new statistics window (`stat_sums`)."""
        self.stat_sums.reset()

    def summarize_stats(self, sums: Dict[str, Any]) -> Dict[str, Any]:
        """Host numbers of one window from its `read_stat_sums` entry (plain Python: no
        device access). Keys: `forwards`, `labelled_forwards`, `tokens`, `level_counts` [K],
        `ffn_fraction` (mean FFN compute fraction of the routed tokens; None without
        tokens), `tokens_per_expert` [S] (routed tokens per physical expert slot: EP rank r
        holds slots [r S/EP, (r+1) S/EP)), `labelled_tokens`, `label_counts` [K],
        `router_loss` (mean cross-entropy per labelled token) and `router_accuracy` (None
        without labelled tokens)."""
        counts = list(sums["level_counts"])
        tokens = sum(counts)
        labels = list(sums["label_counts"])
        labelled = sum(labels)
        per_expert = [sum(c for c, row in zip(counts, self._host_level_slots) if row[slot])
                      for slot in range(len(self.router.placement))]
        return dict(
            forwards=sums["forwards"], labelled_forwards=sums["labelled_forwards"],
            tokens=tokens, level_counts=counts,
            ffn_fraction=(sum(c * f for c, f in zip(counts, self._host_level_fraction))
                          / tokens if tokens else None),
            tokens_per_expert=per_expert,
            labelled_tokens=labelled, label_counts=labels,
            router_loss=sums["router_loss_sum"][0] / labelled if labelled else None,
            router_accuracy=sums["router_correct"][0] / labelled if labelled else None)

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
        count = counts_statistics(self)
        decision = self.router.decide(hidden_states)
        if self.computes_labels():
            try:
                output = self._labelled_forward(hidden_states, decision, count)
            finally:
                self._residual_norms = None
        else:
            if self.uses_level_sorted_experts():
                output = self._level_sorted_experts(hidden_states, decision.levels)
            else:
                output = self._dispatch_to_shells(hidden_states, decision.probs,
                                                  decision.routing_map)
            output = self._keep_router_in_graph(output, decision.logits)
        self._record_routing_stats(decision, count)
        return output, None

    def _dispatch_to_shells(self, hidden_states, probs, routing_map):
        """Megatron's dispatch -> experts -> combine for an explicit routing."""
        hidden, probs = self.preprocess(hidden_states, probs, routing_map)
        dispatched, probs = self.dispatch(hidden, probs)
        output, _ = self.routed_experts_compute(dispatched, probs)
        output = self.combine(output)
        return self.postprocess(output, None)

    def uses_level_sorted_experts(self) -> bool:
        """Whether a routed forward runs `_level_sorted_experts`: switched on, every shell on
        this rank (EP = 1), and the experts' tensor-parallel group either trivial or the
        sequence-parallel group the tokens are split over (expert TP = TP)."""
        if not self.level_sorted_experts or self._local_shell_levels is None \
                or self.ep_group.size() != 1:
            return False
        expert_tp = self.experts.tp_group.size()
        return expert_tp == 1 or (self.config.sequence_parallel
                                  and expert_tp == self.attn_tp_group.size())

    def _level_sorted_experts(self, hidden_states: torch.Tensor, levels: torch.Tensor):
        """Routed forward with every shell on this rank: [s, b, H] -> [s, b, H].

        Megatron's dispatcher copies a token once per shell of its level (a level-K token K
        times at K shells), runs each shell on its copies and sums them back with a
        scatter-add. Here the tokens are gathered once in level order, highest first: a
        shell of level e serves the tokens at level >= e, a prefix of that order, so each
        shell runs Megatron's expert MLP on a view and adds into the prefix of one output,
        which is scattered back once. Same shells, same weights, same FLOPs (weight 1 per
        shell, as the routing map's probabilities). The prefix lengths are read on the host
        once per layer: the split sizes that Megatron's SequentialMLP reads on its path
        (`tokens_per_expert.tolist()`), read here instead of there. With expert TP the
        tokens are all-gathered over the expert TP group and the partial outputs
        reduce-scattered, as the dispatcher does.
        """
        from megatron.core.tensor_parallel import (
            gather_from_sequence_parallel_region,
            reduce_scatter_to_sequence_parallel_region,
        )

        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])
        tp_group = self.experts.tp_group
        if tp_group.size() > 1:
            tokens = gather_from_sequence_parallel_region(tokens, group=tp_group)
            with torch.no_grad():
                levels = gather_from_sequence_parallel_region(levels, group=tp_group)
        order, at_or_above = routing.level_sort(levels, self.dynamoe_config.num_levels)
        prefix = at_or_above.tolist()   # the one host read (see docstring)
        sizes = [prefix[level - 1] for level in self._local_shell_levels]
        inputs = prefix_views(tokens.index_select(0, order), sizes)
        output = prefix_sum(tokens.shape[0], [expert(x)[0] for expert, x in
                                              zip(self.experts.local_experts, inputs)])
        # Back to token order with one gather (the inverse permutation; no zero fill).
        inverse = torch.empty_like(order).scatter_(
            0, order, torch.arange(order.numel(), device=order.device))
        output = output.index_select(0, inverse)
        if tp_group.size() > 1:
            output = reduce_scatter_to_sequence_parallel_region(output, group=tp_group)
        return output.view(shape)

    def _labelled_forward(self, hidden_states: torch.Tensor, decision: LevelDecision,
                          count: bool = True):
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
        ce_sum = None
        if torch.is_grad_enabled():
            output, ce_sum = self._attach_router_loss(output, decision.logits, targets)
        with torch.no_grad():
            predicted = routing.median_levels(torch.softmax(decision.logits.float(), dim=-1))
            correct = (predicted == labels).sum()
            label_counts = routing.level_counts(labels, levels)
            self.last_stats["router_accuracy"] = correct / tokens
            self.last_stats["label_counts"] = label_counts
            self.last_stats["labels"] = labels
            if ce_sum is not None and count:
                self.stat_sums.add(("labelled_forwards",), label_counts=label_counts,
                                   router_correct=correct, router_loss_sum=ce_sum)
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
            reference = groups.detach().float().sum(dim=1).norm(dim=-1)
        else:
            reference = self._residual_norms
            if reference is None or reference.shape[0] != groups.shape[0]:
                raise RuntimeError(
                    "residual-relative labels need the residual stream: build the layer "
                    "through megatron_dynamoe.models.spec (DynaMoETransformerLayer), or set "
                    "label_reference='ffn'")
        return routing.label_targets(errors, reference, cfg.label_tolerance,
                                     cfg.label_tolerance_max)

    def _attach_router_loss(self, output, logits, targets):
        """-> (output carrying the router's side loss, detached cross-entropy sum)."""
        coeff = self.dynamoe_config.router_loss_coeff
        tokens = logits.shape[0]
        ce_sum = routing.router_cross_entropy(logits, targets)
        # Mean over the sequence: with sequence parallelism each TP rank holds 1/TP of the
        # tokens and the router's gradients are summed over TP.
        tp_share = self.attn_tp_group.size() if self.config.sequence_parallel else 1
        mean_ce = ce_sum / (tokens * tp_share)
        self.last_stats["router_loss"] = (ce_sum / tokens).detach()
        if coeff == 0.0:
            return self._keep_router_in_graph(output, logits), ce_sum.detach()
        side_loss = coeff * mean_ce
        if self.config.calculate_per_token_loss:
            # Megatron divides every gradient by the token count later; undo it here.
            side_loss = side_loss * tokens
        save_to_aux_losses_tracker(ROUTER_LOSS_NAME, mean_ce.detach(), self.layer_number,
                                   self.config.num_layers, reduce_group=self.attn_tp_group
                                   if self.config.sequence_parallel else None)
        return MoEAuxLossAutoScaler.apply(output, side_loss), ce_sum.detach()

    def _keep_router_in_graph(self, output: torch.Tensor, logits: torch.Tensor):
        """`output` carrying a zero-weight side loss on the router's logits [T, K] when the
        router trains and this forward has no router loss, so that every trainable parameter
        gets a gradient (zero) on every step: Megatron's DDP with --overlap-grad-reduce
        starts a bucket's reduction when all of its parameters have one, and asserts at the
        end of the step when one never came."""
        if not (self.training and torch.is_grad_enabled()
                and any(p.requires_grad for p in self.router.parameters())):
            return output
        return MoEAuxLossAutoScaler.apply(output, logits.sum() * 0.0)

    def _record_routing_stats(self, decision: LevelDecision, count: bool = True) -> None:
        """Per-forward statistics on the device (no bincount, .item() or data-dependent
        shapes: nothing waits for the device), added to the running sums when `count`."""
        with torch.no_grad():
            counts = routing.level_counts(decision.levels, self.dynamoe_config.num_levels)
            tokens = counts.sum()
            self.last_stats["tokens"] = tokens
            self.last_stats["level_counts"] = counts
            # Mean of level_compute_fraction over the tokens (0 without tokens).
            self.last_stats["ffn_fraction"] = (
                counts.double() @ self.level_compute_fraction.double()) / tokens.clamp_min(1)
            # Token t goes to the slots of level_masks[level_t - 1]: [K] x [K, S] -> [S].
            self.last_stats["tokens_per_expert"] = (
                counts.unsqueeze(1) * self.router.level_masks.to(counts.device)).sum(dim=0)
            if count:
                self.stat_sums.add(("forwards",), level_counts=counts)
