"""The FFN critical path of a DynaMoE expert layout: what its slowest GPU computes and sends.

A token at level k runs the first n_k of the S shells (nested), so shell j (0-based) serves
the share q_j = sum of p_k over the levels with n_k > j of the tokens, where p is the level
profile (the fraction of tokens at each level: measured by tools/evaluate.py or the
curriculum profiler, or uniform). The mean FFN fraction is f = sum_j q_j / S.

Megatron's expert grid splits each shell over ETP GPUs and deals the shells to EP ranks
(EP rank r holds physical slots [r S/EP, (r+1) S/EP), the logical shells of
`shells.shell_placement`, serpentine). The tokens of ETP x EP / TP attention groups meet in
one grid group, so relative to the dense FFN at the attention's TP, EP rank r computes

    R_r = (EP / S) x sum of q_j over the shells it holds

and the layer waits for the slowest rank: the critical path is R = max_r R_r (R = f with
EP = 1: every GPU holds a slice of every shell; R = q_0 = 1 with one shell per rank: the
first shell sees every token, so nothing is saved). The shell dispatch all-to-all sends each
token's sum_j q_j = f S copies, (EP - 1) / EP of them off the GPU, in and out, forward and
backward.

`rank_expert_layouts` ranks the (ETP, EP) grids of a request by an estimated FFN time per
step: the critical path's FLOPs at the GPU's bf16 peak plus the all-to-all at NVLink speed
(inside a node) or the NIC's (across nodes), both from runtime.gpus; the memory verdict is
the planner's. The estimate orders layouts; it is not a step-time prediction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.dynamoe.shells import shell_placement
from megatron_dynamoe.runtime.gpus import GPUS, INTER_NODE_BYTES_PER_S
from megatron_dynamoe.planning.planner import Plan, PlanRequest, plan, stage_layers


def uniform_profile(dyn: DynaMoEConfig) -> Tuple[float, ...]:
    """Every level equally often: (1/K, ..., 1/K)."""
    return tuple(1.0 / dyn.num_levels for _ in range(dyn.num_levels))


def check_profile(dyn: DynaMoEConfig, profile: Sequence[float]) -> Tuple[float, ...]:
    """`profile` as a tuple of K level shares; ValueError unless it has K non-negative
    entries summing to 1 (within 1e-6)."""
    p = tuple(float(x) for x in profile)
    if len(p) != dyn.num_levels:
        raise ValueError(f"level profile {list(p)} has {len(p)} entries: give one share per "
                         f"level ({dyn.num_levels})")
    if any(x < 0 for x in p) or abs(sum(p) - 1.0) > 1e-6:
        raise ValueError(f"level profile {list(p)}: shares must be >= 0 and sum to 1")
    return p


def shell_loads(dyn: DynaMoEConfig, profile: Sequence[float]) -> List[float]:
    """q [S]: the share of tokens each shell serves (see the module docstring)."""
    p = check_profile(dyn, profile)
    return [sum(share for share, n in zip(p, dyn.level_shells) if n > j)
            for j in range(dyn.num_shells)]


def mean_ffn_fraction(dyn: DynaMoEConfig, profile: Sequence[float]) -> float:
    """f = sum_j q_j / S, the mean FFN fraction of the profile."""
    return sum(shell_loads(dyn, profile)) / dyn.num_shells


def rank_loads(dyn: DynaMoEConfig, profile: Sequence[float], ep: int) -> List[float]:
    """R_r [EP]: each EP rank's FFN work relative to the dense FFN at the attention's TP."""
    q = shell_loads(dyn, profile)
    slots = shell_placement(dyn.num_shells, ep)
    per_rank = dyn.num_shells // ep
    return [ep / dyn.num_shells * sum(q[s] for s in slots[r * per_rank:(r + 1) * per_rank])
            for r in range(ep)]


def ffn_critical_path(dyn: DynaMoEConfig, profile: Sequence[float], ep: int) -> float:
    """R = max_r R_r: the slowest EP rank's FFN work relative to the dense FFN."""
    return max(rank_loads(dyn, profile, ep))


@dataclass(frozen=True)
class LayoutTime:
    """One expert grid's estimated FFN cost per training step on the slowest GPU."""

    etp: int
    ep: int
    critical_path: float         # R, relative to the dense FFN at the attention's TP
    all_to_all_bytes: float      # shell dispatch sent per GPU per step
    ffn_seconds: float           # R x the dense FFN's FLOPs per GPU at the bf16 peak
    all_to_all_seconds: float

    @property
    def seconds(self) -> float:
        return self.ffn_seconds + self.all_to_all_seconds


def layout_time(r: PlanRequest, profile: Sequence[float], gpu: str = "h100") -> LayoutTime:
    """The FFN time estimate of `r`'s expert grid (stage 0's MoE layers, all micro-batches
    of a step, forward and backward)."""
    dyn, a = r.dynamoe, r.arch
    spec = GPUS[gpu]
    moe_layers = sum(dyn.is_moefied(i) for i in stage_layers(r, 0))
    tokens = r.num_microbatches * r.micro_batch * r.seq_length // r.cp
    matrices = 3 if a.gated else 2
    dense_flops = 3 * 2 * matrices * a.hidden_size * a.ffn_hidden_size / r.tp * tokens
    critical = ffn_critical_path(dyn, profile, r.ep)
    e = 2 if r.bf16 else 4
    copies = mean_ffn_fraction(dyn, profile) * dyn.num_shells
    per_gpu_tokens = tokens / (r.tp if r.sp else 1)
    sent = 4 * (r.ep - 1) / r.ep * per_gpu_tokens * copies * a.hidden_size * e * moe_layers
    inside = r.gpus_per_node is None or r.expert_tp * r.ep <= r.gpus_per_node
    bandwidth = spec.nvlink_bytes_per_s if inside else INTER_NODE_BYTES_PER_S
    return LayoutTime(r.expert_tp, r.ep, critical, sent,
                      critical * dense_flops * moe_layers / spec.bf16_flops, sent / bandwidth)


def rank_expert_layouts(r: PlanRequest, profile: Optional[Sequence[float]] = None,
                        gpu: str = "h100") -> List[Tuple[LayoutTime, Plan]]:
    """Every (ETP, EP) grid for `r`'s attention layout (ETP dividing TP, EP dividing the
    shells, ETP x EP <= TP x DP) that divides, with its FFN time estimate and the planner's
    verdict: fitting layouts first, then by estimated time, then fewer EP ranks."""
    dyn = r.dynamoe
    if dyn is None:
        raise ValueError("rank_expert_layouts needs a DynaMoE model (not --dense)")
    profile = uniform_profile(dyn) if profile is None else check_profile(dyn, profile)
    found = []
    for etp in (d for d in range(1, r.tp + 1) if r.tp % d == 0):
        for ep in (d for d in range(1, dyn.num_shells + 1) if dyn.num_shells % d == 0):
            c = dataclasses.replace(r, layout=dataclasses.replace(
                r.layout, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp))
            p = plan(c)
            if p.problems:
                continue
            found.append((layout_time(c, profile, gpu), p))
    found.sort(key=lambda tp: (not tp[1].fits, round(tp[0].seconds, 9), tp[1].required_gib,
                               tp[0].ep))
    return found
