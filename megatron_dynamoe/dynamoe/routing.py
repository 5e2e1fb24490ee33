"""Pure tensor functions of the difficulty routing: levels, routing maps, labels.

Shapes: T tokens, K levels, S shells, H hidden size. Levels are 1-based (1..K) everywhere.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch


def cumulative_level_probs(logits: torch.Tensor) -> torch.Tensor:
    """q_e = P(level <= e suffices) from the router's level logits; monotone in e.

    Args:
        logits: [T, K] router logits over levels.
    Returns:
        [T, K] float32 cumulative probabilities, non-decreasing along K, last column exactly 1.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    q = torch.cumsum(probs, dim=-1)
    # Summation round-off could push q above 1 or leave the last column at 1 - 1e-7.
    q = torch.clamp(q, max=1.0)
    q[..., -1] = 1.0
    return q


def levels_at_sensitivity(q: torch.Tensor, theta: float) -> torch.Tensor:
    """Per-token level: the smallest e with q_e >= theta (theta = 1: level K, theta = 0: 1).

    The end points are exact by definition, not by floating point: q_e for e < K may round to
    1.0 in fp32, which must not stop theta = 1 from meaning "the dense model".

    Args:
        q: [T, K] cumulative level probabilities.
        theta: sensitivity in [0, 1].
    Returns:
        [T] int64 levels in 1..K.
    """
    num_tokens, num_levels = q.shape
    if theta >= 1.0:
        return torch.full((num_tokens,), num_levels, dtype=torch.long, device=q.device)
    if theta <= 0.0:
        return torch.ones(num_tokens, dtype=torch.long, device=q.device)
    # q is monotone, so counting the levels below theta finds the first one at or above it.
    return 1 + (q[:, :-1] < theta).sum(dim=-1)


def logical_level_masks(level_shells: Sequence[int]) -> torch.Tensor:
    """[K, S] bool: row e-1 marks the logical shells of level e (a prefix)."""
    num_shells = level_shells[-1]
    shells = torch.arange(num_shells)
    return shells.unsqueeze(0) < torch.tensor(level_shells).unsqueeze(1)


def logical_group_masks(level_shells: Sequence[int]) -> torch.Tensor:
    """[K, S] bool: row j marks the shells added by level j+1 (disjoint, union = all)."""
    bounds = [0, *level_shells]
    num_shells = level_shells[-1]
    shells = torch.arange(num_shells)
    lower = torch.tensor(bounds[:-1]).unsqueeze(1)
    upper = torch.tensor(bounds[1:]).unsqueeze(1)
    return (shells.unsqueeze(0) >= lower) & (shells.unsqueeze(0) < upper)


def to_physical(logical_mask: torch.Tensor, placement: List[int]) -> torch.Tensor:
    """Reorder the last (shell) axis from logical shells to physical expert slots.

    Args:
        logical_mask: [..., S] indexed by logical shell.
        placement: physical slot p -> logical shell held there.
    Returns:
        [..., S] indexed by physical expert slot (Megatron's expert index).
    """
    index = torch.tensor(placement, device=logical_mask.device)
    return logical_mask.index_select(-1, index)


def level_routing_map(levels: torch.Tensor, level_masks_physical: torch.Tensor) -> torch.Tensor:
    """Routing map sending each token to exactly the shells of its level.

    Args:
        levels: [T] int64 in 1..K.
        level_masks_physical: [K, S] from `logical_level_masks` + `to_physical`.
    Returns:
        [T, S] bool routing map over physical experts.
    """
    return level_masks_physical.to(levels.device)[levels - 1]


def level_counts(levels: torch.Tensor, num_levels: int) -> torch.Tensor:
    """Tokens per level, computed on the levels' device without a host synchronisation.

    `torch.bincount` reads the input's min and max on the host (two device-to-host syncs
    per call on CUDA); the number of levels is known, so a fixed-size scatter-add does it.

    Args:
        levels: [T] (or any shape) int64 levels in 1..K.
        num_levels: K.
    Returns:
        [K] int64 counts on `levels.device`.
    """
    flat = levels.reshape(-1)
    counts = torch.zeros(num_levels, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat - 1, torch.ones_like(flat))


def shell_levels(level_shells: Sequence[int]) -> List[int]:
    """The level (1..K) that first uses each logical shell: [S] host ints (shell s is in
    every level e >= shell_levels[s])."""
    return [1 + sum(1 for n in level_shells if n <= shell) for shell in range(level_shells[-1])]


def level_sort(levels: torch.Tensor, num_levels: int):
    """Tokens ordered by level, highest first: the tokens a shell of level e serves (every
    token at level >= e) are then a prefix of the order, so one gather of the tokens feeds
    every shell without copies per shell.

    Args:
        levels: [T] int64 levels in 1..K.
        num_levels: K.
    Returns:
        (order [T] int64, a permutation of the tokens; at_or_above [K] int64, entry e-1 the
        number of tokens at level >= e, i.e. the prefix length of a level-e shell), both on
        `levels.device`.
    """
    order = torch.argsort(levels, descending=True, stable=True)
    at_or_above = level_counts(levels, num_levels).flip(0).cumsum(0).flip(0)
    return order, at_or_above


def level_errors(group_outputs: torch.Tensor) -> torch.Tensor:
    """||P_K - P_e||_2 per token and level, where P_e is the prefix sum of the first e groups.

    One full-FFN pass yields every level's partial output, so this costs no extra expert work.
    Computed in float32 (whatever the input dtype): the [T, K, H] passes are the label
    step's largest elementwise cost, and float32 sums of K group outputs are far more
    precise than the tolerances they are compared with (the label tests check them against
    float64 brute force).

    Args:
        group_outputs: [T, K, H] output of each level's added shells.
    Returns:
        [T, K] float32 errors; the last column is exactly 0.
    """
    g = group_outputs.detach().float()
    # Residual of level e = sum of the groups above it: a reversed cumulative sum.
    tail = torch.flip(torch.cumsum(torch.flip(g, dims=[1]), dim=1), dims=[1])
    residual = torch.cat([tail[:, 1:], torch.zeros_like(tail[:, :1])], dim=1)
    return residual.norm(dim=-1)


def label_targets(errors: torch.Tensor, reference: torch.Tensor, tolerance: float,
                  tolerance_max: Optional[float] = None) -> torch.Tensor:
    """Router targets over levels from each level's error relative to a reference norm.

    With r_e = errors_e / reference, a token's label at tolerance tau is the smallest level
    with r_e <= tau. Hard labels (`tolerance_max` None or equal to `tolerance`) are that
    label one-hot. Soft labels draw tau uniformly from [tolerance, tolerance_max]: the target
    cumulative probability is q_e = P(r_e <= tau), so a router that matches them turns theta
    into a tolerance, q_e >= theta <=> r_e <= tolerance_max - theta (tolerance_max -
    tolerance). An error of exactly 0 counts as within any tolerance (a zero FFN output
    gets level 1).

    Args:
        errors: [T, K] from `level_errors` (last column 0); reference: [T] norms (the FFN
            output's, or the residual stream's).
    Returns:
        [T, K] float32 probabilities over levels 1..K (rows sum to 1).
    """
    ratio = errors / reference.double().unsqueeze(-1)
    ratio = torch.where(errors == 0, torch.zeros_like(ratio), ratio)
    if tolerance_max is None or tolerance_max <= tolerance:
        q = (ratio <= tolerance).double()
    else:
        q = ((tolerance_max - ratio) / (tolerance_max - tolerance)).clamp(0.0, 1.0)
    # Errors need not fall monotonically with the level; a token that is within tolerance
    # at level e counts as within it at every larger level.
    q = torch.cummax(q, dim=-1).values
    q[:, -1] = 1.0
    return torch.diff(q, dim=-1, prepend=torch.zeros_like(q[:, :1])).float()


def median_levels(level_probs: torch.Tensor) -> torch.Tensor:
    """[T, K] probabilities over levels -> [T] int64 smallest level whose cumulative
    probability reaches 1/2 (the hard label at the middle tolerance; for one-hot rows, the
    label itself)."""
    q = torch.cumsum(level_probs.double(), dim=-1)
    return 1 + (q[:, :-1] < 0.5 - 1e-9).sum(dim=-1)


def select_level_output(group_outputs: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Each token's output at its level: the sum of its first `level` group outputs.

    Gradients reach only the groups a token uses, as in the routed forward.

    Args:
        group_outputs: [T, K, H].
        levels: [T] int64 in 1..K.
    Returns:
        [T, H].
    """
    num_levels = group_outputs.shape[1]
    keep = torch.arange(num_levels, device=levels.device).unsqueeze(0) < levels.unsqueeze(1)
    return (group_outputs * keep.unsqueeze(-1).to(group_outputs.dtype)).sum(dim=1)


def router_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                         valid: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over valid tokens of -sum_e target_e log softmax(logits)_e (sum, not mean: callers
    normalise by the global token count).

    Args:
        logits: [T, K]; targets: [T] int64 labels in 1..K, or [T, K] probabilities over
            levels (from `label_targets`); valid: optional [T] bool.
    Returns:
        scalar float32.
    """
    if targets.dim() == 1:
        losses = torch.nn.functional.cross_entropy(logits.float(), targets - 1,
                                                   reduction="none")
    else:
        losses = -(targets.float() * torch.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
    if valid is not None:
        losses = losses * valid.to(losses.dtype)
    return losses.sum()
